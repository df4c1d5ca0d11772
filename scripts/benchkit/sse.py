"""A streamed OpenAI /v1/completions request, timed chunk by chunk. loraxd, llama-server
and vLLM all answer it with the same shape: one chunk per token (`choices[0].text`), a
chunk with `finish_reason`, a chunk with `usage` when asked (llama-server always sends
it), then `[DONE]`."""
from __future__ import annotations

import json
import time

from scripts.benchkit.stats import StreamTiming


class StreamError(RuntimeError):
    pass


def parse_data_line(line: bytes) -> dict | None:
    """The JSON of an SSE `data:` line; None for anything else and for `[DONE]`."""
    line = line.strip()
    if not line.startswith(b"data:"):
        return None
    payload = line[5:].strip()
    if payload == b"[DONE]":
        return None
    chunk = json.loads(payload)
    if "error" in chunk:
        raise StreamError(f"the server failed the stream: {chunk['error']}")
    return chunk


def chunk_has_token(chunk: dict) -> bool:
    """Whether this chunk carries generated text (a finish-only or usage-only chunk does not)."""
    return any(c.get("text") for c in chunk.get("choices") or ())


def chunk_completion_tokens(chunk: dict) -> int | None:
    usage = chunk.get("usage")
    return usage.get("completion_tokens") if isinstance(usage, dict) else None


def record(timing: StreamTiming, line: bytes, now: float, keep_text: bool = False) -> None:
    """Fold one received line into a stream's timing."""
    chunk = parse_data_line(line)
    if chunk is None:
        return
    if chunk_has_token(chunk):
        timing.arrivals.append(now)
        if keep_text:
            timing.text += "".join(c.get("text") or "" for c in chunk["choices"])
    tokens = chunk_completion_tokens(chunk)
    if tokens is not None:
        timing.tokens = tokens


async def stream_completion(session, url: str, body: dict, keep_text: bool = False
                            ) -> StreamTiming:
    """POST `body` (with `stream` set) to `url` + /v1/completions and time its chunks."""
    body = {**body, "stream": True, "stream_options": {"include_usage": True}}
    timing = StreamTiming(sent=time.perf_counter())
    async with session.post(url + "/v1/completions", json=body) as resp:
        if resp.status != 200:
            raise StreamError(f"{url}: HTTP {resp.status}: {(await resp.text())[:500]}")
        async for line in resp.content:
            record(timing, line, time.perf_counter(), keep_text)
    if not timing.arrivals:
        raise StreamError(f"{url}: a stream with no token")
    return timing
