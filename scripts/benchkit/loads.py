"""The workloads: N concurrent streams of `new_tokens` greedy tokens each, EOS ignored, on
the base model or spread round-robin over a set of distinct adapters."""
from __future__ import annotations

import asyncio
import time
from dataclasses import dataclass
from typing import Protocol

from scripts.benchkit.sse import stream_completion
from scripts.benchkit.stats import RoundResult

PROMPTS = ["The history of the printing press", "A recipe for bread:", "Dear diary, today",
           "The rules of chess are", "In the beginning of the universe", "My favourite song",
           "How to learn a language:", "The weather in London is"]

DEFAULT_LOADS = "8:base,8:lora,32:base,32:lora,64:base,64:lora"
QUICK_LOADS = "8:lora"


@dataclass(frozen=True)
class Load:
    streams: int
    adapters: int  # distinct adapters, stream i uses adapter i % adapters; 0: the base model

    @property
    def name(self) -> str:
        return f"{self.streams} streams, " + (f"{self.adapters} adapters" if self.adapters
                                              else "base")

    @property
    def key(self) -> str:
        return f"{self.streams}:{'lora' if self.adapters else 'base'}"

    def adapter_of(self, stream: int) -> int | None:
        return stream % self.adapters if self.adapters else None


def parse_loads(spec: str, num_adapters: int) -> list[Load]:
    """`8:base,8:lora,...`: streams, and whether they use the `num_adapters` adapters."""
    loads = []
    for item in spec.split(","):
        streams, _, kind = item.strip().partition(":")
        if not streams.isdigit() or int(streams) < 1 or kind not in ("base", "lora"):
            raise ValueError(f"load {item!r}: expected STREAMS:base or STREAMS:lora")
        loads.append(Load(int(streams), num_adapters if kind == "lora" else 0))
    return loads


class HttpSystem(Protocol):
    url: str

    def body(self, prompt: str, adapter: int | None, new_tokens: int) -> dict: ...


def base_body(prompt: str, new_tokens: int) -> dict:
    return {"prompt": prompt, "max_tokens": new_tokens, "temperature": 0, "ignore_eos": True}


async def run_round(system: HttpSystem, load: Load, new_tokens: int) -> RoundResult:
    import aiohttp
    # A fresh connection per stream: llama-server closes each one after its stream though
    # it says keep-alive, and every system is driven the same way.
    connector = aiohttp.TCPConnector(force_close=True, limit=0)
    timeout = aiohttp.ClientTimeout(total=3600)
    async with aiohttp.ClientSession(connector=connector, timeout=timeout) as session:
        t0 = time.perf_counter()
        streams = await asyncio.gather(*(
            stream_completion(session, system.url, system.body(
                PROMPTS[i % len(PROMPTS)], load.adapter_of(i), new_tokens))
            for i in range(load.streams)))
        wall = time.perf_counter() - t0
    counts = [s.num_tokens for s in streams]
    if counts != [new_tokens] * load.streams:
        raise RuntimeError(f"{load.name}: expected {new_tokens} tokens per stream, got {counts}")
    return RoundResult(streams, wall)


def run_load(system: HttpSystem, load: Load, new_tokens: int, rounds: int) -> list[RoundResult]:
    """A short warm-up round (it also loads the adapters), then `rounds` timed ones."""
    asyncio.run(run_round(system, load, min(4, new_tokens)))
    return [asyncio.run(run_round(system, load, new_tokens)) for _ in range(rounds)]


PROBE_PROMPT = "The rules of chess are"


def probe_texts(system: HttpSystem, adapters: int, new_tokens: int = 8) -> list[str]:
    """The greedy text of one prompt on the base model, then on each adapter: the same texts
    on two systems say they run the same model and adapters."""
    import requests
    texts = []
    for adapter in [None, *range(adapters)]:
        body = {**system.body(PROBE_PROMPT, adapter, new_tokens), "stream": False}
        resp = requests.post(system.url + "/v1/completions", json=body, timeout=600)
        resp.raise_for_status()
        texts.append(resp.json()["choices"][0]["text"])
    return texts
