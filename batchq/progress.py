"""What a run counts, the live progress display, and the summary.

The pipeline bumps plain integer counters in one ``Stats`` object; nothing
per request is kept but one increment of a latency histogram, so memory
stays flat however long the job. Everything shown is rendered from those
counters by the runner's timer, a few times a second at most, never on the
request path.

On a terminal the display is a tqdm bar (tqdm: one small dependency, no
others of its own, ~40 ms to import and only imported when stderr is a
terminal). Elsewhere, a plain line every few seconds, for logs.
"""

from __future__ import annotations

import bisect
import math
import os
import sys
import time
from collections import Counter, deque
from dataclasses import dataclass, field
from typing import Any, Protocol, TextIO

# Latency buckets ~5% wide from 0.1 ms to ~14 hours: constant memory, ~5% error.
_BOUNDS = [1e-4 * math.exp(i / 20) for i in range(380)]


@dataclass(slots=True)
class LatencyHistogram:
    """Latency percentiles in constant memory (log-spaced buckets, ~5% error)."""

    counts: list[int] = field(default_factory=lambda: [0] * (len(_BOUNDS) + 1))
    total: int = 0

    def add(self, seconds: float) -> None:
        self.counts[bisect.bisect_right(_BOUNDS, seconds)] += 1
        self.total += 1

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
    prompt_tokens: int = 0
    completion_tokens: int = 0
    latency: LatencyHistogram = field(default_factory=LatencyHistogram)
    pace: str | None = None  # the current pace, while rate limits slow it down
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

    def retried(self, cause: str) -> None:
        self.retries += 1
        self.retry_causes[cause] += 1


class RateWindow:
    """Requests and tokens a second over the last ``window`` seconds."""

    def __init__(self, stats: Stats, window: float = 10.0) -> None:
        self.stats = stats
        self.window = window
        self._samples: deque[tuple[float, int, int]] = deque([(stats.started, 0, 0)])

    def rates(self) -> tuple[float, float]:
        s = self.stats
        now, done, tokens = time.monotonic(), s.ok + s.failed, s.prompt_tokens + s.completion_tokens
        self._samples.append((now, done, tokens))
        while len(self._samples) > 2 and now - self._samples[1][0] > self.window:
            self._samples.popleft()
        t0, done0, tokens0 = self._samples[0]
        span = max(now - t0, 1e-9)
        return (done - done0) / span, (tokens - tokens0) / span


def _tail(s: Stats, token_rate: float) -> str:
    """The figures after the count: tokens, concurrency, retries, 429s, failures, a slowed pace."""
    text = (
        f"{token_rate:,.0f} tok/s · in flight {s.in_flight:,}/{s.allowance:,}"
        + (f" ({s.binding})" if s.binding else "")
        + f" · retries {s.retries:,} · 429s {s.rate_limited:,}"
        f" · failed {s.failed_before + s.failed:,}"
    )
    if s.hedges:
        text += f" · hedges {s.hedges:,}"
    return text + (f" · pace {s.pace}" if s.pace else "")


class Progress(Protocol):
    def show(self) -> None: ...
    def close(self) -> None: ...


class PlainProgress:
    """One plain line per call, for logs: ``batchq: 1,200/5,000 done · 98.1 req/s · ...``."""

    def __init__(self, stats: Stats, stream: TextIO) -> None:
        self.stats, self.stream, self.window = stats, stream, RateWindow(stats)

    def render(self) -> str:
        s = self.stats
        rate, token_rate = self.window.rates()
        of = "?" if s.total is None else f"{s.total:,}"
        eta = ""
        if s.pending is not None and rate > 0:
            eta = f" · ETA {duration(s.pending / rate)}"
        return f"{s.done:,}/{of} done · {rate:,.1f} req/s{eta} · {_tail(s, token_rate)}"

    def show(self) -> None:
        self.stream.write(f"batchq: {self.render()}\n")
        self.stream.flush()

    def close(self) -> None:
        pass


class TerminalProgress:
    """A live tqdm bar redrawn in place: count, percentage, rate, ETA and the same figures."""

    def __init__(self, stats: Stats, stream: TextIO, *, notebook: bool = False) -> None:
        # Only on a terminal or in a notebook: nothing else pays for the import.
        if notebook:
            from tqdm.auto import tqdm
        else:
            from tqdm import tqdm  # type: ignore[assignment]

        self.stats, self.window = stats, RateWindow(stats)
        try:
            columns = os.get_terminal_size(stream.fileno()).columns
        except (OSError, ValueError):
            columns = 0
        self._bar = tqdm(
            total=stats.total,
            initial=stats.done,
            unit="req",
            file=stream,
            # A terminal that reports no width (some CI consoles, `script`) would get nothing.
            dynamic_ncols=bool(columns),
            ncols=None if columns else 120,
            smoothing=0.1,
            mininterval=0.2,
            leave=False,
            bar_format="{n_fmt}/{total_fmt} {bar} {percentage:3.0f}% · {rate_fmt} · ETA {remaining}"
            "{postfix}",  # tqdm puts ", " before the postfix
        )

    def show(self) -> None:
        _, token_rate = self.window.rates()
        self._bar.set_postfix_str(_tail(self.stats, token_rate), refresh=False)
        self._bar.update(self.stats.done - self._bar.n)

    def close(self) -> None:
        self._bar.close()


def make_progress(stats: Stats, stream: TextIO = sys.stderr) -> Progress:
    """A bar on a terminal or in a notebook (which draws its own widget: tqdm.auto);
    plain lines elsewhere, for logs."""
    if "ipykernel" in sys.modules and not stream.isatty():
        return TerminalProgress(stats, stream, notebook=True)
    return TerminalProgress(stats, stream) if stream.isatty() else PlainProgress(stats, stream)


def duration(seconds: float) -> str:
    seconds = round(seconds)
    if seconds < 60:
        return f"{seconds}s"
    if seconds < 3600:
        return f"{seconds // 60}m{seconds % 60:02d}s"
    return f"{seconds // 3600}h{seconds % 3600 // 60:02d}m"


def summary(stats: Stats, *, results: str, errors: str, resume: str) -> dict[str, Any]:
    """The end-of-run figures as one JSON-ready dict (``--json-summary``)."""
    s = stats
    failed = s.failed_before + s.failed
    return {
        "state": "interrupted" if s.interrupted else "finished",
        "total": s.total,
        "succeeded": s.ok_before + s.ok,
        "failed": failed,
        "pending": s.pending,
        "this_run": {
            "succeeded": s.ok,
            "failed": s.failed,
            "elapsed_s": round(s.elapsed, 3),
            "requests_per_s": round((s.ok + s.failed) / max(s.elapsed, 1e-9), 2),
            "prompt_tokens": s.prompt_tokens,
            "completion_tokens": s.completion_tokens,
            "total_tokens": s.prompt_tokens + s.completion_tokens,
            "latency_s": {f"p{p}": _round(s.latency.percentile(p)) for p in (50, 95, 99)},
            "retries": s.retries,
            "retries_by_cause": dict(sorted(s.retry_causes.items())),
            "rate_limited": s.rate_limited,
            "concurrency": {"peak_in_flight": s.peak_in_flight, "allowance": s.allowance},
            "hedges": {"sent": s.hedges, "estimated_tokens": s.hedge_tokens},
        },
        "results": results,
        "errors": errors,
        "resume": resume if s.interrupted or s.pending else None,
        "retry_failed": f"{resume} --retry-failed" if failed else None,
    }


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


def render_summary(figures: dict[str, Any]) -> str:
    """The end-of-run report, for humans, from ``summary()``."""
    f, run = figures, figures["this_run"]
    pending = "?" if f["pending"] is None else f"{f['pending']:,}"
    causes = ", ".join(f"{n:,} × {cause}" for cause, n in run["retries_by_cause"].items())
    lines = [
        f"batchq: {f['state']} in {duration(run['elapsed_s'])} — {f['succeeded']:,} succeeded, "
        f"{f['failed']:,} failed, {pending} pending",
        f"  this run: {run['succeeded']:,} succeeded, {run['failed']:,} failed, "
        f"{run['requests_per_s']:,.1f} req/s; {run['retries']:,} retries"
        + (f" ({causes})" if causes else ""),
        f"  tokens: {run['prompt_tokens']:,} prompt + {run['completion_tokens']:,} completion"
        f" = {run['total_tokens']:,}",
    ]
    latency = run["latency_s"]
    if latency["p50"] is not None:
        lines.append(
            f"  latency: p50 {latency['p50']:.3f}s · p95 {latency['p95']:.3f}s"
            f" · p99 {latency['p99']:.3f}s"
        )
    lines.append(f"  concurrency: at most {run['concurrency']['peak_in_flight']:,} in flight")
    if run["hedges"]["sent"]:
        hedges = run["hedges"]
        lines[-1] += f"; {hedges['sent']:,} hedges (~{hedges['estimated_tokens']:,} tokens extra)"
    lines.append(f"  results: {f['results']}")
    lines.append(f"  errors:  {f['errors']}")
    if f["resume"]:
        lines.append(f"  to resume: {f['resume']}")
    if f["retry_failed"]:
        lines.append(f"  to retry the retryable failures: {f['retry_failed']}")
    return "\n".join(lines)
