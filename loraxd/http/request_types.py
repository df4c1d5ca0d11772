"""Request bodies as msgspec Structs: the types and ranges every request is held to.

These are the schema of the API: /openapi.json is generated from them, and every body is
converted to its Struct (conform.py) after the hand-written rules of schemas.py,
openai_schemas.py and chat_template.py, which give the friendlier messages and the rules
that need the configured limits or several fields at once. So a body the schema refuses is
always refused, whatever those rules miss.

Beyond the contract's ranges the door bounds what would overflow further in: integers fit
int64 (seeds uint64) as the msgpack frames and torch need; multiplicative knobs stay within
[1e-6, 1e6], where float32 scores stay finite; merge weights within ±100, where a merged
delta stays finite in half precision.
"""
from __future__ import annotations

from typing import Annotated, Any, Literal

import msgspec
from msgspec import Meta

INT64_MAX = 2**63 - 1
UINT64_MAX = 2**64 - 1
MIN_FACTOR, MAX_FACTOR = 1e-6, 1e6  # temperature (besides 0) and repetition_penalty
MAX_MERGE_WEIGHT = 100.0
MIN_DENSITY = 1e-3  # besides 0: DARE divides what it keeps by the density
MAX_ALTERNATIVES = 20  # return_k_alternatives, as the OpenAI routes' logprobs
MAX_TOP_K = 2**31 - 1

AdapterSource = Literal["hub", "local", "s3", "pbase"]
MergeStrategy = Literal["linear", "ties", "dare_linear", "dare_ties"]
MajoritySignMethod = Literal["total", "frequency"]

Count = Annotated[int, Meta(gt=0, le=INT64_MAX)]
# msgspec bounds only int64: the uint64 maximum is stated for the schema, and schemas.py
# enforces it.
Seed = Annotated[int, Meta(ge=0, description="uint64", extra_json_schema={"maximum": UINT64_MAX})]
Temperature = Annotated[float, Meta(
    ge=0, le=MAX_FACTOR, description=f"0: greedy; else from {MIN_FACTOR:g} to {MAX_FACTOR:g}")]
TopK = Annotated[int, Meta(gt=0, le=MAX_TOP_K)]
TopP = Annotated[float, Meta(gt=0.0, le=1.0)]
TypicalP = Annotated[float, Meta(gt=0.0, lt=1.0)]
RepetitionPenalty = Annotated[float, Meta(ge=MIN_FACTOR, le=MAX_FACTOR)]
Penalty = Annotated[float, Meta(ge=-2.0, le=2.0)]
NonEmpty = Annotated[str, Meta(min_length=1)]


class _Body(msgspec.Struct, kw_only=True, omit_defaults=True):
    """Unknown fields are ignored, as LoRAX and OpenAI do."""


class MergedAdaptersParams(_Body, kw_only=True):
    """Adapters merged per request (LoRAX's merge); built once and cached."""

    ids: Annotated[list[NonEmpty], Meta(min_length=1)]
    weights: list[Annotated[float, Meta(ge=-MAX_MERGE_WEIGHT, le=MAX_MERGE_WEIGHT)]]
    merge_strategy: MergeStrategy | None = None
    density: Annotated[float, Meta(ge=0.0, le=1.0, description=(
        f"0, or from {MIN_DENSITY:g} to 1"))] | None = None
    majority_sign_method: MajoritySignMethod | None = None


class JsonSchemaFormat(_Body, kw_only=True):
    """OpenAI's `json_schema` object; the schema is always enforced (`strict` or not)."""

    name: str | None = None
    description: str | None = None
    schema: dict[str, Any] | None = None
    strict: bool | None = None


class ResponseFormat(_Body, kw_only=True):
    """`json_object`: any JSON object, or LoRAX's `schema`; `json_schema`: `schema` (LoRAX)
    or `json_schema.schema` (OpenAI)."""

    type: Literal["text", "json_object", "json_schema"]
    schema: dict[str, Any] | None = None
    json_schema: JsonSchemaFormat | None = None


class Parameters(_Body, kw_only=True):
    """Generation parameters; each optional and nullable. Cross-field rules: `best_of` > 1
    needs sampling and no streaming; prompt + `max_new_tokens` <= max_total_tokens;
    `truncate` <= max_input_length; `best_of` <= max_best_of; at most max_stop_sequences;
    `adapter_id` or `merged_adapters`, not both."""

    adapter_id: str | None = None
    adapter_source: AdapterSource | None = None
    merged_adapters: MergedAdaptersParams | None = None
    api_token: str | None = None
    do_sample: bool | None = None
    temperature: Temperature | None = None
    top_k: TopK | None = None
    top_p: TopP | None = None
    typical_p: TypicalP | None = None
    repetition_penalty: RepetitionPenalty | None = None
    frequency_penalty: Penalty | None = None
    presence_penalty: Penalty | None = None
    max_new_tokens: Count | None = None
    ignore_eos_token: bool | None = None
    stop: list[NonEmpty] | None = None
    truncate: Count | None = None
    seed: Seed | None = None
    best_of: Count | None = None
    return_full_text: bool | None = None
    details: bool | None = None
    decoder_input_details: bool | None = None
    return_k_alternatives: Annotated[int, Meta(gt=0, le=MAX_ALTERNATIVES)] | None = None
    watermark: bool | None = None
    response_format: ResponseFormat | None = None


class GenerateRequest(_Body, kw_only=True):
    """/generate and /generate_stream; `/` also reads `stream`."""

    inputs: NonEmpty
    parameters: Parameters | None = None
    stream: bool | None = None


class TokenizeRequest(_Body, kw_only=True):
    inputs: str
    add_special_tokens: bool | None = None


# -- OpenAI ---------------------------------------------------------------------------------


class StreamOptions(_Body, kw_only=True):
    include_usage: bool | None = None


class _OpenAIBody(_Body, kw_only=True):
    """Fields both OpenAI routes share. `model`: the base model's id or "" for the base
    model, any other value names an adapter. Extras: repetition_penalty, top_k, ignore_eos
    (or ignore_eos_token), adapter_source, api_token."""

    model: str | None = None
    temperature: Temperature | None = None
    top_p: TopP | None = None
    n: Annotated[int, Meta(ge=1, le=16)] | None = None
    stop: NonEmpty | list[NonEmpty] | None = None
    seed: Seed | None = None
    presence_penalty: Penalty | None = None
    frequency_penalty: Penalty | None = None
    stream: bool | None = None
    stream_options: StreamOptions | None = None
    max_tokens: Count | None = None
    repetition_penalty: RepetitionPenalty | None = None
    top_k: TopK | None = None
    ignore_eos: bool | None = None
    ignore_eos_token: bool | None = None
    adapter_source: AdapterSource | None = None
    api_token: str | None = None
    response_format: ResponseFormat | None = None
    logit_bias: dict[str, Any] | None = None
    user: str | None = None


class CompletionRequest(_OpenAIBody, kw_only=True):
    """/v1/completions. `prompt`: prompts x `n` <= 64 choices."""

    prompt: NonEmpty | Annotated[list[NonEmpty], Meta(min_length=1)]
    echo: bool | None = None
    logprobs: Annotated[int, Meta(ge=0, le=MAX_ALTERNATIVES)] | None = None
    best_of: Annotated[int, Meta(ge=1, le=1)] | None = None
    suffix: None = None


class ContentPart(_Body, kw_only=True):
    """Only `text` parts are served."""

    type: str
    text: str | None = None


class ChatMessage(_Body, kw_only=True):
    role: NonEmpty
    content: str | list[ContentPart] | None = None
    name: str | None = None


class ChatCompletionRequest(_OpenAIBody, kw_only=True):
    """/v1/chat/completions, through the adapter's chat template (else the base model's)."""

    messages: Annotated[list[ChatMessage], Meta(min_length=1)]
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Meta(ge=0, le=MAX_ALTERNATIVES)] | None = None
    max_completion_tokens: Count | None = None
    tools: list[dict[str, Any]] | None = None
    tool_choice: str | dict[str, Any] | None = None
