"""Heterogeneous-LoRA step benchmark (SmolLM2-135M shapes, LoRA part only).

    .venv/bin/python tests/unit/test_lora_bench.py [--threads 2] [--steps 15] [--slots 8]

prints ms per step (median) for the chosen op and the alternatives it was picked against;
the test below only runs every way once on a small model so this file keeps working.
"""

from __future__ import annotations

import argparse
import statistics
import time

import torch

from loraxd.worker.lora import GROUP_MODULES, LoraAdapter, LoraSlotPool, TorchLoraOp

SMOLLM2_135M = dict(num_layers=30, hidden=576, intermediate=1536, heads=9, kv_heads=3, head_dim=64)


def module_shapes(num_layers, hidden, intermediate, heads, kv_heads, head_dim):
    q, kv = heads * head_dim, kv_heads * head_dim
    return {"q_proj": (hidden, q), "k_proj": (hidden, kv), "v_proj": (hidden, kv),
            "o_proj": (q, hidden), "gate_proj": (hidden, intermediate),
            "up_proj": (hidden, intermediate), "down_proj": (intermediate, hidden)}


def random_adapter(shapes, num_layers, rank, modules=None, seed=0) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    weights = {}
    for layer_idx in range(num_layers):
        for m in modules or shapes:
            r = rank[m] if isinstance(rank, dict) else rank
            i, o = shapes[m]
            weights[(layer_idx, m)] = (torch.randn(r, i, generator=gen) * 0.02,
                                       torch.randn(o, r, generator=gen) * 0.02)
    nbytes = sum(a.numel() * 4 + b.numel() * 4 for a, b in weights.values())
    return LoraAdapter(weights, {k: a.shape[0] for k, (a, _) in weights.items()}, nbytes)


class GatherBmm:
    """Alternative: every token gathers its adapter's A and B (`A[idx]`), two bmm's."""

    def __init__(self, adapters, slots, shapes, num_layers):
        self.shapes, self.idx = shapes, torch.tensor(slots)
        self.a = {(l, m): torch.stack([ad.weights[(l, m)][0] for ad in adapters])
                  for l in range(num_layers) for m in shapes}
        self.b = {(l, m): torch.stack([ad.weights[(l, m)][1] for ad in adapters])
                  for l in range(num_layers) for m in shapes}

    def apply(self, layer_idx, group, x, y):
        col = 0
        for m in GROUP_MODULES[group]:
            h = torch.bmm(self.a[(layer_idx, m)][self.idx], x.unsqueeze(2))  # [T, r, 1]
            d = torch.bmm(self.b[(layer_idx, m)][self.idx], h).squeeze(2)
            y[:, col:col + d.shape[1]] += d
            col += d.shape[1]


class StackedMask:
    """Alternative: all slots' A's stacked [slots * r, in]: one GEMM, a mask, a GEMM per module."""

    def __init__(self, adapters, slots, shapes, num_layers):
        self.shapes, n, r = shapes, len(adapters), adapters[0].max_rank
        self.a, self.b = {}, {}
        for l in range(num_layers):
            for g, ms in GROUP_MODULES.items():
                self.a[(l, g)] = torch.cat([torch.cat([ad.weights[(l, m)][0] for ad in adapters])
                                            for m in ms])  # module-major [k * n * r, in]
                self.b[(l, g)] = [torch.cat([ad.weights[(l, m)][1] for ad in adapters], 1)
                                  for m in ms]  # [out, n * r]
        one = torch.zeros(len(slots), n * r)
        for t, s in enumerate(slots):
            one[t, s * r:(s + 1) * r] = 1
        self.mask = {g: one.repeat(1, len(ms)) for g, ms in GROUP_MODULES.items()}
        self.width = n * r

    def apply(self, layer_idx, group, x, y):
        h = x @ self.a[(layer_idx, group)].T
        h.mul_(self.mask[group])
        col = 0
        for j, b in enumerate(self.b[(layer_idx, group)]):
            y[:, col:col + b.shape[0]].addmm_(h[:, j * self.width:(j + 1) * self.width], b.T)
            col += b.shape[0]


def time_steps(ctxs, shapes, num_layers, num_tokens, steps):
    """Median ms of one step (every group of every layer through ctx.apply) for each ctx,
    the ways taking turns step by step so that the machine's noise falls on all alike."""
    xs, ys = {}, {}
    for g, ms in GROUP_MODULES.items():
        xs[g] = torch.randn(num_tokens, shapes[ms[0]][0])
        ys[g] = torch.zeros(num_tokens, sum(shapes[m][1] for m in ms))
    times = {name: [] for name in ctxs}
    for _ in range(steps + 1):
        for name, ctx in ctxs.items():
            t0 = time.perf_counter()
            for layer_idx in range(num_layers):
                for g in GROUP_MODULES:
                    ctx.apply(layer_idx, g, xs[g], ys[g])
            times[name].append(time.perf_counter() - t0)
    return {name: statistics.median(ts[1:]) * 1e3 for name, ts in times.items()}


class BaseLinears:
    """The base linears of the same step (F.linear on fused qkv / gate_up), for scale."""

    def __init__(self, shapes, num_layers):
        self.w = [{g: torch.randn(sum(shapes[m][1] for m in ms), shapes[ms[0]][0]) * 0.02
                   for g, ms in GROUP_MODULES.items()} for _ in range(num_layers)]

    def apply(self, layer_idx, group, x, y):
        torch.nn.functional.linear(x, self.w[layer_idx][group])


def run_cases(model, num_slots, steps, rank=16, report=print):
    shapes, num_layers = module_shapes(**model), model["num_layers"]
    adapters = [random_adapter(shapes, num_layers, rank, seed=s) for s in range(8)]
    pools = {name: LoraSlotPool(num_slots, shapes, num_layers, op=op) for name, op in [
        ("chosen: TorchLoraOp() (bags if >= 3 adapters of < 8 tokens)", TorchLoraOp()),
        ("embedding-bag for every adapter", TorchLoraOp(1 << 30, min_bag_adapters=1)),
        ("loop over distinct adapters (GEMM pair per module)", TorchLoraOp(gemm_min_tokens=1)),
    ]}
    spread = [s * (num_slots // 8) for s in range(8)]  # the 8 adapters' slots in the pool
    for pool in pools.values():
        for slot, ad in zip(spread, adapters):
            pool.load(slot, ad)
    cases = {"8 decode tokens, 8 different adapters": list(range(8)),
             "8 decode tokens, one adapter": [3] * 8,
             "prefill 8 x 30 tokens, 8 adapters": [s for s in range(8) for _ in range(30)]}
    for case, which in cases.items():
        token_slots = torch.tensor([spread[w] for w in which])
        ctxs = {"base linears alone (F.linear), for scale": BaseLinears(shapes, num_layers)}
        notes = {}
        for name, pool in pools.items():
            pool.step_context(token_slots)  # warm-up; the second call below is not cached
            pool.op._cache = None
            t0 = time.perf_counter()
            ctxs[name] = pool.step_context(token_slots)
            notes[name] = f"  (step_context {(time.perf_counter() - t0) * 1e3:.2f} ms)"
        if num_slots == 8 and len(which) <= 8:
            used = [adapters[w] for w in range(8)]
            ctxs["stacked all slots + mask"] = StackedMask(used, which, shapes, num_layers)
            ctxs["gather each token's A, B + bmm"] = GatherBmm(used, which, shapes, num_layers)
        report(f"-- {case} (pool of {num_slots} slots, {torch.get_num_threads()} threads)")
        for name, ms in time_steps(ctxs, shapes, num_layers, len(which), steps).items():
            report(f"{name:64s} {ms:7.1f} ms{notes.get(name, '')}")


def test_bench_runs_on_a_tiny_model():
    tiny = dict(num_layers=2, hidden=64, intermediate=128, heads=4, kv_heads=2, head_dim=16)
    lines = []
    run_cases(tiny, num_slots=8, steps=1, rank=4, report=lines.append)
    assert any("8 different adapters" in line for line in lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--slots", type=int, default=8)
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    run_cases(SMOLLM2_135M, args.slots, args.steps)


if __name__ == "__main__":
    main()
