"""schemathesis against the real daemon's /openapi.json, with an API key: no 500, every
answer as documented, schema-invalid bodies refused; the daemon healthy afterwards. Bounded:
a few examples per operation, short generations (small token limits), adapters that fail
fast (no network)."""
from __future__ import annotations

import hashlib

import pytest
import requests

from tests.integration.daemon import Daemon
from tests.unit.test_http_openapi import fuzz

pytestmark = pytest.mark.integration

KEY = "sk-fuzz-0123456789abcdef"
OFFLINE = {"HF_HUB_OFFLINE": "1", "AWS_EC2_METADATA_DISABLED": "true",
           "AWS_ENDPOINT_URL": "http://127.0.0.1:9", "AWS_ACCESS_KEY_ID": "none",
           "AWS_SECRET_ACCESS_KEY": "none", "AWS_MAX_ATTEMPTS": "1"}


@pytest.fixture(scope="module")
def daemon(default_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("fuzz")
    keys = tmp / "keys.toml"
    digest = hashlib.sha256(KEY.encode()).hexdigest()
    keys.write_text(f'[[keys]]\nname = "fuzz"\nsha256 = "{digest}"\nadapters = ["*"]\n')
    d = Daemon(default_model_dir, tmp, "--api-keys-file", str(keys),
               "--max-input-length", "6", "--max-total-tokens", "10",
               "--local-adapter-dir", str(tmp), env=OFFLINE)
    try:
        yield d.wait_ready()
    finally:
        d.stop()


def test_schemathesis_against_the_daemon(daemon):
    auth = {"Authorization": f"Bearer {KEY}"}
    assert fuzz(daemon.url, headers=auth, max_examples=10) > 80
    assert daemon.proc.poll() is None
    assert requests.get(daemon.url + "/health", timeout=60).status_code == 200
    metrics = requests.get(daemon.url + "/metrics", timeout=10,
                           headers={**auth, "Accept": "application/json"}).json()
    assert metrics["num_requests_running"] == 0 and metrics["kv_cache_usage"] == 0.0
    assert "Traceback" not in daemon.log()
