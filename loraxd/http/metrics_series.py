"""The series /metrics serves that are recorded as things happen (metrics_scrape.py reads
the rest from the engine at each scrape).

LoRAX's names first, as its router records them, so its dashboards work unchanged:
lorax_request_* per HTTP request (count, success, failure by error type, durations) and per
generated sequence (input length, max_new_tokens, queue and inference time, tokens),
lorax_batch_* per step. LoRAX's exporter writes counters without a `_total` suffix and
prometheus-client would add one, so those few are `ExactCounter`s, rendered here; every
other series is a prometheus-client instrument in the app's own registry.

Per-adapter series carry an `adapter` label: the adapter's id, the base model's id for
requests without one, `<merged>`, `<private>` (first fetched with a token: its id may not be
public), and `<other>` once `metrics_adapter_labels` ids have been named, so the number of
series stays bounded however many adapters are served.
"""
from __future__ import annotations

import math
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Histogram, disable_created_metrics
from prometheus_client.utils import floatToGoString

from loraxd.engine.request import MergedAdapters

disable_created_metrics()  # no `_created` series: LoRAX's exporter writes none

# LoRAX's duration buckets: 35 steps of x1.5 from 0.15 ms (to about 2 min).
DURATION_BUCKETS = tuple(1e-4 * 1.5 ** i for i in range(1, 36))
ADAPTER_MOVE_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120,
                        300, 600)
BATCH_SIZE_BUCKETS = tuple(2 ** i for i in range(11))  # 1 .. 1024


def _token_buckets(most: int) -> tuple[float, ...]:
    """20 even steps up to `most` tokens, as LoRAX spreads its token histograms."""
    return tuple(sorted({max(1, math.ceil(most * i / 20)) for i in range(1, 21)}))


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace("\n", "\\n").replace('"', '\\"')


class ExactCounter:
    """A counter exposed under exactly its name (no `_total`), with optional labels."""

    def __init__(self, name: str, documentation: str, labelnames: tuple[str, ...] = ()):
        self.name, self.documentation, self.labelnames = name, documentation, labelnames
        self._values: dict[tuple[str, ...], float] = {} if labelnames else {(): 0.0}

    def inc(self, amount: float = 1.0, **labels: str) -> None:
        key = tuple(labels[n] for n in self.labelnames)
        self._values[key] = self._values.get(key, 0.0) + amount

    def value(self, **labels: str) -> float:
        return self._values.get(tuple(labels[n] for n in self.labelnames), 0.0)

    def render(self) -> str:
        lines = [f"# HELP {self.name} {self.documentation}", f"# TYPE {self.name} counter"]
        for key, value in sorted(self._values.items()):
            labels = ",".join(f'{n}="{_escape(v)}"' for n, v in zip(self.labelnames, key))
            lines.append(f"{self.name}{{{labels}}} {floatToGoString(value)}" if labels
                         else f"{self.name} {floatToGoString(value)}")
        return "\n".join(lines) + "\n"


class AdapterLabels:
    """The bounded `adapter` label of a request's adapter spec."""

    def __init__(self, base_label: str, limit: int):
        self.base_label = base_label
        self.limit = limit
        self._named: set[str] = set()

    def of(self, spec: Any, first_fetched_with_token: bool = False) -> str:
        if spec is None:
            return self.base_label
        if isinstance(spec, MergedAdapters):
            return "<merged>"
        if first_fetched_with_token or spec.api_token:
            return "<private>"
        if spec.adapter_id not in self._named:
            if len(self._named) >= self.limit:
                return "<other>"
            self._named.add(spec.adapter_id)
        return spec.adapter_id


class Series:
    """Every recorded series of one app; `registry` holds the prometheus-client ones."""

    def __init__(self, *, max_input_length: int, max_total_tokens: int):
        self.registry = r = CollectorRegistry(auto_describe=True)
        tokens = _token_buckets(max_total_tokens)

        def hist(name: str, doc: str, buckets, labels: tuple[str, ...] = ()) -> Histogram:
            return Histogram(name, doc, labels, buckets=buckets, registry=r)

        # -- LoRAX's, per HTTP request and per sequence --
        self.request_count = ExactCounter("lorax_request_count", "Generation requests received")
        self.request_success = ExactCounter("lorax_request_success",
                                            "Generation requests answered in full")
        self.request_failure = ExactCounter(
            "lorax_request_failure", "Generation requests that failed, by error type "
            "(validation, overloaded, generation, ...; dropped: the client left)", ("err",))
        self.request_duration = hist("lorax_request_duration",
                                     "Seconds from a request's arrival to its answer",
                                     DURATION_BUCKETS)
        self.validation_duration = hist(
            "lorax_request_validation_duration",
            "Seconds from a request's arrival until it was queued (parsing, tokenizing)",
            DURATION_BUCKETS)
        self.queue_duration = hist("lorax_request_queue_duration",
                                   "Seconds a sequence waited before its prefill",
                                   DURATION_BUCKETS)
        self.inference_duration = hist("lorax_request_inference_duration",
                                       "Seconds from a sequence's prefill to its last token",
                                       DURATION_BUCKETS)
        self.time_per_token = hist("lorax_request_mean_time_per_token_duration",
                                   "A sequence's inference seconds per generated token",
                                   DURATION_BUCKETS)
        self.input_length = hist("lorax_request_input_length", "Prompt tokens of a sequence",
                                 _token_buckets(max_input_length))
        self.max_new_tokens = hist("lorax_request_max_new_tokens",
                                   "max_new_tokens of a sequence", tokens)
        self.generated_tokens = hist("lorax_request_generated_tokens",
                                     "Tokens a sequence generated", tokens)
        # -- LoRAX's, per step (method: prefill when the step prefills any sequence) --
        self.batch_count = ExactCounter("lorax_batch_inference_count", "Steps started",
                                        ("method",))
        self.batch_success = ExactCounter("lorax_batch_inference_success", "Steps that succeeded",
                                          ("method",))
        self.batch_failure = ExactCounter(
            "lorax_batch_inference_failure", "Steps that failed (their requests failed, or "
            "the workers were lost and their requests resumed on new ones)", ("method",))
        self.batch_duration = hist("lorax_batch_inference_duration", "Seconds a step took",
                                   DURATION_BUCKETS, ("method",))
        self.batch_next_size = hist("lorax_batch_next_size", "Sequences a step admitted",
                                    BATCH_SIZE_BUCKETS)
        self.batch_concat = ExactCounter(
            "lorax_batch_concat", "Admissions into a running batch, by reason (backpressure: "
            "enough requests waited; wait_exceeded: they waited max_waiting_tokens steps)",
            ("reason",))
        # -- per adapter --
        self.adapter_requests = Counter(
            "loraxd_adapter_requests", "Generation requests that reached the engine, by "
            "adapter and outcome (success, failure)", ("adapter", "outcome"), registry=r)
        self.adapter_prompt_tokens = Counter("loraxd_adapter_prompt_tokens",
                                             "Prompt tokens of finished sequences, by adapter",
                                             ("adapter",), registry=r)
        self.adapter_generated_tokens = Counter("loraxd_adapter_generated_tokens",
                                                "Tokens generated, by adapter", ("adapter",),
                                                registry=r)
        self.adapter_duration = hist("loraxd_adapter_request_duration_seconds",
                                     "Seconds from arrival to answer of successful requests, by "
                                     "adapter", DURATION_BUCKETS, ("adapter",))
        self.adapter_move = hist(
            "loraxd_adapter_load_duration_seconds", "Seconds an adapter took to move: fetch "
            "(lookup or download to disk), load (from host memory or disk into a device slot)",
            ADAPTER_MOVE_BUCKETS, ("stage",))

    def exact_counters(self) -> list[ExactCounter]:
        return [v for v in vars(self).values() if isinstance(v, ExactCounter)]
