"""The HTTP door of the real daemon: API keys and their reload on SIGHUP, a streaming client
that stops reading, a request head trickled in (slowloris)."""
from __future__ import annotations

import hashlib
import json
import signal
import socket
import time

import pytest
import requests

from tests.integration.daemon import Daemon

pytestmark = pytest.mark.integration

KEY_A, KEY_B = "sk-door-a-0123456789abcdef", "sk-door-b-fedcba9876543210"


def keys_toml(*entries: tuple[str, str, list[str]]) -> str:
    tables = []
    for name, key, adapters in entries:
        digest = hashlib.sha256(key.encode()).hexdigest()
        tables.append(f'[[keys]]\nname = "{name}"\nsha256 = "{digest}"\n'
                      f"adapters = {json.dumps(adapters)}\n")
    return "\n".join(tables)


@pytest.fixture(scope="module")
def door(default_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("door")
    keys = tmp / "keys.toml"
    keys.write_text(keys_toml(("team-a", KEY_A, ["team-a/*"])))
    d = Daemon(default_model_dir, tmp, "--api-keys-file", str(keys),
               "--public-route", "/health", "--public-route", "/metrics",
               "--stream-write-timeout-s", "2", "--header-read-timeout-s", "2",
               env={"HF_HUB_OFFLINE": "1"})
    d.keys_path = keys
    try:
        yield d.wait_ready()
    finally:
        d.stop()


def bearer(key: str) -> dict:
    return {"Authorization": f"Bearer {key}"}


def generate(door, key: str | None, **params) -> requests.Response:
    return requests.post(door.url + "/generate", timeout=120,
                         headers=bearer(key) if key else {},
                         json={"inputs": "Hello", "parameters": {"max_new_tokens": 2, **params}})


def metrics(door) -> dict:
    r = requests.get(door.url + "/metrics", headers={"Accept": "application/json"}, timeout=10)
    assert r.status_code == 200
    return r.json()


def test_keys_401_403_200_and_reload_on_sighup(door):
    assert generate(door, None).status_code == 401
    assert generate(door, KEY_B).status_code == 401
    assert requests.get(door.url + "/info", timeout=10).status_code == 401
    assert generate(door, KEY_A).status_code == 200
    r = generate(door, KEY_A, adapter_id="team-b/x")
    assert r.status_code == 403 and r.json()["error_type"] == "forbidden"
    r = generate(door, KEY_A, adapter_id="team-a/x")  # past the door; the hub is offline
    assert r.status_code == 424

    door.keys_path.write_text(keys_toml(("team-b", KEY_B, ["*"])))
    door.proc.send_signal(signal.SIGHUP)
    deadline = time.monotonic() + 30
    while generate(door, KEY_B).status_code != 200:
        assert time.monotonic() < deadline, door.log()
        time.sleep(0.2)
    assert generate(door, KEY_A).status_code == 401

    door.keys_path.write_text("[[keys]\n")  # a broken file keeps the keys in force
    door.proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    assert door.proc.poll() is None
    assert generate(door, KEY_B).status_code == 200


def test_a_stream_nobody_reads_is_dropped_within_the_write_timeout(door):
    door.keys_path.write_text(keys_toml(("team-b", KEY_B, ["*"])))
    door.proc.send_signal(signal.SIGHUP)
    time.sleep(1.0)
    body = json.dumps({"inputs": "Once upon a time", "parameters": {
        "max_new_tokens": 1900, "ignore_eos_token": True, "details": True,
        "return_k_alternatives": 20}}).encode()
    sock = socket.socket()
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)  # a tiny window, never read
    sock.connect(("127.0.0.1", door.port))
    start = time.monotonic()
    sock.sendall(b"POST /generate_stream HTTP/1.1\r\nHost: x\r\nContent-Type: application/json"
                 b"\r\nAuthorization: Bearer " + KEY_B.encode() + b"\r\n"
                 b"Content-Length: %d\r\n\r\n" % len(body) + body)
    while (first := metrics(door))["num_requests_running"] == 0:
        assert time.monotonic() - start < 60, door.log()
        time.sleep(0.1)
    # ~1 kB per token: the socket buffers hold some tens of tokens, then the client has
    # taken nothing for the write timeout (2 s) and is dropped, long before 1900 tokens.
    while (m := metrics(door))["num_requests_running"] > 0:
        assert m["num_steps"] - first["num_steps"] < 400, "the stalled stream was not dropped"
        assert time.monotonic() - start < 240, "the stalled stream was not dropped"
        time.sleep(0.2)
    assert m["num_requests_waiting"] == 0 and m["kv_cache_usage"] == 0.0  # pages freed
    assert "dropped" in door.log()
    sock.settimeout(10)
    read_to_end(sock)  # the server closed the connection: nothing hangs
    sock.close()
    assert generate(door, KEY_B).status_code == 200  # the daemon serves on


def read_to_end(sock: socket.socket) -> None:
    try:
        while sock.recv(65536):
            pass
    except ConnectionResetError:
        pass


def test_a_request_head_trickled_in_is_cut_off(door):
    sock = socket.create_connection(("127.0.0.1", door.port))
    start = time.monotonic()
    closed = False
    for byte in b"POST /generate HTTP/1.1\r\nHost: x\r\nX-Slow: " + b"a" * 200:
        try:
            sock.sendall(bytes([byte]))
        except (BrokenPipeError, ConnectionResetError):
            closed = True
            break
        time.sleep(0.1)  # 20 s for the whole head
    assert closed and time.monotonic() - start < 6
    sock.close()
    assert requests.get(door.url + "/health", timeout=30).status_code == 200
