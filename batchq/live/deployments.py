"""Several endpoints as one pool: each its own pace, pool and health; a router between them.

A ``Deployment`` is one endpoint of a job (``[[deployments]]``): a transport,
its own ``Pacer`` (RPM/TPM, headers, 429 pauses: a 429 on one pauses that one
only), its own ``Pool`` (``--concurrency auto`` fills a 16-slot box and a
256-slot box each to its knee), its own ``Breaker`` and counters. A job
without ``[[deployments]]`` has one, made of its base URL, and the runner
then skips everything here but the pick, which is a list lookup.

The ``Router`` sends each attempt to the deployment with the most room: free
slots of its pool's allowance, less the requests already waiting for one;
a deployment whose pace is paused by a 429 has none. Weights break ties.
When all are full, a worker waits for the first slot freed in any of them,
not in one deployment's queue. The tail hedge judges a request by its
deployment's latencies, and its copies (``Copies``) go to another
deployment than the first.

A ``Breaker`` takes a failing deployment out of the pool (after Nygard's
circuit breaker, as Envoy's outlier detection and LiteLLM's cooldowns do):
at once when it refuses connections or the key (401, 403,
``insufficient_quota``); after ``FAILURES_TO_TRIP`` failed answers in a row
for 5xx, timeouts and drops. It stays out for a break that doubles with each
failed probe, then takes exactly one request, the probe: an answer puts it
back, a failure doubles its break. Only when every deployment is out does the
job behave as with one endpoint: it stops (exit 3) when all of them are out
for a reason that waiting cannot fix, and otherwise keeps sending to the one
whose break ends first, with the usual retries.

Pure logic on a clock the caller passes: tested without a socket or a sleep.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections import deque
from collections.abc import AsyncIterator, Collection
from dataclasses import dataclass, field, replace
from typing import Literal

import orjson

from batchq.errors import EndpointUnreachable, FatalEndpointError, RequestError
from batchq.live.concurrency import Pool
from batchq.live.limiter import Pacer
from batchq.live.retry import RETRYABLE_4XX, fatal_reason, status_error
from batchq.live.transport import Response, Transport
from batchq.records import Request
from batchq.stats import DeploymentStats

FAILURES_TO_TRIP = 5  # failed answers in a row (5xx, timeouts, drops) that take one out
FIRST_BREAK = 1.0  # seconds out before the first probe
LONGEST_BREAK = 60.0  # the break doubles with each failed probe, up to this

State = Literal["in", "out", "probing"]


@dataclass(slots=True)
class Breaker:
    """In, out for a break, or probing: the health of one deployment."""

    first_break: float = FIRST_BREAK
    longest_break: float = LONGEST_BREAK
    threshold: int = FAILURES_TO_TRIP
    state: State = "in"
    until: float = 0.0  # out: when its probe may go
    pause: float = 0.0  # the current break
    failures: int = 0  # in a row, while in
    why: str | None = None  # why it was last taken out
    fatal: bool = False  # out for a reason waiting cannot fix (a key, a quota)
    outs: int = 0

    def due(self, now: float) -> bool:
        """Out, and its break is over: the next request may probe it."""
        return self.state == "out" and now >= self.until

    def succeeded(self) -> None:
        """An answer (any 2xx): the deployment serves."""
        self.failures = 0
        if self.state != "in":
            self.state, self.pause, self.fatal = "in", 0.0, False

    def failed(
        self, now: float, why: str, *, probe: bool, at_once: bool = False, fatal: bool = False
    ) -> bool:
        """A failure that is the deployment's fault; True if it takes it out now.

        Failures of requests sent before it went out say nothing new and are ignored.
        """
        if self.state == "in":
            self.failures += 1
            if at_once or fatal or self.failures >= self.threshold:
                self._take_out(now, why, fatal, self.first_break)
                return True
        elif self.state == "probing" and probe:
            self._take_out(now, why, fatal, min(self.longest_break, 2 * self.pause))
            return True
        return False

    def _take_out(self, now: float, why: str, fatal: bool, pause: float) -> None:
        self.state, self.why, self.fatal, self.pause = "out", why, fatal, pause
        self.until = now + pause
        self.failures = 0
        self.outs += 1


@dataclass(eq=False, slots=True)
class Deployment:
    """One endpoint of the pool and its engine state."""

    name: str
    pacer: Pacer
    pool: Pool
    weight: float = 1.0
    model: str | None = None  # the name it serves the job's model under
    job_model: str | None = None  # that model's name in the job (None: the lines name theirs)
    endpoints: tuple[str, ...] | None = None  # the paths it serves; None: all
    transport: Transport | None = None  # set once the run opens it
    breaker: Breaker = field(default_factory=Breaker)
    stats: DeploymentStats = field(default_factory=DeploymentStats)

    def room(self, now: float) -> int:
        """Requests it could take now: free slots of its allowance (none while paused)."""
        if self.pacer.paused_until() > now:
            return 0
        gate = self.pool.gate
        return gate.limit - gate.used - gate.waiting

    @contextlib.asynccontextmanager
    async def copy_place(self, tokens: int) -> AsyncIterator[None]:
        """A hedge's copy's place here, held while it is out: a slot of the allowance, and
        its turn in the pace."""
        async with self.pool.copy_slot():
            await self.pacer.wait_turn(tokens)
            yield

    def takes(self, url: str, tokens: int) -> bool:
        """Whether it serves ``url`` at all, and a request of ``tokens`` fits its ``tpm``."""
        served = self.endpoints is None or not url or url in self.endpoints  # "": unasked
        return served and not self.pacer.never_fits(tokens)

    def request(self, request: Request) -> Request:
        """``request`` as this deployment serves it: the job's model under the deployment's own
        name for it, if it has one. A line that names another model is sent as it names it,
        as ``validate`` checks it: which name a deployment gives another model is unknown."""
        if self.model is None:
            return request
        body = orjson.loads(request.body)
        named = body.get("model")
        if named == self.model or (self.job_model is not None and named != self.job_model):
            return request
        body["model"] = self.model
        return replace(request, body=orjson.dumps(body))

    def report(self) -> None:
        """Copy the live figures where the summary and ``status`` read them."""
        b, s = self.breaker, self.stats
        s.in_flight, s.state, s.outs, s.why = self.pool.in_flight, b.state, b.outs, b.why


class Copies:
    """The transport of a hedged request in a pool: the first copy goes to its deployment,
    each further one to another, once one has room (after Dean and Barroso's "tied
    requests" to another replica: a straggler is most often held up by its server), one
    no copy went to before if there is one; to the same one only when no other is in the
    pool.

    ``Hedger.send`` takes it as the transport, and ``place`` as a copy's place: a slot and
    a turn in the pace of the deployment the copy goes to. Each copy sent is counted
    against its deployment here, the first by the runner.
    """

    def __init__(self, router: Router, first: Deployment, request: Request) -> None:
        self.router, self.first, self.request = router, first, request
        # Where the copy whose turn came goes. A copy is chosen only once the one before it
        # was sent, and its send reads this before it awaits anything: one copy at a time.
        self.next: Deployment | None = None
        self.went: list[Deployment] = []  # where copies went
        self.answers: list[tuple[Deployment, Response | RequestError]] = []  # the copies'

    @contextlib.asynccontextmanager
    async def place(self) -> AsyncIterator[None]:
        """Wait for room in another deployment (if there is another in the pool), then hold
        the copy's place there while it is out."""
        loop = asyncio.get_running_loop()
        router = self.router
        url, tokens = self.request.url, self.request.tokens
        while (
            other := router.elsewhere(self.first, loop.time(), url, tokens, tried=self.went)
        ) is None and router.others(self.first, url, tokens):
            await router.wait()
        self.next = other or self.first
        try:
            async with self.next.copy_place(tokens):
                yield
        finally:
            router.released()  # its slot: a worker waiting for room may take it

    async def send(self, path: str, body: bytes) -> Response:
        d = self.next
        first = self.first.transport
        assert first is not None
        if d is None:  # the first copy, counted by the runner
            return await first.send(path, body)
        d.stats.requests += 1
        self.went.append(d)
        try:
            if d is self.first:  # no other deployment in the pool
                answer = await first.send(path, body)
            else:
                assert d.transport is not None
                try:
                    answer = await d.transport.send(path, d.request(self.request).body)
                finally:
                    d.pacer.answered()  # the first's is told by the runner
        except RequestError as exc:  # a failure is an answer too, of that deployment's health
            self.answers.append((d, exc))
            raise
        self.answers.append((d, answer))
        return answer

    def answered_by(self, result: object) -> Deployment:
        """Which deployment gave ``result`` (the first's, unless a copy's)."""
        return next((d for d, answer in self.answers if answer is result), self.first)


class Router:
    """Which deployment takes the next attempt, and what their answers say of their health."""

    def __init__(self, deployments: list[Deployment]) -> None:
        assert deployments, "a pool has at least one deployment"
        self.deployments = deployments
        self.single = deployments[0] if len(deployments) == 1 else None
        self._waiters: deque[asyncio.Future[None]] = deque()

    def pick(self, now: float, tokens: int = 0, url: str = "") -> tuple[Deployment, bool] | None:
        """The deployment for the next attempt of a request of ``tokens`` to ``url``, and
        whether the attempt is its probe; None: every deployment in the pool is full
        (``wait``, then pick again). A deployment that does not serve ``url``, or whose
        whole ``tpm`` is smaller, is never picked.

        Raises FatalEndpointError when every deployment is out for a reason that waiting
        cannot fix.
        """
        if self.single is not None:
            return self.single, False
        best: Deployment | None = None
        best_key = (0, 0.0)
        due: Deployment | None = None
        full = False
        for d in self.deployments:
            if not d.takes(url, tokens):
                continue
            if d.breaker.state == "in":
                key = (d.room(now), d.weight)
                if key[0] > 0 and key > best_key:
                    best, best_key = d, key
                full = True
            elif due is None and d.breaker.due(now):
                due = d
        if due is not None:
            if self.out_for_good():
                raise FatalEndpointError(self.verdict())
            due.breaker.state = "probing"  # one request only, until it answers
            return due, True
        if best is not None:
            return best, False
        if full:  # deployments are in, but full: a worker waits for room, in no one queue
            return None
        if self.out_for_good():
            raise FatalEndpointError(self.verdict())
        # Every deployment is out: as with one endpoint, keep trying the one back soonest.
        fits = [d for d in self.deployments if not d.breaker.fatal and d.takes(url, tokens)]
        if not fits:  # those that take it are out for good, and others not: wait for a probe
            return None
        return min(fits, key=lambda d: d.breaker.until), False

    async def wait(self) -> None:
        """Until a deployment may have room: a slot released (``released``) or a tick."""
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter
        finally:
            if not waiter.done():
                self._waiters.remove(waiter)

    def released(self, count: int | None = 1) -> None:
        """Wake ``count`` waiters (None: all): one when a slot is freed; as many as there is
        room when limits, pauses and breaks moved (waking thousands each tick for a few
        slots cost the pool's process most of its CPU)."""
        while self._waiters and (count is None or count > 0):
            waiter = self._waiters.popleft()
            if not waiter.done():
                waiter.set_result(None)
                count = None if count is None else count - 1

    def room(self, now: float) -> int:
        """Requests the pool could take now, a due probe counting one."""
        return sum(
            max(0, d.room(now)) if d.breaker.state == "in" else int(d.breaker.due(now))
            for d in self.deployments
        )

    def observe(
        self, d: Deployment, probe: bool, answer: Response | RequestError, now: float
    ) -> None:
        """Count an attempt's answer against ``d`` and judge its health by it."""
        stats, breaker = d.stats, d.breaker
        if isinstance(answer, Response):
            status = answer.status
            if 200 <= status < 300:
                stats.ok += 1
                breaker.succeeded()
                return
            stats.errors += 1
            if status == 429:
                stats.rate_limited += 1
            error = status_error(status, answer.body, answer.headers, answer.request_id)
            if why := fatal_reason(error):
                breaker.failed(now, why, probe=probe, fatal=True)
            elif status >= 500 or status in RETRYABLE_4XX:
                breaker.failed(now, f"HTTP {status}", probe=probe)
            elif probe:
                breaker.succeeded()  # it answered: a 429 is for its pace, a 4xx the request's
            return
        stats.errors += 1
        unreachable = isinstance(answer, EndpointUnreachable)
        breaker.failed(now, f"{answer.code}: {answer}"[:200], probe=probe, at_once=unreachable)

    def elsewhere(
        self,
        first: Deployment,
        now: float,
        url: str = "",
        tokens: int = 0,
        tried: Collection[Deployment] = (),
    ) -> Deployment | None:
        """Another deployment in the pool serving ``url`` and fitting ``tokens``, with room:
        one not ``tried`` first, then the most room; None if none has."""
        with_room = [d for d in self.others(first, url, tokens) if d.room(now) > 0]
        return max(with_room, key=lambda d: (d not in tried, d.room(now), d.weight), default=None)

    def others(self, first: Deployment, url: str = "", tokens: int = 0) -> list[Deployment]:
        """The deployments in the pool but ``first`` that are in and take a request of
        ``tokens`` to ``url``: where it goes when ``first`` cannot take it."""
        return [
            d
            for d in self.deployments
            if d is not first and d.breaker.state == "in" and d.takes(url, tokens)
        ]

    def all_out(self) -> bool:
        return all(d.breaker.state != "in" for d in self.deployments)

    def out_for_good(self) -> bool:
        """Every deployment is out for a reason waiting cannot fix: the job must stop."""
        return all(d.breaker.state != "in" and d.breaker.fatal for d in self.deployments)

    def verdict(self) -> str:
        """Which deployment said what, for the one line that stops the job."""
        said = "; ".join(f"{d.name}: {d.breaker.why}" for d in self.deployments)
        return f"every deployment is out ({said})"
