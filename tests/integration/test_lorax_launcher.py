"""A daemon configured the way a LoRAX deployment is, through LoRAX's environment names: the
settings reach it, the default adapter serves requests that name none, and /metrics, read
with prometheus-client's parser, carries every series after real requests."""
from __future__ import annotations

from pathlib import Path

import pytest
import requests
from prometheus_client.parser import text_string_to_metric_families

from tests.integration.daemon import Daemon
from tests.integration.test_service import write_adapter
from tests.unit.test_metrics import (ADAPTER_SERIES, GATEWAY_GAUGES, LORAX_COUNTERS,
                                     LORAX_GAUGES, LORAX_HISTOGRAMS)

pytestmark = pytest.mark.integration


@pytest.fixture(scope="module")
def daemon(default_model_dir, tmp_path_factory):
    tmp = tmp_path_factory.mktemp("lorax-env")
    write_adapter(tmp / "adapters", default_model_dir, "tiny")
    socket_path = tmp / "sockets" / "lorax-server"
    env = {"ADAPTER_ID": "tiny", "ADAPTER_SOURCE": "local",
           "LORAXD_LOCAL_ADAPTER_DIRS": str(tmp / "adapters"), "VALIDATION_WORKERS": "2",
           "MAX_INPUT_LENGTH": "700", "MAX_BEST_OF": "3", "SHARD_UDS_PATH": str(socket_path),
           "DISABLE_CUSTOM_KERNELS": "true", "HOSTNAME": "not-an-address"}
    d = Daemon(default_model_dir, tmp, env=env).wait_ready()
    d.socket_path = socket_path
    yield d
    d.stop()


def test_lorax_environment_names_reach_the_daemon(daemon):
    info = requests.get(daemon.url + "/info", timeout=10).json()
    assert (info["validation_workers"], info["max_input_length"], info["max_best_of"]) == \
        (2, 700, 3)
    assert info["adapter_source"] == "local"
    assert Path(daemon.socket_path).is_socket()


def test_the_default_adapter_serves_requests_that_name_none(daemon):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 4, "details": True}}
    resp = requests.post(daemon.url + "/generate", json=body, timeout=60)
    assert resp.status_code == 200 and resp.headers["x-adapter-id"] == "tiny"


def test_metrics_carry_every_series(daemon):
    body = {"inputs": "Hello", "parameters": {"max_new_tokens": 3}}
    assert requests.post(daemon.url + "/generate", json=body, timeout=60).status_code == 200
    bad = {"inputs": "Hello", "parameters": {"temperature": -1}}
    assert requests.post(daemon.url + "/generate", json=bad, timeout=60).status_code == 422
    text = requests.get(daemon.url + "/metrics", timeout=10).text
    fams = {f.name: f for f in text_string_to_metric_families(text)}
    kinds = {**{n: "counter" for n in LORAX_COUNTERS}, **{n: "histogram" for n in LORAX_HISTOGRAMS},
             **{n: "gauge" for n in LORAX_GAUGES + GATEWAY_GAUGES}, **ADAPTER_SERIES}
    assert {n: fams[n].type for n in kinds if n in fams} == kinds

    def sample(name, suffix="", **labels):
        return next(s.value for s in fams[name].samples if s.name == name + suffix
                    and all(s.labels.get(k) == v for k, v in labels.items()))
    assert sample("lorax_request_success", "_total") >= 1
    assert sample("lorax_request_failure", "_total", err="validation") == 1
    assert sample("lorax_batch_inference_success", "_total", method="prefill") >= 1
    assert sample("lorax_batch_inference_success", "_total", method="decode") >= 1
    assert sample("loraxd_adapter_requests", "_total", adapter="tiny", outcome="success") >= 1
    assert sample("loraxd_adapter_tier", adapter="tiny", tier="device") == 1
    assert sample("loraxd_adapter_load_duration_seconds", "_count", stage="load") >= 1
    assert sample("loraxd_adapter_load_duration_seconds", "_count", stage="fetch") >= 1
    assert sample("vllm:num_requests_running") == 0
