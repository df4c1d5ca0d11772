"""The token embedding and the LM head, both vocab-parallel: each rank holds a contiguous
block of ceil(vocab / world_size) vocabulary rows (the last block zero-padded).

Vocab-parallel rather than replicated because these are the largest tensors of a model
(Llama 3 8B: 128k x 4096, 1 GiB each in bf16) and the LM head is the largest matmul of a
decode step: replicated, every rank would hold and multiply them whole, and a rank's memory
would not halve with two ranks. The cost is one all-reduce of the step's embeddings
([num_tokens, hidden], each row found on exactly one rank, so the sum is exact) and one
gather of the logit shards to rank 0, the only rank that samples (as vLLM's
VocabParallelEmbedding and ParallelLMHead). With one rank both are the plain lookup and
matmul, as before.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from loraxd.worker.distributed import TensorParallel
from loraxd.worker.layers.linear import make_kernel


class VocabParallelEmbedding:
    def __init__(self, vocab_size: int, hidden_size: int, tp: TensorParallel, *,
                 dtype: torch.dtype, device: str | torch.device):
        self.vocab_size, self.tp = vocab_size, tp
        self.rows_per_rank = -(-vocab_size // tp.world_size)
        self.start = tp.rank * self.rows_per_rank
        self.end = min(self.start + self.rows_per_rank, vocab_size)  # this rank's real rows
        self.weight = torch.zeros(self.rows_per_rank, hidden_size, dtype=dtype, device=device)

    def load(self, full) -> None:
        """The checkpoint's [vocab, hidden] table (a tensor, or a lazy one indexed like it);
        this rank reads only its rows."""
        if full.shape[0] != self.vocab_size:
            raise ValueError(f"an embedding of {full.shape[0]} rows for a vocabulary of "
                             f"{self.vocab_size}")
        self.weight[:self.end - self.start].copy_(full[self.start:self.end])

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        """[num_tokens, hidden] embeddings of input_ids [num_tokens], on every rank."""
        if self.tp.world_size == 1:
            return F.embedding(input_ids, self.weight)
        local = input_ids - self.start
        outside = (local < 0) | (local >= self.rows_per_rank)  # another rank's rows
        out = F.embedding(local.masked_fill(outside, 0), self.weight)
        out.masked_fill_(outside[:, None], 0)
        return self.tp.all_reduce(out)


class ParallelLMHead:
    """logits = hidden @ W^T over this rank's vocabulary rows, gathered on rank 0."""

    def __init__(self, weight: torch.Tensor, vocab_size: int, tp: TensorParallel, *,
                 quantize: str | None = None):
        """`weight`: this rank's [rows_per_rank, hidden] (the embedding's when tied; the
        embedding keeps its dense rows when the head is quantized)."""
        self.vocab_size, self.tp = vocab_size, tp
        self.kernel = make_kernel(weight, None, quantize=quantize)

    @property
    def num_bytes(self) -> int:
        return self.kernel.num_bytes

    def __call__(self, hidden: torch.Tensor) -> torch.Tensor | None:
        """[rows, vocab] logits in the model dtype on rank 0; None on the other ranks."""
        local = self.kernel(hidden)  # [rows, rows_per_rank]
        full = self.tp.gather_last_dim(local)
        if full is None or full.shape[-1] == self.vocab_size:
            return full
        return full[:, :self.vocab_size]  # the padding rows of the last block
