"""The roofline of a decode step, the lower of two bounds:
- memory: a step reads every weight once, so read bandwidth over the bytes read per step
  bounds the steps per second, and the batch size times that bounds tokens per second; with
  adapters, each distinct adapter in the batch is read too;
- compute: every token multiplies by every weight once (2 FLOPs each, its adapter's
  included), so the machine's matmul FLOP/s over the FLOPs per token bound tokens per
  second. Small batches are memory-bound; on a few CPU cores 32 streams already are not.
Attention's reads and FLOPs (a few % at these context lengths) are left out of both."""
from __future__ import annotations

import json
import struct
import time
from pathlib import Path

ITEMSIZE = {"float32": 4, "float16": 2, "bfloat16": 2}
_BANDWIDTH_BYTES = 256 << 20


def read_bandwidth(threads: int, repeats: int = 10) -> float:
    """Bytes per second that `x.sum()` over 256 MiB reads with `threads` torch threads,
    best of `repeats` (the best run is the one least disturbed by neighbours)."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        x = torch.ones(_BANDWIDTH_BYTES // 4, dtype=torch.float32)
        x.sum()  # fault the pages in, warm the thread pool
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            x.sum()
            best = min(best, time.perf_counter() - t0)
        return _BANDWIDTH_BYTES / best
    finally:
        torch.set_num_threads(before)


def matmul_flops(threads: int, dtype: str, repeats: int = 5, n: int = 1536) -> float:
    """FLOP/s of torch's matmul of two n x n matrices in `dtype` with `threads` threads, best
    of `repeats`: the peak that tuned library kernels reach on this machine."""
    import torch
    before = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        a = torch.randn(n, n).to(getattr(torch, dtype))
        b = torch.randn(n, n).to(a.dtype)
        a @ b  # warm the library's kernels and the thread pool
        best = float("inf")
        for _ in range(repeats):
            t0 = time.perf_counter()
            a @ b
            best = min(best, time.perf_counter() - t0)
        return 2 * n ** 3 / best
    finally:
        torch.set_num_threads(before)


def safetensors_numel(path: Path) -> int:
    """Elements stored in a safetensors file, from its header alone."""
    with open(path, "rb") as f:
        (size,) = struct.unpack("<Q", f.read(8))
        header = json.loads(f.read(size))
    total = 0
    for name, entry in header.items():
        if name == "__metadata__":
            continue
        n = 1
        for dim in entry["shape"]:
            n *= dim
        total += n
    return total


def weight_bytes(model_dir: Path, dtype: str) -> int:
    """Bytes of the model's weights in `dtype`; a tied embedding is stored, and read as the
    LM head, once."""
    files = sorted(Path(model_dir).glob("*.safetensors"))
    if not files:
        raise FileNotFoundError(f"no *.safetensors in {model_dir}")
    return sum(safetensors_numel(f) for f in files) * ITEMSIZE[dtype]


def adapter_bytes(adapter_dir: Path, dtype: str) -> int:
    return safetensors_numel(Path(adapter_dir) / "adapter_model.safetensors") * ITEMSIZE[dtype]


def kv_bytes_per_token(config: dict, dtype: str) -> int:
    head_dim = config.get("head_dim") or config["hidden_size"] // config["num_attention_heads"]
    kv_heads = config.get("num_key_value_heads") or config["num_attention_heads"]
    return config["num_hidden_layers"] * 2 * kv_heads * head_dim * ITEMSIZE[dtype]


def roofline(bandwidth: float, base_bytes: int, batch: int, adapters: int = 0,
             bytes_per_adapter: int = 0, flops: float | None = None, itemsize: int = 4
             ) -> dict:
    """The bound for one load: `adapters` distinct adapters spread over `batch` streams
    (at most `batch` of them are in one step); `flops`: the machine's matmul FLOP/s (None:
    the memory bound alone); `itemsize`: bytes per weight, to count them from the bytes."""
    distinct = min(adapters, batch)
    step_bytes = base_bytes + distinct * bytes_per_adapter
    steps_s = bandwidth / step_bytes
    row = {"step_bytes": step_bytes, "distinct_adapters": distinct,
           "memory_tok_s": batch * steps_s, "max_tok_s": batch * steps_s, "bound": "memory"}
    if flops:
        per_token = 2 * (base_bytes + (bytes_per_adapter if adapters else 0)) / itemsize
        row["flops_per_token"] = per_token
        row["compute_tok_s"] = flops / per_token
        if row["compute_tok_s"] < row["max_tok_s"]:
            row.update(max_tok_s=row["compute_tok_s"], bound="compute")
    row["max_steps_s"] = row["max_tok_s"] / batch
    return row
