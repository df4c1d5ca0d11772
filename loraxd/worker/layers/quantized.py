"""Lower precision on a CPU: what the CPU must have for it, and int8 weight-only linears.

`--dtype bfloat16` and `--quantize int8-weight-only` are refused at start on a CPU without
bf16 instructions (x86: AVX512_BF16 or AMX-BF16; Arm: BF16): there oneDNN emulates bf16
matmuls, slower than fp32, and a setting meant to speed things up must not slow them down.

`Int8WeightOnlyKernel`: the weight is quantized once, at load, symmetric per output channel
(w ≈ scale[n] * q[n, k], q in [-127, 127]); activations keep the model dtype between layers.
* On a CPU with AMX-INT8 and our kernels, int8 tiles at any row count (cpu_kernels'
  amx_int8.cpp): each row of x is written as a 24-bit integer times a power of two (its
  largest value keeps every bit of an fp32) and summed against q in exact integer
  arithmetic; the scales multiply once. 2-4x the panels below from 8 to 256 rows.
* On a CPU with our kernels (loraxd.worker.cpu_kernels) but no AMX (or a layer whose
  shape the tiles do not take), int8 panels at any row count:
  each int8 weight is read once per call and widened in registers, the scales multiply
  the fp32 sums of the fp32 input (an fp32 model's activations are not rounded), and one
  kernel for every row count means a row's numbers never depend on its batch.
Without them the product runs on bf16 inputs with fp32 accumulation, whatever the model
dtype (an fp32 model's linear inputs are rounded to bf16, its outputs are fp32 again):
* up to `GEMV_ROWS` rows (decode), `aten._weight_int8pack_mm`, which reads the int8 weight
  and applies the scales itself: half the bytes of a bf16 weight, a quarter of fp32;
* more rows (prefill), the weight dequantized to fp32 for one fp32 matmul: that kernel
  re-reads the weight once per 4 rows, so beyond a few dozen rows a conversion is cheaper.
  fp32, not bf16, because it is then the same arithmetic as the int8 kernel's (bf16 inputs,
  fp32 weights = q * scale, fp32 sums, one rounding to bf16): a sequence gets the same
  numbers whichever path the size of its batch picks. A bf16 matmul would round twice.
Scales are rounded to bf16 before quantizing, so the kernel's bf16 scales are exact.
"""
from __future__ import annotations

import platform

import torch
import torch.nn.functional as F

from loraxd.worker import cpu_kernels
from loraxd.worker.cpu_kernels import cpu_flags

INT8_WEIGHT_ONLY = "int8-weight-only"
QUANTIZE_METHODS = (INT8_WEIGHT_ONLY,)
GEMV_ROWS = 32  # rows up to which the int8 kernel beats dequantize-then-matmul (see README)
K_MULTIPLE = 16  # the int8 kernel steps through K 16 values at a time, aligned
_ALIGN = 64
AMX_INPUTS = (torch.float32, torch.bfloat16)  # what the AMX kernel takes as it is


def cpu_bf16_problem(flags: set[str] | None = None, machine: str | None = None) -> str | None:
    """Why this CPU has no fast bf16 matmuls, or None when it has them."""
    machine = (machine or platform.machine()).lower()
    flags = cpu_flags() if flags is None else flags
    if machine in ("x86_64", "amd64", "i686"):
        wanted = {"avx512_bf16", "amx_bf16"}
        if flags is None:  # no /proc/cpuinfo: ask torch (AMX implies AMX-BF16 on x86)
            ok = torch.cpu._is_avx512_bf16_supported() or torch.cpu._is_amx_tile_supported()
        else:
            ok = bool(flags & wanted)
        return None if ok else ("this CPU has neither AVX512_BF16 nor AMX-BF16, so bf16 "
                                "matmuls would be emulated, slower than float32")
    if machine in ("aarch64", "arm64"):
        if flags is not None and "bf16" in flags:
            return None
        return "this CPU has no BF16 instructions, so bf16 matmuls would be slower than float32"
    return f"bf16 matmuls are not known to be fast on {machine} CPUs"


def precision_problem(dtype: torch.dtype, quantize: str | None, device: torch.device,
                      bf16_problem=cpu_bf16_problem) -> str | None:
    """Why a worker must not start with this dtype and quantization on `device`, or None."""
    if quantize is not None and quantize not in QUANTIZE_METHODS:
        return f"quantize {quantize!r} is not built; built: {', '.join(QUANTIZE_METHODS)}"
    if quantize is not None and device.type != "cpu":
        return f"--quantize {quantize} is built for CPUs only, not {device.type}"
    if device.type != "cpu" or (dtype != torch.bfloat16 and quantize is None):
        return None
    problem = bf16_problem()
    if problem is None:
        return None
    what = "--dtype bfloat16" if quantize is None else f"--quantize {quantize} (bf16 matmuls)"
    return f"{what} on this CPU: {problem}; use --dtype float32 without --quantize"


def quantize_per_channel(weight: torch.Tensor, amax: torch.Tensor | None = None
                         ) -> tuple[torch.Tensor, torch.Tensor]:
    """(q int8 [out, in], scales bf16 [out]) with weight ≈ scales[:, None] * q. `amax`: each
    row's largest |value| when `weight` is a column slice of the rows (a row-parallel
    shard), so that the shards' scales are the whole rows' and their q the whole's slices."""
    w = weight.float()
    amax = w.abs().amax(dim=1) if amax is None else amax.float()
    scales = (amax / 127).clamp_min(1e-30).bfloat16()  # exact in the kernel
    q = torch.round(w / scales.float()[:, None]).clamp_(-127, 127).to(torch.int8)
    return q.contiguous(), scales


def dequantize(q: torch.Tensor, scales: torch.Tensor) -> torch.Tensor:
    """The fp32 weight the int8 weight stands for."""
    return q.float() * scales.float()[:, None]


class Int8WeightOnlyKernel:
    """y = x @ W^T + bias with W held as int8 + per-output-channel scales (see above)."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None,
                 amax: torch.Tensor | None = None, *, allow_panel: bool = True):
        self.out_features, self.in_features = weight.shape
        if weight.device.type != "cpu":
            raise ValueError(f"{INT8_WEIGHT_ONLY} is built for CPUs only, not "
                             f"{weight.device.type}")
        if self.in_features % K_MULTIPLE:
            raise ValueError(f"{INT8_WEIGHT_ONLY} needs input widths that are multiples of "
                             f"{K_MULTIPLE}; a linear of this model has {self.in_features}")
        self.dtype = weight.dtype  # of the output: the model dtype
        q, self.scales = quantize_per_channel(weight, amax)
        self.bias = bias
        self.weight = None  # no dense weight is kept
        self.panels = None  # (int8 panels, fp32 scales, fp32 bias) for our kernel
        self.amx = None  # (int8 tiles, fp32 scales, int32 column sums, fp32 bias): AMX kernel
        self._qweight: torch.Tensor | None = q
        if allow_panel and cpu_kernels.enable() is None:
            if cpu_kernels.amx_fits(q):
                self.amx = cpu_kernels.pack_amx_int8(q, self.scales, bias)
            else:
                self.panels = cpu_kernels.pack_int8(q, self.scales, bias)
            self._qweight = None  # one copy of the weight: the panels or the tiles

    @property
    def qweight(self) -> torch.Tensor:
        """The int8 weight [out, in] (unpacked from the panels when they hold it)."""
        if self._qweight is not None:
            return self._qweight
        if self.amx is not None:
            return cpu_kernels.amx_untile(self.amx[0])
        return cpu_kernels.unpanel(self.panels[0], self.out_features)

    @property
    def num_bytes(self) -> int:
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.out_features * (self.in_features + self.scales.element_size()) + bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2:
            flat = self(x.reshape(-1, self.in_features))
            return flat.reshape(*x.shape[:-1], self.out_features)
        if self.amx is not None:
            y = cpu_kernels.amx_linear_int8(x if x.dtype in AMX_INPUTS else x.float(), *self.amx)
            return y.to(self.dtype)
        if self.panels is not None:
            y = cpu_kernels.panel_linear_int8(x.float(), *self.panels, self.out_features)
            return y.to(self.dtype)
        x = x.to(torch.bfloat16)
        if not x.is_contiguous() or x.data_ptr() % _ALIGN:  # the kernel loads rows aligned
            x = x.clone(memory_format=torch.contiguous_format)
        if x.shape[0] <= GEMV_ROWS:
            y = torch.ops.aten._weight_int8pack_mm(x, self.qweight, self.scales)
        else:
            weight = self.qweight.float().mul_(self.scales.float()[:, None])
            y = F.linear(x.float(), weight).bfloat16()
        y = y.to(self.dtype)
        return y if self.bias is None else y.add_(self.bias)
