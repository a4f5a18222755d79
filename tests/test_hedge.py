"""The tail hedge's choices on a fake clock, and its copies against a transport in memory.

Which requests get a copy is a pure function of the flights, the
latencies seen and the clock handed to ``Hedger.choose``; the end-to-end
promises (the server's arrivals, the output lines) are in test_capacity.py.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import pytest

from batchq.errors import RequestError, TransportError
from batchq.live.concurrency import Pool
from batchq.live.hedge import (
    COPIES,
    FUTILE_AFTER,
    FUTILE_SHARE,
    LATE,
    MIN_SAMPLES,
    MIN_WAIT,
    QUIET,
    REFUSED_AT_LEAST,
    REFUSED_SHARE,
    SHARE,
    Hedger,
    _Flight,
)
from batchq.live.transport import Response
from batchq.records import Request


class Latency:
    """The latencies a flight is judged against, as percentiles given by the test."""

    def __init__(self) -> None:
        self.p50: float | None = None
        self.late: float | None = None
        self.total = 0

    def percentile(self, p: float) -> float | None:
        assert p in (50, LATE), p
        return self.p50 if p == 50 else self.late


def flights(hedger: Hedger, *started: float, latency: Latency | None = None) -> list[_Flight]:
    """Requests in flight since ``started``, as ``Hedger.send`` registers them."""
    latency = latency or Latency()
    out = [_Flight(at, latency, None, None, None, None, None) for at in started]  # type: ignore[arg-type]
    hedger._flights.update(out)
    return out


def pick(
    hedger: Hedger,
    out: list[_Flight],
    now: float,
    p50: float | None,
    late: float | None,
    samples: int,
) -> None:
    """``hedger.pick`` at ``now``, the flights' latencies having these percentiles."""
    for flight in out:
        latency = flight.latency
        latency.p50, latency.late, latency.total = p50, late, samples  # type: ignore[attr-defined]
    hedger.pick(now)


def chosen(out: list[_Flight]) -> list[bool]:
    return [f.chosen > 0 for f in out]


def test_stragglers_are_chosen_oldest_first_up_to_one_percent_of_the_job() -> None:
    hedger = Hedger(requests=300)
    assert hedger.budget == int(SHARE * 300) == 3
    out = flights(hedger, 0.0, 1.0, 2.0)
    pick(hedger, out, now=10.0, p50=0.2, late=0.4, samples=100)
    assert chosen(out) == [True, True, True]
    later = flights(hedger, 3.0)
    pick(hedger, later, now=20.0, p50=0.2, late=0.4, samples=100)  # the budget is spent
    assert chosen(later) == [False]


def test_copies_wait_until_those_left_cover_every_request_out() -> None:
    hedger = Hedger(requests=300)  # three copies: the job's last three requests may get one
    out = flights(hedger, 0.0, 1.0, 2.0, 3.0, 8.5)
    pick(hedger, out, now=10.0, p50=0.2, late=0.4, samples=100)
    assert chosen(out) == [False] * 5  # five out: copies now might miss the last ones
    hedger._flights -= {out[1], out[2]}  # two answered: three out, three copies left
    pick(hedger, out, now=10.0, p50=0.2, late=0.4, samples=100)
    assert chosen(out) == [True, False, False, True, True]


def test_a_small_job_may_still_hedge_once() -> None:
    assert Hedger(requests=20).budget == 1


def test_a_straggler_is_out_longer_than_the_p80_twice_the_median_and_a_second() -> None:
    hedger = Hedger(requests=10_000)
    out = flights(hedger, 0.0)
    for p50, p80, late in ((0.2, 4.0, 4.0), (3.0, 4.0, 6.0), (0.01, 0.02, MIN_WAIT)):
        pick(hedger, out, now=late, p50=p50, late=p80, samples=100)
        assert chosen(out) == [False], (p50, p80)
        pick(hedger, out, now=late + 0.01, p50=p50, late=p80, samples=100)
        assert chosen(out) == [True], (p50, p80)
        out[0].chosen = hedger.chosen = 0


def test_each_request_is_judged_by_the_latencies_of_its_own_deployment() -> None:
    hedger = Hedger(requests=10_000)
    slow, fast = Latency(), Latency()
    slow.p50, slow.late, slow.total = 3.0, 5.0, 100  # a box four times slower
    fast.p50, fast.late, fast.total = 0.2, 0.4, 100
    on_slow = flights(hedger, 0.0, latency=slow)
    on_fast = flights(hedger, 2.5, latency=fast)
    hedger.pick(now=4.0)  # out 4 s on the slow box: usual there; 1.5 s on the fast: a straggler
    assert chosen(on_slow + on_fast) == [False, True]
    hedger.pick(now=6.01)
    assert chosen(on_slow + on_fast) == [True, True]


def test_a_request_to_a_deployment_with_too_few_answers_is_judged_by_the_jobs() -> None:
    job = Latency()
    job.p50, job.late, job.total = 0.2, 0.4, 100
    hedger = Hedger(requests=10_000, latency=job)  # type: ignore[arg-type]
    stuck = Latency()  # a box that has answered nothing yet
    stuck.p50, stuck.late, stuck.total = 0.2, 0.4, MIN_SAMPLES - 1
    out = flights(hedger, 0.0, latency=stuck)
    hedger.pick(now=1.01)
    assert chosen(out) == [True]


def test_nothing_is_chosen_before_the_percentiles_are_worth_trusting() -> None:
    hedger = Hedger(requests=10_000)
    out = flights(hedger, 0.0)
    pick(hedger, out, now=60.0, p50=0.2, late=0.4, samples=MIN_SAMPLES - 1)
    pick(hedger, out, now=60.0, p50=None, late=None, samples=0)
    assert chosen(out) == [False]


def test_nothing_is_chosen_for_a_while_after_a_429() -> None:
    hedger = Hedger(requests=10_000)
    out = flights(hedger, 0.0)
    for _ in range(100):
        hedger.answered(now=50.0, status=200)
    hedger.answered(now=50.0, status=429)  # one in a hundred: the account is at its limit
    pick(hedger, out, now=50.0 + QUIET - 0.01, p50=0.2, late=0.4, samples=100)
    assert chosen(out) == [False]
    pick(hedger, out, now=50.0 + QUIET, p50=0.2, late=0.4, samples=100)
    assert chosen(out) == [True]


def test_nothing_is_chosen_while_503s_are_more_than_a_few_recent_answers() -> None:
    hedger = Hedger(requests=10_000)
    out = flights(hedger, 0.0)
    for i in range(100):  # the odd 503 of a busy endpoint is no refusal
        hedger.answered(now=40.0, status=503 if i < REFUSED_SHARE * 100 else 200)
    assert not hedger.refusing(now=40.0)
    hedger.answered(now=41.0, status=503)  # one more is too many
    pick(hedger, out, now=41.0, p50=0.2, late=0.4, samples=100)
    assert chosen(out) == [False]
    hedger.answered(now=44.0, status=200)
    pick(hedger, out, now=40.0 + QUIET - 0.01, p50=0.2, late=0.4, samples=100)
    assert chosen(out) == [False]  # 6 503s of 101 answers
    pick(hedger, out, now=41.0 + QUIET, p50=0.2, late=0.4, samples=100)
    assert chosen(out) == [True]  # of the last QUIET seconds' answers, none refused


def test_in_a_tail_of_few_answers_a_503_or_two_are_chance() -> None:
    hedger = Hedger(requests=10_000)
    hedger.answered(now=40.0, status=200)
    for _ in range(REFUSED_AT_LEAST - 1):
        hedger.answered(now=40.0, status=503)
    assert not hedger.refusing(now=40.0)
    hedger.answered(now=40.0, status=503)
    assert hedger.refusing(now=40.0)


def test_nothing_is_chosen_once_the_run_is_stopping() -> None:
    hedger = Hedger(requests=10_000)
    out = flights(hedger, 0.0)
    hedger.stop()
    pick(hedger, out, now=60.0, p50=0.2, late=0.4, samples=100)
    assert chosen(out) == [False]


def test_a_copy_that_straggles_too_gets_one_more_up_to_copies() -> None:
    hedger = Hedger(requests=10_000)
    (flight,) = out = flights(hedger, 0.0)
    pick(hedger, out, now=5.5, p50=1.0, late=5.0, samples=100)
    assert flight.chosen == 1
    pick(hedger, out, now=60.0, p50=1.0, late=5.0, samples=100)
    assert flight.chosen == 1  # its copy waits for its turn: nothing to judge yet
    for went in range(1, COPIES):  # the latest copy went at 10 s, 20 s, ...
        flight.sent, flight.copied = went, 10.0 * went
        pick(hedger, out, now=10.0 * went + 5.0, p50=1.0, late=5.0, samples=100)
        assert flight.chosen == went  # the copy is out no longer than the p80
        pick(hedger, out, now=10.0 * went + 5.01, p50=1.0, late=5.0, samples=100)
        assert flight.chosen == went + 1
    flight.sent, flight.copied = COPIES, 100.0
    pick(hedger, out, now=1000.0, p50=1.0, late=5.0, samples=100)
    assert flight.chosen == hedger.chosen == COPIES


def test_a_request_whose_first_copy_failed_gets_no_more_copies() -> None:
    hedger = Hedger(requests=10_000)
    (flight,) = out = flights(hedger, 0.0)
    pick(hedger, out, now=5.0, p50=0.8, late=4.8, samples=100)
    flight.sent, flight.copied, flight.answered = 1, 5.0, True  # it waits for its copy
    pick(hedger, out, now=60.0, p50=0.8, late=4.8, samples=100)
    assert flight.chosen == 1


def test_copies_stop_once_they_rarely_win() -> None:
    # Where latency follows the answer's length, a straggler's copy is as long, and later:
    # simulated (tail_sim.py --same-length 1), copies won 1-2% and the guard cut them from
    # 0.97% of the requests to 0.38%; with independent latencies they win ~60% and go on.
    hedger = Hedger(requests=10_000)
    out = flights(hedger, 0.0)
    hedger.won, hedger.lost = 0, FUTILE_AFTER - 1  # too few raced to judge
    pick(hedger, out, now=60.0, p50=0.2, late=0.4, samples=100)
    assert chosen(out) == [True]
    out = flights(hedger, 0.0)
    hedger.won, hedger.lost = FUTILE_AFTER, FUTILE_AFTER * 9  # a tenth won: copies still pay
    pick(hedger, out, now=60.0, p50=0.2, late=0.4, samples=100)
    assert chosen(out) == [True]
    out = flights(hedger, 0.0)
    hedger.lost += 1
    assert hedger.won < FUTILE_SHARE * (hedger.won + hedger.lost)
    pick(hedger, out, now=60.0, p50=0.2, late=0.4, samples=100)
    assert chosen(out) == [False]


def test_every_copy_counts_against_the_budget() -> None:
    hedger = Hedger(requests=200)  # two copies in all
    first, second = out = flights(hedger, 0.0, 1.0)
    pick(hedger, out, now=6.0, p50=0.8, late=4.8, samples=100)
    first.sent, first.copied = 1, 6.0
    second.sent, second.copied = 1, 6.0
    pick(hedger, out, now=20.0, p50=0.8, late=4.8, samples=100)
    assert chosen(out) == [True, True] and (first.chosen, second.chosen) == (1, 1)


async def _no_wait() -> None:
    pass


def _placed(turn: Callable[[], Awaitable[object]]) -> Callable[[], AsyncIterator[None]]:
    """A copy's place whose only wait is ``turn``."""

    @contextlib.asynccontextmanager
    async def place() -> AsyncIterator[None]:
        await turn()
        yield

    return place  # type: ignore[return-value]


class Scripted:
    """A transport whose copies answer when the test says: ``copies[i]`` is the i-th
    copy's answer (a Response, or a RequestError to raise); ``cancelled`` counts the
    copies cancelled while out."""

    def __init__(self) -> None:
        self.copies: list[asyncio.Future[Response | RequestError]] = []
        self.cancelled = 0
        self.out = asyncio.Condition()

    async def send(self, path: str, body: bytes) -> Response:
        answer: asyncio.Future[Response | RequestError] = asyncio.get_running_loop().create_future()
        self.copies.append(answer)
        async with self.out:
            self.out.notify_all()
        try:
            result = await answer
        except asyncio.CancelledError:
            self.cancelled += 1
            raise
        if isinstance(result, RequestError):
            raise result
        return result

    async def wait_out(self, copies: int) -> None:
        async with self.out:
            await self.out.wait_for(lambda: len(self.copies) >= copies)


def _ok(n: int) -> Response:
    return Response(200, {}, b'{"copy": %d}' % n, f"req-{n}")


async def _hedged(
    hedger: Hedger,
    transport: Scripted,
    turn: Callable[[], Awaitable[object]] | None = None,
    *,
    timed_out: bool = False,
    heed: Callable[[object, float], None] | None = None,
) -> asyncio.Task[tuple[object, int]]:
    """A request sent through ``hedger``, out alone long enough to be chosen at once;
    ``timed_out``: by a worker an earlier attempt's timeout left cancelling, as aiohttp
    before 3.11's does (it cancels the task and never takes the cancel back)."""
    request = Request(line_no=1, custom_id="c1", url="/v1/chat/completions", body=b"{}", tokens=7)
    latency = Latency()
    latency.total, latency.p50, latency.late = 100, 0.2, 0.4

    async def worker() -> tuple[object, int]:
        if timed_out:
            asyncio.current_task().cancel()  # type: ignore[union-attr]
            with contextlib.suppress(asyncio.CancelledError):
                await asyncio.sleep(0)
        place = _placed(turn or _no_wait)
        send = hedger.send(transport, request, 0.0, place, latency, heed)  # type: ignore[arg-type]
        return await send

    sending = asyncio.ensure_future(worker())
    await transport.wait_out(1)
    hedger.choose(now=60.0)
    return sending


async def test_the_second_copy_answering_first_wins_and_the_first_is_cancelled() -> None:
    hedger, transport = Hedger(requests=100), Scripted()
    sending = await _hedged(hedger, transport)
    await transport.wait_out(2)
    transport.copies[1].set_result(_ok(2))
    assert await sending == (_ok(2), 1)
    assert transport.cancelled == 1 and not sending.cancelled()
    assert sending.cancelling() == 0  # the worker's own wait was interrupted, and let go


async def _second_copy(hedger: Hedger, transport: Scripted) -> asyncio.Task[tuple[object, int]]:
    """A request sent through ``hedger`` whose copy is out long enough to get another."""
    sending = await _hedged(hedger, transport)
    await transport.wait_out(2)
    (flight,) = hedger._flights
    flight.copied -= 60.0  # the copy went a minute ago
    hedger.choose(now=asyncio.get_running_loop().time())
    assert flight.chosen == 2  # else the wait below would never end
    await transport.wait_out(3)
    return sending


async def test_the_second_copy_answering_first_wins_and_both_others_are_cancelled() -> None:
    hedger, transport = Hedger(requests=1_000), Scripted()
    sending = await _second_copy(hedger, transport)
    transport.copies[2].set_result(_ok(3))
    assert await sending == (_ok(3), 2)
    assert transport.cancelled == 2 and (hedger.sent, hedger.tokens) == (2, 14)
    assert sending.cancelling() == 0
    assert (hedger.won, hedger.lost) == (1, 1)  # of the copies that raced


async def test_a_first_copy_that_fails_waits_for_whichever_copy_answers() -> None:
    hedger, transport = Hedger(requests=1_000), Scripted()
    sending = await _second_copy(hedger, transport)
    transport.copies[0].set_result(TransportError("connection reset"))
    transport.copies[1].set_result(TransportError("connection reset"))
    await asyncio.sleep(0)
    transport.copies[2].set_result(_ok(3))
    assert await sending == (_ok(3), 2)


async def test_a_first_copy_that_fails_does_not_wait_for_a_copys_turn() -> None:
    hedger, transport = Hedger(requests=1_000), Scripted()
    loop = asyncio.get_running_loop()
    turns: list[asyncio.Future[None]] = [loop.create_future(), loop.create_future()]
    turns[0].set_result(None)  # the second copy's turn never comes
    waits = iter(turns)
    sending = await _hedged(hedger, transport, lambda: next(waits))
    await transport.wait_out(2)
    (flight,) = hedger._flights
    flight.copied -= 60.0
    hedger.choose(now=loop.time())
    assert flight.chosen == 2
    for sent in transport.copies:  # the first and the copy that went
        sent.set_result(TransportError("connection reset"))
    result, copied = await asyncio.wait_for(sending, 10)  # the bound only ends a hang
    assert isinstance(result, TransportError) and copied == hedger.sent == 1
    assert turns[1].cancelled()


async def test_when_every_copy_fails_the_request_fails_once() -> None:
    hedger, transport = Hedger(requests=1_000), Scripted()
    sending = await _second_copy(hedger, transport)
    for copy in transport.copies:
        copy.set_result(TransportError("connection reset"))
    result, copied = await sending
    assert isinstance(result, TransportError) and copied == 2


@pytest.mark.parametrize("first", [0, 1])
async def test_a_request_answered_twice_at_once_yields_one_answer(first: int) -> None:
    hedger, transport = Hedger(requests=100), Scripted()
    sending = await _hedged(hedger, transport)
    await transport.wait_out(2)
    for copy in (first, 1 - first):  # both answers arrive in one turn of the loop
        transport.copies[copy].set_result(_ok(copy + 1))
    assert await sending == (_ok(first + 1), 1)
    assert (hedger.sent, hedger.tokens) == (1, 7)
    assert sending.cancelling() == 0
    assert (hedger.won, hedger.lost) == (first, 1 - first)


async def test_a_first_copy_that_fails_waits_for_the_second() -> None:
    hedger, transport = Hedger(requests=100), Scripted()
    sending = await _hedged(hedger, transport)
    await transport.wait_out(2)
    transport.copies[0].set_result(TransportError("connection reset"))
    transport.copies[1].set_result(_ok(2))
    assert await sending == (_ok(2), 1)
    assert transport.cancelled == 0


@pytest.mark.parametrize("status", [429, 500, 503])
async def test_a_copys_refusal_does_not_end_the_first(status: int) -> None:
    hedger, transport = Hedger(requests=100), Scripted()
    sending = await _hedged(hedger, transport)
    await transport.wait_out(2)
    transport.copies[1].set_result(Response(status, {}, b"{}", "req-2"))
    await asyncio.sleep(0)  # the copy's answer is taken, and wins nothing
    assert not sending.done()
    transport.copies[0].set_result(_ok(1))
    assert await sending == (_ok(1), 1)
    assert (hedger.won, hedger.lost) == (0, 1)


async def test_a_copys_429_stops_further_copies() -> None:
    hedger, transport = Hedger(requests=100), Scripted()
    sending = await _hedged(hedger, transport)
    await transport.wait_out(2)
    transport.copies[1].set_result(Response(429, {}, b"{}", "req-2"))
    await asyncio.sleep(0)  # the copy's answer is taken
    assert hedger.refusing(asyncio.get_running_loop().time())
    transport.copies[0].set_result(_ok(1))
    assert await sending == (_ok(1), 1)


async def test_the_caller_heeds_each_copys_answer_and_when_it_went() -> None:
    # The first's answer is the attempt's, heeded by the caller; a copy's goes to ``heed``
    # (its 429 pauses the pace as any 429 does), with when the copy went.
    hedger, transport, heard = Hedger(requests=1_000), Scripted(), []
    sending = await _hedged(hedger, transport, heed=lambda *answered: heard.append(answered))
    await transport.wait_out(2)
    went = hedger._flights.copy().pop().copied
    refused = Response(429, {"retry-after": "3"}, b"{}", "req-2")
    transport.copies[1].set_result(refused)
    await asyncio.sleep(0)
    transport.copies[0].set_result(_ok(1))
    assert await sending == (_ok(1), 1)
    assert heard == [(refused, went)]  # and not the first's


async def test_the_caller_heeds_a_first_copys_failure_that_a_copy_may_still_undo() -> None:
    # The first's 429, while its copy is out, is no attempt's answer if the copy wins: the
    # pace must still hear it (sent at 0.0), or the endpoint's refusal goes unheeded.
    hedger, transport, heard = Hedger(requests=1_000), Scripted(), []
    sending = await _hedged(hedger, transport, heed=lambda *answered: heard.append(answered))
    await transport.wait_out(2)
    refused = Response(429, {"retry-after": "3"}, b"{}", "req-1")
    transport.copies[0].set_result(refused)
    await asyncio.sleep(0)
    transport.copies[1].set_result(_ok(2))
    assert await sending == (_ok(2), 1)
    assert heard[0] == (refused, 0.0) and [a for a, _ in heard] == [refused, _ok(2)]


async def test_each_answer_is_heard_once_when_every_copy_fails() -> None:
    # The last copy's 503 is the attempt's failure: the runner told the hedger of it again.
    hedger, transport = Hedger(requests=100), Scripted()
    sending = await _hedged(hedger, transport)
    await transport.wait_out(2)
    transport.copies[1].set_result(Response(503, {}, b"{}", "req-2"))
    await asyncio.sleep(0)
    transport.copies[0].set_result(Response(500, {}, b"{}", "req-1"))
    result, _ = await sending
    assert isinstance(result, Response) and result.status == 503
    assert (len(hedger._answers), len(hedger._refusals)) == (2, 1)


async def test_a_copy_waiting_for_a_place_stays_unsent_once_another_copy_won() -> None:
    # The winner's freed place goes to the next copy of the same request, which ran before
    # the worker's cancel and went to the endpoint: paid for, and counted as a lost race.
    pool, hedger, transport = Pool(2, 2), Hedger(requests=1_000), Scripted()
    request = Request(line_no=1, custom_id="c1", url="/v1/chat/completions", body=b"{}", tokens=7)
    latency = Latency()
    latency.total, latency.p50, latency.late = 100, 0.2, 0.4

    async def worker() -> tuple[object, int]:
        async with pool.copy_slot():  # the first copy's place, as the runner's gate holds it
            return await hedger.send(transport, request, 0.0, pool.copy_slot, latency)  # type: ignore[arg-type]

    sending = asyncio.ensure_future(worker())
    await transport.wait_out(1)
    hedger.choose(now=60.0)
    await transport.wait_out(2)
    (flight,) = hedger._flights
    flight.copied -= 60.0  # the copy went a minute ago: it gets one more
    hedger.choose(now=asyncio.get_running_loop().time())
    await asyncio.sleep(0)
    assert flight.chosen == 2 and pool.gate.waiting == 1  # the pool is full: it waits
    transport.copies[1].set_result(_ok(2))
    assert await sending == (_ok(2), 1)
    assert len(transport.copies) == 2 and (hedger.won, hedger.lost) == (1, 0)
    assert (pool.gate.used, pool.copies) == (0, 0)


async def test_a_first_copys_refusal_waits_for_a_copy_that_went() -> None:
    hedger, transport = Hedger(requests=100), Scripted()
    sending = await _hedged(hedger, transport)
    await transport.wait_out(2)
    transport.copies[0].set_result(Response(503, {}, b"{}", "req-1"))
    transport.copies[1].set_result(_ok(2))
    assert await sending == (_ok(2), 1)
    assert (hedger.won, hedger.lost) == (1, 0)  # it saved a retry: a win


async def test_a_first_copy_answering_before_the_seconds_turn_sends_no_second() -> None:
    hedger, transport = Hedger(requests=100), Scripted()
    turn: asyncio.Future[None] = asyncio.get_running_loop().create_future()
    sending = await _hedged(hedger, transport, lambda: turn)
    transport.copies[0].set_result(_ok(1))
    assert await sending == (_ok(1), 0)
    assert turn.cancelled()  # the copy stopped waiting for its turn
    assert (len(transport.copies), hedger.chosen, hedger.sent) == (1, 1, 0)


async def test_stopping_a_hedged_request_cancels_both_copies() -> None:
    hedger, transport = Hedger(requests=100), Scripted()
    sending = await _hedged(hedger, transport)
    await transport.wait_out(2)
    sending.cancel()
    with pytest.raises(asyncio.CancelledError):
        await sending
    assert transport.cancelled == 2


async def test_a_stop_at_the_instant_the_second_copy_wins_still_stops() -> None:
    hedger, transport = Hedger(requests=100), Scripted()
    sending = await _hedged(hedger, transport)
    await transport.wait_out(2)
    transport.copies[1].set_result(_ok(2))
    sending.cancel()  # before the copy's own step: both cancels reach the worker
    with pytest.raises(asyncio.CancelledError):
        await sending


@pytest.mark.parametrize("converting", [False, True])
async def test_a_copy_wins_in_a_worker_an_earlier_timeout_left_cancelling(
    converting: bool,
) -> None:
    # Read as a stop, the win ended the worker (a TaskGroup lets a cancelled task go
    # quietly) and its line stayed pending: the floor CI's aiohttp 3.10 does this.
    hedger = Hedger(requests=100)
    transport = Converting() if converting else Scripted()
    sending = await _hedged(hedger, transport, timed_out=True)
    await transport.wait_out(2)
    transport.copies[1].set_result(_ok(2))
    assert await sending == (_ok(2), 1)
    assert sending.cancelling() == 1  # the timeout's, left as it was


class Converting(Scripted):
    """As aiohttp may, inside a send: a cancellation comes out as a failure of its own."""

    async def send(self, path: str, body: bytes) -> Response:
        try:
            return await super().send(path, body)
        except asyncio.CancelledError:
            raise TransportError("connection closed") from None


async def test_a_stop_as_the_copy_wins_still_stops_when_the_send_converts_it() -> None:
    hedger, transport = Hedger(requests=100), Converting()
    sending = await _hedged(hedger, transport)
    await transport.wait_out(2)
    transport.copies[1].set_result(_ok(2))
    sending.cancel()  # both cancels reach the worker, whose send turns them into a failure
    with pytest.raises(asyncio.CancelledError):
        await sending


async def test_a_stop_the_first_copys_send_converts_does_not_wait_for_the_copy() -> None:
    hedger, transport = Hedger(requests=100), Converting()
    sending = await _hedged(hedger, transport)
    await transport.wait_out(2)
    hedger.stop()  # as the runner does before it cancels its workers
    sending.cancel()  # the first copy's send turns it into a failure; the copy is still out
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(sending, 10)  # the bound only ends a hang
    assert transport.cancelled == 2


async def test_a_stop_the_send_converts_stops_a_request_with_no_copy() -> None:
    hedger, transport = Hedger(requests=100), Converting()
    request = Request(line_no=1, custom_id="c1", url="/v1/chat/completions", body=b"{}", tokens=7)
    sending = asyncio.ensure_future(hedger.send(transport, request, 0.0, _placed(_no_wait)))  # type: ignore[arg-type]
    await transport.wait_out(1)
    hedger.stop()  # as the runner does before it cancels its workers
    sending.cancel()  # the send turns it into a failure, which must not pass for an answer
    with pytest.raises(asyncio.CancelledError):
        await sending


async def test_a_copy_that_raises_other_than_a_request_error_is_never_lost() -> None:
    hedger, transport = Hedger(requests=100), Scripted()

    async def broken_turn() -> None:
        raise RuntimeError("the copy's own bug")

    sending = await _hedged(hedger, transport, broken_turn)
    await asyncio.sleep(0)  # the copy runs, and fails
    transport.copies[0].set_result(_ok(1))
    with pytest.raises(RuntimeError, match="the copy's own bug"):  # as the first copy's would
        await sending
