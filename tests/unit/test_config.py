"""loraxd.config: sources and their precedence, validation messages, actions, shipped file."""
from __future__ import annotations

import dataclasses
import json
import re
import subprocess
import sys
from pathlib import Path

import pytest

from loraxd.config import (EXIT_CONFIG, Actions, Config, ConfigError, PathsConfig, build_parser,
                           load, load_or_exit)

SHIPPED = Path(__file__).resolve().parents[2] / "etc" / "loraxd" / "loraxd.toml"
USER_ENV = {"HOME": "/home/u"}


def run(argv=(), environ=None, tmp_path=None, euid=1000):
    """load() with no /etc file unless --config is given."""
    missing = str(tmp_path / "absent.toml") if tmp_path else "/nonexistent/loraxd.toml"
    return load(list(argv), USER_ENV if environ is None else environ,
                default_config_path=missing, euid=euid)


def write(tmp_path: Path, text: str) -> str:
    path = tmp_path / "loraxd.toml"
    path.write_text(text)
    return str(path)


def error_of(*args, **kwargs) -> str:
    with pytest.raises(ConfigError) as info:
        run(*args, **kwargs)
    return str(info.value)


def without_paths(config: Config) -> dict:
    tree = config.to_dict()
    del tree["paths"]
    return tree


def test_defaults_without_any_source():
    config, actions = run()
    assert without_paths(config) == without_paths(Config())
    assert config.model.model_id == "HuggingFaceTB/SmolLM2-135M-Instruct"
    assert config.server.port == 3000 and config.scheduler.block_size == 16
    assert actions == Actions()


def test_precedence_file_then_env_then_flags(tmp_path):
    path = write(tmp_path, "[server]\nport = 1111\nhostname = '0.0.0.0'\n"
                           "[scheduler]\nmax_best_of = 3\n")
    env = {"LORAXD_PORT": "2222", "LORAXD_MAX_BEST_OF": "5"}
    config, actions = run(["--config", path], {})
    assert (config.server.port, config.scheduler.max_best_of) == (1111, 3)
    config, _ = run(["--config", path], env)
    assert (config.server.port, config.scheduler.max_best_of) == (2222, 5)
    config, _ = run(["--config", path, "-p", "3333"], env)
    assert (config.server.port, config.scheduler.max_best_of) == (3333, 5)
    assert config.server.hostname == "0.0.0.0"  # only the file set it
    assert actions.config_file == path


def test_default_file_is_read_when_present_and_config_flag_overrides_it(tmp_path):
    default = write(tmp_path, "[server]\nport = 4444\n")
    config, actions = load([], {}, default_config_path=default, euid=1000)
    assert config.server.port == 4444 and actions.config_file == default
    other = tmp_path / "other.toml"
    other.write_text("[server]\nport = 5555\n")
    config, _ = load(["--config", str(other)], {}, default_config_path=default, euid=1000)
    assert config.server.port == 5555
    config, _ = load([], {"LORAXD_CONFIG": str(other)}, default_config_path=default, euid=1000)
    assert config.server.port == 5555


def test_bad_value_in_file_names_file_key_value_and_reason(tmp_path):
    path = write(tmp_path, "[scheduler]\nmax_input_length = -3\n")
    message = error_of(["--config", path])
    assert message == f"{path}: scheduler.max_input_length = -3: must be a positive integer"


@pytest.mark.parametrize("text, expected", [
    ("[server]\nprot = 80\n", "server.prot = 80: unknown key (did you mean port?)"),
    ("[server]\nmodel_id = 'x'\n", 'server.model_id = "x": unknown key in [server]; '
                                   "it belongs in [model]"),
    ("[sever]\nport = 80\n", "[sever]: unknown section (did you mean server?)"),
    ("port = 80\n", "port = 80: keys belong in a section; this one goes in [server]"),
    ("[server]\nport = '80'\n", 'server.port = "80": must be an integer'),
    ("[server]\nport = 70000\n", "server.port = 70000: must be between 1 and 65535"),
    ("[server]\njson_output = 1\n", "server.json_output = 1: must be true or false"),
    ("[model]\ndtype = 'fp8'\n", 'model.dtype = "fp8": must be one of float32, bfloat16, '
                                 "float16, auto"),
    ("[adapters]\nlocal_adapter_dirs = '/a'\n", 'adapters.local_adapter_dirs = "/a": must be a'),
    ("[adapters]\nadapter_cycle_time_s = 0\n", "adapter_cycle_time_s = 0: must be greater than 0"),
    ("[scheduler]\nwaiting_served_ratio = -0.5\n", "= -0.5: must not be negative"),
])
def test_file_errors(tmp_path, text, expected):
    path = write(tmp_path, text)
    message = error_of(["--config", path])
    assert message.startswith(f"{path}: ") and expected in message


def test_bad_toml_syntax_and_unreadable_file(tmp_path):
    path = write(tmp_path, "[server\nport = 1\n")
    assert error_of(["--config", path]).startswith(f"{path}: invalid TOML: ")
    missing = str(tmp_path / "nope.toml")
    assert error_of(["--config", missing]) == f"{missing}: cannot read: No such file or directory"
    assert error_of(["--config", str(tmp_path)]).startswith(f"{tmp_path}: cannot read: ")


def test_floats_accept_integers_in_file(tmp_path):
    config, _ = run(["--config", write(tmp_path, "[worker]\nready_timeout_s = 60\n")])
    assert config.worker.ready_timeout_s == 60.0 and isinstance(config.worker.ready_timeout_s,
                                                                 float)


def test_environment_values_are_parsed_by_type():
    config, _ = run(environ={
        "LORAXD_CORS_ALLOW_ORIGIN": " https://a.example, https://b.example,,",
        "LORAXD_PRELOADED_ADAPTER_IDS": "",
        "LORAXD_JSON_OUTPUT": "yes",
        "LORAXD_WAITING_SERVED_RATIO": "0.5",
        "LORAXD_REVISION": "",
        "LORAXD_MODEL_ID": "/models/llama",
        "LORAXD_UNRELATED": "ignored",
    })
    assert config.server.cors_allow_origin == ("https://a.example", "https://b.example")
    assert config.adapters.preloaded_adapter_ids == ()
    assert config.server.json_output is True
    assert config.scheduler.waiting_served_ratio == 0.5
    assert config.model.revision is None and config.model.model_id == "/models/llama"


@pytest.mark.parametrize("name, value, reason", [
    ("LORAXD_PORT", "abc", "must be an integer"),
    ("LORAXD_NUM_SHARD", "0", "must be a positive integer"),
    ("LORAXD_JSON_OUTPUT", "maybe", "must be true or false"),
    ("LORAXD_ADAPTER_CYCLE_TIME_S", "nan", "must be a finite number"),
    ("LORAXD_DEVICE", "tpu", "must be one of cpu, cuda, auto"),
])
def test_environment_errors(name, value, reason):
    assert error_of(environ={name: value}) == f"environment: {name} = {value}: {reason}"


def test_flags_repeatable_and_boolean():
    config, _ = run(["--local-adapter-dir", "/a", "--local-adapter-dir", "/b",
                     "--preloaded-adapter-id", "org/x", "--cors-allow-origin", "*",
                     "--json-output", "--max-total-tokens", "4096", "--dtype", "bfloat16"])
    assert config.adapters.local_adapter_dirs == ("/a", "/b")
    assert config.adapters.preloaded_adapter_ids == ("org/x",)
    assert config.server.cors_allow_origin == ("*",)
    assert config.server.json_output is True
    assert config.scheduler.max_total_tokens == 4096 and config.model.dtype == "bfloat16"
    config, _ = run(["--no-json-output"], {"LORAXD_JSON_OUTPUT": "true"})
    assert config.server.json_output is False


def test_flag_value_errors_name_the_flag():
    assert error_of(["--port", "x"]) == "command line: --port = x: must be an integer"
    assert error_of(["--max-best-of", "0"]) == \
        "command line: --max-best-of = 0: must be a positive integer"


def test_num_shard_and_rendezvous_settings(tmp_path):
    config, _ = run(["--num-shard", "2", "--master-addr", "127.0.0.2", "--master-port",
                     "29500"])
    assert (config.model.num_shard, config.model.master_addr, config.model.master_port) == \
        (2, "127.0.0.2", 29500)
    assert run()[0].model.master_port == 0  # a free port at each start
    assert error_of(["--num-shard", "0"]) == \
        "command line: --num-shard = 0: must be a positive integer"
    path = write(tmp_path, "[model]\nmaster_port = 70000\n")
    assert error_of(["--config", path]) == \
        f"{path}: model.master_port = 70000: must be between 0 (pick a free one) and 65535"


def test_cross_key_rules_blame_the_key_set_last(tmp_path):
    assert error_of(["--max-input-length", "2048"]) == (
        "command line: --max-input-length = 2048: must be less than max_total_tokens, "
        "which is 2048 (default)")
    path = write(tmp_path, "[scheduler]\nmax_input_length = 900\n")
    assert error_of(["--config", path, "--max-total-tokens", "800"]) == (
        "command line: --max-total-tokens = 800: must be greater than max_input_length, "
        f"which is 900 ({path} scheduler.max_input_length)")
    assert "must be at most max_batch_total_tokens, which is 32768 (default)" in error_of(
        environ={"LORAXD_MAX_TOTAL_TOKENS": "40000", "LORAXD_DEVICE": "cpu"})
    # on CUDA (or auto) an unset max_batch_total_tokens is sized at start, and checked then
    assert run(environ={"LORAXD_MAX_TOTAL_TOKENS": "40000", **USER_ENV})[0] \
        .scheduler.max_batch_total_tokens is None
    assert "must be at most max_batch_prefill_tokens" in error_of(
        ["--max-input-length", "1500", "--max-total-tokens", "3000",
         "--max-batch-prefill-tokens", "1000"])


def test_actions():
    _, actions = run(["--check-config"])
    assert actions == Actions(check_config=True)
    _, actions = run(["--download-only", "--env"])
    assert actions.download_only and actions.env and not actions.check_config


@pytest.mark.parametrize("argv", [["--bogus"], ["--port", "abc"], ["--port"], ["--max-input"]])
def test_command_line_errors_exit_78_with_one_line(argv, capsys):
    with pytest.raises(SystemExit) as info:
        load_or_exit(argv, {}, default_config_path="/nonexistent/loraxd.toml")
    assert info.value.code == EXIT_CONFIG == 78
    err = capsys.readouterr().err
    assert err.startswith("loraxd: command line: ") and err.count("\n") == 1


def test_file_error_exits_78(tmp_path, capsys):
    path = write(tmp_path, "[server]\nport = 0\n")
    with pytest.raises(SystemExit) as info:
        load_or_exit(["--config", path], {})
    assert info.value.code == 78
    assert capsys.readouterr().err == f"loraxd: {path}: server.port = 0: must be between 1 and " \
                                      "65535\n"


def test_help_describes_every_flag(capsys):
    with pytest.raises(SystemExit) as info:
        load(["--help"], {})
    assert info.value.code == 0
    out = capsys.readouterr().out
    for field in _all_fields():
        assert f"LORAXD_{field.name.upper()}" in out
    for flag in ("--model-id", "-p", "--local-adapter-dir", "--preloaded-adapter-id",
                 "--cors-allow-origin", "--download-only", "--check-config", "--env",
                 "--config", "--json-output"):
        assert flag in out


def test_paths_follow_the_user():
    config, _ = run(environ={"HOME": "/home/u"}, euid=1000)
    assert config.paths == PathsConfig("/tmp/loraxd-1000", "/tmp/loraxd-1000/control.sock",
                                       "/home/u/.cache/loraxd")
    config, _ = run(environ={"XDG_RUNTIME_DIR": "/run/user/1000", "XDG_CACHE_HOME": "/c"})
    assert config.paths.runtime_dir == "/run/user/1000/loraxd"
    assert config.paths.control_socket == "/run/user/1000/loraxd/control.sock"
    assert config.paths.cache_dir == "/c/loraxd"
    config, _ = run(environ={"XDG_RUNTIME_DIR": "/run/user/0"}, euid=0)
    assert (config.paths.runtime_dir, config.paths.cache_dir) == ("/run/loraxd",
                                                                  "/var/cache/loraxd")
    config, _ = run(["--runtime-dir", "/srv/rt"])
    assert config.paths.control_socket == "/srv/rt/control.sock"


def test_config_is_frozen():
    config, _ = run()
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.server.port = 1  # type: ignore[misc]
    with pytest.raises(dataclasses.FrozenInstanceError):
        config.model = None  # type: ignore[misc]


def test_to_dict_is_json_and_round_trips():
    config, _ = run(["--cors-allow-origin", "*", "--revision", "v1"])
    tree = json.loads(json.dumps(config.to_dict()))
    assert tree["server"]["cors_allow_origin"] == ["*"]
    assert Config.from_dict(tree) == config
    with pytest.raises(ConfigError, match=r"^config: server.port = -1: "):
        Config.from_dict({"server": {"port": -1}})


def _all_fields():
    for section in dataclasses.fields(Config):
        yield from dataclasses.fields(getattr(Config(), section.name))


def test_shipped_file_gives_the_defaults():
    config, actions = load(["--config", str(SHIPPED)], {}, euid=1000)
    assert actions.config_file == str(SHIPPED)
    assert without_paths(config) == without_paths(Config())


def test_shipped_file_documents_every_key():
    text = SHIPPED.read_text()
    sections = re.split(r"(?m)^\[(\w+)\]$", text)
    bodies = dict(zip(sections[1::2], sections[2::2]))
    for section in dataclasses.fields(Config):
        body = bodies[section.name]
        for field in dataclasses.fields(getattr(Config(), section.name)):
            flag = "--" + field.name.replace("_", "-")
            assert re.search(rf"(?m)^(# )?{field.name} = ", body), field.name
            assert f"env LORAXD_{field.name.upper()}" in body, field.name
            assert (flag in body or flag.rstrip("s") in body), field.name


def test_no_heavy_imports():
    code = ("import sys, loraxd.config; "
            "bad = {'torch', 'aiohttp', 'numpy'} & set(sys.modules); assert not bad, bad")
    subprocess.run([sys.executable, "-c", code], check=True)


def test_parser_is_buildable_alone():
    assert build_parser().prog == "loraxd"
