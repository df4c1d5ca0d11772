"""Heterogeneous-LoRA step benchmark (SmolLM2-135M shapes, LoRA part only).

    .venv/bin/python -m tests.unit.test_lora_bench [--threads 2] [--steps 15] [--slots 8]

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

    def __init__(self, pool_adapters, token_slots, shapes, num_layers):
        self.idx = torch.tensor(token_slots)
        self.a = {(l, m): torch.stack([ad.weights[(l, m)][0] for ad in pool_adapters])
                  for l in range(num_layers) for m in shapes}
        self.b = {(l, m): torch.stack([ad.weights[(l, m)][1] for ad in pool_adapters])
                  for l in range(num_layers) for m in shapes}

    def apply(self, layer_idx, group, x, y):
        col = 0
        for m in GROUP_MODULES[group]:
            h = torch.bmm(self.a[(layer_idx, m)][self.idx], x.unsqueeze(2))  # [T, r, 1]
            d = torch.bmm(self.b[(layer_idx, m)][self.idx], h).squeeze(2)
            y[:, col:col + d.shape[1]] += d
            col += d.shape[1]


class StackedMask:
    """Alternative: every slot's A stacked [slots * r, in]: one GEMM, a mask keeping each
    token's own slot, a GEMM per module; optionally with weights prepacked for oneDNN."""

    def __init__(self, pool_adapters, token_slots, shapes, num_layers, prepack=False):
        n, r = len(pool_adapters), pool_adapters[0].max_rank
        self.a, self.b, self.width = {}, {}, n * r
        pack = (lambda w: torch.ops.mkldnn._reorder_linear_weight(w, len(token_slots))) \
            if prepack else (lambda w: w)
        self.linear = self._onednn if prepack else torch.nn.functional.linear
        for l in range(num_layers):
            for g, ms in GROUP_MODULES.items():
                weights = [[ad.weights[(l, m)] for ad in pool_adapters] for m in ms]
                self.a[(l, g)] = pack(torch.cat([a for w in weights for a, _ in w]))
                self.b[(l, g)] = [pack(torch.cat([b for _, b in w], 1))  # [out, n * r]
                                  for w in weights]
        one = torch.zeros(len(token_slots), n * r)
        for t, s in enumerate(token_slots):
            one[t, s * r:(s + 1) * r] = 1
        self.mask = {g: one.repeat(1, len(ms)) for g, ms in GROUP_MODULES.items()}

    @staticmethod
    def _onednn(x, packed):
        return torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], "")

    def apply(self, layer_idx, group, x, y):
        h = self.linear(x, self.a[(layer_idx, group)])
        h.mul_(self.mask[group])
        col = 0
        for j, b in enumerate(self.b[(layer_idx, group)]):
            d = self.linear(h[:, j * self.width:(j + 1) * self.width].contiguous(), b)
            y[:, col:col + d.shape[1]].add_(d)
            col += d.shape[1]


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
    """A pool of `num_slots` slots, each holding one of 8 adapters (slot s: adapter s % 8)."""
    shapes, num_layers = module_shapes(**model), model["num_layers"]
    adapters = [random_adapter(shapes, num_layers, rank, seed=s) for s in range(8)]
    pool = LoraSlotPool(num_slots, shapes, num_layers)
    pool_adapters = [adapters[s % 8] for s in range(num_slots)]
    for slot, adapter in enumerate(pool_adapters):
        pool.load(slot, adapter)
    spread = [i + 8 * (i % (num_slots // 8)) for i in range(8)]  # adapter i's slot in the step
    ops = {"chosen: TorchLoraOp() (CPU kernel, else bags, for adapters of < 8 tokens)": {},
           "embedding-bag for every adapter": dict(gemm_min_tokens=1 << 30, min_bag_adapters=1,
                                                   cpu_kernel=False),
           "embedding-bag where the kernel would run (no kernel)": dict(cpu_kernel=False),
           "loop over distinct adapters (GEMM pair per module)": dict(gemm_min_tokens=1,
                                                                      cpu_kernel=False)}
    cases = {"8 decode tokens, 8 different adapters": list(range(8)),
             "8 decode tokens, one adapter": [3] * 8,
             "prefill 8 x 30 tokens, 8 adapters": [s for s in range(8) for _ in range(30)]}
    for case, which in cases.items():
        token_slots = [spread[w] for w in which]
        ctxs = {"base linears alone (F.linear), for scale": BaseLinears(shapes, num_layers)}
        notes = {}
        for name, kwargs in ops.items():
            TorchLoraOp(**kwargs).step(pool.storage, torch.tensor(token_slots))  # warm-up
            t0 = time.perf_counter()
            ctxs[name] = TorchLoraOp(**kwargs).step(pool.storage, torch.tensor(token_slots))
            notes[name] = f"  (step_context {(time.perf_counter() - t0) * 1e3:.2f} ms)"
        if len(which) <= 8:
            for name, alt, kwargs in [("stacked all slots + mask", StackedMask, {}),
                                      ("  the same, oneDNN-prepacked", StackedMask, {"prepack": 1}),
                                      ("gather each token's A, B + bmm", GatherBmm, {})]:
                ctxs[name] = alt(pool_adapters, token_slots, shapes, num_layers, **kwargs)
        report(f"-- {case} (pool of {num_slots} slots, {torch.get_num_threads()} threads)")
        for name, ms in time_steps(ctxs, shapes, num_layers, len(which), steps).items():
            report(f"{name:64s} {ms:7.1f} ms{notes.get(name, '')}")
        del ctxs
    del pool
    mixed_ranks(shapes, num_layers, steps, report)


def padded(adapter: LoraAdapter, rank: int) -> LoraAdapter:
    """The same adapter with zero rows / columns up to `rank`."""
    weights = {key: (torch.cat([a, a.new_zeros(rank - a.shape[0], a.shape[1])]),
                     torch.cat([b, b.new_zeros(b.shape[0], rank - b.shape[1])], 1))
               for key, (a, b) in adapter.weights.items()}
    return LoraAdapter(weights, {key: rank for key in weights}, adapter.num_bytes)


def mixed_ranks(shapes, num_layers, steps, report):
    """8 decode tokens on 8 adapters of ranks 4 .. 64 and different target modules: each at
    its own rank (what the pool does) against all padded to rank 64 in the same pool."""
    ranks = [4, 8, 16, 16, 32, 64, 8, 16]
    attention = ["q_proj", "k_proj", "v_proj", "o_proj"]
    adapters = [random_adapter(shapes, num_layers, r, modules=None if i % 2 else attention, seed=i)
                for i, r in enumerate(ranks)]
    ctxs = {}
    for name, ads in [("own ranks (chosen)", adapters),
                      ("padded to rank 64", [padded(ad, 64) for ad in adapters])]:
        pool = LoraSlotPool(8, shapes, num_layers)
        for slot, ad in enumerate(ads):
            pool.load(slot, ad)
        ctxs[name] = pool.step_context(torch.arange(8))
    report(f"-- 8 decode tokens, 8 adapters of ranks {ranks}, every other one on attention only")
    for name, ms in time_steps(ctxs, shapes, num_layers, 8, steps).items():
        report(f"{name:64s} {ms:7.1f} ms")


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
