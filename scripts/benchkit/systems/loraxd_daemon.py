"""loraxd itself: the real daemon from this tree, one worker with the bench's threads."""
from __future__ import annotations

import contextlib
import os
import statistics
import sys
import time
from pathlib import Path

from scripts.benchkit.context import BenchContext
from scripts.benchkit.loads import base_body
from scripts.benchkit.systems.server_process import ServerProcess, free_port

REPO = Path(__file__).resolve().parents[3]
NAME = "loraxd"
RESTART_PER_STREAMS = False


class LoraxdSystem:
    def __init__(self, url: str, adapter_names: list[str]):
        self.url, self.adapter_names = url, adapter_names
        self.info: dict = {}

    def body(self, prompt: str, adapter: int | None, new_tokens: int) -> dict:
        model = "" if adapter is None else self.adapter_names[adapter]
        return {**base_body(prompt, new_tokens), "model": model}


class Precision:
    """loraxd again with other weights, as one more system of the same run: `spec` is a
    dtype, `int8-weight-only`, or both joined by `+` (`int8-weight-only+bfloat16`)."""
    RESTART_PER_STREAMS = False

    def __init__(self, spec: str):
        parts = spec.split("+")
        quantize = [p for p in parts if p.startswith("int8")]
        dtypes = [p for p in parts if not p.startswith("int8")]
        if len(quantize) > 1 or len(dtypes) > 1:
            raise ValueError(f"precision {spec!r}: at most one dtype and one int8 method")
        self.NAME = f"loraxd {spec}"
        self.dtype = dtypes[0] if dtypes else None
        self.extra = ("--quantize", quantize[0]) if quantize else ()

    def itemsizes(self, run_dtype: str) -> tuple[int, int]:
        """Bytes per weight and per adapter weight a step reads (int8: one a weight, the
        adapters in the model dtype), for this system's own roofline."""
        from scripts.benchkit.roofline import ITEMSIZE
        adapter = ITEMSIZE[self.dtype or run_dtype]
        return (1 if self.extra else adapter), adapter

    def serve(self, ctx: BenchContext, max_streams: int):
        return serve(ctx, max_streams, self.extra, dtype=self.dtype)


@contextlib.contextmanager
def serve(ctx: BenchContext, max_streams: int, extra: tuple[str, ...] = (),
          dtype: str | None = None):
    """One daemon for every load (its batch grows to `max_streams` on its own); `extra`:
    more command-line options; `dtype`: other than the run's."""
    model_dir, adapter_root, adapter_names = ctx.model_dir, ctx.adapter_root, ctx.adapter_names
    threads, work_dir = ctx.threads, ctx.work_dir
    dtype = dtype or ctx.dtype
    port = free_port()
    cmd = [sys.executable, "-m", "loraxd.daemon.main", "--model-id", str(model_dir),
           "--port", str(port), "--runtime-dir", str(work_dir / "loraxd-run"),
           "--cache-dir", str(work_dir / "loraxd-cache"), "--config", os.devnull,
           "--dtype", dtype, "--num-threads", str(threads),
           "--local-adapter-dir", str(adapter_root), "--adapter-source", "local",
           "--max-active-adapters", str(max(1, len(adapter_names))), *extra]
    env = {"PYTHONPATH": os.pathsep.join(filter(None, [str(REPO), os.environ.get("PYTHONPATH")]))}
    log_name = "-".join(["loraxd", dtype, *extra[1:]]) + ".log"
    server = ServerProcess(NAME, cmd, work_dir / log_name, env=env)
    try:
        url = f"http://127.0.0.1:{port}"
        server.wait_ready(url + "/health", timeout=300)
        system = LoraxdSystem(url, adapter_names)
        system.info["idle_1_token_ms_p50"] = idle_latency_ms(url, 20)
        yield system
    finally:
        server.stop()


def idle_latency_ms(url: str, n: int) -> float:
    """How long an idle daemon takes to answer a 1-token request (its IPC path's overhead
    over one forward pass), median of `n`."""
    import requests
    times = []
    with requests.Session() as session:
        for _ in range(n):
            t0 = time.perf_counter()
            session.post(url + "/generate", json={"inputs": "Hello",
                                                  "parameters": {"max_new_tokens": 1}}
                         ).raise_for_status()
            times.append(time.perf_counter() - t0)
    return 1000 * statistics.median(times)
