"""Every LoRAX launcher flag: accepted (by flag and by LoRAX's environment name, below
LORAXD_*) and taking effect, or refused with its reason."""
from __future__ import annotations

import json
import subprocess
import sys

import pytest

from loraxd import __version__
from loraxd.config import ConfigError, load
from loraxd.daemon.model_files import ModelNotFound, resolve_model

# flag, LoRAX env name, text value, (section, key), parsed value
SETTINGS = [
    ("--model-id", "MODEL_ID", "org/model", ("model", "model_id"), "org/model"),
    ("--adapter-id", "ADAPTER_ID", "org/adapter", ("adapters", "adapter_id"), "org/adapter"),
    ("--source", "SOURCE", "local", ("model", "source"), "local"),
    ("--adapter-source", "ADAPTER_SOURCE", "s3", ("adapters", "adapter_source"), "s3"),
    ("--revision", "REVISION", "v2", ("model", "revision"), "v2"),
    ("--validation-workers", "VALIDATION_WORKERS", "3", ("server", "validation_workers"), 3),
    ("--num-shard", "NUM_SHARD", "2", ("model", "num_shard"), 2),
    ("--dtype", "DTYPE", "bfloat16", ("model", "dtype"), "bfloat16"),
    ("--quantize", "QUANTIZE", "int8-weight-only", ("model", "quantize"), "int8-weight-only"),
    ("--max-concurrent-requests", "MAX_CONCURRENT_REQUESTS", "7",
     ("scheduler", "max_concurrent_requests"), 7),
    ("--max-best-of", "MAX_BEST_OF", "3", ("scheduler", "max_best_of"), 3),
    ("--max-stop-sequences", "MAX_STOP_SEQUENCES", "6", ("scheduler", "max_stop_sequences"), 6),
    ("--max-input-length", "MAX_INPUT_LENGTH", "1792", ("scheduler", "max_input_length"), 1792),
    ("--max-total-tokens", "MAX_TOTAL_TOKENS", "2047", ("scheduler", "max_total_tokens"), 2047),
    ("--waiting-served-ratio", "WAITING_SERVED_RATIO", "0.5",
     ("scheduler", "waiting_served_ratio"), 0.5),
    ("--max-batch-prefill-tokens", "MAX_BATCH_PREFILL_TOKENS", "8192",
     ("scheduler", "max_batch_prefill_tokens"), 8192),
    ("--max-batch-total-tokens", "MAX_BATCH_TOTAL_TOKENS", "65536",
     ("scheduler", "max_batch_total_tokens"), 65536),
    ("--max-waiting-tokens", "MAX_WAITING_TOKENS", "9", ("scheduler", "max_waiting_tokens"), 9),
    ("--cuda-memory-fraction", "CUDA_MEMORY_FRACTION", "0.8",
     ("model", "cuda_memory_fraction"), 0.8),
    ("--max-active-adapters", "MAX_ACTIVE_ADAPTERS", "128", ("adapters", "max_active_adapters"),
     128),
    ("--adapter-cycle-time-s", "ADAPTER_CYCLE_TIME_S", "5", ("adapters", "adapter_cycle_time_s"),
     5.0),
    ("--port", "PORT", "8080", ("server", "port"), 8080),
    ("--shard-uds-path", "SHARD_UDS_PATH", "/tmp/x/lorax-server",
     ("paths", "shard_uds_path"), "/tmp/x/lorax-server"),
    ("--master-addr", "MASTER_ADDR", "10.0.0.1", ("model", "master_addr"), "10.0.0.1"),
    ("--master-port", "MASTER_PORT", "29500", ("model", "master_port"), 29500),
    ("--huggingface-hub-cache", "HUGGINGFACE_HUB_CACHE", "/hub", ("model", "huggingface_hub_cache"),
     "/hub"),
    ("--weights-cache-override", "WEIGHTS_CACHE_OVERRIDE", "/weights",
     ("model", "weights_cache_override"), "/weights"),
    ("--json-output", "JSON_OUTPUT", "true", ("server", "json_output"), True),
    ("--watermark-gamma", "WATERMARK_GAMMA", "0.25", ("worker", "watermark_gamma"), 0.25),
    ("--watermark-delta", "WATERMARK_DELTA", "3.5", ("worker", "watermark_delta"), 3.5),
    ("--cors-allow-origin", "CORS_ALLOW_ORIGIN", "https://a.example",
     ("server", "cors_allow_origin"), ("https://a.example",)),
    ("--otlp-endpoint", "OTLP_ENDPOINT", "http://127.0.0.1:4318",
     ("server", "otlp_endpoint"), "http://127.0.0.1:4318"),
]

REFUSED = [
    ("--quantize", "QUANTIZE", "gptq", "gptq quantization is not built; built: int8-weight-only"),
    ("--trust-remote-code", "TRUST_REMOTE_CODE", None, "its own model code"),
    ("--ngrok", "NGROK", None, "ngrok"),
    ("--ngrok-authtoken", "NGROK_AUTHTOKEN", "tok", "ngrok"),
    ("--ngrok-edge", "NGROK_EDGE", "edge", "ngrok"),
]


def run(argv=(), environ=None):
    env = {"HOME": "/home/u", **(environ or {})}
    return load(list(argv), env, default_config_path="/nonexistent/loraxd.toml", euid=1000)


def setting(config, where):
    section, key = where
    return getattr(getattr(config, section), key)


def _argv(flag, text):
    return [flag] if text == "true" and flag == "--json-output" else [flag, text]


@pytest.mark.parametrize("flag,env,text,where,parsed", SETTINGS, ids=[s[0] for s in SETTINGS])
def test_setting_by_flag_and_by_lorax_env(flag, env, text, where, parsed):
    assert setting(run(_argv(flag, text))[0], where) == parsed
    config, _ = run(environ={env: text})
    assert setting(config, where) == parsed


@pytest.mark.parametrize("env", ["MODEL_ID", "PORT", "MAX_INPUT_LENGTH"])
def test_loraxd_names_win_over_lorax_names(env):
    key = env.lower()
    values = {"MODEL_ID": ("a/lorax", "b/loraxd"), "PORT": ("8080", "9090"),
              "MAX_INPUT_LENGTH": ("100", "200")}[env]
    config, _ = run(environ={env: values[0], "LORAXD_" + env: values[1]})
    section = {"model_id": "model", "port": "server", "max_input_length": "scheduler"}[key]
    assert str(getattr(getattr(config, section), key)) == values[1]


def test_hostname_comes_from_the_flag_never_from_the_shell():
    assert run(environ={"HOSTNAME": "pod-7f9c"})[0].server.hostname == "127.0.0.1"
    assert run(["--hostname", "0.0.0.0"])[0].server.hostname == "0.0.0.0"
    assert run(environ={"LORAXD_HOSTNAME": "0.0.0.0"})[0].server.hostname == "0.0.0.0"


def test_a_bad_lorax_env_value_names_the_variable():
    with pytest.raises(ConfigError, match=r"^environment: MAX_BEST_OF = x: must be an integer"):
        run(environ={"MAX_BEST_OF": "x"})


def test_compile_is_a_setting_refused_where_graphs_cannot_run():
    assert run(["--compile"])[0].model.compile is True
    assert run(environ={"COMPILE": "true"})[0].model.compile is True
    assert run(environ={"COMPILE": "false"})[0].model.compile is False
    assert run()[0].model.compile is False
    with pytest.raises(ConfigError, match=r"^command line: --compile = true: CUDA graphs of the "
                       r"decode step need a GPU \(device = cpu\)"):
        run(["--compile", "--device", "cpu"])
    with pytest.raises(ConfigError, match=r"^environment: COMPILE = true: CUDA graphs with "
                       r"tensor parallelism \(num_shard > 1\) are not built yet"):
        run(["--num-shard", "2"], {"COMPILE": "true"})


def test_sharded_checks_num_shard():
    assert run(["--sharded", "true", "--num-shard", "2"])[0].model.sharded is True
    assert run(environ={"SHARDED": "false"})[0].model.sharded is False
    with pytest.raises(ConfigError, match="sharded = true: needs num_shard over 1"):
        run(["--sharded", "true"])
    with pytest.raises(ConfigError, match="SHARDED = false: needs num_shard 1, which is 4"):
        run(["--num-shard", "4"], {"SHARDED": "false"})


def test_model_sources_beyond_hub_and_local_are_refused():
    with pytest.raises(ConfigError, match="source = s3: only hub and local models"):
        run(["--source", "s3"])
    with pytest.raises(ConfigError, match="SOURCE = pbase: only hub and local"):
        run(environ={"SOURCE": "pbase"})


def test_local_source_never_downloads(tmp_path):
    with pytest.raises(ModelNotFound, match="source is local"):
        resolve_model("org/not-here", revision=None, cache_dir=str(tmp_path), hub_cache=None,
                      source="local")
    (tmp_path / "m").mkdir()
    assert resolve_model(str(tmp_path / "m"), revision=None, cache_dir=str(tmp_path),
                         hub_cache=None, source="local") == (tmp_path / "m").resolve()


def test_weights_cache_override_is_where_the_model_is_read(tmp_path):
    weights = tmp_path / "weights"
    weights.mkdir()
    with pytest.raises(ModelNotFound, match="holds no model"):
        resolve_model("org/any", revision=None, cache_dir=str(tmp_path), hub_cache=None,
                      weights_dir=str(weights))
    (weights / "config.json").write_text("{}")
    assert resolve_model("org/any", revision=None, cache_dir=str(tmp_path), hub_cache=None,
                         weights_dir=str(weights)) == weights.resolve()


def test_shard_uds_path_defaults_beside_the_control_socket():
    config, _ = run(["--runtime-dir", "/srv/rt"])
    assert config.paths.shard_uds_path == "/srv/rt/workers.sock"


def test_validation_workers_size_the_tokenizer_pool(tmp_path):
    from tokenizers import Tokenizer as RustTokenizer
    from tokenizers.models import WordLevel

    from loraxd.engine.tokenizer import Tokenizer
    RustTokenizer(WordLevel({"a": 0, "[UNK]": 1}, unk_token="[UNK]")).save(
        str(tmp_path / "tokenizer.json"))
    tokenizer = Tokenizer(tmp_path, num_threads=3)
    try:
        assert tokenizer._pool._max_workers == 3
    finally:
        tokenizer.close()


@pytest.mark.parametrize("flag,env,text,reason", REFUSED, ids=[r[0] for r in REFUSED])
def test_flags_without_meaning_here_are_refused_with_a_reason(flag, env, text, reason):
    argv = [flag] if text is None else [flag, text]
    with pytest.raises(ConfigError) as info:
        run(argv)
    assert str(info.value).startswith(f"command line: {flag}") and reason in str(info.value)
    with pytest.raises(ConfigError) as info:
        run(environ={env: text or "true"})
    assert str(info.value).startswith(f"environment: {env} = ") and reason in str(info.value)


def test_values_that_ask_for_what_loraxd_does_are_accepted():
    run(["--disable-custom-kernels"])
    run(environ={"COMPILE": "false", "TRUST_REMOTE_CODE": "0", "QUANTIZE": "",
                 "DISABLE_CUSTOM_KERNELS": "true"})


def test_cuda_memory_fraction_is_a_share_and_means_nothing_on_a_cpu():
    assert run(["--cuda-memory-fraction", "0.5"])[0].model.cuda_memory_fraction == 0.5
    for bad in ("0", "1.5"):
        with pytest.raises(ConfigError, match="must be greater than 0 and at most 1"):
            run(["--cuda-memory-fraction", bad])
    assert run(["--device", "cpu", "--cuda-memory-fraction", "1"])[0].model.device == "cpu"
    with pytest.raises(ConfigError, match=r"^environment: CUDA_MEMORY_FRACTION = 0.9: a share "
                                          r"of GPU memory means nothing on a CPU"):
        run(["--device", "cpu"], {"CUDA_MEMORY_FRACTION": "0.9"})


def test_download_only_from_lorax_env():
    assert run(environ={"DOWNLOAD_ONLY": "true"})[1].download_only
    assert not run(environ={"DOWNLOAD_ONLY": "false"})[1].download_only
    assert run(["--download-only"])[1].download_only


def _main(*argv, env=None):
    return subprocess.run([sys.executable, "-m", "loraxd.daemon.main", *argv, "--config",
                           "/dev/null"], capture_output=True, text=True, timeout=60,
                          env=env)


def test_version_and_env_flags():
    out = _main("-V")
    assert out.returncode == 0 and out.stdout.strip() == f"loraxd {__version__}"
    out = _main("-e", "--max-best-of", "3")
    assert out.returncode == 0, out.stderr
    info = json.loads(out.stdout)
    assert info["loraxd"] == __version__ and info["config"]["scheduler"]["max_best_of"] == 3
    assert "python" in info and "torch" in info


def test_a_refused_flag_exits_78_with_one_line():
    out = _main("--quantize", "awq")
    assert out.returncode == 78
    assert out.stderr.startswith("loraxd: command line: --quantize = awq: LoRAX's awq "
                                 "quantization is not built; built: int8-weight-only")
    assert out.stderr.count("\n") == 1
    out = _main("--compile", "--device", "cpu")
    assert out.returncode == 78
    assert out.stderr.startswith("loraxd: command line: --compile = true: CUDA graphs of the "
                                 "decode step need a GPU (device = cpu)")


@pytest.mark.parametrize("method", ["bitsandbytes", "bitsandbytes-nf4", "gptq", "awq", "eetq",
                                    "exl2", "fp8", "hqq-4bit", "hqq-2bit"])
def test_lorax_quantize_methods_other_than_int8_weight_only_are_refused(method):
    with pytest.raises(ConfigError, match=rf"^command line: --quantize = {method}: LoRAX's "
                       rf"{method} quantization is not built; built: int8-weight-only"):
        run(["--quantize", method])
    with pytest.raises(ConfigError, match=r"^environment: QUANTIZE = int4: unknown "
                       r"quantization; built: int8-weight-only"):
        run(environ={"QUANTIZE": "int4"})
    assert run([])[0].model.quantize is None


async def test_adapter_id_is_the_default_adapter_of_requests_that_name_none():
    from aiohttp.test_utils import TestClient, TestServer

    from loraxd.engine.request import AdapterRef
    from loraxd.http.app import make_app
    from tests.unit.test_http_native import FakeEngine, make_config

    engine = FakeEngine()
    config = make_config(adapters={"adapter_id": "org/default", "adapter_source": "local"})
    async with TestClient(TestServer(make_app(engine, config))) as client:
        body = {"inputs": "hi", "parameters": {"max_new_tokens": 2}}
        resp = await client.post("/generate", json=body)
        assert resp.status == 200 and resp.headers["x-adapter-id"] == "org/default"
        body["parameters"]["adapter_id"] = "org/other"
        assert (await client.post("/generate", json=body)).status == 200
        resp = await client.post("/v1/completions", json={"model": "fake/base", "prompt": "hi",
                                                          "max_tokens": 2})
        assert resp.status == 200
    assert [r.adapter for r in engine.requests] == [
        AdapterRef("org/default", "local"), AdapterRef("org/other", "local"),
        AdapterRef("org/default", "local")]
