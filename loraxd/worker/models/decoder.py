"""One decoder for every supported family, shaped by its `ModelArch` (see arch.py).

Hidden states are flat, `[num_tokens, hidden]` for the whole step. Each layer runs four
linears (fused q/k/v, o, fused gate/up, down), each with the LoRA hook after its matmul.
The families differ only in what the arch's flags switch on: per-head q/k norms, Gemma's
sandwich norms, embedding scaling and soft-capping, per-layer-type rotary tables.
"""
from __future__ import annotations

import typing
from collections.abc import Callable, Iterable

import torch
import torch.nn.functional as F

from loraxd.worker.cpu_kernels import small_ops
from loraxd.worker.distributed import TensorParallel
from loraxd.worker.kv_cache import PagedKVCache
from loraxd.worker.layers.attention import PagedAttention, StepContext
from loraxd.worker.layers.embedding import ParallelLMHead, VocabParallelEmbedding
from loraxd.worker.layers.linear import ColumnParallelLinear, RowParallelLinear
from loraxd.worker.layers.norm import RMSNorm
from loraxd.worker.layers.rotary import RotaryEmbedding
from loraxd.worker.models.arch import ModelArch
from loraxd.worker.models.hf_config import UnsupportedModel
from loraxd.worker.models.sharding import ModelShard, shard_model

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


def gated_activation(act: Callable[[torch.Tensor], torch.Tensor], gate_up: torch.Tensor,
                     i: int) -> torch.Tensor:
    """act(gate) * up of gate_up [num_tokens, gate|up] (each i wide): silu on a CPU in one
    call of small_ops (no slices, no second pass), every other case in torch."""
    if act is F.silu and gate_up.shape[1] == 2 * i and small_ops.covers(gate_up):
        return small_ops.silu_mul(gate_up)
    return act(gate_up[:, :i]).mul_(gate_up[:, i:])


class DecoderLayer:
    def __init__(self, shard: ModelShard, layer_idx: int, *, dtype: torch.dtype,
                 device: str | torch.device,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor], attention_kernels=None):
        arch = shard.arch
        h, d = arch.hidden_size, arch.head_dim
        common = dict(rank=shard.shard.rank, world_size=shard.world_size, dtype=dtype,
                      device=device, layer_idx=layer_idx)

        def norm(size: int = h) -> RMSNorm:
            return RMSNorm(size, arch.rms_norm_eps, dtype=dtype, device=device,
                           offset=arch.norm_offset)

        self.norms = {"input_layernorm": norm(), "post_attention_layernorm": norm()}
        if arch.sandwich_norms:
            self.norms.update(pre_feedforward_layernorm=norm(), post_feedforward_layernorm=norm())
        qk_norms = None
        if arch.qk_norm:
            self.norms.update({"self_attn.q_norm": norm(d), "self_attn.k_norm": norm(d)})
            qk_norms = (self.norms["self_attn.q_norm"], self.norms["self_attn.k_norm"])
        self.sandwich = arch.sandwich_norms
        self.qkv_proj = ColumnParallelLinear(
            h, [arch.num_heads * d, arch.num_kv_heads * d, arch.num_kv_heads * d],
            bias=arch.qkv_bias, group="qkv", replicas=[1, shard.kv_replicas, shard.kv_replicas],
            **common)
        layer_type = arch.layer_types[layer_idx]
        self.attn = PagedAttention(layer_idx, shard.num_heads, shard.num_kv_heads, d,
                                   scale=arch.attn_scale,
                                   sliding_window=arch.sliding_windows[layer_idx],
                                   rope_key=layer_type, qk_norms=qk_norms,
                                   softcap=arch.attn_softcap, kernels=attention_kernels)
        self.o_proj = RowParallelLinear(arch.num_heads * d, h, bias=arch.o_bias, group="o",
                                        all_reduce=all_reduce, **common)
        self.gate_up_proj = ColumnParallelLinear(
            h, [arch.intermediate_size] * 2, bias=arch.mlp_bias, group="gate_up", **common)
        self.down_proj = RowParallelLinear(arch.intermediate_size, h, bias=arch.mlp_bias,
                                           group="down", all_reduce=all_reduce, **common)
        self.act = ACTIVATIONS[arch.hidden_act]
        self.intermediate_per_rank = shard.intermediate_size

    def linears(self) -> list:
        return [self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj]

    def parts(self) -> dict:
        """The loadable parts by HF module name (relative to the layer)."""
        return {"self_attn.qkv_proj": self.qkv_proj, "self_attn.o_proj": self.o_proj,
                "mlp.gate_up_proj": self.gate_up_proj, "mlp.down_proj": self.down_proj,
                **self.norms}

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, ctx: StepContext,
                kv_cache: PagedKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        norms = self.norms
        hidden, residual = norms["input_layernorm"].forward(hidden, residual)
        qkv = self.qkv_proj.forward(hidden, ctx)  # [num_tokens, q|k|v]
        attn = self.attn.forward(qkv, ctx, kv_cache)  # [num_tokens, heads*head_dim]
        hidden = self.o_proj.forward(attn, ctx)
        if self.sandwich:  # Gemma: norm the attention output alone, then add the residual
            hidden, _ = norms["post_attention_layernorm"].forward(hidden)
            hidden, residual = norms["pre_feedforward_layernorm"].forward(hidden, residual)
        else:
            hidden, residual = norms["post_attention_layernorm"].forward(hidden, residual)
        gate_up = self.gate_up_proj.forward(hidden, ctx)  # [num_tokens, gate|up]
        i = self.intermediate_per_rank
        hidden = gated_activation(self.act, gate_up, i)
        hidden = self.down_proj.forward(hidden, ctx)
        if self.sandwich:
            hidden, _ = norms["post_feedforward_layernorm"].forward(hidden)
        return hidden, residual


# HF module name (relative to a layer) -> (part of DecoderLayer.parts(), shard in a fused
# linear; None: the checkpoint holds the whole fused linear, as Phi-3's does)
_LAYER_WEIGHTS = {
    "self_attn.q_proj": ("self_attn.qkv_proj", 0), "self_attn.k_proj": ("self_attn.qkv_proj", 1),
    "self_attn.v_proj": ("self_attn.qkv_proj", 2), "self_attn.o_proj": ("self_attn.o_proj", 0),
    "mlp.gate_proj": ("mlp.gate_up_proj", 0), "mlp.up_proj": ("mlp.gate_up_proj", 1),
    "mlp.down_proj": ("mlp.down_proj", 0),
}
_FUSED_WEIGHTS = {"self_attn.qkv_proj": ("self_attn.qkv_proj", None),
                  "mlp.gate_up_proj": ("mlp.gate_up_proj", None),
                  "self_attn.o_proj": ("self_attn.o_proj", 0),
                  "mlp.down_proj": ("mlp.down_proj", 0)}


class _CastOnRead:
    """A checkpoint tensor whose reads come in the model's dtype (slicing then casting gives
    what casting then slicing gave: the cast is elementwise)."""

    def __init__(self, tensor, dtype: torch.dtype):
        self.tensor, self.dtype = tensor, dtype
        self.shape = tuple(tensor.shape)

    def __getitem__(self, index) -> torch.Tensor:
        return self.tensor[index].to(self.dtype)


class CausalLM:
    """The whole model, or with `tp` over N ranks this rank's shard of it (see
    models/sharding.py and layers/embedding.py for what each rank holds).
    `attention_kernels`: see PagedAttention (None: the torch path). `quantize`: how the
    linears and the LM head hold their weights (see layers/quantized.py); the embedding
    stays in `dtype` (a lookup reads a few rows: nothing to gain)."""

    def __init__(self, arch: ModelArch, *, dtype: torch.dtype, device: str | torch.device,
                 tp: TensorParallel | None = None, attention_kernels=None,
                 quantize: str | None = None):
        self.arch = arch
        self.dtype, self.device = dtype, device
        self.quantize = quantize
        self.tp = tp or TensorParallel.single(device)
        self.shard = shard_model(arch, self.tp.shard)
        self.embed_tokens = VocabParallelEmbedding(arch.vocab_size, arch.hidden_size, self.tp,
                                                   dtype=dtype, device=device)
        self.embedding_scale = None
        if arch.embedding_scale is not None:  # as transformers: the fp32 scalar cast first
            self.embedding_scale = torch.tensor(arch.embedding_scale).to(dtype)
        self.layers = [DecoderLayer(self.shard, i, dtype=dtype, device=device,
                                    all_reduce=self.tp.all_reduce,
                                    attention_kernels=attention_kernels)
                       for i in range(arch.num_layers)]
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype=dtype, device=device,
                            offset=arch.norm_offset)
        self.lm_head_weight: VocabParallelEmbedding | None = None  # untied: its rows
        self.lm_head: ParallelLMHead | None = None
        self.rotary = {kind: RotaryEmbedding(arch.head_dim, arch.max_position_embeddings,
                                             spec, arch.config, dtype=dtype, device=device)
                       for kind, spec in arch.rope.items()}
        self.layer_weights = _FUSED_WEIGHTS if arch.fused_checkpoint else _LAYER_WEIGHTS

    def load_weights(self, weights: Iterable[tuple[str, typing.Any]]) -> None:
        """(name, tensor) pairs: whole tensors, or loader.CheckpointTensor, of which each
        layer reads only this rank's part."""
        seen = set()
        for name, tensor in weights:
            if self._load_one(name, _CastOnRead(tensor, self.dtype)):
                seen.add(name)
        missing = [n for n in self._required_weights() if n not in seen]
        if missing:
            raise UnsupportedModel(f"weights missing from the model directory: "
                                   f"{', '.join(missing[:5])}{' …' if len(missing) > 5 else ''}")
        self._finalize()

    def _required_weights(self) -> list[str]:
        names = ["model.embed_tokens.weight", "model.norm.weight"]
        if not self.arch.tie_word_embeddings:
            names.append("lm_head.weight")
        modules = [*self.layer_weights, *self.layers[0].norms] if self.layers else []
        for i in range(self.arch.num_layers):
            names += [f"model.layers.{i}.{module}.weight" for module in modules]
        return names

    def _load_one(self, name: str, tensor: torch.Tensor) -> bool:
        if name == "model.embed_tokens.weight":
            self.embed_tokens.load(tensor)
        elif name == "model.norm.weight":
            self.norm.load(tensor[()])
        elif name == "lm_head.weight":
            if self.arch.tie_word_embeddings:
                return False
            self.lm_head_weight = VocabParallelEmbedding(
                self.arch.vocab_size, self.arch.hidden_size, self.tp, dtype=self.dtype,
                device=self.device)
            self.lm_head_weight.load(tensor)
        elif name.startswith("model.layers."):
            return self._load_layer_weight(name, tensor)
        else:
            return False  # e.g. rotary_emb.inv_freq of old checkpoints
        return True

    def _load_layer_weight(self, name: str, tensor: torch.Tensor) -> bool:
        index, rest = name[len("model.layers."):].split(".", 1)
        module, _, kind = rest.rpartition(".")
        layer = self.layers[int(index)]
        if module in layer.norms:
            if kind != "weight":
                return False
            layer.norms[module].load(tensor[()])
            return True
        target = self.layer_weights.get(module)
        if target is None or kind not in ("weight", "bias"):
            return False
        attr, shard = target
        part = layer.parts()[attr]
        if kind == "bias" and part.bias is None:
            return False
        load = part.load_weight if kind == "weight" else part.load_bias
        if shard is None:
            part.load_fused(tensor, load)
        else:
            load(tensor, shard)
        return True

    def _finalize(self) -> None:
        for layer in self.layers:
            for linear in layer.linears():
                linear.finalize(quantize=self.quantize)
        head = self.embed_tokens if self.arch.tie_word_embeddings else self.lm_head_weight
        self.lm_head = ParallelLMHead(head.weight, self.arch.vocab_size, self.tp,
                                      quantize=self.quantize)
        self.lm_head_weight = None

    def weight_bytes(self) -> int:
        """Bytes of this rank's weights as they sit on the device (packed kernels included;
        norms and rotary tables are not weights and are left out, a few KB)."""
        kernels = [linear.kernel for layer in self.layers for linear in layer.linears()]
        biases = [linear.bias for layer in self.layers for linear in layer.linears()
                  if linear.bias is not None]  # row-parallel biases added after the sum
        weight = self.embed_tokens.weight
        shared = self.lm_head.kernel.weight is weight  # tied and unpacked: one tensor
        return (sum(k.num_bytes for k in kernels) + (0 if shared else self.lm_head.num_bytes)
                + sum(b.numel() * b.element_size() for b in biases)
                + weight.numel() * weight.element_size())

    def forward(self, ctx: StepContext, kv_cache: PagedKVCache
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer's (output, residual), each [num_tokens, hidden]; their sum is the
        final hidden state before the last norm (applied in compute_logits, on fewer rows)."""
        ctx.rope = {kind: rotary.tables(ctx.positions) for kind, rotary in self.rotary.items()}
        hidden = self.embed_tokens.forward(ctx.input_ids)  # [num_tokens, hidden]
        if self.embedding_scale is not None:
            hidden = hidden * self.embedding_scale
        residual = None
        for layer in self.layers:
            hidden, residual = layer.forward(hidden, residual, ctx, kv_cache)
        return hidden, residual

    def compute_logits(self, hidden: torch.Tensor, residual: torch.Tensor,
                       rows: torch.Tensor) -> torch.Tensor | None:
        """fp32 logits [len(rows), vocab] of the given token rows, on rank 0 (every rank
        must call it: the logit shards are gathered); None on the other ranks."""
        if rows.shape[0] != hidden.shape[0]:  # rows ascend: as many as tokens means all
            hidden, residual = hidden[rows], residual[rows]
        normed, _ = self.norm.forward(hidden, residual)
        logits = self.lm_head(normed)
        if logits is None:
            return None
        logits = logits.float()
        cap = self.arch.final_softcap
        if cap is not None:
            logits = torch.tanh(logits / cap).mul_(cap)
        return logits
