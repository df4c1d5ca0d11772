"""The supervisor's tokenizer: HF `tokenizers` straight from tokenizer.json (no torch)."""
from __future__ import annotations

import asyncio
import json
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from tokenizers import Tokenizer as _RustTokenizer


class Tokenizer:
    def __init__(self, model_dir: str | Path):
        model_dir = Path(model_dir)
        path = model_dir / "tokenizer.json"
        if not path.exists():
            raise FileNotFoundError(f"{model_dir} has no tokenizer.json")
        self._tok = _RustTokenizer.from_file(str(path))
        self.special_ids = frozenset(
            int(i) for i, t in self._tok.get_added_tokens_decoder().items() if t.special)
        self.vocab_size = self._tok.get_vocab_size(with_added_tokens=True)
        self.config = _read_json(model_dir / "tokenizer_config.json")
        # One thread: encoding is quick, and the worker owns the cores.
        self._pool = ThreadPoolExecutor(max_workers=1, thread_name_prefix="tokenizer")

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


def _read_json(path: Path) -> dict:
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return {}
