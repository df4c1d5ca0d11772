"""`loraxd`: the supervisor's entry point.

Life: config (exit 78 when bad), logging, model resolution (downloads and the one-time
conversion happen here, before any worker), then one uvloop event loop running the service
(loraxd.daemon.service: workers, engine, HTTP and control sockets, reload, drain) until
SIGTERM/SIGINT.
"""
from __future__ import annotations

import faulthandler
import json
import logging
import os
import platform
import signal
import sys
from importlib import metadata

import uvloop

from loraxd import __version__
from loraxd.config import EXIT_CONFIG, load, load_or_exit
from loraxd.daemon import notify
from loraxd.daemon.model_files import ModelNotFound, resolve_model
from loraxd.daemon.service import Service
from loraxd.daemon.supervisor import WorkerStartError
from loraxd.http.api_keys import KeyRing, KeysFileError
from loraxd.logs import configure as setup_logging

log = logging.getLogger("loraxd")

EXIT_FAILURE = 1


def print_env(config) -> None:
    def version(pkg: str) -> str:
        try:
            return metadata.version(pkg)
        except metadata.PackageNotFoundError:
            return "not installed"
    info = {"loraxd": __version__, "python": platform.python_version(),
            "platform": platform.platform(), "cpu_count": os.cpu_count(),
            **{pkg: version(pkg) for pkg in ("torch", "transformers", "tokenizers", "aiohttp",
                                             "pyzmq", "msgspec", "safetensors",
                                             "opentelemetry-sdk")},
            "config": config.to_dict()}
    print(json.dumps(info, indent=2))


def _check_api_keys(config) -> bool:
    """A configured keys file that cannot be used stops the daemon before any worker starts."""
    try:
        KeyRing(config.server.api_keys_file).load()
    except KeysFileError as exc:
        log.error("%s", exc)
        return False
    return True


def main(argv: list[str] | None = None) -> int:
    argv = sys.argv[1:] if argv is None else list(argv)
    environ = dict(os.environ)  # a reload reads the same flags and environment again
    config, actions = load_or_exit(argv, environ)
    setup_logging(json_output=config.server.json_output, level=config.server.log_level)
    faulthandler.enable()  # SIGABRT (the watchdog's kill) and crashes: every thread's stack
    signal.signal(signal.SIGHUP, signal.SIG_IGN)  # a reload before serving must not kill us
    if actions.env:
        print_env(config)
        return 0
    if not _check_api_keys(config):
        return EXIT_CONFIG
    if actions.check_config:
        print("configuration is valid")
        return 0
    notify.status(f"resolving the model {config.model.model_id}")
    try:
        model_dir = resolve_model(config.model.model_id, revision=config.model.revision,
                                  cache_dir=config.paths.cache_dir,
                                  hub_cache=config.model.huggingface_hub_cache,
                                  source=config.model.source,
                                  weights_dir=config.model.weights_cache_override)
    except ModelNotFound as exc:
        log.error("%s", exc)
        return EXIT_FAILURE
    if actions.download_only:
        print(model_dir)
        return 0
    service = Service(config, model_dir, config_file=actions.config_file,
                      read_config=lambda: load(argv, environ)[0])
    try:
        uvloop.run(service.run())
    except WorkerStartError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG if exc.config_error else EXIT_FAILURE
    except KeysFileError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_CONFIG
    except OSError as exc:
        log.error("cannot start: %s", exc)
        return EXIT_FAILURE
    log.info("stopped")
    return 0


if __name__ == "__main__":
    sys.exit(main())
