"""The tail hedge (on by default, ``--no-hedge``): a second copy of a straggler,
once nothing is left to send.

After "The Tail at Scale" (Dean and Barroso, 2013): when the input is
exhausted, the job's end is decided by its slowest requests, and a request
that has been out longer than the job's p95 latency is more likely stuck
behind something (a busy replica, a lost packet) than merely long. A second
copy of it often answers first. The first answer wins and the other copy is
cancelled; the request still yields exactly one outcome, so exactly one
output line.

Hedges cost requests and tokens, so they are bounded: at most ``SHARE`` of
the job's requests; none before ``MIN_SAMPLES`` answers have made the p95
worth trusting; none of a request out less than ``MIN_WAIT`` or twice the
median (a copy then saves less than it costs: with a steady latency nothing
is a straggler); none while the endpoint refuses (a 429 in the last
``QUIET`` seconds, or 503s more than ``REFUSED_SHARE`` of its answers then: a
copy would only add to its load, while the odd 503 of a busy endpoint is no
refusal); none once the run is stopping. Each is counted, with the tokens it
was estimated to cost, and its result line says ``"hedged": true`` under
``batchq``.
"""

from __future__ import annotations

import asyncio
import math
from collections import deque
from collections.abc import Awaitable, Callable
from dataclasses import dataclass

from batchq.errors import RequestError
from batchq.live.transport import Response, Transport
from batchq.records import Request

SHARE = 0.01  # of the job's requests: the most that may be hedged
MIN_SAMPLES = 20
MIN_WAIT = 1.0  # seconds: a request out less long is no straggler worth a copy
QUIET = 5.0  # seconds: what the endpoint refused in as many is recent
REFUSED_SHARE = 0.05  # of the recent answers: more 503s than this, and it refuses

Answer = Response | RequestError


@dataclass(eq=False, slots=True)
class _Flight:
    started: float
    # Done when the first copy answers, or when the request is chosen for a second: one
    # future a request, where an Event, a task waiting on it and asyncio.wait cost every
    # request ~17% of a fast endpoint's throughput (hedging is on by default).
    wake: asyncio.Future[None]
    chosen: bool = False


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
    """Which requests in flight get a second copy, and the copies' cost."""

    def __init__(self, requests: int) -> None:
        self.budget = max(1, int(SHARE * requests))
        self.chosen = 0
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

    def choose(self, now: float, p50: float | None, p95: float | None, samples: int) -> None:
        """Mark the stragglers (out longer than ``p95``, twice ``p50`` and ``MIN_WAIT``) for a
        second copy, oldest first."""
        if p50 is None or p95 is None or samples < MIN_SAMPLES or self.stopped:
            return
        if self.refusing(now):
            return
        late = max(p95, 2 * p50, MIN_WAIT)
        for flight in sorted(self._flights, key=lambda f: f.started):
            if self.chosen >= self.budget or now - flight.started <= late:
                return
            if not flight.chosen:
                flight.chosen = True
                _settle(flight.wake)
                self.chosen += 1

    async def send(
        self,
        transport: Transport,
        request: Request,
        started: float,
        wait_turn: Callable[[], Awaitable[object]],
    ) -> tuple[Answer, bool]:
        """Send ``request``, and a second copy if chosen; the first answer, and if hedged.

        A copy that fails without an answer (a dropped connection) does not
        win while the other may still answer.
        """
        first = asyncio.ensure_future(answer(transport, request))
        flight = _Flight(started, first.get_loop().create_future())
        first.add_done_callback(lambda _: _settle(flight.wake))
        self._flights.add(flight)
        copies = {first}
        try:
            await flight.wake
            self._flights.discard(flight)
            if not first.done() and not self.stopped:
                await wait_turn()  # the copy is a request like any other: it keeps the pace
            if first.done() or self.stopped:  # chosen before a stop: its copy stays unsent
                return await first, False
            self.sent += 1
            self.tokens += request.tokens
            copies.add(asyncio.ensure_future(answer(transport, request)))
            pending: set[asyncio.Future[Answer]] = set(copies)
            while True:
                done, pending = await asyncio.wait(pending, return_when=asyncio.FIRST_COMPLETED)
                results = [copy.result() for copy in done]
                for result in results:
                    if isinstance(result, Response):
                        return result, True
                if not pending:
                    return results[-1], True
        finally:
            self._flights.discard(flight)
            if len(copies) > 1 or not first.done():  # the common case has nothing to cancel
                for task in copies:
                    task.cancel()
                await asyncio.gather(*copies, return_exceptions=True)


def _settle(wake: asyncio.Future[None]) -> None:
    if not wake.done():  # a cancelled send leaves it cancelled
        wake.set_result(None)
