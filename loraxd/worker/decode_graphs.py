"""`compile`: decode steps replayed from CUDA graphs, LoRAX's meaning of `--compile`.

A decode step of n sequences replays the graph captured for the smallest size b >= n of
`CAPTURE_SIZES`: its inputs are copied into fixed buffers, rows n..b padded (token 0 at
position 0, no adapter, a page table of the null page), and the graph runs the forward pass
and the LM head over them, the batch's adapters included (the Triton LoRA kernels list every
row and skip those of slot -1). At its end the graph zeroes the null page again, which the
padding rows wrote: the page must stay zeros for the torch paths' masked reads. Prefill
steps, bigger batches and explicit LoRA steps run eagerly, as without `compile`.

A graph holds the address of every tensor it touches, so all that it reads stays put: the KV
cache, the adapter slot pool, the rotary tables (grown once, at capture, to every position
the cache can hold), and the LoRA kernels' rank tables (refilled in place when adapters
change). Host values a kernel takes as arguments are fixed per size: the page tables are as
wide as the longest sequence the cache can hold, and each sequence's length bounds its
attention loop on the device.

On a CPU (the tests, with the Triton kernels in the interpreter) the same buffers and
contexts are used and a "replay" runs the forward pass eagerly over them: what the CPU
proves is that the padded, fixed-shape step gives the eager step's tokens.
"""
from __future__ import annotations

import logging
import time
from collections.abc import Callable

import torch

from loraxd.worker.device_copy import to_device
from loraxd.worker.layers.attention import StepContext
from loraxd.worker.step_inputs import SeqState

log = logging.getLogger(__name__)

CAPTURE_SIZES = (1, 2, 4, 8, 16, 32, 64, 96, 128)  # LoRAX's decode batch sizes


def compile_problem(runner) -> str | None:
    """Why this runner cannot replay its decode steps from graphs; None if it can."""
    from loraxd.worker.triton_support import interpreting

    if runner.device.type != "cuda" and not interpreting():
        return "CUDA graphs of the decode step need device = cuda"
    if runner.kernels != "triton":
        return "CUDA graphs need the Triton kernels (pip install 'loraxd[gpu]')"
    if runner.tp.world_size > 1:
        return "CUDA graphs with tensor parallelism (num_shard > 1) are not built yet"
    return None


class DecodeGraphs:
    """Fixed input buffers for decode batches of up to max(sizes) sequences, and one
    replay per size (a CUDA graph on CUDA, the eager forward pass elsewhere)."""

    def __init__(self, runner, sizes: tuple[int, ...] = CAPTURE_SIZES):
        self.runner = runner
        self.sizes = tuple(sorted(set(sizes)))
        dev, bs = runner.device, runner.block_size
        cache_tokens = runner.num_blocks * bs
        self.width = -(-min(runner.arch.max_position_embeddings, cache_tokens) // bs)
        self.max_positions = self.width * bs
        n = self.sizes[-1]
        self.null_slot = runner.kv_cache.null_block * bs
        self.host = torch.zeros(4, n, dtype=torch.long)  # ids, positions, lens, slots
        self.inputs = torch.zeros(4, n, dtype=torch.long, device=dev)
        self.input_ids, self.positions, self.lens, _ = self.inputs
        self.token_slots = torch.full((n,), -1, dtype=torch.int32, device=dev)
        self.slot_mapping = torch.full((n,), self.null_slot, dtype=torch.long, device=dev)
        self.blocks = torch.full((n, self.width), runner.kv_cache.null_block, dtype=torch.long,
                                 device=dev)
        self.logit_rows = torch.arange(n, dtype=torch.long, device=dev)
        for table in runner.model.rotary.values():
            table.ensure(self.max_positions)
        self._rotary = self._rotary_tables()
        self._replays: dict[int, Callable[[], torch.Tensor]] = {}
        start = time.monotonic()
        self._capture(dev.type == "cuda")
        self.capture_s = time.monotonic() - start
        self.replayed = 0  # decode steps served from the replays (for tests and metrics)

    # -- capture -----------------------------------------------------------------------

    def _capture(self, cuda: bool) -> None:
        self._pad(0, self.sizes[-1])
        if self.runner.lora_pool is not None:
            self.runner.lora_pool.sync_static()
        pool = torch.cuda.graph_pool_handle() if cuda else None
        for b in reversed(self.sizes):  # the largest first: the smaller reuse its memory
            ctx = self._context(b)
            step = lambda ctx=ctx: self._forward(ctx)  # noqa: E731
            if not cuda:
                self._replays[b] = step
                continue
            side = torch.cuda.Stream()
            side.wait_stream(torch.cuda.current_stream())
            with torch.cuda.stream(side):  # compiles the kernels outside the capture
                step()
                step()
            torch.cuda.current_stream().wait_stream(side)
            graph = torch.cuda.CUDAGraph()
            with torch.cuda.graph(graph, pool=pool):
                out = step()
            self._replays[b] = lambda graph=graph, out=out: (graph.replay(), out)[1]
        if cuda:
            torch.cuda.synchronize()

    def _context(self, b: int) -> StepContext:
        pool = self.runner.lora_pool
        return StepContext(
            input_ids=self.input_ids[:b], positions=self.positions[:b],
            slot_mapping=self.slot_mapping[:b], token_slots=self.token_slots[:b],
            req_ids=[-1] * b, seq_slots=[-1] * b, query_lens=[1] * b,
            seq_lens=[self.max_positions] * b, num_prefill_seqs=0, num_prefill_tokens=0,
            prefill_starts=[], decode_blocks=self.blocks[:b].flatten(),
            decode_lens=self.lens[:b], decode_max_len=self.max_positions,
            logits_idx=self.logit_rows[:b], sample_idx=None, dtype=self.runner.dtype,
            lora=None if pool is None else pool.static_context(self.token_slots[:b]))

    def _forward(self, ctx: StepContext) -> torch.Tensor:
        model, cache = self.runner.model, self.runner.kv_cache
        hidden, residual = model.forward(ctx, cache)
        logits = model.compute_logits(hidden, residual, ctx.logits_idx)
        bs = cache.block_size
        cache.data[:, self.null_slot:self.null_slot + bs].zero_()
        return logits

    # -- a step --------------------------------------------------------------------------

    def size_for(self, decode: list[SeqState]) -> int | None:
        """The captured size that serves this decode batch; None: it runs eagerly."""
        n = len(decode)
        if not decode or n > self.sizes[-1]:
            return None
        if max(s.num_cached for s in decode) >= self.max_positions:
            return None
        if self._rotary_tables() != self._rotary:  # grown past the capture: moved
            return None
        return next(b for b in self.sizes if b >= n)

    def logits(self, decode: list[SeqState]) -> torch.Tensor | None:
        """fp32 logits [len(decode), vocab] of this decode batch from its replay, or None
        when it has none (then the caller runs the step eagerly)."""
        b = self.size_for(decode)
        if b is None:
            return None
        n = len(decode)
        tables, bs = self.runner.tables, self.runner.block_size
        host = self.host[:, :b]
        host[0, :n] = torch.tensor([s.last_token for s in decode])
        host[1, :n] = torch.tensor([s.num_cached for s in decode])
        host[3, :n] = torch.tensor([s.adapter_slot for s in decode])
        host[2, :n] = host[1, :n] + 1
        self._pad(n, b)
        self.inputs[:, :b].copy_(to_device(host, self.inputs.device))
        self.token_slots[:b].copy_(self.inputs[3, :b])
        rows = to_device(torch.tensor([s.row for s in decode]), self.inputs.device)
        cols = min(self.width, tables.table.shape[1])
        self.blocks[:n, :cols].copy_(tables.table[rows, :cols])
        pos = self.positions[:n]
        self.slot_mapping[:n].copy_(tables.table[rows, pos // bs] * bs + pos % bs)
        if self.runner.lora_pool is not None:
            self.runner.lora_pool.sync_static()
        self.replayed += 1
        return self._replays[b]()[:n]

    def _pad(self, n: int, b: int) -> None:
        """Rows n..b of the buffers: token 0 at position 0 on the null page, no adapter."""
        if n == b:
            return
        self.host[:, n:b] = torch.tensor([0, 0, 1, -1])[:, None]
        self.blocks[n:b].fill_(self.runner.kv_cache.null_block)
        self.slot_mapping[n:b].fill_(self.null_slot)
        if n == 0:  # at capture: the device copies too
            self.inputs[:, :b].copy_(self.host[:, :b])
            self.token_slots[:b].fill_(-1)

    def _rotary_tables(self) -> list[int]:
        return [t.cos.data_ptr() for t in self.runner.model.rotary.values()]
