"""TritonLoraOp against TorchLoraOp (the reference) on one pool: per-token (decode) and block
(prefill) kernels, ranks 8 to 128, uneven runs, tokens without an adapter, fp32 and bf16.
On the CPU through Triton's interpreter; on CUDA where there is one."""
from __future__ import annotations

import pytest
import torch

from tests.unit.triton_env import DEVICES, SKIP_NO_TRITON

from loraxd.worker.lora import GROUP_MODULES, LoraAdapter, LoraSlotPool, TorchLoraOp  # noqa: E402

pytestmark = SKIP_NO_TRITON

SHAPES = {"q_proj": (32, 32), "k_proj": (32, 16), "v_proj": (32, 16), "o_proj": (32, 32),
          "gate_proj": (32, 48), "up_proj": (32, 48), "down_proj": (48, 32)}
NUM_LAYERS = 2
MAX_RANK = 128


def random_adapter(ranks, layers=range(NUM_LAYERS), seed=0) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    ranks = ranks if isinstance(ranks, dict) else {m: ranks for m in SHAPES}
    weights = {}
    for layer_idx in layers:
        for module, r in ranks.items():
            i, o = SHAPES[module]
            weights[(layer_idx, module)] = (torch.randn(r, i, generator=gen) / i ** 0.5,
                                            torch.randn(o, r, generator=gen) / r ** 0.5)
    return LoraAdapter(weights, {k: a.shape[0] for k, (a, _) in weights.items()}, 0)


# slot -> adapter; slot 1 stays empty
ADAPTERS = {
    0: random_adapter(8, seed=1),
    2: random_adapter(16, seed=2),
    3: random_adapter(64, seed=3),
    4: random_adapter(128, seed=4),
    5: random_adapter({"q_proj": 16, "v_proj": 8, "up_proj": 64, "down_proj": 8},
                      layers=[1], seed=5),  # some modules, one layer: r_tot differs per layer
}


def make_pools(device, dtype):
    from loraxd.worker.lora.triton_op import TritonLoraOp

    pools = {}
    for name, op in (("torch", TorchLoraOp()), ("triton", TritonLoraOp(block_min_tokens=5))):
        pool = LoraSlotPool(6, SHAPES, NUM_LAYERS, max_rank=MAX_RANK, dtype=dtype,
                            device=device, op=op)
        for slot, adapter in ADAPTERS.items():
            pool.load(slot, adapter)
        pools[name] = pool
    return pools


def check(pools, slots, device, dtype):
    token_slots = torch.tensor(slots)  # a host tensor, as the runner passes it
    ref, got = (pools[n].step_context(token_slots) for n in ("torch", "triton"))
    gen = torch.Generator().manual_seed(len(slots))
    for layer_idx in range(NUM_LAYERS):
        for group, modules in GROUP_MODULES.items():
            x = torch.randn(len(slots), SHAPES[modules[0]][0], generator=gen)
            y = torch.randn(len(slots), sum(SHAPES[m][1] for m in modules), generator=gen)
            x, y = x.to(device, dtype), y.to(device, dtype)
            expected, out = y.clone(), y.clone()
            ref.apply(layer_idx, group, x, expected)
            got.apply(layer_idx, group, x, out)
            base = [t for t, s in enumerate(slots) if s < 0 or s == 1]
            assert torch.equal(out[base], y[base]), "a token without an adapter was touched"
            tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else \
                dict(rtol=2e-2, atol=2e-2)
            torch.testing.assert_close(out.float().cpu(), expected.float().cpu(), **tol,
                                       msg=lambda m: f"layer {layer_idx} {group}: {m}")


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("slots", [
    [0, 2, 3, 4, -1, 5, 1, 0],  # decode: one token each, every rank, an empty slot, none
    [4] * 21 + [-1] * 2 + [0] * 7 + [3] * 3 + [5] * 17,  # prefill runs: uneven, partial blocks
    [2] * 6 + [3, 4, -1, 0, 0, 5],  # a prompt, then decode tokens: both kernels in one step
], ids=["decode", "prefill", "mixed"])
def test_matches_torch_op(device, dtype, slots):
    pools = make_pools(device, dtype)
    check(pools, slots, device, dtype)


@pytest.mark.parametrize("device", DEVICES)
def test_reload_and_unload_rebuild_the_rank_tables(device):
    pools = make_pools(device, torch.float32)
    slots = [0, 3, 3, 3, 3, 3, 3, 2]
    check(pools, slots, device, torch.float32)
    for pool in pools.values():
        pool.load(0, random_adapter(64, seed=9))  # slot 0: rank 8 -> 64
        pool.unload(3)
    check(pools, slots, device, torch.float32)
    ctx = pools["triton"].step_context(torch.tensor([3, 3]))
    y = torch.zeros(2, 32, device=device)
    ctx.apply(0, "down", torch.randn(2, 48, device=device), y)
    assert not y.any()


def test_split_work_lists_runs_and_tokens():
    from loraxd.worker.lora.triton_op import split_work

    tokens, blocks = split_work([1, 1, 1, -1, 2, 2, 2, 2, 2, 0, 2], block_min_tokens=3,
                                block_m=16)
    assert blocks == [(0, 3, 1), (4, 5, 2)]
    assert tokens == [(9, 0), (10, 2)]
    _, blocks = split_work([7] * 40, block_min_tokens=8, block_m=16)
    assert blocks == [(0, 16, 7), (16, 16, 7), (32, 8, 7)]


@pytest.mark.parametrize("device", DEVICES)
def test_no_adapter_gives_none_and_bad_slot_raises(device):
    pool = make_pools(device, torch.float32)["triton"]
    assert pool.step_context(torch.tensor([-1, -1])) is None
    with pytest.raises(IndexError):
        pool.step_context(torch.tensor([0, 6]))
