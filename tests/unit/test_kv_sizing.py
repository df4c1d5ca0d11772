"""KV-cache sizing from free GPU memory, with made-up figures (kv_sizing.py is pure)."""
from __future__ import annotations

import pytest

from loraxd.worker.kv_sizing import (ALLOCATOR_SLACK, FIXED_HEADROOM_BYTES, KvCacheTooLarge,
                                     StepWidths, activation_headroom_bytes, choose_num_blocks,
                                     pages_that_fit)

GIB = 1 << 30
MIB = 1 << 20


def test_the_budget_is_the_share_of_the_device_less_what_is_used_and_the_headroom():
    # 80 GiB device, 60 GiB free after the weights: at 0.9, 8 GiB stay for others
    fit = pages_that_fit(free_bytes=60 * GIB, total_bytes=80 * GIB, memory_fraction=0.9,
                         headroom_bytes=2 * GIB, page_bytes=2 * MIB)
    assert fit == (60 - 8 - 2) * GIB // (2 * MIB) == 25600
    # the whole device: everything free but the headroom
    assert pages_that_fit(free_bytes=60 * GIB, total_bytes=80 * GIB, memory_fraction=1.0,
                          headroom_bytes=0, page_bytes=2 * MIB) == 30720
    # pages are whole: a budget one byte short of a page loses the page
    assert pages_that_fit(free_bytes=10 * MIB - 1, total_bytes=80 * GIB, memory_fraction=1.0,
                          headroom_bytes=0, page_bytes=2 * MIB) == 4
    # others already hold more than the share leaves them: nothing fits, never negative
    assert pages_that_fit(free_bytes=5 * GIB, total_bytes=80 * GIB, memory_fraction=0.5,
                          headroom_bytes=GIB, page_bytes=2 * MIB) == 0


def test_sized_from_memory_takes_every_page_that_fits_but_the_null_page():
    assert choose_num_blocks(fit=25600, requested=None, page_bytes=2 * MIB,
                             budget_note="n") == 25599
    with pytest.raises(KvCacheTooLarge, match=r"^no device memory is left for the KV cache "
                                              r"\(40 GiB free\): lower max_batch_prefill"):
        choose_num_blocks(fit=1, requested=None, page_bytes=2 * MIB, budget_note="40 GiB free")


def test_a_requested_cache_must_fit_the_same_budget():
    assert choose_num_blocks(fit=101, requested=100, page_bytes=MIB, budget_note="n") == 100
    with pytest.raises(KvCacheTooLarge) as info:
        choose_num_blocks(fit=100, requested=2052, page_bytes=MIB, budget_note="why")
    assert str(info.value) == ("the KV cache of 2052 pages needs 2.00 GiB on each rank, but "
                               "100.0 MiB fit (why)")


def test_every_rank_takes_the_smallest_fit():
    """Two ranks with different free memory: the group agrees on the smaller."""
    free = [60 * GIB, 59 * GIB]
    fits = [pages_that_fit(free_bytes=f, total_bytes=80 * GIB, memory_fraction=1.0,
                           headroom_bytes=GIB, page_bytes=MIB) for f in free]
    agreed = min(fits)
    assert [choose_num_blocks(fit=agreed, requested=None, page_bytes=MIB, budget_note="")
            for _ in free] == [58 * 1024 - 1] * 2


LLAMA_8B = StepWidths(hidden=4096, qkv=6144, attention=4096, intermediate=14336,
                      vocab=128256, dtype_bytes=2)


def test_the_headroom_grows_with_the_prefill_and_shrinks_with_the_shards():
    one = activation_headroom_bytes(LLAMA_8B, 4096)
    per_token = 2 * (6 * 4096 + 6144 + 4096 + 3 * 14336) + 8 * 4096 + 128256 * (2 * 2 + 8)
    assert one == int(4096 * per_token * ALLOCATOR_SLACK) + FIXED_HEADROOM_BYTES
    assert 7 * GIB < one < 9 * GIB  # the prompt-logprob logits are most of it
    assert activation_headroom_bytes(LLAMA_8B, 1024) - FIXED_HEADROOM_BYTES == pytest.approx(
        (one - FIXED_HEADROOM_BYTES) / 4, rel=1e-6)
    two = StepWidths(hidden=4096, qkv=3072, attention=2048, intermediate=7168, vocab=128256,
                     dtype_bytes=2)
    assert activation_headroom_bytes(two, 4096) < one


def test_materialized_attention_scores_count_with_the_torch_kernels():
    triton = activation_headroom_bytes(LLAMA_8B, 2048)
    torch_path = activation_headroom_bytes(
        StepWidths(**{**LLAMA_8B.__dict__, "score_heads": 32}), 2048)
    assert torch_path - triton == pytest.approx(32 * 2048 * 2048 * 12 * ALLOCATOR_SLACK, abs=2)
