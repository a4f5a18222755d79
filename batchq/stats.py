"""What a run counts: plain counters and a latency histogram in constant memory.

The pipeline bumps plain integer counters in one ``Stats`` object; nothing
per request is kept but one increment of a latency histogram, so memory
stays flat however long the job. Both executors count here; show/ renders it.
"""

from __future__ import annotations

import bisect
import math
import time
from collections import Counter
from collections.abc import Sequence
from dataclasses import dataclass, field

# Latency buckets ~5% wide from 0.1 ms to ~14 hours: constant memory, ~5% error.
_BOUNDS = [1e-4 * math.exp(i / 20) for i in range(380)]


@dataclass(slots=True)
class LatencyHistogram:
    """Latency percentiles in constant memory (log-spaced buckets, ~5% error)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(_BOUNDS) + 1))
    total: int = 0
    seconds: float = 0.0  # the sum of every latency added (Prometheus' histogram ``_sum``)

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_right(_BOUNDS, seconds)] += 1
        self.total += 1
        self.seconds += seconds

    @staticmethod
    def bounds() -> Sequence[float]:
        """The buckets' upper bounds (exclusive); the last bucket has none."""
        return _BOUNDS

    def percentile(self, p: float) -> float | None:
        if not self.total:
            return None
        rank = p / 100 * self.total
        seen = 0
        for bucket, count in enumerate(self.counts):
            seen += count
            if count and seen >= rank:
                low = _BOUNDS[bucket - 1] if bucket else 0.0
                high = _BOUNDS[bucket] if bucket < len(_BOUNDS) else low
                return math.sqrt(low * high) if low else high  # the bucket's middle
        return None


@dataclass(slots=True)
class DeploymentStats:
    """What one deployment of a pool did this run (``[[deployments]]``)."""

    requests: int = 0  # attempts sent to it, hedges and probes included
    ok: int = 0
    errors: int = 0  # attempts that failed: any non-2xx, or no answer
    rate_limited: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    in_flight: int = 0
    state: str = "in"  # "in", "out" (taken out, waiting for its probe), "probing"
    outs: int = 0  # times it was taken out
    why: str | None = None  # why it was last taken out

    def figures(self) -> dict[str, object]:
        """As the summary, ``status`` and progress.json show it."""
        p50, p95 = self.latency.percentile(50), self.latency.percentile(95)
        return {
            "requests": self.requests,
            "succeeded": self.ok,
            "errors": self.errors,
            "rate_limited": self.rate_limited,
            "latency_s": {
                "p50": None if p50 is None else round(p50, 4),
                "p95": None if p95 is None else round(p95, 4),
            },
            "in_flight": self.in_flight,
            "state": self.state,
            "taken_out": self.outs,
            "why": self.why,
        }


@dataclass(slots=True)
class Stats:
    """Counters of one run (``*_before`` are what earlier runs of the job had done)."""

    started: float = field(default_factory=time.monotonic)
    ok_before: int = 0
    failed_before: int = 0
    total: int | None = None  # requests in the input
    ok: int = 0
    failed: int = 0
    retries: int = 0
    retry_causes: Counter[str] = field(default_factory=Counter)  # "429", "503", "timeout", ...
    rate_limited: int = 0
    in_flight: int = 0
    peak_in_flight: int = 0
    allowance: int = 0  # requests the pool may have in flight now
    binding: str | None = None  # what holds sending back: "pace", "endpoint capacity", ...
    hedges: int = 0  # second copies sent (--hedge)
    hedge_tokens: int = 0  # their estimated tokens
    invalid_answers: int = 0  # answers that did not fit the schema, asked again (extra requests)
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    pace: str | None = None  # the current pace, while rate limits slow it down
    pace_rates: dict[str, float] = field(default_factory=dict)  # a second, by limit: "requests"
    batches_created: int = 0  # provider batches this run created (--via batch)
    batches_open: int | None = None  # left running at the provider; None: a live run
    by_batch: int | None = None  # --via auto: of this run's lines, those a batch answered
    batch_prompt_tokens: int = 0  # of this run's tokens, those answered by batch (half price)
    batch_completion_tokens: int = 0
    cost: float | None = None  # the job's spend so far, every run's (None: no price)
    run_cost: float = 0.0  # of which this run's
    budget: float | None = None  # --max-cost
    budget_reached: bool = False  # the next request could have crossed it: sending stopped
    budget_wanted: float = 0.0  # what the job would have needed to send that request
    interrupted: bool = False
    deployments: dict[str, DeploymentStats] = field(default_factory=dict)  # by name; {}: one

    @property
    def done(self) -> int:
        return self.ok_before + self.failed_before + self.ok + self.failed

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def pending(self) -> int | None:
        return None if self.total is None else max(0, self.total - self.done)

    def retried(self, cause: str) -> None:
        self.retries += 1
        self.retry_causes[cause] += 1


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"
