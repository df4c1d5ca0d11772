"""Measure loraxd beside transformers' batched `generate` on the same model, in one run.

Workload: N concurrent streaming requests of `--new-tokens` tokens each, EOS ignored.
Rounds alternate between the baseline and loraxd so that both see the same machine noise;
the report gives medians and the ratio of medians. It also reports the median time an idle
daemon takes to answer a 1-token request (the IPC path's overhead over one forward pass).

`--adapters`: the multi-LoRA workload instead: N distinct random rank-`--rank` adapters on
all linears, one per stream, against loraxd base-only and transformers + PEFT batch-N
`generate(adapter_names=…)`.

`--constrained`: also the throughput of the same N plain streams with N `json_schema`
requests beside them in the batch (each its own schema), against the plain streams alone
and beside as many plain requests: what constrained neighbours cost everyone else, and how
much of that is the grammars' own (the rest is the bigger batch).
"""
from __future__ import annotations

import argparse
import asyncio
import gc
import json
import statistics
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = ["The history of the printing press", "A recipe for bread:", "Dear diary, today",
           "The rules of chess are", "In the beginning of the universe", "My favourite song",
           "How to learn a language:", "The weather in London is"]


def baseline_round(model, tok, batch: int, new_tokens: int) -> float:
    import torch
    enc = tok([PROMPTS[i % len(PROMPTS)] for i in range(batch)], return_tensors="pt",
              padding=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id)
    elapsed = time.perf_counter() - t0
    assert out.shape[1] - enc.input_ids.shape[1] == new_tokens
    return batch * new_tokens / elapsed


def make_adapters(model_dir: Path, out: Path, count: int, rank: int) -> list[str]:
    import torch
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
    names = []
    for i in range(count):
        cfg = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                         target_modules=["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj",
                                         "up_proj", "down_proj"])
        model = get_peft_model(base, cfg)
        names.append(f"bench-r{rank}-{i}")
        model.save_pretrained(out / names[-1])
        base = model.unload()
    return names


def peft_model(model_dir: Path, adapter_root: Path, names: list[str], dtype):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM
    base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
    model = PeftModel.from_pretrained(base, adapter_root / names[0], adapter_name=names[0])
    for name in names[1:]:
        model.load_adapter(adapter_root / name, adapter_name=name)
    return model


def peft_round(model, tok, names: list[str], new_tokens: int) -> float:
    import torch
    batch = len(names)
    enc = tok([PROMPTS[i % len(PROMPTS)] for i in range(batch)], return_tensors="pt",
              padding=True)
    t0 = time.perf_counter()
    with torch.inference_mode():
        out = model.generate(**enc, max_new_tokens=new_tokens, min_new_tokens=new_tokens,
                             do_sample=False, pad_token_id=tok.pad_token_id,
                             adapter_names=names)
    elapsed = time.perf_counter() - t0
    assert out.shape[1] - enc.input_ids.shape[1] == new_tokens
    return batch * new_tokens / elapsed


def neighbour_schema(i: int) -> dict:
    """A schema per constrained neighbour, long enough to keep it in the batch."""
    return {"type": "object", "properties": {
        f"items_{i}": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                 "maximum": 10 ** (i % 4 + 2)}},
        "note": {"type": "string"}}, "required": [f"items_{i}", "note"]}


async def loraxd_round(url: str, batch: int, new_tokens: int,
                       adapters: list[str] | None = None, neighbours: int = 0,
                       constrained: bool = True) -> float:
    """Tokens per second of the `batch` plain streams; `neighbours` requests run beside
    them (not counted): json_schema ones, or plain ones of the same length (the control:
    what a bigger batch costs without any grammar)."""
    import aiohttp
    async with aiohttp.ClientSession() as session:
        async def one(i: int, schema: dict | None = None) -> int:
            params = {"max_new_tokens": new_tokens, "ignore_eos_token": True,
                      "adapter_id": adapters[i] if adapters else None}
            if schema is not None:
                params.update(ignore_eos_token=False, response_format={
                    "type": "json_schema", "schema": schema})
            n = 0
            async with session.post(url + "/generate_stream", json={
                    "inputs": PROMPTS[i % len(PROMPTS)], "parameters": params}) as resp:
                async for line in resp.content:
                    if line.startswith(b"data:"):
                        n += 1
            return n
        others = [asyncio.ensure_future(one(i, neighbour_schema(i) if constrained else None))
                  for i in range(neighbours)]
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(batch)))
        elapsed = time.perf_counter() - t0
        await asyncio.gather(*others)
    assert counts == [new_tokens] * batch, counts
    return batch * new_tokens / elapsed


async def idle_latency(url: str, n: int) -> float:
    import aiohttp
    times = []
    async with aiohttp.ClientSession() as session:
        for _ in range(n):
            t0 = time.perf_counter()
            async with session.post(url + "/generate", json={
                    "inputs": "Hello", "parameters": {"max_new_tokens": 1}}) as resp:
                await resp.read()
            times.append(time.perf_counter() - t0)
    return statistics.median(times)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="default: the embedded default model")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--adapters", action="store_true", help="the multi-LoRA workload")
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--constrained", action="store_true",
                   help="also run the plain streams beside as many json_schema requests")
    p.add_argument("--skip-baseline", action="store_true")
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args()

    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from loraxd.config import load
    from loraxd.daemon.model_files import EMBEDDED_MODEL_ID, resolve_model
    from tests.integration.daemon import Daemon

    config, _ = load([], {}, default_config_path="/nonexistent")
    model_dir = Path(args.model_dir) if args.model_dir else resolve_model(
        EMBEDDED_MODEL_ID, revision=None, cache_dir=config.paths.cache_dir, hub_cache=None)
    tok = AutoTokenizer.from_pretrained(model_dir, padding_side="left")
    if tok.pad_token is None:
        tok.pad_token = tok.eos_token
    dtype = getattr(torch, args.dtype)

    with tempfile.TemporaryDirectory() as tmp:
        tmp = Path(tmp)
        names = None
        if args.adapters:
            names = make_adapters(model_dir, tmp / "adapters", args.batch, args.rank)
        model = None
        if not args.skip_baseline:
            if names:
                model = peft_model(model_dir, tmp / "adapters", names, dtype)
                baseline = lambda n: peft_round(model, tok, names, n)  # noqa: E731
            else:
                model = AutoModelForCausalLM.from_pretrained(model_dir, dtype=dtype)
                baseline = lambda n: baseline_round(model, tok, args.batch, n)  # noqa: E731
            baseline(4)  # warm-up
        extra = ["--local-adapter-dir", str(tmp / "adapters"), "--adapter-source", "local",
                 "--max-active-adapters", str(args.batch)] if names else []
        daemon = Daemon(model_dir, tmp, "--dtype", args.dtype, *extra).wait_ready()
        results = {"baseline_tok_s": [], "loraxd_tok_s": []}
        if names:
            results["loraxd_base_only_tok_s"] = []
        if args.constrained:
            results["loraxd_beside_constrained_tok_s"] = []
            results["loraxd_beside_plain_tok_s"] = []
        try:
            asyncio.run(loraxd_round(daemon.url, args.batch, 4, names))  # warm-up, loads
            for _ in range(args.rounds):
                if model is not None:
                    results["baseline_tok_s"].append(baseline(args.new_tokens))
                gc.collect()
                results["loraxd_tok_s"].append(asyncio.run(
                    loraxd_round(daemon.url, args.batch, args.new_tokens, names)))
                if names:
                    results["loraxd_base_only_tok_s"].append(asyncio.run(
                        loraxd_round(daemon.url, args.batch, args.new_tokens)))
                if args.constrained:
                    results["loraxd_beside_constrained_tok_s"].append(asyncio.run(
                        loraxd_round(daemon.url, args.batch, args.new_tokens, names,
                                     neighbours=args.batch)))
                    results["loraxd_beside_plain_tok_s"].append(asyncio.run(
                        loraxd_round(daemon.url, args.batch, args.new_tokens, names,
                                     neighbours=args.batch, constrained=False)))
            results["idle_1_token_ms"] = 1000 * asyncio.run(idle_latency(daemon.url, 20))
        finally:
            daemon.stop()
    report(results, args)


def report(results: dict, args) -> None:
    base = statistics.median(results["baseline_tok_s"]) if results["baseline_tok_s"] else None
    ours = statistics.median(results["loraxd_tok_s"])
    base_only = (statistics.median(results["loraxd_base_only_tok_s"])
                 if results.get("loraxd_base_only_tok_s") else None)
    beside = (statistics.median(results["loraxd_beside_constrained_tok_s"])
              if results.get("loraxd_beside_constrained_tok_s") else None)
    control = (statistics.median(results["loraxd_beside_plain_tok_s"])
               if results.get("loraxd_beside_plain_tok_s") else None)
    workload = f"{args.batch} streams x {args.new_tokens} tokens, {args.dtype}"
    if args.adapters:
        workload += f", {args.batch} distinct rank-{args.rank} all-linear adapters"
    baseline_name = ("transformers + PEFT generate(adapter_names)" if args.adapters
                     else "transformers generate")
    summary = {"workload": workload,
               "loraxd_tok_s_median": round(ours, 1),
               "loraxd_base_only_tok_s_median": round(base_only, 1) if base_only else None,
               "mixed_over_base_only": round(ours / base_only, 2) if base_only else None,
               "beside_constrained_tok_s_median": round(beside, 1) if beside else None,
               "constrained_neighbours_loss": round(1 - beside / ours, 3) if beside else None,
               "beside_plain_tok_s_median": round(control, 1) if control else None,
               "grammar_loss": round(1 - beside / control, 3) if control else None,
               "baseline_tok_s_median": round(base, 1) if base else None,
               "ratio": round(ours / base, 2) if base else None,
               "idle_1_token_ms_median": round(results["idle_1_token_ms"], 1),
               "rounds": {k: [round(x, 1) for x in v] for k, v in results.items()
                          if isinstance(v, list)}}
    if args.json:
        print(json.dumps(summary, indent=2))
        return
    print(f"workload: {summary['workload']}")
    if base:
        print(f"{baseline_name} (batch {args.batch}): {base:8.1f} tok/s (median)")
    print(f"loraxd ({args.batch} concurrent streams): {ours:8.1f} tok/s (median)")
    if base_only:
        print(f"loraxd, same streams on the base model: {base_only:8.1f} tok/s (median)")
        print(f"mixed adapters / base only: {ours / base_only:8.2f}")
    if beside:
        print(f"same streams beside {args.batch} json_schema requests: {beside:8.1f} tok/s "
              f"(median; loss {100 * (1 - beside / ours):.1f}%)")
    if control:
        print(f"same streams beside {args.batch} plain requests:       {control:8.1f} tok/s "
              f"(median); the grammars' own cost: {100 * (1 - beside / control):.1f}%")
    if base:
        print(f"ratio loraxd / baseline: {ours / base:8.2f}x")
    print(f"idle daemon, 1-token request:       {summary['idle_1_token_ms_median']:8.1f} ms "
          "(median of 20)")


if __name__ == "__main__":
    main()
