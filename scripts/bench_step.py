"""ms per worker step (ModelRunner.execute, no IPC): decode of N sequences at a given context,
on the base model and with N distinct rank-R all-linear adapters. For profiling the worker:
`py-spy record -o out.svg -- .venv/bin/python scripts/bench_step.py --adapters`.
"""
from __future__ import annotations

import argparse
import random
import statistics
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--model-dir")
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--context", type=int, default=100)
    p.add_argument("--steps", type=int, default=30)
    p.add_argument("--dtype", default="float32")
    p.add_argument("--quantize", default=None, help="e.g. int8-weight-only")
    p.add_argument("--adapters", action="store_true")
    p.add_argument("--rank", type=int, default=16)
    args = p.parse_args()

    from loraxd.config import load
    from loraxd.daemon.model_files import EMBEDDED_MODEL_ID, resolve_model
    from loraxd.protocol.worker import NewSeq, SamplingParams, Step
    from loraxd.worker.runner import ModelRunner

    config, _ = load([], {}, default_config_path="/nonexistent")
    model_dir = Path(args.model_dir) if args.model_dir else resolve_model(
        EMBEDDED_MODEL_ID, revision=None, cache_dir=config.paths.cache_dir, hub_cache=None)
    runner = ModelRunner(str(model_dir), dtype=args.dtype, quantize=args.quantize,
                         max_batch_total_tokens=16384)
    slots = [-1] * args.batch
    if args.adapters:
        runner.enable_lora(args.batch)
        from scripts.benchkit import artifacts
        root = artifacts.make_adapters(model_dir, artifacts.default_cache_dir(), args.batch,
                                       args.rank)
        for slot, name in enumerate(artifacts.adapter_names(args.batch, args.rank)):
            runner.load_adapter(slot, str(root / name))
        slots = list(range(args.batch))

    rng = random.Random(0)
    bs, free = runner.block_size, list(range(runner.num_blocks))
    seqs, lens = [], {}
    for i in range(args.batch):
        n_blocks = -(-(args.context + args.steps + 1) // bs)
        blocks = [free.pop() for _ in range(n_blocks)]
        prompt = [rng.randrange(1000, 40000) for _ in range(args.context)]
        seqs.append(NewSeq(i, prompt, blocks, SamplingParams(), slots[i]))
        lens[i] = args.context
    t0 = time.perf_counter()
    runner.execute(Step(0, new_seqs=seqs))
    prefill_ms = 1000 * (time.perf_counter() - t0)
    times = []
    for step in range(1, args.steps + 1):
        t0 = time.perf_counter()
        runner.execute(Step(step, decode_ids=list(range(args.batch))))
        times.append(1000 * (time.perf_counter() - t0))
    kind = f"{args.batch} distinct rank-{args.rank} adapters" if args.adapters else "base model"
    precision = args.dtype + (f" + {args.quantize}" if args.quantize else "")
    print(f"{kind}, {precision}: prefill {args.batch}x{args.context} {prefill_ms:.0f} ms; "
          f"decode {args.batch} seqs: median {statistics.median(times):.1f} ms/step "
          f"(min {min(times):.1f})")


if __name__ == "__main__":
    main()
