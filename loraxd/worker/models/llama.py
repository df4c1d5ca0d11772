"""The Llama family: Llama (and SmolLM2), Mistral, Qwen2, one decoder with config flags.

Hidden states are flat, `[num_tokens, hidden]` for the whole step. Each layer runs four
linears (fused q/k/v, o, fused gate/up, down), each with the LoRA hook after its matmul.
"""
from __future__ import annotations

from collections.abc import Callable, Iterable
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from loraxd.worker.kv_cache import PagedKVCache
from loraxd.worker.layers.attention import PagedAttention, StepContext
from loraxd.worker.layers.linear import (ColumnParallelLinear, DenseKernel, RowParallelLinear,
                                         no_all_reduce)
from loraxd.worker.layers.norm import RMSNorm
from loraxd.worker.layers.rotary import SUPPORTED_ROPE_TYPES, RotaryEmbedding, rope_type

ACTIVATIONS: dict[str, Callable[[torch.Tensor], torch.Tensor]] = {
    "silu": F.silu,
    "gelu": F.gelu,
    "gelu_pytorch_tanh": lambda x: F.gelu(x, approximate="tanh"),
}


class UnsupportedModel(Exception):
    """The model directory holds an architecture or a setting this worker cannot run."""


@dataclass(frozen=True)
class LlamaArch:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    rope_theta: float
    rope_scaling: dict | None
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str
    qkv_bias: bool  # Qwen2: q/k/v have biases, o has none
    o_bias: bool
    mlp_bias: bool
    sliding_windows: tuple[int | None, ...]  # per layer; None: full attention

    @classmethod
    def from_hf(cls, config: dict, architecture: str) -> LlamaArch:
        num_heads = config["num_attention_heads"]
        hidden = config["hidden_size"]
        num_layers = config["num_hidden_layers"]
        attention_bias = bool(config.get("attention_bias", False))
        is_qwen2 = architecture == "Qwen2ForCausalLM"
        arch = cls(
            architecture=architecture,
            vocab_size=config["vocab_size"],
            hidden_size=hidden,
            intermediate_size=config["intermediate_size"],
            num_layers=num_layers,
            num_heads=num_heads,
            num_kv_heads=config.get("num_key_value_heads") or num_heads,
            head_dim=config.get("head_dim") or hidden // num_heads,
            rms_norm_eps=config.get("rms_norm_eps", 1e-6),
            rope_theta=config.get("rope_theta", 10000.0),
            rope_scaling=config.get("rope_scaling"),
            max_position_embeddings=config.get("max_position_embeddings", 4096),
            tie_word_embeddings=bool(config.get("tie_word_embeddings", False)),
            hidden_act=config.get("hidden_act", "silu"),
            qkv_bias=is_qwen2 or attention_bias,
            o_bias=attention_bias and not is_qwen2,
            mlp_bias=bool(config.get("mlp_bias", False)),
            sliding_windows=_sliding_windows(config, architecture, num_layers),
        )
        arch.check()
        return arch

    def check(self) -> None:
        kind = rope_type(self.rope_scaling)
        if kind not in SUPPORTED_ROPE_TYPES:
            raise UnsupportedModel(f"rope_scaling type {kind!r} is not supported; "
                                   f"supported: {', '.join(SUPPORTED_ROPE_TYPES)}")
        if self.hidden_act not in ACTIVATIONS:
            raise UnsupportedModel(f"hidden_act {self.hidden_act!r} is not supported; "
                                   f"supported: {', '.join(ACTIVATIONS)}")
        if self.num_heads % self.num_kv_heads:
            raise UnsupportedModel(f"{self.num_heads} attention heads do not group over "
                                   f"{self.num_kv_heads} KV heads")

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-targetable module, by its HF name."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


def _sliding_windows(config: dict, architecture: str, num_layers: int
                     ) -> tuple[int | None, ...]:
    window = config.get("sliding_window")
    if window is None:
        return (None,) * num_layers
    layer_types = config.get("layer_types")
    if layer_types:
        return tuple(window if kind == "sliding_attention" else None for kind in layer_types)
    if architecture == "MistralForCausalLM":
        return (window,) * num_layers
    if architecture == "Qwen2ForCausalLM" and config.get("use_sliding_window"):
        first = config.get("max_window_layers", num_layers)
        return tuple(window if i >= first else None for i in range(num_layers))
    return (None,) * num_layers


class DecoderLayer:
    def __init__(self, arch: LlamaArch, layer_idx: int, *, dtype: torch.dtype,
                 device: str | torch.device, rank: int, world_size: int,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor]):
        h, d = arch.hidden_size, arch.head_dim
        if arch.num_kv_heads % world_size:
            raise UnsupportedModel(f"{arch.num_kv_heads} KV heads do not split over "
                                   f"{world_size} ranks")
        common = dict(rank=rank, world_size=world_size, dtype=dtype, device=device,
                      layer_idx=layer_idx)
        self.input_layernorm = RMSNorm(h, arch.rms_norm_eps, dtype=dtype, device=device)
        self.qkv_proj = ColumnParallelLinear(
            h, [arch.num_heads * d, arch.num_kv_heads * d, arch.num_kv_heads * d],
            bias=arch.qkv_bias, group="qkv", **common)
        self.attn = PagedAttention(layer_idx, arch.num_heads // world_size,
                                   arch.num_kv_heads // world_size, d, scale=d ** -0.5,
                                   sliding_window=arch.sliding_windows[layer_idx])
        self.o_proj = RowParallelLinear(arch.num_heads * d, h, bias=arch.o_bias, group="o",
                                        all_reduce=all_reduce, **common)
        self.post_attention_layernorm = RMSNorm(h, arch.rms_norm_eps, dtype=dtype,
                                                device=device)
        self.gate_up_proj = ColumnParallelLinear(
            h, [arch.intermediate_size] * 2, bias=arch.mlp_bias, group="gate_up", **common)
        self.down_proj = RowParallelLinear(arch.intermediate_size, h, bias=arch.mlp_bias,
                                           group="down", all_reduce=all_reduce, **common)
        self.act = ACTIVATIONS[arch.hidden_act]
        self.intermediate_per_rank = arch.intermediate_size // world_size

    def linears(self) -> list:
        return [self.qkv_proj, self.o_proj, self.gate_up_proj, self.down_proj]

    def parts(self) -> dict:
        """The loadable parts by name (see _LAYER_WEIGHTS)."""
        return {"qkv_proj": self.qkv_proj, "o_proj": self.o_proj,
                "gate_up_proj": self.gate_up_proj, "down_proj": self.down_proj,
                "input_layernorm": self.input_layernorm,
                "post_attention_layernorm": self.post_attention_layernorm}

    def forward(self, hidden: torch.Tensor, residual: torch.Tensor | None, ctx: StepContext,
                kv_cache: PagedKVCache) -> tuple[torch.Tensor, torch.Tensor]:
        hidden, residual = self.input_layernorm.forward(hidden, residual)
        qkv = self.qkv_proj.forward(hidden, ctx)  # [num_tokens, q|k|v]
        attn = self.attn.forward(qkv, ctx, kv_cache)  # [num_tokens, heads*head_dim]
        hidden = self.o_proj.forward(attn, ctx)
        hidden, residual = self.post_attention_layernorm.forward(hidden, residual)
        gate_up = self.gate_up_proj.forward(hidden, ctx)  # [num_tokens, gate|up]
        i = self.intermediate_per_rank
        hidden = self.act(gate_up[:, :i]).mul_(gate_up[:, i:])
        return self.down_proj.forward(hidden, ctx), residual


# HF module name -> (part of DecoderLayer.parts(), shard index in a fused linear)
_LAYER_WEIGHTS = {
    "self_attn.q_proj": ("qkv_proj", 0), "self_attn.k_proj": ("qkv_proj", 1),
    "self_attn.v_proj": ("qkv_proj", 2), "self_attn.o_proj": ("o_proj", 0),
    "mlp.gate_proj": ("gate_up_proj", 0), "mlp.up_proj": ("gate_up_proj", 1),
    "mlp.down_proj": ("down_proj", 0),
    "input_layernorm": ("input_layernorm", 0),
    "post_attention_layernorm": ("post_attention_layernorm", 0),
}


class LlamaForCausalLM:
    def __init__(self, arch: LlamaArch, *, dtype: torch.dtype, device: str | torch.device,
                 rank: int = 0, world_size: int = 1,
                 all_reduce: Callable[[torch.Tensor], torch.Tensor] = no_all_reduce):
        self.arch = arch
        self.dtype, self.device = dtype, device
        self.embed_tokens = torch.zeros(arch.vocab_size, arch.hidden_size, dtype=dtype,
                                        device=device)
        self.layers = [DecoderLayer(arch, i, dtype=dtype, device=device, rank=rank,
                                    world_size=world_size, all_reduce=all_reduce)
                       for i in range(arch.num_layers)]
        self.norm = RMSNorm(arch.hidden_size, arch.rms_norm_eps, dtype=dtype, device=device)
        self.lm_head_weight: torch.Tensor | None = None
        self.lm_head: DenseKernel | None = None
        self.rotary = RotaryEmbedding(arch.head_dim, arch.max_position_embeddings,
                                      arch.rope_theta, arch.rope_scaling, dtype=dtype,
                                      device=device)

    def load_weights(self, weights: Iterable[tuple[str, torch.Tensor]]) -> None:
        seen = set()
        for name, tensor in weights:
            if self._load_one(name, tensor.to(self.dtype)):
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
        for i in range(self.arch.num_layers):
            names += [f"model.layers.{i}.{module}.weight" for module in _LAYER_WEIGHTS]
        return names

    def _load_one(self, name: str, tensor: torch.Tensor) -> bool:
        if name == "model.embed_tokens.weight":
            self.embed_tokens.copy_(tensor)
        elif name == "model.norm.weight":
            self.norm.load(tensor)
        elif name == "lm_head.weight":
            if self.arch.tie_word_embeddings:
                return False
            self.lm_head_weight = tensor.to(self.device)
        elif name.startswith("model.layers."):
            return self._load_layer_weight(name, tensor)
        else:
            return False  # e.g. rotary_emb.inv_freq of old checkpoints
        return True

    def _load_layer_weight(self, name: str, tensor: torch.Tensor) -> bool:
        index, rest = name[len("model.layers."):].split(".", 1)
        module, _, kind = rest.rpartition(".")
        target = _LAYER_WEIGHTS.get(module)
        if target is None or kind not in ("weight", "bias"):
            return False
        attr, shard = target
        part = self.layers[int(index)].parts()[attr]
        if isinstance(part, RMSNorm):
            part.load(tensor)
        elif kind == "weight":
            part.load_weight(tensor, shard)
        elif part.bias is not None:
            part.load_bias(tensor, shard)
        else:
            return False
        return True

    def _finalize(self) -> None:
        for layer in self.layers:
            for linear in layer.linears():
                linear.finalize()
        head = self.embed_tokens if self.arch.tie_word_embeddings else self.lm_head_weight
        self.lm_head = DenseKernel(head)
        self.lm_head_weight = None

    def forward(self, ctx: StepContext, kv_cache: PagedKVCache
                ) -> tuple[torch.Tensor, torch.Tensor]:
        """The last layer's (output, residual), each [num_tokens, hidden]; their sum is the
        final hidden state before the last norm (applied in compute_logits, on fewer rows)."""
        ctx.rope_cos, ctx.rope_sin = self.rotary.tables(ctx.positions)
        hidden = F.embedding(ctx.input_ids, self.embed_tokens)  # [num_tokens, hidden]
        residual = None
        for layer in self.layers:
            hidden, residual = layer.forward(hidden, residual, ctx, kv_cache)
        return hidden, residual

    def compute_logits(self, hidden: torch.Tensor, residual: torch.Tensor,
                       rows: torch.Tensor) -> torch.Tensor:
        """fp32 logits [len(rows), vocab] of the given token rows."""
        if rows.shape[0] != hidden.shape[0]:  # rows ascend: as many as tokens means all
            hidden, residual = hidden[rows], residual[rows]
        normed, _ = self.norm.forward(hidden, residual)
        return self.lm_head(normed).float()

