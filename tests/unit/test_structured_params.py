"""What reaches the engine for response_format and watermark on the native and OpenAI routes,
and the adapter's own chat template, against the scripted fake engine."""
from __future__ import annotations

import json

import pytest

from loraxd.http.response_format import response_schema
from tests.unit.test_http_native import post_generate, serve  # noqa: F401 - the fixture
from tests.unit.test_http_openai import api, chat_engine, decode  # noqa: F401

SCHEMA = {"type": "object", "properties": {"b": {"type": "integer"}, "a": {"type": "string"}}}


@pytest.mark.parametrize("raw,schema", [
    (None, None), ({"type": "text"}, None),
    ({"type": "json_object"}, {"type": "object"}),
    ({"type": "json_object", "schema": None}, {"type": "object"}),  # LoRAX would drop it
    ({"type": "json_object", "schema": SCHEMA}, SCHEMA),  # lorax-client's shape
    ({"type": "json_schema", "schema": SCHEMA}, SCHEMA),
    ({"type": "json_schema", "json_schema": {"name": "x", "schema": SCHEMA, "strict": True}},
     SCHEMA),  # OpenAI's
])
def test_response_format_shapes(raw, schema):
    key = response_schema(raw)
    assert (None if key is None else json.loads(key)) == schema
    if schema is SCHEMA:
        assert list(json.loads(key)["properties"]) == ["b", "a"]  # the order is generated


async def test_native_response_format_and_watermark_reach_the_engine(serve):
    client, engine = await serve()
    resp = await post_generate(client, {"response_format": {"type": "json_object",
                                                            "schema": SCHEMA},
                                        "watermark": True})
    assert resp.status == 200
    sampling = engine.requests[0].sampling
    assert sampling.watermark and '"b"' in sampling.grammar
    await post_generate(client, {})
    assert not engine.requests[1].sampling.watermark and engine.requests[1].sampling.grammar == ""


async def test_openai_json_schema_reaches_the_engine(api):
    oc, engine, _ = await api(chat_engine())
    await oc.chat.completions.create(
        model="fake/base", messages=[{"role": "user", "content": "x"}],
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SCHEMA}})
    assert '"b"' in engine.requests[0].sampling.grammar


async def test_an_adapter_that_ships_a_template_gets_its_own(api, tmp_path):
    own = tmp_path / "own"
    own.mkdir()
    (own / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}|{{ m.content }}]{% endfor %}{{ eos_token }}")
    in_config = tmp_path / "config"
    in_config.mkdir()
    (in_config / "tokenizer_config.json").write_text(json.dumps(
        {"chat_template": "{% for m in messages %}<{{ m.content }}>{% endfor %}"}))
    engine = chat_engine()
    engine.adapter_dirs = {"me/own": own, "me/config": in_config, "me/plain": tmp_path}
    oc, engine, _ = await api(engine)
    messages = [{"role": "user", "content": "hi"}]
    for model in ("me/own", "me/config", "me/plain", "fake/base"):
        await oc.chat.completions.create(model=model, messages=messages)
    prompts = [decode(r.prompt_ids) for r in engine.requests]
    assert prompts[0] == "[user|hi]</s>"  # the base model's special tokens
    assert prompts[1] == "<hi>"
    assert prompts[2] == prompts[3] == "<|im_start|>user\nhi<|im_end|>\n<|im_start|>assistant\n"


async def test_the_default_adapter_renders_with_its_own_template(api, tmp_path):
    """A chat request that names no adapter runs the default one (`adapter_id`): with that
    adapter's template, not the base model's."""
    (tmp_path / "chat_template.jinja").write_text(
        "{% for m in messages %}[{{ m.role }}|{{ m.content }}]{% endfor %}")
    engine = chat_engine()
    engine.adapter_dirs = {"me/own": tmp_path}
    oc, engine, _ = await api(engine, adapters={"adapter_id": "me/own",
                                                "adapter_source": "local"})
    await oc.chat.completions.create(model="fake/base",
                                     messages=[{"role": "user", "content": "hi"}])
    assert decode(engine.requests[0].prompt_ids) == "[user|hi]"
    assert engine.requests[0].adapter.adapter_id == "me/own"
