"""What the bench makes once and keeps: random PEFT adapters and the peers' conversions of
the model and adapters, under a cache folder keyed by what they were made from."""
from __future__ import annotations

import hashlib
import json
import os
import shutil
import tempfile
from pathlib import Path

ALL_LINEAR = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def default_cache_dir() -> Path:
    base = os.environ.get("XDG_CACHE_HOME") or os.path.expanduser("~/.cache")
    return Path(base) / "loraxd-bench"


def fingerprint(*paths: Path) -> str:
    """A short key for model or adapter folders: their files' names, sizes and mtimes (the
    weights are large; a changed file changes its mtime)."""
    h = hashlib.sha256()
    for root in paths:
        root = Path(root).resolve()
        h.update(str(root).encode())
        for f in sorted(p for p in root.iterdir() if p.is_file()):
            st = f.stat()
            h.update(f"{f.name}:{st.st_size}:{st.st_mtime_ns};".encode())
    return h.hexdigest()[:16]


def cached(target: Path, make) -> Path:
    """`target`, made by `make(tmp_path)` into a sibling and renamed when absent, so an
    interrupted run leaves no half-made entry."""
    if target.exists():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    tmp = Path(tempfile.mkdtemp(prefix=target.name + ".", dir=target.parent))
    try:
        made = make(tmp / target.name)
        os.replace(made, target)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
    return target


def adapter_names(count: int, rank: int) -> list[str]:
    return [f"bench-r{rank}-{i}" for i in range(count)]


def make_adapters(model_dir: Path, cache_dir: Path, count: int, rank: int) -> Path:
    """A folder of `count` random rank-`rank` PEFT adapters on every linear of the model
    (seeded, so a remade set is the same), one subfolder per adapter name."""
    def make(out: Path) -> Path:
        import torch
        from peft import LoraConfig, get_peft_model
        from transformers import AutoModelForCausalLM
        base = AutoModelForCausalLM.from_pretrained(model_dir, dtype=torch.float32)
        for i, name in enumerate(adapter_names(count, rank)):
            torch.manual_seed(1000 + i)
            cfg = LoraConfig(r=rank, lora_alpha=2 * rank, init_lora_weights=False,
                             target_modules=ALL_LINEAR)
            model = get_peft_model(base, cfg)
            model.save_pretrained(out / name)
            base = model.unload()
        return out
    key = f"{fingerprint(model_dir)}-r{rank}-n{count}"
    return cached(cache_dir / "adapters" / key, make)


def model_config(model_dir: Path) -> dict:
    return json.loads((Path(model_dir) / "config.json").read_text())
