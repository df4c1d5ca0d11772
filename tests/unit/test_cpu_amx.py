"""The AMX kernels (cpu_kernels/amx_gemm.cpp for bf16, amx_int8.cpp for int8 weight-only)
against exact references: every row count from decode to prefill, bias or none, rows that
do not depend on their batch, non-finite rows, the tile layout's round trip, and the shapes
and CPUs where the layers keep their other kernels. Skipped on a CPU without AMX."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from loraxd.worker import cpu_kernels  # noqa: E402
from loraxd.worker.layers.linear import DenseKernel  # noqa: E402
from loraxd.worker.layers.quantized import (Int8WeightOnlyKernel, dequantize,  # noqa: E402
                                            quantize_per_channel)

_REASON = cpu_kernels.enable()
pytestmark = pytest.mark.skipif(_REASON is not None or not cpu_kernels.amx_usable(True),
                                reason=f"no AMX kernels here: {_REASON or 'no AMX'}")
ROWS = [1, 2, 8, 15, 16, 17, 32, 33, 64, 130]
SHAPES = [(16, 64), (48, 128), (960, 576), (576, 1536)]  # (out, in)


def rel_err(a, b) -> float:
    return ((a.double() - b.double()).abs().max() / b.double().abs().max()).item()


def int8_reference(kernel: Int8WeightOnlyKernel, x: torch.Tensor) -> torch.Tensor:
    y = x.double() @ dequantize(kernel.qweight, kernel.scales).double().T
    return y if kernel.bias is None else y + kernel.bias.double()


@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("with_bias", [False, True])
def test_bf16_is_the_fp32_product_of_the_bf16_values_rounded_once(out_features, in_features,
                                                                   rows, with_bias):
    g = torch.Generator().manual_seed(out_features + rows)
    weight = torch.randn(out_features, in_features, generator=g).bfloat16()
    bias = torch.randn(out_features, generator=g).bfloat16() if with_bias else None
    x = torch.randn(rows, in_features, generator=g).bfloat16()
    kernel = DenseKernel(weight, bias)
    assert kernel.amx is not None and kernel.packed is None and kernel.weight is None
    y = kernel(x)
    assert y.dtype == torch.bfloat16 and y.shape == (rows, out_features)
    want = F.linear(x.double(), weight.double(), None if bias is None else bias.double())
    assert ((y.double() - want).abs() <= want.abs() * 2 ** -8 + 1e-3).all()  # bf16's rounding


@pytest.mark.parametrize("out_features,in_features", SHAPES)
@pytest.mark.parametrize("rows", ROWS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_int8_sums_the_unrounded_input_against_the_int8_weight(out_features, in_features,
                                                               rows, dtype):
    g = torch.Generator().manual_seed(out_features * 7 + rows)
    weight = torch.randn(out_features, in_features, generator=g) * 0.05
    bias = torch.randn(out_features, generator=g)
    # a row's values over six decades: the small ones must not be lost beside the large
    x = torch.randn(rows, in_features, generator=g) * torch.logspace(-3, 3, in_features)
    kernel = Int8WeightOnlyKernel(weight.to(dtype), bias.to(dtype))
    assert kernel.amx is not None and kernel.panels is None
    y = kernel(x.to(dtype))
    assert y.dtype == dtype and y.shape == (rows, out_features)
    want = int8_reference(kernel, x.to(dtype))
    assert rel_err(y, want) < (1e-6 if dtype == torch.float32 else 8e-3)


def test_int8_takes_inputs_at_both_ends_of_its_integer_range():
    """x is offset to X + 2^23 and split into unsigned bytes: a row's largest value of
    either sign (X = +-(2^23 - 1), bytes 255 or 0 at the top) must come out as exactly."""
    g = torch.Generator().manual_seed(11)
    kernel = Int8WeightOnlyKernel(torch.randn(48, 128, generator=g))
    top = 8 * (1 - 2 ** -24)  # just below a power of two: X rounds to the clamp
    x = torch.randn(6, 128, generator=g) * 1e-3
    x[0, 0], x[1, 5], x[2, :] = top, -top, torch.tensor([top, -top]).repeat(64)
    x[3, 7], x[4, 0], x[5, 9] = 2.0, -2.0, 1.0  # exact powers of two: X = 2^22
    assert rel_err(kernel(x), int8_reference(kernel, x)) < 1e-6


@pytest.mark.parametrize("kind", ["bf16", "int8"])
def test_a_row_does_not_depend_on_its_batch(kind):
    g = torch.Generator().manual_seed(5)
    weight = torch.randn(960, 576, generator=g)
    if kind == "bf16":
        kernel, x = DenseKernel(weight.bfloat16()), torch.randn(70, 576, generator=g).bfloat16()
    else:
        kernel, x = Int8WeightOnlyKernel(weight), torch.randn(70, 576, generator=g)
    batch = kernel(x)
    for lo, hi in [(0, 1), (3, 4), (16, 17), (5, 38), (40, 70)]:
        assert torch.equal(kernel(x[lo:hi]), batch[lo:hi])


def test_a_non_finite_row_gives_nan_and_leaves_the_others():
    g = torch.Generator().manual_seed(2)
    kernel = Int8WeightOnlyKernel(torch.randn(32, 64, generator=g))
    x = torch.randn(4, 64, generator=g)
    clean = kernel(x)
    x[1, 3], x[2, 0] = float("nan"), float("inf")
    y = kernel(x)
    assert y[1:3].isnan().all()
    assert torch.equal(y[[0, 3]], clean[[0, 3]])
    assert torch.equal(kernel(torch.zeros(2, 64)), torch.zeros(2, 32))


def test_the_tiles_hold_the_weight():
    g = torch.Generator().manual_seed(3)
    dense = torch.randn(48, 128, generator=g).bfloat16()
    assert torch.equal(cpu_kernels.amx_untile(cpu_kernels.amx_tiles(dense)), dense)
    weight = torch.randn(48, 128, generator=g)
    q, scales = quantize_per_channel(weight)
    kernel = Int8WeightOnlyKernel(weight)
    assert torch.equal(kernel.qweight, q) and torch.equal(kernel.scales, scales)
    assert kernel.num_bytes == 48 * 128 + 48 * 2


def test_shapes_the_tiles_do_not_take_keep_the_other_kernels():
    for weight in (torch.randn(40, 64), torch.randn(32, 48)):  # not whole tiles, rows or columns
        kernel = DenseKernel(weight.bfloat16())
        assert kernel.amx is None
        x = torch.randn(3, weight.shape[1]).bfloat16()
        assert rel_err(kernel(x), F.linear(x.float(), weight.bfloat16().float())) < 1e-2
    int8 = Int8WeightOnlyKernel(torch.randn(32, 96))  # 96 columns: not a 64-wide tile row
    assert int8.amx is None and int8.panels is not None


def test_switched_off_the_layers_keep_the_other_kernels(monkeypatch):
    monkeypatch.setattr(cpu_kernels, "AMX_ENABLED", False)
    assert DenseKernel(torch.randn(32, 64).bfloat16()).amx is None
    assert Int8WeightOnlyKernel(torch.randn(32, 64)).amx is None
