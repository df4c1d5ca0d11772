"""Linear layers, column- and row-parallel over the tensor-parallel ranks, with the LoRA hook.

All matmuls go through `DenseKernel`. On a CPU with AVX-512, fp32 weights run in our own
panel kernel (loraxd.worker.cpu_kernels), which streams the weight at close to the
machine's read bandwidth: 1.5-1.9x oneDNN over a decode step's linears at 1 to 16 rows, as
fast at prefill sizes. bf16 weights on a CPU with AMX run in our AMX kernel (amx_gemm.cpp:
1.8-2x oneDNN over a decode step's linears from 1 to 32 rows, faster at prefill sizes too),
one kernel for every row count. Otherwise (bf16 without AMX or in sizes that are not whole
tiles, no compiler, another CPU) it holds the weight reordered once for oneDNN (the private
`mkldnn._reorder_linear_weight` / `_linear_pointwise` ops that torch.compile emits when it
freezes weights), which runs fp32 skinny batches about twice as fast as `F.linear` (MKL)
and the LM head four times (measured on 2-core Xeon and EPYC machines); it was also as
fast or faster for 500-row prefills, so there is no per-call choice. oneDNN keeps state per
input shape, though: fed every row count from 1 to 128 (and prefills of every length), a
worker grew by GBs. So the packed op only ever sees the row counts of `ROW_BUCKETS`: a
batch is padded up to the next one, and longer inputs go through in 512-row pieces (as
fast as one call).
Everywhere else (CUDA, a torch without the ops, fp16) it is a plain `F.linear`.
With `--quantize int8-weight-only` the layers' kernels are `Int8WeightOnlyKernel`s instead
(quantized.py), built from the same rank-local weight: each rank quantizes its own shard,
a row-parallel one with the scales of the whole rows, so that every rank's int8 weight is
the slice of the one a single rank would hold (N ranks compute what one computes).

Layers are filled by `load_weight`/`load_bias` calls with a full (unsharded) HF tensor, or
anything indexed like one (loader.CheckpointTensor, which reads only the part indexed): each
indexes only its own rank's part, then `finalize()` builds the kernel.
"""
from __future__ import annotations

from collections.abc import Callable

import torch
import torch.nn.functional as F

from loraxd.worker import cpu_kernels
from loraxd.worker.distributed import ShardSpec
from loraxd.worker.layers.quantized import INT8_WEIGHT_ONLY, Int8WeightOnlyKernel

PACKED_DTYPES = (torch.float32, torch.bfloat16)
ROW_BUCKETS = (1, 2, 4, 8, 16, 32, 64, 128, 256, 512)  # the only row counts the packed op sees
DEFAULT_BATCH_HINT = 8  # decode batches are small; the hint hardly matters above 8


def packed_ops_available() -> bool:
    ops = torch.ops.mkldnn
    return (torch.backends.mkldnn.is_available()
            and hasattr(ops, "_reorder_linear_weight") and hasattr(ops, "_linear_pointwise"))


def packed_linear(x: torch.Tensor, packed: torch.Tensor, bias: torch.Tensor | None
                  ) -> torch.Tensor:
    return torch.ops.mkldnn._linear_pointwise(x, packed, bias, "none", [], "")


class DenseKernel:
    """y = x @ weight.T + bias, the one place that picks how a matmul runs."""

    def __init__(self, weight: torch.Tensor, bias: torch.Tensor | None = None, *,
                 batch_hint: int = DEFAULT_BATCH_HINT, allow_packed: bool = True,
                 allow_panel: bool = True):
        self.out_features, self.in_features = weight.shape
        self.dtype = weight.dtype
        self.bias = bias
        self.weight: torch.Tensor | None = weight  # [out, in]; None once packed
        self.packed: torch.Tensor | None = None
        self.panels: tuple[torch.Tensor, torch.Tensor] | None = None  # (panels, padded bias)
        self.amx: tuple[torch.Tensor, torch.Tensor] | None = None  # (bf16 tiles, fp32 bias)
        on_cpu = allow_packed and weight.device.type == "cpu"
        kernels = on_cpu and allow_panel and cpu_kernels.enable() is None
        if kernels and weight.dtype == torch.float32:
            self.panels = cpu_kernels.pack(weight, bias)
            self.weight = None
        elif kernels and cpu_kernels.amx_fits(weight):
            self.amx = cpu_kernels.pack_amx(weight, bias)
            self.weight = None
        elif on_cpu and weight.dtype in PACKED_DTYPES and packed_ops_available():
            self.packed = self._try_pack(weight, batch_hint)
            if self.packed is not None:
                self.weight = None

    def _try_pack(self, weight: torch.Tensor, batch_hint: int) -> torch.Tensor | None:
        try:
            packed = torch.ops.mkldnn._reorder_linear_weight(weight.contiguous(), batch_hint)
            probe = torch.zeros(1, self.in_features, dtype=weight.dtype)
            torch.ops.mkldnn._linear_pointwise(probe, packed, self.bias, "none", [], "")
        except RuntimeError:  # the CPU lacks an ISA feature the dtype needs
            return None
        return packed

    @property
    def num_bytes(self) -> int:
        """Bytes of the weight and bias as their logical shapes count them, however packed."""
        itemsize = torch.empty((), dtype=self.dtype).element_size()
        bias = 0 if self.bias is None else self.bias.numel() * self.bias.element_size()
        return self.out_features * self.in_features * itemsize + bias

    def __call__(self, x: torch.Tensor) -> torch.Tensor:
        if x.dtype != self.dtype:
            x = x.to(self.dtype)
        if x.dim() != 2:
            flat = self(x.reshape(-1, self.in_features))
            return flat.reshape(*x.shape[:-1], self.out_features)
        if self.panels is not None:
            return self._panel(x)
        if self.amx is not None:
            return cpu_kernels.amx_linear(x, *self.amx)
        if self.packed is not None:
            return self._packed(x)
        return F.linear(x, self.weight, self.bias)

    def _panel(self, x: torch.Tensor) -> torch.Tensor:
        panels, bias = self.panels
        return cpu_kernels.panel_linear(x, panels, bias, self.out_features)

    def _packed(self, x: torch.Tensor) -> torch.Tensor:
        rows = x.shape[0]
        if rows == 0:
            return x.new_empty(0, self.out_features)
        if rows > ROW_BUCKETS[-1]:
            step = ROW_BUCKETS[-1]
            return torch.cat([self._packed(x[i:i + step]) for i in range(0, rows, step)])
        bucket = next(b for b in ROW_BUCKETS if b >= rows)
        if bucket != rows:
            x = F.pad(x, (0, 0, 0, bucket - rows))
        y = packed_linear(x, self.packed, self.bias)
        return y if bucket == rows else y[:rows]


def make_kernel(weight: torch.Tensor, bias: torch.Tensor | None, *, quantize: str | None = None,
                allow_packed: bool = True, row_amax: torch.Tensor | None = None
                ) -> DenseKernel | Int8WeightOnlyKernel:
    """The kernel of a layer's (rank-local) weight: dense, or quantized as `quantize` says
    (`row_amax`: the whole rows' largest |value| when `weight` holds some columns)."""
    if quantize is None:
        return DenseKernel(weight, bias, allow_packed=allow_packed)
    if quantize == INT8_WEIGHT_ONLY:
        return Int8WeightOnlyKernel(weight, bias, row_amax)
    raise ValueError(f"quantize {quantize!r} is not built; built: {INT8_WEIGHT_ONLY}")


def no_all_reduce(y: torch.Tensor) -> torch.Tensor:
    return y


class _LoraSite:
    """Where a LoRA-capable linear sits: layer index and group ("qkv", "o", "gate_up", "down")."""

    def __init__(self, layer_idx: int | None, group: str | None):
        self.layer_idx = layer_idx
        self.group = group

    def hook(self, ctx, x: torch.Tensor, y: torch.Tensor) -> None:
        if self.group is not None and ctx is not None and ctx.lora is not None:
            ctx.lora.apply(self.layer_idx, self.group, x, y)


class ColumnParallelLinear:
    """Output features split over ranks; `output_sizes` (merged variant) lists the fused
    sub-matrices ([q, k, v] or [gate, up]), each split over ranks on its own.

    `replicas[i]`: how many ranks hold the same part of sub-matrix i (1: each rank its own);
    K and V of a model with fewer KV heads than ranks are replicated this way, as vLLM does."""

    def __init__(self, in_features: int, output_sizes: list[int], *, bias: bool = False,
                 rank: int = 0, world_size: int = 1, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", layer_idx: int | None = None,
                 group: str | None = None, replicas: list[int] | None = None):
        self.shard = ShardSpec(rank, world_size)
        self.replicas = replicas or [1] * len(output_sizes)
        self.parts = [self.shard.part(size, r) for size, r in zip(output_sizes, self.replicas)]
        self.full_sizes = list(output_sizes)
        self.in_features = in_features
        self.output_sizes = [p.stop - p.start for p in self.parts]  # per rank
        self.out_features = sum(self.output_sizes)
        self.offsets = [sum(self.output_sizes[:i]) for i in range(len(self.output_sizes))]
        self.rank, self.world_size = rank, world_size
        self.site = _LoraSite(layer_idx, group)
        self.weight = torch.zeros(self.out_features, in_features, dtype=dtype, device=device)
        self.bias = torch.zeros(self.out_features, dtype=dtype, device=device) if bias else None
        self.kernel: DenseKernel | None = None

    def _rows(self, shard: int, offset: int) -> slice:
        part = self.parts[shard]
        return slice(offset + part.start, offset + part.stop)

    def load_weight(self, weight, shard: int = 0, offset: int = 0) -> None:
        """Place this rank's rows of full HF weight `shard` (e.g. 0 = q_proj of a fused qkv),
        found at row `offset` of `weight`."""
        size, start = self.output_sizes[shard], self.offsets[shard]
        self.weight[start:start + size].copy_(weight[self._rows(shard, offset)])

    def load_bias(self, bias, shard: int = 0, offset: int = 0) -> None:
        size, start = self.output_sizes[shard], self.offsets[shard]
        self.bias[start:start + size].copy_(bias[self._rows(shard, offset)])

    def load_fused(self, tensor, load: Callable) -> None:
        """Place a checkpoint tensor that holds every sub-matrix at once (Phi-3's qkv_proj),
        each through `load` (load_weight or load_bias) as its own shard."""
        sizes = self.full_sizes
        if tensor.shape[0] != sum(sizes):
            raise ValueError(f"a fused tensor of {tensor.shape[0]} rows does not hold "
                             f"sub-matrices of {sizes} rows")
        for shard in range(len(sizes)):
            load(tensor, shard, sum(sizes[:shard]))

    def finalize(self, allow_packed: bool = True, quantize: str | None = None) -> None:
        self.kernel = make_kernel(self.weight, self.bias, quantize=quantize,
                                  allow_packed=allow_packed)
        self.weight = self.bias = None

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        y = self.kernel(x)  # [num_tokens, out_features]
        self.site.hook(ctx, x, y)
        return y


class RowParallelLinear:
    """Input features split over ranks; partial outputs summed by `all_reduce` (a no-op at
    world size 1). The LoRA hook runs on the partial output, before the reduction, so a
    row-sharded LoRA A and a full B give the right sum."""

    def __init__(self, in_features: int, out_features: int, *, bias: bool = False,
                 rank: int = 0, world_size: int = 1, dtype: torch.dtype = torch.float32,
                 device: str | torch.device = "cpu", layer_idx: int | None = None,
                 group: str | None = None,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] = no_all_reduce):
        if in_features % world_size:
            raise ValueError(f"input size {in_features} does not split over {world_size} ranks")
        self.cols = ShardSpec(rank, world_size).part(in_features)
        self.in_features = in_features // world_size  # per rank
        self.out_features = out_features
        self.rank, self.world_size = rank, world_size
        self.all_reduce = all_reduce
        self.site = _LoraSite(layer_idx, group)
        self.weight = torch.zeros(out_features, self.in_features, dtype=dtype, device=device)
        self.bias = torch.zeros(out_features, dtype=dtype, device=device) if bias else None
        self._whole = None  # the checkpoint's whole weight, read again only to quantize
        self.kernel: DenseKernel | None = None

    def load_weight(self, weight, shard: int = 0, offset: int = 0) -> None:
        self.weight.copy_(weight[:, self.cols])
        if self.world_size > 1:
            self._whole = weight

    def load_bias(self, bias, shard: int = 0, offset: int = 0) -> None:
        self.bias.copy_(bias[()])  # every rank adds it whole, after the sum

    def finalize(self, allow_packed: bool = True, quantize: str | None = None) -> None:
        fused_bias = self.bias if self.world_size == 1 else None  # else added once, after the sum
        row_amax = None  # a quantized shard takes the whole rows' scales, as one rank would
        if quantize and self._whole is not None:
            row_amax = self._whole[:, :].abs().amax(dim=1).float()
        self.kernel = make_kernel(self.weight, fused_bias, quantize=quantize,
                                  allow_packed=allow_packed, row_amax=row_amax)
        self.weight = self._whole = None
        if self.world_size == 1:
            self.bias = None

    def forward(self, x: torch.Tensor, ctx=None) -> torch.Tensor:
        y = self.kernel(x)  # [num_tokens, out_features], partial when sharded
        self.site.hook(ctx, x, y)
        if self.world_size > 1:
            y = self.all_reduce(y)
            if self.bias is not None:
                y = y + self.bias
        return y
