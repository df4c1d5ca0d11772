"""int8 weight-only linears against the dequantized reference, per-channel quantization, and
the CPU checks that refuse bf16 where it would be emulated."""
from __future__ import annotations

import pytest

torch = pytest.importorskip("torch")

from loraxd.config.tree import QUANTIZE_METHODS as CONFIG_METHODS  # noqa: E402
from loraxd.worker import cpu_kernels  # noqa: E402
from loraxd.worker.layers import quantized  # noqa: E402
from loraxd.worker.layers.linear import ColumnParallelLinear, RowParallelLinear  # noqa: E402
from loraxd.worker.layers.quantized import (GEMV_ROWS, Int8WeightOnlyKernel,  # noqa: E402
                                            cpu_bf16_problem, cpu_flags, dequantize,
                                            precision_problem, quantize_per_channel)


def reference(kernel: Int8WeightOnlyKernel, x: torch.Tensor) -> torch.Tensor:
    """fp32 product of the kernel's input (bf16-rounded on torch's path, as it is there)
    and its dequantized weight."""
    ours = kernel.panels is not None or kernel.amx is not None
    x = x.float() if ours else x.bfloat16().float()
    y = x @ dequantize(kernel.qweight, kernel.scales).T
    return y if kernel.bias is None else y + kernel.bias.float()


def rel_err(a, b) -> float:
    return ((a.float() - b.float()).abs().max() / b.float().abs().max()).item()


def test_per_channel_quantization_is_symmetric_and_within_half_a_step():
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(48, 64, generator=g) * torch.logspace(-3, 1, 48)[:, None]
    q, scales = quantize_per_channel(weight)
    assert q.dtype == torch.int8 and scales.dtype == torch.bfloat16 and q.is_contiguous()
    assert q.abs().max() <= 127
    assert (q.abs().amax(dim=1) >= 126).all()  # each row uses its whole range
    step = scales.float()[:, None]
    assert ((dequantize(q, scales) - weight).abs() <= step / 2 * 1.01).all()


@pytest.mark.parametrize("rows", [1, 3, 8, GEMV_ROWS, GEMV_ROWS + 1, 37, 300])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("allow_panel", [True, False])  # our kernel where built, else torch's
def test_kernel_agrees_with_the_dequantized_reference(rows, dtype, allow_panel):
    g = torch.Generator().manual_seed(rows)
    weight = (torch.randn(96, 160, generator=g) * 0.05).to(dtype)
    bias = torch.randn(96, generator=g).to(dtype)
    kernel = Int8WeightOnlyKernel(weight, bias, allow_panel=allow_panel)
    assert (kernel.panels is not None) == (allow_panel and cpu_kernels.available())
    assert kernel.weight is None and kernel.num_bytes == 96 * 160 + 96 * 2 + 96 * bias.itemsize
    x = torch.randn(rows, 160, generator=g).to(dtype)
    with torch.inference_mode():
        y = kernel(x)
    assert y.dtype == dtype and y.shape == (rows, 96)
    assert rel_err(y, reference(kernel, x)) < 1e-2  # bf16 outputs: a few 1e-3
    if kernel.panels is not None and dtype == torch.float32:  # fp32 in, fp32 out, unrounded
        assert rel_err(y, reference(kernel, x)) < 1e-5
    # and the quantized layer is still the layer: close to the dense product
    assert rel_err(y, x.float() @ weight.float().T + bias.float()) < 3e-2


def test_views_and_batched_shapes_reach_the_kernel_aligned():
    g = torch.Generator().manual_seed(1)
    kernel = Int8WeightOnlyKernel(torch.randn(32, 64, generator=g))
    wide = torch.randn(5, 64 + 8, generator=g)
    for x in (wide[:, 8:], wide.bfloat16()[:, 8:], wide[:, :64].contiguous()[1:]):
        assert rel_err(kernel(x), reference(kernel, x)) < 1e-2
    x3 = torch.randn(2, 3, 64, generator=g)
    assert torch.equal(kernel(x3), kernel(x3.reshape(6, 64)).reshape(2, 3, 32))
    assert kernel(torch.randn(0, 64)).shape == (0, 32)


def test_shapes_and_devices_the_kernel_cannot_take_are_refused():
    with pytest.raises(ValueError, match="multiples of 16; a linear of this model has 40"):
        Int8WeightOnlyKernel(torch.randn(8, 40))
    with pytest.raises(ValueError, match="built for CPUs only, not meta"):
        Int8WeightOnlyKernel(torch.empty(8, 64, device="meta"))


def test_layers_quantize_their_own_shard():
    weight, x = torch.randn(64, 96), torch.randn(3, 96)
    column = ColumnParallelLinear(96, [32, 32], rank=1, world_size=2)
    column.load_weight(weight[:32], 0)
    column.load_weight(weight[32:], 1)
    column.finalize(quantize="int8-weight-only")
    assert isinstance(column.kernel, Int8WeightOnlyKernel)
    rows = torch.cat([weight[16:32], weight[48:]])  # rank 1's half of each part
    assert rel_err(column.forward(x), x @ rows.T) < 3e-2
    row = RowParallelLinear(96, 64, rank=0, world_size=2)
    row.load_weight(weight)
    row.finalize(quantize="int8-weight-only")
    assert row.kernel.in_features == 48
    assert rel_err(row.forward(x[:, :48]), x[:, :48] @ weight[:, :48].T) < 3e-2
    with pytest.raises(ValueError, match="'gptq' is not built"):
        ColumnParallelLinear(96, [32]).finalize(quantize="gptq")


def test_row_parallel_shards_are_slices_of_the_whole_quantized_weight():
    weight = torch.randn(8, 64) * torch.linspace(0.1, 2, 64)  # row maxima in the 2nd half
    whole = Int8WeightOnlyKernel(weight)
    shards = []
    for rank in range(2):
        layer = RowParallelLinear(64, 8, rank=rank, world_size=2, all_reduce=lambda y: y)
        layer.load_weight(weight)
        layer.finalize(quantize="int8-weight-only")
        shards.append(layer.kernel)
        assert torch.equal(layer.kernel.scales, whole.scales)
    assert torch.equal(torch.cat([k.qweight for k in shards], 1), whole.qweight)


def test_the_worker_builds_what_the_config_accepts():
    assert quantized.QUANTIZE_METHODS == CONFIG_METHODS


def test_cpu_flags_are_read_from_cpuinfo(tmp_path):
    info = tmp_path / "cpuinfo"
    info.write_text("processor\t: 0\nflags\t\t: fpu avx512f avx512_bf16 amx_tile\n\n"
                    "processor\t: 1\nflags\t\t: fpu\n")
    assert cpu_flags(str(info)) == {"fpu", "avx512f", "avx512_bf16", "amx_tile"}
    info.write_text("processor\t: 0\nFeatures\t: fp asimd bf16\n")
    assert cpu_flags(str(info)) == {"fp", "asimd", "bf16"}
    assert cpu_flags(str(tmp_path / "missing")) is None


@pytest.mark.parametrize("flags, machine, fast", [
    ({"avx512f", "avx512_bf16"}, "x86_64", True),
    ({"avx512f", "amx_tile", "amx_bf16"}, "x86_64", True),
    ({"avx2", "avx512f", "avx512_vnni"}, "x86_64", False),  # AVX512 without BF16
    ({"asimd", "bf16"}, "aarch64", True),
    ({"asimd"}, "aarch64", False),
    (set(), "riscv64", False),
])
def test_bf16_needs_bf16_instructions(flags, machine, fast):
    problem = cpu_bf16_problem(flags, machine)
    assert (problem is None) == fast
    if not fast:
        assert "bf16" in problem and "\n" not in problem


def test_precision_problems_name_the_setting_and_the_cure():
    cpu, cuda = torch.device("cpu"), torch.device("cuda")
    slow = lambda: "this CPU has no BF16"  # noqa: E731
    fast = lambda: None  # noqa: E731
    assert precision_problem(torch.float32, None, cpu, slow) is None  # the default never
    assert precision_problem(torch.bfloat16, None, cpu, fast) is None
    assert precision_problem(torch.bfloat16, None, cuda, slow) is None
    assert precision_problem(torch.bfloat16, None, cpu, slow) == (
        "--dtype bfloat16 on this CPU: this CPU has no BF16; use --dtype float32 without "
        "--quantize")
    assert precision_problem(torch.float32, "int8-weight-only", cpu, slow).startswith(
        "--quantize int8-weight-only (bf16 matmuls) on this CPU: this CPU has no BF16")
    assert precision_problem(torch.float32, "int8-weight-only", cpu, fast) is None
    assert precision_problem(torch.bfloat16, "int8-weight-only", cuda, fast) == (
        "--quantize int8-weight-only is built for CPUs only, not cuda")
    assert "'awq' is not built" in precision_problem(torch.float32, "awq", cpu, fast)
