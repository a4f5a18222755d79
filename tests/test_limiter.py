"""The pacer, on a clock the test moves by hand: spacing, bursts, 429s, headers."""

from __future__ import annotations

import itertools

import pytest

from batchq.limiter import BURST_SECONDS, Pace, Pacer


class Clock:
    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


def test_pace_spaces_units_evenly_after_a_small_burst() -> None:
    pace = Pace(100.0)  # 100 a second
    waits = [pace.reserve(1, 0.0) for _ in range(300)]
    assert sum(w == 0 for w in waits) == pytest.approx(BURST_SECONDS * 100 + 1, abs=1)
    gaps = [b - a for a, b in itertools.pairwise(waits[10:])]
    assert all(g == pytest.approx(0.01) for g in gaps)
    # Sending each unit at its time: no one-second window holds more than 100 plus the burst.
    times = sorted(waits)
    busiest = max(sum(1 for t in times if s <= t < s + 1) for s in times)
    assert busiest <= 100 + BURST_SECONDS * 100 + 1


def test_a_large_amount_is_not_refused_but_paid_for_by_those_after_it() -> None:
    pace = Pace(10.0)  # 10 tokens a second
    assert pace.reserve(1000, 0.0) == 0.0  # more than a minute's share: goes, never stuck
    assert pace.reserve(1, 0.0) == pytest.approx(100.0 - BURST_SECONDS)


def test_a_new_rate_rescales_what_is_booked() -> None:
    pace = Pace(10.0)
    pace.reserve(10, 0.0)  # booked for the next second
    pace.set_rate(5.0, 0.0)
    assert pace.reserve(1, 0.0) == pytest.approx(2.0 - BURST_SECONDS)


def pacer(clock: Clock, **limits: float) -> tuple[Pacer, list[str]]:
    notices: list[str] = []
    return Pacer(clock=clock, on_notice=notices.append, **limits), notices


def test_a_429_halves_the_pace_once_per_episode_and_it_climbs_back() -> None:
    clock = Clock()
    p, _ = pacer(clock, rpm=6000)
    sent_at = clock.now
    clock.now += 0.1
    p.rate_limited("requests", sent_at)
    p.rate_limited("requests", sent_at)  # the same episode: one cut
    assert p.rates()["requests"] == pytest.approx(3000)
    clock.now += 1
    for _ in range(5):
        p.tick(1.0)
    assert p.rates()["requests"] == pytest.approx(3000 + 5 * 300)
    for _ in range(100):
        p.tick(1.0)
    assert p.rates()["requests"] == pytest.approx(6000)  # never above the ceiling


def test_a_429_without_a_configured_limit_cuts_the_observed_rate() -> None:
    clock = Clock()
    p, _ = pacer(clock)
    p._sent["requests"] = 200
    p.tick(1.0)  # 200 sent in the last second
    p.rate_limited(None, clock.now - 0.5)
    assert p.rates()["requests"] == pytest.approx(p.observed["requests"] * 0.5 * 60)
    assert p.rates()["tokens"] is None  # no tokens were seen: nothing to cut


def test_a_lower_endpoint_limit_lowers_the_pace_and_says_so_once() -> None:
    clock = Clock()
    p, notices = pacer(clock, rpm=100_000)
    headers = {"x-ratelimit-limit-requests": "600", "x-ratelimit-remaining-requests": "599"}
    p.observe(headers)
    p.observe(headers)
    assert p.rates()["requests"] == pytest.approx(600)
    assert len(notices) == 1 and "600 requests/min" in notices[0]
    p.observe({"x-ratelimit-limit-requests": "100000"})  # a higher one never raises it
    assert p.rates()["requests"] == pytest.approx(600)


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
