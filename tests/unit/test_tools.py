"""Tools on /v1/chat/completions: parsing calls back, the call schema under real constrained
decoding, the prompt, and the answers and streams the unmodified openai client reads."""
from __future__ import annotations

import json

import pytest
import torch

from loraxd.engine.grammar import grammar_for_schema, schema_key
from loraxd.http.chat_template import ChatTemplate
from loraxd.http.tool_calls import ToolCallStream, parse_calls
from loraxd.http.tools import call_schema, parse_tools
from loraxd.protocol.worker import SamplingParams
from loraxd.worker.layers.sampler import SeqSampling, sample
from tests.unit.test_http_native import serve  # noqa: F401 - the fixture, shared
from tests.unit.test_http_openai import CHATML, api, chat_engine, decode  # noqa: F401

WEATHER = {"type": "function", "function": {
    "name": "get_weather", "description": "The weather in a city",
    "parameters": {"type": "object", "properties": {
        "city": {"type": "string", "maxLength": 20},
        "unit": {"enum": ["celsius", "fahrenheit"]}},
        "required": ["city", "unit"], "additionalProperties": False}}}
TIME = {"type": "function", "function": {"name": "get_time", "parameters": {
    "type": "object", "properties": {"zone": {"type": "string", "maxLength": 10}},
    "required": ["zone"], "additionalProperties": False}}}
MESSAGES = [{"role": "user", "content": "Weather in Paris?"}]
CALL = '{"name":"get_weather","arguments":{"city":"Paris","unit":"celsius"}}'
ROOM = {"max_input_length": 2048, "max_total_tokens": 4096}  # tool listings are long


def tools(choice="auto", *more) -> object:
    return parse_tools({"tools": [WEATHER, TIME, *more], "tool_choice": choice})


@pytest.mark.parametrize("text", [
    CALL, '  {"name": "get_weather", "parameters": {"city": "Paris", "unit": "celsius"}}',
    '<tool_call>\n' + CALL + '\n</tool_call>', "[" + CALL + "]",
])
def test_calls_are_read_back_in_every_usual_shape(text):
    calls = parse_calls(text, tools())
    assert [c["function"]["name"] for c in calls] == ["get_weather"]
    assert json.loads(calls[0]["function"]["arguments"]) == {"city": "Paris", "unit": "celsius"}
    assert calls[0]["id"].startswith("call_") and calls[0]["type"] == "function"


@pytest.mark.parametrize("text", [
    "It is sunny.", '{"name": "launch_rockets", "arguments": {}}', '{"city": "Paris"}',
    CALL + " and more text", CALL[:-5],
])
def test_anything_else_is_text(text):
    assert parse_calls(text, tools()) is None


def test_tool_choice_shapes():
    assert tools().choice == "auto" and not tools().constrained
    named = tools({"type": "function", "function": {"name": "get_time"}})
    assert named.constrained and [t.name for t in named.offered] == ["get_time"]
    assert tools("none").offered == ()
    assert parse_tools({}) is None


def test_a_constrained_call_streams_name_first_then_its_arguments():
    stream = ToolCallStream(tools("required"))
    deltas = [d for ch in CALL for d in stream.feed(ch)] + stream.finish()
    head = deltas[0]["tool_calls"][0]
    assert head["index"] == 0 and head["type"] == "function" and head["id"].startswith("call_")
    assert head["function"] == {"name": "get_weather", "arguments": ""}
    arguments = "".join(d["tool_calls"][0]["function"]["arguments"] for d in deltas[1:])
    assert arguments == '{"city":"Paris","unit":"celsius"}'
    assert stream.made_calls


def test_auto_streams_text_at_once_and_holds_back_a_call():
    text = ToolCallStream(tools())
    assert text.feed("It ") == [{"content": "It "}] and text.feed("is") == [{"content": "is"}]
    assert text.finish() == [] and not text.made_calls
    call = ToolCallStream(tools())
    assert [d for ch in CALL for d in call.feed(ch)] == []
    deltas = call.finish()
    assert deltas[0]["tool_calls"][0]["function"]["name"] == "get_weather"
    assert json.loads(deltas[1]["tool_calls"][0]["function"]["arguments"])["city"] == "Paris"
    almost = ToolCallStream(tools())
    almost.feed('{"not": "a call"}')
    assert almost.finish() == [{"content": '{"not": "a call"}'}]


def test_required_always_yields_a_valid_call(default_model_dir):
    """Random logits through the call schema's grammar: every answer is a valid call."""
    import jsonschema
    from tokenizers import Tokenizer

    from loraxd.worker.layers.grammar import Grammars
    tok = Tokenizer.from_file(str(default_model_dir / "tokenizer.json"))
    vocab = tok.get_vocab_size(with_added_tokens=True)
    grammars = Grammars(str(default_model_dir), vocab, [2])
    request = tools("required")
    grammar = grammar_for_schema(schema_key(call_schema(request)))
    for seed in range(6):
        seq = SeqSampling(SamplingParams(do_sample=True, seed=seed), [1], 1,
                          grammar=grammars.start(grammar, []))
        for step in range(150):
            logits = torch.randn(1, vocab, generator=torch.Generator().manual_seed(seed * 999 + step))
            token = sample(logits, [seq]).token_ids[0]
            if token == 2:
                break
            seq.accept(token)
        text = tok.decode(seq.token_ids[1:])
        calls = parse_calls(text, request)
        assert calls is not None, text
        name = calls[0]["function"]["name"]
        schema = {"get_weather": WEATHER, "get_time": TIME}[name]["function"]["parameters"]
        jsonschema.validate(json.loads(calls[0]["function"]["arguments"]), schema)


def test_tools_reach_a_template_that_reads_them_else_a_system_message():
    reads = ChatTemplate("{% for t in tools %}[{{ t.function.name }}]{% endfor %}"
                         "{% for m in messages %}{{ m.role }}:{{ m.content }};{% endfor %}")
    assert reads.render(MESSAGES, tools=tools().offered) == (
        "[get_weather][get_time]user:Weather in Paris?;")
    plain = ChatTemplate(CHATML)
    rendered = plain.render(MESSAGES, tools=tools().offered)
    assert rendered.startswith("<|im_start|>system\nYou can call these tools")
    assert '"name": "get_time"' in rendered and "Weather in Paris?" in rendered


async def test_required_is_constrained_and_answers_tool_calls(api):
    pieces = ('{"name":"get_weather",', '"arguments":{"city":', '"Paris","unit":"celsius"}}')
    oc, engine, _ = await api(chat_engine(pieces=pieces), scheduler=ROOM)
    resp = await oc.chat.completions.create(model="fake/base", messages=MESSAGES,
                                            tools=[WEATHER, TIME], tool_choice="required")
    choice = resp.choices[0]
    assert choice.finish_reason == "tool_calls" and choice.message.content is None
    call = choice.message.tool_calls[0]
    assert call.function.name == "get_weather"
    assert json.loads(call.function.arguments) == {"city": "Paris", "unit": "celsius"}
    assert engine.requests[0].sampling.grammar  # the call schema's grammar went along
    assert "You can call these tools" in decode(engine.requests[0].prompt_ids)


async def test_a_streamed_call_reaches_the_openai_client_whole(api):
    pieces = ('{"name":"get_weather",', '"arguments":{"city":', '"Paris","unit":"celsius"}}')
    oc, engine, _ = await api(chat_engine(pieces=pieces), scheduler=ROOM)
    stream = await oc.chat.completions.create(
        model="fake/base", messages=MESSAGES, tools=[WEATHER],
        tool_choice={"type": "function", "function": {"name": "get_weather"}}, stream=True)
    chunks = [c async for c in stream]
    calls = [tc for c in chunks for tc in (c.choices[0].delta.tool_calls or [])]
    assert calls[0].function.name == "get_weather" and calls[0].id.startswith("call_")
    assert "".join(tc.function.arguments or "" for tc in calls) == (
        '{"city":"Paris","unit":"celsius"}')
    assert chunks[-1].choices[0].finish_reason == "tool_calls"


async def test_auto_without_a_call_is_plain_text(api):
    oc, engine, _ = await api(chat_engine(), scheduler=ROOM)
    resp = await oc.chat.completions.create(model="fake/base", messages=MESSAGES,
                                            tools=[WEATHER])
    assert resp.choices[0].message.content == "Hello world"
    assert resp.choices[0].finish_reason == "length" and not resp.choices[0].message.tool_calls
    assert not engine.requests[0].sampling.grammar


async def test_tool_history_is_rendered(api):
    oc, engine, _ = await api(chat_engine(), scheduler=ROOM)
    await oc.chat.completions.create(model="fake/base", tools=[WEATHER], messages=MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [{
            "id": "call_1", "type": "function",
            "function": {"name": "get_weather", "arguments": '{"city": "Paris"}'}}]},
        {"role": "tool", "tool_call_id": "call_1", "content": "18 C"}])
    prompt = decode(engine.requests[0].prompt_ids)
    assert '[{"name": "get_weather", "arguments": {"city": "Paris"}}]' in prompt
    assert "<|im_start|>tool\n18 C" in prompt


@pytest.mark.parametrize("body,what", [
    ({"tools": [WEATHER], "tool_choice": "required", "response_format": {"type": "json_object"}},
     "cannot be combined with `tools`"),
    ({"tools": [WEATHER], "tool_choice": {"type": "function", "function": {"name": "nope"}}},
     "names function `nope`"),
    ({"tools": [WEATHER, WEATHER]}, "more than once"),
    ({"tools": [{"type": "retrieval"}]}, "must be an object of type `function`"),
    ({"tools": [WEATHER], "tool_choice": "sometimes"}, "`tool_choice` must be one of"),
    ({"functions": [{"name": "f"}]}, "`functions` / `function_call` (deprecated)"),
])
async def test_tool_requests_we_cannot_honour_are_422(api, body, what):
    oc, engine, client = await api(chat_engine(), scheduler=ROOM)
    resp = await client.post("/v1/chat/completions",
                             json={"model": "fake/base", "messages": MESSAGES, **body})
    assert resp.status == 422 and what in (await resp.json())["error"]["message"]
    assert engine.requests == []
