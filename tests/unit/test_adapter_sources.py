"""Adapter sources: local directories, the hub cache (offline), S3 (moto on loopback), pbase."""
from __future__ import annotations

import importlib
import json
import sys
import threading
import time
from pathlib import Path
from types import SimpleNamespace

import pytest

from loraxd.adapters.sources import AdapterFetchError, AdapterSources


def make_adapter(path: Path, *, weights: bool = True, config: bool = True) -> Path:
    path.mkdir(parents=True, exist_ok=True)
    if config:
        (path / "adapter_config.json").write_text(json.dumps({"peft_type": "LORA", "r": 2}))
    if weights:
        (path / "adapter_model.safetensors").write_bytes(b"\x00" * 8)
    return path


def sources_for(tmp_path: Path, *local_dirs: Path, hub_cache: Path | None = None) -> AdapterSources:
    return AdapterSources(local_adapter_dirs=tuple(str(d) for d in local_dirs),
                          cache_dir=str(tmp_path / "cache"),
                          hub_cache=str(hub_cache) if hub_cache else None)


# -- local ---------------------------------------------------------------------------------


@pytest.fixture
def local_dirs(tmp_path):
    first, second = tmp_path / "first", tmp_path / "second"
    make_adapter(first / "shared")
    make_adapter(first / "only-first")
    make_adapter(second / "shared")
    make_adapter(second / "org" / "only-second")
    (second / "no-config").mkdir()
    make_adapter(second / "no-weights", weights=False)
    make_adapter(tmp_path / "outside")
    return first, second


def test_local_name_lookup_across_two_dirs(tmp_path, local_dirs):
    first, second = local_dirs
    sources = sources_for(tmp_path, first, second)
    assert sources.fetch("local", "shared", None) == (first / "shared").resolve()
    assert sources.fetch("local", "only-first", None) == (first / "only-first").resolve()
    assert sources.fetch("local", "org/only-second", None) == \
        (second / "org" / "only-second").resolve()
    sources.authorize("local", "shared", None)  # local adapters need no token


def test_local_absolute_path_inside_is_accepted(tmp_path, local_dirs):
    first, second = local_dirs
    sources = sources_for(tmp_path, first, second)
    path = str(second / "org" / "only-second")
    assert sources.fetch("local", path, None) == Path(path).resolve()


@pytest.mark.parametrize("adapter_id, why", [
    ("../outside", "escapes"),
    ("shared/../../outside", "escapes"),
    ("missing", "no such adapter"),
    ("no-config", "no adapter_config.json"),
    ("no-weights", "no adapter weights"),
    ("bad\x00name", "NUL byte"),
    ("", "empty"),
])
def test_local_refusals(tmp_path, local_dirs, adapter_id, why):
    sources = sources_for(tmp_path, *local_dirs)
    with pytest.raises(AdapterFetchError, match=why) as info:
        sources.fetch("local", adapter_id, None)
    assert "(source local)" in str(info.value) and "\n" not in str(info.value)


def test_local_refuses_a_symlink_pointing_outside(tmp_path, local_dirs):
    first, _ = local_dirs
    (first / "sneaky").symlink_to(tmp_path / "outside", target_is_directory=True)
    with pytest.raises(AdapterFetchError, match="escapes"):
        sources_for(tmp_path, first).fetch("local", "sneaky", None)


@pytest.mark.parametrize("name", ["adapter_model.safetensors", "adapter_config.json"])
def test_local_refuses_a_file_linked_outside(tmp_path, local_dirs, name):
    """The directory is inside, but a file the worker would read links out of the dirs."""
    first, second = local_dirs
    adapter = make_adapter(first / "linked")
    (adapter / name).unlink()
    (adapter / name).symlink_to(tmp_path / "outside" / name)
    with pytest.raises(AdapterFetchError, match=f"{name} resolves to a file outside the "
                                                "adapter directories"):
        sources_for(tmp_path, first, second).fetch("local", "linked", None)
    (adapter / name).unlink()
    (adapter / name).symlink_to(second / "shared" / name)  # into another adapter dir: fine
    assert sources_for(tmp_path, first, second).fetch("local", "linked", None) == adapter


def test_roots_are_per_source(tmp_path, local_dirs):
    sources = sources_for(tmp_path, *local_dirs, hub_cache=tmp_path / "hub")
    assert sources.roots("local") == [str(d) for d in local_dirs]
    assert sources.roots("hub") == [str(tmp_path / "hub")]
    assert sources.roots("s3") == [str(tmp_path / "cache" / "adapters" / "s3")]


def test_local_refuses_an_absolute_path_outside(tmp_path, local_dirs):
    sources = sources_for(tmp_path, *local_dirs)
    with pytest.raises(AdapterFetchError, match="outside the local adapter directories"):
        sources.fetch("local", str(tmp_path / "outside"), None)
    with pytest.raises(AdapterFetchError, match="outside"):  # `..` inside an absolute path
        sources.fetch("local", str(local_dirs[0] / ".." / "outside"), None)


def test_local_without_configured_dirs(tmp_path):
    with pytest.raises(AdapterFetchError,
                       match=r"no local adapter directories are configured \(local_adapter_dirs\)"):
        sources_for(tmp_path).fetch("local", "anything", None)


# -- hub -----------------------------------------------------------------------------------


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """An offline hub with its cache in tmp_path; returns the cache directory."""
    from huggingface_hub import constants
    from huggingface_hub.utils import close_session
    monkeypatch.setenv("HF_HUB_OFFLINE", "1")
    monkeypatch.setattr(constants, "HF_HUB_OFFLINE", True)
    monkeypatch.delenv("HF_TOKEN", raising=False)
    monkeypatch.setenv("HF_HOME", str(tmp_path / "hf-home"))
    close_session()
    yield tmp_path / "hub-cache"
    monkeypatch.undo()
    close_session()


def cache_adapter(hub_cache: Path, repo_id: str, sha: str = "a" * 40) -> Path:
    repo = hub_cache / ("models--" + repo_id.replace("/", "--"))
    (repo / "refs").mkdir(parents=True, exist_ok=True)
    (repo / "refs" / "main").write_text(sha)
    return make_adapter(repo / "snapshots" / sha)


def hub_http():
    """The HTTP library of the installed hub client: httpx for huggingface_hub 1.x, httpx2
    for 2.x."""
    from huggingface_hub import errors
    return importlib.import_module(errors.Response.__module__)


def hub_error(status: int, cls: type | None = None) -> Exception:
    """A hub error (HfHubHTTPError or a subclass) as the hub client raises it, with the HTTP
    response it came with."""
    from huggingface_hub import errors
    http = hub_http()
    request = http.Request("GET", "https://huggingface.co/api/models/ns/x")
    return (cls or errors.HfHubHTTPError)(f"{status} Client Error",
                                          response=http.Response(status, request=request))


class FakeHub:
    """`HfApi.model_info` stand-in: which tokens may see which repositories."""

    def __init__(self, monkeypatch, access: dict[str, set]):
        from huggingface_hub import HfApi
        self.access = access  # repo id -> tokens allowed (None: the server's own credentials)
        self.calls: list[tuple[str, str | None]] = []
        monkeypatch.setattr(HfApi, "model_info",
                            lambda _api, *args, **kwargs: self.model_info(*args, **kwargs))

    def model_info(self, repo_id, *, token=None, timeout=None, **_):
        from huggingface_hub.errors import RepositoryNotFoundError
        self.calls.append((repo_id, token))
        if token not in self.access.get(repo_id, ()):
            raise hub_error(404, RepositoryNotFoundError)
        return SimpleNamespace(id=repo_id, gated=False)


def test_hub_cached_adapter_is_found_offline(tmp_path, hub, monkeypatch):
    snapshot = cache_adapter(hub, "ns/cached")
    FakeHub(monkeypatch, {"ns/cached": {None}})
    sources = sources_for(tmp_path, hub_cache=hub)
    assert sources.fetch("hub", "ns/cached", None) == snapshot
    sources.authorize("hub", "ns/cached", None)


def test_hub_uncached_adapter_fails_fast_and_clearly(tmp_path, hub):
    sources = sources_for(tmp_path, hub_cache=hub)
    started = time.monotonic()
    with pytest.raises(AdapterFetchError,
                       match="the hub is unreachable and the adapter is not cached") as info:
        sources.fetch("hub", "ns/not-cached", None)
    assert time.monotonic() - started < 5
    assert str(info.value).startswith("adapter 'ns/not-cached' (source hub): ")


@pytest.mark.parametrize("adapter_id", ["a/b/c", "../etc", "ns/x--y", "ns/", "/abs", "ns/na me"])
def test_hub_rejects_malformed_repo_ids(tmp_path, hub, adapter_id):
    with pytest.raises(AdapterFetchError, match="not a hub repository id"):
        sources_for(tmp_path, hub_cache=hub).fetch("hub", adapter_id, None)


def test_hub_private_adapter_needs_an_authorised_token(tmp_path, hub, monkeypatch):
    cache_adapter(hub, "ns/private")
    fake = FakeHub(monkeypatch, {"ns/private": {"good", "other-good"}})
    sources = sources_for(tmp_path, hub_cache=hub)
    sources.fetch("hub", "ns/private", "good")
    assert fake.calls == [("ns/private", None)]  # anonymous access fails: private

    sources.authorize("hub", "ns/private", "good")
    sources.authorize("hub", "ns/private", "good")  # cached: one hub check in all
    assert fake.calls.count(("ns/private", "good")) == 1
    for token in ("bad", None, ""):
        with pytest.raises(AdapterFetchError,
                           match="is private and this request's token is not authorised"):
            sources.authorize("hub", "ns/private", token)
    assert ("ns/private", None) not in fake.calls[1:]  # no token: refused without asking
    sources.authorize("hub", "ns/private", "other-good")

    # Ten minutes later the token is checked again; a revoked token is refused.
    access = sources.hub.access
    now = time.monotonic()
    monkeypatch.setattr(access, "_clock", lambda: now + 601)
    fake.access["ns/private"].discard("good")
    with pytest.raises(AdapterFetchError, match="not authorised"):
        sources.authorize("hub", "ns/private", "good")


def test_hub_private_verdict_survives_a_restart(tmp_path, hub, monkeypatch):
    cache_adapter(hub, "ns/private")
    fake = FakeHub(monkeypatch, {"ns/private": {"good"}})
    sources_for(tmp_path, hub_cache=hub).fetch("hub", "ns/private", "good")
    restarted = sources_for(tmp_path, hub_cache=hub)  # same cache_dir, fresh memory
    with pytest.raises(AdapterFetchError, match="not authorised"):
        restarted.authorize("hub", "ns/private", None)
    restarted.authorize("hub", "ns/private", "good")
    assert fake.calls[-1] == ("ns/private", "good")


def test_hub_public_adapter_needs_no_token(tmp_path, hub, monkeypatch):
    cache_adapter(hub, "ns/public")
    fake = FakeHub(monkeypatch, {"ns/public": {None, "good"}})
    sources = sources_for(tmp_path, hub_cache=hub)
    sources.fetch("hub", "ns/public", "good")
    for token in (None, "anything"):
        sources.authorize("hub", "ns/public", token)
    assert fake.calls == [("ns/public", None)]


def test_hub_unfetched_adapter_passes_authorize(tmp_path, hub, monkeypatch):
    fake = FakeHub(monkeypatch, {})
    sources_for(tmp_path, hub_cache=hub).authorize("hub", "ns/unknown", None)
    assert fake.calls == []


class FakeDownload:
    """`snapshot_download` stand-in: an empty cache, then a hub that serves `allowed` tokens."""

    def __init__(self, monkeypatch, hub_cache: Path, allowed: set, error=None):
        import huggingface_hub
        self.hub_cache, self.allowed, self.error = hub_cache, allowed, error
        self.tokens: list = []
        monkeypatch.setattr(huggingface_hub, "snapshot_download", self)

    def __call__(self, repo_id, *, token, cache_dir, local_files_only, allow_patterns):
        from huggingface_hub.errors import LocalEntryNotFoundError, RepositoryNotFoundError
        assert "adapter_config.json" in allow_patterns and Path(cache_dir) == self.hub_cache
        if local_files_only:
            raise LocalEntryNotFoundError("not cached")
        self.tokens.append(token)
        if self.error is not None and token in self.error[0]:
            raise self.error[1]
        if token not in self.allowed:
            raise hub_error(404, RepositoryNotFoundError)
        return str(cache_adapter(self.hub_cache, repo_id))


def test_hub_download_with_a_token_marks_a_private_adapter(tmp_path, hub, monkeypatch):
    download = FakeDownload(monkeypatch, hub, allowed={"good"})
    fake = FakeHub(monkeypatch, {"ns/private": {"good"}})
    sources = sources_for(tmp_path, hub_cache=hub)
    sources.fetch("hub", "ns/private", "good")
    assert download.tokens == ["good"]
    sources.authorize("hub", "ns/private", "good")  # verified by the download itself
    assert fake.calls == [("ns/private", None)]
    with pytest.raises(AdapterFetchError, match="not authorised"):
        sources.authorize("hub", "ns/private", None)


def test_hub_download_without_a_token_is_public(tmp_path, hub, monkeypatch):
    FakeDownload(monkeypatch, hub, allowed={None})
    fake = FakeHub(monkeypatch, {})
    sources = sources_for(tmp_path, hub_cache=hub)
    sources.fetch("hub", "ns/public", None)
    sources.authorize("hub", "ns/public", None)
    assert fake.calls == []


def test_hub_rejected_token_falls_back_to_server_credentials(tmp_path, hub, monkeypatch):
    download = FakeDownload(monkeypatch, hub, allowed={None},
                            error=({"EMPTY"}, hub_error(401)))
    FakeHub(monkeypatch, {})
    sources = sources_for(tmp_path, hub_cache=hub)
    sources.fetch("hub", "ns/public", "EMPTY")
    assert download.tokens == ["EMPTY", None]
    sources.authorize("hub", "ns/public", None)


def test_hub_errors_are_named(tmp_path, hub, monkeypatch):
    from huggingface_hub.errors import GatedRepoError
    sources = sources_for(tmp_path, hub_cache=hub)
    FakeDownload(monkeypatch, hub, allowed=set())
    with pytest.raises(AdapterFetchError, match="not found on the hub, or it is private"):
        sources.fetch("hub", "ns/missing", "tok")
    FakeDownload(monkeypatch, hub, allowed=set(), error=({"tok"}, hub_error(403, GatedRepoError)))
    with pytest.raises(AdapterFetchError, match="gated"):
        sources.fetch("hub", "ns/gated", "tok")
    FakeDownload(monkeypatch, hub, allowed=set(), error=({None}, hub_error(401)))
    with pytest.raises(AdapterFetchError, match="unauthorized"):
        sources.fetch("hub", "ns/x", None)
    FakeDownload(monkeypatch, hub, allowed=set(), error=({"bad"}, hub_error(401)))
    with pytest.raises(AdapterFetchError, match="unauthorized: the hub rejected the token"):
        sources.fetch("hub", "ns/private", "bad")  # and the server's credentials see nothing
    FakeDownload(monkeypatch, hub, allowed=set(), error=({None}, hub_error(503)))
    with pytest.raises(AdapterFetchError, match="HTTP 503"):
        sources.fetch("hub", "ns/x", None)
    FakeDownload(monkeypatch, hub, allowed=set(),
                 error=({None}, hub_http().ConnectError("connection refused")))
    with pytest.raises(AdapterFetchError, match="the hub is unreachable"):
        sources.fetch("hub", "ns/x", None)


# -- s3 ------------------------------------------------------------------------------------


@pytest.fixture(scope="module")
def moto_endpoint():
    server_mod = pytest.importorskip("moto.server")
    server = server_mod.ThreadedMotoServer(ip_address="127.0.0.1", port=0, verbose=False)
    server.start()
    host, port = server.get_host_and_port()
    yield f"http://{host}:{port}"
    server.stop()


@pytest.fixture
def s3(moto_endpoint, tmp_path, monkeypatch):
    """A boto3 client for a fresh bucket holding one adapter under `adapters/tiny`."""
    boto3 = pytest.importorskip("boto3")
    for name, value in {"AWS_ENDPOINT_URL": moto_endpoint, "AWS_ACCESS_KEY_ID": "testing",
                        "AWS_SECRET_ACCESS_KEY": "testing", "AWS_DEFAULT_REGION": "us-east-1",
                        "AWS_CONFIG_FILE": str(tmp_path / "no-aws-config"),
                        "AWS_SHARED_CREDENTIALS_FILE": str(tmp_path / "no-aws-credentials")
                        }.items():
        monkeypatch.setenv(name, value)
    for name in ("AWS_PROFILE", "AWS_SESSION_TOKEN"):
        monkeypatch.delenv(name, raising=False)
    client = boto3.session.Session().client("s3")
    bucket = f"bucket-{tmp_path.name.lower().replace('_', '-')}"[:63]
    client.create_bucket(Bucket=bucket)
    client.put_object(Bucket=bucket, Key="adapters/tiny/adapter_config.json",
                      Body=json.dumps({"peft_type": "LORA", "r": 2}).encode())
    client.put_object(Bucket=bucket, Key="adapters/tiny/adapter_model.safetensors", Body=b"w" * 8)
    client.put_object(Bucket=bucket, Key="adapters/tiny/README.md", Body=b"not needed")
    client.put_object(Bucket=bucket, Key="adapters/tiny/checkpoint-1/adapter_config.json",
                      Body=b"{}")
    client.put_object(Bucket=bucket, Key="adapters/no-weights/adapter_config.json", Body=b"{}")
    return SimpleNamespace(client=client, bucket=bucket)


def test_s3_fetch_downloads_the_adapter_files_and_reuses_them(tmp_path, s3):
    sources = sources_for(tmp_path)
    path = sources.fetch("s3", f"s3://{s3.bucket}/adapters/tiny", None)
    assert sorted(p.name for p in path.iterdir()) == ["adapter_config.json",
                                                      "adapter_model.safetensors"]
    assert path.is_relative_to(tmp_path / "cache" / "adapters" / "s3" / s3.bucket)
    assert (path / "adapter_model.safetensors").read_bytes() == b"w" * 8
    sources.authorize("s3", f"{s3.bucket}/adapters/tiny", None)

    for key in ("adapter_config.json", "adapter_model.safetensors"):  # S3 is no longer needed
        s3.client.delete_object(Bucket=s3.bucket, Key=f"adapters/tiny/{key}")
    assert sources.fetch("s3", f"{s3.bucket}/adapters/tiny/", None) == path
    assert not [p for p in path.parent.iterdir() if p.name.startswith(".tmp-")]


def test_s3_weights_over_max_adapter_bytes_are_not_downloaded(tmp_path, s3):
    sources = AdapterSources(local_adapter_dirs=(), cache_dir=str(tmp_path / "cache"),
                             hub_cache=None, max_adapter_bytes=7)
    with pytest.raises(AdapterFetchError, match=r"adapter_model.safetensors is 8 bytes, more "
                                                r"than max_adapter_bytes \(7\)"):
        sources.fetch("s3", f"{s3.bucket}/adapters/tiny", None)
    assert not (tmp_path / "cache" / "adapters" / "s3" / s3.bucket / "adapters%2Ftiny").exists()


def test_s3_concurrent_fetches_share_one_entry(tmp_path, s3):
    sources = sources_for(tmp_path)
    results: list = []

    def fetch():
        results.append(sources.fetch("s3", f"{s3.bucket}/adapters/tiny", None))

    threads = [threading.Thread(target=fetch) for _ in range(4)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(results) == 4 and len(set(results)) == 1
    assert (results[0] / "adapter_model.safetensors").read_bytes() == b"w" * 8
    assert not [p for p in results[0].parent.iterdir() if p.name.startswith(".tmp-")]


@pytest.mark.parametrize("location, why", [
    ("{bucket}/adapters/missing", "no objects under"),
    ("{bucket}/adapters/no-weights", "no adapter weights"),
    ("s3://no-such-bucket-here/x", "does not exist"),
    ("s3://{bucket}", "needs a prefix"),
    ("{bucket}/adapters/../tiny", "needs a prefix"),
    ("s3://bad_bucket!/x", "not an S3 location"),
])
def test_s3_errors_are_named(tmp_path, s3, location, why):
    with pytest.raises(AdapterFetchError, match=why) as info:
        sources_for(tmp_path).fetch("s3", location.format(bucket=s3.bucket), None)
    assert "(source s3)" in str(info.value)


def test_s3_without_boto3(tmp_path, monkeypatch):
    monkeypatch.setitem(sys.modules, "boto3", None)
    with pytest.raises(AdapterFetchError, match="boto3 is not installed"):
        sources_for(tmp_path).fetch("s3", "bucket/adapter", None)


# -- pbase and unknown sources -------------------------------------------------------------


def test_pbase_is_refused(tmp_path):
    sources = sources_for(tmp_path)
    message = "adapter source 'pbase' is not supported by loraxd; use hub, local or s3"
    with pytest.raises(AdapterFetchError, match=message):
        sources.fetch("pbase", "some/adapter", None)
    with pytest.raises(AdapterFetchError, match=message):
        sources.authorize("pbase", "some/adapter", None)


def test_unknown_source_is_refused(tmp_path):
    with pytest.raises(AdapterFetchError, match="unknown adapter source"):
        sources_for(tmp_path).fetch("ftp", "x", None)


def test_hub_down_keeps_tokens_verified_before(tmp_path):
    from loraxd.adapters.hub_access import TOKEN_TTL_S, HubAccess
    answers = {None: False, "good": True}
    now = [0.0]
    access = HubAccess(tmp_path / "access", probe=lambda _id, token: answers.get(token),
                       clock=lambda: now[0])
    access.on_downloaded("ns/private", "good")
    assert access.is_private("ns/private")
    now[0] += TOKEN_TTL_S + 1
    answers = {}  # the hub is down: every probe answers None
    access.check("ns/private", "good")
    with pytest.raises(AdapterFetchError, match="the hub is unreachable to verify it"):
        access.check("ns/private", "never-seen")
