"""Validation of the native `parameters` object into `GenerateParams`: LoRAX's
parameters, with its bounds.

Pure functions, no I/O: every rule that needs only the body and the configured limits lives
here; the rules that need the prompt's token count are in service.py. The OpenAI routes
translate their fields to these names and call `parse_parameters` too, so both APIs share
one set of rules and messages. Every failure is a 422 `validation` ApiError.
"""
from __future__ import annotations

import math
import secrets
from dataclasses import dataclass
from typing import Any, Mapping

from loraxd.engine.request import AdapterRef, MergedAdapters
from loraxd.http.errors import validation_error
from loraxd.http.request_types import MIN_DENSITY, MIN_FACTOR
from loraxd.http.response_format import response_schema
from loraxd.protocol.worker import SamplingParams

ADAPTER_SOURCES = ("hub", "local", "s3", "pbase")
MERGE_STRATEGIES = ("linear", "ties", "dare_linear", "dare_ties")
MAJORITY_SIGN_METHODS = ("total", "frequency")
SEED_MODULUS = 2**64  # seeds are uint64


@dataclass(frozen=True)
class Limits:
    max_best_of: int
    max_stop_sequences: int
    max_input_length: int
    max_total_tokens: int
    default_adapter_source: str
    default_adapter_id: str | None = None  # for requests that name no adapter

    @classmethod
    def from_config(cls, config: Any) -> Limits:
        sched = config.scheduler
        return cls(max_best_of=sched.max_best_of, max_stop_sequences=sched.max_stop_sequences,
                   max_input_length=sched.max_input_length,
                   max_total_tokens=sched.max_total_tokens,
                   default_adapter_source=config.adapters.adapter_source,
                   default_adapter_id=config.adapters.adapter_id)


@dataclass(frozen=True)
class GenerateParams:
    sampling: SamplingParams  # seed: the first sequence's (random when sampling and none given)
    max_new_tokens: int | None  # None: max_total_tokens - input length
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    truncate: int | None = None
    adapter: AdapterRef | None = None  # None: the base model (or merged)
    merged: MergedAdapters | None = None
    best_of: int = 1
    return_full_text: bool = False
    details: bool = False
    decoder_input_details: bool = False
    response_schema: str | None = None  # the JSON schema the output must satisfy

    @property
    def seed(self) -> int | None:
        """The seed to report: null unless sampling."""
        return self.sampling.seed if self.sampling.do_sample else None

    @property
    def with_details(self) -> bool:
        return self.details or self.decoder_input_details


# -- typed readers: absent and null are the same ----------------------------------------------


def _bool(p: Mapping, name: str, default: bool = False) -> bool:
    value = p.get(name)
    if value is None:
        return default
    if not isinstance(value, bool):
        raise validation_error(f"`{name}` must be a boolean")
    return value


def _int(p: Mapping, name: str) -> int | None:
    value = p.get(name)
    if value is None:
        return None
    if isinstance(value, float) and value.is_integer():
        value = int(value)
    if isinstance(value, bool) or not isinstance(value, int):
        raise validation_error(f"`{name}` must be an integer")
    return value


def _float(p: Mapping, name: str) -> float | None:
    value = p.get(name)
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
        raise validation_error(f"`{name}` must be a number")
    return float(value)


def _str(p: Mapping, name: str) -> str | None:
    value = p.get(name)
    if value is not None and not isinstance(value, str):
        raise validation_error(f"`{name}` must be a string")
    return value


def _str_list(p: Mapping, name: str) -> list[str]:
    value = p.get(name)
    if value is None:
        return []
    if not isinstance(value, list) or not all(isinstance(v, str) for v in value):
        raise validation_error(f"`{name}` must be a list of strings")
    return value


def _check(ok: bool, what: str) -> None:
    if not ok:
        raise validation_error(what)


# -- the rules ------------------------------------------------------------------------------


def parse_inputs(body: Mapping) -> str:
    inputs = body.get("inputs")
    _check(isinstance(inputs, str), "`inputs` must be a string")
    _check(bool(inputs), "`inputs` cannot be empty")
    return inputs


def parse_parameters(raw: Any, *, stream: bool, limits: Limits,
                     bearer_token: str | None = None) -> GenerateParams:
    """Validate the `parameters` object; `bearer_token` is the Authorization header's token."""
    if raw is None:
        raw = {}
    _check(isinstance(raw, dict), "`parameters` must be an object")
    sampling = _sampling(raw)
    best_of = _best_of(raw, sampling.do_sample, stream, limits)
    decoder_input_details = _bool(raw, "decoder_input_details")
    _check(not (stream and decoder_input_details),
           "`decoder_input_details` == true is not supported when streaming tokens")
    schema = response_schema(raw.get("response_format"))
    ignore_eos = _bool(raw, "ignore_eos_token")
    _check(not (ignore_eos and schema is not None),
           "`ignore_eos_token` cannot be combined with a JSON `response_format`: the output "
           "ends where the JSON does")
    adapter, merged = _adapters(raw, limits, bearer_token)
    return GenerateParams(
        sampling=sampling, max_new_tokens=_max_new_tokens(raw), stop=_stop(raw, limits),
        ignore_eos=ignore_eos, truncate=_truncate(raw, limits),
        adapter=adapter, merged=merged, best_of=best_of,
        return_full_text=_bool(raw, "return_full_text"), details=_bool(raw, "details"),
        decoder_input_details=decoder_input_details, response_schema=schema)


def _sampling(p: Mapping) -> SamplingParams:
    temperature = _float(p, "temperature")
    _check(temperature is None or temperature >= 0, "`temperature` must be >= 0")
    _check(temperature is None or temperature == 0 or temperature >= MIN_FACTOR,
           f"`temperature` must be 0 (greedy) or at least {MIN_FACTOR:g}: a tinier one "
           "overflows the scores")
    top_k = _int(p, "top_k")
    _check(top_k is None or top_k > 0, "`top_k` must be strictly positive")
    top_p = _float(p, "top_p")
    _check(top_p is None or 0 < top_p <= 1, "`top_p` must be > 0.0 and <= 1.0")
    typical_p = _float(p, "typical_p")
    _check(typical_p is None or 0 < typical_p < 1, "`typical_p` must be > 0.0 and < 1.0")
    repetition_penalty = _float(p, "repetition_penalty")
    _check(repetition_penalty is None or repetition_penalty > 0,
           "`repetition_penalty` must be strictly positive")
    penalties = {}
    for name in ("frequency_penalty", "presence_penalty"):
        value = _float(p, name)
        _check(value is None or -2 <= value <= 2, f"`{name}` must be >= -2.0 and <= 2.0")
        penalties[name] = 0.0 if value is None else value
    seed = _int(p, "seed")
    _check(seed is None or 0 <= seed < SEED_MODULUS, "`seed` must be an integer in [0, 2^64)")
    num_alternatives = _int(p, "return_k_alternatives")
    _check(num_alternatives is None or num_alternatives > 0,
           "`return_k_alternatives` must be strictly positive")

    do_sample = _bool(p, "do_sample") or (temperature is not None and temperature != 1.0) or any(
        v is not None for v in (top_k, top_p, typical_p))
    if temperature == 0:
        do_sample = False  # temperature 0 means greedy, whatever the other knobs say
    if do_sample and seed is None:
        seed = secrets.randbits(64)  # reported back, so the sample can be reproduced
    return SamplingParams(
        do_sample=do_sample, temperature=temperature if temperature else 1.0,
        top_k=top_k or 0, top_p=1.0 if top_p is None else top_p,
        typical_p=1.0 if typical_p is None else typical_p,
        repetition_penalty=1.0 if repetition_penalty is None else repetition_penalty,
        seed=seed if do_sample else 0, num_alternatives=num_alternatives or 0,
        prompt_logprobs=_bool(p, "decoder_input_details"), watermark=_bool(p, "watermark"),
        **penalties)


def _best_of(p: Mapping, do_sample: bool, stream: bool, limits: Limits) -> int:
    best_of = _int(p, "best_of")
    if best_of is None:
        return 1
    _check(0 < best_of <= limits.max_best_of,
           f"`best_of` must be > 0 and <= {limits.max_best_of}. Given: {best_of}")
    _check(best_of == 1 or do_sample, "you must use sampling when `best_of` is > 1")
    _check(best_of == 1 or not stream, "`best_of` != 1 is not supported when streaming tokens")
    return best_of


def _max_new_tokens(p: Mapping) -> int | None:
    value = _int(p, "max_new_tokens")
    _check(value is None or value > 0, "`max_new_tokens` must be strictly positive")
    return value


def _stop(p: Mapping, limits: Limits) -> tuple[str, ...]:
    stop = _str_list(p, "stop")
    _check(len(stop) <= limits.max_stop_sequences,
           f"`stop` must have at most {limits.max_stop_sequences} sequences. Given: {len(stop)}")
    _check(all(stop), "`stop` sequences cannot be empty strings")
    return tuple(stop)


def _truncate(p: Mapping, limits: Limits) -> int | None:
    value = _int(p, "truncate")
    _check(value is None or 0 < value <= limits.max_input_length,
           f"`truncate` must be strictly positive and at most {limits.max_input_length}. "
           f"Given: {value}")
    return value


def _adapters(p: Mapping, limits: Limits,
              bearer_token: str | None) -> tuple[AdapterRef | None, MergedAdapters | None]:
    adapter_id = _str(p, "adapter_id")
    source = _str(p, "adapter_source")
    _check(source is None or source in ADAPTER_SOURCES,
           f"`adapter_source={source}` must be one of {', '.join(ADAPTER_SOURCES)}")
    source = source or limits.default_adapter_source
    token = _str(p, "api_token") or bearer_token
    raw_merged = p.get("merged_adapters")
    _check(not (adapter_id is not None and raw_merged is not None),
           "you must specify at most one of `adapter_id` or `merged_adapters`")
    if raw_merged is not None:
        return None, _merged(raw_merged, source, token)
    if not adapter_id:
        return None, None
    return AdapterRef(adapter_id=adapter_id, source=source, api_token=token), None


def _merged(raw: Any, source: str, token: str | None) -> MergedAdapters:
    _check(isinstance(raw, dict), "`merged_adapters` must be an object")
    ids = _str_list(raw, "ids")
    _check(len(ids) > 0 and all(ids), "`merged_adapters.ids` must hold at least one adapter id")
    weights = raw.get("weights")
    _check(isinstance(weights, list) and all(
        isinstance(w, (int, float)) and not isinstance(w, bool) and math.isfinite(w)
        for w in weights), "`merged_adapters.weights` must be a list of numbers")
    _check(len(weights) == len(ids),
           "`merged_adapters.weights` must have the same length as `merged_adapters.ids`")
    strategy = _str(raw, "merge_strategy") or "linear"
    _check(strategy in MERGE_STRATEGIES,
           f"`merge_strategy={strategy}` must be one of {', '.join(MERGE_STRATEGIES)}")
    density = _float(raw, "density")
    density = 1.0 if density is None else density
    _check(0 <= density <= 1, "`density` must be >= 0.0 and <= 1.0")
    _check(density == 0 or density >= MIN_DENSITY,
           f"`density` must be 0 or at least {MIN_DENSITY:g}: DARE divides by it")
    sign = _str(raw, "majority_sign_method") or "total"
    _check(sign in MAJORITY_SIGN_METHODS,
           f"`majority_sign_method={sign}` must be one of {', '.join(MAJORITY_SIGN_METHODS)}")
    return MergedAdapters(ids=tuple(ids), weights=tuple(float(w) for w in weights),
                          merge_strategy=strategy, density=density, majority_sign_method=sign,
                          source=source, api_token=token)


def bearer_token(authorization: str | None) -> str | None:
    """The token of an `Authorization: Bearer <token>` header, else None."""
    if not authorization:
        return None
    scheme, _, token = authorization.partition(" ")
    token = token.strip()
    return token if scheme.lower() == "bearer" and token else None
