"""`loraxd`: the supervisor's entry point.

Life: config (exit 78 when bad), logging, model resolution (downloads and the one-time
conversion happen here, before any worker), then one uvloop event loop hosting the worker
supervisor, the engine and the HTTP frontend until SIGTERM/SIGINT.
"""
from __future__ import annotations

import asyncio
import json
import logging
import os
import platform
import signal
import sys
import time
from importlib import metadata
from pathlib import Path

import uvloop
from aiohttp import web

from loraxd import __version__
from loraxd.adapters.sources import adapter_sources
from loraxd.config import EXIT_CONFIG, load_or_exit
from loraxd.control.server import ControlServer
from loraxd.daemon.model_files import ModelNotFound, resolve_model
from loraxd.daemon.notify import sd_notify
from loraxd.daemon.supervisor import Supervisor, WorkerStartError
from loraxd.engine.engine import AsyncEngine
from loraxd.engine.tokenizer import Tokenizer
from loraxd.engine.worker_client import WorkerClient
from loraxd.http.api_keys import KeyRing, KeysFileError
from loraxd.http.app import make_app, make_runner, reload

log = logging.getLogger("loraxd")

EXIT_FAILURE = 1


class JsonFormatter(logging.Formatter):
    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname,
                 "logger": record.name, "message": record.getMessage()}
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


def setup_logging(json_output: bool) -> None:
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(JsonFormatter() if json_output else
                         logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    logging.basicConfig(level=logging.INFO, handlers=[handler], force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)


def print_env(config) -> None:
    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"
    info = {"loraxd": __version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            **{pkg: version(pkg) for pkg in ("torch", "transformers", "tokenizers", "aiohttp",
                                             "pyzmq", "msgspec", "safetensors")},
            "config": config.to_dict()}
    print(json.dumps(info, indent=2))


async def serve(config, model_dir: Path) -> None:
    runtime = Path(config.paths.runtime_dir)
    runtime.mkdir(mode=0o750, parents=True, exist_ok=True)
    workers = WorkerClient(f"ipc://{runtime / 'workers.sock'}", config.model.num_shard)
    supervisor = Supervisor(config, str(model_dir), workers)
    stop = asyncio.Event()
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        loop.add_signal_handler(sig, stop.set)
    tokenizer = Tokenizer(model_dir)
    sd_notify("STATUS=starting workers")
    ready = await supervisor.start()
    sources = adapter_sources(config)
    engine = AsyncEngine(config, tokenizer, workers, ready, recover=supervisor.restart,
                         sources=sources)
    engine.start()
    control = ControlServer(config.paths.control_socket, engine, supervisor)
    app = make_app(engine, config)
    loop.add_signal_handler(signal.SIGHUP, _reload, app)
    runner = make_runner(app, access_log=None)  # handler cancellation, head deadline
    await runner.setup()
    try:
        await control.start()
        site = web.TCPSite(runner, config.server.hostname, config.server.port)
        await site.start()
        log.info("serving %s on http://%s:%d", config.model.model_id, config.server.hostname,
                 config.server.port)
        sd_notify(f"READY=1\nSTATUS=serving {config.model.model_id}")
        await stop.wait()
        log.info("stopping")
        sd_notify("STOPPING=1")
    finally:
        await control.stop()
        await runner.cleanup()
        await engine.stop()
        await supervisor.stop()
        workers.close()
        tokenizer.close()


def _reload(app: web.Application) -> None:
    """SIGHUP: re-read what can change without a restart (the API keys)."""
    now_us = time.clock_gettime_ns(time.CLOCK_MONOTONIC) // 1000
    sd_notify(f"RELOADING=1\nMONOTONIC_USEC={now_us}")
    reload(app)
    sd_notify("READY=1")


def _check_api_keys(config) -> bool:
    """A configured keys file that cannot be used stops the daemon before any worker starts."""
    try:
        KeyRing(config.server.api_keys_file).load()
    except KeysFileError as exc:
        log.error("%s", exc)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    config, actions = load_or_exit(sys.argv[1:] if argv is None else argv, os.environ)
    setup_logging(config.server.json_output)
    if actions.env:
        print_env(config)
        return 0
    if not _check_api_keys(config):
        return EXIT_CONFIG
    if actions.check_config:
        print("configuration is valid")
        return 0
    try:
        model_dir = resolve_model(config.model.model_id, revision=config.model.revision,
                                  cache_dir=config.paths.cache_dir,
                                  hub_cache=config.model.huggingface_hub_cache)
    except ModelNotFound as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    if actions.download_only:
        print(model_dir)
        return 0
    try:
        uvloop.run(serve(config, model_dir))
    except WorkerStartError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG if exc.config_error else EXIT_FAILURE
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILURE
    return 0


if __name__ == "__main__":
    sys.exit(main())
