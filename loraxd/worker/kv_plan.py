"""A rank's KV-cache page count, from its settings and, on CUDA, from the device's memory
once the weights and LoRA slots are in place (the arithmetic is kv_sizing.py's, pure).

On a CPU the pages are max_batch_total_tokens' (a share of GPU memory means nothing
there). On CUDA every rank measures its free memory, the group agrees on the smallest
fit (one all-reduce), and the count is what fits, or the requested or pinned count when
that fits too (see kv_sizing.choose_num_blocks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from loraxd.worker import kv_sizing
from loraxd.worker.kv_cache import PagedKVCache

SPARE_BLOCKS = 4  # beyond max_batch_total_tokens' own pages


@dataclass(frozen=True)
class KvSizing:
    """How a CUDA rank sizes its KV cache: `memory_fraction` of the device is this
    process's; `max_prefill_tokens` sizes the activations' headroom; `num_blocks` > 0 pins
    the page count (a replaced group keeps the pages the scheduler hands out)."""

    memory_fraction: float = 1.0
    max_prefill_tokens: int = 4096
    num_blocks: int = 0


def kv_blocks(runner, max_batch_total_tokens: int | None, kv: KvSizing) -> tuple[int, str]:
    """(pages for sequences, how they were found) for a ModelRunner whose model is loaded;
    KvCacheTooLarge when a requested cache does not fit, RuntimeError for a pinned one."""
    requested = kv.num_blocks or None
    if requested is None and max_batch_total_tokens is not None:
        requested = math.ceil(max_batch_total_tokens / runner.block_size) + SPARE_BLOCKS
    if runner.device.type != "cuda":
        if kv.memory_fraction != 1.0:
            raise ValueError("cuda_memory_fraction means nothing on a CPU: only 1.0")
        if requested is None:
            raise ValueError("on a CPU the KV cache is sized by max_batch_total_tokens")
        return requested, f"{requested} pages, as max_batch_total_tokens asks"
    arch, shard = runner.arch, runner.model.shard
    page_bytes = PagedKVCache.page_bytes(arch.num_layers, runner.block_size,
                                         shard.num_kv_heads, arch.head_dim, runner.dtype)
    if runner.kernels != "triton":  # decode copies a layer's pages into a buffer first
        page_bytes += -(-page_bytes // arch.num_layers)
    torch.cuda.synchronize(runner.device)
    torch.cuda.empty_cache()  # what loading freed goes back, so `free` counts it
    free, total = torch.cuda.mem_get_info(runner.device)
    headroom = kv_sizing.activation_headroom_bytes(step_widths(runner), kv.max_prefill_tokens)
    fit = kv_sizing.pages_that_fit(free_bytes=free, total_bytes=total,
                                   memory_fraction=kv.memory_fraction,
                                   headroom_bytes=headroom, page_bytes=page_bytes)
    fit = runner.tp.min_over_ranks(fit)  # the scheduler hands out one set of pages
    size = kv_sizing.size
    note = (f"{size(free)} of {size(total)} free on rank {runner.tp.rank} after the weights, "
            f"cuda_memory_fraction {kv.memory_fraction:g}, {size(headroom)} kept for a "
            "step's activations")
    try:
        blocks = kv_sizing.choose_num_blocks(fit=fit, requested=requested,
                                             page_bytes=page_bytes, budget_note=note)
    except kv_sizing.KvCacheTooLarge as exc:
        if kv.num_blocks:  # a replaced group: the memory may come back, so not config
            raise RuntimeError(f"the replaced workers must hold the {kv.num_blocks} KV pages "
                               f"the scheduler hands out: {exc}") from None
        raise
    return blocks, f"{blocks} pages ({note})"


def step_widths(runner) -> kv_sizing.StepWidths:
    """The per-token widths of the runner's rank (see kv_sizing.StepWidths)."""
    arch, shard = runner.arch, runner.model.shard
    d = arch.head_dim
    return kv_sizing.StepWidths(
        hidden=arch.hidden_size, qkv=(shard.num_heads + 2 * shard.num_kv_heads) * d,
        attention=shard.num_heads * d, intermediate=shard.intermediate_size,
        vocab=arch.vocab_size, dtype_bytes=torch.empty(0, dtype=runner.dtype).element_size(),
        score_heads=0 if runner.kernels == "triton" else shard.num_heads)
