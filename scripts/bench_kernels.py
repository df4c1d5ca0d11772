"""µs per linear call of each candidate kernel, on SmolLM2-135M's shapes (informal: for
picking kernels). Calls are timed one by one, candidates interleaved, and the 20th
percentile is shown: on a shared machine a call that lost its core is an outlier, not data.

Candidates: fp32 and bf16 oneDNN-prepacked (`DenseKernel`), int8 weight-only through
`aten._weight_int8pack_mm` (bf16 inputs), and int8 converted to bf16 then one matmul
(the scales applied to the output) or dequantized to fp32 then one fp32 matmul (what
`Int8WeightOnlyKernel` does beyond 32 rows). The last lines sum one decode step's linears:
30 layers of qkv, o, gate_up, down, plus the LM head.
"""
from __future__ import annotations

import argparse
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent))

# (name, out_features, in_features) of SmolLM2-135M's fused linears
SHAPES = (("qkv", 960, 576), ("o", 576, 576), ("gate_up", 3072, 576), ("down", 576, 1536),
          ("lm_head", 49152, 576))
LAYERS = 30


def candidates(weight):
    import torch
    import torch.nn.functional as F

    from loraxd.worker.layers.linear import DenseKernel
    from loraxd.worker.layers.quantized import quantize_per_channel
    fp32, bf16 = DenseKernel(weight), DenseKernel(weight.bfloat16())
    q, scales = quantize_per_channel(weight)
    return {
        "fp32 packed": (fp32, torch.float32),
        "bf16 packed": (bf16, torch.bfloat16),
        "int8pack_mm": (lambda x: torch.ops.aten._weight_int8pack_mm(x, q, scales),
                        torch.bfloat16),
        "int8->bf16+mm": (lambda x: F.linear(x, q.to(torch.bfloat16)).mul_(scales),
                          torch.bfloat16),
        "int8->fp32+mm": (lambda x: F.linear(x.float(), q.float().mul_(scales.float()[:, None])
                                             ).bfloat16(), torch.bfloat16),
    }


def call_us(fn, x, calls: int) -> list[float]:
    fn(x)
    out = []
    for _ in range(calls):
        t0 = time.perf_counter()
        fn(x)
        out.append((time.perf_counter() - t0) * 1e6)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("--rows", type=int, nargs="+", default=[1, 8, 32])
    p.add_argument("--rounds", type=int, default=10)
    p.add_argument("--threads", type=int, default=0, help="0: torch's default")
    args = p.parse_args()
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    step: dict[tuple[str, int], float] = {}
    with torch.inference_mode():
        for name, out_f, in_f in SHAPES:
            kernels = candidates(torch.randn(out_f, in_f) * 0.05)
            for rows in args.rows:
                x = torch.randn(rows, in_f)
                calls = 2 if name == "lm_head" else 10
                times = {k: [] for k in kernels}
                for _ in range(args.rounds):  # interleaved: each sees the same noise
                    for k, (fn, dtype) in kernels.items():
                        times[k] += call_us(fn, x.to(dtype), calls)
                cells = []
                for k, ts in times.items():
                    us = sorted(ts)[len(ts) // 5]
                    weight = 1 if name == "lm_head" else LAYERS
                    step[k, rows] = step.get((k, rows), 0.0) + weight * us
                    cells.append(f"{k} {us:9.1f}")
                print(f"{name:8s} {in_f:5d}->{out_f:<6d} M={rows:<3d} " + " | ".join(cells),
                      flush=True)
    for rows in args.rows:
        cells = [f"{k} {step[k, rows] / 1000:6.2f}" for k in kernels]
        print(f"one step's linears, ms, M={rows:<3d} " + " | ".join(cells))


if __name__ == "__main__":
    main()
