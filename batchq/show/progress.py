"""The live progress display and the end-of-run summary.

Everything shown is rendered from a run's ``Stats`` counters (stats.py) by
the runner's timer, a few times a second at most, never on the request path.

On a terminal the display is a tqdm bar (tqdm: one small dependency, no
others of its own, ~40 ms to import and only imported when stderr is a
terminal). Elsewhere, a plain line every few seconds, for logs.
"""

from __future__ import annotations

import os
import sys
import time
from collections import deque
from typing import Any, Protocol, TextIO

from batchq.cost import cost_figures, money, projected
from batchq.stats import Stats, duration


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
    if s.cost is not None:
        text += f" · {_spent(s)}"
    if s.invalid_answers:
        text += f" · invalid answers {s.invalid_answers:,}"
    return text + (f" · pace {s.pace}" if s.pace else "")


def _spent(s: Stats) -> str:
    """``$1.20 spent, ~$4.80 in all (budget $5.00)``: the job's, every run's."""
    assert s.cost is not None
    total = projected(s.cost, s.done, s.pending)
    text = f"{money(s.cost)} spent" + (f", ~{money(total)} in all" if total is not None else "")
    return text + (f" (budget {money(s.budget)})" if s.budget is not None else "")


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


def summary(
    stats: Stats,
    *,
    results: str,
    errors: str,
    resume: str,
    prices: tuple[float, float] = (0.0, 0.0),
) -> dict[str, Any]:
    """The end-of-run figures as one JSON-ready dict (``--json-summary``).

    ``prices``: per million prompt and completion tokens; the cost is shown only with one.
    """
    s = stats
    failed = s.failed_before + s.failed
    return {
        "state": "interrupted"
        if s.interrupted
        else ("budget_reached" if s.budget_reached else "finished"),
        "total": s.total,
        "succeeded": s.ok_before + s.ok,
        "failed": failed,
        "pending": s.pending,
        "cost": None if s.cost is None else _job_cost(s),
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
            "invalid_answers": s.invalid_answers,  # asked again: extra requests
            "cost": _cost(s, *prices) if any(prices) or s.cost is not None else None,
            "batches": None
            if s.batches_open is None
            else {"created": s.batches_created, "open": s.batches_open, "lines": s.by_batch},
        },
        "results": results,
        "errors": errors,
        "resume": resume if s.interrupted or s.pending else None,
        "retry_failed": f"{resume} --retry-failed" if failed else None,
    }


def _job_cost(s: Stats) -> dict[str, Any]:
    """The job's spend, every run's, and the projection for every line (live runs)."""
    assert s.cost is not None
    return {
        **cost_figures(s.cost, s.done, s.pending, s.budget),
        "budget_reached": s.budget_reached,
    }


def _cost(s: Stats, price_in: float, price_out: float) -> dict[str, float]:
    """This run's cost, lines answered by batch at half price; and the same all live."""
    if s.cost is not None:  # live: counted answer by answer (cached tokens, retries, prices)
        return {"spent": round(s.run_cost, 6), "all_live": round(s.run_cost, 6)}
    live = (s.prompt_tokens * price_in + s.completion_tokens * price_out) / 1e6
    by_batch = (s.batch_prompt_tokens * price_in + s.batch_completion_tokens * price_out) / 1e6
    return {"spent": round(live - by_batch / 2, 6), "all_live": round(live, 6)}


def _render_cost(cost: dict[str, Any], this_run: float) -> str:
    text = f"{money(cost['spent'])} spent ({money(this_run)} this run)"
    if cost["projected"] is not None:
        text += f", ~{money(cost['projected'])} for the whole job"
    if cost["budget"] is not None:
        text += f"; budget {money(cost['budget'])}" + (" reached" if cost["budget_reached"] else "")
    return text


def _round(value: float | None) -> float | None:
    return None if value is None else round(value, 4)


_STATES = {"budget_reached": "stopped at the budget"}


def render_summary(figures: dict[str, Any]) -> str:
    """The end-of-run report, for humans, from ``summary()``."""
    f, run = figures, figures["this_run"]
    pending = "?" if f["pending"] is None else f"{f['pending']:,}"
    causes = ", ".join(f"{n:,} × {cause}" for cause, n in run["retries_by_cause"].items())
    lines = [
        f"batchq: {_STATES.get(f['state'], f['state'])} in {duration(run['elapsed_s'])} — "
        f"{f['succeeded']:,} succeeded, "
        f"{f['failed']:,} failed, {pending} pending",
        f"  this run: {run['succeeded']:,} succeeded, {run['failed']:,} failed, "
        f"{run['requests_per_s']:,.1f} req/s; {run['retries']:,} retries"
        + (f" ({causes})" if causes else ""),
        f"  tokens: {run['prompt_tokens']:,} prompt + {run['completion_tokens']:,} completion"
        f" = {run['total_tokens']:,}",
    ]
    if job_cost := f["cost"]:
        lines.append(f"  cost: {_render_cost(job_cost, run['cost']['spent'])}")
    elif cost := run["cost"]:
        lines.append(f"  cost: ${cost['spent']:,.2f} (all live: ${cost['all_live']:,.2f})")
    latency = run["latency_s"]
    if latency["p50"] is not None:
        lines.append(
            f"  latency: p50 {latency['p50']:.3f}s · p95 {latency['p95']:.3f}s"
            f" · p99 {latency['p99']:.3f}s"
        )
    if run["batches"] is not None:
        batches = run["batches"]
        lines.append(
            f"  provider batches: {batches['created']:,} created this run, "
            f"{batches['open']:,} still open (billed as they finish)"
            + (
                f"; {batches['lines']:,} lines by batch, "
                f"{run['succeeded'] + run['failed'] - batches['lines']:,} live"
                if batches["lines"] is not None
                else ""
            )
        )
    else:
        lines.append(f"  concurrency: at most {run['concurrency']['peak_in_flight']:,} in flight")
    if run["hedges"]["sent"]:
        hedges = run["hedges"]
        lines[-1] += f"; {hedges['sent']:,} hedges (~{hedges['estimated_tokens']:,} tokens extra)"
    if run["invalid_answers"]:
        lines.append(
            f"  answers that did not parse or fit: {run['invalid_answers']:,} asked again "
            "(extra requests, their tokens counted above)"
        )
    lines.append(f"  results: {f['results']}")
    lines.append(f"  errors:  {f['errors']}")
    if f["resume"]:
        lines.append(f"  to resume: {f['resume']}")
    if f["retry_failed"]:
        lines.append(f"  to retry the retryable failures: {f['retry_failed']}")
    return "\n".join(lines)
