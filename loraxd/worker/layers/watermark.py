"""The watermark of Kirchenbauer et al. (2023), "A Watermark for Large Language Models", as
LoRAX (after TGI) applies it: before each token, the previous token seeds a generator
(`hash_key * previous token`); a random permutation of the vocabulary gives the green list,
its first `gamma` share; every green token's logit gets `+delta`. A detector that knows the
key counts green tokens: a watermarked text has far more than the `gamma` share.

The permutation is drawn on the CPU whatever the device, so a text is detectable with the
same key on any machine. Only the previous token matters, so a sequence resumed on a new
worker goes on with exactly the green lists it had.
"""
from __future__ import annotations

import torch

HASH_KEY = 15485863  # LoRAX's and TGI's default key


class Watermark:
    def __init__(self, gamma: float = 0.5, delta: float = 2.0, hash_key: int = HASH_KEY):
        if not 0.0 < gamma < 1.0:
            raise ValueError(f"watermark gamma must be in (0, 1), not {gamma}")
        self.gamma, self.delta, self.hash_key = gamma, delta, hash_key
        self._generator = torch.Generator()

    def green_ids(self, previous_token: int, vocab_size: int) -> torch.Tensor:
        """The green list that follows `previous_token` (CPU int64 ids)."""
        self._generator.manual_seed(self.hash_key * previous_token)
        permutation = torch.randperm(vocab_size, generator=self._generator)
        return permutation[:int(vocab_size * self.gamma)]

    def bias(self, scores: torch.Tensor, rows: list[int], previous_tokens: list[int]) -> None:
        """Add delta to the green tokens of each row in `rows` of scores [n, vocab], in place."""
        vocab = scores.shape[-1]
        green = torch.zeros((len(rows), vocab), dtype=torch.bool)
        for j, token in enumerate(previous_tokens):
            green[j, self.green_ids(token, vocab)] = True
        green = green.to(scores.device)
        scores[rows] = scores[rows] + green.to(scores.dtype) * self.delta

    def green_fraction(self, token_ids: list[int], vocab_size: int) -> float:
        """The share of tokens 1.. that are green given the token before (for detection)."""
        pairs = list(zip(token_ids, token_ids[1:]))
        if not pairs:
            return 0.0
        hits = sum(bool((self.green_ids(prev, vocab_size) == tok).any()) for prev, tok in pairs)
        return hits / len(pairs)
