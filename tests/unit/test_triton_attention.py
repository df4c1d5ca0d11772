"""TritonAttention against PagedAttention's torch path (the reference) on one mixed step:
uneven prompts and decode sequences of different lengths over scattered cache pages, with
grouped heads, sliding windows, soft-capping, a head size that is not a power of two, fp32 and
bf16. On the CPU through Triton's interpreter; on CUDA where there is one."""
from __future__ import annotations

import random

import pytest
import torch

from tests.unit.triton_env import DEVICES, SKIP_NO_TRITON

from loraxd.worker.kv_cache import PagedKVCache  # noqa: E402
from loraxd.worker.layers.attention import PagedAttention, StepContext  # noqa: E402

pytestmark = SKIP_NO_TRITON

PROMPT_LENS = [5, 37, 1]
DECODE_LENS = [1, 9, 40, 70]  # context lengths including this step's token


def make_step(device, dtype, heads, kv_heads, head_dim, block_size, seed=0):
    """(qkv, ctx, cache): the step's tokens, a context whose decode sequences own random
    pages already filled with K/V, and that cache."""
    rng, gen = random.Random(seed), torch.Generator().manual_seed(seed)
    num_blocks = 64
    cache = PagedKVCache(1, num_blocks, block_size, kv_heads, head_dim, dtype=dtype,
                         device=device)
    cache.data[0, :num_blocks * block_size] = torch.randn(
        num_blocks * block_size, 2, kv_heads, head_dim, generator=gen).to(device, dtype)
    pages = list(range(num_blocks))
    rng.shuffle(pages)
    seq_pages = []
    for n in PROMPT_LENS + DECODE_LENS:
        count = -(-n // block_size)
        seq_pages.append([pages.pop() for _ in range(count)])
    slots = []
    for i, n in enumerate(PROMPT_LENS):
        slots += [seq_pages[i][p // block_size] * block_size + p % block_size for p in range(n)]
    dec_pages = seq_pages[len(PROMPT_LENS):]
    for pg, n in zip(dec_pages, DECODE_LENS):
        slots.append(pg[(n - 1) // block_size] * block_size + (n - 1) % block_size)
    max_blocks = max(len(pg) for pg in dec_pages)
    table = [pg + [cache.null_block] * (max_blocks - len(pg)) for pg in dec_pages]
    num_tokens, num_seqs = len(slots), len(PROMPT_LENS) + len(DECODE_LENS)
    starts = [sum(PROMPT_LENS[:i]) for i in range(len(PROMPT_LENS))]
    ones = torch.ones(num_tokens, 1, head_dim, dtype=dtype, device=device)
    ctx = StepContext(
        input_ids=torch.zeros(num_tokens, dtype=torch.long, device=device),
        positions=torch.zeros(num_tokens, dtype=torch.long, device=device),
        slot_mapping=torch.tensor(slots, device=device),
        token_slots=torch.full((num_tokens,), -1), req_ids=list(range(num_seqs)),
        seq_slots=[-1] * num_seqs, query_lens=PROMPT_LENS + [1] * len(DECODE_LENS),
        seq_lens=PROMPT_LENS + DECODE_LENS, num_prefill_seqs=len(PROMPT_LENS),
        num_prefill_tokens=sum(PROMPT_LENS), prefill_starts=starts,
        decode_blocks=torch.tensor(table, device=device).flatten(),
        decode_lens=torch.tensor(DECODE_LENS, device=device),
        decode_max_len=max_blocks * block_size, logits_idx=torch.zeros(1, dtype=torch.long),
        sample_idx=None, dtype=dtype)
    ctx.rope = {"full_attention": (ones, torch.zeros_like(ones))}  # rotation: the identity
    width = (heads + 2 * kv_heads) * head_dim
    qkv = torch.randn(num_tokens, width, generator=gen).to(device, dtype)
    return qkv, ctx, cache


def attend(kernels, step, heads, kv_heads, head_dim, window, softcap):
    qkv, ctx, cache = step
    qkv, cache_copy = qkv.clone(), PagedKVCache.__new__(PagedKVCache)
    data = cache.data.clone()
    cache_copy.__dict__.update(cache.__dict__, data=data, layers=data.unbind(0))
    layer = PagedAttention(0, heads, kv_heads, head_dim, scale=head_dim ** -0.5,
                           sliding_window=window, softcap=softcap, kernels=kernels)
    ctx = StepContext(**{f: getattr(ctx, f) for f in ctx.__dataclass_fields__
                         if not f.startswith("_") and f != "kernel_index"})
    return layer.forward(qkv, ctx, cache_copy)


CASES = {  # heads, kv_heads, head_dim, block_size, window, softcap
    "gqa": (4, 2, 32, 16, None, None),
    "window-softcap-d40": (2, 2, 40, 8, 8, 5.0),
    "gqa3-window": (6, 2, 16, 16, 20, None),
}


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=["fp32", "bf16"])
@pytest.mark.parametrize("case", CASES)
def test_matches_torch_attention(device, dtype, case):
    from loraxd.worker.layers.triton_attention import TritonAttention

    heads, kv_heads, head_dim, block_size, window, softcap = CASES[case]
    step = make_step(device, dtype, heads, kv_heads, head_dim, block_size)
    args = (step, heads, kv_heads, head_dim, window, softcap)
    expected = attend(None, *args)
    got = attend(TritonAttention(block_m=16, block_n=16), *args)
    tol = dict(rtol=1e-4, atol=1e-4) if dtype == torch.float32 else dict(rtol=2e-2, atol=2e-2)
    p = sum(PROMPT_LENS)
    torch.testing.assert_close(got[:p].float().cpu(), expected[:p].float().cpu(), **tol,
                               msg=lambda m: f"prefill rows: {m}")
    torch.testing.assert_close(got[p:].float().cpu(), expected[p:].float().cpu(), **tol,
                               msg=lambda m: f"decode rows: {m}")


@pytest.mark.parametrize("device", DEVICES)
def test_decode_reads_only_its_own_pages(device):
    """Poisoning every page no decode sequence owns (NaN) changes nothing."""
    from loraxd.worker.layers.triton_attention import TritonAttention

    step = make_step(device, torch.float32, 4, 2, 32, 16)
    qkv, ctx, cache = step
    clean = attend(TritonAttention(), step, 4, 2, 32, None, None)
    owned = set(ctx.decode_blocks.tolist()) | {s // 16 for s in ctx.slot_mapping.tolist()}
    owned.discard(cache.null_block)  # padding of short page tables: must not be read either
    view = cache.data[0].view(cache.num_blocks + 1, -1)
    for page in set(range(cache.num_blocks + 1)) - owned:
        view[page] = float("nan")
    poisoned = attend(TritonAttention(), step, 4, 2, 32, None, None)
    assert torch.equal(clean, poisoned)
