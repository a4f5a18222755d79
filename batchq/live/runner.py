"""The pipeline: a reader feeds a pool of workers, whose outcomes one writer appends.

::

    feed ──requests──▶ process × concurrency ──outcomes──▶ write_outcomes ──▶ Journal
      │                                                       ▲
      └──────────── bad input lines ──────────────────────────┘

Both queues are bounded, so a fast reader never pulls a large file into
memory. Every task belongs to a TaskGroup. Only the writer touches the
output files; ``_tick`` makes them durable a few times a second.

Stopping is cancellation. The first SIGINT or SIGTERM stops the feeding,
lets the requests in flight finish for up to ``drain_timeout`` seconds, then
cancels what is left; a second signal cancels at once. Either way the
writer's ``finally`` and ``Journal.close`` make everything received durable,
and whatever was in flight is simply sent again on resume.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field
from functools import partial
from typing import TYPE_CHECKING, Any

import orjson

from batchq.answers import Answers, Invalid, load_answers
from batchq.config import DeploymentSpec, Settings, pool_of, show, url_secrets
from batchq.cost import money, usage_tokens
from batchq.errors import (
    BatchqError,
    FatalEndpointError,
    HTTPStatusError,
    InvalidResponse,
    Notify,
    RequestError,
    TransportError,
)
from batchq.job.batches import held_lines
from batchq.job.folder import Job, write_progress
from batchq.job.history import History
from batchq.job.journal import Journal
from batchq.job.run import SIGNALS, open_run
from batchq.job.shard import Span
from batchq.job.spend import open_meter
from batchq.live.budget import BudgetGate
from batchq.live.concurrency import Pool, descriptor_ceiling
from batchq.live.deployments import Copies, Deployment, Router
from batchq.live.hedge import Answer, Hedger, answer
from batchq.live.limiter import Kind, Pacer
from batchq.live.retry import Fatal, GiveUp, Retry, RetryPolicy, decide, status_error
from batchq.live.serverload import LoadReader, follow, metrics_url
from batchq.live.transport import AiohttpTransport, Response, Transport
from batchq.reader import RequestTemplate, feed
from batchq.records import (
    MAX_ANSWER_DEPTH,
    Outcome,
    Request,
    error_line,
    result_line,
    scrubbers,
    splices,
)
from batchq.show.progress import make_progress
from batchq.stats import Stats

if TYPE_CHECKING:  # pragma: no cover
    from batchq.live.limits_store import SharedLimits

COMMIT_INTERVAL = 0.2
SNAPSHOT_INTERVAL = 2.0  # progress.json, for `batchq status` of a running job


@dataclass(frozen=True, slots=True, kw_only=True)
class RunOptions:
    """How to run a job, beyond its settings."""

    api_key: str | None = None
    deployment_keys: Mapping[str, str | None] = field(default_factory=dict)  # by name
    limits_store_password: str | None = None  # when the store's URL names none
    retry_failed: bool = False
    durable: bool = True  # fsync the checkpoint; off only to measure what fsync costs
    progress_every: float | None = None  # seconds between progress lines; None = quiet
    on_notice: Notify = field(default=lambda message, level=logging.INFO: None)
    handle_signals: bool = False  # SIGINT/SIGTERM drain the pool: for the command line
    transport: Transport | None = None  # None: aiohttp, to the job's base URL
    on_outcomes: Callable[[list[bytes]], Awaitable[None]] | None = None  # lines written
    on_open: Callable[[], Awaitable[None]] | None = None  # the job is open, nothing sent yet
    on_stats: Callable[[Stats], Awaitable[None]] | None = None  # its counters, once open
    response_model: Any = None  # a pydantic model class every answer must also pass (api.py)


async def run_job(job: Job, options: RunOptions) -> Stats:
    """Run ``job`` until every request is done, a fatal answer, or a signal.

    Raises FatalEndpointError (exit 3) when the endpoint refuses the job as
    a whole; the other BatchqErrors (exit 2) before anything is sent.
    """
    # A bad schema is refused before anything is opened or sent.
    answers = load_answers(job.settings, job.dir, options.response_model)
    async with open_run(job, options) as opened:
        pipeline = Pipeline(job, opened.journal, opened.stats, opened.span, options, answers)
        await pipeline.run()
    return opened.stats


class Pipeline:
    """One run's tasks and queues; ``stop`` is what a signal calls."""

    def __init__(
        self,
        job: Job,
        journal: Journal,
        stats: Stats,
        span: Span,
        options: RunOptions,
        answers: Answers | None = None,
    ) -> None:
        settings = job.settings
        self.job = job
        self.journal = journal
        self.stats = stats
        self.span = span  # of the input: bytes appended after the run began wait for the next
        self.options = options
        self.multi = bool(settings.deployments)  # [[deployments]]: lines say which answered
        self.deployments = [_deployment(spec, settings, options) for spec in pool_of(settings)]
        self.router = Router(self.deployments)
        # The first deployment's, which is the only one without [[deployments]].
        self.pool, self.pacer = self.deployments[0].pool, self.deployments[0].pacer
        for pool in [d.pool for d in self.deployments]:
            if pool.ceiling < pool.wanted:
                options.on_notice(
                    f"{pool.wanted:,} requests in flight would need more open files than this "
                    f"process may have (ulimit -n): at most {pool.ceiling:,}",
                    logging.WARNING,
                )
        # The gates, not the number of workers, set the pace.
        self.workers = sum(d.pool.ceiling for d in self.deployments)
        if self.multi:
            self.workers = descriptor_ceiling(self.workers)
        # Bounded by what keeps the workers and the writer busy, not by the ceiling: under
        # --concurrency auto (1,024 workers) twice the ceiling held ~8 MiB of parsed
        # requests that no worker was ready for.
        self.requests: asyncio.Queue[Request | None] = asyncio.Queue(
            maxsize=min(2 * self.workers, 256)
        )
        self.outcomes: asyncio.Queue[Outcome | None] = asyncio.Queue(
            maxsize=min(4 * self.workers, 1024)
        )
        self.meter = meter = open_meter(job, journal)  # None: no price, no cost shown
        budgeted = meter is not None and meter.limit is not None
        self.budget = (
            BudgetGate(meter, self._budget_reached, options.on_notice)
            if meter and budgeted
            else None
        )
        if settings.hedge and budgeted:
            options.on_notice(  # INFO, not a warning: hedging may be on by default
                "no hedges under --max-cost: a hedge's losing copy is cancelled before the "
                "endpoint reports what it cost, so the budget could not count it"
            )
        hedging = settings.hedge and not budgeted
        self.hedger = Hedger(stats.pending or 0, stats.latency) if hedging else None
        self.exhausted = False  # every request has been taken by a worker
        self.policy = RetryPolicy(max_attempts=settings.max_attempts, max_wait=settings.max_wait)
        keys = (options.api_key, *options.deployment_keys.values(), *url_secrets(settings))
        self.scrubbers = scrubbers(*keys)
        self.answers = answers  # the check of every answer (--json-schema, --json-mode)
        self.template = RequestTemplate.from_settings(settings, answers)
        # Looked up once: asyncio.get_running_loop() makes a getpid() system call each time.
        self.loop = asyncio.get_running_loop()
        self._feeder: asyncio.Task[None] | None = None
        self._main: asyncio.Task[None] | None = None
        self.history = History(job.run_dir, prices=(settings.price_in, settings.price_out))

    async def run(self) -> None:
        loop = asyncio.get_running_loop()
        signals = SIGNALS if self.options.handle_signals else ()
        previous = {sig: signal.getsignal(sig) or signal.SIG_DFL for sig in signals}
        for sig in signals:
            loop.add_signal_handler(sig, self.stop)
        try:
            if self.stats.interrupted:
                return  # signalled while the job was opening: send nothing
            async with asyncio.TaskGroup() as tg:
                self._main = tg.create_task(self._run())
            if self.budget is not None and self.budget.unpriced is not None:
                raise self.budget.unpriced  # once what was in flight is written
        except BaseExceptionGroup as group:
            raise _first_fatal(group) from None
        finally:
            self._report_cost()
            for sig, handler in previous.items():
                loop.remove_signal_handler(sig)
                # which left SIGTERM at its default: a signal during the final commit killed us
                signal.signal(sig, handler)
            # the last point, once every outcome is counted
            self.history.record(self.stats, loop.time(), pace=self._pace())
            self.history.close()

    def _fatal(self, reason: str, error: RequestError) -> str:
        """Why the job stops, and, for a key refused that was never sent, why not."""
        if isinstance(error, HTTPStatusError) and error.status == 401 and not self.options.api_key:
            return f"{reason} (none was sent: ${self.job.settings.api_key_env} is not set)"
        return reason

    def stop(self) -> None:
        """First call: stop feeding and let in-flight requests drain. Second: stop now."""
        if self._main is None:
            return
        if self.stats.interrupted:
            self._main.cancel()
            return
        self.stats.interrupted = True
        self._stop_feeding()
        drain = self.job.settings.drain_timeout
        asyncio.get_running_loop().call_later(drain, self._main.cancel)
        self.options.on_notice(
            f"stopping: waiting up to {drain:g}s for {self._in_flight()} requests in flight "
            "(Ctrl-C again to stop at once)"
        )

    def _stop_feeding(self) -> None:
        if self.hedger is not None:  # the end of the feeding is no tail: nothing to hedge
            self.hedger.stop()
        if self.budget is not None:
            self.budget.stop()
        if self._feeder is not None:
            self._feeder.cancel()
        while not self.requests.empty():
            self.requests.get_nowait()  # not started: they stay pending
        self.requests.put_nowait(None)  # the end, which each worker passes on

    def _budget_reached(self) -> None:
        """The next request could cross --max-cost: send nothing more, let in flight finish."""
        if self._stopping():
            return
        self.stats.budget_reached = True
        self._stop_feeding()
        assert self.meter is not None and self.budget is not None
        why = (
            "a model with no price"
            if self.budget.unpriced
            else f"the next request could cross the budget (--max-cost {self.meter.limit:g}, "
            f"{money(self.meter.total)} spent)"
        )
        self.options.on_notice(
            f"{why}: sending nothing more"
            + (f", waiting for the {n:,} requests in flight" if (n := self._in_flight()) else "")
        )

    async def _run(self) -> None:
        async with contextlib.AsyncExitStack() as stack:
            s = self.job.settings
            for d, spec in zip(self.deployments, pool_of(s), strict=True):
                key = self._key(spec)
                d.transport = self.options.transport
                if d.transport is None:
                    d.transport = await stack.enter_async_context(
                        AiohttpTransport(
                            spec.base_url,
                            key,
                            concurrency=d.pool.ceiling,
                            timeout=s.timeout,
                            connect_timeout=s.connect_timeout,
                            max_response_bytes=s.max_response_bytes,
                        )
                    )
                if (store := s.limits_store) is not None:
                    shared = self._store(store, spec, key)
                    d.pacer.share(await stack.enter_async_context(shared))
            await self._pipeline()

    def _key(self, spec: DeploymentSpec) -> str | None:
        if self.multi:
            return self.options.deployment_keys.get(spec.name)
        return self.options.api_key

    def _store(self, url: str, spec: DeploymentSpec, api_key: str | None) -> SharedLimits:
        from batchq.live.limits_store import SharedLimits, default_key

        key = spec.limits_key or default_key(spec.base_url, api_key)
        password = self.options.limits_store_password
        return SharedLimits(url, key, on_notice=self.options.on_notice, password=password)

    async def _pipeline(self) -> None:
        async with asyncio.TaskGroup() as tg:
            tg.create_task(self._write_outcomes())
            ticker = tg.create_task(self._tick())
            readers = self._follow_loads(tg)
            stores = [d.pacer.shared for d in self.deployments if d.pacer.shared is not None]
            for shared in stores:
                tg.create_task(shared.run())
            async with asyncio.TaskGroup() as producers:
                self._feeder = producers.create_task(self._feed())
                for _ in range(self.workers):
                    producers.create_task(self._process())
            await self.outcomes.put(None)  # every producer is done; let the writer drain
            ticker.cancel()
            for reader in readers:
                reader.cancel()
            for shared in stores:
                shared.stop()
            self._report(paced=self.pacer.request_rate() is not None)
            if self.multi:  # the deployments' rows, for `batchq status` after the run
                write_progress(self.job.run_dir, self.stats)

    def _follow_loads(self, tg: asyncio.TaskGroup) -> list[asyncio.Task[None]]:
        """Size each auto pool by its server's gauges, where it publishes them: one reader a
        server, shared by the deployments on it (two models or two keys on one vLLM)."""
        if self.options.transport is not None:  # not ours to ask anything else of
            return []
        servers: dict[str, list[tuple[Deployment, DeploymentSpec]]] = {}
        for d, spec in zip(self.deployments, pool_of(self.job.settings), strict=True):
            servers.setdefault(metrics_url(spec.base_url), []).append((d, spec))
        readers = []
        for on_server in servers.values():
            auto = [d.name for d, _ in on_server if not d.pool.fixed]
            if not auto:
                continue
            of = f"{', '.join(auto)}: " if self.multi else ""

            def found(server: str, of: str = of) -> None:
                self.options.on_notice(
                    f"{of}the server publishes {server}'s load gauges (/metrics): "
                    "--concurrency auto follows them"
                )

            # Any of their keys opens the server's gauges (llama.cpp asks for one): the first.
            spec = next((s for _, s in on_server if self._key(s)), on_server[0][1])
            reader = LoadReader(spec.base_url, self._key(spec))
            pools = [d.pool for d, _ in on_server]  # a fixed pool's requests count in the split
            readers.append(tg.create_task(follow(reader, pools, self.loop.time, found)))
        return readers

    async def _feed(self) -> None:
        async def reject(outcome: Outcome) -> None:
            await self.outcomes.put(outcome)

        done = self.journal.done
        held, count = held_lines(self.job.run_dir)
        if count:
            self.options.on_notice(
                f"{count:,} lines are in open provider batches and are left to them: "
                "`batchq run --via batch` collects them, `batchq cancel JOB` stops them"
            )
        await feed(
            self.job.input,
            self.span.end,
            (lambda n: n in done or n in held) if count else done.__contains__,
            self.template,
            self.requests.put,
            reject,
            done_prefix=self.journal.done.run_from(self.span.first_line),
            start=self.span.start,
            first_line=self.span.first_line,
        )
        await self.requests.put(None)  # the end, which each worker passes on

    async def _process(self) -> None:
        call = self._call if self.answers is None else self._ask
        while (request := await self.requests.get()) is not None:
            if (outcome := await call(request)) is not None:
                await self.outcomes.put(outcome)
        # One end for all workers, not one each: the queue is smaller than the pool. Nothing
        # is put after it, and this worker just took it, so it fits.
        self.requests.put_nowait(None)
        self.exhausted = True  # the queue is FIFO: every request was taken before the end

    async def _call(self, request: Request) -> Outcome | None:
        """Send one request until it succeeds or fails for good (None: stopped first)."""
        if self.multi and not any(d.takes(request.url, 0) for d in self.deployments):
            message = f"no deployment of the pool serves {request.url} (see their `endpoints`)"
            return _failure(request, "endpoint_not_served", message, attempts=0)
        if not any(d.takes(request.url, request.tokens) for d in self.deployments):
            message = f"needs ~{request.tokens:,} tokens, more than the whole --tpm budget"
            return _failure(request, "request_too_large", message, attempts=0)
        attempts = rate_limited = 0
        while True:
            attempts += 1
            if (attempt := await self._attempt(request)) is None:
                return None  # stopping: the request stays pending, for the next run
            started, result, hedged, deployment = attempt
            if isinstance(result, Response) and 200 <= result.status < 300:
                try:
                    name = deployment.name if self.multi else None
                    outcome = _success(request, result, attempts, hedged, deployment=name)
                except InvalidResponse as exc:
                    result = exc
                else:
                    self._paid(request, outcome)
                    return outcome
            elif isinstance(result, Response):
                result = status_error(result.status, result.body, result.headers, result.request_id)
            decision = decide(result, attempts, rate_limited, self.policy)
            if isinstance(decision, Fatal):
                if not self.multi:
                    raise FatalEndpointError(self._fatal(decision.reason, result)) from None
                # That deployment is out (the router stops the job when all are); the line
                # goes to another, within --max-attempts.
                deployment.breaker.failed(self.loop.time(), decision.reason, probe=True, fatal=True)
                if self.router.out_for_good():
                    raise FatalEndpointError(self.router.verdict()) from None
                if attempts >= self.policy.max_attempts:
                    return _failure_from(request, result, attempts, retryable=True)
                continue
            if isinstance(decision, GiveUp):
                return _failure_from(request, result, attempts, decision.retryable)
            self.stats.retried(retry_cause(result))
            if decision.pause_all:
                rate_limited += 1
                self.stats.rate_limited += 1
                if not hedged:  # else every failure of the attempt reached the pace as it came
                    _slow_down(deployment.pacer, decision.delay, result, started)
            elif not (
                self.multi
                and deployment.breaker.state != "in"
                and self.router.others(deployment, request.url, request.tokens)
            ):
                await asyncio.sleep(decision.delay)  # off the pool: the slot serves another
            # else: its deployment is out, and another that serves the line takes it at once

    def _paid(self, request: Request, o: Outcome) -> None:
        """Count what a 2xx answer cost (every one: a retry's, a re-ask's)."""
        meter = self.meter
        if meter is not None and not meter.paid(
            request, o.prompt_tokens, o.cached_tokens, o.completion_tokens
        ):
            self.options.on_notice(
                f"model {request.model or '(none named)'} has no price: its tokens are not in "
                f'the cost shown (add [prices."{request.model or ""}"] to job.toml)',
                logging.WARNING,
            )

    async def _ask(self, request: Request) -> Outcome | None:
        """``_call``, its answer checked: one that does not fit is asked again (answers.py)."""
        answers = self.answers
        assert answers is not None
        if not answers.checks(request.url):
            return await self._call(request)
        sent, invalid = request, Invalid()  # invalid: the answers asked again, so far
        while (outcome := await self._call(sent)) is not None and outcome.ok:
            verdict = answers.check_line(outcome.line)
            if verdict.fits:
                return invalid.record(outcome, sent, request)
            if verdict.final or invalid.answers >= answers.max_invalid:
                failed = answers.invalid_outcome(outcome, verdict, invalid.answers + 1)
                return invalid.record(failed, sent, request)
            invalid.add(outcome)
            self.stats.invalid_answers += 1  # one extra request
            sent = answers.again(request, verdict)
        return None if outcome is None else invalid.record(outcome, sent, request)

    def _stopping(self) -> bool:
        return self.stats.interrupted or self.stats.budget_reached

    async def _attempt(self, request: Request) -> tuple[float, Answer, bool, Deployment] | None:
        """One attempt within a deployment's allowance and pace: when it went, the answer,
        whether copies were sent, and the deployment that answered."""
        loop = self.loop
        while (picked := self.router.pick(loop.time(), request.tokens, request.url)) is None:
            await self.router.wait()  # every deployment is full: the first with room takes it
            if self._stopping():
                return None
        deployment, probe = picked
        pool, pacer, transport = deployment.pool, deployment.pacer, deployment.transport
        assert transport is not None
        original = request
        if self.multi:
            request = deployment.request(request)
        reserved = 0.0  # of the budget, until the answer: released before _paid counts it
        await pool.gate.acquire()
        try:
            if self._stopping():  # stopped while it waited for a slot
                return None
            if self.budget is not None:  # priced under the job's model name, as _paid counts
                if (worst := await self.budget.reserve(original)) is None:
                    return None  # the budget is reached: the request stays pending
                reserved = worst
            started = await pacer.wait_turn(request.tokens)
            if self._stopping():  # or for its turn in the pace
                return None
            pool.sent(started)
            result: Answer | None = None  # None: cancelled before an answer
            copied = 0  # copies sent
            copies: Copies | None = None
            try:
                if self.hedger is None or probe:  # (a probe's copy would leave it unjudged)
                    # Not inlined to save a frame: an exception caught in this frame and kept
                    # in ``result`` would hold the frame in a cycle through its traceback, with
                    # a large answer's chunks, until the GC ran (16 of them: 550 MiB RSS).
                    result = await answer(transport, request)
                elif not self.multi:
                    place = partial(deployment.copy_place, request.tokens)
                    heed = partial(self._heed, deployment)
                    result, copied = await self.hedger.send(
                        transport, request, started, place, heed=heed
                    )
                else:  # a copy goes to another deployment
                    copies = Copies(self.router, deployment, original)
                    latency = deployment.stats.latency  # a straggler is judged by its deployment
                    heed = partial(self._heed, copies)
                    result, copied = await self.hedger.send(
                        copies, request, started, copies.place, latency, heed
                    )
            finally:
                pacer.answered()
                ok = isinstance(result, Response) and 200 <= result.status < 300
                pool.answered(started, loop.time(), ok=ok, overload=_overload(result))
        finally:
            if reserved and self.budget is not None:
                self.budget.release(reserved)
            pool.gate.release()
            if self.multi:
                self.router.released()
        assert result is not None
        if self.multi:
            deployment = self._account(deployment, probe, result, started, copies)
        if isinstance(result, Response):
            deployment.pacer.observe(result.headers)  # the pace of the one that answered
            if ok:
                self.stats.latency.add(loop.time() - started)
        return started, result, copied > 0, deployment

    def _heed(self, where: Deployment | Copies, result: Answer, went: float) -> None:
        """A hedged request's answer that may not be the attempt's (a copy's, or the first's
        failure while copies are out), sent at ``went``: the pace of its deployment (``where``,
        or the one of the pool's it went to) heeds it as any answer's, at once. (Once copies
        went, ``_call`` leaves the attempt's failure to this; its 200's headers are observed
        twice, harmlessly.)"""
        if not isinstance(result, Response):
            return
        deployment = where.answered_by(result) if isinstance(where, Copies) else where
        deployment.pacer.observe(result.headers)
        if result.status == 429:
            refused = status_error(result.status, result.body, result.headers, result.request_id)
            decision = decide(refused, 1, 0, self.policy)
            if isinstance(decision, Retry) and decision.pause_all:
                _slow_down(deployment.pacer, decision.delay, refused, went)

    def _account(
        self,
        d: Deployment,
        probe: bool,
        result: Answer,
        started: float,
        copies: Copies | None,
    ) -> Deployment:
        """Count an attempt against its deployment, which it may take out of the pool; the
        deployment that answered (another, when a hedge's copy there won). Copies are
        counted where they went, as they went."""
        now = self.loop.time()
        d.stats.requests += 1
        # A copy elsewhere gave the answer (it won, or every copy failed and it was the last):
        # that says nothing of the first's deployment, and all of the copy's.
        answered = d if copies is None else copies.answered_by(result)
        if answered is d and isinstance(result, Response) and 200 <= result.status < 300:
            d.stats.latency.add(now - started)
        was_in = answered.breaker.state == "in"
        self.router.observe(answered, probe and answered is d, result, now)
        if was_in and answered.breaker.state == "out":
            self.options.on_notice(
                f"deployment {answered.name} is out of the pool for {answered.breaker.pause:g}s "
                f"({answered.breaker.why}); its lines go to the others",
                logging.WARNING,
            )
        return answered

    async def _write_outcomes(self) -> None:
        """The single owner of the output files: append outcomes in batches."""
        batch: list[Outcome] = []
        try:
            while True:
                item = await self.outcomes.get()
                while item is not None:
                    batch.append(item)
                    if self.outcomes.empty():
                        break
                    item = self.outcomes.get_nowait()
                batch, appending = [], batch
                self._append(appending)  # not again in the finally, if it fails
                if self.options.on_outcomes is not None:
                    await self.options.on_outcomes([o.line for o in appending])
                if item is None:
                    return
        finally:
            # Cancelled: what already arrived is written too, rather than sent again
            # (unless the disk failed: then the journal takes nothing more).
            while not self.outcomes.empty():
                if (late := self.outcomes.get_nowait()) is not None:
                    batch.append(late)
            self._append(batch)

    def _append(self, batch: list[Outcome]) -> None:
        if not batch:
            return
        for scrubber in self.scrubbers:  # the one place every output line passes
            for o in batch:
                o.line = scrubber.scrub(o.line)
        self.journal.append(batch)
        stats = self.stats
        for o in batch:
            if o.ok:
                stats.ok += 1
            else:
                stats.failed += 1
            stats.prompt_tokens += o.prompt_tokens
            stats.completion_tokens += o.completion_tokens

    def _in_flight(self) -> int:
        return sum(d.pool.in_flight for d in self.deployments)

    def _pace(self) -> float | None:
        """Requests a second the pace allows now, over the pool (None: none is paced)."""
        if not self.multi:
            return self.pacer.request_rate()
        rates = [r for d in self.deployments if (r := d.pacer.request_rate()) is not None]
        return sum(rates) if rates else None

    def _steer(self, now: float) -> None:
        """Size the pool to what was observed; choose stragglers to hedge."""
        rate = self.pacer.request_rate()
        for d in self.deployments:
            d.pool.resize(rate if d.pacer is self.pacer else d.pacer.request_rate(), now)
        if self.hedger is not None and self._all_sent():
            self.hedger.choose(now)
        self._report(paced=rate is not None)

    def _all_sent(self) -> bool:
        """Every request has gone out: the input is exhausted, and none waits for a place in
        a pool or for its turn in the pace. What is still out then is the job's tail.

        Not before: with the pool full of requests waiting for their turn, copies waited
        behind them and the budget went on requests that were merely slow (measured: all
        30 copies of a 3,000-line job chosen 4 s before its last send, none for its tail).
        """
        return self.exhausted and all(d.pool.all_out() for d in self.deployments)

    def _report(self, *, paced: bool) -> None:
        """Copy the pool's and the hedges' figures where progress and the summary read them."""
        stats, pool = self.stats, self.pool
        stats.in_flight, stats.peak_in_flight = pool.in_flight, pool.peak
        stats.allowance, stats.binding = pool.gate.limit, pool.binding(paced)
        if self.multi:
            for d in self.deployments:
                d.report()
                stats.deployments[d.name] = d.stats
            pools = [d.pool for d in self.deployments]
            stats.in_flight = sum(p.in_flight for p in pools)
            stats.peak_in_flight = max(stats.peak_in_flight, stats.in_flight)
            stats.allowance = sum(p.gate.limit for p in pools)
        limits = self.pacer.limits.items()
        stats.pace_rates = {kind: lim.pace.rate for kind, lim in limits if lim is not None}
        if self.hedger is not None:
            stats.hedges, stats.hedge_tokens = self.hedger.sent, self.hedger.tokens
        self._report_cost()

    def _report_cost(self) -> None:
        if (meter := self.meter) is not None:
            s = self.stats
            s.cost, s.run_cost, s.budget = meter.total, meter.spent, meter.limit
            s.budget_wanted = meter.wanted

    async def _tick(self) -> None:
        """Commit the checkpoint a few times a second; show progress when it is due."""
        every = self.options.progress_every
        progress = make_progress(self.stats) if every else None
        loop = asyncio.get_running_loop()
        next_progress = loop.time() + (every or 0)
        next_snapshot = loop.time()
        history = self.history
        try:
            while True:
                slept = loop.time()
                await asyncio.sleep(COMMIT_INTERVAL)
                # How late the timer ran: our own event loop's lag (--concurrency auto grows
                # the pool when it, not the endpoint, is the bottleneck).
                lag = loop.time() - slept - COMMIT_INTERVAL
                await self.journal.commit_in_thread()
                if not self.multi:
                    # Not a pool's: a client-bound loop is one for all its deployments, and
                    # each pool doubling on it (measured: 4 endpoints at up to 7.9x their
                    # unloaded latency, 70% of split jobs) floods them all for no throughput.
                    self.pool.lagged(lag)
                for d in self.deployments:
                    d.pacer.tick(COMMIT_INTERVAL)
                now = loop.time()
                self._steer(now)
                if self.multi:  # pauses ended, allowances grew, breaks ran out; or stopping
                    everyone = self._stopping() or self.router.all_out()
                    self.router.released(None if everyone else self.router.room(now) + 1)
                if progress is not None and every and now >= next_progress:
                    self.stats.pace = self.pacer.slowed()
                    progress.show()
                    next_progress = now + every
                if now >= next_snapshot:
                    write_progress(self.job.run_dir, self.stats)
                    next_snapshot = now + SNAPSHOT_INTERVAL
                if history.due(now):  # for `batchq view` and `report`
                    history.record(self.stats, now, pace=self._pace())
        finally:
            if progress is not None:
                progress.close()


def _success(
    request: Request, response: Response, attempts: int, hedged: bool, *, deployment: str | None
) -> Outcome:
    """The result line of a 2xx; InvalidResponse if its body is not a JSON object, or one
    nested too deeply for its result line to be read back."""
    raw = response.body
    body = _json_object(response)
    prompt, cached, completion = usage_tokens(body)
    line = result_line(
        request,
        response.status,
        response.request_id,
        raw,
        body,
        attempts=attempts,
        hedged=hedged,
        deployment=deployment,
    )
    return Outcome(request.line_no, True, line, prompt, completion, cached)


def _deployment(spec: DeploymentSpec, settings: Settings, options: RunOptions) -> Deployment:
    """A deployment's engine state, before its transport opens."""
    fixed, most = settings.concurrency, spec.max_concurrency or settings.max_concurrency
    concurrency = min(fixed, most) if isinstance(fixed, int) and spec.max_concurrency else fixed
    notice = options.on_notice
    if settings.deployments:  # each says whose pace it speaks of

        def notice(message: str, level: int = logging.INFO) -> None:
            options.on_notice(f"{spec.name}: {message}", level)

    pacer = Pacer(rpm=spec.rpm, tpm=spec.tpm, on_notice=notice, max_pause=settings.max_wait)
    pool = Pool(concurrency, most)
    return Deployment(
        spec.name,
        pacer,
        pool,
        weight=spec.weight,
        model=spec.model,
        job_model=settings.model,
        endpoints=spec.endpoints,
    )


def _overload(result: Answer | None) -> bool:
    """An answer that says the endpoint has more than it can take."""
    if isinstance(result, Response):
        return result.status in (429, 503)
    return isinstance(result, TransportError)  # timeouts and dropped connections too


def _json_object(response: Response) -> dict[str, Any]:
    # A login page, a proxy's notice or a cut-off answer is not a result: it is retried,
    # and in errors.jsonl it stays retryable.
    try:
        body = orjson.loads(response.body)
    except orjson.JSONDecodeError:
        body = None
    if isinstance(body, dict):
        if not splices(response.body):
            raise InvalidResponse(
                f"HTTP {response.status} answer is nested more than {MAX_ANSWER_DEPTH:,} "
                "levels deep: its result line could not be read back"
            )
        return body
    kind = response.headers.get("Content-Type", "no Content-Type")[:80]
    head = response.body[:60].decode("utf-8", "replace")
    start = f"it starts {show(head)}" if head else "its body is empty"
    raise InvalidResponse(f"HTTP {response.status} ({kind}) is not a JSON object: {start}")


def retry_cause(exc: RequestError) -> str:
    """How the summary counts a retry: the HTTP status, else the kind of failure."""
    status = getattr(exc, "status", None)
    return str(status) if status is not None else exc.code


def _slow_down(pacer: Pacer, pause: float, refused: RequestError, sent_at: float) -> None:
    """A 429 for a request sent at ``sent_at``: nothing is sent for ``pause`` seconds, and the
    pace of the limit it names is cut."""
    pacer.pause(pause)
    pacer.rate_limited(limit_kind(refused), sent_at)


def limit_kind(exc: RequestError) -> Kind | None:
    """Which limit a 429 is about, from OpenAI's error body, or None if it doesn't say."""
    text = str(exc).lower()
    body = getattr(exc, "body", None)
    error = body.get("error") if isinstance(body, dict) else None
    kind = error.get("type") if isinstance(error, dict) else None
    if kind == "tokens" or "tokens per min" in text:
        return "tokens"
    if kind == "requests" or "requests per min" in text:
        return "requests"
    return None


def _failure(request: Request, code: str, message: str, *, attempts: int) -> Outcome:
    line = error_line(request.line_no, request.custom_id, code, message, attempts=attempts)
    return Outcome(request.line_no, False, line)


def _failure_from(request: Request, exc: RequestError, attempts: int, retryable: bool) -> Outcome:
    status = getattr(exc, "status", None)
    line = error_line(
        request.line_no,
        request.custom_id,
        exc.code,
        str(exc),
        status=status,
        request_id=getattr(exc, "request_id", None),
        body=getattr(exc, "body", None),
        attempts=attempts,
        retryable=retryable,
    )
    return Outcome(request.line_no, False, line)


def _first_fatal(group: BaseExceptionGroup[Any]) -> BaseException:
    """The exception to show for a failed pipeline: a BatchqError if any task raised one."""
    leaves: list[BaseException] = []

    def collect(exc: BaseException) -> None:
        if isinstance(exc, BaseExceptionGroup):
            for inner in exc.exceptions:
                collect(inner)
        else:
            leaves.append(exc)

    collect(group)
    for exc in leaves:
        if isinstance(exc, BatchqError):
            return exc
    return leaves[0] if len(leaves) == 1 else group
