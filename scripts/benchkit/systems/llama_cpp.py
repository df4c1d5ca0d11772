"""llama.cpp's server on GGUF conversions of the same model and adapters.

Traps it has: `--lora-init-without-apply` still leaves every adapter at scale 1 for a
request that names none, so the bench sets every global scale to 0 and names the adapter in
each request (`"lora": [{"id", "scale"}]`, an empty list meaning those global scales);
it batches only requests whose adapters are the same; it closes the connection after each
stream. `-np` is the number of concurrent streams, so it is started once per stream count.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import subprocess
import sys
import urllib.request
from pathlib import Path

from scripts.benchkit.artifacts import cached, fingerprint
from scripts.benchkit.context import BenchContext
from scripts.benchkit.loads import base_body
from scripts.benchkit.systems import Absent
from scripts.benchkit.systems.server_process import ServerProcess, free_port

NAME = "llama.cpp"
RESTART_PER_STREAMS = True
OUTTYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}
KV_TYPE = {"float32": "f32", "float16": "f16", "bfloat16": "bf16"}  # the KV cache as loraxd's


def find_server(option: str | None) -> Path:
    path = option or os.environ.get("LLAMA_SERVER") or shutil.which("llama-server")
    if not path or not Path(path).is_file():
        raise Absent("no llama-server binary (--llama-server PATH, $LLAMA_SERVER or on PATH)")
    return Path(path)


def find_converter(option: str | None, server: Path) -> Path | None:
    """The llama.cpp tree with the converters: the option, else the tree the binary was built
    in (`<tree>/build/bin/llama-server`)."""
    candidates = [Path(option)] if option else [server.resolve().parents[2]]
    for tree in candidates:
        if (tree / "convert_hf_to_gguf.py").is_file() and (tree / "gguf-py").is_dir():
            return tree
    return None


def _convert(python: str, tree: Path, args: list[str], log: Path) -> None:
    env = {**os.environ, "PYTHONPATH": str(tree / "gguf-py")}
    with open(log, "ab") as f:
        try:
            done = subprocess.run([python, *args], stdout=f, stderr=subprocess.STDOUT, env=env)
        except OSError as exc:
            raise Absent(f"cannot run the GGUF converter with {python}: {exc}") from exc
    if done.returncode != 0:
        tail = log.read_text(errors="replace")[-1500:]
        raise Absent(f"the GGUF conversion failed ({' '.join(args[:2])}); its log {log}:\n{tail}")


def _model_source(model_dir: Path, scratch: Path) -> Path:
    """A model folder transformers 4 can read: one saved by transformers 5 may name the
    tokenizer class `TokenizersBackend`; a linked copy then names `PreTrainedTokenizerFast`."""
    cfg_path = model_dir / "tokenizer_config.json"
    cfg = json.loads(cfg_path.read_text()) if cfg_path.is_file() else {}
    if cfg.get("tokenizer_class") != "TokenizersBackend":
        return model_dir
    scratch.mkdir(parents=True, exist_ok=True)
    for f in model_dir.iterdir():
        if f.name != "tokenizer_config.json" and not (scratch / f.name).exists():
            (scratch / f.name).symlink_to(f.resolve())
    cfg["tokenizer_class"] = "PreTrainedTokenizerFast"
    (scratch / "tokenizer_config.json").write_text(json.dumps(cfg))
    return scratch


def gguf_files(ctx: BenchContext, tree: Path | None, python: str) -> tuple[Path, list[Path]]:
    """The model's and each adapter's GGUF, converted once into the cache."""
    outtype = OUTTYPE[ctx.dtype]
    model_key = f"{fingerprint(ctx.model_dir)}-{outtype}"
    root = ctx.cache_dir / "gguf"
    log = ctx.work_dir / "gguf-convert.log"

    def need_tree() -> Path:
        if tree is None:
            raise Absent("no converter: --gguf-convert DIR (a llama.cpp tree with "
                         "convert_hf_to_gguf.py and gguf-py)")
        return tree

    def make_model(out: Path) -> Path:
        out.mkdir()
        src = _model_source(ctx.model_dir, ctx.work_dir / "gguf-model-src")
        _convert(python, need_tree(), [str(need_tree() / "convert_hf_to_gguf.py"), str(src),
                 "--outtype", outtype, "--outfile", str(out / "model.gguf")], log)
        return out

    model = cached(root / model_key, make_model) / "model.gguf"
    adapters = []
    for adapter_dir in ctx.adapter_dirs():
        def make_adapter(out: Path, adapter_dir=adapter_dir) -> Path:
            out.mkdir()
            src = _model_source(ctx.model_dir, ctx.work_dir / "gguf-model-src")
            _convert(python, need_tree(), [
                str(need_tree() / "convert_lora_to_gguf.py"), str(adapter_dir), "--base",
                str(src), "--outtype", outtype, "--outfile", str(out / "adapter.gguf")], log)
            return out
        key = f"{model_key}-{fingerprint(adapter_dir)}"
        adapters.append(cached(root / key, make_adapter) / "adapter.gguf")
    return model, adapters


class LlamaCppSystem:
    def __init__(self, url: str, adapter_ids: list[int]):
        self.url, self.adapter_ids = url, adapter_ids
        self.info: dict = {}

    def body(self, prompt: str, adapter: int | None, new_tokens: int) -> dict:
        lora = [] if adapter is None else [{"id": self.adapter_ids[adapter], "scale": 1.0}]
        return {**base_body(prompt, new_tokens), "lora": lora, "cache_prompt": False}


def _json(url: str, body=None):
    data = None if body is None else json.dumps(body).encode()
    req = urllib.request.Request(url, data=data, headers={"Content-Type": "application/json"})
    with urllib.request.urlopen(req, timeout=30) as resp:
        return json.loads(resp.read() or b"null")


def adapter_ids_by_path(listed: list[dict], paths: list[Path]) -> list[int]:
    """Each of our adapters' id in llama-server's `GET /lora-adapters` list."""
    by_path = {Path(a["path"]).resolve(): a["id"] for a in listed}
    return [by_path[p.resolve()] for p in paths]


@contextlib.contextmanager
def serve(ctx: BenchContext, max_streams: int):
    opts = ctx.peer_options
    binary = find_server(opts.get("llama_server"))
    tree = find_converter(opts.get("gguf_convert"), binary)
    python = opts.get("gguf_python") or os.environ.get("GGUF_PYTHON") or sys.executable
    model, adapters = gguf_files(ctx, tree, python)
    port = free_port()
    per_slot = max(512, opts.get("context_per_stream", 0))
    cmd = [str(binary), "-m", str(model), "-np", str(max_streams), "-cb",
           "-c", str(per_slot * max_streams), "-t", str(ctx.threads), "-tb", str(ctx.threads),
           "-ctk", KV_TYPE[ctx.dtype], "-ctv", KV_TYPE[ctx.dtype],
           "--host", "127.0.0.1", "--port", str(port)]
    if adapters:
        cmd += ["--lora", ",".join(map(str, adapters)), "--lora-init-without-apply"]
    server = ServerProcess(NAME, cmd, ctx.work_dir / f"llama-server-np{max_streams}.log")
    try:
        url = f"http://127.0.0.1:{port}"
        server.wait_ready(url + "/health", timeout=300)
        ids = []
        if adapters:
            ids = adapter_ids_by_path(_json(url + "/lora-adapters"), adapters)
            _json(url + "/lora-adapters", [{"id": i, "scale": 0.0} for i in ids])
            scales = {a["id"]: a["scale"] for a in _json(url + "/lora-adapters")}
            if any(scales[i] != 0.0 for i in ids):
                raise RuntimeError(f"llama-server kept global adapter scales {scales}")
        system = LlamaCppSystem(url, ids)
        system.info["binary"] = str(binary)
        yield system
    finally:
        server.stop()
