"""loraxd's KV cache at work, each scenario beside the same daemon without the feature:

- `prefix`: a shared ~1,000-token system prompt. Each round a new system prompt (a fresh
  first line) is asked once, then asked again with another question: the second request's
  time to first token with the prefix cache against the same request on a daemon without
  it, and whether both answered the same text.
- `slices`: 8 streams decode while one 1,500-token prompt arrives. The streams' inter-token
  latency p50/p99 and the long prompt's time to first token, with prompts prefilled in
  slices (`prefill_chunk_tokens`) and without (`0`).
"""
from __future__ import annotations

import asyncio
import contextlib
import statistics
import time

import aiohttp

from scripts.benchkit.context import BenchContext
from scripts.benchkit.loads import base_body
from scripts.benchkit.sse import stream_completion
from scripts.benchkit.stats import percentile
from scripts.benchkit.systems import loraxd_daemon

RULES = " ".join(f"Rule {i}: answer in one short sentence and name the source of each "
                 "fact you give." for i in range(50))  # ~1,000 tokens
QUESTIONS = ("What is the capital of France?", "Why is the sky blue?")
LONG_PROMPT = " ".join(f"item {i} weighs {i * 7 % 13} kg" for i in range(215))  # ~1,500


async def _text_and_ttft(session, url: str, prompt: str, new_tokens: int):
    body = base_body(prompt, new_tokens)
    timing = await stream_completion(session, url, body, keep_text=True)
    return timing.ttft, timing.text


async def _prefix_rounds(url: str, systems: list[str], new_tokens: int, warm: bool) -> dict:
    ttfts, texts = [], []
    async with aiohttp.ClientSession() as session:
        for system in systems:
            if warm:  # the system prompt's pages enter the cache
                await _text_and_ttft(session, url, system + QUESTIONS[0], 1)
            ttft, text = await _text_and_ttft(session, url, system + QUESTIONS[1], new_tokens)
            ttfts.append(ttft)
            texts.append(text)
    return {"ttft_s": ttfts, "texts": texts}


def prefix(ctx: BenchContext, rounds: int, new_tokens: int) -> dict:
    systems = [f"Session {r} of {time.time_ns()}.\n{RULES}\n" for r in range(rounds)]
    with loraxd_daemon.serve(ctx, 1) as system:
        cached = asyncio.run(_prefix_rounds(system.url, systems, new_tokens, warm=True))
    with loraxd_daemon.serve(ctx, 1, extra=("--no-prefix-caching",)) as system:
        plain = asyncio.run(_prefix_rounds(system.url, systems, new_tokens, warm=False))
    return {"cached_ttft_s_p50": statistics.median(cached["ttft_s"]),
            "plain_ttft_s_p50": statistics.median(plain["ttft_s"]),
            "speedup": statistics.median(plain["ttft_s"]) / statistics.median(cached["ttft_s"]),
            "same_text": cached["texts"] == plain["texts"], "rounds": rounds}


async def _streams_and_long(url: str, streams: int, new_tokens: int) -> dict:
    async with aiohttp.ClientSession() as session:
        tasks = [asyncio.create_task(stream_completion(
            session, url, base_body(f"Story {i}: once upon a time", new_tokens)))
            for i in range(streams)]
        await asyncio.sleep(1.5)  # the streams are decoding
        fresh = f"Inventory {time.time_ns()}: {LONG_PROMPT}"  # nothing of it in the cache
        long = await stream_completion(session, url, base_body(fresh, 8))
        timings = await asyncio.gather(*tasks)
    gaps = [g for t in timings for g in t.gaps()]
    return {"itl_p50_ms": 1e3 * percentile(gaps, 50), "itl_p99_ms": 1e3 * percentile(gaps, 99),
            "itl_max_ms": 1e3 * max(gaps), "long_ttft_s": long.ttft}


def slices(ctx: BenchContext, chunk_sizes: tuple[int, ...], streams: int = 8,
           new_tokens: int = 256) -> dict:
    out = {}
    for chunk in chunk_sizes:
        extra = ("--prefill-chunk-tokens", str(chunk), "--max-input-length", "2000",
                 "--max-total-tokens", "2048", "--max-batch-prefill-tokens", "2048")
        with loraxd_daemon.serve(ctx, streams, extra=extra) as system:
            asyncio.run(_streams_and_long(system.url, streams, 16))  # warm-up
            out[chunk] = asyncio.run(_streams_and_long(system.url, streams, new_tokens))
    return out


def render(result: dict) -> str:
    lines = []
    p = result.get("prefix")
    if p:
        lines += ["Shared ~1,000-token system prompt (time to first token, median of "
                  f"{p['rounds']}):",
                  f"  prefix cache {1e3 * p['cached_ttft_s_p50']:.0f} ms, without "
                  f"{1e3 * p['plain_ttft_s_p50']:.0f} ms: {p['speedup']:.1f}x; "
                  f"same text: {p['same_text']}"]
    s = result.get("slices")
    if s:
        lines.append("8 streams decoding while a ~1,500-token prompt arrives:")
        for chunk, r in s.items():
            name = f"prefill_chunk_tokens {chunk}" if int(chunk) else "no slices"
            lines.append(f"  {name:>26}: ITL p50 {r['itl_p50_ms']:.0f} ms, p99 "
                         f"{r['itl_p99_ms']:.0f} ms ({r['itl_p99_ms'] / r['itl_p50_ms']:.2f}x),"
                         f" max {r['itl_max_ms']:.0f} ms; long prompt TTFT "
                         f"{r['long_ttft_s']:.2f} s")
    return "\n".join(lines)
