"""DenseKernel (oneDNN-prepacked where available) against F.linear, and the parallel
layers' weight slicing at world size 2 against the unsharded product."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from loraxd.worker.layers.linear import (ColumnParallelLinear, DenseKernel,  # noqa: E402
                                         RowParallelLinear, packed_ops_available)


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


@pytest.mark.parametrize("num_tokens", [1, 8, 37, 500])  # far from the batch hint too
@pytest.mark.parametrize("with_bias", [False, True])
def test_packed_agrees_with_f_linear_fp32(num_tokens, with_bias):
    g = torch.Generator().manual_seed(num_tokens)
    weight = torch.randn(384, 160, generator=g)
    bias = torch.randn(384, generator=g) if with_bias else None
    x = torch.randn(num_tokens, 160, generator=g)
    kernel = DenseKernel(weight, bias, allow_panel=False)
    if packed_ops_available():
        assert kernel.packed is not None and kernel.weight is None
    with torch.inference_mode():
        assert rel_err(kernel(x), F.linear(x, weight, bias)) < 1e-5


def test_packed_agrees_with_f_linear_bf16():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(256, 128, generator=g).bfloat16()
    x = torch.randn(8, 128, generator=g).bfloat16()
    out = DenseKernel(weight)(x)
    assert out.dtype == torch.bfloat16
    assert rel_err(out, F.linear(x.float(), weight.float())) < 2e-2


def test_fallback_is_plain_f_linear():
    weight, x = torch.randn(64, 32), torch.randn(5, 32)
    kernel = DenseKernel(weight, allow_packed=False)
    assert kernel.packed is None
    assert torch.equal(kernel(x), F.linear(x, weight))
    half = DenseKernel(weight.half())  # no packed fp16 path: falls back
    assert half(x.half()).dtype == torch.float16


def test_column_parallel_shards_concatenate_to_the_full_output():
    """A fused [q | k | v] split over 2 ranks: each rank holds its slice of every part."""
    sizes, hidden = [8, 4, 4], 6
    parts = [torch.randn(size, hidden) for size in sizes]
    biases = [torch.randn(size) for size in sizes]
    x = torch.randn(3, hidden)
    full = [F.linear(x, w, b) for w, b in zip(parts, biases)]
    outs = []
    for rank in range(2):
        layer = ColumnParallelLinear(hidden, sizes, bias=True, rank=rank, world_size=2)
        for shard, (w, b) in enumerate(zip(parts, biases)):
            layer.load_weight(w, shard)
            layer.load_bias(b, shard)
        layer.finalize()
        outs.append(layer.forward(x).split([s // 2 for s in sizes], -1))
    for shard, expected in enumerate(full):
        got = torch.cat([outs[0][shard], outs[1][shard]], -1)
        assert rel_err(got, expected) < 1e-5


def test_row_parallel_shards_sum_to_the_full_output():
    weight, bias, x = torch.randn(5, 8), torch.randn(5), torch.randn(3, 8)
    partials = []
    for rank in range(2):
        layer = RowParallelLinear(8, 5, bias=True, rank=rank, world_size=2,
                                  all_reduce=lambda y: y)  # the sum is done below
        layer.load_weight(weight)
        layer.load_bias(bias)
        layer.finalize()
        partials.append(layer.kernel(x[:, rank * 4:(rank + 1) * 4]))
    assert rel_err(partials[0] + partials[1] + bias, F.linear(x, weight, bias)) < 1e-5


def test_lora_hook_sees_input_and_output():
    calls = []

    class Lora:
        def apply(self, layer_idx, group, x, y):
            calls.append((layer_idx, group, tuple(x.shape), tuple(y.shape)))
            y += 1.0

    class Ctx:
        lora = Lora()

    layer = RowParallelLinear(8, 4, layer_idx=3, group="down")
    layer.load_weight(torch.randn(4, 8))
    layer.finalize()
    x = torch.randn(2, 8)
    base = layer.forward(x)
    out = layer.forward(x, Ctx())
    assert calls == [(3, "down", (2, 8), (2, 4))]
    assert torch.allclose(out, base + 1.0)
    Ctx.lora = None
    assert torch.equal(layer.forward(x, Ctx()), base)


def test_the_packed_op_sees_only_bucketed_row_counts(monkeypatch):
    """oneDNN keeps state per input shape (GBs over every row count a server meets): the
    packed path pads a batch to a bucket and cuts long inputs into pieces; results are
    those of F.linear."""
    import loraxd.worker.layers.linear as linear
    if not linear.packed_ops_available():
        pytest.skip("this torch has no oneDNN packed linear")
    seen = set()
    real = linear.packed_linear

    def spy(x, packed, bias):
        seen.add(x.shape[0])
        return real(x, packed, bias)
    monkeypatch.setattr(linear, "packed_linear", spy)
    gen = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(48, 32, generator=gen), torch.randn(48, generator=gen)
    kernel = linear.DenseKernel(weight, bias, allow_panel=False)
    assert kernel.packed is not None
    for rows in (1, 3, 9, 100, 129, 513, 1300):
        x = torch.randn(rows, 32, generator=gen)
        torch.testing.assert_close(kernel(x), torch.nn.functional.linear(x, weight, bias),
                                   rtol=1e-5, atol=1e-5)
    x3 = torch.randn(2, 5, 32, generator=gen)
    assert kernel(x3).shape == (2, 5, 48)
    assert seen <= set(linear.ROW_BUCKETS), seen
