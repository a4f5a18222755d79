"""The pacer, on a clock the test moves by hand: spacing, bursts, 429s, headers."""

from __future__ import annotations

import itertools

import pytest

from batchq.live.concurrency import Pool
from batchq.live.limiter import BURST_SECONDS, MARGIN, Pace, Pacer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def send_times(pace: Pace, n: int, amount: float = 1) -> list[float]:
    """When ``n`` callers arriving at 0 may go, each using its slot."""
    times = []
    for _ in range(n):
        start = pace.reserve(amount, 0.0)
        pace.used(start, amount)
        times.append(max(0.0, start - BURST_SECONDS))
    return times


def test_pace_spaces_units_evenly_after_a_small_burst() -> None:
    times = send_times(Pace(100.0), 300)  # 100 a second
    assert sum(t == 0 for t in times) == pytest.approx(BURST_SECONDS * 100 + 1, abs=1)
    gaps = [b - a for a, b in itertools.pairwise(times[10:])]
    assert all(g == pytest.approx(0.01) for g in gaps)
    busiest = max(sum(1 for t in times if s <= t < s + 1) for s in times)
    assert busiest <= 100 + BURST_SECONDS * 100 + 1


def test_a_large_amount_is_not_refused_but_paid_for_by_those_after_it() -> None:
    pace = Pace(10.0)  # 10 tokens a second
    assert send_times(pace, 1, amount=1000) == [0.0]  # more than a minute's share: goes
    assert pace.reserve(1, 0.0) == pytest.approx(100.0)


def test_a_replan_voids_bookings_but_not_used_slots() -> None:
    pace = Pace(10.0)
    send_times(pace, 1)  # used: 0.0 to 0.1
    pace.reserve(1, 0.0)  # booked 0.1, never used (its worker was woken to re-book)
    pace.replan(0.0)
    assert pace.reserve(1, 0.0) == pytest.approx(0.1)  # not 0.0: that slot was used


def pacer(clock: Clock, **limits: float) -> tuple[Pacer, list[str]]:
    notices: list[str] = []
    return Pacer(clock=clock, on_notice=notices.append, **limits), notices


def test_the_pace_keeps_a_small_margin_under_the_limit() -> None:
    p, _ = pacer(Clock(), rpm=6000)
    assert p.rates()["requests"] == pytest.approx(6000 * MARGIN)


def test_a_429_halves_the_pace_once_per_episode_and_it_climbs_back() -> None:
    clock = Clock()
    p, _ = pacer(clock, rpm=6000)
    full = 6000 * MARGIN
    sent_at = clock.now
    clock.now += 0.1
    p.rate_limited("requests", sent_at)
    p.rate_limited("requests", sent_at)  # the same episode: one cut
    assert p.rates()["requests"] == pytest.approx(full / 2)
    assert p.slowed() == f"{full / 2:,.0f} requests/min"
    for _ in range(5):
        p.tick(1.0)
    assert p.rates()["requests"] == pytest.approx(full / 2 + 5 * full * 0.05)
    for _ in range(100):
        p.tick(1.0)
    assert p.rates()["requests"] == pytest.approx(full)  # never above the ceiling
    assert p.slowed() is None


def test_a_429_without_any_known_limit_cuts_the_observed_rate() -> None:
    clock = Clock()
    p, _ = pacer(clock)
    p._sent["requests"] = 200
    p.tick(1.0)  # 200 sent in the last second
    p.rate_limited(None, clock.now - 0.5)
    assert p.rates()["requests"] == pytest.approx(p.observed["requests"] * 0.5 * 60)
    assert p.rates()["tokens"] is None  # no tokens were seen: nothing to cut


def test_the_endpoint_limit_is_followed_down_and_back_up() -> None:
    clock = Clock()
    p, notices = pacer(clock, rpm=6000)
    p.observe({"x-ratelimit-limit-requests": "600"})
    p.observe({"x-ratelimit-limit-requests": "600"})
    assert p.rates()["requests"] == pytest.approx(600 * MARGIN)
    assert len(notices) == 1 and "600 requests/min" in notices[0] and "--rpm" in notices[0]
    p.observe({"x-ratelimit-limit-requests": "6000"})  # the account's limit came back
    assert p.rates()["requests"] == pytest.approx(6000 * MARGIN)
    p.observe({"x-ratelimit-limit-requests": "100000"})  # never above --rpm
    assert p.rates()["requests"] == pytest.approx(6000 * MARGIN)


def test_an_endpoint_limit_without_a_configured_one_is_adopted() -> None:
    p, notices = pacer(Clock())
    p.observe({"x-ratelimit-limit-tokens": "120000"})
    assert p.rates() == {"requests": None, "tokens": pytest.approx(120000 * MARGIN)}
    assert notices and "120,000 tokens/min" in notices[0]


def test_no_remaining_requests_pauses_until_the_reset() -> None:
    clock = Clock()
    p, _ = pacer(clock)
    p.observe(
        {
            "x-ratelimit-limit-requests": "60",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1.5s",
        }
    )
    assert p._not_before == pytest.approx(clock.now + 1.5)


def test_no_limits_and_no_headers_means_no_pacing() -> None:
    p, notices = pacer(Clock())
    p.observe({"content-type": "application/json"})
    assert p.rates() == {"requests": None, "tokens": None}
    assert notices == []


def test_never_fits_only_against_a_tpm_budget() -> None:
    assert Pacer(tpm=1000).never_fits(1001)
    assert not Pacer(tpm=1000).never_fits(1000)
    assert not Pacer().never_fits(10**9)


async def test_a_token_pace_names_no_request_rate_until_a_request_is_sent() -> None:
    # It was infinite: sizing the pool on it raised (NaN), and batchq exited 70, when a
    # process sharing a --tpm waited for its first turn longer than a tick.
    p = Pacer(tpm=600_000, clock=Clock())
    assert p.request_rate() is None
    Pool("auto", 1024).resize(p.request_rate(), 0.0)
    await p.wait_turn(500)
    assert p.request_rate() == pytest.approx(600_000 / 60 * MARGIN / 500)
