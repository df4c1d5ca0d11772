"""Reading the configuration: defaults < TOML file (`--config PATH`, else $LORAXD_CONFIG,
else /etc/loraxd/loraxd.toml when it exists) < LoRAX's environment names (`MODEL_ID`, ...)
< environment `LORAXD_<KEY>` < flags.
Errors are `ConfigError`s naming the source, the key, the value and the reason.
Stdlib only: the daemon imports this before anything heavy.
"""
from __future__ import annotations

import argparse
import dataclasses
import difflib
import json
import math
import os
import sys
import tomllib
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from loraxd.config.lorax_only import add_lorax_only_flags, refuse_lorax_only
from loraxd.config.tree import (CPU_KV_TOKENS, DEFAULT_CONFIG_PATH, ENV_PREFIX, EXIT_CONFIG,
                                Actions, Config, ConfigError, Rule, default_paths)


# kind: (annotation, why a value of the wrong type is wrong)
_KINDS = {"bool": (bool, "must be true or false"),
          "optbool": (bool | None, "must be true or false"), "int": (int, "must be an integer"),
          "optint": (int | None, "must be an integer"),
          "float": (float, "must be a number"), "str": (str, "must be a string"),
          "optstr": (str | None, "must be a string"), "strs": (tuple[str, ...], "must be a list")}


@dataclass(frozen=True)
class _Key:
    section: str
    name: str
    kind: str  # one of _KINDS
    default: typing.Any
    help: str
    rule: Rule | None
    choices: tuple[str, ...]
    flag: str  # the long flag; env is the environment name
    short: str | None
    env: str
    lorax_env: str | None  # LoRAX's name for it, read below `env`


def _table() -> tuple[dict[str, type], dict[str, _Key]]:
    sections = typing.get_type_hints(Config)
    keys: dict[str, _Key] = {}
    for section, cls in sections.items():
        hints = typing.get_type_hints(cls)
        for f in dataclasses.fields(cls):
            kind = next(kind for kind, (hint, _) in _KINDS.items() if hints[f.name] == hint)
            if f.name in keys:
                raise TypeError(f"config key {f.name} is defined twice")
            meta, flag = f.metadata, "--" + f.name.replace("_", "-")
            keys[f.name] = _Key(section, f.name, kind, f.default, meta["help"], meta["rule"],
                                meta["choices"], meta["flag"] or flag, meta["short"],
                                ENV_PREFIX + f.name.upper(),
                                f.name.upper() if meta["lorax"] else None)
    return sections, keys


_SECTIONS, _KEYS = _table()


@dataclass(frozen=True)
class _Where:
    source: str  # "default", a file path, "config", "environment", "command line"
    key: str  # the key as that source spells it
    shown: str  # the value as that source wrote it
    rank: int  # precedence: default 0 < file 1 < environment 2 < command line 3

    def fail(self, reason: str) -> ConfigError:
        return ConfigError(f"{self.source}: {self.key} = {self.shown}: {reason}")


_Setting = tuple[typing.Any, _Where]
_TRUE = ("1", "true", "yes", "on")
_FALSE = ("0", "false", "no", "off")


def _from_text(kind: str, raw: str | list[str]) -> typing.Any:
    """Parse an environment value or flag argument; raise ValueError(reason)."""
    if kind == "strs":
        items = raw if isinstance(raw, list) else raw.split(",")
        return tuple(item.strip() for item in items if item.strip())
    if kind == "optstr":
        return raw or None
    if kind == "str":
        return raw
    if kind in ("optbool", "optint") and not raw.strip():
        return None
    if kind in ("bool", "optbool") and raw.strip().lower() in _TRUE + _FALSE:
        return raw.strip().lower() in _TRUE
    try:
        return {"int": int, "optint": int, "float": float}[kind](raw.strip())
    except (KeyError, ValueError):
        raise ValueError(_KINDS[kind][1]) from None


def _from_value(kind: str, raw: typing.Any) -> typing.Any:
    """Check a TOML (or to_dict) value's type; raise ValueError(reason)."""
    number = isinstance(raw, (int, float)) and not isinstance(raw, bool)
    ok = {"bool": isinstance(raw, bool),
          "optbool": raw is None or isinstance(raw, bool),
          "int": number and isinstance(raw, int),
          "optint": raw is None or (number and isinstance(raw, int)),
          "float": number,
          "str": isinstance(raw, str),
          "optstr": raw is None or isinstance(raw, str),
          "strs": isinstance(raw, (list, tuple)) and all(isinstance(i, str) for i in raw)}[kind]
    if not ok:
        raise ValueError(_KINDS[kind][1])
    return float(raw) if kind == "float" else tuple(raw) if kind == "strs" else raw


def _reason(key: _Key, value: typing.Any) -> str | None:
    if isinstance(value, float) and not math.isfinite(value):
        return "must be a finite number"
    if key.choices and value not in key.choices:
        return "must be one of " + ", ".join(key.choices)
    return key.rule(value) if key.rule and value is not None else None


def _show(raw: typing.Any, text: bool) -> str:
    if text:
        shown = ",".join(raw) if isinstance(raw, list) else str(raw)
        return shown or '""'
    return json.dumps(raw, default=str)


def _settle(key: _Key, raw: typing.Any, source: str, spelled: str, rank: int,
            text: bool) -> _Setting:
    where = _Where(source, spelled, _show(raw, text), rank)
    try:
        value = _from_text(key.kind, raw) if text else _from_value(key.kind, raw)
    except ValueError as exc:
        raise where.fail(str(exc)) from None
    reason = _reason(key, value)
    if reason:
        raise where.fail(reason)
    return value, where


def _hint(word: str, candidates: typing.Iterable[str]) -> str:
    close = difflib.get_close_matches(word, list(candidates), n=1)
    return f" (did you mean {close[0]}?)" if close else ""


def _defaults() -> dict[str, _Setting]:
    return {name: (key.default, _Where("default", f"{key.section}.{name}",
                                       _show(key.default, False), 0))
            for name, key in _KEYS.items()}


def _read_toml(path: str) -> dict[str, typing.Any]:
    try:
        with open(path, "rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"{path}: cannot read: {exc.strerror or exc}") from None
    except UnicodeDecodeError:
        raise ConfigError(f"{path}: invalid TOML: not UTF-8 text") from None
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path}: invalid TOML: {exc}") from None


def _from_tables(source: str, data: Mapping[str, typing.Any], rank: int) -> dict[str, _Setting]:
    settings: dict[str, _Setting] = {}
    for section, table in data.items():
        if section not in _SECTIONS:
            if section in _KEYS:
                raise _Where(source, section, _show(table, False), rank).fail(
                    f"keys belong in a section; this one goes in [{_KEYS[section].section}]")
            raise ConfigError(f"{source}: [{section}]: unknown section{_hint(section, _SECTIONS)}")
        if not isinstance(table, Mapping):
            raise _Where(source, section, _show(table, False), rank).fail("must be a table")
        for name, raw in table.items():
            key = _KEYS.get(name)
            if key is None or key.section != section:
                where = _Where(source, f"{section}.{name}", _show(raw, False), rank)
                if key is not None:
                    raise where.fail(f"unknown key in [{section}]; it belongs in [{key.section}]")
                mates = [k.name for k in _KEYS.values() if k.section == section]
                raise where.fail("unknown key" + _hint(name, mates))
            settings[name] = _settle(key, raw, source, f"{section}.{name}", rank, text=False)
    return settings


def _from_env(environ: Mapping[str, str]) -> dict[str, _Setting]:
    """LoRAX's names first, so that a LORAXD_* name wins over them. HOSTNAME is not read:
    shells and Kubernetes set it to the machine's name, not to an address to listen on."""
    settings = {name: _settle(key, environ[key.lorax_env], "environment", key.lorax_env, 2,
                              text=True)
                for name, key in _KEYS.items() if key.lorax_env in environ}
    settings.update({name: _settle(key, environ[key.env], "environment", key.env, 2, text=True)
                     for name, key in _KEYS.items() if key.env in environ})
    return settings


def _from_args(args: argparse.Namespace) -> dict[str, _Setting]:
    given = vars(args)
    return {name: _settle(key, given[name], "command line", key.flag, 3,
                          text=not isinstance(given[name], bool))
            for name, key in _KEYS.items() if name in given}


_ORDER_RULES = (("max_input_length", "<", "max_total_tokens"),
                ("max_total_tokens", "<=", "max_batch_total_tokens"),
                ("max_input_length", "<=", "max_batch_prefill_tokens"),
                ("max_batch_prefill_tokens", "<=", "max_batch_total_tokens"))
_WORDS = {"<": "less than", "<=": "at most", ">": "greater than", ">=": "at least"}
_FLIP = {"<": ">", "<=": ">="}


def _check_order(settings: dict[str, _Setting]) -> None:
    """Blame the side set by the higher-precedence source, naming where the other came from.
    An unset max_batch_total_tokens is CPU_KV_TOKENS on a CPU; on CUDA (or auto) the KV cache
    is sized at start, and checked against these limits then (see daemon/kv_limits.py)."""
    for low, op, high in _ORDER_RULES:
        (low_value, low_where), (high_value, high_where) = settings[low], settings[high]
        if high_value is None:
            if settings["device"][0] != "cpu":
                continue
            high_value, high_where = CPU_KV_TOKENS, dataclasses.replace(high_where, rank=0)
        if low_value < high_value or (op == "<=" and low_value == high_value):
            continue
        blame_high = high_where.rank > low_where.rank
        where, word = (high_where, _WORDS[_FLIP[op]]) if blame_high else (low_where, _WORDS[op])
        other, value, other_where = ((low, low_value, low_where) if blame_high
                                     else (high, high_value, high_where))
        origin = "default" if other_where.rank == 0 else f"{other_where.source} {other_where.key}"
        raise where.fail(f"must be {word} {other}, which is {value} ({origin})")


def _check_sharding(settings: dict[str, _Setting]) -> None:
    (sharded, where), (num_shard, shard_where) = settings["sharded"], settings["num_shard"]
    origin = "default" if shard_where.rank == 0 else f"{shard_where.source} {shard_where.key}"
    if sharded is True and num_shard == 1:
        raise where.fail(f"needs num_shard over 1, which is 1 ({origin}): set it to the "
                         "number of GPUs to shard over (it is not taken from the GPU count)")
    if sharded is False and num_shard > 1:
        raise where.fail(f"needs num_shard 1, which is {num_shard} ({origin})")


_OTLP_PROTOCOL_VARS = ("OTEL_EXPORTER_OTLP_TRACES_PROTOCOL", "OTEL_EXPORTER_OTLP_PROTOCOL")


def _check_tracing(settings: dict[str, _Setting], environ: Mapping[str, str]) -> None:
    """The OpenTelemetry SDK's protocol variable asks for a protocol loraxd does not send."""
    if settings["otlp_endpoint"][0] is None:
        return
    for name in _OTLP_PROTOCOL_VARS:
        value = environ.get(name, "").strip()
        if value and value != "http/protobuf":
            raise ConfigError(f"environment: {name} = {value}: loraxd sends traces over "
                              "OTLP/HTTP with protobuf (http/protobuf) only")
def _check_memory_fraction(settings: dict[str, _Setting]) -> None:
    (fraction, where), (device, _) = settings["cuda_memory_fraction"], settings["device"]
    if device == "cpu" and fraction != 1.0:
        raise where.fail("a share of GPU memory means nothing on a CPU (device = cpu): only "
                         "1.0 is accepted there")


def _check_compile(settings: dict[str, _Setting]) -> None:
    (compile, where), (device, _) = settings["compile"], settings["device"]
    if compile and device == "cpu":
        raise where.fail("CUDA graphs of the decode step need a GPU (device = cpu)")
    if compile and settings["num_shard"][0] > 1:
        raise where.fail("CUDA graphs with tensor parallelism (num_shard > 1) are not built "
                         "yet")


def _derive_paths(settings: dict[str, _Setting], environ: Mapping[str, str], euid: int) -> None:
    runtime_dir, cache_dir = default_paths(environ, euid)
    for name, value in (("runtime_dir", runtime_dir), ("cache_dir", cache_dir)):
        if not settings[name][0]:
            settings[name] = (value, dataclasses.replace(settings[name][1], shown=value))
    runtime_dir, where = settings["runtime_dir"]
    for name, file in (("control_socket", "control.sock"), ("shard_uds_path", "workers.sock")):
        if not settings[name][0]:
            settings[name] = (os.path.join(runtime_dir, file), where)


def _build(settings: dict[str, _Setting], environ: Mapping[str, str], euid: int) -> Config:
    _check_order(settings)
    _check_sharding(settings)
    _check_tracing(settings, environ)
    _check_memory_fraction(settings)
    _check_compile(settings)
    _derive_paths(settings, environ, euid)
    values: dict[str, dict[str, typing.Any]] = {section: {} for section in _SECTIONS}
    for name, (value, _) in settings.items():
        values[_KEYS[name].section][name] = value
    return Config(**{section: cls(**values[section]) for section, cls in _SECTIONS.items()})


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> typing.NoReturn:
        raise ConfigError(f"command line: {message}")


def _flag_help(key: _Key) -> str:
    default = ("derived" if key.section == "paths" else "unset" if key.default in (None, ())
               else _show(key.default, False))
    env = f"{key.env} or {key.lorax_env}" if key.lorax_env else key.env
    text = f"{key.help} [env {env}; default {default}]"
    return text.replace("%", "%%")


def build_parser() -> argparse.ArgumentParser:
    """The daemon's flags: one per config key, plus --config and the actions."""
    from loraxd import __version__

    parser = _Parser(prog="loraxd", allow_abbrev=False, argument_default=argparse.SUPPRESS,
                     description="Precedence: defaults < TOML file < LORAXD_* env < flags.")
    parser.add_argument("--config", metavar="PATH", default=None,
                        help=f"TOML file [env LORAXD_CONFIG; default {DEFAULT_CONFIG_PATH}]")
    for flags, text in ((("--download-only",), "download the model and adapters, then exit "
                                               "[env LORAXD_DOWNLOAD_ONLY or DOWNLOAD_ONLY]"),
                        (("--check-config",), "validate the configuration and exit (0 or 78)"),
                        (("-e", "--env"), "print the versions, the platform and the resolved "
                                          "configuration as JSON")):
        parser.add_argument(*flags, action="store_true", default=False, help=text)
    parser.add_argument("-V", "--version", action="version", version=f"loraxd {__version__}")
    groups = {section: parser.add_argument_group(f"[{section}]") for section in _SECTIONS}
    for key in _KEYS.values():
        names = (key.flag, key.short) if key.short else (key.flag,)
        options: dict[str, typing.Any] = {"dest": key.name, "help": _flag_help(key)}
        if key.kind == "bool":
            options["action"] = argparse.BooleanOptionalAction
        elif key.kind == "optbool":  # LoRAX's `--sharded true`
            options["metavar"] = "{true,false}"
        else:
            options["metavar"] = "{" + ",".join(key.choices) + "}" if key.choices \
                else key.kind.removeprefix("opt").removesuffix("s").upper()
            if key.kind == "strs":
                options["action"] = "append"
        groups[key.section].add_argument(*names, **options)
    add_lorax_only_flags(parser)
    return parser


def _config_file(flag: str | None, environ: Mapping[str, str], default_path: str) -> str | None:
    if flag is not None:
        return flag
    if environ.get("LORAXD_CONFIG"):
        return environ["LORAXD_CONFIG"]
    return default_path if os.path.exists(default_path) else None


def load(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None, *,
         default_config_path: str = DEFAULT_CONFIG_PATH,
         euid: int | None = None) -> tuple[Config, Actions]:
    """Resolve all sources; raise ConfigError (argparse errors too). --help exits 0.

    argv, environ, euid default to sys.argv[1:], os.environ, os.geteuid()."""
    argv = sys.argv[1:] if argv is None else list(argv)
    environ = os.environ if environ is None else environ
    euid = os.geteuid() if euid is None else euid
    args = build_parser().parse_args(argv)
    refuse_lorax_only(args, environ)
    config_file = _config_file(args.config, environ, default_config_path)
    settings = _defaults()
    if config_file is not None:
        settings.update(_from_tables(config_file, _read_toml(config_file), rank=1))
    settings.update(_from_env(environ))
    settings.update(_from_args(args))
    config = _build(settings, environ, euid)
    download_only = args.download_only or any(
        environ.get(name, "").strip().lower() in _TRUE
        for name in ("DOWNLOAD_ONLY", ENV_PREFIX + "DOWNLOAD_ONLY"))
    actions = Actions(download_only=download_only, check_config=args.check_config,
                      env=args.env, config_file=config_file)
    return config, actions


def load_or_exit(argv: Sequence[str] | None = None, environ: Mapping[str, str] | None = None,
                 *, default_config_path: str = DEFAULT_CONFIG_PATH) -> tuple[Config, Actions]:
    """`load`, or print the one-line error to stderr and exit with EXIT_CONFIG (78)."""
    try:
        return load(argv, environ, default_config_path=default_config_path)
    except ConfigError as exc:
        message = " ".join(str(exc).split("\n"))
        print(f"loraxd: {message}", file=sys.stderr)
        sys.exit(EXIT_CONFIG)


def config_from_tables(data: Mapping[str, Mapping[str, typing.Any]]) -> Config:
    """A Config from nested dicts, validated like a TOML file."""
    settings = _defaults()
    settings.update(_from_tables("config", data, rank=1))
    return _build(settings, os.environ, os.geteuid())
