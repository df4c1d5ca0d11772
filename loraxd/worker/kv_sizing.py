"""How many KV-cache pages a rank allocates, from numbers alone (no torch here, so every
rule is tested with made-up figures).

On CUDA a rank loads its weights and LoRA slots first, then measures the device's free
memory, and the cache takes what the share allows:

    budget = free - (1 - cuda_memory_fraction) * total - headroom

This is LoRAX's reading of `--cuda-memory-fraction`: the share of the whole device this
process may hold, the rest left to others. `free` is measured with the weights and slots in
place, so they are inside the share already. The cache is whole pages, plus the null page
every cache has (see kv_cache.py).

With max_batch_total_tokens given, its pages are allocated instead, and refused when they
do not fit the same budget: the share stays a cap, it is never ignored. All ranks take the
same number: the scheduler hands out one set of page ids for the group (`fit` is the
smallest over the ranks, see TensorParallel.min_over_ranks).
"""
from __future__ import annotations

import math
from dataclasses import dataclass

# What the per-token estimate below cannot see: cuBLAS's workspace per stream, the compiled
# Triton kernels' code, the sampler's and the step's small tensors, NCCL's scratch buffers
# beyond those made at the group's start.
FIXED_HEADROOM_BYTES = 256 << 20
# torch's caching allocator rounds each block up and cannot always reuse freed ones, so a
# step's transient tensors take more than their sum: a quarter more.
ALLOCATOR_SLACK = 1.25


class KvCacheTooLarge(Exception):
    """The pages asked for do not fit this rank's budget; the message says by how much."""


@dataclass(frozen=True)
class StepWidths:
    """Per-token widths of one rank's step tensors: its share of q/k/v, of the attention
    output and of the MLP, and the whole vocabulary (rank 0 gathers every logit shard)."""

    hidden: int
    qkv: int
    attention: int
    intermediate: int
    vocab: int
    dtype_bytes: int
    score_heads: int = 0  # heads whose prefill scores are materialized (the torch kernels)


def activation_headroom_bytes(w: StepWidths, max_prefill_tokens: int) -> int:
    """Device memory a step of `max_prefill_tokens` prompt tokens may take beyond the weights,
    slots and cache, estimated from the tensors the decoder makes for each token:

    - per layer, in the model dtype: about six hidden-wide tensors live at once (input,
      residual, normed input, attention projection, the norm's sum, the MLP output), the
      rank's q/k/v and attention output, and three intermediate-wide ones (gate|up and the
      activation's product); the RMSNorm adds two fp32 hidden-wide copies;
    - the logits of every prompt token when a request asks for prompt logprobs
      (decoder_input_details): the gathered shards, their concatenation, the fp32 cast and
      the fp32 log-softmax;
    - with the torch attention path, a prompt's [heads, n, n] fp32 scores, their capped
      and softmaxed copies (the Triton kernels never materialize them).
    """
    t = max_prefill_tokens
    layer = w.dtype_bytes * (6 * w.hidden + w.qkv + w.attention + 3 * w.intermediate)
    layer += 8 * w.hidden
    logits = w.vocab * (2 * w.dtype_bytes + 8)
    scores = w.score_heads * t * 12  # per token: a row of n scores, three fp32 copies
    transient = t * (layer + logits + scores)
    return math.ceil(transient * ALLOCATOR_SLACK) + FIXED_HEADROOM_BYTES


def pages_that_fit(*, free_bytes: int, total_bytes: int, memory_fraction: float,
                   headroom_bytes: int, page_bytes: int) -> int:
    """Whole pages (the null page included) within this rank's budget; 0 when none fit."""
    budget = free_bytes - math.ceil((1.0 - memory_fraction) * total_bytes) - headroom_bytes
    return max(0, budget // page_bytes)


def choose_num_blocks(*, fit: int, requested: int | None, page_bytes: int,
                      budget_note: str) -> int:
    """The pages for sequences (the null page aside) every rank allocates.

    `fit`: the smallest `pages_that_fit` over the ranks; `requested`: the pages that
    max_batch_total_tokens (or a replaced group's page count) asks for, None to take all
    that fit. `budget_note` says in the error how the budget was found."""
    if requested is None:
        if fit < 2:
            raise KvCacheTooLarge(f"no device memory is left for the KV cache ({budget_note})"
                                  ": lower max_batch_prefill_tokens or max_active_adapters, "
                                  "raise cuda_memory_fraction, or use more shards")
        return fit - 1
    if requested + 1 > fit:
        need = (requested + 1) * page_bytes
        have = fit * page_bytes
        raise KvCacheTooLarge(f"the KV cache of {requested} pages needs {size(need)} on each "
                              f"rank, but {size(have)} fit ({budget_note})")
    return requested


def size(n: int) -> str:
    return f"{n / 2**30:.2f} GiB" if n >= 2**30 else f"{n / 2**20:.1f} MiB"
