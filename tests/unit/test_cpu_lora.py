"""The CPU LoRA kernel (cpu_kernels/lora_bgmv.cpp, via lora/cpu_bgmv.py) against the dense
per-token reference and the embedding-bag path it replaces: mixed ranks 1..80 (past one
192-wide shrink pass), module subsets, per-layer ranks, repeated slots, base tokens, 1..40
tokens, odd widths; a token's result independent of its batch and thread count; bf16; the
bag path when the kernel is absent; bad plans refused."""
from __future__ import annotations

import random

import pytest
import torch

from loraxd.worker import cpu_kernels
from loraxd.worker.lora import GROUP_MODULES, LoraAdapter, LoraSlotPool, TorchLoraOp
from loraxd.worker.lora import cpu_bgmv

REASON = cpu_kernels.enable()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"no CPU kernels: {REASON}")

HIDDEN, INTER = 203, 517  # odd: tails in every vector loop, several shrink chunks
SHAPES = {"q_proj": (HIDDEN, HIDDEN), "k_proj": (HIDDEN, 45), "v_proj": (HIDDEN, 45),
          "o_proj": (HIDDEN, HIDDEN), "gate_proj": (HIDDEN, INTER), "up_proj": (HIDDEN, INTER),
          "down_proj": (INTER, HIDDEN)}
NUM_LAYERS, NUM_SLOTS, MAX_RANK = 3, 10, 80


def random_adapter(rng: random.Random, seed: int) -> LoraAdapter:
    """Random modules, each with its own rank in 1..64 (one adapter in four goes up to 80),
    some layers without any."""
    gen = torch.Generator().manual_seed(seed)
    top = 80 if rng.random() < 0.25 else 64
    modules = rng.sample(list(SHAPES), rng.randint(1, len(SHAPES)))
    layers = rng.sample(range(NUM_LAYERS), rng.randint(1, NUM_LAYERS))
    weights = {}
    for layer_idx in layers:
        for module in modules:
            r = rng.randint(1, top) if rng.random() < 0.3 else rng.choice([1, 8, 16, top])
            i, o = SHAPES[module]
            weights[(layer_idx, module)] = (torch.randn(r, i, generator=gen),
                                            torch.randn(o, r, generator=gen) / r)
    return LoraAdapter(weights, {k: a.shape[0] for k, (a, _) in weights.items()}, 0)


def make_pools(dtype=torch.float32, seed=0):
    """(kernel pool, bag pool, adapter of each slot) with the same adapters in the same slots."""
    rng = random.Random(seed)
    adapters = [random_adapter(rng, seed * 100 + s) for s in range(NUM_SLOTS)]
    pools = []
    for kernel in (True, False):
        op = TorchLoraOp(gemm_min_tokens=1 << 30, min_bag_adapters=1, cpu_kernel=kernel)
        pool = LoraSlotPool(NUM_SLOTS, SHAPES, NUM_LAYERS, max_rank=MAX_RANK, dtype=dtype, op=op)
        for slot, adapter in enumerate(adapters):
            pool.load(slot, adapter)
        pools.append(pool)
    return pools[0], pools[1], adapters


def reference(adapters, layer_idx, group, x, y):
    out, col = y.double(), 0
    for module in GROUP_MODULES[group]:
        width = SHAPES[module][1]
        for t, adapter in enumerate(adapters):
            if adapter is not None and (layer_idx, module) in adapter.weights:
                a, b = adapter.weights[(layer_idx, module)]
                out[t, col:col + width] += b.double() @ (a.double() @ x[t].double())
        col += width
    return out


def inputs(num_tokens, group, seed, dtype=torch.float32):
    gen = torch.Generator().manual_seed(seed)
    modules = GROUP_MODULES[group]
    x = torch.randn(num_tokens, SHAPES[modules[0]][0], generator=gen).to(dtype)
    y = torch.randn(num_tokens, sum(SHAPES[m][1] for m in modules), generator=gen).to(dtype)
    return x, y


@needs_kernel
def test_kernel_matches_reference_and_bags():
    kernel_pool, bag_pool, adapters = make_pools()
    rng = random.Random(1)
    for case in range(30):
        n = rng.choice([1, 2, 3, 5, 8, 13, 40]) if case else 40
        slots = [rng.randrange(-1, NUM_SLOTS) for _ in range(n)]
        if case % 5 == 1:
            slots = [rng.choice(slots)] * n  # one adapter (or all base)
        ctx = kernel_pool.step_context(torch.tensor(slots))
        bag_ctx = bag_pool.step_context(torch.tensor(slots))
        if all(s < 0 for s in slots):
            assert ctx is None and bag_ctx is None
            continue
        assert ctx.plans and not ctx.bags and not ctx.segments
        assert bag_ctx.bags and not bag_ctx.plans
        by_token = [adapters[s] if s >= 0 else None for s in slots]
        for layer_idx in range(NUM_LAYERS):
            for group in GROUP_MODULES:
                x, y = inputs(n, group, case * 10 + layer_idx)
                expected = reference(by_token, layer_idx, group, x, y)
                y_bag = y.clone()
                bag_ctx.apply(layer_idx, group, x, y_bag)
                ctx.apply(layer_idx, group, x, y)
                where = f"case {case} slots {slots} layer {layer_idx} {group}"
                scale = expected.abs().max().item()
                torch.testing.assert_close(y.double(), expected, rtol=1e-5, atol=1e-5 * scale,
                                           msg=lambda m: f"{where}: {m}")
                torch.testing.assert_close(y, y_bag, rtol=1e-5, atol=1e-5 * scale,
                                           msg=lambda m: f"{where} vs bags: {m}")


@needs_kernel
def test_strided_input_and_many_token_adapters_beside_it():
    """x a strided view; an adapter with many tokens on the GEMM path in the same step."""
    kernel_pool, _, adapters = make_pools(seed=2)
    kernel_pool.op = TorchLoraOp(gemm_min_tokens=8)
    slots = [3] * 12 + [0, 5, -1, 7, 5, 9]
    ctx = kernel_pool.step_context(torch.tensor(slots))
    assert ctx.plans and ctx.segments
    by_token = [adapters[s] if s >= 0 else None for s in slots]
    for group in GROUP_MODULES:
        x, y = inputs(len(slots), group, 5)
        wide = torch.zeros(len(slots), 2 * x.shape[1])
        wide[:, ::2] = x
        expected = reference(by_token, 1, group, x, y)
        ctx.apply(1, group, wide[:, ::2], y)
        torch.testing.assert_close(y.double(), expected, rtol=1e-5,
                                   atol=1e-5 * expected.abs().max().item())


@needs_kernel
def test_a_token_does_not_depend_on_its_batch_or_threads():
    kernel_pool, _, _ = make_pools(seed=3)
    x, y = inputs(40, "gate_up", 7)
    alone = y[6:7].clone()
    kernel_pool.step_context(torch.tensor([4])).apply(2, "gate_up", x[6:7], alone)
    threads = torch.get_num_threads()
    try:
        for num_threads in sorted({1, 2, threads}):
            torch.set_num_threads(num_threads)
            batch = y.clone()
            slots = [(t * 7) % NUM_SLOTS for t in range(40)]
            slots[6] = 4
            kernel_pool.step_context(torch.tensor(slots)).apply(2, "gate_up", x, batch)
            assert torch.equal(batch[6:7], alone), num_threads
    finally:
        torch.set_num_threads(threads)


@needs_kernel
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_a_token_alone_equals_it_in_a_group_of_its_slot(dtype):
    """Tokens of one slot share their A loads in groups of up to 4: every group size, for
    every group of modules (shrinks of 1 to 6 vectors), gives each token what it gets alone."""
    kernel_pool, _, _ = make_pools(dtype=dtype, seed=7)
    for group in GROUP_MODULES:
        for n in (2, 3, 4, 5, 9):
            x, y = inputs(n, group, n, dtype)
            slots = [2] * n
            together = y.clone()
            ctx = kernel_pool.step_context(torch.tensor(slots))
            for layer_idx in range(NUM_LAYERS):
                ctx.apply(layer_idx, group, x, together)
            for t in range(n):
                alone = y[t:t + 1].clone()
                ctx = kernel_pool.step_context(torch.tensor([2]))
                for layer_idx in range(NUM_LAYERS):
                    ctx.apply(layer_idx, group, x[t:t + 1], alone)
                assert torch.equal(together[t:t + 1], alone), (group, n, t)


@needs_kernel
def test_adapters_go_to_the_gemm_path_from_32_tokens_with_the_kernel():
    """The default threshold: 31 tokens of one adapter still in the kernel's plans, 32 on the
    GEMM path; 8 without the kernel (the bags)."""
    pool = LoraSlotPool(4, SHAPES, NUM_LAYERS, max_rank=MAX_RANK)
    rng = random.Random(8)
    for slot in range(4):
        pool.load(slot, random_adapter(rng, slot))
    for n, gemm in ((31, False), (32, True)):
        ctx = pool.step_context(torch.tensor([0] * n + [1, 2, 3]))
        assert bool(ctx.segments) == gemm and ctx.plans
    pool.op = TorchLoraOp(cpu_kernel=False)
    ctx = pool.step_context(torch.tensor([0] * 8 + [1, 2, 3]))
    assert ctx.segments and ctx.bags


@needs_kernel
def test_bfloat16():
    kernel_pool, bag_pool, adapters = make_pools(dtype=torch.bfloat16, seed=4)
    slots = [0, 3, -1, 3, 8, 9, 1]
    ctx = kernel_pool.step_context(torch.tensor(slots))
    assert ctx.plans
    by_token = [adapters[s] if s >= 0 else None for s in slots]
    for group in GROUP_MODULES:
        x, y = inputs(len(slots), group, 9, torch.bfloat16)
        expected = reference(by_token, 0, group, x, y)
        ctx.apply(0, group, x, y)
        assert y.dtype == torch.bfloat16
        scale = expected.abs().max().item()
        torch.testing.assert_close(y.double(), expected, rtol=2e-2, atol=2e-2 * scale)


def test_bags_when_the_kernel_is_absent(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "enable", lambda *a: "no C++ compiler (test)")
    op = TorchLoraOp()
    pool = LoraSlotPool(NUM_SLOTS, SHAPES, NUM_LAYERS, max_rank=MAX_RANK, op=op)
    rng = random.Random(5)
    adapters = [random_adapter(rng, s) for s in range(NUM_SLOTS)]
    for slot, adapter in enumerate(adapters):
        pool.load(slot, adapter)
    slots = [1, 4, 6, 4, 9, -1]
    ctx = pool.step_context(torch.tensor(slots))
    assert ctx.bags and not ctx.plans
    by_token = [adapters[s] if s >= 0 else None for s in slots]
    x, y = inputs(len(slots), "qkv", 3)
    expected = reference(by_token, 1, "qkv", x, y)
    ctx.apply(1, "qkv", x, y)
    torch.testing.assert_close(y.double(), expected, rtol=1e-5,
                               atol=1e-5 * expected.abs().max().item())
    pool.op = TorchLoraOp(cpu_kernel=True)
    with pytest.raises(RuntimeError, match="does not cover this pool"):
        pool.step_context(torch.tensor([1, 2]))


def test_kernel_not_used_for_other_dtypes_or_devices():
    pool = LoraSlotPool(2, SHAPES, NUM_LAYERS, max_rank=8, dtype=torch.float16)
    assert not cpu_bgmv.usable(pool.storage)


@needs_kernel
def test_bad_plans_are_refused():
    kernel_pool, _, _ = make_pools(seed=6)
    store = kernel_pool.storage.stores[0]["o"]
    spec = kernel_pool.storage.specs["o"]
    x, y = inputs(3, "o", 1)
    for rows, match in [([[0, 1, 4], [0, 2, 4]], "repeated"), ([[3, 1, 4]], "token 3"),
                        ([[0, NUM_SLOTS, 4]], "slot"), ([[0, 1, MAX_RANK + 1]], "rank"),
                        ([[0, 1, 0]], "ranks sum")]:
        with pytest.raises(RuntimeError, match=match):
            cpu_bgmv.apply(torch.tensor(rows), store, spec, x, y)
