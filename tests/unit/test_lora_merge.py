"""Merged adapters: each strategy equals PEFT's merge_utils on the same task tensors."""

from __future__ import annotations

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from peft.utils import merge_utils  # noqa: E402

from loraxd.worker.lora import LoraAdapter, LoraSlotPool, load_peft_adapter  # noqa: E402
from loraxd.worker.lora.merge import (  # noqa: E402
    STRATEGIES, MergeError, disjoint_merge, majority_sign_mask, merge_adapters, merge_tensors,
    part_seed, prune_magnitude, prune_random,
)

pytestmark = pytest.mark.filterwarnings("ignore:The density")  # PEFT warns at density >= 1

IN, OUT = 24, 20


def random_adapter(keys_ranks: dict, seed: int, in_features=IN, out_features=OUT) -> LoraAdapter:
    gen = torch.Generator().manual_seed(seed)
    weights = {key: (torch.randn(r, in_features, generator=gen),
                     torch.randn(out_features, r, generator=gen))
               for key, r in keys_ranks.items()}
    num_bytes = sum(a.numel() * 4 + b.numel() * 4 for a, b in weights.values())
    return LoraAdapter(weights=weights, ranks=dict(keys_ranks), num_bytes=num_bytes)


def peft_merge(tensors, weights, strategy, density, method, seed=None):
    """PEFT's merge of equal-shape task tensors; `seed` seeds the global RNG for DARE."""
    w = torch.tensor(weights)
    if seed is not None:
        torch.manual_seed(seed)
    if strategy == "linear":
        return merge_utils.task_arithmetic(tensors, w)
    if strategy == "ties":
        return merge_utils.ties(tensors, w, density, method)
    if strategy == "dare_linear":
        return merge_utils.dare_linear(tensors, w, density)
    return merge_utils.dare_ties(tensors, w, density, method)


def seeded(seed):
    return torch.Generator().manual_seed(seed)


# ---- building blocks ------------------------------------------------------------------------

@pytest.mark.parametrize("density", [0.0, 0.1, 0.5, 0.9, 1.0])
def test_pruning_matches_peft(density):
    t = torch.randn(8, 32)
    expected = merge_utils.prune(t, density, method="magnitude")
    assert torch.equal(prune_magnitude(t, density), expected)
    if density > 0:  # PEFT divides by zero at density 0
        torch.manual_seed(7)
        expected = merge_utils.prune(t, density, method="random", rescale=True)
        assert torch.equal(prune_random(t, density, seeded(7)), expected)
    else:
        assert torch.equal(prune_random(t, density, seeded(7)), torch.zeros_like(t))


@pytest.mark.parametrize("method", ["total", "frequency"])
def test_sign_election_and_disjoint_merge_match_peft(method):
    stacked = torch.randn(4, 6, 10)
    stacked[1, 0] = 0  # zero entries never agree
    mask = majority_sign_mask(stacked, method)
    assert torch.equal(mask, merge_utils.calculate_majority_sign_mask(stacked, method))
    weighted = stacked * torch.tensor([0.5, 1.0, -0.3, 2.0]).view(-1, 1, 1)
    torch.testing.assert_close(disjoint_merge(weighted, mask),
                               merge_utils.disjoint_merge(weighted, mask), rtol=0, atol=0)


# ---- whole strategies on task tensors -------------------------------------------------------

@pytest.mark.parametrize("method", ["total", "frequency"])
@pytest.mark.parametrize("density", [0.3, 0.7, 1.0])
@pytest.mark.parametrize("strategy", STRATEGIES)
def test_strategy_matches_peft(strategy, density, method):
    torch.manual_seed(0)
    tensors = [torch.randn(8, 16) for _ in range(3)]
    weights = [0.5, 1.5, -0.7]
    expected = peft_merge(tensors, weights, strategy, density, method, seed=11)
    got = merge_tensors(tensors, weights, strategy, density, method, generator=seeded(11))
    torch.testing.assert_close(got, expected, rtol=0, atol=0)


# ---- merge_adapters -------------------------------------------------------------------------

KEYS = [(0, "q_proj"), (0, "v_proj"), (1, "q_proj"), (1, "down_proj")]


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_merge_adapters_matches_peft_per_module(strategy):
    adapters = [random_adapter({k: 4 for k in KEYS}, seed=s) for s in range(3)]
    weights, density, method, seed = [1.0, 0.4, 0.8], 0.5, "frequency", 1234
    merged = merge_adapters(adapters, weights, strategy, density, method, seed=seed)
    assert set(merged.weights) == set(KEYS)
    for key in KEYS:
        for idx, part in enumerate("AB"):
            tensors = [adapter.weights[key][idx] for adapter in adapters]
            expected = peft_merge(tensors, weights, strategy, density, method,
                                  seed=part_seed(seed, key, part))
            torch.testing.assert_close(merged.weights[key][idx], expected, rtol=0, atol=0)
        assert merged.ranks[key] == 4
    assert merged.num_bytes == sum(a.numel() * 4 + b.numel() * 4
                                   for a, b in merged.weights.values())


@pytest.mark.parametrize("strategy", ["linear", "ties"])
def test_partial_targets_equal_zero_components(strategy):
    """A module one component lacks merges as if it contributed zero tensors (PEFT on zeros)."""
    full = random_adapter({k: 4 for k in KEYS}, seed=1)
    partial = random_adapter({KEYS[0]: 4, KEYS[2]: 4}, seed=2)
    weights = [0.6, 1.3]
    merged = merge_adapters([full, partial], weights, strategy, density=0.5)
    assert set(merged.weights) == set(KEYS)
    for key in KEYS:
        for idx in range(2):
            mine = full.weights[key][idx]
            other = partial.weights[key][idx] if key in partial.weights else torch.zeros_like(mine)
            expected = peft_merge([mine, other], weights, strategy, 0.5, "total")
            torch.testing.assert_close(merged.weights[key][idx], expected, rtol=0, atol=1e-7)


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_mixed_ranks_pad_after_pruning(strategy):
    """Ranks 2, 4 and 8: each tensor pruned at its own rank (PEFT's prune), then zero-padded
    (A rows, B columns) and combined with PEFT's sign election / disjoint merge."""
    key = (0, "q_proj")
    adapters = [random_adapter({key: r}, seed=r) for r in (2, 4, 8)]
    weights, density, method, seed = [1.0, -0.5, 0.8], 0.6, "total", 5
    merged = merge_adapters(adapters, weights, strategy, density, method, seed=seed)
    assert merged.ranks[key] == 8
    a, b = merged.weights[key]
    assert a.shape == (8, IN) and b.shape == (OUT, 8)
    w = torch.tensor(weights).view(-1, 1, 1)
    for idx, part in enumerate("AB"):
        torch.manual_seed(part_seed(seed, key, part))
        pruned = []
        for adapter in adapters:
            t = adapter.weights[key][idx]
            if strategy == "ties":
                t = merge_utils.prune(t, density, method="magnitude")
            elif strategy.startswith("dare"):
                t = merge_utils.prune(t, density, method="random", rescale=True)
            pad = (0, 0, 0, 8 - t.shape[0]) if idx == 0 else (0, 8 - t.shape[1])
            pruned.append(torch.nn.functional.pad(t, pad))
        stacked = torch.stack(pruned)
        if strategy.endswith("linear"):
            expected = (stacked * w).sum(dim=0)
        else:
            mask = merge_utils.calculate_majority_sign_mask(stacked, method)
            expected = merge_utils.disjoint_merge(stacked * w, mask)
        torch.testing.assert_close(merged.weights[key][idx], expected, rtol=0, atol=0)


def test_padding_keeps_delta():
    """Linear with weights (1, 0): A = A1 padded, B = B1 padded, so the delta is adapter 1's."""
    key = (1, "down_proj")
    small, big = random_adapter({key: 3}, seed=1), random_adapter({key: 8}, seed=2)
    merged = merge_adapters([small, big], [1.0, 0.0])
    a, b = merged.weights[key]
    a1, b1 = small.weights[key]
    torch.testing.assert_close(b @ a, b1 @ a1)
    assert not a[3:].any() and not b[:, 3:].any()


def test_single_adapter_linear_is_identity():
    adapter = random_adapter({k: r for k, r in zip(KEYS, (2, 4, 6, 8))}, seed=3)
    merged = merge_adapters([adapter], [1.0])
    assert merged.ranks == adapter.ranks and merged.num_bytes == adapter.num_bytes
    for key, (a, b) in adapter.weights.items():
        assert torch.equal(merged.weights[key][0], a) and torch.equal(merged.weights[key][1], b)


@pytest.mark.parametrize("strategy", ["dare_linear", "dare_ties"])
def test_dare_is_deterministic_per_seed(strategy):
    adapters = [random_adapter({k: 4 for k in KEYS}, seed=s) for s in range(2)]
    torch.manual_seed(0)
    first = merge_adapters(adapters, [1.0, 1.0], strategy, density=0.5, seed=42)
    torch.manual_seed(99)  # the global RNG plays no part
    again = merge_adapters(adapters, [1.0, 1.0], strategy, density=0.5, seed=42)
    other = merge_adapters(adapters, [1.0, 1.0], strategy, density=0.5, seed=43)
    for key in KEYS:
        for idx in range(2):
            assert torch.equal(first.weights[key][idx], again.weights[key][idx])
    assert any(not torch.equal(first.weights[k][i], other.weights[k][i])
               for k in KEYS for i in range(2))


def test_dare_zero_density_is_zero_not_nan():
    adapters = [random_adapter({KEYS[0]: 4}, seed=s) for s in range(2)]
    for strategy in ("dare_linear", "dare_ties"):
        merged = merge_adapters(adapters, [1.0, 1.0], strategy, density=0.0)
        assert all(not t.any() for t in merged.weights[KEYS[0]])


def test_keeps_dtype():
    adapter = random_adapter({KEYS[0]: 4}, seed=0)
    bf16 = LoraAdapter({k: (a.bfloat16(), b.bfloat16()) for k, (a, b) in adapter.weights.items()},
                       adapter.ranks, adapter.num_bytes // 2)
    merged = merge_adapters([bf16, bf16], [0.5, 0.5], "ties", density=0.5)
    assert all(t.dtype == torch.bfloat16 for t in merged.weights[KEYS[0]])
    assert merged.num_bytes == bf16.num_bytes


@pytest.mark.parametrize("kwargs, words", [
    (dict(weights=[1.0]), "1 weights for 2 adapters"),
    (dict(strategy="slerp"), "merge_strategy 'slerp'"),
    (dict(density=1.5), "density 1.5"),
    (dict(density=-0.1), "density -0.1"),
    (dict(density=float("nan")), "density nan"),
    (dict(majority_sign_method="mean"), "majority_sign_method 'mean'"),
    (dict(weights=[1.0, float("inf")]), "finite"),
])
def test_bad_requests_raise_merge_error(kwargs, words):
    adapters = [random_adapter({KEYS[0]: 4}, seed=s) for s in range(2)]
    args = dict(weights=[1.0, 1.0]) | kwargs
    with pytest.raises(MergeError, match=words):
        merge_adapters(adapters, **args)


def test_no_adapters_and_shape_mismatch_raise():
    with pytest.raises(MergeError, match="no adapters"):
        merge_adapters([], [])
    a = random_adapter({KEYS[0]: 4}, seed=0)
    b = random_adapter({KEYS[0]: 4}, seed=1, in_features=IN + 1)
    with pytest.raises(MergeError, match="disagree on its shape"):
        merge_adapters([a, b], [1.0, 1.0])
    assert issubclass(MergeError, ValueError)


# ---- end to end from PEFT adapters on disk --------------------------------------------------

def tiny_llama():
    return transformers.LlamaForCausalLM(transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=64, intermediate_size=128, num_attention_heads=4,
        num_key_value_heads=2, vocab_size=128))


SHAPES = {"q_proj": (64, 64), "k_proj": (64, 32), "v_proj": (64, 32), "o_proj": (64, 64),
          "gate_proj": (64, 128), "up_proj": (64, 128), "down_proj": (128, 64)}


def save_peft_adapter(path, seed, **lora_kwargs):
    """Save a random PEFT adapter; returns (layer, module) -> (A, B * scaling) from PEFT."""
    torch.manual_seed(seed)
    model = peft.get_peft_model(tiny_llama(), peft.LoraConfig(init_lora_weights=False,
                                                              **lora_kwargs))
    model.save_pretrained(str(path))
    tensors = {}
    for name, module in model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A:
            key = (int(name.split(".layers.")[1].split(".")[0]), name.rsplit(".", 1)[-1])
            scale = module.scaling["default"]
            tensors[key] = (module.lora_A["default"].weight.detach(),
                            module.lora_B["default"].weight.detach() * scale)
    return tensors


@pytest.mark.parametrize("strategy", STRATEGIES)
def test_end_to_end_from_peft_adapters(tmp_path, strategy):
    first = save_peft_adapter(tmp_path / "a", seed=0, r=8, lora_alpha=16,
                              target_modules=["q_proj", "v_proj", "down_proj"])
    second = save_peft_adapter(tmp_path / "b", seed=1, r=8, lora_alpha=8,
                               target_modules=["q_proj", "o_proj"])
    adapters = [load_peft_adapter(str(tmp_path / d), SHAPES, num_layers=2) for d in "ab"]
    weights, density, method, seed = [0.7, 0.3], 0.5, "total", 9
    merged = merge_adapters(adapters, weights, strategy, density, method, seed=seed)
    assert merged.target_modules == {"q_proj", "v_proj", "down_proj", "o_proj"}
    assert len(merged.weights) == 8 and set(merged.ranks.values()) == {8}
    for key, (a, b) in merged.weights.items():
        present = [(w, t[key]) for w, t in zip(weights, (first, second)) if key in t]
        for idx, part in enumerate("AB"):
            expected = peft_merge([ab[idx] for _, ab in present], [w for w, _ in present],
                                  strategy, density, method, seed=part_seed(seed, key, part))
            torch.testing.assert_close((a, b)[idx], expected, rtol=1e-6, atol=1e-7)
    if strategy == "linear":  # q_proj: both; v_proj: the first only (its delta, weighted)
        a, b = merged.weights[(0, "v_proj")]
        a1, b1 = first[(0, "v_proj")]
        torch.testing.assert_close(b @ a, 0.7 * 0.7 * (b1 @ a1))
        pool = LoraSlotPool(2, SHAPES, num_layers=2, max_rank=8)
        pool.load(1, merged)  # a merge is loaded like any adapter
        assert pool.adapter(1) is merged
