"""The supervisor's tokenizer: HF `tokenizers` straight from tokenizer.json (no torch)."""
from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tokenizers import Tokenizer as _RustTokenizer


class Tokenizer:
    def __init__(self, model_dir: str | Path, num_threads: int = 1):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
        self._tok = _RustTokenizer.from_file(str(path))
        self.special_ids = frozenset(
            int(i) for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.config = _read_json(model_dir / "tokenizer_config.json")
        # For /v1/chat/completions: the jinja source (None: the model has none) and the
        # special token strings a template reads (bos_token, eos_token, ...).
        self.chat_template = read_chat_template(model_dir, self.config)
        self.special_tokens = special_token_strings(
            self.config, _read_json(model_dir / "special_tokens_map.json"))
        # One thread by default: encoding is quick, and the worker owns the cores.
        self.num_threads = num_threads
        self._pool = ThreadPoolExecutor(max_workers=num_threads, thread_name_prefix="tokenizer")

    def encode_now(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._tok.encode(text, add_special_tokens=add_special_tokens).ids

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        loop = asyncio.get_running_loop()
        return await loop.run_in_executor(self._pool, self.encode_now, text, add_special_tokens)

    async def encode_with_offsets(self, text: str, add_special_tokens: bool = True
                                  ) -> list[tuple[int, int, int]]:
        def run():
            enc = self._tok.encode(text, add_special_tokens=add_special_tokens)
            return [(i, a, b) for i, (a, b) in zip(enc.ids, enc.offsets)]
        return await asyncio.get_running_loop().run_in_executor(self._pool, run)

    def decode(self, ids: list[int], skip_special_tokens: bool = False) -> str:
        return self._tok.decode(ids, skip_special_tokens=skip_special_tokens)

    def id_to_token(self, token_id: int) -> str:
        return self._tok.id_to_token(token_id) or ""

    def close(self) -> None:
        self._pool.shutdown(wait=False, cancel_futures=True)


_SPECIAL_TOKEN_NAMES = ("bos_token", "eos_token", "unk_token", "pad_token", "sep_token",
                        "cls_token", "mask_token")


def read_chat_template(model_dir: Path, config: dict) -> str | None:
    """chat_template.jinja beside tokenizer.json, else chat_template.json's `chat_template`,
    else tokenizer_config.json's (a string, or named templates: "default" or the first)."""
    jinja_path = model_dir / "chat_template.jinja"
    if jinja_path.exists():
        return jinja_path.read_text()
    source = _read_json(model_dir / "chat_template.json").get("chat_template")
    if source is None:
        source = config.get("chat_template")
    if isinstance(source, list):
        named = {t.get("name"): t.get("template") for t in source if isinstance(t, dict)}
        source = named.get("default") or next(iter(named.values()), None)
    return source if isinstance(source, str) and source else None


def chat_files(directory: Path) -> tuple[str | None, dict[str, str]]:
    """A directory's chat template source (None: it has none) and special token strings:
    what an adapter that ships its own template brings."""
    config = _read_json(directory / "tokenizer_config.json")
    special = special_token_strings(config, _read_json(directory / "special_tokens_map.json"))
    return read_chat_template(directory, config), special


def special_token_strings(config: dict, special_map: dict) -> dict[str, str]:
    """{"bos_token": "<s>", ...} from tokenizer_config.json, else special_tokens_map.json;
    a token saved as an AddedToken object gives its `content`."""
    out = {}
    for name in _SPECIAL_TOKEN_NAMES:
        value = config.get(name, special_map.get(name))
        if isinstance(value, dict):
            value = value.get("content")
        if isinstance(value, str):
            out[name] = value
    return out


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
