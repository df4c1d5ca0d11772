"""The OpenAI routes against a scripted fake engine, through the unmodified openai client."""
from __future__ import annotations

import asyncio
import dataclasses
import json
import time
from types import SimpleNamespace

import openai
import pytest

from loraxd.engine.detokenizer import IncrementalDetokenizer
from loraxd.engine.request import AdapterError, AdapterRef
from loraxd.engine.sequence import Sequence
from loraxd.engine.tokenizer import read_chat_template, special_token_strings
from loraxd.http.chat_template import ChatTemplate, ChatTemplates
from loraxd.http.errors import ApiError
from loraxd.protocol.worker import SeqOutput
from tests.unit.test_http_native import (NUM_PROMPT, PROMPT, FakeEngine, FakeTokenizer,
                                         _raw_post, _wait_closed, base_url)
from tests.unit.test_http_native import serve  # noqa: F401 - the fixture, shared

CHATML = ("{% for m in messages %}{{ '<|im_start|>' + m['role'] + '\n' + m['content'] + "
          "'<|im_end|>\n' }}{% endfor %}{% if add_generation_prompt %}"
          "{{ '<|im_start|>assistant\n' }}{% endif %}")


class ChatTokenizer(FakeTokenizer):
    chat_template = CHATML
    special_tokens = {"bos_token": "<s>", "eos_token": "</s>"}


def chat_engine(**kwargs) -> FakeEngine:
    engine = FakeEngine(**kwargs)
    engine.tokenizer = ChatTokenizer()
    return engine


CHAT_LIMITS = {"max_input_length": 256, "max_total_tokens": 512}


@pytest.fixture
async def api(serve):
    """start(engine, **sections) -> (AsyncOpenAI, engine, aiohttp test client).

    A chat engine gets room for rendered prompts (the fake tokenizer: one id per char).
    """
    opened = []

    async def start(engine=None, **sections):
        if engine is not None and isinstance(engine.tokenizer, ChatTokenizer):
            sections["scheduler"] = {**CHAT_LIMITS, **sections.get("scheduler", {})}
        client, engine = await serve(engine, **sections)
        oc = openai.AsyncOpenAI(base_url=f"{base_url(client)}/v1", api_key="sk-client-key",
                                max_retries=0)
        opened.append(oc)
        return oc, engine, client

    yield start
    for oc in opened:
        await oc.close()


def decode(ids: list[int]) -> str:
    return "".join(chr(i) for i in ids)


def data_lines(text: str) -> list[str]:
    chunks = text.split("\n\n")
    assert chunks[-1] == "" and all(c.startswith("data: ") for c in chunks[:-1])
    return [c[len("data: "):] for c in chunks[:-1]]


class SequenceEngine(FakeEngine):
    """Runs `pieces` (one token each) through the engine's own Sequence, so stop sequences
    are handled as the real engine does; `eos` is a special EOS piece."""

    def __init__(self, pieces: list[str], eos: str | None = None):
        super().__init__()
        self.tokenizer = ChatTokenizer()
        self.vocab = {100 + i: p for i, p in enumerate(pieces)}
        self.eos_ids = frozenset(i for i, p in self.vocab.items() if p == eos)

    async def generate(self, req):
        self.requests.append(req)
        req = dataclasses.replace(req, max_new_tokens=len(self.vocab))
        seq = Sequence(1, req, IncrementalDetokenizer(PieceTokenizer(self.vocab), [],
                                                      self.eos_ids))
        for token_id in self.vocab:
            yield seq.append(SeqOutput(token_id, token_id, -0.1), self.eos_ids, self.eos_ids,
                             self.vocab.__getitem__)
            if seq.finish_reason is not None:
                yield seq.finish_event()
                return


class PieceTokenizer:
    def __init__(self, vocab: dict[int, str]):
        self.vocab = vocab

    def decode(self, ids, skip_special_tokens=False):
        return "".join(self.vocab[i] for i in ids)


# -- /v1/completions --------------------------------------------------------------------------


async def test_completion(api):
    oc, engine, client = await api()
    resp = await oc.completions.create(model="fake/base", prompt=PROMPT)
    assert resp.id.startswith("cmpl-") and resp.object == "text_completion"
    assert resp.model == "fake/base" and resp.created > 0
    assert len(resp.choices) == 1
    choice = resp.choices[0]
    assert (choice.index, choice.text, choice.finish_reason) == (0, "Hello world", "length")
    assert choice.logprobs is None
    assert (resp.usage.prompt_tokens, resp.usage.completion_tokens, resp.usage.total_tokens) == \
        (NUM_PROMPT, 3, NUM_PROMPT + 3)
    req = engine.requests[0]
    assert req.prompt_ids == [1] + [ord(c) for c in PROMPT]
    assert req.max_new_tokens == 64 - NUM_PROMPT  # as native: fill the budget
    assert req.adapter is None and not req.sampling.do_sample


async def test_completion_parameters_reach_the_engine(api):
    oc, engine, client = await api()
    await oc.completions.create(
        model="", prompt=PROMPT, max_tokens=5, temperature=0.5, top_p=0.9, seed=7, stop="\n",
        presence_penalty=0.5, frequency_penalty=-0.5,
        extra_body={"top_k": 4, "repetition_penalty": 1.1, "ignore_eos": True})
    req = engine.requests[0]
    s = req.sampling
    assert (s.do_sample, s.temperature, s.top_p, s.top_k, s.seed) == (True, 0.5, 0.9, 4, 7)
    assert (s.presence_penalty, s.frequency_penalty, s.repetition_penalty) == (0.5, -0.5, 1.1)
    assert (req.max_new_tokens, req.stop, req.ignore_eos) == (5, ("\n",), True)
    await oc.completions.create(model="", prompt=PROMPT, stop=["a", "b"],
                                extra_body={"ignore_eos_token": True})
    assert engine.requests[1].stop == ("a", "b") and engine.requests[1].ignore_eos


async def test_completion_list_prompt_and_n(api):
    oc, engine, client = await api()
    resp = await oc.completions.create(model="fake/base", prompt=["ab", "cde"], n=2, seed=10)
    assert [c.index for c in resp.choices] == [0, 1, 2, 3]
    assert all(c.text == "Hello world" for c in resp.choices)
    assert resp.usage.prompt_tokens == 3 + 4  # each prompt once, not once per choice
    assert resp.usage.completion_tokens == 4 * 3
    prompts = sorted(decode(r.prompt_ids[1:]) for r in engine.requests)
    assert prompts == ["ab", "ab", "cde", "cde"]
    assert all(r.sampling.do_sample for r in engine.requests)  # n > 1 samples
    assert sorted({r.sampling.seed for r in engine.requests}) == [10, 11]


async def test_completion_stream_with_usage(api):
    oc, _, client = await api()
    stream = await oc.completions.create(model="fake/base", prompt=PROMPT, stream=True,
                                         stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert {c.object for c in chunks} == {"text_completion"}
    assert len({c.id for c in chunks}) == 1
    texts = [c.choices[0].text for c in chunks if c.choices]
    assert "".join(texts) == "Hello world" and texts[:3] == ["Hel", "lo", " world"]
    assert [c.choices[0].finish_reason for c in chunks if c.choices][-1] == "length"
    assert chunks[-1].choices == []
    assert (chunks[-1].usage.prompt_tokens, chunks[-1].usage.completion_tokens) == \
        (NUM_PROMPT, 3)
    assert all(c.usage is None for c in chunks[:-1])


async def test_completion_stream_wire_format(serve):
    client, _ = await serve()
    resp = await client.post("/v1/completions", json={"model": "", "prompt": PROMPT,
                                                      "stream": True})
    assert resp.status == 200 and resp.headers["Content-Type"] == "text/event-stream"
    lines = data_lines(await resp.text())
    assert lines[-1] == "[DONE]"
    chunks = [json.loads(line) for line in lines[:-1]]
    assert all("usage" not in c for c in chunks)  # no include_usage: no usage key
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"


async def test_completion_echo_and_logprobs(api):
    oc, engine, client = await api()
    resp = await oc.completions.create(model="fake/base", prompt=PROMPT, logprobs=2)
    lp = resp.choices[0].logprobs
    assert lp.tokens == ["Hel", "lo", " world"]
    assert lp.token_logprobs == [-0.25, -0.5, -0.75]
    assert lp.top_logprobs[0] == {"alt0": -1.0, "alt1": -2.0}
    assert lp.text_offset == [0, 3, 5]
    assert engine.requests[0].sampling.num_alternatives == 2

    resp = await oc.completions.create(model="fake/base", prompt=PROMPT, echo=True)
    assert resp.choices[0].text == PROMPT + "Hello world"

    resp = await oc.completions.create(model="fake/base", prompt=PROMPT, echo=True, logprobs=0)
    lp = resp.choices[0].logprobs
    assert engine.requests[-1].sampling.prompt_logprobs
    assert lp.tokens[:NUM_PROMPT] == ["<s>"] + list(PROMPT)
    assert lp.token_logprobs[0] is None and lp.token_logprobs[1] == -0.5
    assert lp.tokens[NUM_PROMPT:] == ["Hel", "lo", " world"]
    assert lp.text_offset[NUM_PROMPT:] == [len(PROMPT), len(PROMPT) + 3, len(PROMPT) + 5]
    assert lp.top_logprobs is None  # logprobs=0: no alternatives


async def test_completion_stream_echo_and_logprobs(api):
    oc, _, client = await api()
    stream = await oc.completions.create(model="fake/base", prompt=PROMPT, stream=True, echo=True)
    assert "".join([c.choices[0].text async for c in stream]) == PROMPT + "Hello world"
    stream = await oc.completions.create(model="fake/base", prompt=PROMPT, stream=True,
                                         logprobs=1)
    chunks = [c async for c in stream]
    with_lp = [c.choices[0].logprobs for c in chunks if c.choices[0].logprobs]
    assert [lp.tokens for lp in with_lp] == [["Hel"], ["lo"], [" world"]]
    assert [lp.text_offset for lp in with_lp] == [[0], [3], [5]]
    assert with_lp[1].top_logprobs == [{"alt0": -1.0}]


# -- /v1/chat/completions ---------------------------------------------------------------------

RENDERED = "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


@pytest.mark.parametrize("content", ["hi", [{"type": "text", "text": "hi"}]])
async def test_chat(api, content):
    oc, engine, client = await api(chat_engine())
    resp = await oc.chat.completions.create(model="fake/base",
                                            messages=[{"role": "user", "content": content}])
    assert resp.id.startswith("chatcmpl-") and resp.object == "chat.completion"
    choice = resp.choices[0]
    assert choice.message.role == "assistant" and choice.message.content == "Hello world"
    assert choice.finish_reason == "length" and choice.logprobs is None
    req = engine.requests[0]
    assert decode(req.prompt_ids) == RENDERED  # no BOS added: the template has its tokens
    assert resp.usage.prompt_tokens == len(RENDERED) and resp.usage.completion_tokens == 3


async def test_chat_multi_turn_and_parts(api):
    oc, engine, client = await api(chat_engine())
    await oc.chat.completions.create(model="fake/base", messages=[
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": [{"type": "text", "text": "a"}, {"type": "text", "text": "b"}]},
        {"role": "assistant", "content": "ok"}, {"role": "user", "content": "c"}],
        max_completion_tokens=4)
    assert decode(engine.requests[0].prompt_ids) == (
        "<|im_start|>system\nbe brief<|im_end|>\n<|im_start|>user\na\nb<|im_end|>\n"
        "<|im_start|>assistant\nok<|im_end|>\n<|im_start|>user\nc<|im_end|>\n"
        "<|im_start|>assistant\n")
    assert engine.requests[0].max_new_tokens == 4


async def test_chat_stream_role_first_then_deltas(api):
    oc, _, client = await api(chat_engine())
    stream = await oc.chat.completions.create(
        model="fake/base", messages=[{"role": "user", "content": "hi"}], stream=True,
        stream_options={"include_usage": True})
    chunks = [c async for c in stream]
    assert {c.object for c in chunks} == {"chat.completion.chunk"}
    assert chunks[0].choices[0].delta.role == "assistant"
    assert [c.choices[0].delta.content for c in chunks[1:4]] == ["Hel", "lo", " world"]
    assert chunks[-2].choices[0].finish_reason == "length"
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == 3


async def test_chat_logprobs(api):
    oc, engine, client = await api(chat_engine())
    resp = await oc.chat.completions.create(
        model="fake/base", messages=[{"role": "user", "content": "hi"}], logprobs=True,
        top_logprobs=2)
    content = resp.choices[0].logprobs.content
    assert [t.token for t in content] == ["Hel", "lo", " world"]
    assert content[0].logprob == -0.25 and content[0].bytes == list(b"Hel")
    assert [(a.token, a.logprob) for a in content[0].top_logprobs] == \
        [("alt0", -1.0), ("alt1", -2.0)]
    resp = await oc.chat.completions.create(
        model="fake/base", messages=[{"role": "user", "content": "hi"}], logprobs=True)
    assert resp.choices[0].logprobs.content[0].top_logprobs == []
    assert engine.requests[1].sampling.num_alternatives == 0
    stream = await oc.chat.completions.create(
        model="fake/base", messages=[{"role": "user", "content": "hi"}], logprobs=True,
        top_logprobs=1, stream=True)
    with_lp = [c.choices[0].logprobs for c in [c async for c in stream]
               if c.choices[0].logprobs]
    assert [lp.content[0].token for lp in with_lp] == ["Hel", "lo", " world"]


async def test_chat_n(api):
    oc, engine, client = await api(chat_engine())
    resp = await oc.chat.completions.create(
        model="fake/base", messages=[{"role": "user", "content": "hi"}], n=3, temperature=0.7)
    assert [c.index for c in resp.choices] == [0, 1, 2] and len(engine.requests) == 3
    stream = await oc.chat.completions.create(
        model="fake/base", messages=[{"role": "user", "content": "hi"}], n=2, stream=True)
    text = {0: "", 1: ""}
    async for chunk in stream:
        for c in chunk.choices:
            text[c.index] += c.delta.content or ""
    assert text == {0: "Hello world", 1: "Hello world"}


async def test_chat_template_refusal_is_422(api):
    engine = chat_engine()
    engine.tokenizer.chat_template = (
        "{% if messages[0]['role'] != 'user' %}{{ raise_exception('first must be user') }}"
        "{% endif %}{{ messages[0]['content'] }}")
    oc, _, client = await api(engine)
    with pytest.raises(openai.UnprocessableEntityError, match="first must be user"):
        await oc.chat.completions.create(model="fake/base",
                                         messages=[{"role": "assistant", "content": "x"}])
    assert engine.requests == []


async def test_chat_without_a_template_is_422(api):
    oc, _, _ = await api()  # the native tests' tokenizer: no chat template
    with pytest.raises(openai.UnprocessableEntityError, match="no chat template"):
        await oc.chat.completions.create(model="fake/base",
                                         messages=[{"role": "user", "content": "x"}])


# -- model -> adapter -------------------------------------------------------------------------


@pytest.mark.parametrize("model,extra,adapter", [
    ("fake/base", {}, None),
    ("", {}, None),
    ("my-adapter", {}, AdapterRef("my-adapter", "hub", None)),
    ("me/a", {"adapter_source": "local"}, AdapterRef("me/a", "local", None)),
    ("me/a", {"api_token": "hf_x"}, AdapterRef("me/a", "hub", "hf_x")),
])
async def test_model_names_the_adapter(api, model, extra, adapter):
    oc, engine, client = await api(chat_engine())  # sends Authorization: Bearer sk-client-key, never a hub token
    resp = await oc.completions.create(model=model, prompt=PROMPT, extra_body=extra)
    assert engine.requests[0].adapter == adapter
    assert resp.model == (model or "fake/base")
    await oc.chat.completions.create(model=model, messages=[{"role": "user", "content": "x"}],
                                     extra_body=extra)
    assert engine.requests[1].adapter == adapter


async def test_adapter_source_default_from_config(api):
    oc, engine, client = await api(adapters={"adapter_source": "s3"})
    await oc.completions.create(model="bucket/a", prompt=PROMPT)
    assert engine.requests[0].adapter == AdapterRef("bucket/a", "s3", None)


async def test_models_lists_base_and_adapters(api, serve):
    engine = FakeEngine()
    entry = lambda i, token=None: SimpleNamespace(ref=AdapterRef(i, "hub", token))  # noqa: E731
    engine.adapters = SimpleNamespace(entries={
        "hub:me/a": entry("me/a"), "local:me/a": entry("me/a"), "hub:me/b": entry("me/b"),
        "hub:me/private": entry("me/private", "hf_secret")})
    oc, _, client = await api(engine)
    models = await oc.models.list()
    ids = [m.id for m in models.data]
    assert ids == ["fake/base", "me/a", "me/b"]  # one per id; token-fetched ones left out
    assert all(m.object == "model" and m.owned_by == "loraxd" for m in models.data)
    client, _ = await serve()  # an engine without an adapter registry
    body = await (await client.get("/v1/models")).json()
    assert body["object"] == "list" and [m["id"] for m in body["data"]] == ["fake/base"]


# -- errors -----------------------------------------------------------------------------------

INVALID = [
    ({"prompt": PROMPT, "temperature": -1}, "`temperature` must be >= 0"),
    ({"prompt": PROMPT, "max_tokens": 0}, "`max_tokens` must be strictly positive"),
    ({"prompt": PROMPT, "max_tokens": 1000}, "must be <= 64"),
    ({"prompt": PROMPT, "n": 17}, "`n` must be >= 1 and <= 16"),
    ({"prompt": [PROMPT] * 5, "n": 16}, "at most 64 choices"),
    ({"prompt": PROMPT, "logprobs": 21}, "`logprobs` must be >= 0 and <= 20"),
    ({"prompt": PROMPT, "stop": ["a", "b", "c"]}, "`stop` must have at most 2"),
    ({"prompt": PROMPT, "top_p": 1.5}, "`top_p` must be > 0.0 and <= 1.0"),
    ({"prompt": PROMPT, "response_format": {"type": "json_schema", "json_schema": {
        "name": "x", "schema": {"type": "array", "uniqueItems": True}}}},
     'Unimplemented keys: ["uniqueItems"]'),
    ({"prompt": PROMPT, "logit_bias": {"1": 5}}, "`logit_bias` is not supported"),
    ({"prompt": PROMPT, "best_of": 2}, "`best_of` > 1 is not supported"),
    ({"prompt": PROMPT, "adapter_source": "ftp"}, "`adapter_source=ftp`"),
    ({"prompt": PROMPT, "stream": True, "echo": True, "logprobs": 1}, "`echo` together with"),
    ({"prompt": ""}, "`prompt` cannot be empty"),
    ({"prompt": [1, 2, 3]}, "`prompt` must be a string or a non-empty list of strings"),
    ({"prompt": "x" * 40}, "`inputs` must have at most 32 tokens"),
]


@pytest.mark.parametrize("body,what", INVALID, ids=[str(i) for i in range(len(INVALID))])
async def test_completion_validation_errors(serve, body, what):
    client, engine = await serve()
    resp = await client.post("/v1/completions", json={"model": "fake/base", **body})
    assert resp.status == 422
    err = await resp.json()
    assert err["error_type"] == "validation" and what in err["error"]["message"]
    assert err["error"]["type"] == "validation" and err["error"]["code"] == 422
    assert engine.requests == []


CHAT_INVALID = [
    ({"messages": []}, "`messages` must be a non-empty list"),
    ({"messages": [{"content": "x"}]}, "`messages[0]`.role must be a non-empty string"),
    ({"messages": [{"role": "user", "content": [{"type": "image_url", "image_url": {}}]}]},
     "`image_url` are not supported"),
    ({"tools": [{"type": "function", "function": {"name": "a b"}}]}, "function.name must be"),
    ({"tool_choice": "required"}, '`tool_choice` "required" needs `tools`'),
    ({"response_format": {"type": "json_schema", "json_schema": {"name": "x"}}},
     "`response_format.json_schema.schema` is required"),
    ({"top_logprobs": 2}, "`top_logprobs` needs `logprobs`"),
    ({"max_completion_tokens": 0}, "`max_completion_tokens` must be strictly positive"),
]


@pytest.mark.parametrize("body,what", CHAT_INVALID, ids=[str(i) for i in range(len(CHAT_INVALID))])
async def test_chat_validation_errors(serve, body, what):
    client, engine = await serve(chat_engine())
    body = {"model": "fake/base", "messages": [{"role": "user", "content": "x"}], **body}
    resp = await client.post("/v1/chat/completions", json=body)
    assert resp.status == 422
    assert what in (await resp.json())["error"]["message"]
    assert engine.requests == []


async def test_tool_choice_none_ignores_tools(api):
    oc, engine, client = await api(chat_engine())
    resp = await oc.chat.completions.create(
        model="fake/base", messages=[{"role": "user", "content": "hi"}], tool_choice="none",
        tools=[{"type": "function", "function": {"name": "f", "parameters": {}}}])
    assert resp.choices[0].message.content == "Hello world"


async def test_openai_client_raises_the_right_classes(api):
    oc, _, client = await api(chat_engine())
    url = f"{base_url(client)}/v1"
    with pytest.raises(openai.UnprocessableEntityError, match="`temperature` must be >= 0"):
        await oc.completions.create(model="fake/base", prompt=PROMPT, temperature=-1)
    with pytest.raises(openai.UnprocessableEntityError, match="`image_url` are not supported"):
        await oc.chat.completions.create(model="fake/base", messages=[
            {"role": "user", "content": [{"type": "image_url",
                                          "image_url": {"url": "http://x/y.png"}}]}])

    def sync_call():  # the sync client too
        sync = openai.OpenAI(base_url=url, api_key="x", max_retries=0)
        with pytest.raises(openai.UnprocessableEntityError, match="must be > 0.0 and <= 1.0"):
            sync.completions.create(model="fake/base", prompt=PROMPT, top_p=2)
        return sync.completions.create(model="fake/base", prompt=PROMPT).choices[0].text
    assert await asyncio.to_thread(sync_call) == "Hello world"


@pytest.mark.parametrize("stream", [False, True])
async def test_adapter_failure_is_424(api, stream):
    oc, _, client = await api(chat_engine(error=AdapterError("adapter me/a: cannot fetch: 404")))
    with pytest.raises(openai.APIStatusError, match="cannot fetch: 404") as info:
        await oc.completions.create(model="me/a", prompt=PROMPT, stream=stream)
    assert info.value.status_code == 424
    with pytest.raises(openai.APIStatusError) as info:
        await oc.chat.completions.create(model="me/a", stream=stream,
                                         messages=[{"role": "user", "content": "x"}])
    assert info.value.status_code == 424


async def test_error_mid_stream_raises_api_error(api):
    oc, _, client = await api(chat_engine(error=AdapterError("worker lost"), error_after=2))
    seen = []
    with pytest.raises(openai.APIError, match="worker lost"):
        stream = await oc.chat.completions.create(
            model="fake/base", messages=[{"role": "user", "content": "x"}], stream=True)
        async for chunk in stream:
            seen.append(chunk.choices[0].delta.content)
    assert seen == ["", "Hel", "lo"]


async def test_overload_is_429(api):
    gate = asyncio.Event()
    oc, engine, client = await api(chat_engine(gate=gate), scheduler={"max_concurrent_requests": 1})
    first = asyncio.ensure_future(oc.completions.create(model="fake/base", prompt=PROMPT))
    while not engine.requests:
        await asyncio.sleep(0.01)
    with pytest.raises(openai.RateLimitError, match="overloaded"):
        await oc.completions.create(model="fake/base", prompt=PROMPT)
    with pytest.raises(openai.RateLimitError):
        await oc.chat.completions.create(model="fake/base", stream=True,
                                         messages=[{"role": "user", "content": "x"}])
    gate.set()
    assert (await first).choices[0].text == "Hello world"
    resp = await oc.completions.create(model="fake/base", prompt=PROMPT)  # slot given back
    assert resp.choices[0].text == "Hello world"


async def test_malformed_body_is_400(serve):
    client, _ = await serve()
    resp = await client.post("/v1/completions", data=b"{",
                             headers={"Content-Type": "application/json"})
    assert resp.status == 400 and "malformed JSON" in (await resp.json())["error"]["message"]


# -- stop sequences and special tokens in streams ---------------------------------------------


async def test_stream_hides_stop_sequences_and_special_tokens(api):
    oc, _, client = await api(SequenceEngine(["Hel", "lo #", "#", "# tail"]))
    stream = await oc.completions.create(model="fake/base", prompt=PROMPT, stream=True,
                                         stop="###")
    chunks = [c async for c in stream]
    assert [c.choices[0].text for c in chunks] == ["Hel", "lo ", ""]  # "#", "##" held
    assert chunks[-1].choices[0].finish_reason == "stop"  # fix: not content_filter
    resp = await oc.completions.create(model="fake/base", prompt=PROMPT, stop="###")
    assert resp.choices[0].text == "Hello " and resp.choices[0].finish_reason == "stop"

    oc, _, client = await api(SequenceEngine(["Hi", "</s>"], eos="</s>"))
    stream = await oc.chat.completions.create(
        model="fake/base", messages=[{"role": "user", "content": "x"}], stream=True)
    chunks = [c async for c in stream]
    assert "".join(c.choices[0].delta.content or "" for c in chunks) == "Hi"
    assert chunks[-1].choices[0].finish_reason == "stop"


async def test_stream_disconnect_cancels_every_choice(serve):
    client, engine = await serve(chat_engine(forever=True, delay=0.02))
    reader, writer = await _raw_post(client.server.host, client.server.port, "/v1/completions",
                                     {"model": "", "prompt": PROMPT, "stream": True, "n": 2})
    await reader.readuntil(b"data: ")
    writer.close()
    since = time.monotonic()
    await _wait_closed(engine, since)
    while len(engine.closed) < 2:
        assert time.monotonic() - since < 1.0, "a choice's request was not cancelled"
        await asyncio.sleep(0.01)


# -- chat templates ---------------------------------------------------------------------------


def test_template_sandbox_and_helpers():
    t = ChatTemplate("{{ bos_token }}{{ messages[0]['content'] | tojson }}"
                     "{% generation %}{{ strftime_now('%Y') | length }}{% endgeneration %}",
                     {"bos_token": "<s>"})
    assert t.render([{"role": "user", "content": "é<b>"}]) == '<s>"é<b>"4'
    evil = ChatTemplate("{{ ''.__class__.__mro__[1].__subclasses__() }}")
    with pytest.raises(ApiError, match="unsafe"):
        evil.render([{"role": "user", "content": "x"}])


def test_tokenizer_reads_the_chat_template(tmp_path):
    config = {"chat_template": "from-config", "bos_token": {"content": "<s>"},
              "eos_token": "</s>"}
    assert read_chat_template(tmp_path, config) == "from-config"
    assert read_chat_template(tmp_path, {"chat_template": [
        {"name": "tool_use", "template": "tools"}, {"name": "default", "template": "d"}]}) == "d"
    (tmp_path / "chat_template.json").write_text(json.dumps({"chat_template": "from-json"}))
    assert read_chat_template(tmp_path, config) == "from-json"
    (tmp_path / "chat_template.jinja").write_text("from-jinja")
    assert read_chat_template(tmp_path, config) == "from-jinja"
    assert read_chat_template(tmp_path / "none", {}) is None
    assert special_token_strings(config, {"unk_token": "<unk>", "eos_token": "x"}) == \
        {"bos_token": "<s>", "eos_token": "</s>", "unk_token": "<unk>"}


CONVERSATIONS = [
    [{"role": "user", "content": "What is 2+2?"}],
    [{"role": "system", "content": "You answer in French."},
     {"role": "user", "content": "Hello there"}],
    [{"role": "user", "content": "hi"}, {"role": "assistant", "content": "Hello! ✨"},
     {"role": "user", "content": "tell me a joke\nplease"}],
]


def test_default_model_template_matches_transformers(default_model_dir):
    transformers = pytest.importorskip("transformers")
    from loraxd.engine.tokenizer import Tokenizer
    hf = transformers.AutoTokenizer.from_pretrained(str(default_model_dir))
    ours = Tokenizer(default_model_dir)
    try:
        template = ChatTemplates(ours, adapter_dir=None).base
        assert template is not None
        for messages in CONVERSATIONS:
            text = template.render(messages, add_generation_prompt=True)
            assert text == hf.apply_chat_template(messages, tokenize=False,
                                                  add_generation_prompt=True)
            ids = hf.apply_chat_template(messages, tokenize=True, add_generation_prompt=True)
            if isinstance(ids, dict) or hasattr(ids, "input_ids"):
                ids = ids["input_ids"]
            assert ours.encode_now(text, add_special_tokens=False) == list(ids)
    finally:
        ours.close()
