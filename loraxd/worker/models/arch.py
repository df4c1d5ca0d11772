"""What the decoder needs to know of a model, read from its transformers config.

One `ModelArch` describes every supported family: the Llama shape (Llama, SmolLM2, Mistral,
Qwen2), Qwen3 (per-head q/k RMSNorm), Gemma 2 and 3 (sandwich norms, `(1 + w)` weights,
embedding scaling, soft-capping, alternating sliding-window layers) and Phi-3 (fused
`qkv_proj` / `gate_up_proj` in the checkpoint). Each family has a reader below; a field it
does not read is checked by `Fields.check_rest`, so nothing that changes the math is
defaulted silently.
"""
from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field, replace
from typing import Any

from loraxd.worker.models.hf_config import Fields, UnsupportedModel

FULL, SLIDING = "full_attention", "sliding_attention"
ACTIVATION_NAMES = ("silu", "gelu", "gelu_pytorch_tanh")
# rope types whose frequencies do not depend on the sequence length
STATIC_ROPE_TYPES = ("default", "linear", "llama3", "yarn")


@dataclass(frozen=True)
class RopeSpec:
    """Rotary embedding of one layer type: transformers' rope parameters for it."""

    rope_type: str
    theta: float
    params: dict  # the whole rope_parameters entry
    layer_type: str | None  # the key into per-layer-type rope_parameters (Gemma 3), or None


@dataclass(frozen=True)
class ModelArch:
    architecture: str
    vocab_size: int
    hidden_size: int
    intermediate_size: int
    num_layers: int
    num_heads: int
    num_kv_heads: int
    head_dim: int
    rms_norm_eps: float
    max_position_embeddings: int
    tie_word_embeddings: bool
    hidden_act: str
    qkv_bias: bool
    o_bias: bool
    mlp_bias: bool
    layer_types: tuple[str, ...]  # per layer: FULL or SLIDING
    sliding_window: int | None
    rope: dict[str, RopeSpec]  # layer type -> its rotary embedding
    attn_scale: float
    qk_norm: bool = False  # Qwen3, Gemma 3: RMSNorm over each head of q and k
    norm_offset: float = 0.0  # Gemma: norms scale by (offset + weight), in fp32
    sandwich_norms: bool = False  # Gemma: norms after attention and MLP as well
    embedding_scale: float | None = None  # Gemma: embeddings times sqrt(hidden)
    attn_softcap: float | None = None  # Gemma 2: cap * tanh(scores / cap)
    final_softcap: float | None = None  # Gemma 2: the same on the logits
    fused_checkpoint: bool = False  # Phi-3: qkv_proj and gate_up_proj stored fused
    config: Any = field(default=None, compare=False, repr=False)  # transformers' config

    @property
    def sliding_windows(self) -> tuple[int | None, ...]:
        return tuple(self.sliding_window if kind == SLIDING else None
                     for kind in self.layer_types)

    def module_shapes(self) -> dict[str, tuple[int, int]]:
        """(in_features, out_features) of each LoRA-targetable module, by its HF name."""
        h, i = self.hidden_size, self.intermediate_size
        q, kv = self.num_heads * self.head_dim, self.num_kv_heads * self.head_dim
        return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
                "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}

    def fused_modules(self) -> dict[str, tuple[str, ...]]:
        """Fused HF modules that adapters may target, and the modules they split into."""
        if not self.fused_checkpoint:
            return {}
        return {"qkv_proj": ("q_proj", "k_proj", "v_proj"),
                "gate_up_proj": ("gate_proj", "up_proj")}


def _common(f: Fields, architecture: str, *, act_key: str = "hidden_act") -> dict:
    num_heads = f["num_attention_heads"]
    hidden = f["hidden_size"]
    head_dim = f.get("head_dim") or hidden // num_heads
    act = f.get(act_key, "silu")
    if act not in ACTIVATION_NAMES:
        raise UnsupportedModel(f"config.json: {act_key}={act!r} is not supported; "
                               f"supported: {', '.join(ACTIVATION_NAMES)}")
    return dict(
        architecture=architecture, vocab_size=f["vocab_size"], hidden_size=hidden,
        intermediate_size=f["intermediate_size"], num_layers=f["num_hidden_layers"],
        num_heads=num_heads, num_kv_heads=f.get("num_key_value_heads") or num_heads,
        head_dim=head_dim, rms_norm_eps=f.get("rms_norm_eps", 1e-6),
        max_position_embeddings=f.get("max_position_embeddings", 4096),
        tie_word_embeddings=bool(f.get("tie_word_embeddings", False)), hidden_act=act,
        attn_scale=head_dim ** -0.5, config=f.config)


def _rope(f: Fields, layer_types: tuple[str, ...]) -> dict[str, RopeSpec]:
    """The rope of each layer type, from rope_parameters (flat, or keyed by layer type)."""
    params = f["rope_parameters"] or {}
    f.read.add("partial_rotary_factor")
    keyed = bool(params) and all(isinstance(v, dict) for v in params.values())
    specs = {}
    for kind in set(layer_types):
        entry = params.get(kind) if keyed else params
        if not entry or "rope_theta" not in entry:
            raise UnsupportedModel(f"config.json: rope_parameters has no rope_theta for "
                                   f"{kind} layers: {params!r}")
        rope_type = entry.get("rope_type", "default")
        if rope_type not in STATIC_ROPE_TYPES:
            raise UnsupportedModel(
                f"config.json: rope type {rope_type!r} is not supported; supported: "
                f"{', '.join(STATIC_ROPE_TYPES)}")
        partial = entry.get("partial_rotary_factor", f.values.get("partial_rotary_factor"))
        if partial not in (None, 1, 1.0):
            raise UnsupportedModel(f"config.json: partial_rotary_factor={partial!r} is not "
                                   "supported (only 1.0: rotary over the whole head)")
        specs[kind] = RopeSpec(rope_type, float(entry["rope_theta"]), dict(entry),
                               kind if keyed else None)
    return specs


def _layer_types(f: Fields, num_layers: int) -> tuple[str, ...]:
    kinds = tuple(f.get("layer_types") or (FULL,) * num_layers)
    if len(kinds) != num_layers or not set(kinds) <= {FULL, SLIDING}:
        raise UnsupportedModel(f"config.json: layer_types={list(kinds)!r} is not supported "
                               f"({num_layers} entries of {FULL!r} / {SLIDING!r})")
    return kinds


def read_llama(f: Fields, architecture: str) -> ModelArch:
    """Llama and SmolLM2: biases per attention_bias / mlp_bias."""
    common = _common(f, architecture)
    layer_types = (FULL,) * common["num_layers"]
    bias = bool(f.get("attention_bias", False))
    return ModelArch(**common, qkv_bias=bias, o_bias=bias, mlp_bias=bool(f.get("mlp_bias")),
                     layer_types=layer_types, sliding_window=None,
                     rope=_rope(f, layer_types))


def read_mistral(f: Fields, architecture: str) -> ModelArch:
    """Mistral (and Phi-3's layout): one sliding window for every layer when set."""
    common = _common(f, architecture)
    window = f.get("sliding_window")
    layer_types = (SLIDING if window else FULL,) * common["num_layers"]
    return ModelArch(**common, qkv_bias=False, o_bias=False, mlp_bias=False,
                     layer_types=layer_types, sliding_window=window,
                     rope=_rope(f, layer_types))


def read_qwen2(f: Fields, architecture: str) -> ModelArch:
    """Qwen2: q/k/v biases; the config class turns use_sliding_window and
    max_window_layers into layer_types."""
    common = _common(f, architecture)
    f.read.update(("use_sliding_window", "max_window_layers"))
    layer_types = _layer_types(f, common["num_layers"])
    return ModelArch(**common, qkv_bias=True, o_bias=False, mlp_bias=False,
                     layer_types=layer_types, sliding_window=f.get("sliding_window"),
                     rope=_rope(f, layer_types))


def read_qwen3(f: Fields, architecture: str) -> ModelArch:
    """Qwen3: Qwen2's layout without its fixed biases, plus per-head q/k norms."""
    common = _common(f, architecture)
    f.read.update(("use_sliding_window", "max_window_layers"))
    layer_types = _layer_types(f, common["num_layers"])
    bias = bool(f.get("attention_bias", False))
    return ModelArch(**common, qkv_bias=bias, o_bias=bias, mlp_bias=False,
                     layer_types=layer_types, sliding_window=f.get("sliding_window"),
                     rope=_rope(f, layer_types), qk_norm=True)


def _read_gemma(f: Fields, architecture: str, *, qk_norm: bool) -> ModelArch:
    common = _common(f, architecture, act_key="hidden_activation")
    f.read.add("hidden_act")  # an alias older Gemma configs carried; hidden_activation rules
    f.read.add("_sliding_window_pattern")  # already turned into layer_types by the class
    f.expect("use_bidirectional_attention", False, "causal attention only")
    layer_types = _layer_types(f, common["num_layers"])
    bias = bool(f.get("attention_bias", False))
    common["attn_scale"] = float(f["query_pre_attn_scalar"]) ** -0.5
    return ModelArch(**common, qkv_bias=bias, o_bias=bias, mlp_bias=False,
                     layer_types=layer_types, sliding_window=f.get("sliding_window"),
                     rope=_rope(f, layer_types), qk_norm=qk_norm, norm_offset=1.0,
                     sandwich_norms=True, embedding_scale=common["hidden_size"] ** 0.5,
                     attn_softcap=f.get("attn_logit_softcapping"),
                     final_softcap=f.get("final_logit_softcapping"))


def read_gemma2(f: Fields, architecture: str) -> ModelArch:
    return _read_gemma(f, architecture, qk_norm=False)


def read_gemma3(f: Fields, architecture: str) -> ModelArch:
    return _read_gemma(f, architecture, qk_norm=True)


def read_phi3(f: Fields, architecture: str) -> ModelArch:
    """Phi-3 / Phi-3.5: Mistral's layout with q/k/v and gate/up fused in the checkpoint."""
    arch = read_mistral(f, architecture)
    f.read.add("original_max_position_embeddings")  # read only by the longrope type
    return replace(arch, fused_checkpoint=True)


# architecture -> its config reader
READERS: dict[str, Callable[[Fields, str], ModelArch]] = {
    "LlamaForCausalLM": read_llama,
    "MistralForCausalLM": read_mistral,
    "Qwen2ForCausalLM": read_qwen2,
    "Qwen3ForCausalLM": read_qwen3,
    "Gemma2ForCausalLM": read_gemma2,
    "Gemma3ForCausalLM": read_gemma3,
    "Phi3ForCausalLM": read_phi3,
}

# config.json "model_type" -> architecture, for directories whose "architectures" is missing
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM", "qwen3": "Qwen3ForCausalLM",
               "gemma2": "Gemma2ForCausalLM", "gemma3_text": "Gemma3ForCausalLM",
               "phi3": "Phi3ForCausalLM"}


def architecture_of(config: dict) -> str:
    """The architecture a config.json names, checked against the supported ones."""
    names = config.get("architectures") or []
    model_type = config.get("model_type")
    architecture = names[0] if names else MODEL_TYPES.get(
        model_type, f"<none; model_type {model_type!r}>")
    if architecture not in READERS:
        raise UnsupportedModel(f"architecture {architecture} is not supported; "
                               f"supported: {', '.join(READERS)}")
    return architecture


def read_arch(config: Any) -> ModelArch:
    """The ModelArch of a transformers config; UnsupportedModel for anything loraxd would
    not compute exactly as transformers does."""
    architecture = architecture_of(config.to_dict())
    reader = READERS[architecture]
    fields = Fields(config)
    arch = reader(fields, architecture)
    fields.check_rest(architecture)
    if arch.num_heads % arch.num_kv_heads:
        raise UnsupportedModel(f"{arch.num_heads} attention heads do not group over "
                               f"{arch.num_kv_heads} KV heads")
    return arch
