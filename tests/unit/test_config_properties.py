"""Property tests of the config loader (hypothesis): whatever a TOML file, the environment
or the command line holds, the loader gives a Config or a ConfigError naming the source,
nothing else; a Config survives its own round trip (to_dict, from_dict)."""
from __future__ import annotations

import dataclasses
import os
import string
import tempfile

from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from loraxd.config import ConfigError, load
from loraxd.config.tree import SECTION_NAMES, Config

PROPERTIES = settings(max_examples=150, deadline=None, suppress_health_check=[HealthCheck.too_slow])

KEYS = {section: [f.name for f in dataclasses.fields(getattr(Config(), section))]
        for section in SECTION_NAMES}
ALL_KEYS = [key for keys in KEYS.values() for key in keys]
NAMES = st.one_of(st.sampled_from(ALL_KEYS + list(SECTION_NAMES)), st.text(max_size=8))
SCALARS = st.one_of(st.none(), st.booleans(), st.integers(min_value=-(2**70), max_value=2**70),
                    st.floats(), st.text(max_size=12), st.sampled_from(["", "0", "cpu", "/x"]))
VALUES = st.recursive(SCALARS, lambda inner: st.lists(inner, max_size=3)
                      | st.dictionaries(st.text(max_size=4), inner, max_size=2), max_leaves=6)
TABLES = st.dictionaries(NAMES, st.one_of(st.dictionaries(NAMES, VALUES, max_size=4), VALUES),
                         max_size=4)


def _toml_value(value) -> str | None:
    """The TOML spelling of a value (None where TOML has none)."""
    if value is None:
        return None
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, (int, float)):
        text = repr(value)
        return {"nan": "nan", "inf": "inf", "-inf": "-inf"}.get(text, text)
    if isinstance(value, str):
        return '"' + value.encode("unicode_escape").decode().replace('"', '\\"') + '"'
    if isinstance(value, list):
        items = [_toml_value(v) for v in value]
        return None if None in items else "[" + ", ".join(items) + "]"
    if isinstance(value, dict):
        items = [(k, _toml_value(v)) for k, v in value.items()]
        if any(v is None for _, v in items):
            return None
        return "{" + ", ".join(f'"{k}" = {v}' for k, v in items) + "}"
    return None


def assert_config_or_one_line_error(argv, environ):
    try:
        config, _ = load(argv, environ, default_config_path=os.devnull)
    except ConfigError as exc:  # names where the value came from (load_or_exit prints it)
        sources = ("environment: ", "command line: ", *(f"{a}: " for a in argv[1:2]))
        assert str(exc).startswith(sources), exc
        return None
    assert isinstance(config, Config)
    assert Config.from_dict(config.to_dict()) == config
    return config


@PROPERTIES
@given(TABLES)
def test_any_toml_file_is_a_config_or_a_config_error(tables):
    lines = []
    for name, value in tables.items():
        if isinstance(value, dict):
            lines.append(f'["{name}"]')
            lines += [f'"{k}" = {v}' for k, v in ((k, _toml_value(v)) for k, v in value.items())
                      if v is not None]
    text = "\n".join(lines) + "\n"
    with tempfile.NamedTemporaryFile("w", suffix=".toml", delete=False) as f:
        f.write(text)
    try:
        assert_config_or_one_line_error(["--config", f.name], {})
    finally:
        os.unlink(f.name)


@PROPERTIES
@given(st.binary(max_size=200))
def test_any_file_bytes_are_a_config_or_a_config_error(raw):
    with tempfile.NamedTemporaryFile("wb", suffix=".toml", delete=False) as f:
        f.write(raw)
    try:
        assert_config_or_one_line_error(["--config", f.name], {})
    finally:
        os.unlink(f.name)


ENV_TEXT = st.one_of(st.text(alphabet=string.printable, max_size=12),
                     st.sampled_from(["", "true", "off", "1e999", "nan", "-1", "0", "a,,b",
                                      "9" * 30, " 3 "]))


@PROPERTIES
@given(st.dictionaries(st.sampled_from(ALL_KEYS), ENV_TEXT, max_size=4))
def test_any_environment_is_a_config_or_a_config_error(values):
    environ = {f"LORAXD_{key.upper()}": value for key, value in values.items()}
    assert_config_or_one_line_error([], environ)


@PROPERTIES
@given(st.lists(st.tuples(st.sampled_from(ALL_KEYS), ENV_TEXT), max_size=3))
def test_any_flags_are_a_config_or_a_config_error(flags):
    argv = ["--config", os.devnull]
    for key, value in flags:
        argv += ["--" + key.replace("_", "-"), value]
    assert_config_or_one_line_error(argv, {})


@PROPERTIES
@given(st.integers(min_value=1, max_value=4096), st.integers(min_value=1, max_value=4096),
       st.floats(min_value=0.001, max_value=1e6), st.booleans())
def test_valid_settings_round_trip(max_input, extra, timeout, json_output):
    environ = {"LORAXD_MAX_INPUT_LENGTH": str(max_input),
               "LORAXD_MAX_TOTAL_TOKENS": str(max_input + extra),
               "LORAXD_MAX_BATCH_PREFILL_TOKENS": str(max_input + extra),
               "LORAXD_MAX_BATCH_TOTAL_TOKENS": str(max_input + extra),
               "LORAXD_STREAM_WRITE_TIMEOUT_S": repr(timeout),
               "LORAXD_JSON_OUTPUT": str(json_output).lower()}
    config = assert_config_or_one_line_error([], environ)
    assert config is not None
    assert config.scheduler.max_total_tokens == max_input + extra
    assert config.server.stream_write_timeout_s == timeout
