"""The tail hedge (on by default, ``--no-hedge``): copies of stragglers, once nothing
is left to send.

After "The Tail at Scale" (Dean and Barroso, 2013): when the input is
exhausted, the job's end is decided by its slowest requests, and a request
out longer than most (``LATE``: the job's p80 latency, and twice its median)
is more likely stuck behind something (a busy replica, a lost packet) than
merely long. A copy of it often answers first. The first answer wins and the
other copies are cancelled; the request still yields exactly one outcome, so
exactly one output line. A copy's latency is drawn from the same tail, so a
copy out as long is a straggler too, and gets one more (``COPIES`` in all).

Dean and Barroso wait for the p95 to keep a service's extra load near 5%; here
the copies are capped at ``SHARE`` of the job's requests and go only in its
tail, so the cap bounds the cost and the percentile only says where to spend
it. Simulated on capacity.py's case 1 (20,000 requests at 10,000 RPM, latency
p50 0.8 s, p99 10 s; benchmarks/tail_sim.py, 60 seeds), one copy at the p95
left a median tail of 13 s after the last send (53 s at worst; 0.4% copies);
three at the p80, 5.5 s (9.8 s; 0.8%). On a milder tail (p99 3 s) both end
~3.7 s after it, and the p80 spends 0.2% copies, not 0.1%.

Hedges are bounded: at most ``SHARE`` of the job's requests; none before
``MIN_SAMPLES`` answers have made the percentiles worth trusting; none of a
request out less than ``MIN_WAIT`` or twice the median (a copy then saves less
than it costs: with a steady latency nothing is a straggler); none while the
endpoint refuses (a 429 in the last ``QUIET`` seconds, or 503s more than
``REFUSED_SHARE`` of its answers then: a copy would only add to its load, while
the odd 503 of a busy endpoint is no refusal); none once the run is stopping.
Each is counted, with the tokens it was estimated to cost, and its result line
says ``"hedged": true`` under ``batchq``.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

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
REFUSED_SHARE = 0.05  # of the recent answers: more 503s than this, and it refuses

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
    turn: Callable[[], Awaitable[object]]
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
        """A 429 in the last ``QUIET`` seconds, or 503s more than ``REFUSED_SHARE`` of them."""
        self._forget(now)
        refused_503s = len(self._refusals) > REFUSED_SHARE * len(self._answers)
        return now - self.limited_at < QUIET or refused_503s

    def _forget(self, now: float) -> None:
        for times in (self._answers, self._refusals):
            while times and times[0] <= now - QUIET:
                times.popleft()

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
        if self.stopped or self.refusing(now):
            return []
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
        turn: Callable[[], Awaitable[object]],
        latency: LatencyHistogram | None = None,
    ) -> tuple[Answer, int]:
        """Send ``request``, and copies as chosen; the first answer, and the copies sent.
        ``latency``: the answers it is judged a straggler against (None: the job's).

        A copy that fails without an answer (a dropped connection) does not
        win while another may still answer.
        """
        worker = asyncio.current_task()
        assert worker is not None
        flight = _Flight(started, latency or self.latency, worker, transport, request, turn)
        self._flights.add(flight)
        try:
            try:
                result = await answer(transport, request)
            except asyncio.CancelledError:
                if flight.won is not None and worker.uncancel() == 0:
                    return flight.won, flight.sent  # a copy came first: this one lost
                raise  # the run is stopping
            flight.answered = True
            if flight.won is not None:  # a cancel the send turned into a failure of its own
                if worker.uncancel() > 0:
                    raise asyncio.CancelledError  # a stop came with it: the run is stopping
                return flight.won, flight.sent
            if isinstance(result, Response) or not flight.sent:
                return result, flight.sent
            if worker.cancelling():  # a stop the send turned into a failure of its own
                raise asyncio.CancelledError
            # The first failed: a copy that went may still answer. One still waiting for its
            # turn is not sent (the finally cancels it), nor waited for: its turn may be long.
            for copy in asyncio.as_completed(flight.copies[: flight.sent]):
                if isinstance(second := await copy, Response):
                    return second, flight.sent
                result = result if second is None else second
            return result, flight.sent
        finally:
            self._flights.discard(flight)
            out = [copy for copy in flight.copies if not copy.done()]
            for copy in out:
                copy.cancel()
            await asyncio.gather(*out, return_exceptions=True)
            for copy in flight.copies:
                if copy not in out and not copy.cancelled() and (error := copy.exception()):
                    raise error  # not a RequestError (kept as a value): a bug, as loud

    async def _copy(self, flight: _Flight) -> Answer | None:
        """A copy of a chosen request, None if it was never sent; an answer first ends the
        worker's wait for the first copy."""
        await flight.turn()  # the copy is a request like any other: it keeps the pace
        if flight.answered or self.stopped:  # or chosen before a stop: its copy stays unsent
            return None
        self.sent += 1
        self.tokens += flight.request.tokens
        flight.sent += 1
        flight.copied = asyncio.get_running_loop().time()
        result = await answer(flight.transport, flight.request)
        if isinstance(result, Response) and not flight.answered and flight.won is None:
            flight.won = result
            flight.worker.cancel()  # its wait for the first copy, which is then cancelled
        return result


def _late(latency: LatencyHistogram) -> float:
    """How long a request may be out before it is a straggler (never, before ``MIN_SAMPLES``
    answers make the percentiles worth trusting)."""
    p50, late = latency.percentile(50), latency.percentile(LATE)
    if p50 is None or late is None or latency.total < MIN_SAMPLES:
        return math.inf
    return max(late, 2 * p50, MIN_WAIT)
