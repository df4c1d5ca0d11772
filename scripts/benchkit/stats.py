"""Per-stream timings and what a load's table row is made of (pure arithmetic)."""
from __future__ import annotations

import math
import statistics
from dataclasses import dataclass, field


@dataclass
class StreamTiming:
    """One request: when it was sent, when each token-carrying chunk arrived, how many
    tokens the server says it generated (None: count the chunks)."""

    sent: float
    arrivals: list[float] = field(default_factory=list)
    tokens: int | None = None
    text: str = ""  # what the stream said, when kept

    @property
    def num_tokens(self) -> int:
        return len(self.arrivals) if self.tokens is None else self.tokens

    @property
    def ttft(self) -> float:
        return self.arrivals[0] - self.sent

    def gaps(self) -> list[float]:
        return [b - a for a, b in zip(self.arrivals, self.arrivals[1:])]


def percentile(values: list[float], q: float) -> float:
    """The q-th percentile (0-100) with linear interpolation between closest ranks."""
    if not values:
        return math.nan
    ordered = sorted(values)
    pos = (len(ordered) - 1) * q / 100
    lo, hi = math.floor(pos), math.ceil(pos)
    return ordered[lo] + (ordered[hi] - ordered[lo]) * (pos - lo)


@dataclass
class RoundResult:
    """One round of a load: every stream's timings and the wall time of the whole round."""

    streams: list[StreamTiming]
    wall_s: float

    @property
    def tok_s(self) -> float:
        return sum(s.num_tokens for s in self.streams) / self.wall_s


def summarize(rounds: list[RoundResult]) -> dict:
    """A load's row: the median round's throughput; TTFT and inter-token latency
    percentiles over every stream of every round, in milliseconds."""
    ttfts = [s.ttft for r in rounds for s in r.streams]
    gaps = [g for r in rounds for s in r.streams for g in s.gaps()]
    return {"tok_s": statistics.median(r.tok_s for r in rounds),
            "tok_s_rounds": [r.tok_s for r in rounds],
            "ttft_ms_p50": 1000 * percentile(ttfts, 50),
            "ttft_ms_p99": 1000 * percentile(ttfts, 99),
            "itl_ms_p50": 1000 * percentile(gaps, 50), "itl_ms_p99": 1000 * percentile(gaps, 99),
            "streams": len(rounds[0].streams) if rounds else 0, "rounds": len(rounds)}


def ratios(ours: dict, peer: dict) -> dict:
    """loraxd over the peer: > 1 is better for loraxd in throughput, < 1 in latency."""
    def div(a: float, b: float) -> float:
        return a / b if b and not math.isnan(a) and not math.isnan(b) else math.nan
    return {k: div(ours[k], peer[k]) for k in
            ("tok_s", "ttft_ms_p50", "ttft_ms_p99", "itl_ms_p50", "itl_ms_p99")}
