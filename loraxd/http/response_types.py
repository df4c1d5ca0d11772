"""Response bodies as msgspec Structs, for /openapi.json.

The routes build their answers as plain dicts (native.py, openai.py, metrics.py); these
Structs state the shapes the clients rely on, and the schemathesis tests check every answer
against them. A field that may be left out is `UNSET`; one that may be null says `| None`.
Objects may carry more fields than are listed.
"""
from __future__ import annotations

from typing import Any, Literal

import msgspec
from msgspec import UNSET, UnsetType

FinishReason = Literal["length", "eos_token", "stop_sequence"]


class _Out(msgspec.Struct, kw_only=True):
    pass


# -- native ---------------------------------------------------------------------------------


class ErrorResponse(_Out):
    """Every native error; on the stream routes, one SSE event of this shape."""

    error: str
    error_type: str


class AlternativeToken(_Out):
    id: int
    text: str
    logprob: float


class Token(_Out):
    """A generated token; `logprob` is always a number (-inf is sent as float32's lowest)."""

    id: int
    text: str
    logprob: float
    special: bool
    skipped: bool
    alternative_tokens: list[AlternativeToken] | UnsetType = UNSET


class InputToken(_Out):
    """A prompt token (`decoder_input_details`); the first one's logprob is null."""

    id: int
    text: str
    logprob: float | None


class BestOfSequence(_Out):
    generated_text: str
    finish_reason: FinishReason
    generated_tokens: int
    seed: int | None
    prefill: list[InputToken]
    tokens: list[Token]


class Details(_Out):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    skipped_tokens: int
    seed: int | None
    prefill: list[InputToken]
    tokens: list[Token]
    best_of_sequences: list[BestOfSequence] | UnsetType = UNSET


class GenerateResponse(_Out):
    """`details` only when `details` or `decoder_input_details` was asked."""

    generated_text: str
    details: Details | UnsetType = UNSET


class StreamDetails(_Out):
    finish_reason: FinishReason
    prompt_tokens: int
    generated_tokens: int
    seed: int | None


class StreamResponse(_Out):
    """One `data:{json}` event of /generate_stream; the last one carries generated_text and
    (when asked) details. There is no `[DONE]`."""

    token: Token
    generated_text: str | None
    details: StreamDetails | None


class TokenizedToken(_Out):
    id: int
    text: str
    start: int
    stop: int


class RankSummary(_Out):
    """One tensor-parallel rank: where it runs and what it holds (its shard's bytes)."""

    rank: int
    device: str
    state: str
    weight_bytes: int
    kv_cache_bytes: int
    rss_bytes: int  # the process's resident memory
    device_name: str  # CUDA only, from NVML; else ""
    device_total_bytes: int  # CUDA only, now; else 0
    device_free_bytes: int
    device_used_bytes: int
    gpu_utilization: float | None  # CUDA only, 0..1, now; None where NVML cannot say
    gpu_memory_utilization: float | None


class Info(_Out):
    model_id: str
    max_concurrent_requests: int
    max_best_of: int
    max_stop_sequences: int
    max_input_length: int
    max_total_tokens: int
    version: str
    model_dtype: str | UnsetType = UNSET
    quantize: str | None | UnsetType = UNSET  # "int8-weight-only", or null: none
    model_device_type: str | UnsetType = UNSET
    max_batch_total_tokens: int | UnsetType = UNSET
    adapter_source: str | UnsetType = UNSET
    num_shard: int | UnsetType = UNSET
    ranks: list[RankSummary] | UnsetType = UNSET


class Metrics(_Out):
    """GET /metrics with `Accept: application/json`; else Prometheus text."""

    model_id: str
    num_requests_waiting: int
    num_requests_running: int
    kv_cache_usage: float
    num_steps: int
    max_lora: int
    num_adapters_loaded: int
    running_lora_adapters: list[str]
    waiting_lora_adapters: list[str]
    adapter_tiers: dict[str, str]  # public adapter id -> device | host | disk


# -- OpenAI ---------------------------------------------------------------------------------


class OpenAIErrorDetail(_Out):
    message: str
    type: str
    param: str | None
    code: int


class OpenAIErrorResponse(_Out):
    """OpenAI's error shape (the openai client shows `error.message`), plus `error_type`."""

    error: OpenAIErrorDetail
    error_type: str


class Usage(_Out):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionLogprobs(_Out):
    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None] | None
    text_offset: list[int]


class CompletionChoice(_Out):
    index: int
    text: str
    logprobs: CompletionLogprobs | None
    finish_reason: str | None


class Completion(_Out):
    """Also each `data: {json}` chunk of the stream (`usage` null or left out), which ends
    with `data: [DONE]`."""

    id: str
    object: Literal["text_completion"]
    created: int
    model: str
    choices: list[CompletionChoice]
    usage: Usage | None | UnsetType = UNSET


class TopLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]


class ChatTokenLogprob(_Out):
    token: str
    logprob: float
    bytes: list[int]
    top_logprobs: list[TopLogprob]


class ChatLogprobs(_Out):
    content: list[ChatTokenLogprob]
    refusal: None


class ChatMessageOut(_Out):
    role: str
    content: str


class ChatChoice(_Out):
    index: int
    message: ChatMessageOut
    logprobs: ChatLogprobs | None
    finish_reason: str


class ChatCompletion(_Out):
    id: str
    object: Literal["chat.completion"]
    created: int
    model: str
    choices: list[ChatChoice]
    usage: Usage


class ChatDelta(_Out):
    role: str | UnsetType = UNSET
    content: str | UnsetType = UNSET


class ChatChunkChoice(_Out):
    index: int
    delta: ChatDelta
    logprobs: ChatLogprobs | None
    finish_reason: str | None


class ChatCompletionChunk(_Out):
    """One `data: {json}` chunk of a chat stream, which ends with `data: [DONE]`."""

    id: str
    object: Literal["chat.completion.chunk"]
    created: int
    model: str
    choices: list[ChatChunkChoice]
    usage: Usage | None | UnsetType = UNSET


class Model(_Out):
    id: str
    object: Literal["model"]
    created: int
    owned_by: str
    root: str | UnsetType = UNSET
    parent: str | UnsetType = UNSET


class ModelList(_Out):
    object: Literal["list"]
    data: list[Model]


OpenAPIDocument = dict[str, Any]
