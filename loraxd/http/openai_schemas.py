"""OpenAI request bodies in, OpenAI response shapes out (pure functions, no I/O).

A body's OpenAI names are mapped onto the native `parameters` names and validated by
`schemas.parse_parameters`, so both APIs share one set of rules. `model` names the base
model (its id, or "") or an adapter; the adapter's hub token comes only from the
`api_token` extra, never from the `Authorization` header (the openai client always sends
its API key there).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Mapping

from loraxd.engine.request import FinishEvent, PromptToken, TokenEvent
from loraxd.http.errors import ApiError
from loraxd.http.schemas import (GenerateParams, Limits, _bool, _check, _int, _str,
                                 parse_parameters)

MAX_N = 16  # choices per prompt
MAX_CHOICES = 64  # prompts x n in one request
MAX_LOGPROBS = 20  # alternatives per token
FINISH_REASONS = {"eos_token": "stop", "stop_sequence": "stop", "length": "length"}

# A logprob of -inf (or NaN) is sent as float32's lowest value, as on the native routes.
_LOWEST_LOGPROB = -3.4028234663852886e38


@dataclass(frozen=True)
class OpenAIRequest:
    """What a /v1 body asks for, besides the prompt or messages."""

    model: str  # echoed in every response
    params: GenerateParams
    n: int
    stream: bool
    include_usage: bool
    num_logprobs: int | None  # None: no logprobs; else top alternatives per token
    echo: bool = False


def parse_request(body: Mapping, *, chat: bool, limits: Limits,
                  base_model_id: str) -> OpenAIRequest:
    model = _str(body, "model") or ""
    stream = _bool(body, "stream")
    n = _int(body, "n")
    n = 1 if n is None else n
    _check(1 <= n <= MAX_N, f"`n` must be >= 1 and <= {MAX_N}. Given: {n}")
    num_logprobs = _chat_logprobs(body) if chat else _completion_logprobs(body)
    echo = False if chat else _bool(body, "echo")
    _check(not (stream and echo and num_logprobs is not None),
           "`echo` together with `logprobs` is not supported when streaming")
    _refuse_unsupported(body, chat)
    raw = {
        "adapter_id": None if model in ("", base_model_id) else model,
        "adapter_source": body.get("adapter_source"), "api_token": body.get("api_token"),
        "do_sample": True if n > 1 else None,  # n > 1 samples unless temperature is 0
        "max_new_tokens": _max_tokens(body, chat), "stop": _stop(body),
        "ignore_eos_token": _bool(body, "ignore_eos") or _bool(body, "ignore_eos_token"),
        "return_k_alternatives": num_logprobs or None,
        "decoder_input_details": echo and num_logprobs is not None,
        "response_format": body.get("response_format"),
    }
    for name in ("temperature", "top_p", "top_k", "seed", "presence_penalty",
                 "frequency_penalty", "repetition_penalty"):
        raw[name] = body.get(name)
    params = parse_parameters(raw, stream=stream, limits=limits, bearer_token=None)
    return OpenAIRequest(model=model or base_model_id, params=params, n=n, stream=stream,
                         include_usage=stream and _include_usage(body), num_logprobs=num_logprobs,
                         echo=echo)


def parse_prompts(body: Mapping) -> list[str]:
    """`prompt`: a string or a list of strings, none empty."""
    prompt = body.get("prompt")
    prompts = [prompt] if isinstance(prompt, str) else prompt
    _check(isinstance(prompts, list) and bool(prompts)
           and all(isinstance(p, str) for p in prompts),
           "`prompt` must be a string or a non-empty list of strings")
    _check(all(prompts), "`prompt` cannot be empty")
    return prompts


def check_num_choices(num_prompts: int, n: int) -> None:
    _check(num_prompts * n <= MAX_CHOICES,
           f"at most {MAX_CHOICES} choices per request (prompts x `n`). "
           f"Given: {num_prompts} x {n}")


def _max_tokens(body: Mapping, chat: bool) -> int | None:
    name = "max_completion_tokens" if chat and body.get("max_completion_tokens") is not None \
        else "max_tokens"
    value = _int(body, name)
    _check(value is None or value > 0, f"`{name}` must be strictly positive")
    return value


def _stop(body: Mapping) -> list | None:
    stop = body.get("stop")
    return [stop] if isinstance(stop, str) else stop  # a list is checked by parse_parameters


def _completion_logprobs(body: Mapping) -> int | None:
    k = _int(body, "logprobs")
    _check(k is None or 0 <= k <= MAX_LOGPROBS,
           f"`logprobs` must be >= 0 and <= {MAX_LOGPROBS}")
    return k


def _chat_logprobs(body: Mapping) -> int | None:
    k = _int(body, "top_logprobs")
    _check(k is None or 0 <= k <= MAX_LOGPROBS,
           f"`top_logprobs` must be >= 0 and <= {MAX_LOGPROBS}")
    if not _bool(body, "logprobs"):
        _check(not k, "`top_logprobs` needs `logprobs` set to true")
        return None
    return k or 0


def _include_usage(body: Mapping) -> bool:
    options = body.get("stream_options")
    if options is None:
        return False
    _check(isinstance(options, dict), "`stream_options` must be an object")
    return _bool(options, "include_usage")


def _refuse_unsupported(body: Mapping, chat: bool) -> None:
    """A constraint the engine cannot honour yet is refused, never silently dropped."""
    _check(not body.get("logit_bias"), "`logit_bias` is not supported yet")
    if not chat:
        _check(body.get("suffix") is None, "`suffix` is not supported")
        best_of = _int(body, "best_of")
        _check(best_of is None or best_of == 1,
               "`best_of` > 1 is not supported on /v1/completions; use `n`")
        return
    # tools, tool_choice, functions: loraxd.http.tools


# -- response shapes ----------------------------------------------------------------------------


def finite(value: float) -> float:
    return value if math.isfinite(value) else _LOWEST_LOGPROB


def finish_reason(finish: FinishEvent) -> str:
    return FINISH_REASONS.get(finish.finish_reason, "stop")


def usage(prompt_tokens: int, completion_tokens: int) -> dict:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_logprobs(tokens: list[TokenEvent], k: int, offset: int,
                        prefill: tuple[PromptToken, ...] = ()) -> dict:
    """Completions' shape; `offset`: where the first generated token's text starts.

    `prefill` (echo): the prompt's tokens first, offsets from 0, the first one's null.
    """
    out: dict[str, list] = {"tokens": [], "token_logprobs": [], "top_logprobs": [],
                            "text_offset": []}
    at = 0
    for j, p in enumerate(prefill):
        logprob = None if j == 0 or p.logprob is None else finite(p.logprob)
        out["tokens"].append(p.text)
        out["token_logprobs"].append(logprob)
        out["top_logprobs"].append(None if logprob is None else {p.text: logprob})
        out["text_offset"].append(at)
        at += len(p.text)
    for t in tokens:
        out["tokens"].append(t.text)
        out["token_logprobs"].append(finite(t.logprob))
        top: dict[str, float] = {}
        for a in t.alternatives[:k]:
            top.setdefault(a.text, finite(a.logprob))
        out["top_logprobs"].append(top)
        out["text_offset"].append(offset)
        offset += 0 if t.special else len(t.text)
    if not k:
        out["top_logprobs"] = None
    return out


def _bytes(text: str) -> list[int]:
    return list(text.encode("utf-8"))


def chat_logprobs(tokens: list[TokenEvent], k: int) -> dict:
    """Chat's shape: `{content: [{token, logprob, bytes, top_logprobs}], refusal}`."""
    return {"content": [
        {"token": t.text, "logprob": finite(t.logprob), "bytes": _bytes(t.text),
         "top_logprobs": [{"token": a.text, "logprob": finite(a.logprob), "bytes": _bytes(a.text)}
                          for a in t.alternatives[:k]]}
        for t in tokens], "refusal": None}


def error_body(err: ApiError) -> dict:
    """OpenAI's `{"error": {message, type, param, code}}`, plus the native `error_type`.

    The openai client picks its exception class from the status code alone and shows
    `error.message`; a string `error` would leave it with only "Error code: 422".
    """
    return {"error": {"message": err.message, "type": err.error_type, "param": None,
                      "code": err.status}, "error_type": err.error_type}
