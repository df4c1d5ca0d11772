"""What lower precision costs in output: greedy tokens of fixed prompts in each precision mode
against float32's. Per mode, the mean number of leading tokens identical to float32's and
the share of prompts whose tokens are all identical.

The worker's ModelRunner runs every mode (no daemon), the prompts in decode batches of
`--batch` (the kernels a server batch would use), each on its own pages.
"""
from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

PROMPTS = [
    "The capital of France is", "Water boils at a temperature of",
    "The three primary colours are", "Once upon a time, in a small village,",
    "To make a cup of tea, first", "The largest planet in the solar system is",
    "def fibonacci(n):", "The French Revolution began in", "Photosynthesis is the process",
    "My favourite book is", "The best way to learn a new language is",
    "In machine learning, overfitting means", "The recipe calls for two eggs and",
    "Dear hiring manager, I am writing to", "The stock market fell today because",
    "A haiku about autumn:", "SELECT name FROM users WHERE",
    "The theory of relativity states that", "Here are three tips for better sleep:",
    "The moon orbits the Earth every",
]
# name: (dtype, quantize)
MODES = {"float32": ("float32", None), "bfloat16": ("bfloat16", None),
         "int8-weight-only": ("float32", "int8-weight-only"),
         "int8-weight-only + bfloat16": ("bfloat16", "int8-weight-only")}


def greedy(runner, prompts: list[list[int]], new_tokens: int, batch: int) -> list[list[int]]:
    """`new_tokens` greedy tokens of each prompt (EOS not stopping), `batch` at a time."""
    from loraxd.protocol.worker import NewSeq, SamplingParams, Step
    out: list[list[int]] = []
    step_id = 0
    for start in range(0, len(prompts), batch):
        chunk, next_block, seqs = prompts[start:start + batch], 0, []
        for i, prompt in enumerate(chunk):
            n = -(-(len(prompt) + new_tokens) // runner.block_size)
            seqs.append(NewSeq(i, prompt, list(range(next_block, next_block + n)),
                               SamplingParams()))
            next_block += n
        tokens: list[list[int]] = [[] for _ in chunk]
        results = runner.execute(Step(step_id, new_seqs=seqs))
        while True:
            for r in results:
                tokens[r.req_id].append(r.token_id)
            step_id += 1
            if len(tokens[0]) == new_tokens:
                break
            results = runner.execute(Step(step_id, decode_ids=list(range(len(chunk)))))
        runner.forget(range(len(chunk)))
        out += tokens
    return out


def leading_same(a: list[int], b: list[int]) -> int:
    return next((i for i, (x, y) in enumerate(zip(a, b)) if x != y), min(len(a), len(b)))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir", help="default: the embedded default model")
    p.add_argument("--new-tokens", type=int, default=32)
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--modes", nargs="+", default=list(MODES), choices=list(MODES))
    p.add_argument("--json", action="store_true", help="print the result as JSON")
    args = p.parse_args()

    from transformers import AutoTokenizer

    from loraxd.config import load
    from loraxd.daemon.model_files import EMBEDDED_MODEL_ID, resolve_model
    from loraxd.worker.runner import ModelRunner
    config, _ = load([], {}, default_config_path="/nonexistent")
    model_dir = Path(args.model_dir) if args.model_dir else resolve_model(
        EMBEDDED_MODEL_ID, revision=None, cache_dir=config.paths.cache_dir, hub_cache=None)
    tok = AutoTokenizer.from_pretrained(model_dir)
    prompts = [tok(text)["input_ids"] for text in PROMPTS]
    outputs = {}
    for mode in ["float32", *[m for m in args.modes if m != "float32"]]:
        dtype, quantize = MODES[mode]
        runner = ModelRunner(str(model_dir), dtype=dtype, quantize=quantize,
                             max_batch_total_tokens=args.batch * (args.new_tokens + 64))
        outputs[mode] = greedy(runner, prompts, args.new_tokens, args.batch)
        del runner
    reference = outputs["float32"]
    report = {}
    for mode, tokens in outputs.items():
        same = [leading_same(t, r) for t, r in zip(tokens, reference)]
        report[mode] = {"mean_leading_tokens_same": sum(same) / len(same),
                        "share_fully_same": sum(s == args.new_tokens for s in same) / len(same)}
    if args.json:
        print(json.dumps(report, indent=2))
        return
    print(f"{len(PROMPTS)} prompts x {args.new_tokens} greedy tokens, batches of {args.batch}, "
          f"against float32 ({model_dir.name})")
    for mode, r in report.items():
        print(f"{mode:28s} leading tokens same {r['mean_leading_tokens_same']:5.1f} of "
              f"{args.new_tokens}; prompts fully same {100 * r['share_fully_same']:3.0f}%")


if __name__ == "__main__":
    main()
