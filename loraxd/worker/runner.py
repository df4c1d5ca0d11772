"""ModelRunner: the worker's tensors. Loads the model, owns the KV cache and each running
sequence's state, and turns a `Step` into one forward pass and one token per sequence.

With tensor parallelism every rank runs the same step on its shard; rank 0 alone samples,
then broadcasts the step's tokens so that every rank's sequences advance alike (a failed
sequence is -1: every rank frees it). Only rank 0 returns results.
"""
from __future__ import annotations

import os
from pathlib import Path

import torch

from loraxd.protocol.worker import NewSeq, SeqFailure, SeqOutput, Step
from loraxd.worker import kv_plan, loader
from loraxd.worker.distributed import TensorParallel
from loraxd.worker.kv_cache import BlockTables, PagedKVCache
from loraxd.worker.kv_plan import KvSizing
from loraxd.worker.layers.attention import StepContext
from loraxd.worker.step_inputs import Prefill, SeqState, build_context
from loraxd.worker.layers.grammar import Grammars
from loraxd.worker.layers.quantized import precision_problem
from loraxd.worker.layers.sampler import SeqSampling, prompt_logprobs, sample
from loraxd.worker.layers.watermark import Watermark
from loraxd.worker.models import CausalLM, UnsupportedModel, read_config_json, resolve
from loraxd.worker.triton_support import use_triton

__all__ = ["KvSizing", "ModelRunner", "StepContext", "StepRejected", "UnsupportedModel"]

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


class StepRejected(ValueError):
    """A step that names sequences or pages it cannot: refused before any computation,
    alike on every rank (so a tensor-parallel group stays in step)."""


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
                 max_batch_total_tokens: int | None = 32768, block_size: int = 16,
                 num_threads: int = 0, tp: TensorParallel | None = None,
                 kernels: str = "auto", watermark_gamma: float = 0.5,
                 watermark_delta: float = 2.0, kv: KvSizing | None = None,
                 lora_slots: int = 0, max_lora_rank: int = 64,
                 quantize: str | None = None, compile: bool = False):
        """`max_batch_total_tokens` None: the KV cache takes what fits (CUDA only; see
        KvSizing). `lora_slots` > 0: the LoRA slot pool is allocated before the cache, so
        that a cache sized from free memory leaves the slots their room. `compile`: decode
        steps replayed from CUDA graphs (see decode_graphs.py), captured here."""
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
            self.weights_read = loader.ReadCount()
            self.model.load_weights(loader.iter_weights(model_dir, self.weights_read))
        self.num_layers = arch.num_layers
        # adapters are read and checked whole, then cut to this rank's shapes
        self.module_shapes: dict[str, tuple[int, int]] = arch.module_shapes()
        self.shard_shapes = self.model.shard.module_shapes()
        self.block_size = block_size
        self.lora_pool = None  # see attach_lora
        if lora_slots:
            self.enable_lora(lora_slots, max_rank=max_lora_rank)
        self.num_blocks, self.kv_note = kv_plan.kv_blocks(self, max_batch_total_tokens,
                                                          kv or KvSizing())
        self.kv_cache = PagedKVCache(arch.num_layers, self.num_blocks, block_size,
                                     self.model.shard.num_kv_heads, arch.head_dim,
                                     dtype=self.dtype, device=self.device)
        self.tables = BlockTables(self.device, pad=self.kv_cache.null_block)
        self.seqs: dict[int, SeqState] = {}
        # rank 0 alone samples, so it alone keeps grammar state and the watermark
        self.watermark = Watermark(watermark_gamma, watermark_delta)
        self.grammars = None
        if self.tp.rank == 0 and (Path(model_dir) / "tokenizer.json").exists():
            self.grammars = Grammars(model_dir, arch.vocab_size, list(self.eos_token_ids),
                                     num_threads=torch.get_num_threads())
        self.graphs = None
        if compile:
            from loraxd.worker.decode_graphs import DecodeGraphs, compile_problem
            problem = compile_problem(self)
            if problem is not None:
                raise UnsupportedModel(f"compile: {problem}")
            with torch.inference_mode():
                self.graphs = DecodeGraphs(self)

    # -- LoRA: the slot pool lives in loraxd.worker.lora; the runner only hands it each
    # step's token slots and puts what it returns into the step context ----------------

    def attach_lora(self, pool) -> None:
        """`pool.step_context(token_slots) -> LoraStep | None` is then called for every step
        whose sequences use an adapter (unless execute gets an explicit `lora`)."""
        self.lora_pool = pool
        if getattr(self, "graphs", None) is not None:  # captured without it: again, with it
            from loraxd.worker.decode_graphs import DecodeGraphs
            with torch.inference_mode():
                self.graphs = DecodeGraphs(self, self.graphs.sizes)

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
            "device_uuid": self.device_uuid(),
        }

    def device_uuid(self) -> str:
        """The CUDA device's UUID, by which the supervisor reads it in NVML; "" on a CPU."""
        if self.device.type != "cuda":
            return ""
        return str(torch.cuda.get_device_properties(self.device).uuid)

    # -- a step -------------------------------------------------------------------------

    def execute(self, step: Step, lora=None) -> list[SeqOutput | SeqFailure]:
        """One result per sampled sequence of the step: its token, or why it failed (and is
        gone). A sequence whose prompt goes on in later steps has none."""
        self.forget(step.finished_ids)
        self.kv_cache.clear_blocks(step.clear_blocks)
        for req_id, block_ids in step.new_blocks.items():
            if req_id not in self.seqs:
                raise StepRejected(f"pages for request {req_id}, which is not running here")
            self.tables.append(self.seqs[req_id].row, block_ids)
        new: list[SeqState] = []
        try:
            try:
                prefill = []
                for seq in step.new_seqs:
                    new.append(self._admit(seq))
                    prefill.append(self._slice(new[-1], seq.num_computed or
                                               len(seq.prompt_ids) - seq.num_cached,
                                               seq.sampling.prompt_logprobs))
                prefill += [self._slice(self._running(req_id, prefilling=True), n)
                            for req_id, n in step.prefill_chunks.items()]
                decode = [self._decoding(req_id) for req_id in step.decode_ids]
                if self.lora_pool is not None:  # each adapter's rows together: its LoRA
                    # runs on one contiguous slice (results go by request id)
                    prefill.sort(key=lambda work: work.state.adapter_slot)
                    decode.sort(key=lambda state: state.adapter_slot)
            except (KeyError, ValueError) as exc:
                raise StepRejected(exc.args[0] if exc.args else str(exc)) from exc
            if not prefill and not decode:
                return []
            with torch.inference_mode():
                return self._run(prefill, decode, lora)
        except BaseException:
            for state in new:  # a failed step leaves no half-admitted sequence behind
                self._free(state.req_id)
            raise

    def _run(self, prefill: list[Prefill], decode: list[SeqState], lora
             ) -> list[SeqOutput | SeqFailure]:
        logits, sample_idx = None, None
        if self.graphs is not None and not prefill and lora is None:
            logits = self.graphs.logits(decode)
        if logits is None:
            logits, sample_idx = self._forward(prefill, decode, lora)
        for work in prefill:
            if not work.sampled:  # its prompt goes on in a later step
                work.state.num_cached = work.start + work.n
        sampled = [w.state for w in prefill if w.sampled] + decode
        if not sampled:
            return []
        result, prompt_lps, token_ids = None, {}, None
        if logits is not None:
            rows = logits if sample_idx is None else logits[sample_idx]  # [seqs, vocab]
            result = sample(rows, [s.sampling for s in sampled])
            prompt_lps = self._prompt_logprobs(logits, prefill)
            token_ids = result.token_ids  # -1: that sequence failed
        token_ids = self.tp.broadcast_ids(token_ids, len(sampled))
        outputs: list[SeqOutput | SeqFailure] = []
        for i, state in enumerate(sampled):
            token = token_ids[i]
            if token < 0:  # this sequence alone ends; the batch goes on
                self._free(state.req_id)  # the scheduler has its pages zeroed
                if result is not None:
                    failure = result.failures[i]
                    outputs.append(SeqFailure(state.req_id, failure.reason,
                                              failure.bad_request))
                continue
            state.num_cached = len(state.sampling.token_ids)
            state.last_token = token
            state.sampling.accept(token)
            if result is not None:
                outputs.append(SeqOutput(state.req_id, token, result.logprobs[i],
                                         result.top_ids[i], result.top_logprobs[i],
                                         prompt_lps.get(i)))
        return outputs

    def _forward(self, prefill: list[Prefill], decode: list[SeqState], lora
                 ) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """The step run eagerly: (logits of the rows that need them, on rank 0 only; each
        sampled sequence's row among them, None: every row in order)."""
        ctx = self._context(prefill, decode, lora)
        if ctx.lora is None and self.lora_pool is not None and max(ctx.seq_slots) >= 0:
            ctx.lora = self.lora_pool.step_context(self._host_token_slots(ctx))
        elif ctx.lora is not None and hasattr(ctx.lora, "prepare"):
            ctx.lora.prepare(ctx)
        hidden, residual = self.model.forward(ctx, self.kv_cache)
        if not decode and not any(w.sampled for w in prefill):
            return None, None
        return self.model.compute_logits(hidden, residual, ctx.logits_idx), ctx.sample_idx

    def forget(self, req_ids) -> None:
        """Drop the state of these sequences (finished, or failed); unknown ids are ignored."""
        for req_id in req_ids:
            self._free(req_id)

    def _admit(self, seq: NewSeq) -> SeqState:
        if not seq.prompt_ids:
            raise ValueError(f"request {seq.req_id}: empty prompt")
        if not 0 <= seq.num_cached < len(seq.prompt_ids):
            raise ValueError(f"request {seq.req_id}: {seq.num_cached} cached tokens of a "
                             f"prompt of {len(seq.prompt_ids)}")
        computed = seq.num_computed or len(seq.prompt_ids) - seq.num_cached
        if len(seq.block_ids) * self.block_size < seq.num_cached + computed:
            raise ValueError(f"request {seq.req_id}: {len(seq.block_ids)} blocks cannot hold "
                             f"{seq.num_cached + computed} tokens")
        self._free(seq.req_id)
        if not 0 <= seq.num_generated < len(seq.prompt_ids):
            raise ValueError(f"request {seq.req_id}: {seq.num_generated} generated tokens of "
                             f"{len(seq.prompt_ids)}")
        if seq.sampling.prompt_logprobs and seq.num_cached:
            raise ValueError(f"request {seq.req_id}: prompt logprobs need the whole prompt "
                             "computed, not taken from the cache")
        prompt_len = len(seq.prompt_ids) - seq.num_generated
        sampling = SeqSampling(seq.sampling, list(seq.prompt_ids), prompt_len,
                               grammar=self._grammar(seq, prompt_len),
                               watermark=self.watermark if seq.sampling.watermark else None)
        state = SeqState(seq.req_id, self.tables.add(seq.block_ids), seq.num_cached, -1,
                         seq.adapter_slot, sampling, len(seq.prompt_ids))
        self.seqs[seq.req_id] = state
        return state

    def _slice(self, state: SeqState, n: int, prompt_logprobs: bool = False) -> Prefill:
        """The next `n` tokens of `state`'s prompt, checked against its pages."""
        start = state.num_cached
        if not 0 < n <= state.prefill_end - start:
            raise ValueError(f"request {state.req_id}: {n} prompt tokens asked, "
                             f"{state.prefill_end - start} left")
        if prompt_logprobs and (start or n < state.prefill_end):
            raise ValueError(f"request {state.req_id}: prompt logprobs need the whole prompt "
                             "in one step")
        if self.tables.lengths[state.row] * self.block_size < start + n:
            raise ValueError(f"request {state.req_id}: its {self.tables.lengths[state.row]} "
                             f"blocks cannot hold {start + n} tokens")
        return Prefill(state, start, n, prompt_logprobs)

    def _grammar(self, seq: NewSeq, prompt_len: int):
        """The sequence's grammar state (rank 0), replayed over what it had generated."""
        if not seq.sampling.grammar or self.tp.rank != 0:
            return None
        if self.grammars is None:
            raise ValueError(f"request {seq.req_id}: constrained decoding needs the model's "
                             "tokenizer.json")
        return self.grammars.start(seq.sampling.grammar, list(seq.prompt_ids[prompt_len:]))

    def _running(self, req_id: int, prefilling: bool) -> SeqState:
        state = self.seqs.get(req_id)
        if state is None or state.prefilling != prefilling:
            what = "prefilling" if prefilling else "decoding"
            raise KeyError(f"request {req_id} is not {what} here")
        return state

    def _decoding(self, req_id: int) -> SeqState:
        state = self._running(req_id, prefilling=False)
        if self.tables.lengths[state.row] * self.block_size <= state.num_cached:
            raise ValueError(f"request {req_id}: its {self.tables.lengths[state.row]} blocks "
                             f"have no room for token {state.num_cached + 1}")
        return state

    def _free(self, req_id: int) -> None:
        state = self.seqs.pop(req_id, None)
        if state is not None:
            self.tables.free(state.row)

    def _prompt_logprobs(self, logits: torch.Tensor, prefill: list[Prefill]
                         ) -> dict[int, list[float]]:
        """Sampled-sequence index -> prompt logprobs, for the new sequences that asked (only
        sampled slices have logit rows)."""
        out, row = {}, 0
        for i, work in enumerate(w for w in prefill if w.sampled):
            if work.prompt_logprobs:
                out[i] = prompt_logprobs(logits[row:row + work.n], work.token_ids)
                row += work.n
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

    def _context(self, prefill: list[Prefill], decode: list[SeqState], lora) -> StepContext:
        return build_context(prefill, decode, lora, tables=self.tables, block_size=self.block_size,
                             rotary=self.model.rotary.values(), dtype=self.dtype)
