"""loraxd beside its peers on the same workloads, one system at a time, in one run.

Workloads: N concurrent streams of `--new-tokens` greedy tokens each, EOS ignored, streamed
over the OpenAI /v1/completions API, on the base model or spread round-robin over
`--num-adapters` random rank-`--rank` PEFT adapters on every linear (made once, cached).
Systems: loraxd (this tree), llama.cpp's server (`--llama-server`, converting the model and
adapters to GGUF once with `--gguf-convert`), vLLM's CPU build (`--vllm VENV`) and
transformers + PEFT batched `generate` in this process; a peer that is not here is skipped
with the reason. Each runs with `--threads` threads, alone. For every system and load: tok/s
(median round), TTFT and inter-token latency p50/p99 (over all streams of all rounds), its
share of the memory roofline measured at the start of the run, and loraxd's ratios to each
peer. `--json FILE` writes it all as JSON too.

`--constrained`: instead, what `json_schema` neighbours cost loraxd's plain streams.
`--kv`: instead, loraxd's prefix cache (a shared system prompt's time to first token) and
prompt slices (running streams' inter-token latency while a long prompt arrives), each
against the same daemon without them.
"""
from __future__ import annotations

import argparse
import json
import sys
import tempfile
import traceback
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

from scripts.benchkit import artifacts, loads as workloads, report, roofline  # noqa: E402
from scripts.benchkit.context import BenchContext  # noqa: E402
from scripts.benchkit.systems import Absent  # noqa: E402

SYSTEMS = ["loraxd", "llama.cpp", "vllm", "transformers"]


def system_module(name: str):
    from scripts.benchkit.systems import llama_cpp, loraxd_daemon, transformers_peft, vllm_cpu
    return {"loraxd": loraxd_daemon, "llama.cpp": llama_cpp, "vllm": vllm_cpu,
            "transformers": transformers_peft}[name]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model-dir", help="default: the embedded default model")
    p.add_argument("--loads", default=workloads.DEFAULT_LOADS,
                   help="STREAMS:base or STREAMS:lora, comma-separated (default: %(default)s)")
    p.add_argument("--quick", action="store_true",
                   help=f"one load ({workloads.QUICK_LOADS}), one round")
    p.add_argument("--systems", default=",".join(SYSTEMS),
                   help="which to run, comma-separated (default: %(default)s)")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2, help="threads of every system")
    p.add_argument("--num-adapters", type=int, default=8)
    p.add_argument("--rank", type=int, default=16)
    p.add_argument("--dtype", default="float32", choices=sorted(roofline.ITEMSIZE))
    p.add_argument("--precisions", default="", help="loraxd again with these weights, as "
                   "more systems of the run, comma-separated: bfloat16, int8-weight-only, "
                   "int8-weight-only+bfloat16")
    p.add_argument("--llama-server", help="the llama-server binary (default: $LLAMA_SERVER, "
                   "else on PATH)")
    p.add_argument("--gguf-convert", metavar="DIR", help="the llama.cpp tree with "
                   "convert_hf_to_gguf.py and gguf-py (default: the tree llama-server was "
                   "built in)")
    p.add_argument("--gguf-python", help="the Python that runs the converters (default: "
                   "$GGUF_PYTHON, else this one)")
    p.add_argument("--vllm", metavar="VENV", help="a virtual environment with vllm-cpu "
                   "(default: $VLLM_VENV)")
    p.add_argument("--cache-dir", type=Path, default=artifacts.default_cache_dir(),
                   help="adapters and GGUF conversions kept between runs (default: %(default)s)")
    p.add_argument("--bandwidth-repeats", type=int, default=10)
    p.add_argument("--json", metavar="FILE", type=Path, help="also write the results as JSON")
    p.add_argument("--constrained", action="store_true",
                   help="only the json_schema-neighbours experiment on loraxd")
    p.add_argument("--constrained-streams", type=int, default=8)
    p.add_argument("--kv", action="store_true",
                   help="only the prefix-cache and prompt-slice experiments on loraxd")
    p.add_argument("--chunk-sizes", default="32,8,0",
                   help="--kv: prefill_chunk_tokens values to compare: the daemon's default, "
                        "a finer one, slicing off (default: %(default)s)")
    args = p.parse_args(argv)
    if args.quick:
        args.loads, args.rounds = workloads.QUICK_LOADS, 1
    args.systems = [s.strip() for s in args.systems.split(",")]
    try:
        from scripts.benchkit.systems.loraxd_daemon import Precision
        args.precision_systems = [Precision(s.strip()) for s in args.precisions.split(",")
                                  if s.strip()]
    except ValueError as exc:
        p.error(str(exc))
    unknown = set(args.systems) - set(SYSTEMS)
    if unknown:
        p.error(f"unknown systems {sorted(unknown)}; known: {SYSTEMS}")
    try:
        args.load_list = workloads.parse_loads(args.loads, args.num_adapters)
    except ValueError as exc:
        p.error(str(exc))
    return args


def default_model_dir() -> Path:
    from loraxd.config import load
    from loraxd.daemon.model_files import EMBEDDED_MODEL_ID, resolve_model
    config, _ = load([], {}, default_config_path="/nonexistent")
    return resolve_model(EMBEDDED_MODEL_ID, revision=None, cache_dir=config.paths.cache_dir,
                         hub_cache=None)


def machine_peaks(ctx: BenchContext, repeats: int) -> tuple[float, float]:
    """(read bandwidth B/s, matmul FLOP/s) now."""
    return roofline.read_bandwidth(ctx.threads, repeats), roofline.matmul_flops(ctx.threads,
                                                                                ctx.dtype)


def measure_roofline(ctx: BenchContext, loads: list, repeats: int,
                     samples: list[tuple[float, float]], precisions: list = ()) -> dict:
    """The roofline from the best of the machine's `samples` (taken at the start and the end
    of the run: a shared machine can be slow at either, and a low sample would make the
    roofline one that systems beat). Each of `precisions` (loraxd with other weights) gets
    its own memory roofline, of the bytes it reads."""
    bandwidth = max(b for b, _ in samples)
    flops = max(f for _, f in samples)
    weights = roofline.weight_bytes(ctx.model_dir, ctx.dtype)
    per_adapter = (roofline.adapter_bytes(ctx.adapter_dirs()[0], ctx.dtype)
                   if ctx.adapter_names else 0)
    return {"bandwidth_gb_s": bandwidth / 1e9, "bandwidth_repeats": repeats,
            "bandwidth_samples_gb_s": [b / 1e9 for b, _ in samples],
            "matmul_gflop_s": flops / 1e9,
            "weight_bytes": weights, "adapter_bytes": per_adapter,
            "kv_bytes_per_token": roofline.kv_bytes_per_token(
                artifacts.model_config(ctx.model_dir), ctx.dtype),
            "loads": {load.key: roofline.roofline(bandwidth, weights, load.streams,
                                                  load.adapters, per_adapter, flops,
                                                  roofline.ITEMSIZE[ctx.dtype])
                      for load in loads},
            "systems": {p.NAME: own_roofline(p, ctx, bandwidth, weights, per_adapter, loads)
                        for p in precisions}}


def own_roofline(precision, ctx: BenchContext, bandwidth: float, weights: int,
                 per_adapter: int, loads: list) -> dict:
    """A precision system's memory roofline: the run's bytes at its own bytes per weight."""
    run_size = roofline.ITEMSIZE[ctx.dtype]
    weight_size, adapter_size = precision.itemsizes(ctx.dtype)
    weights = weights * weight_size // run_size
    per_adapter = per_adapter * adapter_size // run_size
    return {"weight_bytes": weights, "adapter_bytes": per_adapter,
            "loads": {load.key: roofline.roofline(bandwidth, weights, load.streams,
                                                  load.adapters, per_adapter)
                      for load in loads}}


def server_groups(module, loads: list) -> list[tuple[int, list]]:
    """(streams to start the server for, the loads it runs): one group, or one per stream
    count for a server whose slots are fixed at start."""
    if not module.RESTART_PER_STREAMS:
        return [(max(load.streams for load in loads), loads)]
    counts = sorted({load.streams for load in loads})
    return [(n, [load for load in loads if load.streams == n]) for n in counts]


def run_system(module, ctx: BenchContext, loads: list, new_tokens: int, rounds: int,
               info: dict, probes: dict) -> dict:
    from scripts.benchkit.stats import summarize
    rows = {}
    for streams, group in server_groups(module, loads):
        with module.serve(ctx, streams) as system:
            info.update(system.info)
            if module.NAME not in probes:
                probe = getattr(system, "probe_texts", None)
                probes[module.NAME] = (probe(len(ctx.adapter_names)) if probe else
                                       workloads.probe_texts(system, len(ctx.adapter_names)))
            for load in group:
                run = getattr(system, "run_load", None)
                results = (run(load, new_tokens, rounds) if run else
                           workloads.run_load(system, load, new_tokens, rounds))
                rows[load.key] = summarize(results)
                print(f"[{module.NAME}] {load.name}: {rows[load.key]['tok_s']:.1f} tok/s",
                      file=sys.stderr, flush=True)
    return rows


def main(argv=None) -> None:
    args = parse_args(argv)
    model_dir = Path(args.model_dir) if args.model_dir else default_model_dir()
    needs_adapters = any(load.adapters for load in args.load_list)
    adapter_root = (artifacts.make_adapters(model_dir, args.cache_dir, args.num_adapters,
                                            args.rank) if needs_adapters else args.cache_dir)
    names = artifacts.adapter_names(args.num_adapters, args.rank) if needs_adapters else []
    work_dir = Path(tempfile.mkdtemp(prefix="loraxd-bench-"))
    ctx = BenchContext(model_dir, adapter_root, names, args.threads, args.dtype, work_dir,
                       args.cache_dir, peer_options={
                           "llama_server": args.llama_server, "gguf_convert": args.gguf_convert,
                           "gguf_python": args.gguf_python, "vllm": args.vllm,
                           "rank": args.rank, "context_per_stream": args.new_tokens + 128})
    if args.constrained:
        from scripts.benchkit import constrained
        from scripts.benchkit.systems import loraxd_daemon
        with loraxd_daemon.serve(ctx, args.constrained_streams) as system:
            result = constrained.run(system.url, args.constrained_streams, args.new_tokens,
                                     args.rounds)
        print(constrained.render(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return

    if args.kv:
        from scripts.benchkit import kv_scenarios
        chunks = tuple(int(c) for c in args.chunk_sizes.split(","))
        result = {"prefix": kv_scenarios.prefix(ctx, args.rounds + 2, args.new_tokens),
                  "slices": kv_scenarios.slices(ctx, chunks)}
        machine = report.machine_info(args.threads, "greedy, EOS ignored, " + args.dtype)
        result["machine"] = machine
        print(f"CPU: {machine['cpu']} ({machine['cpus']} cores, {args.threads} threads)")
        print(kv_scenarios.render(result))
        if args.json:
            args.json.write_text(json.dumps(result, indent=2))
        return

    workload = (f"{args.new_tokens} new tokens per stream, greedy, EOS ignored, {args.dtype}, "
                f"adapters rank {args.rank} on all linears")
    machine = report.machine_info(args.threads, workload)
    first = machine_peaks(ctx, args.bandwidth_repeats)
    results, skipped, probes = {}, {}, {}
    modules = [system_module(s) for s in SYSTEMS if s in args.systems]
    modules[1:1] = args.precision_systems  # right after loraxd itself
    for module in modules:
        name = module.NAME
        info = machine["systems"].setdefault(module.NAME, {})
        try:
            results[module.NAME] = run_system(module, ctx, args.load_list, args.new_tokens,
                                              args.rounds, info, probes)
        except Absent as exc:
            skipped[module.NAME] = str(exc)
            print(f"skipping {module.NAME}: {exc}", file=sys.stderr, flush=True)
        except Exception as exc:  # noqa: BLE001 - a failing peer must not lose the others
            if name == "loraxd":
                raise
            skipped[module.NAME] = f"failed: {exc}"
            traceback.print_exc()
    roof = measure_roofline(ctx, args.load_list, args.bandwidth_repeats,
                            [first, machine_peaks(ctx, args.bandwidth_repeats)],
                            [p for p in args.precision_systems if p.NAME in results])
    doc = report.build(machine, roof, results, skipped, args.load_list, probes)
    doc["logs"] = str(work_dir)
    print(report.render(doc))
    print(f"logs: {work_dir}")
    if args.json:
        args.json.write_text(json.dumps(doc, indent=2))


if __name__ == "__main__":
    main()
