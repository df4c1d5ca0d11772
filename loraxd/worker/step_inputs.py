"""A step's inputs on the worker: each running sequence's state, the slice of a prompt a
step computes, and the index tensors every layer of the step reads (StepContext)."""
from __future__ import annotations

from dataclasses import dataclass

import torch

from loraxd.worker.device_copy import tensor_on
from loraxd.worker.kv_cache import BlockTables
from loraxd.worker.layers.attention import StepContext
from loraxd.worker.layers.sampler import SeqSampling


@dataclass(eq=False)
class SeqState:
    req_id: int
    row: int  # of the block tables
    num_cached: int  # tokens whose K/V are in the cache
    last_token: int  # the input of its next decode step
    adapter_slot: int
    sampling: SeqSampling  # its token_ids: the context (prompt, then what it generated)
    prefill_end: int  # tokens of context to compute before its first sample

    @property
    def prefilling(self) -> bool:
        return self.num_cached < self.prefill_end


@dataclass(eq=False)
class Prefill:
    """A slice of a sequence's context computed in this step: tokens [start, start + n)."""

    state: SeqState
    start: int
    n: int
    prompt_logprobs: bool = False

    @property
    def sampled(self) -> bool:
        return self.start + self.n == self.state.prefill_end

    @property
    def token_ids(self) -> list[int]:
        return self.state.sampling.token_ids[self.start:self.start + self.n]



def build_context(prefill: list[Prefill], decode: list[SeqState], lora, *, tables: BlockTables,
              block_size: int, rotary, dtype: torch.dtype) -> StepContext:
    """The step's index tensors, built once on the host and copied without a sync (see
    device_copy.py), shared by every layer."""
    states = [w.state for w in prefill] + decode
    query_lens = [w.n for w in prefill] + [1] * len(decode)
    past_lens = [w.start for w in prefill] + [s.num_cached for s in decode]
    seq_lens = [p + q for p, q in zip(past_lens, query_lens)]
    num_prefill_tokens = sum(query_lens[:len(prefill)])
    starts = [0] * len(states)
    for i in range(1, len(states)):
        starts[i] = starts[i - 1] + query_lens[i - 1]
    num_tokens = num_prefill_tokens + len(decode)
    for table in rotary:
        table.ensure(max(seq_lens))

    dev = tables.device
    input_ids = [t for w in prefill for t in w.token_ids] + [s.last_token for s in decode]
    rows = tensor_on([s.row for s in states], dev)
    q_lens = tensor_on(query_lens, dev)
    seq_of_token = torch.repeat_interleave(torch.arange(len(states), device=dev), q_lens,
                                           output_size=num_tokens)
    offset = tensor_on([p - s for p, s in zip(past_lens, starts)], dev)
    positions = torch.arange(num_tokens, device=dev) + offset[seq_of_token]
    slot_mapping = _slots(tables, block_size, rows[seq_of_token], positions)
    seq_slots = [s.adapter_slot for s in states]
    token_slots = tensor_on(seq_slots, dev)[seq_of_token]

    decode_blocks = decode_lens = None
    decode_max_len = 0
    if decode:
        max_blocks = -(-max(seq_lens[len(prefill):]) // block_size)
        decode_max_len = max_blocks * block_size
        decode_lens = tensor_on(seq_lens[len(prefill):], dev)
        decode_blocks = tables.table[rows[len(prefill):], :max_blocks].flatten()
    # a slice after cached tokens attends to its pages, not only to its own rows
    prefill_pages = [None if w.start == 0 else
                     tables.table[w.state.row, :-(-seq_lens[i] // block_size)]
                     for i, w in enumerate(prefill)]

    logits_idx, sample_idx = _logit_rows(dev, prefill, starts, len(decode))
    return StepContext(
        input_ids=tensor_on(input_ids, dev), positions=positions,
        slot_mapping=slot_mapping, token_slots=token_slots,
        req_ids=[s.req_id for s in states], seq_slots=seq_slots, query_lens=query_lens,
        seq_lens=seq_lens, num_prefill_seqs=len(prefill),
        num_prefill_tokens=num_prefill_tokens, prefill_starts=starts[:len(prefill)],
        prefill_past=past_lens[:len(prefill)], prefill_pages=prefill_pages,
        decode_blocks=decode_blocks, decode_lens=decode_lens,
        decode_max_len=decode_max_len, logits_idx=logits_idx, sample_idx=sample_idx,
        dtype=dtype, lora=lora if any(s >= 0 for s in seq_slots) else None)

def _slots(tables: BlockTables, block_size: int, rows: torch.Tensor, positions: torch.Tensor
           ) -> torch.Tensor:
    """Flat cache slots of the given positions in the given block-table rows."""
    bs = block_size
    return tables.table[rows, positions // bs] * bs + positions % bs

def _logit_rows(dev, prefill: list[Prefill], starts: list[int], num_decode: int
                ) -> tuple[torch.Tensor, torch.Tensor | None]:
    """Rows that need logits (each sampled sequence's last token; every prompt token of
    a sequence asking prompt logprobs) and each sampled sequence's row among them (None:
    every logit row, in order; indexing [num_seqs, vocab] rows costs ~0.2 ms)."""
    works = prefill + [None] * num_decode
    if not any(w.prompt_logprobs for w in prefill):
        return tensor_on([start + (w.n if w else 1) - 1 for start, w in zip(starts, works)
                          if w is None or w.sampled], dev), None
    logit_rows, sample_rows = [], []
    for start, w in zip(starts, works):
        if w is not None and w.prompt_logprobs:
            logit_rows.extend(range(start, start + w.n))
        elif w is None or w.sampled:
            logit_rows.append(start + (w.n if w else 1) - 1)
        else:
            continue
        sample_rows.append(len(logit_rows) - 1)
    return tensor_on(logit_rows, dev), tensor_on(sample_rows, dev)
