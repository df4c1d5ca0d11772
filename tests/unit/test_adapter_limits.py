"""Adapters are untrusted input: config patterns run in linear time, files stay inside the
adapter directories, rank and size are bounded before the weights are read."""
from __future__ import annotations

import os
import subprocess
import sys
import textwrap

import pytest
import torch

from tests.unit.test_lora_peft_format import SHAPES, edit_config, make_adapter
from loraxd.worker.lora import AdapterIncompatible, load_peft_adapter
from loraxd.worker.lora.limits import AdapterLimits
from loraxd.worker.lora.patterns import MAX_PATTERN_CHARS

EVIL = "(.|.)*Z"  # exponential for a backtracking engine on any module name


def refusal(path, **limits) -> str:
    with pytest.raises(AdapterIncompatible) as info:
        load_peft_adapter(str(path), SHAPES, num_layers=2, limits=AdapterLimits(**limits))
    assert "\n" not in info.value.reason
    return info.value.reason


# -- patterns ----------------------------------------------------------------------------------


@pytest.mark.parametrize("field", ["target_modules", "exclude_modules", "layers_pattern",
                                   "rank_pattern", "alpha_pattern"])
def test_catastrophic_patterns_finish_at_once(tmp_path, field):
    """Python's `re` would never return here (and hold the GIL): run in a subprocess."""
    make_adapter(tmp_path, r=4, target_modules=["q_proj"])
    value = {EVIL: 2} if field.endswith("_pattern") and field != "layers_pattern" else EVIL
    edit_config(tmp_path, **{field: value})
    code = textwrap.dedent(f"""
        from tests.unit.test_lora_peft_format import SHAPES
        from loraxd.worker.lora import AdapterIncompatible, load_peft_adapter
        try:
            load_peft_adapter({str(tmp_path)!r}, SHAPES, num_layers=2)
            print("loaded")
        except AdapterIncompatible as e:
            print("refused:", e.reason)
        """)
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         timeout=60, cwd=os.getcwd())
    assert out.returncode == 0, out.stderr
    assert out.stdout.startswith(("loaded", "refused:")), out.stdout


@pytest.mark.parametrize("field, value", [
    ("target_modules", r"(q)\1_proj"),
    ("target_modules", r".*(?=q_proj)q_proj"),
    ("exclude_modules", r".*(?<!layers\.0\.self_attn\.)q_proj"),
    ("layers_pattern", r"(?!x)layers"),
    ("rank_pattern", {r"(?<=self_attn\.)q_proj": 2}),
    ("alpha_pattern", {r"(v)\1": 2}),
])
def test_backtracking_syntax_is_refused_naming_the_pattern(tmp_path, field, value):
    make_adapter(tmp_path, r=4, target_modules=["q_proj", "v_proj"])
    edit_config(tmp_path, **{field: value})
    pattern = value if isinstance(value, str) else next(iter(value))
    reason = refusal(tmp_path)
    assert repr(pattern) in reason and "RE2" in reason and field.split("_")[0] in reason


def test_overlong_pattern_is_refused(tmp_path):
    make_adapter(tmp_path, r=4, target_modules=["q_proj"])
    edit_config(tmp_path, target_modules="q" * (MAX_PATTERN_CHARS + 1) + "|.*q_proj")
    assert f"at most {MAX_PATTERN_CHARS}" in refusal(tmp_path)


def test_re2_patterns_keep_peft_semantics(tmp_path):
    """The same regexes as before, through RE2: lazy `.*?`, groups, suffix keys."""
    make_adapter(tmp_path, r=4, lora_alpha=8,
                 target_modules=r".*\.layers\.(0|1)\.self_attn\.q_proj",
                 rank_pattern={r"layers\.1\..*q_proj": 2}, alpha_pattern={"q_proj": 3})
    adapter = load_peft_adapter(str(tmp_path), SHAPES, num_layers=2)
    assert adapter.ranks == {(0, "q_proj"): 4, (1, "q_proj"): 2}


# -- rank and size -----------------------------------------------------------------------------


def test_rank_over_the_limit_is_refused(tmp_path):
    make_adapter(tmp_path, r=16, target_modules=["q_proj"])
    assert "r=16 is above this server's max_lora_rank (8)" in refusal(tmp_path, max_rank=8)
    load_peft_adapter(str(tmp_path), SHAPES, num_layers=2, limits=AdapterLimits(max_rank=16))


def test_rank_pattern_over_the_limit_is_refused(tmp_path):
    make_adapter(tmp_path, r=4, target_modules=["q_proj"], rank_pattern={"q_proj": 32})
    assert "rank_pattern['q_proj']=32" in refusal(tmp_path, max_rank=16)


def test_size_over_the_limit_is_refused_before_loading(tmp_path, monkeypatch):
    import safetensors.torch
    make_adapter(tmp_path, r=8)
    size = (tmp_path / "adapter_model.safetensors").stat().st_size
    monkeypatch.setattr(safetensors.torch, "load_file",
                        lambda *a, **k: pytest.fail("weights read despite the limit"))
    assert "more than max_adapter_bytes" in refusal(tmp_path, max_bytes=size - 1)


def test_memory_size_counts_the_worker_dtype(tmp_path, monkeypatch):
    """A float16 file read into float32 takes twice its size: known from the header."""
    import safetensors.torch
    make_adapter(tmp_path, r=8)
    file = tmp_path / "adapter_model.safetensors"
    half = {k: v.half() for k, v in safetensors.torch.load_file(str(file)).items()}
    safetensors.torch.save_file(half, str(file))
    size = file.stat().st_size
    load_peft_adapter(str(tmp_path), SHAPES, num_layers=2, dtype=torch.float16,
                      limits=AdapterLimits(max_bytes=size))
    monkeypatch.setattr(safetensors.torch, "load_file",
                        lambda *a, **k: pytest.fail("weights read despite the limit"))
    with pytest.raises(AdapterIncompatible, match="in memory, more than max_adapter_bytes"):
        load_peft_adapter(str(tmp_path), SHAPES, num_layers=2, dtype=torch.float32,
                          limits=AdapterLimits(max_bytes=size))


def test_bin_over_the_limit_is_refused(tmp_path):
    make_adapter(tmp_path, r=8, safe=False)
    size = (tmp_path / "adapter_model.bin").stat().st_size
    assert "adapter_model.bin is" in refusal(tmp_path, max_bytes=size // 2)


def test_huge_safetensors_header_is_refused(tmp_path):
    make_adapter(tmp_path, r=4)
    (tmp_path / "adapter_model.safetensors").write_bytes((1 << 40).to_bytes(8, "little"))
    assert "no valid safetensors header" in refusal(tmp_path)


# -- where the files lie -----------------------------------------------------------------------


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_file_linked_outside_the_roots_is_not_read(tmp_path, name):
    root, outside = tmp_path / "adapters", tmp_path / "elsewhere"
    make_adapter(root / "a", r=4)
    outside.mkdir()
    (root / "a" / name).rename(outside / name)
    (root / "a" / name).symlink_to(outside / name)
    reason = refusal(root / "a", roots=(str(root),))
    assert f"{name} resolves to a file outside the adapter directories" in reason
    load_peft_adapter(str(root / "a"), SHAPES, num_layers=2,
                      limits=AdapterLimits(roots=(str(root), str(outside))))


def test_link_inside_the_roots_is_read(tmp_path):
    root = tmp_path / "adapters"
    make_adapter(root / "a", r=4)
    (root / "blobs").mkdir()
    (root / "a" / "adapter_model.safetensors").rename(root / "blobs" / "w")
    (root / "a" / "adapter_model.safetensors").symlink_to("../blobs/w")  # as the hub cache does
    load_peft_adapter(str(root / "a"), SHAPES, num_layers=2,
                      limits=AdapterLimits(roots=(str(root),)))


def test_weights_that_are_not_a_regular_file_are_refused(tmp_path):
    make_adapter(tmp_path, r=4)
    (tmp_path / "adapter_model.safetensors").unlink()
    os.mkfifo(tmp_path / "adapter_model.safetensors")  # reading would block for ever
    assert "not a regular file" in refusal(tmp_path, roots=(str(tmp_path),))
