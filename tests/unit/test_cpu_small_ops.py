"""The fused small ops (cpu_kernels/small_ops.cpp) against the layers' torch code they
replace: RMSNorm with and without the residual (fp32 and bf16, Llama's and Gemma's weight,
per-head q/k norms in place), silu(gate) * up, rotary with the K/V cache write; shapes of 0,
1 and many rows, head sizes not a multiple of the vector, strided views into qkv; a row's
result never depends on the other rows of its call."""
from __future__ import annotations

from types import SimpleNamespace

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from loraxd.worker import cpu_kernels  # noqa: E402
from loraxd.worker.cpu_kernels import small_ops  # noqa: E402
from loraxd.worker.kv_cache import PagedKVCache  # noqa: E402
from loraxd.worker.layers.attention import PagedAttention  # noqa: E402
from loraxd.worker.layers.norm import RMSNorm  # noqa: E402
from loraxd.worker.layers.rotary import apply_rotary  # noqa: E402
from loraxd.worker.models.decoder import ACTIVATIONS, gated_activation  # noqa: E402

REASON = cpu_kernels.enable()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"no CPU kernels: {REASON}")
DTYPES = [torch.float32, torch.bfloat16]


def torch_path(monkeypatch, fn):
    with monkeypatch.context() as patch:
        patch.setattr(small_ops, "ENABLED", False)
        return fn()


def assert_close(got, expected, dtype):
    assert got.dtype == expected.dtype and got.shape == expected.shape
    if dtype == torch.bfloat16:  # every step rounds as torch's; the norm's sum is finer
        torch.testing.assert_close(got.float(), expected.float(), rtol=8e-3, atol=1e-6)
    else:  # a few ulps: the variance is summed in another order (in double)
        torch.testing.assert_close(got, expected, rtol=1e-6, atol=1e-7)


def make_norm(size, dtype, offset, seed=0):
    g = torch.Generator().manual_seed(seed)
    norm = RMSNorm(size, 1e-6, dtype=dtype, offset=offset)
    norm.load(torch.randn(size, generator=g).to(dtype))
    return norm


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("with_residual", [False, True])
@pytest.mark.parametrize("rows,size", [(0, 576), (1, 576), (8, 576), (33, 960), (5, 7),
                                       (3, 80), (300, 64)])
def test_rms_norm_matches_torch(dtype, offset, with_residual, rows, size, monkeypatch):
    norm = make_norm(size, dtype, offset)
    g = torch.Generator().manual_seed(rows * 7 + size)
    x = (torch.randn(rows, size, generator=g) * 3).to(dtype)
    residual = torch.randn(rows, size, generator=g).to(dtype) if with_residual else None
    expected, expected_sum = torch_path(monkeypatch, lambda: norm.forward(x, residual))
    got, got_sum = norm.forward(x, residual)
    assert_close(got, expected, dtype)
    assert torch.equal(got_sum, expected_sum)  # one rounded add: bit for bit
    if residual is None:
        assert got_sum is x


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("offset", [0.0, 1.0])
@pytest.mark.parametrize("head_dim", [64, 128, 80])
def test_per_head_norms_in_place_on_strided_views(dtype, offset, head_dim, monkeypatch):
    """q/k norms: a [tokens, heads, head_dim] view into qkv, normed where it lies; the
    rest of qkv untouched."""
    heads, kv_heads, tokens = 4, 2, 6
    q_norm, k_norm = make_norm(head_dim, dtype, offset, 1), make_norm(head_dim, dtype, offset, 2)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim).to(dtype)
    q_cols = slice(0, heads * head_dim)
    k_cols = slice(heads * head_dim, (heads + kv_heads) * head_dim)

    def run():
        out = qkv.clone()
        q_norm.norm_(out[:, q_cols].view(tokens, heads, head_dim))
        k_norm.norm_(out[:, k_cols].view(tokens, kv_heads, head_dim))
        return out

    expected = torch_path(monkeypatch, run)
    got = run()
    assert_close(got, expected, dtype)
    v_cols = slice((heads + kv_heads) * head_dim, None)
    assert torch.equal(got[:, v_cols], qkv[:, v_cols])
    # not in place: a 3-D input gives a new tensor, as the torch path
    x = qkv[:, q_cols].view(tokens, heads, head_dim)
    expected3 = torch_path(monkeypatch, lambda: q_norm.forward(x)[0])
    assert_close(q_norm.forward(x)[0], expected3, dtype)


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
def test_a_row_does_not_depend_on_its_batch(dtype):
    g = torch.Generator().manual_seed(3)
    norm = make_norm(576, dtype, 0.0)
    x = torch.randn(40, 576, generator=g).to(dtype)
    r = torch.randn(40, 576, generator=g).to(dtype)
    gate_up = torch.randn(40, 2 * 1536, generator=g).to(dtype)
    full, full_sum = norm.forward(x, r)
    full_act = small_ops.silu_mul(gate_up)
    for lo, hi in ((0, 1), (3, 4), (5, 13), (8, 40)):
        part, part_sum = norm.forward(x[lo:hi].clone(), r[lo:hi].clone())
        assert torch.equal(full[lo:hi], part) and torch.equal(full_sum[lo:hi], part_sum)
        assert torch.equal(full_act[lo:hi], small_ops.silu_mul(gate_up[lo:hi].clone()))
    big = torch.randn(4096, 576, generator=g).to(dtype)  # enough rows to go to threads
    whole = norm.forward(big)[0]
    assert torch.equal(whole[4000:4008], norm.forward(big[4000:4008].clone())[0])


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("rows,inter", [(0, 64), (1, 1536), (8, 1536), (9, 100), (3, 7)])
def test_silu_mul_matches_torch(dtype, rows, inter):
    g = torch.Generator().manual_seed(rows + inter)
    gate_up = (torch.randn(rows, 2 * inter, generator=g) * 4).to(dtype)
    if inter >= 3 and rows:  # the ends of the range and 0
        gate_up[0, :3] = torch.tensor([-100.0, 100.0, 0.0]).to(dtype)
    expected = F.silu(gate_up[:, :inter]).mul_(gate_up[:, inter:])
    got = small_ops.silu_mul(gate_up)
    if dtype == torch.bfloat16:  # silu's last fp32 bits can move its bf16 rounding
        torch.testing.assert_close(got.float(), expected.float(), rtol=8e-3, atol=1e-30)
    else:
        torch.testing.assert_close(got, expected, rtol=4e-7, atol=1e-30)
    wide = torch.randn(4, 2 * inter + 6, generator=g).to(dtype)[:, 3:-3]  # strided rows
    torch.testing.assert_close(small_ops.silu_mul(wide).float(),
                               F.silu(wide[:, :inter]).mul(wide[:, inter:]).float(),
                               rtol=8e-3, atol=1e-30)


def rope_tables(tokens, head_dim, dtype, seed):
    g = torch.Generator().manual_seed(seed)
    angle = torch.randn(tokens, head_dim // 2, generator=g) * 10
    cos, sin = angle.cos(), angle.sin()
    return (torch.cat((cos, cos), -1).to(dtype)[:, None],
            torch.cat((-sin, sin), -1).to(dtype)[:, None])


@needs_kernel
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("head_dim", [64, 128, 80, 96])
@pytest.mark.parametrize("tokens", [0, 1, 7, 300])
def test_rotary_and_cache_write_match_torch(dtype, head_dim, tokens, monkeypatch):
    """Bit for bit: the rotated q and k, and the cache the step's K/V land in."""
    heads, kv_heads, block = 6, 2, 16
    g = torch.Generator().manual_seed(tokens + head_dim)
    qkv = torch.randn(tokens, (heads + 2 * kv_heads) * head_dim, generator=g).to(dtype)
    cos, sin = rope_tables(tokens, head_dim, dtype, tokens)
    slots = torch.randperm(40 * block, generator=g)[:tokens]

    attention = PagedAttention(0, heads, kv_heads, head_dim, scale=1.0)
    ctx = SimpleNamespace(rope={"full_attention": (cos, sin)}, slot_mapping=slots)

    def run():  # the layer's own step: rotate q and k, write K/V
        cache = PagedKVCache(1, 40, block, kv_heads, head_dim, dtype=dtype, device="cpu")
        out = qkv.clone()
        attention._rotate_and_cache(out, ctx, cache)
        return out, cache.data

    expected, expected_cache = torch_path(monkeypatch, run)
    got, got_cache = run()
    assert torch.equal(got, expected) and torch.equal(got_cache, expected_cache)
    # without the cache: only the rotation, on a qkv whose rows have a wider stride
    wide = torch.randn(tokens, qkv.shape[1] + 32, generator=g).to(dtype)[:, 16:-16]
    ref = wide.clone()
    apply_rotary(ref[:, :(heads + kv_heads) * head_dim].view(tokens, heads + kv_heads, head_dim),
                 cos, sin)
    small_ops.rotary_(wide, heads, kv_heads, head_dim, cos, sin)
    assert torch.equal(wide, ref)


@needs_kernel
def test_bad_inputs_are_refused_with_a_reason():
    qkv = torch.randn(2, 10 * 64)
    cos, sin = rope_tables(2, 64, torch.float32, 0)
    cache = torch.zeros(8, 2, 2, 64)
    with pytest.raises(RuntimeError, match="outside the cache"):
        small_ops.rotary_(qkv, 6, 2, 64, cos, sin, cache, torch.tensor([0, 8]))
    with pytest.raises(RuntimeError, match="cos and sin"):
        small_ops.rotary_(qkv, 6, 2, 64, cos.bfloat16(), sin.bfloat16())
    with pytest.raises(RuntimeError, match="weight"):
        small_ops.rms_norm(torch.randn(2, 8), None, torch.ones(7), 1e-6)
    with pytest.raises(RuntimeError, match="gate_up"):
        small_ops.silu_mul(torch.randn(2, 7))


def test_other_devices_dtypes_and_activations_keep_the_torch_code(monkeypatch):
    assert not small_ops.covers(torch.randn(2, 4, dtype=torch.float16))
    assert not small_ops.covers(torch.randn(4, 2).t())  # last dimension strided
    monkeypatch.setattr(small_ops, "ENABLED", False)
    assert not small_ops.covers(torch.randn(2, 4))
    monkeypatch.setattr(small_ops, "ENABLED", True)
    monkeypatch.setattr(cpu_kernels, "enable", lambda *a: "no library")
    assert not small_ops.covers(torch.randn(2, 4))


@needs_kernel
@pytest.mark.parametrize("name", sorted(ACTIVATIONS))
def test_the_decoder_fuses_silu_only(name, monkeypatch):
    g = torch.Generator().manual_seed(5)
    act = ACTIVATIONS[name]
    gate_up = torch.randn(8, 2 * 96, generator=g)
    expected = torch_path(monkeypatch, lambda: gated_activation(act, gate_up, 96))
    assert torch.equal(expected, act(gate_up[:, :96]) * gate_up[:, 96:])
    got = gated_activation(act, gate_up, 96)
    if name == "silu":  # the kernel: its own e^x, a few ulps off torch's
        assert torch.equal(got, small_ops.silu_mul(gate_up))
        torch.testing.assert_close(got, expected, rtol=4e-7, atol=1e-30)
    else:  # the gelu variants: torch, bit for bit
        assert torch.equal(got, expected)
