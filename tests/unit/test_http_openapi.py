"""/openapi.json and /docs: served, a valid OpenAPI document, every route in it, generated
from the Structs that hold the requests; schemathesis finds no 500 and no answer off its
documented shape (against the fake engine here; tests/integration against the daemon)."""
from __future__ import annotations

import asyncio
import dataclasses
import os
import re
import threading

import pytest
import schemathesis
from aiohttp import web
from hypothesis import HealthCheck, given, settings
from schemathesis import GenerationMode
from schemathesis.specs.openapi.checks import negative_data_rejection, positive_data_acceptance
from openapi_spec_validator import validate

from loraxd.http import request_types
from loraxd.http.app import FRONTEND_KEY, make_app, make_runner
from tests.unit.test_http_auth import KEY_A, write_keys
from tests.unit.test_http_native import make_config
from tests.unit.test_http_native import serve  # noqa: F401 - the fixture, shared
from tests.unit.test_http_openai import chat_engine


async def test_the_document_is_valid_and_names_every_route(serve):  # noqa: F811
    client, _ = await serve(chat_engine())
    resp = await client.get("/openapi.json")
    assert resp.status == 200 and resp.content_type == "application/json"
    spec = await resp.json()
    validate(spec)
    documented = {(m.upper(), p) for p, ops in spec["paths"].items() for m in ops}
    routed = {(r.method, r.resource.canonical) for r in client.server.app.router.routes()
              if r.method not in ("HEAD", "OPTIONS")}
    assert documented == routed
    schemas = spec["components"]["schemas"]
    body = spec["paths"]["/generate"]["post"]["requestBody"]["content"]["application/json"]
    assert body["schema"] == {"$ref": "#/components/schemas/GenerateRequest"}
    # the Structs that validate are the schemas served
    params = schemas["Parameters"]["properties"]
    for name in request_types.Parameters.__struct_fields__:
        assert name in params
    top_k = next(b for b in params["top_k"]["anyOf"] if b.get("type") == "integer")
    assert top_k["maximum"] == request_types.MAX_TOP_K
    best_of = next(b for b in params["best_of"]["anyOf"] if b.get("type") == "integer")
    assert best_of["maximum"] == 4  # the configured max_best_of
    for op in (o for ops in spec["paths"].values() for o in ops.values()):
        assert "security" not in op  # no keys configured
    errors = spec["paths"]["/generate"]["post"]["responses"]
    assert {"200", "400", "403", "422", "424", "429", "500", "503"} <= set(errors)


async def test_the_document_and_info_follow_a_reload_of_the_limits(serve):  # noqa: F811
    client, _ = await serve()
    frontend = client.server.app[FRONTEND_KEY]

    async def best_of_maximum() -> int:
        params = (await (await client.get("/openapi.json")).json())[
            "components"]["schemas"]["Parameters"]["properties"]
        return next(b for b in params["best_of"]["anyOf"] if b.get("type") == "integer")[
            "maximum"]
    assert await best_of_maximum() == 4
    # what loraxd.daemon.reload.apply does to the frontend
    frontend.limits = dataclasses.replace(frontend.limits, max_best_of=2, max_input_length=9)
    frontend.limiter.max_inflight = 5
    assert await best_of_maximum() == 2
    info = await (await client.get("/info")).json()
    assert (info["max_best_of"], info["max_input_length"], info["max_concurrent_requests"]) == (
        2, 9, 5)


async def test_with_keys_the_document_says_which_routes_need_one(serve, tmp_path):  # noqa: F811
    path = write_keys(tmp_path / "keys.toml")
    client, _ = await serve(server={"api_keys_file": path})
    assert (await client.get("/openapi.json")).status == 401
    spec = await (await client.get("/openapi.json",
                                   headers={"Authorization": f"Bearer {KEY_A}"})).json()
    validate(spec)
    assert spec["components"]["securitySchemes"]["apiKey"]["scheme"] == "bearer"
    assert spec["paths"]["/health"]["get"]["security"] == []
    assert "401" not in spec["paths"]["/health"]["get"]["responses"]
    assert spec["paths"]["/generate"]["post"]["security"] == [{"apiKey": []}]
    assert "401" in spec["paths"]["/v1/models"]["get"]["responses"]


async def test_docs_is_an_offline_page_of_the_document(serve):  # noqa: F811
    client, _ = await serve()
    resp = await client.get("/docs")
    assert resp.status == 200 and resp.content_type == "text/html"
    page = await resp.text()
    assert 'fetch("openapi.json"' in page and 'href="openapi.json"' in page
    assert not re.search(r"(src|href)=\"(https?:)?//", page)  # no CDN: works offline


# -- schemathesis against the fake engine ------------------------------------------------------


@pytest.fixture(scope="module")
def fake_server():
    """The app on the fake engine, served from its own thread (schemathesis calls are
    blocking)."""
    loop = asyncio.new_event_loop()
    started = threading.Event()
    state = {}

    async def start():
        app = make_app(chat_engine(), make_config(
            scheduler={"max_input_length": 256, "max_total_tokens": 512},
            server={"max_request_bytes": 65536}))
        runner = make_runner(app)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        state["runner"] = runner
        state["url"] = f"http://127.0.0.1:{runner.addresses[0][1]}"

    def run():
        loop.run_until_complete(start())
        started.set()
        loop.run_forever()

    thread = threading.Thread(target=run, daemon=True)
    thread.start()
    started.wait(10)
    yield state["url"]
    asyncio.run_coroutine_threadsafe(state["runner"].cleanup(), loop).result(10)
    loop.call_soon_threadsafe(loop.stop)
    thread.join(10)


# The native stream routes answer every error after the body is read as one SSE event
# (LoRAX's contract), status 200: there, a refused body is checked to be that one event.
NATIVE_STREAMS = ("/generate_stream", "/")


def _check_refused_as_one_event(operation, response) -> None:
    content_type = response.headers.get("content-type", [""])[0]
    if operation.path in NATIVE_STREAMS and content_type.startswith("text/event-stream"):
        events = [e for e in response.text.split("\n\n") if e]
        assert len(events) == 1 and '"error_type"' in events[0], response.text[:500]


def _only_our_headers_mutated(case, headers: dict | None) -> bool:
    """The case's invalid part is a header the caller sends its own value of (the API key):
    what reached the server is valid."""
    data = getattr(getattr(case.meta, "phase", None), "data", None)
    return getattr(data, "parameter", None) in (headers or {})


def fuzz(base_url: str, *, headers: dict | None = None, max_examples: int = 25) -> int:
    """Every operation of the served document, with schema-valid and schema-invalid data:
    no 500, every status and body as documented, schema-invalid data refused. Schema-valid
    data may be refused: the cross-field rules (best_of > 1 needs sampling, prompt +
    max_new_tokens within max_total_tokens, ...) are no JSON Schema's. Returns the number of
    calls made."""
    schema = schemathesis.openapi.from_url(f"{base_url}/openapi.json", headers=headers or {})
    calls = 0
    for result in schema.get_all_operations():
        operation = result.ok()
        for mode in (GenerationMode.POSITIVE, GenerationMode.NEGATIVE):
            if mode is GenerationMode.NEGATIVE and operation.method.upper() == "GET":
                continue  # no parameters: nothing to get wrong
            excluded = [positive_data_acceptance]
            if operation.path in NATIVE_STREAMS:
                excluded.append(negative_data_rejection)

            @given(case=operation.as_strategy(generation_mode=mode))
            @settings(max_examples=max_examples, deadline=None, database=None,
                      suppress_health_check=list(HealthCheck))
            def run(case):
                nonlocal calls
                calls += 1
                response = case.call_and_validate(base_url=base_url, headers=headers,
                                                  timeout=180, excluded_checks=excluded)
                if (mode is GenerationMode.NEGATIVE and response.status_code == 200
                        and not _only_our_headers_mutated(case, headers)):
                    _check_refused_as_one_event(operation, response)
            run()
    return calls


def test_schemathesis_against_the_fake_engine(fake_server):
    assert fuzz(fake_server, max_examples=int(os.environ.get("FUZZ_EXAMPLES", 30))) > 100
