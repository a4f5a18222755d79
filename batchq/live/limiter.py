"""Pacing: requests per minute, tokens per minute, and what the endpoint says about them.

**Smooth, not bursty.** Each limit is a ``Pace``: a generic-cell-rate
scheduler that books every acquisition its own slot, ``amount / rate``
seconds after the previous one, and lets a caller run at most
``BURST_SECONDS`` ahead. So a 6,000 RPM job sends 100 requests in every
second, starting with the first, not 6,000 in the first instant; a request
of more tokens than a second's share is sent when its turn comes and paid
for by the wait of the ones after it; and the rate can change at any time.
These are the three things a leaky bucket such as aiolimiter's cannot do
(it starts empty, refuses an ``acquire`` above its capacity, and fixes its
rate at construction), which is why batchq paces with this one instead.

**Adaptive.** A limit's ceiling is the lower of the configured
``--rpm``/``--tpm`` and what the endpoint states in ``x-ratelimit-limit-*``
(which may go down and up again, as a shared account's does), less a 2%
margin, because a sliding one-minute window that is paced exactly at its
limit rejects whatever jitter pushes over it. Below the ceiling:

- a 429 pauses the whole pool for as long as the endpoint asks and halves
  the pace of the limit it names (multiplicative decrease; one cut per
  episode, since the requests already in flight will get their 429s too);
- the pace then climbs back by a twentieth of the ceiling a second
  (additive increase), never above it;
- ``x-ratelimit-remaining-*`` at zero pauses until ``x-ratelimit-reset-*``.

Every change of pace or pause voids the slots booked so far and wakes the
workers sleeping on them, so a new pace takes effect at once instead of
after the old bookings have gone out.

**Probe first, briefly.** The very first request goes alone and the pool
opens when its answer is in, so the endpoint's limits are known before many
requests go out at a pace the endpoint would refuse; but never later than
``PROBE_SECONDS`` after it went, so a model that thinks for a minute does
not leave the run idle for that minute.

With no ``--rpm``/``--tpm`` and an endpoint that sends no rate-limit headers
(vLLM, Ollama, llama.cpp) nothing else here runs: ``wait_turn`` costs a few
comparisons. All times are float seconds on the event loop's clock.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
from collections.abc import Callable, Mapping
from typing import TYPE_CHECKING, Literal, Protocol

from batchq.live.retry import parse_duration

if TYPE_CHECKING:  # pragma: no cover
    from batchq.live.limits_store import SharedLimits

Kind = Literal["requests", "tokens"]
KINDS: tuple[Kind, Kind] = ("requests", "tokens")

BURST_SECONDS = 0.05  # how far ahead of its pace a limit may run
MARGIN = 0.98  # of a limit: pace this far under it
DECREASE = 0.5  # a 429 multiplies the pace by this
INCREASE_PER_SECOND = 0.05  # of the ceiling, after a cut
MIN_RATE_SHARE = 0.01  # of the ceiling: a cut never goes below this
PROBE_SECONDS = 1.0  # the longest the first request goes alone


class Pace:
    """Spaces acquisitions out to ``rate`` units a second (generic cell rate algorithm)."""

    __slots__ = ("_due", "_used_until", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._due = -math.inf  # when the next unit is due (the "theoretical arrival time")
        self._used_until = -math.inf  # the end of the last slot that was used

    def reserve(self, amount: float, now: float) -> float:
        """Book ``amount`` units; return the booked start (use it from ``start - burst``)."""
        start = max(self._due, now)
        self._due = start + amount / self.rate
        return start

    def held(self, now: float) -> float:
        """Units bookable without asking anyone: all of them."""
        return math.inf

    def used(self, start: float, amount: float) -> None:
        """A booking was used: a replan must not give its slot away again."""
        self._used_until = max(self._used_until, start + amount / self.rate)

    def replan(self, at: float) -> None:
        """Void every booking not yet used: the next unit is due at ``at`` at the earliest."""
        self._due = max(at, self._used_until)


class Booker(Protocol):
    """What a limit books its slots from: a local ``Pace``, or the store's ``Ledger``."""

    rate: float

    def reserve(self, amount: float, now: float) -> float | None: ...
    def held(self, now: float) -> float: ...
    def used(self, start: float, amount: float) -> None: ...
    def replan(self, at: float) -> None: ...


class Limit:
    """One kind of limit: its ceiling (units a second) and the pace kept below it."""

    def __init__(self, configured: float = math.inf, stated: float = math.inf) -> None:
        self.configured = configured  # --rpm / --tpm, a second
        self.stated = stated  # the endpoint's x-ratelimit-limit-*, a second
        self.share = 1  # the processes this one shares the limit with, store lost
        self.pace: Booker = Pace(self.ceiling)
        self.cut_at = -math.inf  # when the pace was last cut for a 429

    @property
    def ceiling(self) -> float:
        return min(self.configured, self.stated) * MARGIN / self.share

    def cut(self, now: float) -> None:
        self.pace.rate = max(self.pace.rate * DECREASE, self.ceiling * MIN_RATE_SHARE)
        self.cut_at = now

    def recover(self, seconds: float) -> bool:
        """Climb back towards the ceiling; True if the pace changed."""
        if self.pace.rate >= self.ceiling:
            return False
        self.pace.rate = min(
            self.ceiling, self.pace.rate + self.ceiling * INCREASE_PER_SECOND * seconds
        )
        return True

    def state(self, stated: float) -> None:
        """The endpoint states its limit: follow it down at once, and up too."""
        was = self.ceiling
        self.stated = stated
        if self.pace.rate > self.ceiling or self.pace.rate >= was * 0.999:
            self.pace.rate = self.ceiling  # a pace at its old ceiling follows the new one


class Pacer:
    """Everything a worker waits for before sending, and what it learns from the answers."""

    def __init__(
        self,
        *,
        rpm: float = 0.0,
        tpm: float = 0.0,
        clock: Callable[[], float] | None = None,
        on_notice: Callable[[str], None] = lambda message: None,
        max_pause: float = math.inf,
        shared: SharedLimits | None = None,
    ) -> None:
        self.tpm = tpm
        self.shared: SharedLimits | None = None  # None: this process alone, or store lost
        self._away_from: SharedLimits | None = None  # the store while it is lost
        self.max_pause = max_pause  # --max-wait: an endpoint's word is trusted only so far
        self.limits: dict[Kind, Limit | None] = {
            "requests": Limit(configured=rpm / 60) if rpm else None,
            "tokens": Limit(configured=tpm / 60) if tpm else None,
        }
        self._clock = clock
        self._not_before = -math.inf
        self._epoch = 0  # bumped by every replan: bookings made before it are void
        self._sleepers: set[asyncio.Future[None]] = set()
        self._probe: asyncio.Event | None = asyncio.Event()  # set once the first answer is in
        self._probing = False
        self._on_notice = on_notice
        self._sent = {"requests": 0, "tokens": 0}  # since the last tick
        self._sent_total = {"requests": 0, "tokens": 0}
        self.observed: dict[Kind, float] = {"requests": 0.0, "tokens": 0.0}  # recent, a second
        self._refilled: asyncio.Event | None = None  # set when the store's answer is in
        if shared is not None:
            self.share(shared)

    def share(self, shared: SharedLimits) -> None:
        """Pace with every process using ``shared`` (a connected store), before the first turn."""
        self.shared = shared
        for limit in self.limits.values():
            if limit is not None:
                self._book_from_store(limit)

    def _now(self) -> float:
        if self._clock is None:
            # The loop's clock, looked up once: asyncio.get_running_loop() makes a getpid()
            # system call, and this runs for every request. A pacer serves one run, one loop.
            self._clock = asyncio.get_running_loop().time
        return self._clock()

    async def wait_turn(self, tokens: int) -> float:
        """Wait until a request of ``tokens`` estimated tokens may go; return the time it goes."""
        if self._probe is not None:
            await self._wait_for_probe()
        while True:
            now = self._now()
            if self._not_before > now:
                await self._sleep(self._not_before - now)
                continue
            epoch = self._epoch
            bookings = self._reserve(tokens, now)
            if bookings is None:  # the store must grant this process more first
                await self._refill(tokens)
                continue
            wait = 0.0
            for _, start, _ in bookings:
                wait = max(wait, start - BURST_SECONDS - now)
            if wait > 0:
                await self._sleep(wait)
                if epoch != self._epoch:
                    continue  # the plan changed while we slept: book again
            for pace, start, amount in bookings:
                pace.used(start, amount)
            self._sent["requests"] += 1
            self._sent["tokens"] += tokens
            return now + wait

    def _reserve(self, tokens: int, now: float) -> list[tuple[Booker, float, float]] | None:
        if self._away_from is not None and not self._away_from.lost:
            self._rejoin()
        if self.shared is not None:
            if self.shared.lost:
                self._go_alone()
            elif not all(
                limit.pace.held(now) >= self._amount(kind, tokens) - 1e-9
                for kind, limit in self.limits.items()
                if limit is not None
            ):
                return None  # take nothing until every kind has enough
        bookings: list[tuple[Booker, float, float]] = []
        for kind, limit in self.limits.items():
            if limit is not None:
                amount = self._amount(kind, tokens)
                start = limit.pace.reserve(amount, now)
                assert start is not None
                bookings.append((limit.pace, start, amount))
        return bookings

    @staticmethod
    def _amount(kind: Kind, tokens: int) -> float:
        return 1 if kind == "requests" else tokens

    def _book_from_store(self, limit: Limit) -> None:
        if self.shared is not None:
            from batchq.live.limits_store import Ledger

            limit.pace = Ledger(limit.pace.rate)

    async def _refill(self, tokens: int) -> None:
        """Book a block from the store for each kind short of units; one worker asks for all.

        With blocks of nothing (``block_seconds`` 0, to measure one script call per
        acquisition) every worker asks for itself, side by side. When the store books
        nothing (its timeline is more than its horizon ahead), this waits until it is
        that close, then returns: the caller asks again.
        """
        single = self.shared is None or self.shared.block_seconds > 0
        if single and self._refilled is not None:
            await self._refilled.wait()
            return
        done = asyncio.Event()
        if single:
            self._refilled = done
        try:
            from batchq.live.limits_store import HORIZON_SECONDS, Ledger

            shared = self.shared
            for kind, limit in self.limits.items():
                if limit is None or shared is None:
                    continue
                ledger = limit.pace
                assert isinstance(ledger, Ledger)
                short = self._amount(kind, tokens) - ledger.held(self._now())
                if short <= 1e-9:
                    continue
                amount = max(short, ledger.rate * shared.block_seconds)
                if kind == "requests":
                    amount = math.ceil(amount - 1e-9)
                grant = await shared.grant(kind, amount, limit.ceiling)
                if grant is None:
                    return  # lost: the next _reserve goes on alone
                now = self._now()
                if grant.epoch != shared.epoch:
                    if shared.epoch is not None:  # a pause or a cut elsewhere voided ours
                        self._replan(now)
                    shared.epoch = grant.epoch
                if not grant.booked:
                    await self._sleep(grant.delay - HORIZON_SECONDS)
                    return
                ledger.grant(now + grant.delay, amount, grant.rate)
        finally:
            if single:
                self._refilled = None
            done.set()

    def _go_alone(self) -> None:
        """The store is lost: pace locally at this process's share of each limit."""
        assert self.shared is not None
        self._away_from, self.shared = self.shared, None
        for limit in self.limits.values():
            if limit is not None:
                rate = limit.pace.rate
                limit.share = self._away_from.processes
                limit.pace = Pace(min(rate, limit.ceiling))

    def _rejoin(self) -> None:
        """The store is back: book from it again, at the whole limit it shares."""
        assert self._away_from is not None
        shared, self._away_from = self._away_from, None
        for limit in self.limits.values():
            if limit is not None:
                limit.share = 1
        self.share(shared)
        self._replan(self._now())  # slots booked alone are void: their sleepers book again

    async def _sleep(self, seconds: float) -> None:
        """Sleep ``seconds``, or less if a replan wakes every sleeper."""
        loop = asyncio.get_running_loop()
        waker = loop.create_future()
        timer = loop.call_later(seconds, _wake, waker)
        self._sleepers.add(waker)
        try:
            await waker
        finally:
            timer.cancel()
            self._sleepers.discard(waker)

    def _replan(self, at: float) -> None:
        """Void the bookings not yet used, from ``at`` on, and wake their sleepers to book again."""
        self._epoch += 1
        for limit in self.limits.values():
            if limit is not None:
                limit.pace.replan(at)
        for waker in self._sleepers:
            _wake(waker)

    async def _wait_for_probe(self) -> None:
        """The first request goes alone; the rest wait for its answer and the limits it states."""
        assert self._probe is not None
        if self._probing:
            with contextlib.suppress(TimeoutError):
                async with asyncio.timeout(PROBE_SECONDS):  # not wait_for: on 3.11 it can
                    await self._probe.wait()  # swallow a cancellation that races the event
            self.answered()
        else:
            self._probing = True

    def answered(self) -> None:
        """An attempt has ended (any outcome): the probe, if this was it, is over."""
        if self._probe is not None:
            self._probe.set()
            self._probe = None

    def pause(self, seconds: float) -> None:
        """Send nothing for ``seconds`` from now; then start the pace afresh, without a burst.

        With a store, every process sharing it pauses too.
        """
        until = self._now() + seconds
        if until > self._not_before:
            self._not_before = until
            self._replan(until)
            if self.shared is not None:
                self.shared.slow_down(seconds)

    def paused_until(self) -> float:
        """Until when nothing is sent (a 429's or the headers' pause); in the past: not paused."""
        return self._not_before

    def rate_limited(self, kind: Kind | None, sent_at: float) -> None:
        """A request sent at ``sent_at`` got a 429 for ``kind`` (None: not said): slow down.

        With no limit known for that kind, the recent rate is taken as its limit.
        """
        now = self._now()
        for k in (kind,) if kind else KINDS:
            limit = self.limits[k]
            if limit is None:
                if not self.observed[k]:
                    continue
                limit = self.limits[k] = Limit(stated=self.observed[k] / MARGIN)
                self._book_from_store(limit)
            if sent_at > limit.cut_at:  # later 429s of the same episode don't cut again
                limit.cut(now)
                self._replan(max(now, self._not_before))
                if self.shared is not None:  # the store keeps its own episodes
                    pause = max(0.0, self._not_before - now)
                    self.shared.slow_down(pause, k, age=now - sent_at, ceiling=limit.ceiling)

    def tick(self, seconds: float) -> None:
        """Called every ``seconds`` on a timer: measure the recent rates, let the pace climb."""
        changed = False
        for kind in KINDS:
            rate = self._sent[kind] / seconds
            self.observed[kind] += 0.2 * (rate - self.observed[kind])
            self._sent_total[kind] += self._sent[kind]
            self._sent[kind] = 0
            limit = self.limits[kind]
            if limit is not None and self.shared is None:  # a store climbs by itself
                changed |= limit.recover(seconds)
        if changed:
            now = self._now()
            self._replan(max(now, self._not_before))

    def observe(self, headers: Mapping[str, str]) -> None:
        """Heed the ``x-ratelimit-*`` headers of an answer, when it has any."""
        if (
            "x-ratelimit-limit-requests" not in headers
            and "x-ratelimit-limit-tokens" not in headers
        ):
            return
        for kind in KINDS:
            self._observe_limit(kind, headers.get(f"x-ratelimit-limit-{kind}"))
            if headers.get(f"x-ratelimit-remaining-{kind}") == "0":
                reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}", ""))
                if reset:
                    # Capped, not fatal: the answer itself succeeded, and if the limit is
                    # still exhausted after the cap, the 429 that follows stops the job.
                    self.pause(min(reset, self.max_pause))

    def _observe_limit(self, kind: Kind, value: str | None) -> None:
        try:
            per_minute = float(value) if value is not None else 0.0
        except ValueError:
            return
        if not (0 < per_minute < math.inf):
            return
        limit = self.limits[kind]
        if limit is not None and limit.stated == per_minute / 60:
            return  # the common case: nothing new
        if limit is None:
            limit = self.limits[kind] = Limit()
            self._book_from_store(limit)
        lower = per_minute / 60 < limit.configured
        limit.state(per_minute / 60)
        self._replan(max(self._now(), self._not_before))
        if lower:
            flag = "--rpm" if kind == "requests" else "--tpm"
            self._on_notice(
                f"the endpoint allows {per_minute:,.0f} {kind}/min: pacing to that"
                + ("" if limit.configured == math.inf else f" (below {flag})")
            )

    def never_fits(self, tokens: int) -> bool:
        """A request larger than the whole per-minute token budget could never be sent."""
        return bool(self.tpm) and tokens > self.tpm

    def slowed(self) -> str | None:
        """The pace, e.g. "3,000 requests/min", while a 429 holds it below the ceiling."""
        slow = [
            f"{limit.pace.rate * 60:,.0f} {kind}/min"
            for kind, limit in self.limits.items()
            if limit is not None and limit.pace.rate < limit.ceiling * 0.999
        ]
        return ", ".join(slow) or None

    def request_rate(self) -> float | None:
        """Requests a second the pace allows now (None: not paced, or not known yet).

        A token limit counts as requests of the mean size sent so far; until one is sent
        (a process sharing the limit may wait for its first turn) it says nothing.
        """
        rates = []
        if (requests := self.limits["requests"]) is not None:
            rates.append(requests.pace.rate)
        if (tokens := self.limits["tokens"]) is not None:
            sent = self._sent_total["requests"] + self._sent["requests"]
            sent_tokens = self._sent_total["tokens"] + self._sent["tokens"]
            if sent_tokens:
                rates.append(tokens.pace.rate * sent / sent_tokens)
        return min(rates) if rates else None

    def rates(self) -> dict[Kind, float | None]:
        """The current pace of each kind, per minute (None: not paced)."""
        return {k: None if v is None else v.pace.rate * 60 for k, v in self.limits.items()}


def _wake(waker: asyncio.Future[None]) -> None:
    if not waker.done():
        waker.set_result(None)
