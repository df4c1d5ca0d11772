"""Architecture name (config.json "architectures") -> model class."""
from __future__ import annotations

from loraxd.worker.models.llama import LlamaArch, LlamaForCausalLM, UnsupportedModel

# architecture -> (model class, its config reader)
ARCHITECTURES = {
    "LlamaForCausalLM": (LlamaForCausalLM, LlamaArch),
    "MistralForCausalLM": (LlamaForCausalLM, LlamaArch),
    "Qwen2ForCausalLM": (LlamaForCausalLM, LlamaArch),
}

# config.json "model_type" -> architecture, for directories whose "architectures" is missing
MODEL_TYPES = {"llama": "LlamaForCausalLM", "mistral": "MistralForCausalLM",
               "qwen2": "Qwen2ForCausalLM"}


def architecture_of(config: dict) -> str:
    names = config.get("architectures") or []
    if names:
        return names[0]
    model_type = config.get("model_type")
    return MODEL_TYPES.get(model_type, f"<none; model_type {model_type!r}>")


def resolve(config: dict):
    """(architecture name, model class, arch config) for an HF config dict."""
    name = architecture_of(config)
    entry = ARCHITECTURES.get(name)
    if entry is None:
        raise UnsupportedModel(f"architecture {name} is not supported; "
                               f"supported: {', '.join(ARCHITECTURES)}")
    model_cls, arch_cls = entry
    return name, model_cls, arch_cls.from_hf(config, name)


__all__ = ["ARCHITECTURES", "UnsupportedModel", "architecture_of", "resolve"]
