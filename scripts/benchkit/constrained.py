"""`scripts/bench --constrained`: what `json_schema` neighbours cost loraxd's other streams.

The throughput of N plain streams alone, beside N constrained requests (each its own
schema), and beside N plain requests of the same length (the control: what the bigger
batch costs without any grammar); the gap between the last two is the grammars' own cost.
"""
from __future__ import annotations

import asyncio
import statistics
import time

from scripts.benchkit.loads import PROMPTS


def neighbour_schema(i: int) -> dict:
    """A schema per constrained neighbour, long enough to keep it in the batch."""
    return {"type": "object", "properties": {
        f"items_{i}": {"type": "array", "items": {"type": "integer", "minimum": 0,
                                                 "maximum": 10 ** (i % 4 + 2)}},
        "note": {"type": "string"}}, "required": [f"items_{i}", "note"]}


async def plain_tok_s(url: str, batch: int, new_tokens: int, neighbours: int = 0,
                      constrained: bool = True) -> float:
    """Tokens per second of `batch` plain streams; `neighbours` (not counted) run beside."""
    import aiohttp
    async with aiohttp.ClientSession() as session:
        async def one(i: int, schema: dict | None = None) -> int:
            params = {"max_new_tokens": new_tokens, "ignore_eos_token": True}
            if schema is not None:
                params.update(ignore_eos_token=False, response_format={
                    "type": "json_schema", "schema": schema})
            n = 0
            async with session.post(url + "/generate_stream", json={
                    "inputs": PROMPTS[i % len(PROMPTS)], "parameters": params}) as resp:
                async for line in resp.content:
                    n += line.startswith(b"data:")
            return n
        others = [asyncio.ensure_future(one(i, neighbour_schema(i) if constrained else None))
                  for i in range(neighbours)]
        t0 = time.perf_counter()
        counts = await asyncio.gather(*(one(i) for i in range(batch)))
        elapsed = time.perf_counter() - t0
        await asyncio.gather(*others)
    assert counts == [new_tokens] * batch, counts
    return batch * new_tokens / elapsed


def run(url: str, batch: int, new_tokens: int, rounds: int) -> dict:
    asyncio.run(plain_tok_s(url, batch, 4))  # warm-up
    alone, beside, control = [], [], []
    for _ in range(rounds):
        alone.append(asyncio.run(plain_tok_s(url, batch, new_tokens)))
        beside.append(asyncio.run(plain_tok_s(url, batch, new_tokens, neighbours=batch)))
        control.append(asyncio.run(plain_tok_s(url, batch, new_tokens, neighbours=batch,
                                               constrained=False)))
    a, b, c = (statistics.median(x) for x in (alone, beside, control))
    return {"streams": batch, "alone_tok_s": a, "beside_constrained_tok_s": b,
            "beside_plain_tok_s": c, "constrained_neighbours_loss": 1 - b / a,
            "grammar_loss": 1 - b / c,
            "rounds": {"alone": alone, "beside_constrained": beside, "beside_plain": control}}


def render(r: dict) -> str:
    n = r["streams"]
    return "\n".join([
        f"loraxd, {n} plain streams alone:          {r['alone_tok_s']:8.1f} tok/s (median)",
        f"beside {n} json_schema requests:           {r['beside_constrained_tok_s']:8.1f} tok/s "
        f"(loss {100 * r['constrained_neighbours_loss']:.1f}%)",
        f"beside {n} plain requests (the control):   {r['beside_plain_tok_s']:8.1f} tok/s; "
        f"the grammars' own cost: {100 * r['grammar_loss']:.1f}%"])
