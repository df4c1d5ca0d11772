"""Sending traces to `otlp_endpoint`: OTLP/HTTP with protobuf, from the OpenTelemetry SDK.

The tracer provider is loraxd's own (the process-wide one is left alone). Ended spans are
queued and a BatchSpanProcessor sends them from its own thread, so no request ever waits on
the collector. The SDK logs each failed export (and each span dropped from a full queue); a
collector that does not answer would flood the log, so those lines come out as warnings, at
most one a minute, with a count of those held back.
"""
from __future__ import annotations

import asyncio
import logging
import math
import threading
import time
from typing import Any, Callable
from urllib.parse import urlsplit, urlunsplit

from loraxd import __version__

log = logging.getLogger(__name__)

TRACES_PATH = "/v1/traces"
OTLP_GRPC_PORT = 4317
_WARN_EVERY_S = 60.0
_SDK_LOGGERS = ("opentelemetry.exporter.otlp.proto.http.trace_exporter",
                "opentelemetry.exporter.otlp.common.http", "opentelemetry.sdk._shared_internal",
                "opentelemetry.sdk.trace.export")
_CLOSE_POLL_S = 0.05


def traces_url(endpoint: str) -> str:
    """A collector's base URL gets OTLP/HTTP's traces path; a URL with a path is kept."""
    parts = urlsplit(endpoint)
    return endpoint if parts.path not in ("", "/") else urlunsplit(
        parts._replace(path=TRACES_PATH))


class RateLimitedWarnings(logging.Filter):
    """Lets one record through per `interval_s` (the SDK's thread and the loop both log),
    as a warning that counts the ones held back since the last."""

    def __init__(self, interval_s: float, clock: Callable[[], float] = time.monotonic):
        super().__init__()
        self.interval_s = interval_s
        self._clock = clock
        self._lock = threading.Lock()
        self._next = -math.inf
        self._held = 0

    def filter(self, record: logging.LogRecord) -> bool:
        with self._lock:
            now = self._clock()
            if now < self._next:
                self._held += 1
                return False
            self._next, held, self._held = now + self.interval_s, self._held, 0
        text = f"traces not exported: {record.getMessage()}"
        if held:
            text += f" ({held} more such message(s) held back since the last)"
        record.msg, record.args = text, ()
        if record.levelno > logging.WARNING:  # the collector's trouble, not the daemon's
            record.levelno, record.levelname = logging.WARNING, "WARNING"
        return True


_FILTER = RateLimitedWarnings(_WARN_EVERY_S)


def _resource() -> Any:
    """service.name loraxd, unless OTEL_SERVICE_NAME or OTEL_RESOURCE_ATTRIBUTES name one."""
    from opentelemetry.sdk.resources import SERVICE_NAME, Resource
    resource = Resource.create({"service.version": __version__})
    if str(resource.attributes.get(SERVICE_NAME, "")).startswith("unknown_service"):
        resource = resource.merge(Resource({SERVICE_NAME: "loraxd"}))
    return resource


class TraceExport:
    def __init__(self, endpoint: str):
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace import TracerProvider
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        self.url = traces_url(endpoint)
        for name in _SDK_LOGGERS:
            logger = logging.getLogger(name)
            if _FILTER not in logger.filters:
                logger.addFilter(_FILTER)
        self.provider = TracerProvider(resource=_resource(), shutdown_on_exit=False)
        self.provider.add_span_processor(BatchSpanProcessor(OTLPSpanExporter(endpoint=self.url)))
        self.tracer = self.provider.get_tracer("loraxd", __version__)
        if urlsplit(self.url).port == OTLP_GRPC_PORT:
            log.warning("otlp_endpoint %s: port %d is OTLP/gRPC's; loraxd sends OTLP/HTTP "
                        "(a collector's port 4318)", self.url, OTLP_GRPC_PORT)
        log.info("tracing: one trace per generation request, sent to %s (OTLP/HTTP)", self.url)

    async def close(self, timeout_s: float = 5.0) -> None:
        """Send what is queued, waiting at most `timeout_s` (from a thread of its own: the
        loop's executor would be waited for at exit however long the collector takes)."""
        flush = threading.Thread(target=self.provider.shutdown, name="otlp-flush", daemon=True)
        flush.start()
        deadline = time.monotonic() + timeout_s
        while flush.is_alive() and time.monotonic() < deadline:
            await asyncio.sleep(_CLOSE_POLL_S)
        if flush.is_alive():
            log.warning("tracing: the last spans were not all sent within %g s", timeout_s)
