"""Every field of PEFT's `LoraConfig`, classified by what loraxd does with it.

peft is not a dependency of loraxd, so this is a static table; tests/unit/test_lora_peft_format.py
asserts that it names every `dataclasses.fields(peft.LoraConfig)` of the installed peft, so a
new field fails a test instead of being silently ignored. Three kinds:

* IMPLEMENTED: read by peft_format.py and applied exactly as PEFT does.
* IGNORED: metadata, or only used while training / initialising: it does not change the
  adapter's forward at inference (each note says why, from PEFT's LoRA layers).
* UNSUPPORTED: changes the math in a way loraxd doesn't do. Refused unless its value is one
  of `noop` (PEFT's default first, then values PEFT treats the same).

A key that is not in the table (a field of a newer peft) is ignored, as PEFT itself does:
`PeftConfig.from_peft_type` drops keyword arguments `LoraConfig` doesn't take, with a warning,
for forward compatibility. loraxd logs a warning too.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

IMPLEMENTED, IGNORED, UNSUPPORTED = "implemented", "ignored", "unsupported"


@dataclass(frozen=True)
class Field:
    kind: str
    note: str
    noop: tuple[Any, ...] = ()  # UNSUPPORTED only: the values that leave LoRA plain

    def accepts(self, value: Any) -> bool:
        if self.kind != UNSUPPORTED:
            return True
        return any(type(value) is type(v) and value == v for v in self.noop)


def _implemented(note: str) -> Field:
    return Field(IMPLEMENTED, note)


def _ignored(note: str) -> Field:
    return Field(IGNORED, note)


def _unsupported(note: str, *noop: Any) -> Field:
    return Field(UNSUPPORTED, note, noop)


_INIT_ONLY = "read only by the initialisation init_lora_weights names (checked there)"

LORA_CONFIG_FIELDS: dict[str, Field] = {
    # -- implemented ---------------------------------------------------------------------------
    "peft_type": _implemented("must be LORA"),
    "r": _implemented("the rank; scale lora_alpha / r"),
    "lora_alpha": _implemented("the scale's numerator"),
    "use_rslora": _implemented("scale lora_alpha / sqrt(r)"),
    "target_modules": _implemented("names / suffixes, a regex, or 'all-linear'"),
    "exclude_modules": _implemented("names / suffixes or a regex"),
    "rank_pattern": _implemented("per-module r"),
    "alpha_pattern": _implemented("per-module lora_alpha"),
    "layers_to_transform": _implemented("layer indices a list target_modules is limited to"),
    "layers_pattern": _implemented("the layer list's name, for the layer index"),
    "fan_in_fan_out": _implemented(
        "lora_A / lora_B are nn.Linear weights either way (it only orients the delta merged "
        "into a Conv1D base weight); a pair stored transposed is read back"),
    # -- ignored: metadata, training or initialisation only ------------------------------------
    "task_type": _ignored("picks PEFT's model wrapper; its LoRA math is the same (extra heads "
                          "come as modules_to_save, refused)"),
    "auto_mapping": _ignored("the transformers class PEFT builds when task_type is unset"),
    "peft_version": _ignored("metadata"),
    "base_model_name_or_path": _ignored(
        "metadata: loraxd has its own base model (another one fails the shape checks)"),
    "revision": _ignored("metadata: the base model's revision"),
    "inference_mode": _ignored("freezes the adapter; PEFT saves it as True"),
    "lora_dropout": _ignored("nn.Dropout before lora_A: the identity in eval mode"),
    "megatron_config": _ignored("picks Megatron's parallel LoRA linears (same math) for a "
                                "Megatron base"),
    "megatron_core": _ignored("the Megatron module megatron_config uses"),
    "loftq_config": _ignored(_INIT_ONLY),
    "eva_config": _ignored(_INIT_ONLY + "; EVA's ranks are saved in rank_pattern"),
    "corda_config": _ignored(_INIT_ONLY),
    "lora_ga_config": _ignored(_INIT_ONLY),
    "qalora_group_size": _ignored("read only with use_qalora (refused)"),
    "runtime_config": _ignored("runtime only; PEFT drops it from a saved config"),
    "ensure_weight_tying": _ignored("ties adapters of tied embedding / lm_head modules, which "
                                    "are refused as targets, modules_to_save or trainable tokens"),
    "velora_config": _ignored("VeLoRA changes only the backward pass (compressed activations); "
                              "its forward is plain LoRA, its lora_velora_embed buffers unused"),
    "monteclora_config": _ignored(
        "MonteCLoRA perturbs lora_A only in training mode; in eval mode and when merged it is "
        "plain LoRA, its lora_monteclora_sampler tensors unused"),
    # -- unsupported unless a no-op ------------------------------------------------------------
    "bias": _unsupported("trained biases of the base model", "none"),
    "init_lora_weights": _unsupported(
        "pissa / olora / corda / lora_ga / loftq rewrite the base weights, which the saved A / B "
        "only complete; PEFT's save_pretrained(path_initial_model_for_weight_conversion=...) "
        "turns all but loftq into plain LoRA",
        True, False, "gaussian", "eva", "orthogonal", "mica"),
    "modules_to_save": _unsupported("fully trained copies of whole modules", None, []),
    "use_dora": _unsupported("DoRA: a learned magnitude per output feature", False),
    "lora_bias": _unsupported("a bias on lora_B", False),
    "target_parameters": _unsupported("LoRA on bare parameters (MoE experts)", None, []),
    "layer_replication": _unsupported("a model with replicated layers", None, []),
    "trainable_token_indices": _unsupported("trained embedding rows", None, [], {}),
    "alora_invocation_tokens": _unsupported(
        "activated LoRA: applied only from the invocation tokens on", None, []),
    "use_qalora": _unsupported("QA-LoRA: lora_A on group-pooled inputs", False),
    "use_bdlora": _unsupported("BD-LoRA: block-diagonal factors", None),
    "arrow_config": _unsupported("Arrow: routing among LoRA experts", None),
    "kasa_config": _unsupported("KaSA: a learned diagonal between A and B, a truncated base",
                                None),
}

# Weights a field in IGNORED saves next to lora_A / lora_B that its inference doesn't read.
UNUSED_WEIGHTS = {
    "velora_config": ".lora_velora_embed",
    "monteclora_config": ".lora_monteclora_sampler.",
}


def refusal(config: dict) -> str | None:
    """The reason the first UNSUPPORTED field with a value other than a no-op is refused."""
    for name, field in LORA_CONFIG_FIELDS.items():
        if name in config and not field.accepts(config[name]):
            supported = f"{name}=" + " / ".join(repr(v) for v in field.noop)
            return (f"adapter_config.json: {name}={_short(config[name])} is not supported "
                    f"({field.note}); loraxd supports only {supported}")
    return None


def unknown_fields(config: dict) -> list[str]:
    return sorted(name for name in config if name not in LORA_CONFIG_FIELDS)


def unused_weight_markers(config: dict) -> tuple[str, ...]:
    """Key fragments of weights to skip: those of set IGNORED fields in UNUSED_WEIGHTS."""
    return tuple(marker for name, marker in UNUSED_WEIGHTS.items() if config.get(name))


def _short(value: Any, limit: int = 80) -> str:
    text = repr(value)
    return text if len(text) <= limit else text[: limit - 3] + "..."
