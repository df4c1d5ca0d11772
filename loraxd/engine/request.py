"""What the frontend hands the engine, and what the engine streams back.

Plain data, no I/O: the HTTP layer builds a `GenerationRequest` from a validated body and
reads `TokenEvent`s followed by one `FinishEvent` from `AsyncEngine.generate`.
"""
from __future__ import annotations

from dataclasses import dataclass, field

from loraxd.protocol.worker import SamplingParams


@dataclass(frozen=True)
class AdapterRef:
    """Adapter identity is (source, id); the token is checked on every request."""

    adapter_id: str
    source: str  # hub | local | s3
    api_token: str | None = None


@dataclass(frozen=True)
class MergedAdapters:
    ids: tuple[str, ...]
    weights: tuple[float, ...]
    merge_strategy: str = "linear"  # linear | ties | dare_linear | dare_ties
    density: float = 1.0
    majority_sign_method: str = "total"  # total | frequency
    source: str = "hub"
    api_token: str | None = None

    @property
    def components(self) -> tuple[AdapterRef, ...]:
        return tuple(AdapterRef(i, self.source, self.api_token) for i in self.ids)


@dataclass(frozen=True)
class GenerationRequest:
    prompt_ids: list[int]
    max_new_tokens: int
    sampling: SamplingParams = field(default_factory=SamplingParams)
    stop: tuple[str, ...] = ()
    ignore_eos: bool = False
    adapter: AdapterRef | None = None  # None: the base model
    merged: MergedAdapters | None = None

    @property
    def adapter_spec(self) -> AdapterRef | MergedAdapters | None:
        return self.adapter if self.adapter is not None else self.merged


@dataclass(frozen=True)
class Alternative:
    token_id: int
    text: str
    logprob: float


@dataclass(frozen=True)
class TokenEvent:
    """One generated token. `text` is its incremental piece (a special token's own text).

    `delta` is the text this token makes visible: the deltas concatenate to exactly the
    FinishEvent's generated_text, never showing a stop sequence nor a start of one that may
    still complete. Left out, it is `text` (nothing for a special token): no holdback.
    """

    token_id: int
    text: str
    logprob: float
    special: bool
    alternatives: tuple[Alternative, ...] = ()
    delta: str | None = None

    def __post_init__(self):
        if self.delta is None:
            object.__setattr__(self, "delta", "" if self.special else self.text)


@dataclass(frozen=True)
class PromptToken:
    token_id: int
    text: str
    logprob: float | None  # None for the first prompt token


@dataclass(frozen=True)
class FinishEvent:
    finish_reason: str  # length | eos_token | stop_sequence
    generated_text: str  # stop sequence excluded
    prompt_tokens: int
    generated_tokens: int
    seed: int | None  # None unless sampling
    prefill: tuple[PromptToken, ...] = ()  # only when sampling.prompt_logprobs
    queue_time_s: float = 0.0
    inference_time_s: float = 0.0


class EngineError(Exception):
    """Base of the errors `generate` raises; each maps to one HTTP status and error_type."""

    status = 500
    error_type = "incomplete_generation"


class Overloaded(EngineError):
    status = 429
    error_type = "overloaded"


class AdapterError(EngineError):
    status = 424
    error_type = "generation"


class Unavailable(EngineError):
    status = 503
    error_type = "unavailable"


class ValidationError(EngineError):
    status = 422
    error_type = "validation"

    def __init__(self, what: str):
        super().__init__(f"Input validation error: {what}")


def sequence_failure(message: str, bad_request: bool) -> EngineError:
    """The error of a request that failed alone in a step: a 422 when its own parameters
    caused it, else a 500."""
    if bad_request:
        return ValidationError(message)
    return EngineError(f"Request failed during generation: {message}")
