"""Batched heterogeneous LoRA: `apply` equals the dense per-token reference, for every path."""

from __future__ import annotations

import random

import pytest
import torch

from loraxd.worker import cpu_kernels
from loraxd.worker.lora import (
    GROUP_MODULES, AdapterIncompatible, LoraAdapter, LoraSlotPool, TorchLoraOp,
)

SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
          "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}
NUM_LAYERS = 3
NUM_SLOTS = 6

# op settings that force each path: bags only, GEMM only, the CPU kernel (where it is
# loaded) for every adapter, the default mix (the kernel's few-token adapters where loaded)
OPS = {"bags": dict(gemm_min_tokens=1 << 30, min_bag_adapters=1, cpu_kernel=False),
       "gemm": dict(gemm_min_tokens=1, cpu_kernel=False),
       "kernel": dict(gemm_min_tokens=1 << 30, cpu_kernel=True),
       "default": {}}


@pytest.fixture(params=list(OPS))
def op(request):
    if request.param == "kernel" and cpu_kernels.enable() is not None:
        pytest.skip(f"no CPU kernels: {cpu_kernels.enable()}")
    return request.param


def random_adapter(ranks, layers=range(NUM_LAYERS), seed=0) -> LoraAdapter:
    """`ranks`: module -> rank (a dict), or one rank for all modules."""
    gen = torch.Generator().manual_seed(seed)
    ranks = ranks if isinstance(ranks, dict) else {m: ranks for m in SHAPES}
    weights = {}
    for layer_idx in layers:
        for module, r in ranks.items():
            i, o = SHAPES[module]
            weights[(layer_idx, module)] = (torch.randn(r, i, generator=gen),
                                            torch.randn(o, r, generator=gen) / r)
    return LoraAdapter(weights, {k: a.shape[0] for k, (a, _) in weights.items()}, 0)


ADAPTERS = [
    random_adapter(8, seed=1),
    random_adapter({"q_proj": 4, "v_proj": 4}, seed=2),
    random_adapter({"q_proj": 16, "k_proj": 8, "v_proj": 4, "o_proj": 12, "gate_proj": 6,
                    "up_proj": 64, "down_proj": 2}, layers=[0, 2], seed=3),
    random_adapter({"down_proj": 32, "gate_proj": 32}, seed=4),
    random_adapter(16, seed=5),
]
SLOT_OF = [5, 0, 2, 3, 1]  # adapter i lives in slot SLOT_OF[i]


def make_pool(dtype=torch.float32, **op_kwargs) -> LoraSlotPool:
    pool = LoraSlotPool(NUM_SLOTS, SHAPES, NUM_LAYERS, max_rank=64, dtype=dtype,
                        op=TorchLoraOp(**op_kwargs))
    for adapter, slot in zip(ADAPTERS, SLOT_OF):
        pool.load(slot, adapter)
    return pool


def reference(adapters_by_token, layer_idx, group, x, y):
    """y + per token sum over the group's modules of x @ (B @ A).T in its columns."""
    out, col = y.clone(), 0
    for module in GROUP_MODULES[group]:
        width = SHAPES[module][1]
        for t, adapter in enumerate(adapters_by_token):
            if adapter is not None and (layer_idx, module) in adapter.weights:
                a, b = adapter.weights[(layer_idx, module)]
                out[t, col:col + width] += (b @ a) @ x[t]
        col += width
    return out


def check_step(pool, choice, atol=1e-5):
    """choice: adapter index per token (-1: base); compares every group of every layer."""
    token_slots = torch.tensor([SLOT_OF[c] if c >= 0 else -1 for c in choice])
    ctx = pool.step_context(token_slots)
    if all(c < 0 for c in choice):
        assert ctx is None
        return
    adapters = [ADAPTERS[c] if c >= 0 else None for c in choice]
    gen = torch.Generator().manual_seed(len(choice))
    for layer_idx in range(NUM_LAYERS):
        for group, modules in GROUP_MODULES.items():
            x = torch.randn(len(choice), SHAPES[modules[0]][0], generator=gen)
            y = torch.randn(len(choice), sum(SHAPES[m][1] for m in modules), generator=gen)
            expected = reference(adapters, layer_idx, group, x, y)
            ctx.apply(layer_idx, group, x, y)
            torch.testing.assert_close(y, expected, rtol=1e-5, atol=atol,
                                       msg=lambda m: f"layer {layer_idx} {group}: {m}")


@pytest.mark.parametrize("choice", [
    [0],
    [4] * 10,
    [-1, 2, 2, -1],
    [0, 1, 2, 3, 4, -1, 0, 3],        # every adapter, different ranks and targets
    [3] * 9 + [4] * 9 + [-1] * 3,     # contiguous runs (prefill-like)
    [1, 3, 1, 3, 1, 3, 1, 3, 1, 3],   # interleaved: non-contiguous tokens per adapter
    [2, -1, 2, 0, 2, 4, 2, 1, 2, 2, 2, 2, 2, 2, 2, 3],  # one many-token adapter + a few
], ids=["one", "same", "gaps", "all", "runs", "interleaved", "mixed"])
def test_apply_matches_dense_reference(op, choice):
    check_step(make_pool(**OPS[op]), choice)


def test_random_batches(op):
    pool, rng = make_pool(**OPS[op]), random.Random(0)
    for _ in range(15):
        choice = [rng.choice([-1, 0, 1, 2, 3, 4]) for _ in range(rng.randint(1, 24))]
        if rng.random() < 0.5:
            choice.sort()
        check_step(pool, choice)


def test_all_base_tokens_give_none():
    pool = make_pool()
    assert pool.step_context(torch.tensor([-1, -1, -1])) is None
    assert pool.step_context(torch.tensor([], dtype=torch.long)) is None


def test_reload_replaces_adapter(op):
    pool = make_pool(**OPS[op])
    choice = [0, 1, 3, 4, 0]
    check_step(pool, choice)
    ADAPTERS.append(random_adapter(4, seed=9))
    SLOT_OF.append(SLOT_OF[0])  # the new adapter goes into adapter 0's slot
    try:
        pool.load(SLOT_OF[0], ADAPTERS[-1])
        check_step(pool, [5 if c == 0 else c for c in choice])
    finally:
        ADAPTERS.pop()
        SLOT_OF.pop()
    pool.unload(SLOT_OF[3])
    ctx = pool.step_context(torch.tensor([SLOT_OF[3]] * 3))
    y = torch.zeros(3, 64)
    ctx.apply(0, "down", torch.randn(3, 128), y)
    assert not y.any()


def test_memory_is_fixed_by_num_slots():
    pool = make_pool()
    before = pool.num_bytes
    for i in range(10):
        pool.load(i % NUM_SLOTS, ADAPTERS[i % len(ADAPTERS)])
    assert pool.num_bytes == before
    per_slot = sum(NUM_LAYERS * 64 * (i + o) * 4 for i, o in SHAPES.values())
    assert before == NUM_SLOTS * per_slot


def test_refuses_rank_above_max_and_bad_slot():
    pool = LoraSlotPool(2, SHAPES, NUM_LAYERS, max_rank=16)
    with pytest.raises(AdapterIncompatible, match="rank 32 > pool max_rank 16"):
        pool.load(0, random_adapter(32))
    with pytest.raises(IndexError):
        pool.load(2, random_adapter(4))
    with pytest.raises(IndexError):
        pool.step_context(torch.tensor([0, 2]))


def test_bfloat16_pool(op):
    pool = make_pool(dtype=torch.bfloat16, **OPS[op])
    token_slots = torch.tensor([SLOT_OF[c] for c in (0, 4, 3)])
    x = torch.randn(3, 64)
    y = torch.zeros(3, 64 + 32 + 32)
    expected = reference([ADAPTERS[c] for c in (0, 4, 3)], 1, "qkv", x, y)
    y = y.bfloat16()
    pool.step_context(token_slots).apply(1, "qkv", x.bfloat16(), y)
    atol = 3e-2 * expected.abs().max().item()
    torch.testing.assert_close(y.float(), expected, rtol=3e-2, atol=atol)


def test_matches_peft_mixed_batch(tmp_path):
    """A tiny Llama with our apply hooked behind its linears gives PEFT's logits for a batch
    whose rows use two different adapters and the base model (PEFT's `adapter_names`)."""
    peft = pytest.importorskip("peft")
    transformers = pytest.importorskip("transformers")
    from loraxd.worker.lora import MODULE_GROUP, load_peft_adapter

    config = transformers.LlamaConfig(num_hidden_layers=2, hidden_size=64, intermediate_size=128,
                                      num_attention_heads=4, num_key_value_heads=2, vocab_size=128)
    kinds = [dict(r=8, lora_alpha=16), dict(r=4, lora_alpha=8, use_rslora=True,
                                            target_modules=["q_proj", "v_proj", "down_proj"])]
    for i, kwargs in enumerate(kinds):
        torch.manual_seed(0)
        model = transformers.LlamaForCausalLM(config)
        torch.manual_seed(100 + i)
        kwargs.setdefault("target_modules", list(SHAPES))
        peft.get_peft_model(model, peft.LoraConfig(init_lora_weights=False, **kwargs)) \
            .save_pretrained(str(tmp_path / f"a{i}"))
    torch.manual_seed(0)
    base = transformers.LlamaForCausalLM(config).eval()
    shapes = {m: (mod.in_features, mod.out_features) for name, mod in base.named_modules()
              for m in [name.rsplit(".", 1)[-1]] if m in SHAPES and ".layers.0." in name}
    pool = LoraSlotPool(4, shapes, 2, op=TorchLoraOp(gemm_min_tokens=4, min_bag_adapters=1))
    for i in range(2):
        pool.load(2 * i + 1, load_peft_adapter(str(tmp_path / f"a{i}"), shapes, 2))

    input_ids = torch.randint(0, 128, (3, 5), generator=torch.Generator().manual_seed(1))
    row_slots = [3, -1, 1]
    ctx = pool.step_context(torch.tensor(row_slots).repeat_interleave(5))

    def hook(layer_idx, module_name):
        group = MODULE_GROUP[module_name]
        modules = GROUP_MODULES[group]
        col = sum(shapes[m][1] for m in modules[:modules.index(module_name)])

        def add_lora(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            y = torch.zeros(x.shape[0], sum(shapes[m][1] for m in modules))
            ctx.apply(layer_idx, group, x, y)
            return output + y[:, col:col + output.shape[-1]].view_as(output)
        return add_lora

    with torch.no_grad():
        plain = base(input_ids).logits
    for name, mod in base.named_modules():
        module_name = name.rsplit(".", 1)[-1]
        if module_name in SHAPES:
            layer_idx = int(name.split(".layers.")[1].split(".")[0])
            mod.register_forward_hook(hook(layer_idx, module_name))
    with torch.no_grad():
        ours = base(input_ids).logits

    torch.manual_seed(0)
    reference_model = peft.PeftModel.from_pretrained(
        transformers.LlamaForCausalLM(config), str(tmp_path / "a0"), adapter_name="a0")
    reference_model.load_adapter(str(tmp_path / "a1"), adapter_name="a1")
    reference_model.eval()
    names = {1: "a0", 3: "a1", -1: "__base__"}
    with torch.no_grad():
        expected = reference_model(input_ids, adapter_names=[names[s] for s in row_slots]).logits
    torch.testing.assert_close(ours, expected, rtol=1e-4, atol=1e-5)
    lora_effect = (expected - plain).abs().amax(dim=(1, 2))
    assert lora_effect[0] > 1e-2 and lora_effect[2] > 1e-2 and lora_effect[1] == 0
