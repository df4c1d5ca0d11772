"""The panel kernel (loraxd.worker.cpu_kernels) against F.linear: every shape a model or a
batch brings (columns not a multiple of the panel, odd inner sizes, 0 to 800 rows, bias,
3-D inputs), bit-identical rows whatever the batch, and the reasons it stands down."""
from __future__ import annotations

import os
import stat
from pathlib import Path

import pytest

torch = pytest.importorskip("torch")
F = torch.nn.functional

from loraxd.worker import cpu_kernels  # noqa: E402
from loraxd.worker.layers.linear import DenseKernel  # noqa: E402

REASON = cpu_kernels.enable()
needs_kernel = pytest.mark.skipif(REASON is not None, reason=f"no panel kernel: {REASON}")


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max().clamp_min(1e-30)).item()


@needs_kernel
@pytest.mark.parametrize("out_features,in_features", [(1, 1), (31, 17), (32, 64), (33, 576),
                                                      (960, 576), (576, 1536), (3000, 7)])
@pytest.mark.parametrize("rows", [1, 2, 7, 8, 9, 16, 33, 130])
@pytest.mark.parametrize("with_bias", [False, True])
def test_panel_agrees_with_f_linear(out_features, in_features, rows, with_bias):
    g = torch.Generator().manual_seed(out_features * 1000 + rows)
    weight = torch.randn(out_features, in_features, generator=g)
    bias = torch.randn(out_features, generator=g) if with_bias else None
    x = torch.randn(rows, in_features, generator=g)
    kernel = DenseKernel(weight, bias)
    assert kernel.panels is not None and kernel.weight is None and kernel.packed is None
    out = kernel(x)
    assert out.shape == (rows, out_features) and out.dtype == torch.float32
    assert rel_err(out, F.linear(x, weight, bias)) < 1e-5


@needs_kernel
def test_prefill_sized_and_3d_and_empty_inputs():
    g = torch.Generator().manual_seed(1)
    weight, bias = torch.randn(200, 96, generator=g), torch.randn(200, generator=g)
    kernel = DenseKernel(weight, bias)
    x = torch.randn(800, 96, generator=g)
    assert rel_err(kernel(x), F.linear(x, weight, bias)) < 1e-5
    x3 = torch.randn(2, 5, 96, generator=g)
    assert rel_err(kernel(x3), F.linear(x3, weight, bias)) < 1e-5
    assert kernel(torch.empty(0, 96)).shape == (0, 200)
    strided = torch.randn(6, 192, generator=g)[:, ::2]  # a non-contiguous view
    assert rel_err(kernel(strided), F.linear(strided, weight, bias)) < 1e-5


@needs_kernel
def test_a_row_does_not_depend_on_its_batch():
    """Each output is one k-ordered sum, so the rows of any batch are bit-identical to the
    same rows alone: a sequence's tokens do not change with who shares its step."""
    g = torch.Generator().manual_seed(2)
    for in_features in (576, 1536, 77):  # K blocks of the many-row path: whole and partial
        kernel = DenseKernel(torch.randn(500, in_features, generator=g),
                             torch.randn(500, generator=g))
        x = torch.randn(150, in_features, generator=g)  # row chunks of 64: 3
        full = kernel(x)
        for lo, hi in ((0, 1), (3, 4), (5, 13), (8, 40), (60, 130), (149, 150)):
            assert torch.equal(full[lo:hi], kernel(x[lo:hi].clone()))


@needs_kernel
@pytest.mark.parametrize("rows", [1, 8])
def test_few_rows_do_not_depend_on_the_thread_count(rows):
    """Up to 8 rows a thread reads the two halves of its panels side by side: how the
    panels are shared out (1 thread, 2, or 3 with an odd one out) must not change a bit."""
    g = torch.Generator().manual_seed(3)
    weight, bias = torch.randn(3000, 576, generator=g), torch.randn(3000, generator=g)
    kernel = DenseKernel(weight, bias)
    x = torch.randn(rows, 576, generator=g)
    threads = torch.get_num_threads()
    try:
        outs = []
        for n in (1, 2, 3):
            torch.set_num_threads(n)
            outs.append(kernel(x))
    finally:
        torch.set_num_threads(threads)
    assert torch.equal(outs[0], outs[1]) and torch.equal(outs[0], outs[2])
    assert rel_err(outs[0], F.linear(x, weight, bias)) < 1e-5


@needs_kernel
def test_bad_inputs_are_refused_with_a_reason():
    panels, bias = cpu_kernels.pack(torch.randn(40, 16), None)
    with pytest.raises(RuntimeError, match="columns"):
        cpu_kernels.panel_linear(torch.randn(2, 15), panels, bias, 40)
    with pytest.raises(RuntimeError, match="do not fit"):
        cpu_kernels.panel_linear(torch.randn(2, 16), panels, bias, 80)


@needs_kernel
def test_the_library_is_readable_by_the_service_user():
    mode = os.stat(cpu_kernels.library_path()).st_mode
    assert mode & stat.S_IROTH and mode & stat.S_IXOTH


def test_other_dtypes_and_opt_outs_keep_the_torch_paths():
    weight = torch.randn(64, 32)
    assert DenseKernel(weight.bfloat16()).panels is None
    assert DenseKernel(weight, allow_panel=False).panels is None
    assert DenseKernel(weight, allow_packed=False).panels is None


def test_no_compiler_and_no_avx512_are_reasons(monkeypatch, tmp_path):
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: {"avx2"})
    assert "AVX-512" in cpu_kernels._load(tmp_path)
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: {"avx512f"})
    monkeypatch.setenv("CXX", "/nonexistent/c++")
    assert "no C++ compiler" in cpu_kernels._load(tmp_path)
    assert not any(tmp_path.iterdir())


def test_the_library_name_follows_source_torch_and_cpu(monkeypatch, tmp_path):
    """A library built for another source, torch or CPU is never picked up."""
    compiler = cpu_kernels._compiler()
    if compiler is None:
        pytest.skip("no C++ compiler")
    name = cpu_kernels.library_name(compiler)
    assert name == cpu_kernels.library_name(compiler)
    monkeypatch.setattr(cpu_kernels, "cpu_flags", lambda: {"avx512f"})
    assert cpu_kernels.library_name(compiler) != name
    monkeypatch.undo()
    edited = tmp_path / "panel_gemm.cpp"
    edited.write_text(Path(cpu_kernels.SOURCES[0]).read_text() + "\n// edited\n")
    monkeypatch.setattr(cpu_kernels, "SOURCES", (edited,))
    assert cpu_kernels.library_name(compiler) != name
    monkeypatch.undo()
    header = tmp_path / "vec_math.h"  # an edited header the sources include
    header.write_text(Path(cpu_kernels.HEADERS[0]).read_text() + "\n// edited\n")
    monkeypatch.setattr(cpu_kernels, "HEADERS", (header,))
    assert cpu_kernels.library_name(compiler) != name
    monkeypatch.setattr(torch, "__version__", "0.0.0")
    assert cpu_kernels.library_name(compiler) != name


@needs_kernel
@pytest.mark.parametrize("out_features,in_features", [(1, 16), (33, 48), (960, 576), (70, 1536)])
@pytest.mark.parametrize("rows", [1, 8, 9, 33, 300])
def test_int8_panels_agree_with_the_dequantized_weight(out_features, in_features, rows):
    from loraxd.worker.layers.quantized import quantize_per_channel
    g = torch.Generator().manual_seed(out_features + rows)
    q, scales = quantize_per_channel(torch.randn(out_features, in_features, generator=g))
    bias = torch.randn(out_features, generator=g)
    x = torch.randn(rows, in_features, generator=g)
    panels = cpu_kernels.pack_int8(q, scales, bias)
    assert panels[0].dtype == torch.int8
    assert torch.equal(cpu_kernels.unpanel(panels[0], out_features), q)
    y = cpu_kernels.panel_linear_int8(x, *panels, out_features)
    reference = x @ (q.float() * scales.float()[:, None]).T + bias
    assert rel_err(y, reference) < 1e-5
    assert torch.equal(y[rows // 2:rows // 2 + 1],
                       cpu_kernels.panel_linear_int8(x[rows // 2:rows // 2 + 1], *panels,
                                                     out_features))


@needs_kernel
def test_int8_panels_refuse_fp32_panels_and_bad_scales():
    from loraxd.worker.layers.quantized import quantize_per_channel
    q, scales = quantize_per_channel(torch.randn(40, 16))
    panels, s, b = cpu_kernels.pack_int8(q, scales, None)
    with pytest.raises(RuntimeError, match="int8"):
        cpu_kernels.panel_linear_int8(torch.randn(2, 16), panels.float(), s, b, 40)
    with pytest.raises(RuntimeError, match="scales"):
        cpu_kernels.panel_linear_int8(torch.randn(2, 16), panels, s[:32], b, 40)
