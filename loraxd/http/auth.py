"""The API-key check at the door, and the per-key adapter rule.

With keys configured every route but `public_routes` needs `Authorization: Bearer <key>`
(401 `unauthorized` otherwise, before the body is read); the matched key rides on the
request, and a request for an adapter the key may not use is a 403 `forbidden`, checked
before anything is fetched. The caller's key is never used as a hub token (schemas.py takes
the Bearer fallback only when no keys are configured).
"""
from __future__ import annotations

import logging
from typing import Iterable

from aiohttp import web

from loraxd.http.api_keys import ApiKey, KeyRing
from loraxd.http.bodies import json_response
from loraxd.http.errors import ApiError, error_body
from loraxd.http.openai_schemas import error_body as openai_error_body
from loraxd.http.schemas import GenerateParams, bearer_token

log = logging.getLogger(__name__)

# request[API_KEY]: the caller's ApiKey, when keys are configured (RequestKey where aiohttp has it)
API_KEY = web.RequestKey("api_key", ApiKey) if hasattr(web, "RequestKey") else "loraxd.api_key"


def unauthorized() -> ApiError:
    return ApiError(401, "unauthorized", "a valid API key is needed (Authorization: Bearer)")


def forbidden(what: str) -> ApiError:
    return ApiError(403, "forbidden", what)


def render(request: web.Request, err: ApiError) -> web.Response:
    """An error in the route's shape: OpenAI's under /v1, the native one elsewhere."""
    body = openai_error_body(err) if request.path.startswith("/v1/") else error_body(err)
    return json_response(body, status=err.status)


def auth_middleware(ring: KeyRing, public_routes: Iterable[str]):
    public = frozenset(public_routes)

    @web.middleware
    async def check_api_key(request: web.Request, handler) -> web.StreamResponse:
        # OPTIONS: a CORS preflight carries no credentials.
        if ring.enabled and request.method != "OPTIONS" and request.path not in public:
            key = ring.check(bearer_token(request.headers.get("Authorization")))
            if key is None:
                response = render(request, unauthorized())
                response.headers["WWW-Authenticate"] = 'Bearer realm="loraxd"'
                return response
            request[API_KEY] = key
        return await handler(request)
    return check_api_key


def caller_key(request: web.Request) -> ApiKey | None:
    return request.get(API_KEY)


def authorize_adapters(request: web.Request, params: GenerateParams) -> None:
    """403 unless the caller's key may use what `params` asks for (no keys: anything)."""
    key = caller_key(request)
    if key is None:
        return
    if params.adapter is not None:
        ids: tuple[str, ...] = (params.adapter.adapter_id,)
    elif params.merged is not None:
        ids = params.merged.ids
    else:
        ids = ()
    if not ids and not key.base_model:
        log.info("API key %r refused the base model", key.name)
        raise forbidden(f"API key {key.name!r} may not use the base model")
    for adapter_id in ids:
        if not key.may_use(adapter_id):
            log.info("API key %r refused adapter %r", key.name, adapter_id)
            raise forbidden(f"API key {key.name!r} may not use adapter {adapter_id!r}")
