"""The tail hedge (on by default, ``--no-hedge``): copies of stragglers, once nothing
is left to send.

After "The Tail at Scale" (Dean and Barroso, 2013): once every request has gone
out, the job's end is decided by its slowest, and a request out longer than
most (``LATE``: the job's p80 latency, and twice its median) is more likely
stuck behind something (a busy replica, a lost packet) than merely long. A copy
of it often answers first. The first success wins and the other copies are
cancelled; the request still yields exactly one outcome, so exactly one output
line. A copy's latency is drawn from the same tail, so a copy out as long is a
straggler too, and gets one more (``COPIES`` in all).

Dean and Barroso wait for the p95 to keep a service's extra load near 5%; here
the copies are capped at ``SHARE`` of the job's requests and go only in its
tail, so the cap bounds the cost and the percentile only says where to spend
it. Simulated on capacity.py's case 1 (20,000 requests at 10,000 RPM, latency
p50 0.8 s, p99 10 s; benchmarks/tail_sim.py, 60 seeds), one copy at the p95
left a median tail of 8.3 s after the last send (28 s at worst; 0.32% copies);
three at the p80, 4.8 s (8.5 s; 0.68%). On a milder tail (p99 3 s): 2.9 s and
2.6 s, 0.10% and 0.18%.

Hedges are bounded: each takes a place in the pool and a turn in the pace, as
any request does (on a server of one slot, a copy could only queue behind its
first); at most ``SHARE`` of the job's requests; none while the copies left
could not cover every request still out (a small job's few copies go to its
last requests, not to the first slow ones); none before
``MIN_SAMPLES`` answers have made the percentiles worth trusting; none of a
request out less than ``MIN_WAIT`` or twice the median (a copy then saves less
than it costs: with a steady latency nothing is a straggler); none while the
endpoint refuses (a 429 in the last ``QUIET`` seconds, or 503s more than
``REFUSED_SHARE`` of its answers then and at least ``REFUSED_AT_LEAST``: a copy
would only add to its load, while the odd 503 of a busy endpoint, or of a tail
of a few answers, is no refusal); none once copies rarely win (fewer than
``FUTILE_SHARE`` of those that raced, once ``FUTILE_AFTER`` have: where latency
follows the answer's length, a straggler is a long answer and its copy as long,
and later); none once the run is stopping. Each is
counted, with the tokens it was estimated to cost, and its result line says
``"hedged": true`` under ``batchq``.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Callable
from contextlib import AbstractAsyncContextManager
from dataclasses import dataclass, field
from typing import Any, TypeGuard

from batchq.errors import RequestError
from batchq.live.transport import Response, Transport
from batchq.records import Request
from batchq.stats import LatencyHistogram

SHARE = 0.01  # of the job's requests: the most that may be copies
COPIES = 3  # of one request at most: each once the one before straggles too
LATE = 80  # percentile of the latencies: a request out longer is a straggler
MIN_SAMPLES = 20
MIN_WAIT = 1.0  # seconds: a request out less long is no straggler worth a copy
QUIET = 5.0  # seconds: what the endpoint refused in as many is recent
REFUSED_SHARE = 0.05  # of the recent answers: more 503s than this, and it refuses ...
REFUSED_AT_LEAST = 3  # ... if they are as many: in a tail of a few answers, one 503 is chance
FUTILE_AFTER = 10  # copies that went and whose request was answered: enough to judge them
FUTILE_SHARE = 0.1  # of those: winning fewer, a copy is as slow as its first

Answer = Response | RequestError


@dataclass(eq=False, slots=True)
class _Flight:
    """A request out: the worker awaiting its first copy, and its second once chosen.

    The first copy is awaited by the worker itself and the second is a task of its own,
    started only for a chosen straggler: a task for every request's first copy cost ~10% more
    CPU a request against a fast endpoint (20,000 lines against nginx; hedging is on by default).
    """

    started: float
    latency: LatencyHistogram  # the answers its straggling is judged against
    worker: asyncio.Task[Any]
    transport: Transport
    request: Request
    place: Callable[[], AbstractAsyncContextManager[object]]  # a copy's, while it is out
    heed: Callable[[Answer, float], None] | None  # an answer, and when its copy went
    chosen: int = 0  # copies chosen
    copies: list[asyncio.Task[Answer | None]] = field(default_factory=list)
    # Of them, those that went: each waits for its turn in the pace first, and is chosen only
    # once the one before it went, so those that went are the first ``sent`` of ``copies``.
    sent: int = 0
    copied: float = 0.0  # when the latest went: a copy straggles from then
    answered: bool = False  # the first copy answered or failed
    won: Response | None = None  # a copy's answer, when one came first

    def out_since(self) -> float:
        """When what may straggle went: the request, or its latest copy (never, while
        that waits for its turn)."""
        if not self.chosen:
            return self.started
        return self.copied if self.sent == self.chosen else math.inf


async def answer(transport: Transport, request: Request) -> Answer:
    """One copy of a request: the endpoint's answer, or why there was none."""
    try:
        return await transport.send(request.url, request.body)
    except RequestError as exc:
        # Without its traceback: kept as a value (in a result, a task, a list of copies), it
        # would hold the failed send's frames, a large answer's chunks with them, until the GC
        # ran (hedged by default, 16 answers too large held 280 MB: test_hostile bounds it at 200).
        return exc.with_traceback(None)


class Hedger:
    """Which requests in flight get copies, and the copies' cost."""

    def __init__(self, requests: int, latency: LatencyHistogram | None = None) -> None:
        self.budget = max(1, int(SHARE * requests))
        self.latency = latency or LatencyHistogram()  # the job's: a deployment's until it has some
        self.chosen = 0  # copies chosen
        self.sent = 0  # copies that went: a chosen request may answer before its copy's turn
        self.tokens = 0  # estimated, of the copies sent
        self.won = 0  # copies sent whose answer was their request's
        self.lost = 0  # copies sent whose request another send answered
        self.stopped = False
        self.limited_at = -math.inf  # the endpoint's last 429
        self._answers: deque[float] = deque()  # when, over the last QUIET seconds
        self._refusals: deque[float] = deque()  # and which of them were 503s
        self._flights: set[_Flight] = set()

    def stop(self) -> None:
        """Send no more copies: the run is stopping, and what drains is not the job's tail."""
        self.stopped = True

    def answered(self, now: float, status: int) -> None:
        """The endpoint answered ``status`` at ``now``: a 429 or 503 counts as a refusal."""
        if status == 429:
            self.limited_at = now
        self._answers.append(now)
        if status == 503:
            self._refusals.append(now)
        self._forget(now)

    def refusing(self, now: float) -> bool:
        """A 429 in the last ``QUIET`` seconds, or 503s more than ``REFUSED_SHARE`` of the
        answers then, and at least ``REFUSED_AT_LEAST``."""
        self._forget(now)
        refusals = len(self._refusals)
        refused = refusals >= REFUSED_AT_LEAST and refusals > REFUSED_SHARE * len(self._answers)
        return now - self.limited_at < QUIET or refused

    def _forget(self, now: float) -> None:
        for times in (self._answers, self._refusals):
            while times and times[0] <= now - QUIET:
                times.popleft()

    def futile(self) -> bool:
        """Copies rarely win: at least ``FUTILE_AFTER`` have raced, and fewer than
        ``FUTILE_SHARE`` of them won. Where latency follows the answer's length, a
        straggler is a long answer, its copy as long and later: paid for, and never used."""
        raced = self.won + self.lost
        return raced >= FUTILE_AFTER and self.won < FUTILE_SHARE * raced

    def _won(self, flight: _Flight, result: Answer, *, by_copy: bool) -> tuple[Answer, int]:
        """``flight``'s answer, ``result``, and its copies sent, which are counted: one
        won (``by_copy``) or none did."""
        self.won += by_copy
        self.lost += flight.sent - by_copy
        return result, flight.sent

    def choose(self, now: float) -> None:
        """Send a copy of each straggler ``pick`` marks."""
        for flight in self.pick(now):
            flight.copies.append(asyncio.ensure_future(self._copy(flight)))

    def pick(self, now: float) -> list[_Flight]:
        """Mark the stragglers for a copy, oldest first; those marked now.

        A straggler is out longer than the ``LATE`` percentile, twice the median and
        ``MIN_WAIT`` of the latencies it is judged against: its deployment's, in a pool of
        several (a slow box's every request is no straggler beside a fast one's),
        once that has ``MIN_SAMPLES`` answers, else the job's (a stuck box has none).
        A request whose copy has been out as long gets another, up to ``COPIES``;
        one whose first copy failed waits for those it has.
        """
        if self.stopped or self.refusing(now) or self.futile():
            return []
        if len(self._flights) > self.budget - self.chosen:
            return []  # not while the copies left could not cover every request still out
        lateness: dict[int, float] = {}
        picked = []
        for flight in sorted(self._flights, key=lambda f: f.started):
            if self.chosen >= self.budget:
                break
            own = flight.latency
            judged = own if own.total >= MIN_SAMPLES else self.latency
            if (key := id(judged)) not in lateness:
                lateness[key] = _late(judged)
            if flight.answered or flight.chosen >= COPIES:
                continue
            if now - flight.out_since() <= lateness[key]:
                continue
            flight.chosen += 1
            picked.append(flight)
            self.chosen += 1
        return picked

    async def send(
        self,
        transport: Transport,
        request: Request,
        started: float,
        place: Callable[[], AbstractAsyncContextManager[object]],
        latency: LatencyHistogram | None = None,
        heed: Callable[[Answer, float], None] | None = None,
    ) -> tuple[Answer, int]:
        """Send ``request``, and copies as chosen; the first answer, and the copies sent.
        ``place``: a copy's place, held while it is out (a slot in the pool, and its turn
        in the pace: a copy is a request like any other). ``latency``: the answers it is
        judged a straggler against (None: the job's). ``heed``: told each answer that may not
        be the attempt's (a copy's, or the first's failure while copies are out) and when its
        copy went, for the pace (a 429 slows it); the attempt's answer is the caller's to heed.

        Only a success wins while another copy that went may still answer: a
        failure (a dropped connection, a 429, a 5xx) is the attempt's only once
        every copy sent has failed too.
        """
        worker = asyncio.current_task()
        assert worker is not None
        # Cancels from before this send: aiohttp < 3.11's timeout cancels the task and never
        # takes it back, so a worker an earlier attempt timed out in stays cancelling. Read
        # as a stop, a copy's win ended the worker and left its line pending.
        residue = worker.cancelling()
        judged = latency or self.latency
        flight = _Flight(started, judged, worker, transport, request, place, heed)
        self._flights.add(flight)
        try:
            try:
                result = await answer(transport, request)
            except asyncio.CancelledError:
                if flight.won is not None and worker.uncancel() == residue:
                    return self._won(flight, flight.won, by_copy=True)  # this one lost
                raise  # the run is stopping
            flight.answered = True
            self._heard(result)
            if flight.won is not None:  # a cancel the send turned into a failure of its own
                if worker.uncancel() > residue:
                    raise asyncio.CancelledError  # a stop came with it: the run is stopping
                if flight.heed is not None:  # (or an answer that came as the copy won)
                    flight.heed(result, started)
                return self._won(flight, flight.won, by_copy=True)
            if _ok(result):
                return self._won(flight, result, by_copy=False)
            if self.stopped and worker.cancelling() > residue:  # a stop the send made a failure of
                raise asyncio.CancelledError  # its own (not a timeout: aiohttp < 3.11's
                # leaves the task cancelling, and would pass for one)
            # The first failed: a copy that went may still succeed. One still waiting for its
            # turn is not sent (the finally cancels it), nor waited for: its turn may be long.
            if flight.sent and flight.heed is not None:  # then this failure is no attempt's
                flight.heed(result, started)
            for copy in asyncio.as_completed(flight.copies[: flight.sent]):
                if _ok(second := await copy):
                    return self._won(flight, second, by_copy=True)
                result = result if second is None else second
            return result, flight.sent
        finally:
            self._flights.discard(flight)
            out = [copy for copy in flight.copies if not copy.done()]
            for copy in out:
                copy.cancel()
            cancelled = await asyncio.gather(*out, return_exceptions=True)
            done = [c.exception() for c in flight.copies if c not in out and not c.cancelled()]
            for error in [*done, *cancelled]:  # a RequestError is a copy's answer, as a value
                if isinstance(error, Exception) and not isinstance(error, RequestError):
                    raise error  # a bug: as loud as the first copy's

    async def _copy(self, flight: _Flight) -> Answer | None:
        """A copy of a chosen request, None if it was never sent; an answer first ends the
        worker's wait for the first copy."""
        async with flight.place():
            # Not once the request is answered: by its first, or by another copy (whose
            # place, freed, may be the one this copy waited for).
            if flight.answered or flight.won is not None or self.stopped:
                return None
            self.sent += 1
            self.tokens += flight.request.tokens
            flight.sent += 1
            flight.copied = went = asyncio.get_running_loop().time()
            result = await answer(flight.transport, flight.request)
            self._heard(result)
            if flight.heed is not None:
                flight.heed(result, went)
            # Only a success wins: a copy's 429 or 5xx would cancel a first copy that may be
            # about to succeed, and the attempt would begin again.
            if _ok(result) and not flight.answered and flight.won is None:
                flight.won = result
                flight.worker.cancel()  # its wait for the first copy, which is then cancelled
        return result

    def _heard(self, result: Answer) -> None:
        """Each copy's answer, the first's too, once: a refusal among them holds the copies."""
        if isinstance(result, Response):
            self.answered(asyncio.get_running_loop().time(), result.status)


def _ok(answer: Answer | None) -> TypeGuard[Response]:
    return isinstance(answer, Response) and 200 <= answer.status < 300


def _late(latency: LatencyHistogram) -> float:
    """How long a request may be out before it is a straggler (never, before ``MIN_SAMPLES``
    answers make the percentiles worth trusting)."""
    p50, late = latency.percentile(50), latency.percentile(LATE)
    if p50 is None or late is None or latency.total < MIN_SAMPLES:
        return math.inf
    return max(late, 2 * p50, MIN_WAIT)
