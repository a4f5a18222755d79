"""``--hedge``: a second copy of a straggler, once nothing is left to send.

After "The Tail at Scale" (Dean and Barroso, 2013): when the input is
exhausted, the job's end is decided by its slowest requests, and a request
that has been out longer than the job's p95 latency is more likely stuck
behind something (a busy replica, a lost packet) than merely long. A second
copy of it often answers first. The first answer wins and the other copy is
cancelled; the request still yields exactly one outcome, so exactly one
output line.

Hedges cost requests and tokens, so they are bounded: at most ``SHARE`` of
the job's requests, and none before ``MIN_SAMPLES`` answers have made the
p95 worth trusting. Each is counted, with the tokens it was estimated to
cost, and its result line says ``"hedged": true`` under ``batchq``.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field

from batchq.errors import RequestError
from batchq.live.transport import Response, Transport
from batchq.records import Request

SHARE = 0.02  # of the job's requests: the most that may be hedged
MIN_SAMPLES = 20

Answer = Response | RequestError


@dataclass(eq=False, slots=True)
class _Flight:
    started: float
    due: asyncio.Event = field(default_factory=asyncio.Event)


async def answer(transport: Transport, request: Request) -> Answer:
    """One copy of a request: the endpoint's answer, or why there was none."""
    try:
        return await transport.send(request.url, request.body)
    except RequestError as exc:
        return exc


class Hedger:
    """Which requests in flight get a second copy, and the copies' cost."""

    def __init__(self, requests: int) -> None:
        self.budget = max(1, int(SHARE * requests))
        self.chosen = 0
        self.sent = 0  # copies that went: a chosen request may answer before its copy's turn
        self.tokens = 0  # estimated, of the copies sent
        self._flights: set[_Flight] = set()

    def choose(self, now: float, p95: float | None, samples: int) -> None:
        """Mark the requests out longer than ``p95`` for a second copy, oldest first."""
        if p95 is None or samples < MIN_SAMPLES:
            return
        for flight in sorted(self._flights, key=lambda f: f.started):
            if self.chosen >= self.budget or now - flight.started <= p95:
                return
            if not flight.due.is_set():
                flight.due.set()
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
        flight = _Flight(started)
        self._flights.add(flight)
        first = asyncio.ensure_future(answer(transport, request))
        chosen = asyncio.ensure_future(flight.due.wait())
        copies = {first}
        try:
            await asyncio.wait((first, chosen), return_when=asyncio.FIRST_COMPLETED)
            self._flights.discard(flight)
            if first.done():
                return first.result(), False
            await wait_turn()  # the copy is a request like any other: it keeps the pace
            if first.done():
                return first.result(), False
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
            for task in (*copies, chosen):
                task.cancel()
            await asyncio.gather(*copies, chosen, return_exceptions=True)
