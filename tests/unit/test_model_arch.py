"""Reading a model's config: every field is implemented, harmless, or refused by name."""
from __future__ import annotations

import json

import pytest

transformers = pytest.importorskip("transformers")

from loraxd.worker.models import UnsupportedModel, resolve  # noqa: E402
from loraxd.worker.models.arch import READERS  # noqa: E402
from loraxd.worker.models.hf_config import HARMLESS, Fields  # noqa: E402
from tests.unit.test_model_fidelity import FAMILIES, build_tiny_model  # noqa: E402

CONFIG_CLASSES = {"LlamaForCausalLM": "LlamaConfig", "MistralForCausalLM": "MistralConfig",
                  "Qwen2ForCausalLM": "Qwen2Config", "Qwen3ForCausalLM": "Qwen3Config",
                  "Gemma2ForCausalLM": "Gemma2Config", "Gemma3ForCausalLM": "Gemma3TextConfig",
                  "Phi3ForCausalLM": "Phi3Config"}


@pytest.mark.parametrize("architecture", sorted(READERS))
def test_every_field_of_the_installed_config_class_is_classified(architecture):
    """A field a new transformers adds to a family fails here, not silently in production."""
    config = getattr(transformers, CONFIG_CLASSES[architecture])()
    fields = Fields(config)
    READERS[architecture](fields, architecture)
    unclassified = set(fields.values) - fields.read - HARMLESS
    assert not unclassified, f"{architecture}: classify {sorted(unclassified)}"


def _edited(tmp_path, family: str, edit) -> str:
    build_tiny_model(family, tmp_path)
    path = tmp_path / "config.json"
    config = json.loads(path.read_text())
    edit(config)
    path.write_text(json.dumps(config))
    return str(tmp_path)


# (family, edit of config.json, what the refusal names)
REFUSED = {
    "dynamic-rope": ("llama-tied", lambda c: c.update(rope_parameters={
        "rope_type": "dynamic", "rope_theta": 10000.0, "factor": 2.0}), "'dynamic'"),
    "longrope": ("phi3", lambda c: c.update(rope_parameters={
        "rope_type": "longrope", "rope_theta": 10000.0, "short_factor": [1.0] * 8,
        "long_factor": [2.0] * 8, "original_max_position_embeddings": 64}), "'longrope'"),
    "partial-rotary": ("phi3", lambda c: c["rope_parameters"].update(
        partial_rotary_factor=0.5), "partial_rotary_factor=0.5"),
    "quantization": ("llama-tied", lambda c: c.update(
        quantization_config={"quant_method": "gptq", "bits": 4}), "quantization_config"),
    "remote-code": ("llama-tied", lambda c: c.update(
        auto_map={"AutoModelForCausalLM": "mine.Model"}), "auto_map"),
    "activation": ("llama-tied", lambda c: c.update(hidden_act="relu"), "hidden_act='relu'"),
    "bidirectional": ("gemma3", lambda c: c.update(use_bidirectional_attention=True),
                      "use_bidirectional_attention=True"),
    "layer-type": ("qwen3", lambda c: c.update(
        layer_types=["chunked_attention", "full_attention"]), "layer_types"),
    "architecture": ("llama-tied", lambda c: c.update(architectures=["GPTNeoXForCausalLM"]),
                     "architecture GPTNeoXForCausalLM is not supported"),
}


@pytest.mark.parametrize("case", sorted(REFUSED))
def test_refused_field_is_named(case, tmp_path):
    family, edit, named = REFUSED[case]
    with pytest.raises(UnsupportedModel, match=None) as err:
        resolve(_edited(tmp_path, family, edit))
    assert named in str(err.value)


def test_class_field_at_a_non_default_value_is_refused():
    class Config:  # a family config class with a field no reader consumes
        def __init__(self, knob: int = 0):
            self.knob = knob

        def to_dict(self):
            return {"knob": self.knob, "model_type": "x"}

    Fields(Config()).check_rest("X")  # at its default: a no-op, accepted
    with pytest.raises(UnsupportedModel, match=r"knob=3 is not implemented .* default 0"):
        Fields(Config(knob=3)).check_rest("X")


def test_unknown_extra_fields_are_ignored_as_transformers_ignores_them(tmp_path, caplog):
    model_dir = _edited(tmp_path, "llama-tied", lambda c: c.update(unsloth_version="1.0"))
    arch = resolve(model_dir)
    assert arch.architecture == "LlamaForCausalLM"
    assert "unsloth_version" in caplog.text


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_families_read(family, tmp_path):
    build_tiny_model(family, tmp_path)
    arch = resolve(tmp_path)
    assert arch.num_layers == 2 and arch.vocab_size == 256
