"""The native HTTP routes against a scripted fake engine (no torch, no workers)."""
from __future__ import annotations

import asyncio
import json
import time
from pathlib import Path
from types import SimpleNamespace

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer

from loraxd.engine.request import (AdapterError, AdapterRef, Alternative, EngineError,
                                   FinishEvent, Overloaded, PromptToken, TokenEvent,
                                   Unavailable, ValidationError)
from loraxd.http.app import make_app, make_runner
from tests.clients import needs_lorax_client, run_lorax_client

PROMPT = "hello"  # the fake tokenizer: BOS + one id per character -> 6 prompt tokens
NUM_PROMPT = len(PROMPT) + 1


# -- fakes ------------------------------------------------------------------------------------


class FakeTokenizer:
    async def encode(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return ([1] if add_special_tokens else []) + [ord(c) for c in text]

    async def encode_with_offsets(self, text: str, add_special_tokens: bool = True):
        head = [(1, 0, 0)] if add_special_tokens else []
        return head + [(ord(c), i, i + 1) for i, c in enumerate(text)]

    def decode(self, ids: list[int]) -> str:
        return "".join(chr(i) for i in ids if i > 1)


class FakeEngine:
    """Yields `pieces` as tokens, then a FinishEvent; records requests and how each ended."""

    model_id = "fake/base"

    def __init__(self, pieces=("Hel", "lo", " world"), *, error=None, error_after=0,
                 delay=0.0, forever=False, gate=None, finish_delay=0.0, healthy=True,
                 logprob_of=None, finish_reason="length"):
        self.tokenizer = FakeTokenizer()
        self.pieces, self.error, self.error_after = pieces, error, error_after
        self.delay, self.forever, self.gate, self.finish_delay = delay, forever, gate, finish_delay
        self.healthy, self.finish_reason = healthy, finish_reason
        self.logprob_of = logprob_of or (lambda req, n: -0.25 * (n + 1))
        self.requests = []
        self.adapter_dirs: dict = {}
        self.closed: list[str] = []  # "GeneratorExit" / "CancelledError" per early close
        self.close_times: list[float] = []

    def info(self) -> dict:
        return {"model_id": self.model_id, "model_dtype": "float32", "model_device_type": "cpu",
                "max_batch_total_tokens": 4096, "version": "test"}

    async def health(self) -> bool:
        return self.healthy

    async def adapter_dir(self, ref):
        """Where a test put the adapter's files (its own chat template, say); else none."""
        return self.adapter_dirs.get(ref.adapter_id, Path("/nonexistent/adapter"))

    async def generate(self, req):
        self.requests.append(req)
        try:
            if self.gate is not None:
                await self.gate.wait()
            if self.error is not None and self.error_after == 0:
                raise self.error
            texts = []
            while (self.forever or len(texts) < len(self.pieces)) and \
                    len(texts) < req.max_new_tokens:
                if self.delay:
                    await asyncio.sleep(self.delay)
                n = len(texts)
                piece = self.pieces[n % len(self.pieces)]
                alts = tuple(Alternative(200 + k, f"alt{k}", -1.0 - k)
                             for k in range(req.sampling.num_alternatives))
                yield TokenEvent(100 + n, piece, self.logprob_of(req, n), False, alts)
                texts.append(piece)
                if self.error is not None and self.error_after == len(texts):
                    raise self.error
            if self.finish_delay:
                await asyncio.sleep(self.finish_delay)
            prefill = ()
            if req.sampling.prompt_logprobs:
                prefill = tuple(PromptToken(i, chr(i) if i > 1 else "<s>", None if j == 0 else -0.5)
                                for j, i in enumerate(req.prompt_ids))
            seed = req.sampling.seed if req.sampling.do_sample else None
            yield FinishEvent(self.finish_reason, "".join(texts), len(req.prompt_ids), len(texts),
                              seed, prefill, queue_time_s=0.002, inference_time_s=0.03)
        except (GeneratorExit, asyncio.CancelledError) as exc:
            self.closed.append(type(exc).__name__)
            self.close_times.append(time.monotonic())
            raise


def make_config(**sections) -> SimpleNamespace:
    parts = {
        "scheduler": dict(max_concurrent_requests=8, max_best_of=4, max_stop_sequences=2,
                          max_input_length=32, max_total_tokens=64),
        "adapters": dict(adapter_source="hub", adapter_id=None),
        "server": dict(max_request_bytes=4096, cors_allow_origin=(), metrics_adapter_labels=100),
        "model": dict(model_id="fake/base"),
    }
    for name, values in sections.items():
        parts[name].update(values)
    return SimpleNamespace(**{name: SimpleNamespace(**values) for name, values in parts.items()})


@pytest.fixture
async def serve():
    clients = []

    async def start(engine=None, **sections):
        engine = engine or FakeEngine()
        client = TestClient(TestServer(make_app(engine, make_config(**sections))))
        await client.start_server()
        clients.append(client)
        return client, engine

    yield start
    for client in clients:
        await client.close()


def base_url(client: TestClient) -> str:
    return f"http://{client.server.host}:{client.server.port}"


def sse_events(text: str) -> list[dict]:
    chunks = text.split("\n\n")
    assert chunks[-1] == ""
    assert all(c.startswith("data:") for c in chunks[:-1])
    return [json.loads(c[len("data:"):]) for c in chunks[:-1]]


async def post_generate(client, parameters=None, inputs=PROMPT, path="/generate", **kw):
    body = {"inputs": inputs}
    if parameters is not None:
        body["parameters"] = parameters
    return await client.post(path, json=body, **kw)


# -- validation -------------------------------------------------------------------------------

MERGED = {"ids": ["a/one", "a/two"], "weights": [0.5, 0.5], "merge_strategy": "ties",
          "density": 0.5, "majority_sign_method": "frequency"}

INVALID_PARAMETERS = [
    ({"temperature": -0.1}, "`temperature` must be >= 0"),
    ({"temperature": "hot"}, "`temperature` must be a number"),
    ({"top_k": 0}, "`top_k` must be strictly positive"),
    ({"top_k": 1.5}, "`top_k` must be an integer"),
    ({"top_p": 0}, "`top_p` must be > 0.0 and <= 1.0"),
    ({"top_p": 1.1}, "`top_p` must be > 0.0 and <= 1.0"),
    ({"typical_p": 1.0}, "`typical_p` must be > 0.0 and < 1.0"),
    ({"repetition_penalty": 0}, "`repetition_penalty` must be strictly positive"),
    ({"frequency_penalty": 2.5}, "`frequency_penalty` must be >= -2.0 and <= 2.0"),
    ({"presence_penalty": -3}, "`presence_penalty` must be >= -2.0 and <= 2.0"),
    ({"max_new_tokens": 0}, "`max_new_tokens` must be strictly positive"),
    ({"max_new_tokens": 59}, "`inputs` tokens + `max_new_tokens` must be <= 64"),
    ({"ignore_eos_token": 1}, "`ignore_eos_token` must be a boolean"),
    ({"stop": ["a", "b", "c"]}, "`stop` must have at most 2 sequences"),
    ({"stop": "a"}, "`stop` must be a list of strings"),
    ({"stop": [""]}, "`stop` sequences cannot be empty"),
    ({"truncate": 0}, "`truncate` must be strictly positive and at most 32"),
    ({"truncate": 33}, "`truncate` must be strictly positive and at most 32"),
    ({"seed": -1}, "`seed` must be an integer in [0, 2^64)"),
    ({"seed": 2**64}, "`seed` must be an integer in [0, 2^64)"),
    ({"best_of": 5, "do_sample": True}, "`best_of` must be > 0 and <= 4"),
    ({"best_of": 0}, "`best_of` must be > 0 and <= 4"),
    ({"best_of": 2}, "you must use sampling when `best_of` is > 1"),
    ({"best_of": 2, "do_sample": True, "temperature": 0}, "you must use sampling"),
    ({"do_sample": "yes"}, "`do_sample` must be a boolean"),
    ({"details": "true"}, "`details` must be a boolean"),
    ({"return_k_alternatives": 0}, "`return_k_alternatives` must be strictly positive"),
    ({"watermark": "yes"}, "`watermark` must be a boolean"),
    ({"response_format": {"type": "json_schema", "schema": {"type": "object", "properties": {
        "a": {"not": {"type": "string"}}}}}}, 'not supported: Unimplemented keys: ["not"]'),
    ({"response_format": {"type": "json_schema", "schema": {
        "type": "array", "minItems": 3, "maxItems": 1}}}, "Unsatisfiable schema"),
    ({"response_format": {"type": "json_schema"}}, "needs `schema`"),
    ({"response_format": {"type": "json_object", "schema": [1]}}, "must be a JSON schema"),
    ({"response_format": {"type": "json_object"}, "ignore_eos_token": True},
     "`ignore_eos_token` cannot be combined"),
    ({"response_format": {"type": "yaml"}}, "`response_format.type` must be one of"),
    ({"response_format": "json"}, "`response_format` must be an object"),
    ({"adapter_id": "a/b", "merged_adapters": MERGED}, "at most one of `adapter_id`"),
    ({"adapter_id": 5}, "`adapter_id` must be a string"),
    ({"adapter_source": "ftp"}, "`adapter_source=ftp` must be one of hub, local, s3, pbase"),
    ({"api_token": 5}, "`api_token` must be a string"),
    ({"merged_adapters": {**MERGED, "ids": [], "weights": []}}, "must hold at least one"),
    ({"merged_adapters": {**MERGED, "weights": [1.0]}}, "must have the same length"),
    ({"merged_adapters": {**MERGED, "weights": ["x", 1]}}, "must be a list of numbers"),
    ({"merged_adapters": {**MERGED, "merge_strategy": "average"}}, "`merge_strategy=average`"),
    ({"merged_adapters": {**MERGED, "density": 1.5}}, "`density` must be >= 0.0 and <= 1.0"),
    ({"merged_adapters": {**MERGED, "majority_sign_method": "max"}}, "`majority_sign_method"),
    ({"merged_adapters": ["a"]}, "`merged_adapters` must be an object"),
]


@pytest.mark.parametrize("parameters,what", INVALID_PARAMETERS,
                         ids=[str(i) for i in range(len(INVALID_PARAMETERS))])
async def test_invalid_parameters_are_422(serve, parameters, what):
    client, engine = await serve()
    resp = await post_generate(client, parameters)
    assert resp.status == 422
    body = await resp.json()
    assert body["error_type"] == "validation"
    assert body["error"].startswith("Input validation error: ")
    assert what in body["error"]
    assert engine.requests == []


@pytest.mark.parametrize("body,what", [
    ({"parameters": {}}, "`inputs` must be a string"),
    ({"inputs": ""}, "`inputs` cannot be empty"),
    ({"inputs": 5}, "`inputs` must be a string"),
    ({"inputs": "x" * 40}, "`inputs` must have at most 32 tokens. Given: 41"),
    ({"inputs": PROMPT, "parameters": [1]}, "`parameters` must be an object"),
    ([PROMPT], "the request body must be a JSON object"),
])
async def test_invalid_bodies_are_422(serve, body, what):
    client, engine = await serve()
    resp = await client.post("/generate", json=body)
    assert resp.status == 422
    assert what in (await resp.json())["error"]
    assert engine.requests == []


async def test_truncate_makes_a_long_prompt_fit(serve):
    client, engine = await serve()
    resp = await post_generate(client, {"truncate": 3}, inputs="x" * 40 + "abc")
    assert resp.status == 200
    assert engine.requests[0].prompt_ids == [ord("a"), ord("b"), ord("c")]
    assert engine.requests[0].max_new_tokens == 64 - 3


@pytest.mark.parametrize("kwargs,what", [
    (dict(data=b'{"inputs": "hi"', headers={"Content-Type": "application/json"}),
     "malformed JSON"),
    (dict(data=b'{"inputs": NaN}', headers={"Content-Type": "application/json"}),
     "malformed JSON"),
    (dict(data=b'{"inputs": "hi"}', headers={"Content-Type": "text/plain"}),
     "expected Content-Type application/json"),
    (dict(json={"inputs": "x" * 5000}), "over the size limit"),
])
async def test_bad_bodies_are_400(serve, kwargs, what):
    client, engine = await serve()
    for path in ("/generate", "/generate_stream", "/"):
        resp = await client.post(path, **kwargs)
        assert resp.status == 400
        body = await resp.json()
        assert body["error_type"] == "bad_request" and what in body["error"]
    assert engine.requests == []


async def test_chunked_body_over_the_limit_is_400(serve):
    client, _ = await serve()

    async def chunks():
        for _ in range(10):
            yield b" " * 1000
    resp = await client.post("/generate", data=chunks(),
                             headers={"Content-Type": "application/json"})
    assert resp.status == 400
    assert (await resp.json())["error_type"] == "bad_request"


# -- mapping to the engine request ------------------------------------------------------------


async def test_defaults_are_greedy_and_fill_the_token_budget(serve):
    client, engine = await serve()
    resp = await post_generate(client, {"details": True})
    assert resp.status == 200
    req = engine.requests[0]
    assert req.prompt_ids == [1] + [ord(c) for c in PROMPT]
    assert req.max_new_tokens == 64 - NUM_PROMPT
    assert not req.sampling.do_sample and req.sampling.seed == 0
    assert req.adapter is None and req.merged is None and req.stop == () and not req.ignore_eos
    assert (await resp.json())["details"]["seed"] is None


@pytest.mark.parametrize("parameters,do_sample", [
    ({"temperature": 0.7}, True), ({"temperature": 1.0}, False), ({"top_k": 5}, True),
    ({"top_p": 1.0}, True), ({"typical_p": 0.9}, True), ({"do_sample": True}, True),
    ({"do_sample": True, "temperature": 0}, False), ({"top_k": 5, "temperature": 0}, False),
    ({"temperature": None, "top_k": None}, False),
])
async def test_sampling_switches(serve, parameters, do_sample):
    client, engine = await serve()
    resp = await post_generate(client, {**parameters, "details": True})
    assert resp.status == 200
    sampling = engine.requests[0].sampling
    assert sampling.do_sample is do_sample
    seed = (await resp.json())["details"]["seed"]
    if do_sample:
        assert seed == sampling.seed and 0 <= seed < 2**64
    else:
        assert seed is None


async def test_parameters_reach_the_engine(serve):
    client, engine = await serve()
    resp = await post_generate(client, {
        "do_sample": True, "temperature": 0.5, "top_k": 7, "top_p": 0.9, "typical_p": 0.8,
        "repetition_penalty": 1.2, "frequency_penalty": 0.5, "presence_penalty": -0.5,
        "seed": 2**64 - 1, "max_new_tokens": 3, "ignore_eos_token": True, "stop": ["\n", "###"],
        "return_k_alternatives": 2, "decoder_input_details": True})
    assert resp.status == 200
    req = engine.requests[0]
    s = req.sampling
    assert (s.do_sample, s.temperature, s.top_k, s.top_p, s.typical_p) == (True, 0.5, 7, 0.9, 0.8)
    assert (s.repetition_penalty, s.frequency_penalty, s.presence_penalty) == (1.2, 0.5, -0.5)
    assert (s.seed, s.num_alternatives, s.prompt_logprobs) == (2**64 - 1, 2, True)
    assert (req.max_new_tokens, req.ignore_eos, req.stop) == (3, True, ("\n", "###"))


@pytest.mark.parametrize("parameters,headers,adapter", [
    ({"adapter_id": ""}, {}, None),
    ({"adapter_id": None}, {}, None),
    ({"adapter_id": "me/a"}, {}, AdapterRef("me/a", "hub", None)),
    ({"adapter_id": "me/a", "adapter_source": "local"}, {}, AdapterRef("me/a", "local", None)),
    ({"adapter_id": "me/a"}, {"Authorization": "Bearer tok"}, AdapterRef("me/a", "hub", "tok")),
    ({"adapter_id": "me/a", "api_token": "p"}, {"Authorization": "Bearer tok"},
     AdapterRef("me/a", "hub", "p")),
    ({"adapter_id": "me/a"}, {"Authorization": "Basic xyz"}, AdapterRef("me/a", "hub", None)),
])
async def test_adapter_reference(serve, parameters, headers, adapter):
    client, engine = await serve(adapters={"adapter_source": "hub"})
    resp = await post_generate(client, parameters, headers=headers)
    assert resp.status == 200
    assert engine.requests[0].adapter == adapter
    assert resp.headers.get("x-adapter-id") == (adapter.adapter_id if adapter else None)


async def test_default_adapter_source_comes_from_config(serve):
    client, engine = await serve(adapters={"adapter_source": "s3"})
    await post_generate(client, {"adapter_id": "bucket/a"})
    assert engine.requests[0].adapter.source == "s3"


async def test_merged_adapters(serve):
    client, engine = await serve()
    resp = await post_generate(client, {"merged_adapters": MERGED, "api_token": "t"})
    assert resp.status == 200
    merged = engine.requests[0].merged
    assert engine.requests[0].adapter is None
    assert (merged.ids, merged.weights) == (("a/one", "a/two"), (0.5, 0.5))
    assert (merged.merge_strategy, merged.density, merged.majority_sign_method) == \
        ("ties", 0.5, "frequency")
    assert (merged.source, merged.api_token) == ("hub", "t")
    minimal = {"ids": ["a/one"], "weights": [1]}
    assert (await post_generate(client, {"merged_adapters": minimal})).status == 200
    merged = engine.requests[1].merged
    assert (merged.merge_strategy, merged.density, merged.majority_sign_method) == \
        ("linear", 1.0, "total")


# -- /generate responses ----------------------------------------------------------------------


async def test_generate_without_details(serve):
    client, _ = await serve()
    resp = await post_generate(client)
    assert resp.status == 200
    assert await resp.json() == {"generated_text": "Hello world"}


async def test_generate_details_shape(serve):
    client, _ = await serve()
    resp = await post_generate(client, {"details": True, "return_full_text": True})
    body = await resp.json()
    assert body["generated_text"] == PROMPT + "Hello world"
    details = body["details"]
    assert set(details) == {"finish_reason", "prompt_tokens", "generated_tokens", "skipped_tokens",
                            "seed", "prefill", "tokens"}
    assert (details["finish_reason"], details["prompt_tokens"], details["generated_tokens"]) == \
        ("length", NUM_PROMPT, 3)
    assert details["prefill"] == [] and details["skipped_tokens"] == 0
    assert details["tokens"][0] == {"id": 100, "text": "Hel", "logprob": -0.25,
                                    "special": False, "skipped": False}


async def test_generate_prefill_and_alternatives(serve):
    client, _ = await serve()
    resp = await post_generate(client, {"decoder_input_details": True, "return_k_alternatives": 2})
    details = (await resp.json())["details"]  # decoder_input_details alone asks for details
    assert details["prefill"][0] == {"id": 1, "text": "<s>", "logprob": None}
    assert details["prefill"][1] == {"id": ord("h"), "text": "h", "logprob": -0.5}
    assert len(details["prefill"]) == NUM_PROMPT
    assert details["tokens"][0]["alternative_tokens"] == [
        {"id": 200, "text": "alt0", "logprob": -1.0}, {"id": 201, "text": "alt1", "logprob": -2.0}]


async def test_non_finite_logprob_is_a_number(serve):
    engine = FakeEngine(logprob_of=lambda req, n: float("-inf"))
    client, _ = await serve(engine)
    resp = await post_generate(client, {"details": True})
    text = await resp.text()
    assert "Infinity" not in text
    assert all(isinstance(t["logprob"], float) for t in json.loads(text)["details"]["tokens"])


async def test_generate_headers(serve):
    client, _ = await serve()
    resp = await post_generate(client, {"adapter_id": "me/a"})
    h = resp.headers
    assert h["x-prompt-tokens"] == str(NUM_PROMPT) and h["x-generated-tokens"] == "3"
    assert h["x-queue-time"] == "2" and h["x-inference-time"] == "30"
    assert h["x-time-per-token"] == "10" and int(h["x-total-time"]) >= 0
    assert h["x-model-id"] == "fake/base" and h["x-adapter-id"] == "me/a"
    assert h["Content-Type"].startswith("application/json")
    resp = await post_generate(client)
    assert "x-adapter-id" not in resp.headers


async def test_compat_route_returns_a_list(serve):
    client, _ = await serve()
    resp = await client.post("/", json={"inputs": PROMPT, "parameters": {"details": True},
                                        "stream": False})
    body = await resp.json()
    assert isinstance(body, list) and len(body) == 1
    assert body[0]["generated_text"] == "Hello world" and "details" in body[0]
    assert resp.headers["x-generated-tokens"] == "3"
    resp = await client.post("/", json={"inputs": PROMPT, "stream": "yes"})
    assert resp.status == 422


# -- best_of ----------------------------------------------------------------------------------


async def test_best_of_picks_the_highest_logprob_sum(serve):
    engine = FakeEngine(logprob_of=lambda req, n: -float(req.sampling.seed % 3))
    client, _ = await serve(engine)
    resp = await post_generate(client, {"best_of": 3, "seed": 10, "do_sample": True,
                                        "details": True})
    assert resp.status == 200
    assert sorted(r.sampling.seed for r in engine.requests) == [10, 11, 12]
    details = (await resp.json())["details"]
    assert details["seed"] == 12  # 12 % 3 == 0: logprob 0 per token
    others = details["best_of_sequences"]
    assert [o["seed"] for o in others] == [10, 11]  # sums -3, -6
    assert set(others[0]) == {"generated_text", "finish_reason", "generated_tokens", "seed",
                              "prefill", "tokens"}
    assert others[0]["tokens"][0]["logprob"] == -1.0


async def test_best_of_seeds_wrap_and_without_details(serve):
    client, engine = await serve()
    resp = await post_generate(client, {"best_of": 3, "seed": 2**64 - 1, "top_k": 3})
    assert await resp.json() == {"generated_text": "Hello world"}
    assert sorted(r.sampling.seed for r in engine.requests) == [0, 1, 2**64 - 1]


async def test_best_of_random_seed_and_one_failure_fails_all(serve):
    engine = FakeEngine(error=AdapterError("cannot load"), error_after=1, delay=0.01)
    client, _ = await serve(engine)
    resp = await post_generate(client, {"best_of": 2, "do_sample": True})
    assert resp.status == 424
    seeds = [r.sampling.seed for r in engine.requests]
    assert (seeds[0] + 1) % 2**64 == seeds[1]


async def test_best_of_not_with_streaming(serve):
    client, engine = await serve()
    resp = await post_generate(client, {"best_of": 2, "do_sample": True},
                               path="/generate_stream")
    assert resp.status == 200
    events = sse_events(await resp.text())
    assert events == [{"error": "Input validation error: `best_of` != 1 is not supported when "
                                "streaming tokens", "error_type": "validation"}]
    resp = await post_generate(client, {"decoder_input_details": True}, path="/generate_stream")
    assert "`decoder_input_details` == true is not supported" in sse_events(
        await resp.text())[0]["error"]
    assert engine.requests == []


# -- engine errors, overload ------------------------------------------------------------------

ENGINE_ERRORS = [
    (AdapterError("adapter me/a: cannot fetch: 404"), 424, "generation"),
    (Unavailable("no healthy worker"), 503, "unavailable"),
    (EngineError("Request failed during generation: boom"), 500, "incomplete_generation"),
    (ValidationError("bad adapter rank"), 422, "validation"),
    (Overloaded("queue full"), 429, "overloaded"),
    (RuntimeError("bug"), 500, "incomplete_generation"),
]


@pytest.mark.parametrize("error_after", [0, 2])
@pytest.mark.parametrize("error,status,error_type", ENGINE_ERRORS,
                         ids=[type(e[0]).__name__ for e in ENGINE_ERRORS])
async def test_engine_errors_map_to_status(serve, error, status, error_type, error_after):
    client, _ = await serve(FakeEngine(error=error, error_after=error_after))
    resp = await post_generate(client)
    assert resp.status == status
    body = await resp.json()
    assert body["error_type"] == error_type
    if not isinstance(error, RuntimeError):
        assert body["error"] == str(error)


async def test_concurrency_limit_is_429_before_the_engine(serve):
    gate = asyncio.Event()
    client, engine = await serve(FakeEngine(gate=gate),
                                 scheduler={"max_concurrent_requests": 1})
    first = asyncio.ensure_future(post_generate(client))
    while not engine.requests:
        await asyncio.sleep(0.01)
    resp = await post_generate(client)
    assert resp.status == 429
    assert await resp.json() == {"error": "Model is overloaded", "error_type": "overloaded"}
    resp = await post_generate(client, path="/generate_stream")
    assert sse_events(await resp.text())[0]["error_type"] == "overloaded"
    assert len(engine.requests) == 1
    gate.set()
    assert (await first).status == 200
    assert (await post_generate(client)).status == 200  # the slot was given back


async def test_failed_requests_give_their_slot_back(serve):
    client, _ = await serve(FakeEngine(error=AdapterError("x")),
                            scheduler={"max_concurrent_requests": 1})
    for _ in range(3):
        assert (await post_generate(client)).status == 424
        assert (await post_generate(client, {"top_k": -1})).status == 422


# -- SSE --------------------------------------------------------------------------------------


@pytest.mark.parametrize("path,body", [
    ("/generate_stream", {"inputs": PROMPT, "parameters": {"details": True, "seed": 5,
                                                           "do_sample": True}}),
    ("/", {"inputs": PROMPT, "stream": True, "parameters": {"details": True, "seed": 5,
                                                            "do_sample": True}}),
])
async def test_stream_events(serve, path, body):
    client, _ = await serve()
    resp = await client.post(path, json=body)
    assert resp.status == 200
    assert resp.headers["Content-Type"] == "text/event-stream"
    assert resp.headers["x-prompt-tokens"] == str(NUM_PROMPT)
    text = await resp.text()
    assert "[DONE]" not in text
    events = sse_events(text)
    assert [e["token"]["text"] for e in events] == ["Hel", "lo", " world"]
    for event in events[:-1]:
        assert event["generated_text"] is None and event["details"] is None
        assert set(event["token"]) == {"id", "text", "logprob", "special", "skipped"}
    assert events[-1]["generated_text"] == "Hello world"
    assert events[-1]["details"] == {"finish_reason": "length", "prompt_tokens": NUM_PROMPT,
                                     "generated_tokens": 3, "seed": 5}


async def test_stream_without_details_full_text_and_alternatives(serve):
    client, _ = await serve()
    resp = await post_generate(client, {"return_full_text": True, "return_k_alternatives": 1},
                               path="/generate_stream")
    events = sse_events(await resp.text())
    assert events[-1]["generated_text"] == PROMPT + "Hello world"
    assert events[-1]["details"] is None
    assert events[0]["token"]["alternative_tokens"] == [{"id": 200, "text": "alt0",
                                                         "logprob": -1.0}]


async def test_stream_finish_after_the_last_token_still_ends_with_the_text(serve):
    client, _ = await serve(FakeEngine(finish_delay=0.05))
    resp = await post_generate(client, {"details": True}, path="/generate_stream")
    events = sse_events(await resp.text())
    assert [e["token"]["text"] for e in events] == ["Hel", "lo", " world", ""]
    assert events[-1]["token"]["special"] is True
    assert events[-1]["generated_text"] == "Hello world"
    assert events[-1]["details"]["generated_tokens"] == 3


@pytest.mark.parametrize("error_after,num_tokens", [(0, 0), (2, 2)])
async def test_stream_error_is_one_event(serve, error_after, num_tokens):
    error = AdapterError("adapter me/a: cannot fetch")
    client, _ = await serve(FakeEngine(error=error, error_after=error_after))
    resp = await post_generate(client, path="/generate_stream")
    assert resp.status == 200
    events = sse_events(await resp.text())
    assert len(events) == num_tokens + 1
    assert all("token" in e for e in events[:-1])
    assert events[-1] == {"error": "adapter me/a: cannot fetch", "error_type": "generation"}


async def test_stream_validation_error_is_one_event(serve):
    client, _ = await serve()
    resp = await post_generate(client, {"top_p": 2}, path="/generate_stream")
    events = sse_events(await resp.text())
    assert len(events) == 1 and events[0]["error_type"] == "validation"


# -- disconnects ------------------------------------------------------------------------------


async def _raw_post(host: str, port: int, path: str, body: dict):
    reader, writer = await asyncio.open_connection(host, port)
    data = json.dumps(body).encode()
    writer.write(f"POST {path} HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
                 f"Content-Length: {len(data)}\r\n\r\n".encode() + data)
    await writer.drain()
    return reader, writer


async def _wait_closed(engine: FakeEngine, since: float, within: float = 1.0) -> float:
    while not engine.closed:
        assert time.monotonic() - since < within, "the engine request was not cancelled"
        await asyncio.sleep(0.01)
    return engine.close_times[0] - since


async def test_stream_disconnect_cancels_the_request(serve):
    client, engine = await serve(FakeEngine(forever=True, delay=0.02))
    reader, writer = await _raw_post(client.server.host, client.server.port,
                                     "/generate_stream", {"inputs": PROMPT})
    await reader.readuntil(b"data:")
    writer.close()
    assert await _wait_closed(engine, time.monotonic()) < 1.0


@pytest.mark.parametrize("path", ["/generate_stream", "/generate"])
async def test_disconnect_while_waiting_cancels_the_request(serve, path):
    client, engine = await serve(FakeEngine(gate=asyncio.Event()))
    reader, writer = await _raw_post(client.server.host, client.server.port, path,
                                     {"inputs": PROMPT})
    while not engine.requests:
        await asyncio.sleep(0.01)
    writer.close()
    assert await _wait_closed(engine, time.monotonic()) < 1.0


async def test_stream_disconnect_without_handler_cancellation_stops_at_the_next_write():
    engine = FakeEngine(forever=True, delay=0.02)
    runner = make_runner(make_app(engine, make_config()), handler_cancellation=False)
    await runner.setup()
    site = web.TCPSite(runner, "127.0.0.1", 0)
    await site.start()
    try:
        port = runner.addresses[0][1]
        reader, writer = await _raw_post("127.0.0.1", port, "/generate_stream",
                                         {"inputs": PROMPT})
        await reader.readuntil(b"data:")
        writer.close()
        assert await _wait_closed(engine, time.monotonic()) < 1.0
    finally:
        await runner.cleanup()


# -- health, info, tokenize, misc -------------------------------------------------------------


async def test_health(serve):
    client, engine = await serve()
    resp = await client.get("/health")
    assert resp.status == 200 and await resp.read() == b""
    engine.healthy = False
    resp = await client.get("/health")
    assert resp.status == 503
    assert await resp.json() == {"error": "unhealthy", "error_type": "healthcheck"}


async def test_info(serve):
    client, _ = await serve()
    info = await (await client.get("/info")).json()
    assert info["model_id"] == "fake/base" and info["model_dtype"] == "float32"
    assert info["max_batch_total_tokens"] == 4096 and info["version"] == "test"
    assert (info["max_concurrent_requests"], info["max_best_of"], info["max_stop_sequences"],
            info["max_input_length"], info["max_total_tokens"]) == (8, 4, 2, 32, 64)


async def test_tokenize(serve):
    client, _ = await serve()
    resp = await client.post("/tokenize", json={"inputs": "hé"})
    assert await resp.json() == [{"id": 1, "text": "", "start": 0, "stop": 0},
                                 {"id": ord("h"), "text": "h", "start": 0, "stop": 1},
                                 {"id": ord("é"), "text": "é", "start": 1, "stop": 2}]
    assert "é" in await resp.text()  # not \u-escaped
    resp = await client.post("/tokenize", json={"inputs": "a", "add_special_tokens": False})
    assert await resp.json() == [{"id": ord("a"), "text": "a", "start": 0, "stop": 1}]
    assert (await client.post("/tokenize", json={"inputs": 3})).status == 422
    assert (await client.post("/tokenize", data=b"{", headers={
        "Content-Type": "application/json"})).status == 400


async def test_unknown_route_and_method_are_json(serve):
    client, _ = await serve()
    resp = await client.get("/nope")
    assert resp.status == 404 and (await resp.json())["error_type"] == "not_found"
    resp = await client.get("/generate")
    assert resp.status == 405 and "error" in await resp.json()


async def test_cors_only_when_configured(serve):
    client, _ = await serve()
    resp = await post_generate(client, headers={"Origin": "http://ui.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers
    client, _ = await serve(server={"cors_allow_origin": ("http://ui.example",)})
    resp = await post_generate(client, headers={"Origin": "http://ui.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "http://ui.example"
    resp = await post_generate(client, headers={"Origin": "http://evil.example"})
    assert "Access-Control-Allow-Origin" not in resp.headers
    resp = await client.options("/generate_stream", headers={
        "Origin": "http://ui.example", "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "content-type"})
    assert resp.status == 204
    assert resp.headers["Access-Control-Allow-Origin"] == "http://ui.example"
    assert "POST" in resp.headers["Access-Control-Allow-Methods"]
    resp = await post_generate(client, path="/generate_stream",
                               headers={"Origin": "http://ui.example"})
    assert resp.headers["Access-Control-Allow-Origin"] == "http://ui.example"


# -- the unmodified lorax-client --------------------------------------------------------------
# It runs in its own virtual environment, as a subprocess against the test server's port.


@needs_lorax_client
async def test_lorax_async_client(serve):
    client, engine = await serve()
    out = await run_lorax_client("async_generate", base_url(client), PROMPT)
    response = out["response"]
    assert response["generated_text"] == "Hello world"
    d = response["details"]
    assert d["finish_reason"] == "length" and d["generated_tokens"] == 3
    assert d["prompt_tokens"] == 6
    assert d["tokens"][0]["logprob"] == -0.25 and len(d["tokens"][0]["alternative_tokens"]) == 2
    assert d["prefill"][0]["logprob"] is None
    assert engine.requests[0].adapter == AdapterRef("me/a", "hub", None)

    stream = out["stream"]
    assert "".join(r["token"]["text"] for r in stream) == "Hello world"
    assert stream[-1]["generated_text"] == "Hello world"
    assert stream[-1]["details"]["seed"] == 3

    assert out["too_many_tokens"]["raised"] == "lorax.errors.ValidationError"


@needs_lorax_client
async def test_lorax_async_client_errors(serve):
    client, _ = await serve(FakeEngine(error=AdapterError("cannot load me/a"), error_after=1))
    out = await run_lorax_client("async_errors", base_url(client), PROMPT)
    assert out["generate"]["raised"] == "lorax.errors.GenerationError"
    assert "cannot load me/a" in out["generate"]["message"]
    assert out["stream"]["raised"] == "lorax.errors.GenerationError"
    assert out["streamed"] == ["Hel"]


@needs_lorax_client
async def test_lorax_sync_client(serve):
    client, _ = await serve()
    out = await run_lorax_client("sync_generate", base_url(client), PROMPT)
    assert out["response"]["generated_text"] == "Hello world"
    assert len(out["response"]["details"]["best_of_sequences"]) == 1
    assert out["stream"][-1]["generated_text"] == "Hello world"
    assert out["stream"][-1]["details"]["finish_reason"] == "length"
    assert out["too_many_stops"]["raised"] == "lorax.errors.ValidationError"
