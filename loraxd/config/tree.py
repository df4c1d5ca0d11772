"""The configuration tree: the section dataclasses are the one table of settings. A field's
name, type, default and metadata give its TOML key, environment name, flag, help text and
rule (see loader.py, which reads them). Key names are unique across sections.
"""
from __future__ import annotations

import dataclasses
import os
import typing
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from urllib.parse import urlsplit

DEFAULT_CONFIG_PATH = "/etc/loraxd/loraxd.toml"
ENV_PREFIX = "LORAXD_"
EXIT_CONFIG = 78  # EX_CONFIG from sysexits.h

DTYPES = ("float32", "bfloat16", "float16", "auto")
LOG_LEVELS = ("debug", "info", "warning", "error")
DEVICES = ("cpu", "cuda", "auto")
ADAPTER_SOURCES = ("hub", "local", "s3", "pbase")
MODEL_SOURCES = ("hub", "local", "s3", "pbase")  # LoRAX's; s3 and pbase are refused


# max_batch_total_tokens on a CPU when unset: a CPU's memory says little about what a
# batch there can use, so the KV cache keeps the size it always had
CPU_KV_TOKENS = 32768


class ConfigError(Exception):
    """A configuration problem; the message is one line: source, key, value, reason."""


Rule = Callable[[typing.Any], "str | None"]


def _rule(ok: Callable[[typing.Any], bool], reason: str) -> Rule:
    """A rule returns why a well-typed value is wrong, or None."""
    return lambda value: None if ok(value) else reason


_POSITIVE_INT = _rule(lambda v: v > 0, "must be a positive integer")
_POSITIVE = _rule(lambda v: v > 0, "must be greater than 0")
_NON_NEGATIVE = _rule(lambda v: v >= 0, "must not be negative")
_PORT = _rule(lambda v: 1 <= v <= 65535, "must be between 1 and 65535")
_PORT_OR_ZERO = _rule(lambda v: 0 <= v <= 65535, "must be between 0 (pick a free one) and "
                      "65535")
_NON_EMPTY = _rule(lambda v: bool(v.strip()), "must not be empty")
_NO_EMPTY_ITEMS = _rule(lambda v: all(i.strip() for i in v), "must not contain empty entries")
_ROUTES = _rule(lambda v: all(i.startswith("/") for i in v),
                "entries must be paths starting with /")


def _is_http_url(value: str) -> bool:
    try:
        parts = urlsplit(value)
        parts.port  # noqa: B018 - raises ValueError for a port that is no number
    except ValueError:
        return False
    return parts.scheme in ("http", "https") and bool(parts.hostname)


_OTLP_URL = _rule(_is_http_url, "must be an http:// or https:// URL of an OTLP/HTTP collector, "
                  "e.g. http://127.0.0.1:4318")


_FRACTION = _rule(lambda v: 0 < v <= 1, "must be greater than 0 and at most 1")

QUANTIZE_METHODS = ("int8-weight-only",)
# LoRAX's --quantize values: recognized, so that each is refused naming what is built instead
LORAX_QUANTIZE_METHODS = ("bitsandbytes", "bitsandbytes-nf4", "bitsandbytes-fp4", "gptq", "awq",
                          "eetq", "exl2", "fp8", "fp8-kv", "hqq-4bit", "hqq-3bit", "hqq-2bit")


def _quantize_reason(value: str) -> str | None:
    if value in QUANTIZE_METHODS:
        return None
    built = f"built: {', '.join(QUANTIZE_METHODS)} (8-bit weights, per-channel scales, CPU)"
    if value in LORAX_QUANTIZE_METHODS:
        return f"LoRAX's {value} quantization is not built; {built}"
    return f"unknown quantization; {built}"


_MODEL_SOURCE = _rule(lambda v: v in ("hub", "local"),
                      "only hub and local models are built yet (adapters may come from s3)")


def _setting(default: object, help: str, rule: Rule | None = None, *,
             choices: tuple[str, ...] = (), flag: str | None = None,
             short: str | None = None, reload: bool = False, lorax: bool = False) -> typing.Any:
    """`reload=True`: a reload (SIGHUP, `loraxctl reload`) applies it live; any other
    setting changed in the file waits for a restart. `lorax=True`: LoRAX's launcher has this
    flag, and its environment name (the key in capitals, no prefix) is read too."""
    meta = {"help": help, "rule": rule, "choices": choices, "flag": flag, "short": short,
            "reload": reload, "lorax": lorax}
    return field(default=default, metadata=meta)


@dataclass(frozen=True)
class ModelConfig:
    model_id: str = _setting("HuggingFaceTB/SmolLM2-135M-Instruct",
                             "base model: a local directory or a Hugging Face Hub id", _NON_EMPTY,
                             lorax=True)
    source: str = _setting("hub", "where model_id is found: hub (a Hub id, or a local "
                           "directory), local (a local directory only, never downloaded)",
                           _MODEL_SOURCE, choices=MODEL_SOURCES, lorax=True)
    revision: str | None = _setting(None, "Hub revision (branch, tag or commit) of the model",
                                    lorax=True)
    dtype: str = _setting("float32", "weights and activations; auto: bfloat16 on cuda, "
                          "else float32 (bfloat16 on a CPU needs AVX512_BF16 or AMX)",
                          choices=DTYPES, lorax=True)
    quantize: str | None = _setting(
        None, "int8-weight-only: the decoder layers' weights held as int8 with a scale per "
        "output channel (CPU only; the embedding and LM head stay in dtype); unset: none",
        _quantize_reason, lorax=True)
    device: str = _setting("auto", "auto: cuda when NVML shows a GPU, else cpu",
                           choices=DEVICES)
    compile: bool = _setting(
        False, "replay decode steps of up to 128 sequences from CUDA graphs captured at start "
        "(adapters included; other steps run eagerly): device cuda with the Triton kernels, "
        "one shard", lorax=True)
    cuda_memory_fraction: float = _setting(
        1.0, "share of each GPU's memory this daemon may take (weights, LoRA slots, KV cache, "
        "activations); with max_batch_total_tokens unset the KV cache gets what is left. A "
        "CPU has no such share: only 1.0 there", _FRACTION, lorax=True)
    num_shard: int = _setting(1, "tensor-parallel ranks, one worker process each (rank i "
                              "on GPU i); each holds 1/num_shard of the weights and KV cache",
                              _POSITIVE_INT, lorax=True)
    sharded: bool | None = _setting(None, "true: num_shard must be over 1; false: it must be "
                                    "1; unset: as num_shard says", lorax=True)
    master_addr: str = _setting("127.0.0.1", "address where the tensor-parallel ranks meet "
                                "(rank 0 listens there); used when num_shard > 1", _NON_EMPTY,
                                lorax=True)
    master_port: int = _setting(0, "TCP port where the tensor-parallel ranks meet; 0: a free "
                                "port picked at each start", _PORT_OR_ZERO, lorax=True)
    huggingface_hub_cache: str | None = _setting(None, "Hub cache directory; unset: the Hub's",
                                                 lorax=True)
    weights_cache_override: str | None = _setting(
        None, "directory holding the model's files (config, tokenizer, weights), read instead "
        "of model_id's; model_id still names the model", lorax=True)


@dataclass(frozen=True)
class ServerConfig:
    hostname: str = _setting("127.0.0.1", "address the HTTP server listens on", _NON_EMPTY)
    port: int = _setting(3000, "TCP port of the HTTP server", _PORT, short="-p", lorax=True)
    cors_allow_origin: tuple[str, ...] = _setting((), "origins allowed by CORS (repeatable flag)",
                                                  _NO_EMPTY_ITEMS, lorax=True)
    json_output: bool = _setting(False, "write log lines as JSON", lorax=True)
    otlp_endpoint: str | None = _setting(
        None, "OpenTelemetry collector that gets one trace per generation request, over "
        "OTLP/HTTP with protobuf only (not LoRAX's OTLP/gRPC, port 4317): e.g. "
        "http://127.0.0.1:4318, to which /v1/traces is added when the URL has no path; "
        "unset: no tracing", _OTLP_URL, lorax=True)
    validation_workers: int = _setting(1, "threads that tokenize and check prompts",
                                       _POSITIVE_INT, lorax=True)
    metrics_adapter_labels: int = _setting(
        100, "adapter ids named in /metrics labels; further adapters count as <other>",
        _NON_NEGATIVE)
    log_level: str = _setting("info", "least severe log level written", choices=LOG_LEVELS,
                              reload=True)
    drain_timeout_s: float = _setting(
        30.0, "seconds a stop waits for running requests to finish before cutting them off",
        _NON_NEGATIVE, reload=True)
    max_request_bytes: int = _setting(2_097_152, "largest HTTP request body", _POSITIVE_INT)
    api_keys_file: str | None = _setting(
        None, "TOML file of API keys, re-read on SIGHUP; unset: no key needed "
        "($CREDENTIALS_DIRECTORY in it is expanded)")
    public_routes: tuple[str, ...] = _setting(
        ("/health",), "routes served without an API key (repeatable flag)", _ROUTES,
        flag="--public-route")
    stream_write_timeout_s: float = _setting(
        30.0, "seconds a stream's written tokens may wait unread before the client is dropped",
        _POSITIVE, reload=True)
    header_read_timeout_s: float = _setting(
        10.0, "seconds a client has to send a request's headers, from its first byte",
        _POSITIVE, reload=True)
    body_read_timeout_s: float = _setting(30.0, "seconds a client has to send a request body",
                                          _POSITIVE, reload=True)


@dataclass(frozen=True)
class SchedulerConfig:
    max_concurrent_requests: int = _setting(128, "requests in flight before 429", _POSITIVE_INT,
                                            reload=True, lorax=True)
    max_best_of: int = _setting(2, "largest best_of of a request", _POSITIVE_INT, reload=True,
                                lorax=True)
    max_stop_sequences: int = _setting(4, "most stop sequences of a request", _NON_NEGATIVE,
                                       reload=True, lorax=True)
    max_input_length: int = _setting(1024, "most prompt tokens of a request", _POSITIVE_INT,
                                     reload=True, lorax=True)
    max_total_tokens: int = _setting(2048, "most prompt + generated tokens of a request",
                                     _POSITIVE_INT, reload=True, lorax=True)
    max_batch_prefill_tokens: int = _setting(4096, "most prompt tokens prefilled in one step",
                                             _POSITIVE_INT, reload=True, lorax=True)
    max_batch_total_tokens: int | None = _setting(
        None, "most tokens the KV cache holds for the running batch; unset: on CUDA as many "
        f"as fit (see cuda_memory_fraction), on a CPU {CPU_KV_TOKENS}", _POSITIVE_INT,
        lorax=True)
    waiting_served_ratio: float = _setting(
        0.0, "waiting/running ratio above which waiting requests join a running batch (0: "
        "at every step)", _NON_NEGATIVE, reload=True, lorax=True)
    max_waiting_tokens: int = _setting(20, "decode steps before waiting requests may join",
                                       _POSITIVE_INT, reload=True, lorax=True)
    block_size: int = _setting(16, "KV cache page size in tokens", _POSITIVE_INT)
    prefill_chunk_tokens: int = _setting(
        16, "while sequences decode, prompts longer than this share this many tokens a step: "
        "a long prompt is prefilled in slices between their tokens (0: in one step)",
        _NON_NEGATIVE, reload=True)
    prefix_caching: bool = _setting(True, "keep full KV pages for later requests whose "
                                    "context starts the same, under the same adapter")


@dataclass(frozen=True)
class AdapterConfig:
    adapter_id: str | None = _setting(
        None, "default adapter of requests that name none; loaded at start and kept loaded",
        lorax=True)
    adapter_source: str = _setting("hub", "where adapter ids are looked up unless a request says",
                                   choices=ADAPTER_SOURCES, reload=True, lorax=True)
    max_active_adapters: int = _setting(32, "adapter slots on the device", _POSITIVE_INT,
                                        lorax=True)
    adapter_cycle_time_s: float = _setting(
        2.0, "seconds an adapter keeps the batch before waiting adapters get a turn", _POSITIVE,
        reload=True, lorax=True)
    local_adapter_dirs: tuple[str, ...] = _setting(
        (), "directories holding local adapters (repeatable flag)", _NO_EMPTY_ITEMS,
        flag="--local-adapter-dir", reload=True)
    preloaded_adapter_ids: tuple[str, ...] = _setting(
        (), "adapters loaded at startup and kept loaded (repeatable flag)", _NO_EMPTY_ITEMS,
        flag="--preloaded-adapter-id", reload=True)
    adapter_memory_bytes: int = _setting(2_147_483_648, "host-memory budget of the adapter LRU",
                                         _POSITIVE_INT)
    max_lora_rank: int = _setting(64, "largest adapter rank served; slots are sized for it",
                                  _POSITIVE_INT)
    max_adapter_bytes: int = _setting(
        1_073_741_824, "largest adapter weights, on disk and in memory", _POSITIVE_INT)
    adapter_cache_bytes: int = _setting(
        21_474_836_480, "disk budget of downloaded adapters; least recently used go first",
        _POSITIVE_INT)
    max_adapter_downloads: int = _setting(4, "adapter downloads (hub, s3) run at once",
                                          _POSITIVE_INT)
    adapter_fetch_timeout_s: float = _setting(
        300.0, "seconds an adapter download may take before its requests fail", _POSITIVE,
        reload=True)


@dataclass(frozen=True)
class PathsConfig:
    """Empty paths are derived (see `default_paths`); control_socket follows runtime_dir."""

    runtime_dir: str = _setting("", "sockets; /run/loraxd as root, else "
                                    "$XDG_RUNTIME_DIR/loraxd or /tmp/loraxd-<uid>")
    control_socket: str = _setting("", "loraxctl's socket; <runtime_dir>/control.sock")
    cache_dir: str = _setting("", "downloads; /var/cache/loraxd as root, else "
                                  "$XDG_CACHE_HOME/loraxd or ~/.cache/loraxd")
    shard_uds_path: str = _setting("", "the socket the workers connect to; "
                                       "<runtime_dir>/workers.sock", lorax=True)

    def __post_init__(self) -> None:
        runtime_dir, cache_dir = default_paths(os.environ, os.geteuid())
        runtime_dir = self.runtime_dir or runtime_dir
        object.__setattr__(self, "runtime_dir", runtime_dir)
        object.__setattr__(self, "cache_dir", self.cache_dir or cache_dir)
        object.__setattr__(self, "control_socket",
                           self.control_socket or os.path.join(runtime_dir, "control.sock"))
        object.__setattr__(self, "shard_uds_path",
                           self.shard_uds_path or os.path.join(runtime_dir, "workers.sock"))


@dataclass(frozen=True)
class WorkerConfig:
    num_threads: int = _setting(0, "torch threads per worker; 0: all cores", _NON_NEGATIVE)
    ready_timeout_s: float = _setting(
        900.0, "seconds a worker may take to report Ready; with num_shard > 1, also each wait "
        "of a rank in a collective", _POSITIVE, reload=True)
    step_timeout_floor_s: float = _setting(
        10.0, "seconds every step may take, whatever its size, before its worker counts as "
        "hung and is replaced", _POSITIVE, reload=True)
    step_timeout_factor: float = _setting(
        20.0, "a step may also take this many times its predicted time (from the steps "
        "measured so far)", _POSITIVE, reload=True)
    heartbeat_interval_s: float = _setting(1.0, "seconds between pings of an idle worker",
                                           _POSITIVE, reload=True)
    heartbeat_timeout_s: float = _setting(
        10.0, "seconds an idle worker may leave a ping unanswered before it counts as hung",
        _POSITIVE, reload=True)
    max_restarts: int = _setting(
        5, "worker restarts within restart_window_s; one more and the daemon exits 1 (for "
        "systemd to restart it)", _NON_NEGATIVE, reload=True)
    restart_window_s: float = _setting(600.0, "the window max_restarts counts over",
                                       _POSITIVE, reload=True)
    restart_backoff_s: float = _setting(
        0.5, "delay before a restart; it doubles with each restart in the window, to 30 s",
        _NON_NEGATIVE, reload=True)
    watermark_gamma: float = _setting(
        0.5, "share of the vocabulary in each green list of a request's watermark "
        "(Kirchenbauer et al.)", _rule(lambda v: 0 < v < 1, "must be between 0 and 1"), lorax=True)
    watermark_delta: float = _setting(
        2.0, "logit bias a watermark adds to the green tokens",
        _rule(lambda v: 0 <= v <= 100, "must be between 0 and 100"), lorax=True)


@dataclass(frozen=True)
class Config:
    model: ModelConfig = field(default_factory=ModelConfig)
    server: ServerConfig = field(default_factory=ServerConfig)
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)
    adapters: AdapterConfig = field(default_factory=AdapterConfig)
    paths: PathsConfig = field(default_factory=PathsConfig)
    worker: WorkerConfig = field(default_factory=WorkerConfig)

    def to_dict(self) -> dict[str, dict[str, typing.Any]]:
        """Plain nested dict (tuples become lists): JSON- and msgpack-able."""
        return {section: {name: list(value) if isinstance(value, tuple) else value
                          for name, value in dataclasses.asdict(getattr(self, section)).items()}
                for section in SECTION_NAMES}

    @classmethod
    def from_dict(cls, data: Mapping[str, Mapping[str, typing.Any]]) -> Config:
        """The inverse of `to_dict`, validated like a TOML file (a reload checks so)."""
        from loraxd.config.loader import config_from_tables
        return config_from_tables(data)


@dataclass(frozen=True)
class Actions:
    """What the command line asks for besides configuration."""

    download_only: bool = False  # fetch the model and preloaded adapters, then exit
    check_config: bool = False  # validate and exit
    env: bool = False  # print the resolved config as JSON
    config_file: str | None = None  # the TOML file that was read, if any


def default_paths(environ: Mapping[str, str], euid: int) -> tuple[str, str]:
    """(runtime_dir, cache_dir): the directories systemd made for the service
    (RuntimeDirectory=, CacheDirectory=) when it did, else system dirs as root, else XDG
    dirs. Under the shipped unit (User=loraxd) that puts the control socket in /run/loraxd,
    where loraxctl looks."""
    systemd_runtime = _first_dir(environ.get("RUNTIME_DIRECTORY"))
    systemd_cache = _first_dir(environ.get("CACHE_DIRECTORY"))
    if euid == 0:
        runtime_dir, cache_dir = "/run/loraxd", "/var/cache/loraxd"
    else:
        xdg_runtime = environ.get("XDG_RUNTIME_DIR", "")
        xdg_cache = environ.get("XDG_CACHE_HOME", "")
        home = environ.get("HOME") or os.path.expanduser("~")
        runtime_dir = (os.path.join(xdg_runtime, "loraxd") if os.path.isabs(xdg_runtime)
                       else f"/tmp/loraxd-{euid}")
        cache_dir = os.path.join(xdg_cache if os.path.isabs(xdg_cache)
                                 else os.path.join(home, ".cache"), "loraxd")
    return systemd_runtime or runtime_dir, systemd_cache or cache_dir


def _first_dir(value: str | None) -> str | None:
    """systemd lists several directories colon-separated; the unit names one."""
    first = (value or "").split(":")[0]
    return first if os.path.isabs(first) else None


def reloadable(section: str, name: str) -> bool:
    """Whether a reload applies this setting live (else it waits for a restart)."""
    cls = typing.get_type_hints(Config)[section]
    return bool({f.name: f for f in dataclasses.fields(cls)}[name].metadata.get("reload"))


SECTION_NAMES = tuple(f.name for f in dataclasses.fields(Config))
