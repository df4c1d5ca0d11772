"""ModelRunner: the worker's tensors. Loads the model, owns the KV cache and each running
sequence's state, and turns a `Step` into one forward pass and one token per sequence.

With tensor parallelism every rank runs the same step on its shard; rank 0 alone samples,
then broadcasts the step's tokens so that every rank's sequences advance alike (a failed
sequence is -1: every rank frees it). Only rank 0 returns results.
"""
from __future__ import annotations

import math
import os
from dataclasses import dataclass
from pathlib import Path

import torch

from loraxd.protocol.worker import NewSeq, SeqFailure, SeqOutput, Step
from loraxd.worker import loader
from loraxd.worker.device_copy import tensor_on
from loraxd.worker.distributed import TensorParallel
from loraxd.worker.kv_cache import BlockTables, PagedKVCache
from loraxd.worker.layers.attention import StepContext
from loraxd.worker.layers.grammar import Grammars
from loraxd.worker.layers.quantized import precision_problem
from loraxd.worker.layers.sampler import SeqSampling, prompt_logprobs, sample
from loraxd.worker.layers.watermark import Watermark
from loraxd.worker.models import CausalLM, UnsupportedModel, read_config_json, resolve
from loraxd.worker.triton_support import use_triton

__all__ = ["ModelRunner", "StepContext", "StepRejected", "UnsupportedModel"]

SPARE_BLOCKS = 4
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StepRejected(ValueError):
    """A step that names sequences or pages it cannot: refused before any computation,
    alike on every rank (so a tensor-parallel group stays in step)."""


@dataclass(eq=False)
class SeqState:
    req_id: int
    row: int  # of the block tables
    num_cached: int  # tokens whose K/V are in the cache
    last_token: int  # the input of its next decode step
    adapter_slot: int
    sampling: SeqSampling


def usable_cpus() -> int:
    """The CPUs this process may run on (its affinity mask), else os.cpu_count()."""
    try:
        return len(os.sched_getaffinity(0))
    except (AttributeError, OSError):
        return os.cpu_count() or 1


def resolve_dtype(dtype: str, device: str) -> torch.dtype:
    if dtype == "auto":
        return torch.bfloat16 if torch.device(device).type == "cuda" else torch.float32
    if dtype not in DTYPES:
        raise ValueError(f"dtype {dtype!r} is not supported; supported: auto, {', '.join(DTYPES)}")
    return DTYPES[dtype]


class ModelRunner:
    """`kernels`: "auto" (the Triton attention and LoRA kernels on CUDA when triton is
    installed, the torch code elsewhere), "torch", or "triton" (see triton_support.py).
    `quantize`: None, or "int8-weight-only" (see layers/quantized.py); a dtype or
    quantization this device cannot run fast is refused (UnsupportedModel)."""

    def __init__(self, model_dir: str, *, dtype: str = "float32", device: str = "cpu",
                 max_batch_total_tokens: int = 32768, block_size: int = 16,
                 num_threads: int = 0, tp: TensorParallel | None = None,
                 kernels: str = "auto", watermark_gamma: float = 0.5,
                 watermark_delta: float = 2.0, quantize: str | None = None):
        if torch.device(device).type == "cpu":
            torch.set_num_threads(num_threads or usable_cpus())
        self.device = torch.device(device)
        self.dtype = resolve_dtype(dtype, device)
        problem = precision_problem(self.dtype, quantize, self.device)
        if problem is not None:
            raise UnsupportedModel(problem)
        self.quantize = quantize
        self.kernels = "triton" if use_triton(kernels, self.device) else "torch"
        self.tp = tp or TensorParallel.single(self.device)
        self.model_dir = model_dir
        arch = resolve(model_dir)
        self.arch = arch
        self.architecture = arch.architecture
        self.eos_token_ids = loader.eos_token_ids(model_dir, read_config_json(model_dir))
        attention_kernels = None
        if self.kernels == "triton":
            from loraxd.worker.layers.triton_attention import TritonAttention
            attention_kernels = TritonAttention()
        with torch.inference_mode():
            self.model = CausalLM(arch, dtype=self.dtype, device=self.device, tp=self.tp,
                                  attention_kernels=attention_kernels, quantize=quantize)
            self.model.load_weights(loader.iter_weights(model_dir))
        self.num_layers = arch.num_layers
        # adapters are read and checked whole, then cut to this rank's shapes
        self.module_shapes: dict[str, tuple[int, int]] = arch.module_shapes()
        self.shard_shapes = self.model.shard.module_shapes()
        self.block_size = block_size
        self.num_blocks = math.ceil(max_batch_total_tokens / block_size) + SPARE_BLOCKS
        self.kv_cache = PagedKVCache(arch.num_layers, self.num_blocks, block_size,
                                     self.model.shard.num_kv_heads, arch.head_dim,
                                     dtype=self.dtype, device=self.device)
        self.tables = BlockTables(self.device, pad=self.kv_cache.null_block)
        self.seqs: dict[int, SeqState] = {}
        self.lora_pool = None  # see attach_lora
        # rank 0 alone samples, so it alone keeps grammar state and the watermark
        self.watermark = Watermark(watermark_gamma, watermark_delta)
        self.grammars = None
        if self.tp.rank == 0 and (Path(model_dir) / "tokenizer.json").exists():
            self.grammars = Grammars(model_dir, arch.vocab_size, list(self.eos_token_ids),
                                     num_threads=torch.get_num_threads())

    # -- LoRA: the slot pool lives in loraxd.worker.lora; the runner only hands it each
    # step's token slots and puts what it returns into the step context ----------------

    def attach_lora(self, pool) -> None:
        """`pool.step_context(token_slots) -> LoraStep | None` is then called for every step
        whose sequences use an adapter (unless execute gets an explicit `lora`)."""
        self.lora_pool = pool

    def enable_lora(self, num_slots: int, max_rank: int = 64) -> None:
        from loraxd.worker.lora import LoraSlotPool
        op = None  # the pool's default, TorchLoraOp
        if self.kernels == "triton":
            from loraxd.worker.lora.triton_op import TritonLoraOp
            op = TritonLoraOp()
        self.attach_lora(LoraSlotPool(num_slots, self.shard_shapes, self.num_layers,
                                      max_rank=max_rank, dtype=self.dtype, device=self.device,
                                      op=op))

    def read_adapter(self, path: str, limits=None):
        """Read and check a PEFT adapter (thread-safe; no slot is touched); `limits`: an
        `AdapterLimits`, checked before the weights are read."""
        from loraxd.worker.lora import load_peft_adapter
        return load_peft_adapter(path, self.module_shapes, self.num_layers, dtype=self.dtype,
                                 fused_modules=self.arch.fused_modules() or None,
                                 limits=limits)

    def install_adapter(self, slot: int, adapter) -> None:
        """Put a read adapter (whole, or merged whole) into slot `slot`, cut to this rank's
        shard; only between steps."""
        from loraxd.worker.lora.sharding import shard_adapter
        if self.lora_pool is None:
            raise RuntimeError("LoRA is not enabled on this worker (no slot pool)")
        self.lora_pool.load(slot, shard_adapter(adapter, self.model.shard.lora_parts(),
                                                self.tp.world_size))

    def load_adapter(self, slot: int, path: str) -> None:
        self.install_adapter(slot, self.read_adapter(path))

    def ready_info(self) -> dict:
        return {
            "num_blocks": self.num_blocks,
            "block_size": self.block_size,
            "vocab_size": self.arch.vocab_size,
            "eos_token_ids": list(self.eos_token_ids),
            "max_position_embeddings": self.arch.max_position_embeddings,
            "dtype": str(self.dtype).removeprefix("torch."),
            "quantize": self.quantize,
            "device": str(self.device),
            "architecture": self.architecture,
            "weight_bytes": self.model.weight_bytes(),
            "kv_cache_bytes": self.kv_cache.data.numel() * self.kv_cache.data.element_size(),
            **self._device_memory(),
        }

    def _device_memory(self) -> dict:
        if self.device.type != "cuda":
            return {"device_total_bytes": 0, "device_free_bytes": 0}
        free, total = torch.cuda.mem_get_info(self.device)
        return {"device_total_bytes": total, "device_free_bytes": free}

    # -- a step -------------------------------------------------------------------------

    def execute(self, step: Step, lora=None) -> list[SeqOutput | SeqFailure]:
        """One result per sequence of the step: its token, or why it failed (and is gone)."""
        self.forget(step.finished_ids)
        for req_id, block_ids in step.new_blocks.items():
            if req_id not in self.seqs:
                raise StepRejected(f"pages for request {req_id}, which is not running here")
            self.tables.append(self.seqs[req_id].row, block_ids)
        new: list[SeqState] = []
        try:
            try:
                for seq in step.new_seqs:
                    new.append(self._admit(seq))
                decode = [self._decoding(req_id) for req_id in step.decode_ids]
            except (KeyError, ValueError) as exc:
                raise StepRejected(exc.args[0] if exc.args else str(exc)) from exc
            if not new and not decode:
                return []
            with torch.inference_mode():
                return self._run(step.new_seqs, new, decode, lora)
        except BaseException:
            for state in new:  # a failed step leaves no half-admitted sequence behind
                self._free(state.req_id)
            raise

    def _run(self, new_seqs: list[NewSeq], new: list[SeqState], decode: list[SeqState],
             lora) -> list[SeqOutput | SeqFailure]:
        ctx = self._context(new_seqs, new, decode, lora)
        if ctx.lora is None and self.lora_pool is not None and max(ctx.seq_slots) >= 0:
            ctx.lora = self.lora_pool.step_context(self._host_token_slots(ctx))
        elif ctx.lora is not None and hasattr(ctx.lora, "prepare"):
            ctx.lora.prepare(ctx)
        hidden, residual = self.model.forward(ctx, self.kv_cache)
        logits = self.model.compute_logits(hidden, residual, ctx.logits_idx)  # rank 0 only
        states = new + decode
        result, prompt_lps, token_ids = None, {}, None
        if logits is not None:
            rows = logits if ctx.sample_idx is None else logits[ctx.sample_idx]  # [seqs, vocab]
            result = sample(rows, [s.sampling for s in states])
            prompt_lps = self._prompt_logprobs(logits, new_seqs)
            token_ids = result.token_ids  # -1: that sequence failed
        token_ids = self.tp.broadcast_ids(token_ids, len(states))
        outputs: list[SeqOutput | SeqFailure] = []
        for i, state in enumerate(states):
            token = token_ids[i]
            if token < 0:  # this sequence alone ends; the batch goes on
                self._free(state.req_id, clear=True)
                if result is not None:
                    failure = result.failures[i]
                    outputs.append(SeqFailure(state.req_id, failure.reason,
                                              failure.bad_request))
                continue
            state.num_cached = ctx.seq_lens[i]
            state.last_token = token
            state.sampling.accept(token)
            if result is not None:
                outputs.append(SeqOutput(state.req_id, token, result.logprobs[i],
                                         result.top_ids[i], result.top_logprobs[i],
                                         prompt_lps.get(i)))
        return outputs

    def forget(self, req_ids) -> None:
        """Drop the state of these sequences (finished, or failed); unknown ids are ignored."""
        for req_id in req_ids:
            self._free(req_id)

    def _admit(self, seq: NewSeq) -> SeqState:
        if not seq.prompt_ids:
            raise ValueError(f"request {seq.req_id}: empty prompt")
        if len(seq.block_ids) * self.block_size < len(seq.prompt_ids):
            raise ValueError(f"request {seq.req_id}: {len(seq.block_ids)} blocks cannot hold "
                             f"a prompt of {len(seq.prompt_ids)} tokens")
        self._free(seq.req_id)
        if not 0 <= seq.num_generated < len(seq.prompt_ids):
            raise ValueError(f"request {seq.req_id}: {seq.num_generated} generated tokens of "
                             f"{len(seq.prompt_ids)}")
        prompt_len = len(seq.prompt_ids) - seq.num_generated
        sampling = SeqSampling(seq.sampling, list(seq.prompt_ids), prompt_len,
                               grammar=self._grammar(seq, prompt_len),
                               watermark=self.watermark if seq.sampling.watermark else None)
        state = SeqState(seq.req_id, self.tables.add(seq.block_ids), 0, -1,
                         seq.adapter_slot, sampling)
        self.seqs[seq.req_id] = state
        return state

    def _grammar(self, seq: NewSeq, prompt_len: int):
        """The sequence's grammar state (rank 0), replayed over what it had generated."""
        if not seq.sampling.grammar or self.tp.rank != 0:
            return None
        if self.grammars is None:
            raise ValueError(f"request {seq.req_id}: constrained decoding needs the model's "
                             "tokenizer.json")
        return self.grammars.start(seq.sampling.grammar, list(seq.prompt_ids[prompt_len:]))

    def _decoding(self, req_id: int) -> SeqState:
        state = self.seqs.get(req_id)
        if state is None or state.num_cached == 0:
            raise KeyError(f"request {req_id} is not running here (decode before prefill)")
        if self.tables.lengths[state.row] * self.block_size <= state.num_cached:
            raise ValueError(f"request {req_id}: its {self.tables.lengths[state.row]} blocks "
                             f"have no room for token {state.num_cached + 1}")
        return state

    def _free(self, req_id: int, clear: bool = False) -> None:
        """`clear`: zero its pages too, for a sequence whose values may be NaN or inf."""
        state = self.seqs.pop(req_id, None)
        if state is not None:
            if clear:
                self.kv_cache.clear_blocks(self.tables.blocks(state.row))
            self.tables.free(state.row)

    def _prompt_logprobs(self, logits: torch.Tensor, new_seqs: list[NewSeq]
                         ) -> dict[int, list[float]]:
        """Sequence index -> prompt logprobs, for the new sequences that asked."""
        out, row = {}, 0
        for i, seq in enumerate(new_seqs):
            if seq.sampling.prompt_logprobs:
                n = len(seq.prompt_ids)
                out[i] = prompt_logprobs(logits[row:row + n], seq.prompt_ids)
                row += n
            else:
                row += 1
        return out

    # -- the step's index tensors, built once and shared by every layer ------------------
    # (on the host, then copied without a sync: see device_copy.py)

    @staticmethod
    def _host_token_slots(ctx: StepContext) -> torch.Tensor:
        """ctx.token_slots on the host, rebuilt from the per-sequence lists (reading the
        device copy back would be a sync)."""
        if ctx.token_slots.device.type == "cpu":
            return ctx.token_slots
        return torch.tensor(ctx.seq_slots).repeat_interleave(torch.tensor(ctx.query_lens))

    def _context(self, new_seqs: list[NewSeq], new: list[SeqState], decode: list[SeqState],
                 lora) -> StepContext:
        states = new + decode
        query_lens = [len(s.prompt_ids) for s in new_seqs] + [1] * len(decode)
        past_lens = [0] * len(new) + [s.num_cached for s in decode]
        seq_lens = [p + q for p, q in zip(past_lens, query_lens)]
        num_prefill_tokens = sum(query_lens[:len(new)])
        starts = [0] * len(states)
        for i in range(1, len(states)):
            starts[i] = starts[i - 1] + query_lens[i - 1]
        num_tokens = num_prefill_tokens + len(decode)
        for rotary in self.model.rotary.values():
            rotary.ensure(max(seq_lens))

        dev = self.device
        input_ids = [t for s in new_seqs for t in s.prompt_ids] + [s.last_token for s in decode]
        rows = tensor_on([s.row for s in states], dev)
        q_lens = tensor_on(query_lens, dev)
        seq_of_token = torch.repeat_interleave(torch.arange(len(states), device=dev), q_lens,
                                               output_size=num_tokens)
        offset = tensor_on([p - s for p, s in zip(past_lens, starts)], dev)
        positions = torch.arange(num_tokens, device=dev) + offset[seq_of_token]
        slot_mapping = self._slots(rows[seq_of_token], positions)
        seq_slots = [s.adapter_slot for s in states]
        token_slots = tensor_on(seq_slots, dev)[seq_of_token]

        decode_blocks = decode_lens = None
        decode_max_len = 0
        if decode:
            max_blocks = -(-max(seq_lens[len(new):]) // self.block_size)
            decode_max_len = max_blocks * self.block_size
            decode_lens = tensor_on(seq_lens[len(new):], dev)
            decode_blocks = self.tables.table[rows[len(new):], :max_blocks].flatten()

        logits_idx, sample_idx = self._logit_rows(new_seqs, starts, query_lens, len(decode))
        return StepContext(
            input_ids=tensor_on(input_ids, dev), positions=positions,
            slot_mapping=slot_mapping, token_slots=token_slots,
            req_ids=[s.req_id for s in states], seq_slots=seq_slots, query_lens=query_lens,
            seq_lens=seq_lens, num_prefill_seqs=len(new), num_prefill_tokens=num_prefill_tokens,
            prefill_starts=starts[:len(new)], decode_blocks=decode_blocks, decode_lens=decode_lens,
            decode_max_len=decode_max_len, logits_idx=logits_idx, sample_idx=sample_idx,
            dtype=self.dtype, lora=lora if any(s >= 0 for s in seq_slots) else None)

    def _slots(self, rows: torch.Tensor, positions: torch.Tensor) -> torch.Tensor:
        """Flat cache slots of the given positions in the given block-table rows."""
        bs = self.block_size
        return self.tables.table[rows, positions // bs] * bs + positions % bs

    def _logit_rows(self, new_seqs: list[NewSeq], starts: list[int], query_lens: list[int],
                    num_decode: int) -> tuple[torch.Tensor, torch.Tensor | None]:
        """Rows that need logits (each sequence's last token; every prompt token of a
        sequence asking prompt logprobs) and each sequence's sampling row among them (None:
        every logit row, in order; indexing [num_seqs, vocab] rows costs ~0.2 ms)."""
        dev = self.device
        last = [start + n - 1 for start, n in zip(starts, query_lens)]
        if not any(s.sampling.prompt_logprobs for s in new_seqs):
            return tensor_on(last, dev), None
        logit_rows, sample_rows = [], []
        for i, (start, n) in enumerate(zip(starts, query_lens)):
            if i < len(new_seqs) and new_seqs[i].sampling.prompt_logprobs:
                logit_rows.extend(range(start, start + n))
            else:
                logit_rows.append(start + n - 1)
            sample_rows.append(len(logit_rows) - 1)
        return tensor_on(logit_rows, dev), tensor_on(sample_rows, dev)
