"""Log lines on stderr, one per event, for journald and for people alike.

Three shapes: JSON (one object per line, `--json-output`), journald (no timestamp, which
the journal adds, and an sd-daemon `<N>` priority prefix so `journalctl -p` works), and
plain text. The supervisor and every worker set up logging here, so `--json-output` covers
them all. A record logged with `extra={"request_id": N}` carries it as a field in JSON.
Stdlib only: the supervisor and loraxctl import it.
"""
from __future__ import annotations

import json
import logging
import os
import sys

LEVELS = ("debug", "info", "warning", "error")
_PRIORITY = {logging.DEBUG: 7, logging.INFO: 6, logging.WARNING: 4, logging.ERROR: 3,
             logging.CRITICAL: 2}  # syslog priorities, as sd-daemon(3) prefixes them


def level_number(name: str) -> int:
    if name.lower() not in LEVELS:
        raise ValueError(f"unknown log level {name!r}; the levels are {', '.join(LEVELS)}")
    return getattr(logging, name.upper())


def level_name(number: int) -> str:
    return logging.getLevelName(number).lower()


class JsonFormatter(logging.Formatter):
    def __init__(self, process: str):
        super().__init__()
        self.process = process

    def format(self, record: logging.LogRecord) -> str:
        entry = {"time": self.formatTime(record), "level": record.levelname.lower(),
                 "process": self.process, "pid": record.process, "logger": record.name,
                 "message": record.getMessage()}
        request_id = getattr(record, "request_id", None)
        if request_id is not None:
            entry["request_id"] = request_id
        if record.exc_info:
            entry["exception"] = self.formatException(record.exc_info)
        return json.dumps(entry)


class JournalFormatter(logging.Formatter):
    def __init__(self, process: str):
        super().__init__(f"{process} %(name)s: %(message)s")

    def format(self, record: logging.LogRecord) -> str:
        return f"<{_PRIORITY.get(record.levelno, 6)}>" + super().format(record)


def _text_formatter(process: str) -> logging.Formatter:
    return logging.Formatter(f"%(asctime)s {process} %(levelname)s %(name)s: %(message)s")


def stderr_is_journal(environ=os.environ) -> bool:
    """systemd sets $JOURNAL_STREAM to the device:inode of the stream it connected."""
    try:
        st = os.fstat(sys.stderr.fileno())
    except (OSError, ValueError, AttributeError):
        return False
    return environ.get("JOURNAL_STREAM") == f"{st.st_dev}:{st.st_ino}"


def configure(*, json_output: bool, level: str = "info", process: str = "loraxd") -> None:
    """The root logger writes to stderr; `process` names the writer (loraxd, worker0, …)."""
    if json_output:
        formatter: logging.Formatter = JsonFormatter(process)
    elif stderr_is_journal():
        formatter = JournalFormatter(process)
    else:
        formatter = _text_formatter(process)
    handler = logging.StreamHandler(sys.stderr)
    handler.setFormatter(formatter)
    logging.basicConfig(level=level_number(level), handlers=[handler], force=True)
    logging.getLogger("aiohttp.access").setLevel(logging.WARNING)
    logging.captureWarnings(True)  # library warnings become log lines too
    sys.excepthook = _log_uncaught  # so does a crash, in the same shape


def _log_uncaught(kind, value, tb) -> None:
    logging.getLogger("loraxd").critical("uncaught %s: %s", kind.__name__, value,
                                         exc_info=(kind, value, tb))


def set_level(level: str) -> None:
    logging.getLogger().setLevel(level_number(level))


def current_level() -> str:
    return level_name(logging.getLogger().level)
