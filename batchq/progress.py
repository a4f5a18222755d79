"""What a run counts, the progress line, and the summary.

The pipeline bumps plain integer counters in one ``Stats`` object; nothing
per request is kept but one increment of a latency histogram, so memory
stays flat however long the job. The progress line and the summary are
rendered from those counters, on a timer, off the request path.
"""

from __future__ import annotations

import math
import sys
import time
from collections import deque
from dataclasses import dataclass, field
from typing import Any, TextIO

_BUCKETS_PER_E = 20  # latency histogram resolution: buckets ~5% wide
_MIN_LATENCY = 1e-4


@dataclass(slots=True)
class LatencyHistogram:
    """Latency percentiles in constant memory (log-spaced buckets, ~5% error)."""

    counts: dict[int, int] = field(default_factory=dict)
    total: int = 0

    def add(self, seconds: float) -> None:
        bucket = int(math.log(max(seconds, _MIN_LATENCY) / _MIN_LATENCY) * _BUCKETS_PER_E)
        self.counts[bucket] = self.counts.get(bucket, 0) + 1
        self.total += 1

    def percentile(self, p: float) -> float | None:
        if not self.total:
            return None
        rank = p / 100 * self.total
        seen = 0
        for bucket in sorted(self.counts):
            seen += self.counts[bucket]
            if seen >= rank:
                return _MIN_LATENCY * math.exp((bucket + 0.5) / _BUCKETS_PER_E)
        return None


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
    rate_limited: int = 0
    in_flight: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    interrupted: bool = False

    @property
    def done(self) -> int:
        return self.ok_before + self.failed_before + self.ok + self.failed

    @property
    def elapsed(self) -> float:
        return time.monotonic() - self.started

    @property
    def pending(self) -> int | None:
        return None if self.total is None else max(0, self.total - self.done)

    def as_dict(self) -> dict[str, Any]:
        return {
            "total": self.total,
            "done": self.done,
            "succeeded": self.ok_before + self.ok,
            "failed": self.failed_before + self.failed,
            "pending": self.pending,
            "this_run": {
                "succeeded": self.ok,
                "failed": self.failed,
                "retries": self.retries,
                "rate_limited": self.rate_limited,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
                "elapsed_s": round(self.elapsed, 3),
                "latency_s": {f"p{p}": _round(self.latency.percentile(p)) for p in (50, 95, 99)},
            },
            "interrupted": self.interrupted,
        }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


class ProgressLine:
    """Renders the live line: redrawn in place on a terminal, a plain line elsewhere."""

    def __init__(self, stats: Stats, stream: TextIO = sys.stderr, *, window: float = 10.0) -> None:
        self.stats = stats
        self.stream = stream
        self.live = stream.isatty()
        self._samples: deque[tuple[float, int, int]] = deque()
        self._window = window

    def render(self) -> str:
        s = self.stats
        now = time.monotonic()
        tokens = s.prompt_tokens + s.completion_tokens
        self._samples.append((now, s.ok + s.failed, tokens))
        while len(self._samples) > 2 and now - self._samples[0][0] > self._window:
            self._samples.popleft()
        t0, done0, tokens0 = self._samples[0]
        if len(self._samples) < 2:  # the first line: rates since the start
            t0, done0, tokens0 = s.started, 0, 0
        span = max(now - t0, 1e-9)
        rate = (s.ok + s.failed - done0) / span
        token_rate = (tokens - tokens0) / span
        total = s.total
        of = f"{total:,}" if total is not None else "?"
        eta = ""
        if total is not None and rate > 0:
            eta = f" · ETA {_duration(max(0.0, total - s.done) / rate)}"
        return (
            f"{s.done:,}/{of} done · {rate:,.1f} req/s · {token_rate:,.0f} tok/s{eta}"
            f" · retries {s.retries:,} · 429s {s.rate_limited:,}"
            f" · failed {s.failed_before + s.failed:,}"
        )

    def show(self) -> None:
        line = self.render()
        if self.live:
            self.stream.write(f"\r\x1b[2K{line}")
        else:
            self.stream.write(f"batchq: {line}\n")
        self.stream.flush()

    def clear(self) -> None:
        if self.live:
            self.stream.write("\r\x1b[2K")
            self.stream.flush()


def _duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def render_summary(stats: Stats, *, results: str, errors: str, resume: str) -> str:
    """The end-of-run report, for humans."""
    s = stats
    state = "interrupted" if s.interrupted else "finished"
    pending = "?" if s.pending is None else f"{s.pending:,}"
    lines = [
        f"batchq: {state} in {_duration(s.elapsed)} — {s.done:,} done: "
        f"{s.ok_before + s.ok:,} succeeded, {s.failed_before + s.failed:,} failed, "
        f"{pending} pending",
        f"  this run: {s.ok:,} succeeded, {s.failed:,} failed, {s.retries:,} retries "
        f"({s.rate_limited:,} for 429), {(s.ok + s.failed) / max(s.elapsed, 1e-9):,.1f} req/s",
        f"  tokens: {s.prompt_tokens:,} prompt + {s.completion_tokens:,} completion"
        f" = {s.prompt_tokens + s.completion_tokens:,}",
    ]
    if s.latency.total:
        p = [s.latency.percentile(q) or 0.0 for q in (50, 95, 99)]
        lines.append(f"  latency: p50 {p[0]:.3f}s · p95 {p[1]:.3f}s · p99 {p[2]:.3f}s")
    lines.append(f"  results: {results}")
    lines.append(f"  errors:  {errors}")
    if s.interrupted or (s.pending or 0) > 0:
        lines.append(f"  to resume: {resume}")
    if s.failed_before + s.failed:
        lines.append(f"  to retry the retryable failures: {resume} --retry-failed")
    return "\n".join(lines)
