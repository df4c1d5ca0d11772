"""µs per linear call of each candidate kernel, on SmolLM2-135M's shapes (informal: for
picking kernels). Calls are timed one by one, candidates interleaved, and the 20th
percentile is shown: on a shared machine a call that lost its core is an outlier, not data.

Candidates: what the layers run here (`DenseKernel` in fp32 and bf16, `Int8WeightOnlyKernel`:
loraxd's panel and AMX kernels where built), bf16 on oneDNN and int8 on the panels for
comparison, int8 weight-only through `aten._weight_int8pack_mm` (bf16 inputs), and int8
converted to bf16 then one matmul (the scales applied to the output) or dequantized to fp32
then one fp32 matmul (torch's path beyond 32 rows). The last lines sum one decode step's
linears: 30 layers of qkv, o, gate_up, down, plus the LM head.

`--cold` instead sweeps a whole step's 121 linears, each its own weight (so the weights
come from memory, as in a step), the candidates interleaved, the best of `--rounds` per
row count: the figure to hold against the machine's read bandwidth.

`--lora` sweeps a whole step's batched-LoRA calls (`loraxd_cpu::lora_bgmv`, 30 layers x
qkv, o, gate_up, down), one token per adapter of `--adapters` rank-`--rank` all-linear
adapters, each layer's A and B their own (from memory, as in a step): ms and GB/s of the
adapters' bytes, and the same calls with empty plans (what dispatch and checks cost).
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

    from loraxd.worker import cpu_kernels
    from loraxd.worker.layers.linear import DenseKernel
    from loraxd.worker.layers.quantized import Int8WeightOnlyKernel, quantize_per_channel
    q, scales = quantize_per_channel(weight)
    amx, cpu_kernels.AMX_ENABLED = cpu_kernels.AMX_ENABLED, False
    try:
        int8_panels = Int8WeightOnlyKernel(weight)
    finally:
        cpu_kernels.AMX_ENABLED = amx
    return {
        "fp32": (DenseKernel(weight), torch.float32),
        "bf16": (DenseKernel(weight.bfloat16()), torch.bfloat16),
        "bf16 oneDNN": (DenseKernel(weight.bfloat16(), allow_panel=False), torch.bfloat16),
        "int8": (Int8WeightOnlyKernel(weight), torch.float32),
        "int8 panels": (int8_panels, torch.float32),
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
    p.add_argument("--cold", action="store_true", help="sweep a whole step's linears")
    p.add_argument("--lora", action="store_true", help="sweep a whole step's LoRA calls")
    p.add_argument("--adapters", type=int, help="--lora: adapters in the pool (8)")
    p.add_argument("--rank", type=int, help="--lora: their rank (16)")
    p.add_argument("--dtype", choices=("float32", "bfloat16"), help="--lora: float32")
    args = p.parse_args()
    if args.cold and args.lora:
        p.error("--cold and --lora are two sweeps: one at a time")
    if not args.lora and (args.adapters, args.rank, args.dtype) != (None, None, None):
        p.error("--adapters, --rank and --dtype are --lora's")
    import torch
    if args.threads:
        torch.set_num_threads(args.threads)
    torch.manual_seed(0)
    if args.cold:
        return cold_steps(args.rows, args.rounds)
    if args.lora:
        return lora_steps(args.rows, args.rounds, args.adapters or 8, args.rank or 16,
                          getattr(torch, args.dtype or "float32"))
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


def cold_steps(rows_list: list[int], rounds: int) -> None:
    import torch
    shapes = [s for s in SHAPES if s[0] != "lm_head"] * LAYERS + [SHAPES[-1]]
    per_layer = [candidates(torch.randn(out_f, in_f) * 0.05) for _, out_f, in_f in shapes]
    names = [k for k, (kernel, _) in per_layer[0].items() if hasattr(kernel, "num_bytes")]
    gb = {k: sum(c[k][0].num_bytes for c in per_layer) / 1e9 for k in names}
    with torch.inference_mode():
        for rows in rows_list:
            xs = {in_f: torch.randn(rows, in_f) for _, _, in_f in shapes}
            best = dict.fromkeys(names, float("inf"))
            for _ in range(rounds):
                for k in names:
                    inputs = {n: x.to(per_layer[0][k][1]) for n, x in xs.items()}
                    t0 = time.perf_counter()
                    for c, (_, _, in_f) in zip(per_layer, shapes):
                        c[k][0](inputs[in_f])
                    best[k] = min(best[k], time.perf_counter() - t0)
            cells = [f"{k} {best[k] * 1e3:6.1f} ({gb[k] / best[k]:.1f} GB/s)" for k in names]
            print(f"one step's linears, cold, ms, M={rows:<3d} " + " | ".join(cells), flush=True)


# the LoRA groups of a layer: (in_features, the modules' out_features), as the pool holds them
LORA_GROUPS = ((576, (576, 192, 192)), (576, (576,)), (576, (1536, 1536)), (1536, (576,)))


def lora_steps(rows_list: list[int], rounds: int, adapters: int, rank: int, dtype) -> None:
    """One step's lora_bgmv calls in the pool's layout (lora/slots.py): per group, A_cat^T
    of every slot [slots, in * rank * modules] and each module's B^T [slots * rank, out]."""
    import torch
    from loraxd.worker import cpu_kernels
    reason = cpu_kernels.enable()
    if reason:
        raise SystemExit(f"--lora needs the CPU kernels: {reason}")
    op = torch.ops.loraxd_cpu.lora_bgmv
    calls = []
    for _ in range(LAYERS):
        for in_f, outs in LORA_GROUPS:
            a = (torch.randn(adapters, in_f * rank * len(outs)) * 0.05).to(dtype)
            b = [(torch.randn(adapters * rank, o) * 0.05).to(dtype) for o in outs]
            calls.append((in_f, sum(outs), a, b, [sum(outs[:j]) for j in range(len(outs))]))
    flush = torch.empty(64 << 20, dtype=torch.uint8)  # larger than the last-level cache
    with torch.inference_mode():
        for rows in rows_list:
            steps = {}
            for name, n in (("step", rows), ("empty plans", 0)):
                args = []
                for in_f, out_f, a, b, starts in calls:
                    plan = torch.tensor([[t, t % adapters] + [rank] * len(b) for t in range(n)],
                                        dtype=torch.long).reshape(n, 2 + len(b))
                    args.append((torch.randn(rows, in_f).to(dtype),
                                 torch.zeros(rows, out_f, dtype=dtype), a, b, plan, starts))
                steps[name] = args
            used = min(rows, adapters) / adapters
            gb = used * sum((a.numel() + sum(x.numel() for x in b)) * a.element_size()
                            for _, _, a, b, _ in calls) / 1e9
            best = dict.fromkeys(steps, float("inf"))
            for _ in range(rounds):
                for name, args in steps.items():
                    flush.add_(1)
                    t0 = time.perf_counter()
                    for call in args:
                        op(*call)
                    best[name] = min(best[name], time.perf_counter() - t0)
            print(f"one step's LoRA, cold, {dtype}, M={rows:<3d} on {min(rows, adapters)} "
                  f"adapters: {best['step'] * 1e3:6.2f} ms ({gb / best['step']:.1f} GB/s of "
                  f"{gb * 1e3:.0f} MB); the {len(calls)} calls' dispatch "
                  f"{best['empty plans'] * 1e3:.2f} ms", flush=True)


if __name__ == "__main__":
    main()
