"""What every generating route shares: the in-flight limit, prompt preparation, engine calls.

`Frontend` is built once by make_app and handed to each route module (native.py, and the
OpenAI module), so both APIs count against one max_concurrent_requests and build
`GenerationRequest`s the same way.
"""
from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from dataclasses import dataclass, field, replace
from typing import Any, AsyncIterator, Iterator

import msgspec
from aiohttp import web

from loraxd.engine.grammar import GrammarCompiler, GrammarError
from loraxd.engine.request import (AdapterRef, EngineError, FinishEvent, GenerationRequest,
                                   TokenEvent)
from loraxd.http.errors import overloaded, validation_error
from loraxd.http.response_format import unsupported_schema
from loraxd.http.schemas import SEED_MODULUS, GenerateParams, Limits, bearer_token
from loraxd.http.settings import DoorSettings


class InflightLimiter:
    """Counts the sequences in flight (best_of, n and prompts each count, /tokenize calls
    too): a request that would take them over max_concurrent_requests gets a 429."""

    def __init__(self, max_inflight: int):
        self.max_inflight = max_inflight
        self.num_inflight = 0

    @contextlib.contextmanager
    def slot(self, num_sequences: int = 1) -> Iterator[None]:
        if num_sequences > self.max_inflight:  # could never run: no point in a retry
            raise validation_error(
                f"this request runs {num_sequences} sequences; the server runs at most "
                f"{self.max_inflight} at once (max_concurrent_requests)")
        if self.num_inflight + num_sequences > self.max_inflight:
            raise overloaded()
        self.num_inflight += num_sequences
        try:
            yield
        finally:
            self.num_inflight -= num_sequences


@dataclass
class Frontend:
    """What the routes share. A reload (loraxd.daemon.reload) replaces `limits` and
    `settings` and sets the limiter's maximum; readers look them up at each use."""

    engine: Any  # AsyncEngine
    limits: Limits
    limiter: InflightLimiter
    model_id: str
    max_request_bytes: int
    settings: DoorSettings
    keys_required: bool = False  # API keys configured: the Bearer header is never a hub token
    grammars: GrammarCompiler = field(default_factory=GrammarCompiler)  # response formats

    @classmethod
    def from_config(cls, engine: Any, config: Any, *, keys_required: bool = False) -> Frontend:
        return cls(engine=engine, limits=Limits.from_config(config),
                   limiter=InflightLimiter(config.scheduler.max_concurrent_requests),
                   model_id=config.model.model_id,
                   max_request_bytes=config.server.max_request_bytes,
                   settings=DoorSettings.from_config(config), keys_required=keys_required)

    def hub_token_fallback(self, authorization: str | None) -> str | None:
        """The Bearer token as the hub token (LoRAX's habit), only when it is not an API key."""
        return None if self.keys_required else bearer_token(authorization)


FRONTEND_KEY = web.AppKey("frontend", Frontend)


def door_settings(request: web.Request) -> DoorSettings | None:
    """The door's settings in force for this request; None for an app without a Frontend."""
    frontend = request.config_dict.get(FRONTEND_KEY)
    return frontend.settings if frontend is not None else None


@dataclass(frozen=True)
class Prepared:
    """A validated request, tokenized: one GenerationRequest per best_of sequence."""

    inputs: str
    params: GenerateParams
    prompt_ids: list[int]
    requests: tuple[GenerationRequest, ...]

    @property
    def adapter_header(self) -> str | None:
        """The x-adapter-id value: the adapter used, if any."""
        if self.params.adapter is not None:
            return self.params.adapter.adapter_id
        if self.params.merged is not None:
            return ",".join(self.params.merged.ids)
        return None


def with_default_adapter(params: GenerateParams, limits: Limits) -> GenerateParams:
    """The request as it runs: one that names no adapter gets the default adapter, if any."""
    if params.adapter is None and params.merged is None and limits.default_adapter_id:
        return replace(params, adapter=AdapterRef(limits.default_adapter_id,
                                                  limits.default_adapter_source))
    return params


async def prepare(engine: Any, inputs: str, params: GenerateParams, limits: Limits, *,
                  grammars: GrammarCompiler, add_special_tokens: bool = True) -> Prepared:
    """Build the response format's grammar and tokenize (both off the loop), truncate,
    check the lengths, build the engine requests.

    `add_special_tokens=False` for a rendered chat template, which holds its own. A request
    that names no adapter runs the default adapter, when one is configured.
    """
    params = with_default_adapter(params, limits)
    sampling = params.sampling
    if params.response_schema is not None:
        try:
            grammar = await grammars.compile(params.response_schema)
        except GrammarError as exc:
            raise unsupported_schema(exc) from None
        sampling = msgspec.structs.replace(sampling, grammar=grammar)
    prompt_ids = await engine.tokenizer.encode(inputs, add_special_tokens=add_special_tokens)
    if not prompt_ids:  # nothing to prefill: the model has no position to predict from
        raise validation_error("`inputs` is made of no tokens")
    if params.truncate is not None:
        prompt_ids = prompt_ids[-params.truncate:]
    num_input = len(prompt_ids)
    if num_input > limits.max_input_length:
        raise validation_error(f"`inputs` must have at most {limits.max_input_length} tokens. "
                               f"Given: {num_input}")
    max_new_tokens = params.max_new_tokens
    if max_new_tokens is None:
        max_new_tokens = limits.max_total_tokens - num_input
    if max_new_tokens <= 0 or num_input + max_new_tokens > limits.max_total_tokens:
        raise validation_error(
            f"`inputs` tokens + `max_new_tokens` must be <= {limits.max_total_tokens}. "
            f"Given: {num_input} `inputs` tokens and {max_new_tokens} `max_new_tokens`")
    base = GenerationRequest(prompt_ids=prompt_ids, max_new_tokens=max_new_tokens,
                             sampling=sampling, stop=params.stop,
                             ignore_eos=params.ignore_eos, adapter=params.adapter,
                             merged=params.merged)
    requests = [base]
    for i in range(1, params.best_of):  # distinct seeds: seed, seed+1, ... (wrapping)
        seed = (sampling.seed + i) % SEED_MODULUS
        requests.append(replace(base, sampling=msgspec.structs.replace(sampling, seed=seed)))
    return Prepared(inputs=inputs, params=params, prompt_ids=prompt_ids,
                    requests=tuple(requests))


@dataclass
class Completion:
    """One finished sequence."""

    seed: int | None
    tokens: list[TokenEvent] = field(default_factory=list)
    finish: FinishEvent | None = None

    @property
    def logprob_sum(self) -> float:
        return sum(t.logprob for t in self.tokens)


async def complete(engine: Any, req: GenerationRequest) -> Completion:
    """Run one request to its FinishEvent; cancelling the caller closes the engine's generator."""
    done = Completion(seed=req.sampling.seed if req.sampling.do_sample else None)
    async with contextlib.aclosing(engine.generate(req)) as events:
        async for event in events:
            if isinstance(event, TokenEvent):
                done.tokens.append(event)
            else:
                done.finish = event
                break
    if done.finish is None:
        raise EngineError("the engine ended a request without finishing it")
    return done


async def complete_all(engine: Any, prepared: Prepared) -> list[Completion]:
    """All best_of sequences, concurrently, best (highest sum of logprobs) first.

    The first failure cancels the others and is raised.
    """
    if len(prepared.requests) == 1:
        return [await complete(engine, prepared.requests[0])]
    tasks = [asyncio.ensure_future(complete(engine, r)) for r in prepared.requests]
    try:
        await asyncio.wait(tasks, return_when=asyncio.FIRST_EXCEPTION)
        for task in tasks:
            if task.done() and task.exception() is not None:
                raise task.exception()
    finally:
        for task in tasks:
            task.cancel()
        await asyncio.wait(tasks)
    completions = [task.result() for task in tasks]
    return sorted(completions, key=lambda c: c.logprob_sum, reverse=True)


class EventPump:
    """Moves one engine generator's events into a buffer from a task it owns.

    A streaming reader gets each token together with the FinishEvent when that is already
    there, so the last token's SSE event can carry generated_text without holding any token
    back. `aclose()` cancels the task, which closes the engine's generator.
    """

    def __init__(self, events: AsyncIterator):
        self._items: deque = deque()
        self._ready = asyncio.Event()
        self._task = asyncio.ensure_future(self._run(events))

    async def _run(self, events: AsyncIterator) -> None:
        try:
            async with contextlib.aclosing(events):
                async for event in events:
                    self._push(event)
                    if isinstance(event, FinishEvent):
                        return
            self._push(EngineError("the engine ended a request without finishing it"))
        except Exception as exc:  # noqa: BLE001 - handed to the reader, who reports it
            self._push(exc)

    def _push(self, item: Any) -> None:
        self._items.append(item)
        self._ready.set()

    async def _get(self) -> Any:
        while not self._items:
            self._ready.clear()
            await self._ready.wait()
        item = self._items.popleft()
        if isinstance(item, BaseException):
            raise item
        return item

    async def next(self) -> tuple[TokenEvent | None, FinishEvent | None]:
        """(token, None) mid-stream; (token, finish) for the last token; (None, finish) when
        the finish came on its own. Raises what the engine raised."""
        event = await self._get()
        if isinstance(event, FinishEvent):
            return None, event
        if not self._items:
            await asyncio.sleep(0)  # one loop turn: a finish sent with the token lands now
        if self._items and isinstance(self._items[0], FinishEvent):
            return event, self._items.popleft()
        return event, None

    async def aclose(self) -> None:
        self._task.cancel()
        await asyncio.wait([self._task])
