"""Property tests of the PEFT adapter reader (hypothesis): whatever adapter_config.json
holds, load_peft_adapter gives an adapter or an AdapterIncompatible with a one-line reason,
never another exception; a well-formed LoRA config always loads, with its rank."""
from __future__ import annotations

import json
import os
import tempfile

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from safetensors.torch import save_file

from loraxd.worker.lora import AdapterIncompatible, load_peft_adapter

PROPERTIES = settings(max_examples=150, deadline=None,
                      suppress_health_check=[HealthCheck.too_slow])
HIDDEN, NUM_LAYERS = 8, 2
SHAPES = {m: (HIDDEN, HIDDEN) for m in ("q_proj", "k_proj", "v_proj", "o_proj")}
MODULES = list(SHAPES)

JSON_SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70),
                                                               max_value=2**70),
                         st.floats(allow_nan=False, allow_infinity=False), st.text(max_size=10))
JSON = st.recursive(JSON_SCALARS, lambda inner: st.lists(inner, max_size=3)
                    | st.dictionaries(st.text(max_size=6), inner, max_size=3), max_leaves=8)
FIELDS = ["r", "lora_alpha", "target_modules", "rank_pattern", "alpha_pattern",
          "layers_to_transform", "layers_pattern", "use_rslora", "use_dora", "fan_in_fan_out",
          "peft_type", "task_type", "modules_to_save", "bias", "exclude_modules",
          "init_lora_weights", "lora_dropout", "base_model_name_or_path", "revision"]
FIELD_VALUES = {
    "r": st.one_of(st.integers(min_value=-2, max_value=8), JSON),
    "target_modules": st.one_of(st.lists(st.sampled_from(MODULES + ["x", ".*"]), max_size=4),
                                st.sampled_from(["all-linear", ".*q_proj", "(", "q_proj"]),
                                JSON),
    "rank_pattern": st.one_of(st.dictionaries(st.sampled_from(MODULES + ["(", "a{99999}"]),
                                              st.integers(-1, 8), max_size=2), JSON),
    "layers_to_transform": st.one_of(st.lists(st.integers(-1, 3), max_size=3),
                                     st.integers(-1, 3), JSON),
    "peft_type": st.one_of(st.sampled_from(["LORA", "lora", "IA3"]), JSON),
    # A number or boolean here is test_layers_pattern_of_a_scalar_type_is_refused's case.
    "layers_pattern": st.one_of(st.none(), st.text(max_size=6),
                                st.lists(st.one_of(st.text(max_size=6), JSON), max_size=2),
                                st.dictionaries(st.text(max_size=3), JSON, max_size=2)),
}
CONFIGS = st.fixed_dictionaries({}, optional={f: FIELD_VALUES.get(f, JSON) for f in FIELDS})


def weights(rank: int, modules=MODULES) -> dict[str, torch.Tensor]:
    out = {}
    for layer in range(NUM_LAYERS):
        for module in modules:
            prefix = f"base_model.model.model.layers.{layer}.self_attn.{module}"
            out[f"{prefix}.lora_A.weight"] = torch.randn(rank, HIDDEN)
            out[f"{prefix}.lora_B.weight"] = torch.randn(HIDDEN, rank)
    return out


def load(config_text: str | bytes, tensors: dict[str, torch.Tensor]):
    with tempfile.TemporaryDirectory() as path:
        mode = "wb" if isinstance(config_text, bytes) else "w"
        with open(os.path.join(path, "adapter_config.json"), mode) as f:
            f.write(config_text)
        save_file(tensors, os.path.join(path, "adapter_model.safetensors"))
        return load_peft_adapter(path, SHAPES, NUM_LAYERS)


def assert_loads_or_refuses(config_text, tensors):
    try:
        adapter = load(config_text, tensors)
    except AdapterIncompatible as exc:
        assert str(exc) and "\n" not in str(exc), repr(str(exc))
        return None
    assert adapter.weights
    return adapter


@PROPERTIES
@given(CONFIGS, st.sampled_from([1, 2, 4]))
def test_any_adapter_config_loads_or_is_refused_with_a_reason(config, rank):
    assert_loads_or_refuses(json.dumps(config), weights(rank))


@PROPERTIES
@given(st.one_of(st.binary(max_size=64), st.text(max_size=64).map(str.encode)))
def test_any_bytes_as_adapter_config_are_refused_with_a_reason(raw):
    assert_loads_or_refuses(raw, weights(2))


@PROPERTIES
@given(st.integers(min_value=1, max_value=6), st.floats(min_value=0.5, max_value=64),
       st.lists(st.sampled_from(MODULES), min_size=1, max_size=4, unique=True),
       st.booleans())
def test_a_well_formed_lora_config_loads_with_its_rank(rank, alpha, modules, rslora):
    config = {"peft_type": "LORA", "r": rank, "lora_alpha": alpha, "target_modules": modules,
              "use_rslora": rslora, "bias": "none", "task_type": "CAUSAL_LM"}
    adapter = assert_loads_or_refuses(json.dumps(config), weights(rank, modules))
    assert adapter is not None
    assert set(adapter.weights) == {(layer, m) for layer in range(NUM_LAYERS) for m in modules}
    assert set(adapter.ranks.values()) == {rank}


@pytest.mark.parametrize("layers_pattern", [5, True])
def test_layers_pattern_of_a_scalar_type_is_refused(layers_pattern):
    config = {"r": 2, "target_modules": ["q_proj"], "layers_pattern": layers_pattern}
    assert_loads_or_refuses(json.dumps(config), weights(2, ["q_proj"]))
