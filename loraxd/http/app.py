"""The aiohttp application: routes, the error middleware, CORS.

Run it with `handler_cancellation=True` (use `make_runner`): aiohttp then cancels a
handler whose client disconnected, which closes the engine's generator and frees the
request's KV blocks and batch slot at once, even while no token is being written; it also
bounds how long a client may take to send a request's head (head_deadline.py).
"""
from __future__ import annotations

from typing import Any, Callable

from aiohttp import web

from loraxd.http.api_keys import KeyRing
from loraxd.http.auth import auth_middleware
from loraxd.http.errors import error_middleware
from loraxd.http.head_deadline import HEAD_DEADLINES, DeadlineRunner, head_deadline_middleware
from loraxd.http.metrics import Metrics
from loraxd.http.native import NativeRoutes
from loraxd.http.openai import OpenAIRoutes
from loraxd.http.openapi import OpenAPIRoutes
from loraxd.http.service import FRONTEND_KEY, Frontend

KEYRING_KEY = web.AppKey("api_keys", KeyRing)

# What an AppRunner / web.run_app serving this app must be given.
RUNNER_KWARGS = {"handler_cancellation": True}

_CORS_METHODS = "GET, POST, OPTIONS"


def make_app(engine: Any, config: Any, *, tracer: Any = None,
             gpus: Callable[[], list] | None = None) -> web.Application:
    """`engine`: an AsyncEngine; `config`: the loraxd Config tree; `tracer`: an OpenTelemetry
    tracer for one trace per generation request (tracing_export.py), or None: no tracing;
    `gpus`: each CUDA rank's GPU now, for /metrics (Supervisor.gpus), or None.

    Raises KeysFileError when an API keys file is configured and cannot be used.
    """
    metrics = Metrics(engine, config, gpus)
    routed = metrics.metered(engine)
    tracing = None
    if tracer is not None:  # imported only then: without an endpoint, nothing of it runs
        from loraxd.http.tracing import Tracing
        tracing = Tracing(tracer)
        routed = tracing.traced(routed)
    frontend = Frontend.from_config(routed, config)
    settings = frontend.settings  # api_keys_file and public_routes: restart-only
    keys = KeyRing(settings.api_keys_file)
    keys.load()
    frontend.keys_required = keys.enabled
    heads: dict = {}
    # Outermost first: the head deadline's bookkeeping, CORS preflight, the key check
    # (before any body is read), the request metrics (which see the errors rendered), the
    # request's trace (which reads what the metrics noted), errors.
    middlewares = [auth_middleware(keys, settings.public_routes), metrics.middleware(),
                   error_middleware]
    if tracing is not None:
        middlewares.insert(2, tracing.middleware())
    origins = tuple(config.server.cors_allow_origin)
    if origins:
        middlewares.insert(0, _cors_preflight(origins))
    middlewares.insert(0, head_deadline_middleware(heads))
    app = web.Application(client_max_size=config.server.max_request_bytes,
                          middlewares=middlewares)
    app[FRONTEND_KEY] = frontend
    app[KEYRING_KEY] = keys
    app[HEAD_DEADLINES] = heads
    if origins:
        app.on_response_prepare.append(_cors_headers(origins))
    NativeRoutes(frontend).register(app)
    OpenAIRoutes(frontend).register(app)
    metrics.register(app)
    OpenAPIRoutes(frontend, keys_required=keys.enabled,
                  public_routes=settings.public_routes).register(app)
    return app


def reload(app: web.Application) -> bool:
    """What SIGHUP does: re-read the API keys file (a bad file keeps the keys in force)."""
    return app[KEYRING_KEY].reload()


def make_runner(app: web.Application, **kwargs: Any) -> web.AppRunner:
    """The runner to serve `app` with: handler cancellation and the request-head deadline
    (the one in force: a reload replaces the frontend's settings)."""
    frontend = app[FRONTEND_KEY]
    return DeadlineRunner(app, **{**RUNNER_KWARGS, **kwargs},
                          header_read_timeout_s=lambda: frontend.settings.header_read_timeout_s)


def _allowed_origin(origins: tuple[str, ...], origin: str | None) -> str | None:
    if "*" in origins:
        return "*"
    return origin if origin in origins else None


def _cors_preflight(origins: tuple[str, ...]):
    @web.middleware
    async def cors_preflight(request: web.Request, handler) -> web.StreamResponse:
        if (request.method == "OPTIONS" and "Origin" in request.headers
                and "Access-Control-Request-Method" in request.headers):
            response = web.Response(status=204)
            response.headers["Access-Control-Allow-Methods"] = _CORS_METHODS
            response.headers["Access-Control-Allow-Headers"] = request.headers.get(
                "Access-Control-Request-Headers", "*")
            response.headers["Access-Control-Max-Age"] = "600"
            return response  # on_response_prepare adds Allow-Origin
        return await handler(request)
    return cors_preflight


def _cors_headers(origins: tuple[str, ...]):
    async def add_cors_headers(request: web.Request, response: web.StreamResponse) -> None:
        allowed = _allowed_origin(origins, request.headers.get("Origin"))
        if allowed is None:
            return
        response.headers["Access-Control-Allow-Origin"] = allowed
        response.headers["Access-Control-Expose-Headers"] = "*"
        if allowed != "*":
            response.headers["Vary"] = "Origin"
    return add_cors_headers
