"""Constrained decoding in the worker: one grammar matcher per constrained sequence, and the
batch's token masks.

The library is llguidance (Rust, CPU). Measured on this project's 2-core CPU with the
SmolLM2 tokenizer (49152 tokens) and a typical schema (nested object, array, enum, pattern),
llguidance computes a mask in 14-39 us (median; mean 23-244 us, the first ~2-4 ms) and
builds a grammar in 1.4-20 ms; xgrammar computes one in ~2 us but spends 55-70 ms
compiling each schema, and silently ignores keywords it does not implement (`not`,
`uniqueItems`, `if`/`then`, `dependentRequired`), so its output could break the schema it
was given. llguidance names such keywords ("Unimplemented keys"), which the door turns into
a 422, and its mask time is well under a percent of a CPU decode step.

The supervisor turns a JSON schema into an llguidance grammar (loraxd.engine.grammar); it
travels in `SamplingParams.grammar`. Here each distinct grammar is built once (cached) and
copied per sequence. A sequence resumed on a new worker replays the tokens it had generated
through its fresh matcher, so it carries on in the same grammar state.
"""
from __future__ import annotations

import threading
from collections import OrderedDict
from pathlib import Path

import llguidance
import numpy as np
import torch

_CACHED_GRAMMARS = 64  # distinct grammars kept built; a copy per sequence is cheap
_BITS = torch.arange(32, dtype=torch.int32)


class SeqGrammar:
    """One sequence's position in its grammar."""

    def __init__(self, matcher: llguidance.LLMatcher | None, owner: Grammars,
                 failure: str | None = None):
        self.matcher = matcher  # None: it could not be built (`failure` says why)
        self.owner = owner  # computes the batch's masks
        self.failure = failure

    def error(self) -> str | None:
        """Why the grammar can go no further (not built, or an impossible token), else
        None: such a sequence is allowed no token and fails alone."""
        if self.failure is None and self.matcher.is_error():
            self.failure = self.matcher.get_error()
        return self.failure

    def accept(self, token_id: int) -> None:
        """Advance over the sampled token (a refused one leaves the matcher in error)."""
        if self.error() is None:
            self.matcher.consume_token(token_id)


class Grammars:
    """Builds matchers for one model's tokenizer; the tokenizer takes ~1 s to index, so that
    starts in a thread at construction and is waited for by the first constrained
    sequence."""

    def __init__(self, model_dir: str, vocab_size: int, eos_token_ids: list[int],
                 num_threads: int = 1):
        self.vocab_size = vocab_size
        self._tokenizer: llguidance.LLTokenizer | None = None
        self._failure: BaseException | None = None
        self._built: OrderedDict[str, llguidance.LLMatcher] = OrderedDict()
        self._executor = llguidance.LLExecutor(num_threads=max(1, num_threads))
        self._ready = threading.Thread(
            target=self._index, args=(Path(model_dir) / "tokenizer.json", list(eos_token_ids)),
            name="grammar-tokenizer", daemon=True)
        self._ready.start()

    def _index(self, path: Path, eos_token_ids: list[int]) -> None:
        try:
            self._tokenizer = llguidance.LLTokenizer(
                path.read_text(), n_vocab=self.vocab_size, eos_token=eos_token_ids or None)
        except BaseException as exc:  # noqa: BLE001 - reported to each constrained sequence
            self._failure = exc

    def start(self, grammar: str, generated_ids: list[int]) -> SeqGrammar:
        """A matcher at the start of `grammar`, advanced over `generated_ids` (a resume).
        Never raises: a grammar that cannot be built fails its own sequence only."""
        self._ready.join()
        if self._tokenizer is None:
            return SeqGrammar(None, self, f"the tokenizer could not be indexed for "
                              f"constrained decoding ({self._failure})")
        built = self._built.get(grammar)
        if built is None:
            try:
                built = llguidance.LLMatcher(self._tokenizer, grammar, log_level=0)
            except (ValueError, TypeError, RuntimeError) as exc:
                return SeqGrammar(None, self, f"the grammar cannot be built ({exc})")
            self._built[grammar] = built
            if len(self._built) > _CACHED_GRAMMARS:
                self._built.popitem(last=False)
        else:
            self._built.move_to_end(grammar)
        seq = SeqGrammar(built.deep_copy(), self)
        if generated_ids and seq.error() is None:
            seq.matcher.consume_tokens(generated_ids)
        return seq

    def allowed(self, grammars: list[SeqGrammar], device: torch.device) -> torch.Tensor:
        """[len(grammars), vocab_size] bool: the tokens each matcher allows next."""
        words = (self.vocab_size + 31) // 32
        bitmask = np.zeros((len(grammars), words), dtype=np.int32)  # error: nothing allowed
        live = [(g.matcher, i) for i, g in enumerate(grammars) if g.error() is None]
        if live:
            self._executor.unsafe_compute_mask_ptr(live, bitmask.ctypes.data, words * 4,
                                                   len(grammars))
        bits = (torch.from_numpy(bitmask)[:, :, None] >> _BITS) & 1  # [n, words, 32]
        return bits.reshape(len(grammars), -1)[:, :self.vocab_size].bool().to(device)
