"""PEFT-format loading: deltas equal PEFT's own, and every refusal names its cause."""

from __future__ import annotations

import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from loraxd.worker.lora import AdapterIncompatible, load_peft_adapter  # noqa: E402

ALL = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def tiny_config(hidden=64):
    return transformers.LlamaConfig(
        num_hidden_layers=2, hidden_size=hidden, intermediate_size=2 * hidden,
        num_attention_heads=4, num_key_value_heads=2, vocab_size=128)


def shapes_of(config):
    head_dim = config.hidden_size // config.num_attention_heads
    q, kv = config.num_attention_heads * head_dim, config.num_key_value_heads * head_dim
    h, i = config.hidden_size, config.intermediate_size
    return {"q_proj": (h, q), "k_proj": (h, kv), "v_proj": (h, kv), "o_proj": (q, h),
            "gate_proj": (h, i), "up_proj": (h, i), "down_proj": (i, h)}


SHAPES = shapes_of(tiny_config())


def make_adapter(path, hidden=64, safe=True, seed=0, **lora_kwargs):
    """A random PEFT LoRA adapter for the tiny Llama, saved to `path`; returns the PeftModel."""
    torch.manual_seed(seed)
    model = transformers.LlamaForCausalLM(tiny_config(hidden))
    lora_kwargs.setdefault("target_modules", ALL)
    config = peft.LoraConfig(init_lora_weights=False, **lora_kwargs)
    peft_model = peft.get_peft_model(model, config)
    peft_model.save_pretrained(str(path), safe_serialization=safe)
    return peft_model


def peft_deltas(peft_model):
    """(layer, module) -> PEFT's get_delta_weight [out, in] for every LoRA linear."""
    deltas = {}
    for name, module in peft_model.named_modules():
        if isinstance(module, peft.tuners.lora.LoraLayer) and "default" in module.lora_A:
            layer_idx = int(name.split(".layers.")[1].split(".")[0])
            deltas[(layer_idx, name.rsplit(".", 1)[-1])] = module.get_delta_weight("default")
    return deltas


def assert_same_deltas(adapter, peft_model):
    expected = peft_deltas(peft_model)
    assert set(adapter.weights) == set(expected)
    for key, (a, b) in adapter.weights.items():
        torch.testing.assert_close(b.float() @ a.float(), expected[key], rtol=1e-5, atol=1e-6)
        assert adapter.ranks[key] == a.shape[0] == b.shape[1]


@pytest.mark.parametrize("kwargs", [
    dict(r=8, lora_alpha=16),
    dict(r=8, lora_alpha=16, use_rslora=True),
    dict(r=8, lora_alpha=16, rank_pattern={"v_proj": 4, "layers.1.mlp.down_proj": 2},
         alpha_pattern={"q_proj": 3, r"layers\.0\..*up_proj": 5}),
    dict(r=4, lora_alpha=8, target_modules=["q_proj", "v_proj"], layers_to_transform=[1]),
    dict(r=4, lora_alpha=8, target_modules=r".*\.layers\.0\.self_attn\.(q|k)_proj"),
    dict(r=6, lora_alpha=7, target_modules=["o_proj", "gate_proj"],
         exclude_modules=["layers.1.mlp.gate_proj"]),
], ids=["plain", "rslora", "patterns", "layers_to_transform", "regex", "exclude"])
def test_deltas_match_peft(tmp_path, kwargs):
    peft_model = make_adapter(tmp_path, **kwargs)
    adapter = load_peft_adapter(str(tmp_path), SHAPES, num_layers=2)
    assert_same_deltas(adapter, peft_model)
    weights = adapter.weights.values()
    assert adapter.num_bytes == sum(a.numel() * 4 + b.numel() * 4 for a, b in weights)


def test_bin_file_and_dtype(tmp_path):
    peft_model = make_adapter(tmp_path, safe=False, r=4, lora_alpha=4)
    assert not (tmp_path / "adapter_model.safetensors").exists()
    adapter = load_peft_adapter(str(tmp_path), SHAPES, num_layers=2, dtype=torch.bfloat16)
    a, b = adapter.weights[(0, "q_proj")]
    assert a.dtype == b.dtype == torch.bfloat16
    expected = peft_deltas(peft_model)[(0, "q_proj")]
    torch.testing.assert_close(b.float() @ a.float(), expected, rtol=2e-2, atol=2e-2)


def test_adapter_name_in_keys(tmp_path):
    """Keys with the adapter name (`lora_A.default.weight`) load the same."""
    peft_model = make_adapter(tmp_path, r=4, lora_alpha=8)
    file = tmp_path / "adapter_model.safetensors"
    tensors = load_file(str(file))
    save_file({k.replace(".weight", ".default.weight"): v for k, v in tensors.items()}, str(file))
    assert_same_deltas(load_peft_adapter(str(tmp_path), SHAPES, num_layers=2), peft_model)


def refusal(path, num_layers=2, shapes=SHAPES) -> str:
    with pytest.raises(AdapterIncompatible) as info:
        load_peft_adapter(str(path), shapes, num_layers=num_layers)
    reason = info.value.reason
    assert "\n" not in reason
    return reason


def edit_config(path, **changes):
    config_file = path / "adapter_config.json"
    config = json.loads(config_file.read_text())
    config.update(changes)
    config_file.write_text(json.dumps(config))


def edit_weights(path, fn):
    file = path / "adapter_model.safetensors"
    save_file(fn(load_file(str(file))), str(file))


def test_refuses_dora(tmp_path):
    make_adapter(tmp_path, r=4, use_dora=True)
    assert "DoRA" in refusal(tmp_path)


def test_refuses_modules_to_save(tmp_path):
    make_adapter(tmp_path, r=4, modules_to_save=["lm_head"])
    assert "modules_to_save" in refusal(tmp_path)


def test_refuses_embedding_target(tmp_path):
    make_adapter(tmp_path, r=4, target_modules=["q_proj", "embed_tokens"])
    assert "embed" in refusal(tmp_path)


def test_refuses_other_hidden_size(tmp_path):
    make_adapter(tmp_path, hidden=32, r=4)
    reason = refusal(tmp_path)
    assert "q_proj" in reason and "64 -> 64" in reason and "(4, 32)" in reason


def test_refuses_unknown_target_module(tmp_path):
    make_adapter(tmp_path, r=4)
    edit_config(tmp_path, target_modules=["q_proj", "c_attn"])
    assert "'c_attn'" in refusal(tmp_path)


def test_refuses_unknown_module_key(tmp_path):
    make_adapter(tmp_path, r=4, target_modules=["q_proj"])
    edit_weights(tmp_path, lambda t: {k.replace("q_proj", "qkv_proj"): v for k, v in t.items()})
    assert "qkv_proj" in refusal(tmp_path)


def test_refuses_missing_b(tmp_path):
    make_adapter(tmp_path, r=4, target_modules=["q_proj", "v_proj"])
    edit_weights(tmp_path, lambda t: {k: v for k, v in t.items()
                                      if not ("layers.1." in k and "v_proj.lora_B" in k)})
    reason = refusal(tmp_path)
    assert "lora_B" in reason and "layers.1.self_attn.v_proj" in reason


def test_refuses_layer_beyond_model(tmp_path):
    make_adapter(tmp_path, r=4)
    assert "layer 1" in refusal(tmp_path, num_layers=1)


@pytest.mark.parametrize("changes,words", [
    (dict(peft_type="IA3"), "IA3"),
    (dict(bias="all"), "bias"),
    (dict(r=8), "rank 4"),
    (dict(target_modules=["q_proj"]), "does not target"),
    (dict(target_modules=r".*lm_head"), "lm_head"),
])
def test_refuses_config_mismatch(tmp_path, changes, words):
    make_adapter(tmp_path, r=4)
    edit_config(tmp_path, **changes)
    assert words in refusal(tmp_path)


def test_refuses_bad_json(tmp_path):
    make_adapter(tmp_path, r=4)
    (tmp_path / "adapter_config.json").write_text("{\"r\": 4,")
    assert "adapter_config.json" in refusal(tmp_path)


def test_refuses_missing_files(tmp_path):
    make_adapter(tmp_path, r=4)
    (tmp_path / "adapter_model.safetensors").unlink()
    assert "adapter_model.safetensors" in refusal(tmp_path)
    (tmp_path / "adapter_config.json").unlink()
    assert "adapter_config.json" in refusal(tmp_path)


def test_refuses_corrupt_weights(tmp_path):
    make_adapter(tmp_path, r=4)
    header_of_16_bytes = (16).to_bytes(8, "little")
    (tmp_path / "adapter_model.safetensors").write_bytes(header_of_16_bytes + b"{garbage")
    assert "unreadable" in refusal(tmp_path)
