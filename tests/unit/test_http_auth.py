"""API keys: the keys file, 401/403 at the door, the hub token, reload."""
from __future__ import annotations

import hashlib
import os

import openai
import pytest

from loraxd.engine.request import AdapterRef
from loraxd.http.api_keys import KeyRing, KeysFileError, expand_path, read_keys_file
from loraxd.http.app import KEYRING_KEY, make_app, reload
from tests.unit.test_http_native import PROMPT, FakeEngine, base_url, make_config, post_generate
from tests.unit.test_http_native import serve  # noqa: F401 - the fixture, shared

KEY_A, KEY_B, KEY_C = "sk-team-a-0123456789", "sk-base-only-9876543210", "sk-no-base-5555"


def sha(key: str) -> str:
    return hashlib.sha256(key.encode()).hexdigest()


KEYS_TOML = f'''
[[keys]]
name = "team-a"
sha256 = "{sha(KEY_A)}"
adapters = ["team-a/*", "shared-*"]

[[keys]]
name = "base-only"
sha256 = "{sha(KEY_B)}"

[[keys]]
name = "no-base"
key = "{KEY_C}"
adapters = ["*"]
base_model = false
'''


def write_keys(path, text: str = KEYS_TOML, mode: int = 0o600) -> str:
    path.write_text(text)
    os.chmod(path, mode)
    return str(path)


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


@pytest.fixture
async def keyed(serve, tmp_path):  # noqa: F811 - serve is the shared fixture
    async def start(engine=None, **sections):
        path = write_keys(tmp_path / "keys.toml")
        server = {"api_keys_file": path, **sections.pop("server", {})}
        return await serve(engine, server=server, **sections)
    return start


# -- the keys file ----------------------------------------------------------------------------


def test_keys_file_holds_digests_only(tmp_path):
    keys = read_keys_file(write_keys(tmp_path / "k.toml"))
    assert [k.name for k in keys] == ["team-a", "base-only", "no-base"]
    assert keys[2].digest == hashlib.sha256(KEY_C.encode()).digest()
    assert keys[0].adapters == ("team-a/*", "shared-*") and keys[0].base_model
    assert keys[1].adapters == () and not keys[2].base_model
    ring = KeyRing(str(tmp_path / "k.toml"))
    ring.load()
    assert ring.check(KEY_A).name == "team-a" and ring.check(KEY_C).name == "no-base"
    assert ring.check("sk-team-a-012345678") is None and ring.check(None) is None
    assert ring.check("\udcff\ud800") is None  # any header text hashes, none raises


@pytest.mark.parametrize("text,why", [
    (f'[[keys]]\nname = "a"\nkey = "{KEY_A}"\n', "mode is 0644"),
    ('[[keys]]\nname = "a"\nsha256 = "abc"\n', "64 hex digits"),
    (f'[[keys]]\nname = "a"\nsha256 = "{sha(KEY_A)}"\nkey = "x"\n', "exactly one of"),
    (f'[[keys]]\nname = "a"\nsha256 = "{sha(KEY_A)}"\nadapter = ["*"]\n', "unknown field"),
    (f'[[keys]]\nname = "a"\nsha256 = "{sha(KEY_A)}"\nadapters = "*"\n', "list of glob"),
    (f'[[keys]]\nname = "a"\nsha256 = "{sha(KEY_A)}"\nbase_model = 1\n', "true or false"),
    (f'[[keys]]\nname = "a"\nsha256 = "{sha(KEY_A)}"\n[[keys]]\nname = "a"\n'
     f'sha256 = "{sha(KEY_B)}"\n', "two keys are named"),
    (f'[[keys]]\nname = "a"\nsha256 = "{sha(KEY_A)}"\n[[keys]]\nname = "b"\n'
     f'sha256 = "{sha(KEY_A)}"\n', "same key"),
    ('[[keys]]\nsha256 = "x"\n', "name must be"),
    ('keys = "x"\n', "must be [[keys]]"),
    ('[key]\nname = "a"\n', "unknown top-level key"),
    ('[[keys]\n', "invalid TOML"),
])
def test_bad_keys_files_are_refused(tmp_path, text, why):
    path = write_keys(tmp_path / "k.toml", text, mode=0o644)
    with pytest.raises(KeysFileError, match="k.toml") as info:
        read_keys_file(path)
    assert why in str(info.value)


def test_systemd_credential_path(tmp_path):
    write_keys(tmp_path / "api-keys")
    env = {"CREDENTIALS_DIRECTORY": str(tmp_path)}
    assert expand_path("$CREDENTIALS_DIRECTORY/api-keys", env) == str(tmp_path / "api-keys")
    assert expand_path("${CREDENTIALS_DIRECTORY}/api-keys", env) == str(tmp_path / "api-keys")
    ring = KeyRing("$CREDENTIALS_DIRECTORY/api-keys", env)
    ring.load()
    assert ring.check(KEY_B).name == "base-only"
    with pytest.raises(KeysFileError, match="CREDENTIALS_DIRECTORY is not set"):
        KeyRing("$CREDENTIALS_DIRECTORY/api-keys", {}).load()


def test_missing_keys_file_stops_make_app(tmp_path):
    with pytest.raises(KeysFileError, match="cannot read"):
        make_app(FakeEngine(), make_config(server={"api_keys_file": str(tmp_path / "no")}))


# -- the door ---------------------------------------------------------------------------------


@pytest.mark.parametrize("headers", [{}, bearer("sk-wrong"), {"Authorization": KEY_A},
                                     {"Authorization": f"Basic {KEY_A}"}, bearer("")])
async def test_no_valid_key_is_401_on_every_route(keyed, headers):
    client, engine = await keyed()
    for method, path in [("POST", "/generate"), ("POST", "/generate_stream"), ("POST", "/"),
                         ("POST", "/tokenize"), ("GET", "/info"), ("GET", "/metrics"),
                         ("GET", "/openapi.json"), ("GET", "/docs"), ("GET", "/nowhere")]:
        resp = await client.request(method, path, json={"inputs": PROMPT}, headers=headers)
        assert resp.status == 401, path
        assert resp.headers["WWW-Authenticate"].startswith("Bearer")
        assert (await resp.json()) == {"error": "a valid API key is needed (Authorization: "
                                                "Bearer)", "error_type": "unauthorized"}
    for method, path in [("POST", "/v1/completions"), ("POST", "/v1/chat/completions"),
                         ("GET", "/v1/models")]:
        resp = await client.request(method, path, json={"prompt": PROMPT}, headers=headers)
        assert resp.status == 401
        body = await resp.json()
        assert body["error"]["type"] == "unauthorized" and body["error_type"] == "unauthorized"
    assert engine.requests == []


async def test_public_routes_need_no_key(keyed):
    client, _ = await keyed()
    assert (await client.get("/health")).status == 200
    client, _ = await keyed(server={"public_routes": ("/health", "/info")})
    assert (await client.get("/info")).status == 200
    assert (await client.get("/metrics")).status == 401


async def test_a_valid_key_passes_and_adapters_follow_its_patterns(keyed):
    client, engine = await keyed()
    resp = await post_generate(client, headers=bearer(KEY_A))
    assert resp.status == 200 and (await resp.json())["generated_text"] == "Hello world"
    for adapter in ("team-a/x", "shared-1"):
        resp = await post_generate(client, {"adapter_id": adapter}, headers=bearer(KEY_A))
        assert resp.status == 200
    n = len(engine.requests)
    for key, params, what in [
        (KEY_A, {"adapter_id": "team-b/x"}, "'team-a' may not use adapter 'team-b/x'"),
        (KEY_A, {"adapter_id": "Team-a/x"}, "may not use adapter"),  # patterns are exact
        (KEY_A, {"merged_adapters": {"ids": ["team-a/x", "other"], "weights": [1, 1]}},
         "may not use adapter 'other'"),
        (KEY_B, {"adapter_id": "team-a/x"}, "'base-only' may not use adapter"),
        (KEY_C, {}, "'no-base' may not use the base model"),
    ]:
        resp = await post_generate(client, params, headers=bearer(key))
        assert resp.status == 403, params
        body = await resp.json()
        assert body["error_type"] == "forbidden" and what in body["error"]
        events = await (await post_generate(client, params, path="/generate_stream",
                                            headers=bearer(key))).text()
        assert '"error_type":"forbidden"' in events
    assert len(engine.requests) == n  # nothing refused reached the engine
    resp = await post_generate(client, {"adapter_id": "any/x"}, headers=bearer(KEY_C))
    assert resp.status == 200


async def test_with_keys_the_bearer_is_never_a_hub_token(keyed, serve):  # noqa: F811
    client, engine = await keyed()
    await post_generate(client, {"adapter_id": "team-a/x"}, headers=bearer(KEY_A))
    await post_generate(client, {"adapter_id": "team-a/x", "api_token": "hf_own"},
                        headers=bearer(KEY_A))
    assert [r.adapter for r in engine.requests] == [AdapterRef("team-a/x", "hub", None),
                                                    AdapterRef("team-a/x", "hub", "hf_own")]
    client, engine = await serve()  # without keys: LoRAX's fallback stays
    await post_generate(client, {"adapter_id": "me/x"}, headers=bearer("hf_header"))
    assert engine.requests[0].adapter == AdapterRef("me/x", "hub", "hf_header")


async def test_openai_client_with_and_without_keys(keyed, serve):  # noqa: F811
    client, engine = await keyed()
    url = f"{base_url(client)}/v1"
    async with openai.AsyncOpenAI(base_url=url, api_key=KEY_A, max_retries=0) as oc:
        resp = await oc.completions.create(model="fake/base", prompt=PROMPT)
        assert resp.choices[0].text == "Hello world"
        resp = await oc.completions.create(model="team-a/x", prompt=PROMPT)
        assert engine.requests[-1].adapter == AdapterRef("team-a/x", "hub", None)
        with pytest.raises(openai.PermissionDeniedError, match="may not use adapter"):
            await oc.completions.create(model="team-b/x", prompt=PROMPT)
    async with openai.AsyncOpenAI(base_url=url, api_key="sk-wrong", max_retries=0) as oc:
        with pytest.raises(openai.AuthenticationError, match="valid API key"):
            await oc.completions.create(model="fake/base", prompt=PROMPT)
    client, _ = await serve()
    async with openai.AsyncOpenAI(base_url=f"{base_url(client)}/v1", api_key="anything",
                                  max_retries=0) as oc:
        resp = await oc.completions.create(model="fake/base", prompt=PROMPT)
        assert resp.choices[0].text == "Hello world"


async def test_models_lists_only_what_the_key_may_use(keyed):
    engine = FakeEngine()
    entries = {k: type("E", (), {"ref": AdapterRef(k, "hub", None)})()
               for k in ("team-a/x", "team-b/y", "shared-z")}
    engine.adapters = type("M", (), {"entries": entries})()
    client, _ = await keyed(engine)
    ids = [m["id"] for m in (await (await client.get("/v1/models", headers=bearer(KEY_A))
                                    ).json())["data"]]
    assert ids == ["fake/base", "team-a/x", "shared-z"]


async def test_reload_swaps_the_keys_and_a_bad_file_keeps_them(keyed, tmp_path):
    client, _ = await keyed()
    app = client.server.app
    path = tmp_path / "keys.toml"
    write_keys(path, f'[[keys]]\nname = "new"\nsha256 = "{sha("sk-new")}"\nadapters = ["*"]\n')
    assert (await client.get("/info", headers=bearer(KEY_A))).status == 200
    assert reload(app) is True
    assert (await client.get("/info", headers=bearer(KEY_A))).status == 401
    assert (await client.get("/info", headers=bearer("sk-new"))).status == 200
    write_keys(path, "[[keys]\n")
    assert reload(app) is False
    assert (await client.get("/info", headers=bearer("sk-new"))).status == 200
    assert [k.name for k in app[KEYRING_KEY].keys] == ["new"]
