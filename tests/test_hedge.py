"""The tail hedge's choices on a fake clock, and its copies against a transport in memory.

Which requests get a second copy is a pure function of the flights, the
latencies seen and the clock handed to ``Hedger.choose``; the end-to-end
promises (the server's arrivals, the output lines) are in test_capacity.py.
"""

from __future__ import annotations

import asyncio

from batchq.live.hedge import (
    MIN_SAMPLES,
    MIN_WAIT,
    QUIET,
    REFUSED_SHARE,
    SHARE,
    Hedger,
    _Flight,
)
from batchq.live.transport import Response
from batchq.records import Request


def flights(hedger: Hedger, *started: float) -> list[_Flight]:
    """Requests in flight since ``started``, as ``Hedger.send`` registers them."""
    loop = asyncio.new_event_loop()  # only to make futures: choosing needs no running loop
    out = [_Flight(at, loop.create_future()) for at in started]
    loop.close()
    hedger._flights.update(out)
    return out


def chosen(out: list[_Flight]) -> list[bool]:
    return [f.chosen and f.wake.done() for f in out]


def test_stragglers_are_chosen_oldest_first_up_to_one_percent_of_the_job() -> None:
    hedger = Hedger(requests=300)
    assert hedger.budget == int(SHARE * 300) == 3
    out = flights(hedger, 0.0, 1.0, 2.0, 3.0, 4.0, 9.5)
    hedger.choose(now=10.0, p50=0.2, p95=0.4, samples=100)
    assert chosen(out) == [True, True, True, False, False, False]
    hedger.choose(now=20.0, p50=0.2, p95=0.4, samples=100)  # the budget is spent
    assert chosen(out) == [True, True, True, False, False, False]


def test_a_small_job_may_still_hedge_once() -> None:
    assert Hedger(requests=20).budget == 1


def test_a_straggler_is_out_longer_than_the_p95_twice_the_median_and_a_second() -> None:
    hedger = Hedger(requests=10_000)
    out = flights(hedger, 0.0)
    for p50, p95, late in ((0.2, 4.0, 4.0), (3.0, 4.0, 6.0), (0.01, 0.02, MIN_WAIT)):
        hedger.choose(now=late, p50=p50, p95=p95, samples=100)
        assert chosen(out) == [False], (p50, p95)
        hedger.choose(now=late + 0.01, p50=p50, p95=p95, samples=100)
        assert chosen(out) == [True], (p50, p95)
        out[0].chosen = False
        hedger.chosen = 0


def test_nothing_is_chosen_before_the_p95_is_worth_trusting() -> None:
    hedger = Hedger(requests=10_000)
    out = flights(hedger, 0.0)
    hedger.choose(now=60.0, p50=0.2, p95=0.4, samples=MIN_SAMPLES - 1)
    hedger.choose(now=60.0, p50=None, p95=None, samples=0)
    assert chosen(out) == [False]


def test_nothing_is_chosen_for_a_while_after_a_429() -> None:
    hedger = Hedger(requests=10_000)
    out = flights(hedger, 0.0)
    for _ in range(100):
        hedger.answered(now=50.0, status=200)
    hedger.answered(now=50.0, status=429)  # one in a hundred: the account is at its limit
    hedger.choose(now=50.0 + QUIET - 0.01, p50=0.2, p95=0.4, samples=100)
    assert chosen(out) == [False]
    hedger.choose(now=50.0 + QUIET, p50=0.2, p95=0.4, samples=100)
    assert chosen(out) == [True]


def test_nothing_is_chosen_while_503s_are_more_than_a_few_recent_answers() -> None:
    hedger = Hedger(requests=10_000)
    out = flights(hedger, 0.0)
    for i in range(100):  # the odd 503 of a busy endpoint is no refusal
        hedger.answered(now=40.0, status=503 if i < REFUSED_SHARE * 100 else 200)
    assert not hedger.refusing(now=40.0)
    hedger.answered(now=41.0, status=503)  # one more is too many
    hedger.choose(now=41.0, p50=0.2, p95=0.4, samples=100)
    assert chosen(out) == [False]
    hedger.answered(now=44.0, status=200)
    hedger.choose(now=41.0 + QUIET - 0.01, p50=0.2, p95=0.4, samples=100)
    assert chosen(out) == [False]  # 1 503 of 2 answers
    hedger.choose(now=41.0 + QUIET, p50=0.2, p95=0.4, samples=100)
    assert chosen(out) == [True]  # of the last QUIET seconds' answers, none refused


def test_nothing_is_chosen_once_the_run_is_stopping() -> None:
    hedger = Hedger(requests=10_000)
    out = flights(hedger, 0.0)
    hedger.stop()
    hedger.choose(now=60.0, p50=0.2, p95=0.4, samples=100)
    assert chosen(out) == [False]


class BothAnswer:
    """A transport whose copies of a request all answer at the same instant, once the
    second has been sent: the race the first answer wins, with both in."""

    def __init__(self) -> None:
        self.sent = 0
        self.answered = 0
        self.both_out = asyncio.Event()

    async def send(self, path: str, body: bytes) -> Response:
        self.sent += 1
        if self.sent == 2:
            self.both_out.set()
        await self.both_out.wait()
        self.answered += 1
        return Response(200, {}, b'{"copy": %d}' % self.answered, f"req-{self.answered}")


async def test_a_request_answered_twice_yields_one_answer() -> None:
    hedger = Hedger(requests=100)
    transport = BothAnswer()
    request = Request(line_no=1, custom_id="c1", url="/v1/chat/completions", body=b"{}", tokens=7)
    sending = asyncio.ensure_future(hedger.send(transport, request, 0.0, _no_wait))
    for _ in range(5):
        await asyncio.sleep(0)
    hedger.choose(now=60.0, p50=0.2, p95=0.4, samples=100)
    answer, hedged = await sending
    assert transport.answered == 2  # both copies answered
    assert isinstance(answer, Response) and answer.status == 200 and hedged
    assert (hedger.sent, hedger.tokens) == (1, 7)


async def _no_wait() -> None:
    pass
