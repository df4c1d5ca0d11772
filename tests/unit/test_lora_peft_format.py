"""PEFT-format loading: deltas equal PEFT's own, and every refusal names its cause."""

from __future__ import annotations

import dataclasses
import json

import pytest
import torch

peft = pytest.importorskip("peft")
transformers = pytest.importorskip("transformers")
from safetensors.torch import load_file, save_file  # noqa: E402

from loraxd.worker.lora import AdapterIncompatible, load_peft_adapter, peft_fields  # noqa: E402

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


# -- adapter_config.json fields: every LoraConfig field is classified --------------------------

UNSUPPORTED = {name for name, f in peft_fields.LORA_CONFIG_FIELDS.items()
               if f.kind == peft_fields.UNSUPPORTED}


def test_every_lora_config_field_is_classified():
    """A field a new peft adds fails here until peft_fields.py says what it does."""
    fields = {f.name: f for f in dataclasses.fields(peft.LoraConfig)}
    missing = sorted(set(fields) - set(peft_fields.LORA_CONFIG_FIELDS))
    assert not missing, f"classify these LoraConfig fields in peft_fields.py: {missing}"
    for name in UNSUPPORTED & set(fields):
        field = fields[name]
        default = field.default if field.default_factory is dataclasses.MISSING \
            else field.default_factory()
        assert peft_fields.LORA_CONFIG_FIELDS[name].accepts(default), name


# (field, LoraConfig kwargs PEFT saves it from on the tiny Llama, or None: written into the
# saved adapter_config.json where PEFT can't produce it here, value)
REFUSED = [
    ("use_dora", dict(use_dora=True), True),
    ("modules_to_save", dict(modules_to_save=["lm_head"]), ["lm_head"]),
    ("lora_bias", dict(lora_bias=True), True),
    ("target_parameters", dict(target_modules=[], target_parameters=["mlp.down_proj.weight"]),
     ["mlp.down_proj.weight"]),
    ("layer_replication", dict(layer_replication=[[0, 2], [1, 2]]), [[0, 2], [1, 2]]),
    ("trainable_token_indices", dict(trainable_token_indices=[1, 2]), [1, 2]),
    ("alora_invocation_tokens", dict(alora_invocation_tokens=[5, 6]), [5, 6]),
    ("use_qalora", dict(use_qalora=True), True),
    ("use_bdlora", "bdlora", None),
    ("kasa_config", "kasa", {"beta": 0.0001, "gamma": 0.001}),
    ("arrow_config", None, {"top_k": 3, "router_temperature": 1.0, "use_gks": False}),
    ("bias", dict(bias="all"), "all"),
    ("init_lora_weights", dict(init_lora_weights="pissa"), "pissa"),
    ("init_lora_weights", dict(init_lora_weights="olora"), "olora"),
    ("init_lora_weights", dict(init_lora_weights="lora_ga"), "lora_ga"),
    ("init_lora_weights", None, "loftq"),  # needs scipy and a quantizable base
    ("init_lora_weights", None, "corda"),  # needs preprocess_corda's activations
]


def test_refused_cases_cover_every_unsupported_field():
    assert {field for field, _, _ in REFUSED} == UNSUPPORTED


@pytest.mark.parametrize("field,kwargs,value", REFUSED,
                         ids=[f"{f}={v}" if f == "init_lora_weights" else f
                              for f, _, v in REFUSED])
def test_refuses_unsupported_field(tmp_path, field, kwargs, value):
    if kwargs == "bdlora":
        kwargs = dict(use_bdlora=peft.BdLoraConfig(
            target_modules_bd_a=["o_proj", "down_proj"], target_modules_bd_b=["q_proj"],
            nblocks=2, match_strict=False))
    elif kwargs == "kasa":
        kwargs = dict(kasa_config=peft.KasaConfig())
    if kwargs is None:
        make_adapter(tmp_path, r=4)
        edit_config(tmp_path, **{field: value})
    else:
        kwargs = dict(kwargs)
        kwargs.setdefault("init_lora_weights", False)
        config = peft.LoraConfig(r=4, target_modules=kwargs.pop("target_modules", ALL), **kwargs)
        torch.manual_seed(0)
        peft.get_peft_model(transformers.LlamaForCausalLM(tiny_config()), config) \
            .save_pretrained(str(tmp_path))
        saved = json.loads((tmp_path / "adapter_config.json").read_text())[field]
        assert saved, saved
        value = saved
    reason = refusal(tmp_path)
    noop = peft_fields.LORA_CONFIG_FIELDS[field].noop
    assert reason.startswith(f"adapter_config.json: {field}={value!r}"[:80]), reason
    assert f"supports only {field}={noop[0]!r}" in reason


@pytest.mark.parametrize("changes", [
    dict(lora_dropout=0.1, inference_mode=False, task_type="CAUSAL_LM", revision="main",
         base_model_name_or_path="someone/else", megatron_core="my.megatron",
         qalora_group_size=32, ensure_weight_tying=True, eva_config={"rho": 2.0}),
    dict(modules_to_save=[], target_parameters=[], trainable_token_indices={},
         layer_replication=None, alora_invocation_tokens=[], use_dora=False, bias="none"),
    dict(init_lora_weights="gaussian"), dict(init_lora_weights="eva"),
    dict(init_lora_weights="orthogonal"), dict(init_lora_weights="mica"),
    dict(init_lora_weights=True),
], ids=["ignored", "noop-values", "gaussian", "eva", "orthogonal", "mica", "true"])
def test_accepts_harmless_fields(tmp_path, changes):
    peft_model = make_adapter(tmp_path, r=4, lora_alpha=8)
    edit_config(tmp_path, **changes)
    assert_same_deltas(load_peft_adapter(str(tmp_path), SHAPES, num_layers=2), peft_model)


def test_unknown_key_ignored_as_peft_does(tmp_path, caplog):
    """PEFT drops keys LoraConfig doesn't know (with a warning); so does loraxd."""
    peft_model = make_adapter(tmp_path, r=4, lora_alpha=8)
    edit_config(tmp_path, use_future_variant=True)
    with pytest.warns(UserWarning, match="use_future_variant"):
        loaded = peft.LoraConfig.from_pretrained(str(tmp_path))
    assert not hasattr(loaded, "use_future_variant")
    with caplog.at_level("WARNING", logger="loraxd.worker.lora.peft_format"):
        adapter = load_peft_adapter(str(tmp_path), SHAPES, num_layers=2)
    assert_same_deltas(adapter, peft_model)
    assert "use_future_variant" in caplog.text


@pytest.mark.parametrize("variant", ["velora", "monteclora"])
def test_training_only_variants_are_plain_lora(tmp_path, variant):
    """VeLoRA and MonteCLoRA save extra tensors but their eval-mode forward is plain LoRA."""
    extra = dict(velora_config=peft.VeloraConfig()) if variant == "velora" \
        else dict(monteclora_config=peft.MontecloraConfig())
    peft_model = make_adapter(tmp_path, r=4, lora_alpha=8, **extra)
    assert any(f"lora_{variant}" in k for k in load_file(
        str(tmp_path / "adapter_model.safetensors")))
    adapter = load_peft_adapter(str(tmp_path), SHAPES, num_layers=2)
    assert_same_deltas(adapter, peft_model)
    peft_model.eval()
    layer = peft_model.base_model.model.model.layers[1].self_attn.q_proj
    x = torch.randn(3, 64)
    a, b = adapter.weights[(1, "q_proj")]
    with torch.no_grad():
        torch.testing.assert_close(layer(x), layer.base_layer(x) + x @ a.t() @ b.t())


# -- fused modules (Phi-3) ---------------------------------------------------------------------

PHI3_FUSED = {"qkv_proj": ("q_proj", "k_proj", "v_proj"), "gate_up_proj": ("gate_proj", "up_proj")}
PHI3_ALL = ["qkv_proj", "o_proj", "gate_up_proj", "down_proj"]


def phi3_config():
    return transformers.Phi3Config(
        vocab_size=256, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, pad_token_id=0, eos_token_id=1,
        bos_token_id=2)


PHI3_SHAPES = shapes_of(phi3_config())


def make_phi3_adapter(path, seed=0, **lora_kwargs):
    torch.manual_seed(seed)
    model = transformers.Phi3ForCausalLM(phi3_config())
    lora_kwargs.setdefault("target_modules", "all-linear")
    peft_model = peft.get_peft_model(
        model, peft.LoraConfig(init_lora_weights=False, **lora_kwargs))
    peft_model.save_pretrained(str(path))
    return peft_model


def load_phi3(path, **kwargs):
    return load_peft_adapter(str(path), PHI3_SHAPES, 2, fused_modules=PHI3_FUSED, **kwargs)


def assert_fused_deltas(adapter, peft_model):
    expected = peft_deltas(peft_model)
    got = {}
    for (layer_idx, module), (a, b) in adapter.weights.items():
        got.setdefault(layer_idx, {})[module] = b @ a
    assert {m for ms in got.values() for m in ms} <= set(PHI3_SHAPES)
    seen = set()
    for (layer_idx, module), delta in expected.items():
        parts = PHI3_FUSED.get(module, (module,))
        torch.testing.assert_close(torch.cat([got[layer_idx][p] for p in parts]), delta,
                                   rtol=1e-5, atol=1e-6)
        seen |= {(layer_idx, p) for p in parts}
    assert seen == set(adapter.weights)


@pytest.mark.parametrize("kwargs", [
    dict(r=4, lora_alpha=8),
    dict(r=4, lora_alpha=8, target_modules=PHI3_ALL, use_rslora=True,
         rank_pattern={"qkv_proj": 2, "layers.1.mlp.down_proj": 6}, alpha_pattern={"o_proj": 3}),
    dict(r=4, lora_alpha=8, target_modules=r".*\.layers\.\d\.(self_attn\.qkv|mlp\.gate_up)_proj"),
    dict(r=4, lora_alpha=8, target_modules=["qkv_proj", "down_proj"], layers_to_transform=[1]),
], ids=["all-linear", "list-patterns", "regex", "layers_to_transform"])
def test_fused_deltas_match_peft(tmp_path, kwargs):
    peft_model = make_phi3_adapter(tmp_path, **kwargs)
    adapter = load_phi3(tmp_path)
    assert_fused_deltas(adapter, peft_model)
    fused_bytes = sum(m.lora_A["default"].weight.numel() + m.lora_B["default"].weight.numel()
                      for m in peft_model.modules()
                      if isinstance(m, peft.tuners.lora.LoraLayer) and "default" in m.lora_A)
    assert adapter.num_bytes == 4 * fused_bytes  # A is shared by the parts, B is cut


def test_fused_all_linear_as_saved(tmp_path):
    """target_modules="all-linear" in the file means the checkpoint's linears."""
    peft_model = make_phi3_adapter(tmp_path, r=4, lora_alpha=8)
    edit_config(tmp_path, target_modules="all-linear")
    adapter = load_phi3(tmp_path)
    assert_fused_deltas(adapter, peft_model)
    assert adapter.target_modules == frozenset(PHI3_SHAPES)


def test_fused_adapter_runs_like_peft(tmp_path):
    """Loaded into the slot pool and applied behind a tiny Phi-3's fused linears, the adapter
    gives PEFT's logits."""
    from loraxd.worker.lora import LoraSlotPool, TorchLoraOp

    peft_model = make_phi3_adapter(tmp_path, r=4, lora_alpha=8).eval()
    pool = LoraSlotPool(2, PHI3_SHAPES, 2, op=TorchLoraOp())
    pool.load(1, load_phi3(tmp_path))
    torch.manual_seed(0)
    base = transformers.Phi3ForCausalLM(phi3_config()).eval()
    input_ids = torch.randint(0, 256, (2, 5), generator=torch.Generator().manual_seed(1))
    ctx = pool.step_context(torch.ones(10, dtype=torch.long))
    groups = {"qkv_proj": "qkv", "o_proj": "o", "gate_up_proj": "gate_up", "down_proj": "down"}

    def hook(layer_idx, group):
        def add_lora(module, inputs, output):
            x = inputs[0].reshape(-1, inputs[0].shape[-1])
            y = torch.zeros(x.shape[0], output.shape[-1])
            ctx.apply(layer_idx, group, x, y)
            return output + y.view_as(output)
        return add_lora

    for name, module in base.named_modules():
        if name.rsplit(".", 1)[-1] in groups and ".layers." in name:
            layer_idx = int(name.split(".layers.")[1].split(".")[0])
            module.register_forward_hook(hook(layer_idx, groups[name.rsplit(".", 1)[-1]]))
    with torch.no_grad():
        torch.testing.assert_close(base(input_ids).logits, peft_model(input_ids).logits,
                                   rtol=1e-4, atol=1e-4)


@pytest.mark.parametrize("changes,words", [
    (dict(target_modules=["q_proj", "o_proj"]), "target module 'q_proj'"),
    (dict(target_modules=r".*\.(q|k|v)_proj"), "matches no module"),
])
def test_fused_refuses_part_targets(tmp_path, changes, words):
    make_phi3_adapter(tmp_path, r=4)
    edit_config(tmp_path, **changes)
    reason = refusal_phi3(tmp_path)
    assert words in reason and "fused qkv_proj (q_proj | k_proj | v_proj)" in reason


def test_fused_refuses_part_weights(tmp_path):
    make_phi3_adapter(tmp_path, r=4, target_modules=["qkv_proj"])
    edit_config(tmp_path, target_modules=None)
    edit_weights(tmp_path, lambda t: {k.replace("qkv_proj", "k_proj"): v for k, v in t.items()})
    reason = refusal_phi3(tmp_path)
    assert "module 'k_proj'" in reason and "fused qkv_proj" in reason


def test_fused_and_plain_models_refuse_each_other(tmp_path):
    make_phi3_adapter(tmp_path / "phi3", r=4)
    assert "_proj' is not a LoRA target" in refusal(tmp_path / "phi3", shapes=PHI3_SHAPES)
    make_adapter(tmp_path / "llama", r=4)
    assert "checkpoint has the fused " in refusal_phi3(tmp_path / "llama")


def refusal_phi3(path) -> str:
    with pytest.raises(AdapterIncompatible) as info:
        load_phi3(path)
    assert "\n" not in info.value.reason
    return info.value.reason
