"""The soak's clients: streamed requests over many adapters, with stop sequences and clients
that leave early, each answer checked against a reference run of the same prompt.

A request's answer is fixed by its key (prompt, adapter, seed or greedy): a reference run
of each key to `max_new` tokens, before the load, gives the tokens and text that every
later run of that key must agree with, up to where it ends (its own max_new_tokens, its
stop sequence, or its client leaving). Agreement through a worker's death is what "resumed,
no token lost or repeated" means.
"""
from __future__ import annotations

import asyncio
import json
import random
import time
from dataclasses import dataclass, field

COMPLETED, CUT, FAILED, HUNG = "completed", "cut by client", "failed", "hung"
_RETRY_S = 0.2  # between tries of a request refused while the workers are replaced
_NO_WORKER = "no healthy worker"  # the 503 of a request that arrives during a replacement


@dataclass(frozen=True)
class Key:
    prompt: int
    adapter: str | None  # None: the base model
    seed: int | None  # None: greedy


@dataclass(frozen=True)
class Spec:
    key: Key
    max_new: int
    stop: str | None = None
    cut_at: int | None = None  # the client leaves after this many tokens


@dataclass
class Outcome:
    spec: Spec
    status: str = FAILED
    ids: list[int] = field(default_factory=list)
    finish: str | None = None
    text: str | None = None
    error: str | None = None
    retries: int = 0  # refused during the replacement, then tried again
    last_token_at: float | None = None
    stall_s: float | None = None  # the gap between tokens that spans the kill, if any
    resumed_s: float | None = None  # from the kill to this stream's next token
    took_s: float = 0.0  # from the first try to the end


def long_prompts(tokenizer, count: int, low: int, high: int, rng: random.Random) -> list[str]:
    """`count` prompts of `low`..`high` tokens (as the daemon counts them)."""
    words = ("the of and to in is was for on that with as by at from his her they this "
             "river mountain engine kernel adapter winter harbour lantern copper violet "
             "memory signal garden thunder marble orbit cabinet velvet puzzle meadow "
             "quarter silence furnace compass whisper ladder glacier ribbon lattice").split()
    prompts = []
    for _ in range(count):
        want = rng.randint(low, high)
        text = " ".join(rng.choice(words) for _ in range(2 * high))
        enc = tokenizer.encode(text)
        prompts.append(text[:enc.offsets[want - 1][1]])
        assert low - 2 <= len(tokenizer.encode(prompts[-1]).ids) <= high, "prompt length"
    return prompts


class Clients:
    """Streams requests to `url` and records what each one got."""

    def __init__(self, url: str, prompts: list[str], request_timeout_s: float):
        self.url = url
        self.prompts = prompts
        self.request_timeout_s = request_timeout_s
        self.kill_at: float | None = None  # set by whoever kills the worker
        self.num_tokens = 0

    def body(self, spec: Spec) -> dict:
        params: dict = {"max_new_tokens": spec.max_new, "details": True}
        if spec.key.adapter is not None:
            params["adapter_id"] = spec.key.adapter
        if spec.key.seed is not None:
            params.update(do_sample=True, seed=spec.key.seed, temperature=0.8, top_k=20)
        if spec.stop is not None:
            params["stop"] = [spec.stop]
        return {"inputs": self.prompts[spec.key.prompt], "parameters": params}

    async def run(self, session, spec: Spec) -> Outcome:
        """One request, bounded by `request_timeout_s` (then it counts as hung)."""
        out, start = Outcome(spec), time.monotonic()
        try:
            async with asyncio.timeout(self.request_timeout_s):
                while not await self._try(session, out):
                    out.retries += 1
                    await asyncio.sleep(_RETRY_S)
        except TimeoutError:
            out.status, out.error = HUNG, f"no end within {self.request_timeout_s:g} s"
        out.took_s = time.monotonic() - start
        return out

    async def _try(self, session, out: Outcome) -> bool:
        """False when the request was refused for want of a worker and may be sent again."""
        async with session.post(self.url + "/generate_stream", json=self.body(out.spec)) as resp:
            if resp.status != 200:
                out.error = f"HTTP {resp.status}: {await resp.text()}"
                return True
            async for line in resp.content:
                if not line.startswith(b"data:"):
                    continue
                event = json.loads(line[5:])
                if "error" in event:
                    if not out.ids and _NO_WORKER in event["error"]:
                        return False
                    out.error = event["error"]
                    return True
                if not event["token"]["skipped"]:
                    self._token(out, event["token"]["id"])
                if event["generated_text"] is not None:
                    out.status, out.text = COMPLETED, event["generated_text"]
                    out.finish = event["details"]["finish_reason"]
                    return True
                if out.spec.cut_at is not None and len(out.ids) >= out.spec.cut_at:
                    out.status = CUT
                    resp.close()  # drop the connection mid-stream, as a client that leaves
                    return True
            out.error = "the stream ended without a final event"
            return True

    def _token(self, out: Outcome, token_id: int) -> None:
        now = time.monotonic()
        if self.kill_at is not None and out.last_token_at is not None \
                and out.last_token_at < self.kill_at <= now:
            out.stall_s, out.resumed_s = now - out.last_token_at, now - self.kill_at
        out.last_token_at = now
        out.ids.append(token_id)
        self.num_tokens += 1


@dataclass(frozen=True)
class Reference:
    ids: list[int]
    text: str
    finish: str


def problem(out: Outcome, ref: Reference) -> str | None:
    """What is wrong with `out`, or None: it agrees with its key's reference run."""
    spec, n = out.spec, len(out.ids)
    if out.status not in (COMPLETED, CUT):
        return f"{out.status}: {out.error}"
    if out.ids != ref.ids[:n]:
        at = next((i for i, (a, b) in enumerate(zip(out.ids, ref.ids)) if a != b), len(ref.ids))
        return f"token {at} is {out.ids[at]}, the reference's is {ref.ids[at:at + 1]}"
    if out.status == CUT:
        return None if n == spec.cut_at else f"cut after {n} tokens, not {spec.cut_at}"
    stopped = spec.stop is not None and spec.stop in ref.text and \
        ref.text.find(spec.stop) == len(out.text)
    if out.finish == "stop_sequence":
        return None if stopped else f"stopped at {out.text!r} by {spec.stop!r}"
    if spec.stop is not None and spec.stop in out.text:
        return f"{spec.stop!r} is in the text, yet it ended by {out.finish}"
    if out.finish == "length":
        return None if n == spec.max_new else f"length after {n} of {spec.max_new} tokens"
    if out.finish == "eos_token":
        return None if ref.finish == "eos_token" and n == len(ref.ids) else "early EOS"
    return f"unknown finish reason {out.finish}"


def stop_from(ref: Reference, rng: random.Random) -> str | None:
    """A stop sequence that the reference's text holds somewhere: it may cut the answer
    short or lie beyond the request's max_new_tokens."""
    start = rng.randrange(max(len(ref.text) - 1, 1))
    stop = ref.text[start:start + rng.randint(2, 5)]
    return stop if stop.strip() and "\ufffd" not in stop else None
