"""The engine-side state of one request: tokens so far, text so far, KV pages, timing."""
from __future__ import annotations

import time
from dataclasses import dataclass, field

from loraxd.engine.detokenizer import IncrementalDetokenizer
from loraxd.engine.output import OutputText
from loraxd.engine.request import (Alternative, FinishEvent, GenerationRequest, PromptToken,
                                   TokenEvent)
from loraxd.protocol.worker import SeqOutput


@dataclass(eq=False)
class Sequence:
    req_id: int
    request: GenerationRequest
    detok: IncrementalDetokenizer
    arrival: float = field(default_factory=time.monotonic)
    adapter_slot: int = -1
    block_ids: list[int] = field(default_factory=list)
    num_cached: int = 0  # tokens whose K/V are in the cache
    # the prefix cache: the key chain of its full pages under `kv_root` (what computes its
    # K/V), and how many of its pages are entered in the cache
    kv_root: bytes = b""
    page_keys: list[bytes] = field(default_factory=list)
    num_keyed: int = 0
    output_ids: list[int] = field(default_factory=list)
    started: float | None = None
    finish_reason: str | None = None
    prefill: tuple[PromptToken, ...] = ()
    output: OutputText = field(init=False)  # the text: special tokens, stop sequence excluded

    def __post_init__(self):
        self.output = OutputText(self.detok, self.request.stop)

    @property
    def prompt_len(self) -> int:
        return len(self.request.prompt_ids)

    @property
    def context_ids(self) -> list[int]:
        """What a (re)prefill feeds the model: the prompt, then the tokens generated so far
        (some only when the sequence resumes on a new worker)."""
        return self.request.prompt_ids + self.output_ids

    @property
    def context_len(self) -> int:
        return self.prompt_len + len(self.output_ids)

    @property
    def max_len(self) -> int:
        return self.prompt_len + self.request.max_new_tokens

    def append(self, out: SeqOutput, eos_ids: frozenset[int], special_ids: frozenset[int],
               decode_one) -> TokenEvent:
        """Take one sampled token; sets `finish_reason` when the sequence is done."""
        req = self.request
        self.output_ids.append(out.token_id)
        special = out.token_id in special_ids
        text = self.output.push(out.token_id)
        delta = text.delta
        if out.token_id in eos_ids and not req.ignore_eos:
            self.finish_reason = "eos_token"
        elif text.stopped:
            self.finish_reason = "stop_sequence"
        elif len(self.output_ids) >= req.max_new_tokens:
            self.finish_reason = "length"
        if self.finish_reason is not None and not text.stopped:
            delta += self.output.release()
        alternatives = tuple(Alternative(i, decode_one(i), lp)
                             for i, lp in zip(out.top_ids, out.top_logprobs))
        return TokenEvent(out.token_id, decode_one(out.token_id) if special else text.piece,
                          out.logprob, special, alternatives, delta)

    def finish_event(self) -> FinishEvent:
        now = time.monotonic()
        started = self.started if self.started is not None else now
        sampling = self.request.sampling
        return FinishEvent(
            finish_reason=self.finish_reason or "length",
            generated_text=self.output.text,
            prompt_tokens=self.prompt_len,
            generated_tokens=len(self.output_ids),
            seed=sampling.seed if sampling.do_sample else None,
            prefill=self.prefill,
            queue_time_s=started - self.arrival,
            inference_time_s=now - started,
        )
