"""The CPU paged decode-attention kernel (cpu_kernels/paged_attention.cpp) against
PagedAttention's torch path (page gather + masked SDPA) on decode batches over scattered
pages: grouped heads, head sizes that are and are not multiples of the vector width, pages
of 16 and of 1 token, uneven lengths, sliding windows, soft-capping."""
from __future__ import annotations

import random

import pytest

torch = pytest.importorskip("torch")

from loraxd.worker import cpu_kernels  # noqa: E402
from loraxd.worker.cpu_kernels import attention as cpu_attention  # noqa: E402
from loraxd.worker.kv_cache import PagedKVCache  # noqa: E402
from loraxd.worker.layers.attention import PagedAttention, StepContext  # noqa: E402

_REASON = cpu_kernels.enable()
pytestmark = pytest.mark.skipif(_REASON is not None, reason=f"no CPU kernels: {_REASON}")

KV_HEADS = 2
PREFILL_ROWS = 3  # rows before the decode rows: q is an offset view with a long row stride
UNEVEN = [1, 16, 17, 200, 5, 33, 64, 2, 100, 15, 48, 129, 7]  # B = 13


def make_step(lens, group, head_dim, block_size, seed=0):
    """(qkv, ctx, cache): decode sequences of context lengths `lens` on shuffled pages filled
    with K/V (and their page tables padded with the null page)."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    counts = [-(-n // block_size) for n in lens]
    num_blocks = sum(counts) + 5
    cache = PagedKVCache(1, num_blocks, block_size, KV_HEADS, head_dim, dtype=torch.float32,
                         device="cpu")
    cache.data[0, :num_blocks * block_size] = torch.randn(
        num_blocks * block_size, 2, KV_HEADS, head_dim, generator=gen)
    pages = list(range(num_blocks))
    rng.shuffle(pages)
    tables = [[pages.pop() for _ in range(c)] for c in counts]
    max_blocks = max(counts)
    padded = [t + [cache.null_block] * (max_blocks - len(t)) for t in tables]
    heads = group * KV_HEADS
    rows = PREFILL_ROWS + len(lens)
    # scores of a few units, so soft-capping at 2 changes them
    qkv = 3 * torch.randn(rows, (heads + 2 * KV_HEADS) * head_dim, generator=gen)
    ctx = StepContext(
        input_ids=torch.zeros(rows, dtype=torch.long),
        positions=torch.zeros(rows, dtype=torch.long),
        slot_mapping=torch.zeros(rows, dtype=torch.long), token_slots=torch.full((rows,), -1),
        req_ids=list(range(1 + len(lens))), seq_slots=[-1] * (1 + len(lens)),
        query_lens=[PREFILL_ROWS] + [1] * len(lens), seq_lens=[PREFILL_ROWS] + list(lens),
        num_prefill_seqs=1, num_prefill_tokens=PREFILL_ROWS, prefill_starts=[0],
        decode_blocks=torch.tensor(padded).flatten(), decode_lens=torch.tensor(lens),
        decode_max_len=max_blocks * block_size, logits_idx=torch.zeros(1, dtype=torch.long),
        sample_idx=None, dtype=torch.float32)
    return qkv, ctx, cache, tables


def decode(step, group, head_dim, window, softcap, kernel: bool, monkeypatch):
    qkv, ctx, cache, _ = step
    layer = PagedAttention(0, group * KV_HEADS, KV_HEADS, head_dim, scale=head_dim ** -0.5,
                           sliding_window=window, softcap=softcap)
    with monkeypatch.context() as patch:
        if kernel:  # the kernel must be what runs: the torch path would gather
            assert cpu_attention.usable(cache.data[0])
            patch.setattr(cache, "gather_blocks", _no_gather)
        else:
            patch.setattr(cpu_attention, "usable", lambda _cache: False)
        return layer._decode(qkv, ctx, cache)


def _no_gather(*_args):
    raise AssertionError("the torch path ran")


def rel_err(a, b) -> float:
    return ((a - b).abs().max() / b.abs().max()).item()


VARIANTS = {  # window, softcap
    "plain": (None, None),
    "window-8": (8, None),
    "window-past-every-len": (1000, None),
    "softcap": (None, 2.0),
    "window-24-softcap": (24, 2.0),
}


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("block_size", [16, 1])
@pytest.mark.parametrize("head_dim", [64, 128, 80, 72])
@pytest.mark.parametrize("group", [1, 3, 4])
def test_uneven_batch_matches_torch(group, head_dim, block_size, variant, monkeypatch):
    window, softcap = VARIANTS[variant]
    step = make_step(UNEVEN, group, head_dim, block_size)
    args = (step, group, head_dim, window, softcap)
    expected = decode(*args, kernel=False, monkeypatch=monkeypatch)
    got = decode(*args, kernel=True, monkeypatch=monkeypatch)
    assert got.shape == expected.shape == (len(UNEVEN), group * KV_HEADS * head_dim)
    assert rel_err(got, expected) < 1e-5


@pytest.mark.parametrize("length", [1, 16, 300])
@pytest.mark.parametrize("variant", ["plain", "window-24-softcap"])
def test_single_sequence_matches_torch(length, variant, monkeypatch):
    window, softcap = VARIANTS[variant]
    step = make_step([length], 4, 64, 16, seed=length)
    args = (step, 4, 64, window, softcap)
    expected = decode(*args, kernel=False, monkeypatch=monkeypatch)
    assert rel_err(decode(*args, kernel=True, monkeypatch=monkeypatch), expected) < 1e-5


def test_window_and_softcap_change_the_result(monkeypatch):
    """The variants above differ from plain attention, so matching them means something."""
    step = make_step(UNEVEN, 3, 64, 16)
    plain = decode(step, 3, 64, None, None, True, monkeypatch)
    for window, softcap in [(8, None), (None, 2.0)]:
        assert rel_err(decode(step, 3, 64, window, softcap, True, monkeypatch), plain) > 1e-2


def test_reads_only_the_visible_positions(monkeypatch):
    """NaN everywhere a sequence does not see (other pages, the null page that pads short
    tables, the tail of its last page, what its window leaves behind) changes nothing."""
    lens, window, block_size = [1, 16, 17, 40], 20, 8
    step = make_step(lens, 3, 64, block_size)
    clean = decode(step, 3, 64, window, None, True, monkeypatch)
    _, _, cache, tables = step
    seen = torch.zeros(cache.data.shape[1], dtype=torch.bool)
    for table, n in zip(tables, lens):
        for pos in range(max(0, n - window), n):
            seen[table[pos // block_size] * block_size + pos % block_size] = True
    cache.data[0, ~seen] = float("nan")
    assert torch.equal(decode(step, 3, 64, window, None, True, monkeypatch), clean)


def test_refuses_what_would_read_outside_the_cache():
    qkv, ctx, cache, _ = make_step([5, 20], 1, 64, 16)
    q = qkv[PREFILL_ROWS:, :KV_HEADS * 64]
    table = ctx.decode_blocks.view(2, -1)

    def call(blocks, lens):
        return torch.ops.loraxd_cpu.paged_decode_attention(q, cache.data[0], blocks, lens, 16,
                                                           0.125, 0, 0.0)

    call(table, ctx.decode_lens)
    empty = torch.ops.loraxd_cpu.paged_decode_attention(q[:0], cache.data[0], table[:0],
                                                        ctx.decode_lens[:0], 16, 0.125, 0, 0.0)
    assert empty.shape == (0, KV_HEADS * 64)
    bad_page = table.clone()
    bad_page[1, 1] = cache.num_blocks + 1
    with pytest.raises(RuntimeError, match="outside the cache"):
        call(bad_page, ctx.decode_lens)
    with pytest.raises(RuntimeError, match="length 33"):
        call(table, torch.tensor([5, 33]))
    with pytest.raises(RuntimeError, match="length 0"):
        call(table, torch.tensor([0, 20]))


def prefill_after_past(n, past, group, head_dim, block_size, window, softcap, kernel,
                       monkeypatch, seed=0):
    """One prompt slice of `n` rows after `past` cached tokens, all on shuffled pages."""
    gen = torch.Generator().manual_seed(seed)
    count = -(-(past + n) // block_size)
    cache = PagedKVCache(1, count + 3, block_size, KV_HEADS, head_dim, dtype=torch.float32,
                         device="cpu")
    cache.data[0] = torch.randn(cache.data[0].shape, generator=gen)
    pages = torch.randperm(count + 3, generator=gen)[:count]
    heads = group * KV_HEADS
    qkv = 3 * torch.randn(n, (heads + 2 * KV_HEADS) * head_dim, generator=gen)
    ctx = StepContext(
        input_ids=torch.zeros(n, dtype=torch.long), positions=torch.zeros(n, dtype=torch.long),
        slot_mapping=torch.zeros(n, dtype=torch.long), token_slots=torch.full((n,), -1),
        req_ids=[1], seq_slots=[-1], query_lens=[n], seq_lens=[past + n], num_prefill_seqs=1,
        num_prefill_tokens=n, prefill_starts=[0], decode_blocks=None, decode_lens=None,
        decode_max_len=0, logits_idx=torch.zeros(1, dtype=torch.long), sample_idx=None,
        dtype=torch.float32, prefill_past=[past], prefill_pages=[pages])
    layer = PagedAttention(0, heads, KV_HEADS, head_dim, scale=head_dim ** -0.5,
                           sliding_window=window, softcap=softcap)
    with monkeypatch.context() as patch:
        if kernel:
            patch.setattr(cache, "gather_blocks", _no_gather)
        else:
            patch.setattr(cpu_attention, "usable", lambda _cache: False)
        return layer._prefill(qkv, ctx, 0, cache)


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n, past, block_size", [(1, 5, 16), (32, 1500, 16), (7, 16, 16),
                                                 (13, 40, 1), (16, 1, 4)])
@pytest.mark.parametrize("group", [1, 3])
def test_a_prompt_slice_after_cached_tokens_matches_torch(n, past, block_size, group,
                                                          variant, monkeypatch):
    window, softcap = VARIANTS[variant]
    args = (n, past, group, 64, block_size, window, softcap)
    got = prefill_after_past(*args, True, monkeypatch)
    want = prefill_after_past(*args, False, monkeypatch)
    assert got.shape == want.shape == (n, group * KV_HEADS * 64)
    assert rel_err(got, want) < 1e-5


@pytest.mark.parametrize("variant", VARIANTS)
@pytest.mark.parametrize("n, past, head_dim", [(32, 700, 64), (19, 3, 64), (9, 47, 40)])
def test_a_slice_row_equals_that_row_alone(n, past, head_dim, variant):
    """A slice's rows share their tiles' reads in runs of 8; each row's output is the one
    it gets as a one-row call (bit for bit), whatever run it fell in."""
    window, softcap = VARIANTS[variant]
    gen = torch.Generator().manual_seed(n + past)
    block_size, group = 16, 3
    pages = -(-(past + n) // block_size)
    cache = torch.randn(pages * block_size + block_size, 2, KV_HEADS, head_dim, generator=gen)
    table = torch.randperm(pages + 1, generator=gen)[:pages]
    q = torch.randn(n, group * KV_HEADS * head_dim, generator=gen)
    args = (block_size, head_dim ** -0.5, window, softcap)
    together = cpu_attention.paged_prefill(q, cache, table, past, *args)
    for i in range(n):
        alone = cpu_attention.paged_decode(q[i:i + 1], cache, table,
                                           torch.tensor([past + i + 1]), *args)
        assert torch.equal(together[i], alone[0]), i


@pytest.mark.parametrize("variant", ["plain", "window-24-softcap"])
def test_a_bf16_cache_is_read_as_the_fp32_values_it_holds(variant, monkeypatch):
    """A bf16 model's cache: the kernel widens K/V and q, works in fp32, and rounds the
    output once, so it is the fp32 result on the same values, rounded to bf16."""
    window, softcap = VARIANTS[variant]
    qkv, ctx, cache, tables = make_step(UNEVEN, 3, 64, 16)
    cache.data.copy_(cache.data.bfloat16())  # values a bf16 holds exactly
    qkv = qkv.bfloat16().float()
    want = decode((qkv, ctx, cache, tables), 3, 64, window, softcap, True, monkeypatch)
    half = PagedKVCache(1, cache.num_blocks, 16, KV_HEADS, 64, dtype=torch.bfloat16,
                        device="cpu")
    half.data.copy_(cache.data)
    got = decode((qkv.bfloat16(), ctx, half, tables), 3, 64, window, softcap, True, monkeypatch)
    assert got.dtype == torch.bfloat16
    assert torch.equal(got, want.bfloat16())  # the same fp32 sums, rounded once
