"""The door's rules: numbers that would overflow further in, malformed bodies as 4xx, the
in-flight limit counted in sequences, deadlines on request bodies."""
from __future__ import annotations

import asyncio
import json

import pytest

from tests.unit.test_http_native import PROMPT, FakeTokenizer, post_generate
from tests.unit.test_http_native import serve  # noqa: F401 - the fixture, shared
from tests.unit.test_http_openai import chat_engine

MERGED = {"ids": ["a/one", "a/two"], "weights": [0.5, 0.5]}

OUT_OF_BOUNDS = [
    ({"temperature": 1e-40}, "`temperature` must be 0 (greedy) or at least 1e-06"),
    ({"temperature": 1e7}, "`temperature` must be <= 1000000.0"),
    ({"repetition_penalty": 1e-45}, "`repetition_penalty` must be >= 1e-06"),
    ({"repetition_penalty": 1e39}, "`repetition_penalty` must be <= 1000000.0"),
    ({"top_k": 2**40}, "`top_k` must be <= 2147483647"),
    ({"top_k": 2**64}, "`top_k` must be <= 2147483647"),
    ({"return_k_alternatives": 21}, "`return_k_alternatives` must be <= 20"),
    ({"return_k_alternatives": 2**63}, "`return_k_alternatives` must be <= 20"),
    ({"max_new_tokens": 2**70}, "`max_new_tokens` must be <= 9223372036854775807"),
    ({"truncate": 2**70}, "`truncate` must be strictly positive and at most 32"),
    ({"best_of": 2**64, "do_sample": True}, "`best_of` must be > 0 and <= 4"),
    ({"seed": 2**64}, "`seed` must be an integer in [0, 2^64)"),
    ({"merged_adapters": {**MERGED, "weights": [1e9, 1]}},
     "`merged_adapters.weights[0]` must be <= 100.0"),
    ({"merged_adapters": {**MERGED, "weights": [0.5, -101]}},
     "`merged_adapters.weights[1]` must be >= -100.0"),
    ({"merged_adapters": {**MERGED, "density": 1e-300, "merge_strategy": "dare_linear"}},
     "`density` must be 0 or at least 0.001"),
    ({"merged_adapters": {**MERGED, "ids": ["a/one", ""]}}, "`merged_adapters.ids`"),
]


@pytest.mark.parametrize("parameters,what", OUT_OF_BOUNDS,
                         ids=[str(i) for i in range(len(OUT_OF_BOUNDS))])
async def test_values_that_would_overflow_are_422(serve, parameters, what):
    client, engine = await serve()
    for path in ("/generate", "/"):
        resp = await post_generate(client, parameters, path=path)
        assert resp.status == 422
        body = await resp.json()
        assert body["error_type"] == "validation" and what in body["error"], body["error"]
    events = await (await post_generate(client, parameters, path="/generate_stream")).text()
    assert what.replace('"', '\\"') in events or "best_of" in what
    assert engine.requests == []


@pytest.mark.parametrize("parameters", [
    {"temperature": 0}, {"temperature": 1e-6}, {"temperature": 1e6}, {"top_k": 2**31 - 1},
    {"return_k_alternatives": 20}, {"seed": 2**64 - 1, "do_sample": True},
    {"repetition_penalty": 1e-6}, {"merged_adapters": {**MERGED, "weights": [100, -100]}},
    {"merged_adapters": {**MERGED, "density": 0, "merge_strategy": "ties"}},
])
async def test_values_at_the_bounds_pass(serve, parameters):
    client, engine = await serve()
    resp = await post_generate(client, parameters)
    assert resp.status == 200, await resp.text()


@pytest.mark.parametrize("body,what", [
    ({"prompt": PROMPT, "top_k": 2**40}, "`top_k` must be <= 2147483647"),
    ({"prompt": PROMPT, "repetition_penalty": 1e39}, "`repetition_penalty` must be <="),
    ({"prompt": PROMPT, "temperature": 1e-40}, "`temperature` must be 0 (greedy)"),
    ({"prompt": PROMPT, "seed": 2**64}, "`seed` must be an integer in [0, 2^64)"),
    ({"prompt": PROMPT, "n": 2**64}, "`n` must be >= 1 and <= 16"),
    ({"prompt": PROMPT, "user": 5}, "`user` must be a string"),
    ({"prompt": PROMPT, "stop": [""]}, "`stop` sequences cannot be empty"),
])
async def test_openai_bounds_are_422(serve, body, what):
    client, engine = await serve()
    resp = await client.post("/v1/completions", json=body)
    assert resp.status == 422
    assert what in (await resp.json())["error"]["message"]
    assert engine.requests == []


# -- malformed bodies -------------------------------------------------------------------------

JSON = {"Content-Type": "application/json"}
ROUTES = ("/generate", "/generate_stream", "/", "/tokenize", "/v1/completions",
          "/v1/chat/completions")


@pytest.mark.parametrize("raw", [
    b'{"inputs": "\\ud800", "prompt": "\\ud800", "messages": [{"role": "user", '
    b'"content": "\\ud800"}]}',
    b'{"inputs": "a\\udc00b", "prompt": "a\\udc00b"}',
    b'{"inputs": "\xed\xa0\x80"}',  # a surrogate encoded as UTF-8: not UTF-8
    b'{"inputs": "x", "parameters": ' + b"[" * 5000 + b"]" * 5000 + b"}",
    b'{"inputs": "x", "parameters": {"seed": 1e400}}',
    b'{"inputs": "x", "parameters": {"temperature": Infinity}}',
    b'\xff\xfe{}',
])
async def test_malformed_json_is_400_everywhere(serve, raw):
    client, engine = await serve(chat_engine(), server={"max_request_bytes": 65536})
    for path in ROUTES:
        resp = await client.post(path, data=raw, headers=JSON)
        assert resp.status == 400, (path, await resp.text())
        text = await resp.text()
        assert "malformed JSON" in text
    assert engine.requests == []


WRONG_TYPES = [
    ("/generate", {"inputs": PROMPT, "parameters": {"stop": [1]}}),
    ("/generate", {"inputs": PROMPT, "parameters": {"merged_adapters": {"ids": "a",
                                                                         "weights": [1]}}}),
    ("/generate", {"inputs": PROMPT, "parameters": {"response_format": {"type": 1}}}),
    ("/generate", {"inputs": PROMPT, "parameters": {"adapter_id": ["a"]}}),
    ("/generate", {"inputs": {"a": 1}}),
    ("/", {"inputs": PROMPT, "stream": "yes"}),
    ("/tokenize", {"inputs": 5}),
    ("/tokenize", {"inputs": PROMPT, "add_special_tokens": "no"}),
    ("/tokenize", [PROMPT]),
    ("/v1/completions", {"prompt": PROMPT, "stream_options": [1]}),
    ("/v1/completions", {"prompt": PROMPT, "echo": "yes"}),
    ("/v1/completions", {"prompt": PROMPT, "model": 5}),
    ("/v1/completions", {"prompt": {"text": PROMPT}}),
    ("/v1/completions", {"prompt": PROMPT, "logit_bias": [1]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": [{"type": "text",
                                                                          "text": 5}]}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x", "name": 5}]}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}], "tools": 5}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "tool_choice": 5}),
    ("/v1/chat/completions", {"messages": "hi"}),
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "x"}],
                              "logprobs": "yes"}),
]


@pytest.mark.parametrize("path,body", WRONG_TYPES, ids=[str(i) for i in range(len(WRONG_TYPES))])
async def test_wrong_types_are_422(serve, path, body):
    client, engine = await serve(chat_engine())
    resp = await client.post(path, json=body)
    text = await resp.text()
    assert resp.status == 422, text
    assert "Input validation error: " in text
    assert engine.requests == []


class EmptyTokenizer(FakeTokenizer):
    """Tokenizes everything to nothing (a prompt of characters the vocabulary drops)."""

    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return []


async def test_a_prompt_of_no_tokens_is_422(serve):
    engine = chat_engine()
    engine.tokenizer.encode = EmptyTokenizer().encode
    client, _ = await serve(engine)
    resp = await post_generate(client)
    assert resp.status == 422
    assert "`inputs` is made of no tokens" in (await resp.json())["error"]
    events = await (await post_generate(client, path="/generate_stream")).text()
    assert "made of no tokens" in events
    for path, body in [("/v1/completions", {"prompt": PROMPT}),
                       ("/v1/chat/completions", {"messages": [{"role": "user",
                                                               "content": "x"}]})]:
        resp = await client.post(path, json=body)
        assert resp.status == 422 and "no tokens" in (await resp.json())["error"]["message"]
    assert engine.requests == []


# -- the in-flight limit counts sequences -----------------------------------------------------


async def _until(predicate, timeout=5.0):
    async with asyncio.timeout(timeout):
        while not predicate():
            await asyncio.sleep(0.01)


async def test_429_counts_best_of_and_n(serve):
    gate = asyncio.Event()
    engine = chat_engine(gate=gate)
    client, _ = await serve(engine, scheduler={"max_concurrent_requests": 3})
    first = asyncio.ensure_future(post_generate(client, {"best_of": 2, "do_sample": True}))
    await _until(lambda: len(engine.requests) == 2)  # two sequences of three in flight
    resp = await post_generate(client, {"best_of": 2, "do_sample": True})
    assert resp.status == 429 and (await resp.json())["error_type"] == "overloaded"
    resp = await client.post("/v1/completions", json={"prompt": PROMPT, "n": 2})
    assert resp.status == 429
    resp = await client.post("/v1/completions", json={"prompt": [PROMPT, PROMPT]})
    assert resp.status == 429
    resp = await client.post("/v1/chat/completions", json={
        "n": 2, "messages": [{"role": "user", "content": "x"}]})
    assert resp.status == 429
    second = asyncio.ensure_future(post_generate(client))  # the third sequence fits
    await _until(lambda: len(engine.requests) == 3)
    resp = await post_generate(client)
    assert resp.status == 429
    resp = await client.post("/tokenize", json={"inputs": PROMPT})
    assert resp.status == 429  # tokenizing takes a slot too
    gate.set()
    assert (await first).status == 200 and (await second).status == 200
    resp = await client.post("/v1/completions", json={"prompt": [PROMPT] * 3})
    assert resp.status == 200  # all slots given back


async def test_more_sequences_than_the_limit_is_422(serve):
    client, engine = await serve(scheduler={"max_concurrent_requests": 3})
    resp = await post_generate(client, {"best_of": 4, "do_sample": True})
    assert resp.status == 422 and "runs at most 3 at once" in (await resp.json())["error"]
    resp = await client.post("/v1/completions", json={"prompt": PROMPT, "n": 4})
    assert resp.status == 422
    assert engine.requests == []


# -- deadlines --------------------------------------------------------------------------------


async def test_a_body_trickled_too_slowly_is_400(serve):
    client, engine = await serve(server={"body_read_timeout_s": 0.3})
    body = json.dumps({"inputs": PROMPT}).encode()
    reader, writer = await asyncio.open_connection(client.server.host, client.server.port)
    writer.write(b"POST /generate HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body[:5])
    await writer.drain()
    async with asyncio.timeout(5):
        head = await reader.readuntil(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400")
    writer.close()
    assert engine.requests == []
