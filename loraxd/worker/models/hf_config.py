"""Read a model directory's config.json through transformers' own config classes.

transformers has written two layouts of the same settings (4.x: top-level `rope_theta` and
`rope_scaling`; 5.x: `rope_parameters`, per layer type for Gemma 3, and explicit
`layer_types`). Its config classes read both into one form, so the family readers in
`arch.py` see a single layout whichever version saved the checkpoint.

Every field of the config is accounted for: a family reader reads it through `Fields`,
which records what was read; what is left must be harmless (ids, training-only settings,
metadata) or at the value that makes it a no-op. Anything else changes the math in a way
loraxd does not implement and stops the start with `UnsupportedModel`, naming the field.
"""
from __future__ import annotations

import json
import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


class UnsupportedModel(Exception):
    """The model directory holds an architecture or a setting this worker cannot run."""


# Fields that never change the forward pass at inference.
HARMLESS = frozenset({
    # metadata and bookkeeping of transformers' config machinery
    "_name_or_path", "architectures", "model_type", "transformers_version", "dtype",
    "torch_dtype", "id2label", "label2id", "problem_type", "return_dict",
    "output_attentions", "output_hidden_states", "is_encoder_decoder",
    "chunk_size_feed_forward", "tokenizer_class", "prefix", "task_specific_params",
    "_attn_implementation_autoset", "_commit_hash",
    # special token ids (the EOS ids are read from generation_config.json / config.json)
    "bos_token_id", "eos_token_id", "pad_token_id", "sep_token_id", "decoder_start_token_id",
    # training-only
    "initializer_range", "attention_dropout", "resid_pdrop", "embd_pdrop", "use_cache",
    # splits a matmul into pretraining_tp slices: the same product
    "pretraining_tp",
})

# Fields outside the family's config class that change the math: refused even though the
# class does not declare them.
REFUSED_EXTRAS = {
    "quantization_config": "quantized checkpoints are not supported",
    "auto_map": "models with their own (remote) code are not supported",
}


class Fields:
    """A config's fields, recording which ones a family reader consumed."""

    def __init__(self, config: Any):
        self.config = config
        self.values: dict[str, Any] = config.to_dict()
        self.read: set[str] = set()

    def __getitem__(self, key: str) -> Any:
        self.read.add(key)
        return self.values[key]

    def get(self, key: str, default: Any = None) -> Any:
        self.read.add(key)
        value = self.values.get(key)
        return default if value is None else value

    def expect(self, key: str, supported: Any, what: str) -> None:
        """Consume `key`, refusing any value but `supported` (None counts as unset)."""
        self.read.add(key)
        value = self.values.get(key)
        if value is not None and value != supported:
            raise UnsupportedModel(f"config.json: {key}={value!r} is not supported ({what})")

    def check_rest(self, architecture: str) -> None:
        """Refuse every field no reader consumed that is not harmless and not at its
        family default (a field a newer transformers added, still a no-op)."""
        for key, reason in REFUSED_EXTRAS.items():
            if self.values.get(key):
                raise UnsupportedModel(f"config.json: {key} is set: {reason}")
        defaults = type(self.config)().to_dict()
        unknown = []
        for key, value in self.values.items():
            if key in self.read or key in HARMLESS or key in REFUSED_EXTRAS:
                continue
            if key not in defaults:
                unknown.append(key)  # transformers' own model code ignores it too
            elif value != defaults[key]:
                raise UnsupportedModel(
                    f"config.json: {key}={value!r} is not implemented by loraxd for "
                    f"{architecture} (only its default {defaults[key]!r})")
        if unknown:
            log.warning("config.json fields unknown to %s, ignored as transformers ignores "
                        "them: %s", architecture, ", ".join(sorted(unknown)))


def read_config_json(model_dir: str | Path) -> dict:
    """config.json as written, before any class reads it."""
    path = Path(model_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{path}: no config.json in the model directory")
    try:
        raw = json.loads(path.read_text())
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise UnsupportedModel(f"{path}: unreadable: {exc}") from None
    if not isinstance(raw, dict):
        raise UnsupportedModel(f"{path}: expected a JSON object")
    return raw


def read_hf_config(model_dir: str | Path) -> Any:
    """The transformers config object of a model directory, never running remote code."""
    path = Path(model_dir) / "config.json"
    raw = read_config_json(model_dir)
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(model_dir), local_files_only=True,
                                          trust_remote_code=False)
    except (ValueError, KeyError, TypeError) as exc:
        first = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
        raise UnsupportedModel(f"{path}: model_type {raw.get('model_type')!r} cannot be "
                               f"read: {first}") from None
