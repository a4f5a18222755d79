"""Prometheus metrics of a running job: ``batchq run --metrics-port PORT``.

While the job runs, ``http://HOST:PORT/metrics`` answers in the Prometheus
text exposition format 0.0.4, rendered from the run's ``Stats`` (stats.py)
when it is scraped: nothing is added to the request path, and a scrape
costs one pass over a few dozen counters on the run's own event loop.

Every series is labelled ``job`` (the job folder's name) and ``shard``
(``I/N``; ``0/1`` when the job is not sharded), so the processes of a
Kubernetes Indexed Job or a Slurm array add up on one dashboard
(``sum by (job) (rate(batchq_requests_total[5m]))``).

Counters (``*_total``, the histogram) count what this process did, from
zero, as Prometheus expects of a counter: a resumed job starts them again,
and ``rate()`` and ``increase()`` read that as the restart it is. What the
job did before is in the gauges ``batchq_job_requests_done`` and
``batchq_job_requests``. Under ``--via auto`` the batch phase's counters and
the live phase's add up, so nothing goes backwards between the two.

Written to the format's specification rather than with ``prometheus_client``:
the format is a few lines of text, and the client would bring a process-wide
registry (two runs in one Python process would collide in it) and an HTTP
server on threads of its own, where this one serves from the run's loop.
"""

from __future__ import annotations

import errno
import math
import time
from collections import Counter
from collections.abc import Awaitable, Mapping
from typing import TYPE_CHECKING, TypeVar

from batchq.errors import ConfigError, Notify
from batchq.show.progress import _cost  # the summary's own cost, so the two always agree
from batchq.stats import LatencyHistogram, Stats

if TYPE_CHECKING:  # pragma: no cover
    from aiohttp import web

    from batchq.job.folder import Job

T = TypeVar("T")
CONTENT_TYPE = "text/plain; version=0.0.4; charset=utf-8"
#: Of stats' latency buckets (~5% wide), the bounds exported: every tenth (each ~1.65x the
#: last), from 1 ms to ~1 h. Cumulative counts at a subset of the bounds are still exact; 31
#: series instead of 381 keep a scrape of a hundred shards light. ``le`` shows each bound to
#: four significant digits: within 0.05% of it, a hundredth of a bucket's own width.
_EXPORTED = range(46, 349, 10)


class Metrics:
    """The counters of one process's runs of a job (the phases of ``--via auto`` add up)."""

    def __init__(self, job: Job, on_notice: Notify) -> None:
        shard = "0/1" if job.shard is None else str(job.shard)
        self.host = job.settings.metrics_host
        self.port = job.settings.metrics_port or 0
        self.labels = {"job": job.dir.resolve().name, "shard": shard}
        self.prices = (job.settings.price_in, job.settings.price_out)
        self.batching = job.settings.via != "live"
        self.on_notice = on_notice
        self.started = time.time()
        self.runs: list[Stats] = []
        self._runner: web.AppRunner | None = None

    async def watch(self, stats: Stats) -> None:
        """Count ``stats`` too: a run's (or phase's), whose job has just been opened.

        The first one opens the port: after the job's lock, so a second run of a
        running job is told so, and before anything is sent. ConfigError (exit 2)
        if the port cannot be had.
        """
        if self._runner is None:
            self._runner = await self._listen()
        self.runs.append(stats)

    async def aclose(self) -> None:
        """Stop serving; does nothing if not serving."""
        runner, self._runner = self._runner, None
        if runner is not None:
            await runner.cleanup()

    def render(self) -> bytes:
        """Every metric, in the text exposition format 0.0.4."""
        out = _Exposition(self.labels)
        self._counters(out, self.runs)
        self._gauges(out, self.runs[-1] if self.runs else Stats(started=0.0))
        return out.text()

    def _counters(self, out: _Exposition, runs: list[Stats]) -> None:
        """What this process did: sums over its runs, so they never go back."""

        def total(field: str) -> int:
            return sum(getattr(s, field) for s in runs)

        ok, failed = total("ok"), total("failed")
        out.each(
            "batchq_requests_total",
            "counter",
            "Requests finished, by outcome.",
            "status",
            {"ok": ok, "failed": failed},
        )
        causes = sum((s.retry_causes for s in runs), Counter[str]())
        out.each(
            "batchq_retries_total",
            "counter",
            "Attempts sent again, by cause.",
            "cause",
            dict(sorted(causes.items())),
        )
        out.one("batchq_rate_limited_total", "counter", "Answers 429.", total("rate_limited"))
        tokens = {"prompt": total("prompt_tokens"), "completion": total("completion_tokens")}
        out.each("batchq_tokens_total", "counter", "Tokens of the answers.", "kind", tokens)
        out.one("batchq_hedges_total", "counter", "Second copies of stragglers.", total("hedges"))
        out.one(
            "batchq_invalid_answers_total",
            "counter",
            "Answers that did not parse or fit the schema, asked again.",
            total("invalid_answers"),
        )
        if any(self.prices) or any(s.cost is not None for s in runs):  # prices by model too
            spent = sum(_cost(s, *self.prices)["spent"] for s in runs)
            out.one("batchq_cost_total", "counter", "Spent, in the prices' unit.", spent)
        out.histogram(
            "batchq_request_duration_seconds",
            "Latency of the attempts answered 2xx.",
            [s.latency for s in runs],
        )
        if self.batching:
            out.one(
                "batchq_batches_created_total",
                "counter",
                "Provider batches created.",
                total("batches_created"),
            )

    def _gauges(self, out: _Exposition, last: Stats) -> None:
        """How things stand now: the latest run's (or phase's) figures."""
        out.one("batchq_in_flight", "gauge", "Requests at the endpoint now.", last.in_flight)
        out.one(
            "batchq_in_flight_allowance",
            "gauge",
            "Requests the pool may have in flight.",
            last.allowance,
        )
        if last.binding:
            out.each(
                "batchq_held_by",
                "gauge",
                "What holds sending back (1 for the one).",
                "reason",
                {last.binding: 1},
            )
        if last.pace_rates:
            out.each(
                "batchq_pace_per_second",
                "gauge",
                "The pace now, in units a second.",
                "limit",
                dict(sorted(last.pace_rates.items())),
            )
        if self.batching:  # the batch phase's last count, under --via auto
            opened = [s.batches_open for s in self.runs if s.batches_open is not None]
            out.one("batchq_batches_open", "gauge", "Provider batches open.", (opened or [0])[-1])
        if last.total is not None:
            out.one(
                "batchq_job_requests", "gauge", "Requests in the input (the shard's).", last.total
            )
        out.one("batchq_job_requests_done", "gauge", "Done, earlier runs included.", last.done)
        if last.cost is not None:
            out.one("batchq_job_cost", "gauge", "Spent, earlier runs included.", last.cost)
        if last.budget is not None:
            out.one("batchq_job_budget", "gauge", "--max-cost, in the prices' unit.", last.budget)
        out.one(
            "batchq_start_time_seconds", "gauge", "When this process began serving.", self.started
        )

    async def _listen(self) -> web.AppRunner:
        from aiohttp import web

        async def metrics(request: web.Request) -> web.Response:
            return web.Response(body=self.render(), headers={"Content-Type": CONTENT_TYPE})

        app = web.Application()
        app.router.add_get("/metrics", metrics)
        runner = web.AppRunner(app, access_log=None, shutdown_timeout=0.5)
        await runner.setup()
        try:
            await web.TCPSite(runner, self.host, self.port).start()
        except OSError as exc:
            await runner.cleanup()
            raise ConfigError(_unavailable(self.host, self.port, exc)) from None
        except BaseException:
            await runner.cleanup()
            raise
        host, port = runner.addresses[0][:2]
        self.started = time.time()
        self.on_notice(f"metrics: http://{f'[{host}]' if ':' in host else host}:{port}/metrics")
        return runner


def metrics_of(job: Job, on_notice: Notify) -> Metrics | None:
    """The metrics ``job`` is to serve; None without a metrics port."""
    return None if job.settings.metrics_port is None else Metrics(job, on_notice)


async def served(metrics: Metrics | None, run: Awaitable[T]) -> T:
    """``run``, then the metrics' port closed (``Metrics.watch`` opened it with the job)."""
    if metrics is None:
        return await run
    try:
        return await run
    finally:
        await metrics.aclose()


def _unavailable(host: str, port: int, exc: OSError) -> str:
    where = f"--metrics-port {port} on {host}"
    if exc.errno == errno.EADDRINUSE:
        return f"{where}: the port is in use; choose another, or 0 for a free one"
    if exc.errno == errno.EACCES:
        return f"{where}: permission denied (ports below 1024 need privileges); choose another"
    return f"{where}: cannot listen there ({exc.strerror or exc}); check --metrics-host"


class _Exposition:
    """Lines of the text format: a HELP and TYPE per family, then its samples."""

    def __init__(self, labels: dict[str, str]) -> None:
        self.base = ",".join(f'{k}="{_escape(v)}"' for k, v in labels.items())
        self.lines: list[str] = []

    def family(self, name: str, kind: str, doc: str) -> None:
        doc = doc.replace("\\", "\\\\").replace("\n", "\\n")
        self.lines += [f"# HELP {name} {doc}", f"# TYPE {name} {kind}"]

    def sample(self, name: str, value: float, **labels: str) -> None:
        more = "".join(f',{k}="{_escape(v)}"' for k, v in labels.items())
        self.lines.append(f"{name}{{{self.base}{more}}} {_number(value)}")

    def one(self, name: str, kind: str, doc: str, value: float) -> None:
        self.family(name, kind, doc)
        self.sample(name, value)

    def each(self, name: str, kind: str, doc: str, label: str, values: Mapping[str, float]) -> None:
        self.family(name, kind, doc)
        for key, value in values.items():
            self.sample(name, value, **{label: key})

    def histogram(self, name: str, doc: str, parts: list[LatencyHistogram]) -> None:
        """Cumulative ``le`` buckets at the exported bounds, then ``+Inf``, ``_sum``, ``_count``."""
        self.family(name, "histogram", doc)
        counts = [sum(column) for column in zip(*(h.counts for h in parts), strict=True)]
        bounds = LatencyHistogram.bounds()
        below = 0  # stats' bucket i holds latencies under bounds[i]
        done = 0
        for i in _EXPORTED:
            below += sum(counts[done : i + 1])
            done = i + 1
            self.sample(f"{name}_bucket", below, le=f"{bounds[i]:.4g}")
        self.sample(f"{name}_bucket", sum(counts), le="+Inf")
        self.sample(f"{name}_sum", sum(h.seconds for h in parts))
        self.sample(f"{name}_count", sum(h.total for h in parts))

    def text(self) -> bytes:
        return ("\n".join(self.lines) + "\n").encode()


def _escape(value: str) -> str:
    return value.replace("\\", "\\\\").replace('"', '\\"').replace("\n", "\\n")


def _number(value: float) -> str:
    if isinstance(value, int):
        return str(value)
    if math.isnan(value):
        return "NaN"
    if math.isinf(value):
        return "+Inf" if value > 0 else "-Inf"
    return repr(value)
