"""A tiny random Llama with the default model's tokenizer, and PEFT adapters for it.

Its vocabulary (49152 rows) is most of its weights, as in real models; it loads in a
moment and generates fast, so daemon tests can restart workers many times."""
from __future__ import annotations

import shutil
from pathlib import Path

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json", "special_tokens_map.json")


def build(default_model_dir: Path, root: Path, adapters=(("a", 1, 8), ("b", 2, 4), ("c", 3, 2)),
          *, seed: int = 7, tied: bool = False, max_positions: int = 2048) -> Path:
    """root/model and root/adapters/<name> for each (name, seed, rank); returns root."""
    import torch
    import transformers

    from tests.unit.test_family_adapters import _save_adapter

    config = transformers.LlamaConfig(
        vocab_size=49152, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=max_positions,
        initializer_range=0.5, tie_word_embeddings=tied, bos_token_id=1, eos_token_id=2)
    torch.manual_seed(seed)
    base = transformers.AutoModelForCausalLM.from_config(config).eval()
    base.save_pretrained(root / "model")
    for name in TOKENIZER_FILES:
        shutil.copy(default_model_dir / name, root / "model")
    for name, adapter_seed, rank in adapters:
        base = _save_adapter(base, root / "adapters" / name, seed=adapter_seed, rank=rank)
    return root
