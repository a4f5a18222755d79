"""Pacing: requests per minute, tokens per minute, and what the endpoint says about them.

**Smooth, not bursty.** Each limit is a ``Pace``: a generic-cell-rate
scheduler that gives every acquisition its own slot, ``amount / rate``
seconds after the previous one, and lets a caller run at most
``BURST_SECONDS`` ahead. So a 6,000 RPM job sends 100 requests in every
second, starting with the first, not 6,000 in the first instant; a request
of more tokens than a second's share is sent when its turn comes and paid
for by the wait of the ones after it; and the rate can change at any time.
These are the three things a leaky bucket such as aiolimiter's cannot do
(it starts empty, refuses an ``acquire`` above its capacity, and fixes its
rate at construction), which is why batchq paces with this one instead.

**Adaptive.** The configured ``--rpm``/``--tpm`` are ceilings. Below them:

- a 429 pauses the whole pool for as long as the endpoint asks and halves
  the pace of the limit it names (multiplicative decrease; one cut per
  episode, since the requests already in flight will get their 429s too);
- the pace then climbs back by a twentieth of the ceiling a second
  (additive increase), never above it;
- ``x-ratelimit-limit-*`` lower than the ceiling lowers the ceiling;
  ``x-ratelimit-remaining-*`` at zero pauses until ``x-ratelimit-reset-*``.

**Probe first.** The very first request goes alone and the pool opens when
its answer is in, so the endpoint's ``x-ratelimit-limit-*`` are known before
64 requests go out at a pace the endpoint would refuse. It costs one round
trip, once per run.

With no ``--rpm``/``--tpm`` and an endpoint that sends no rate-limit headers
(vLLM, Ollama, llama.cpp) nothing else here runs: ``wait_turn`` costs a few
comparisons. All times are float seconds on the event loop's clock.
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Mapping
from typing import Literal

from batchq.retry import parse_duration

Kind = Literal["requests", "tokens"]
KINDS: tuple[Kind, Kind] = ("requests", "tokens")

BURST_SECONDS = 0.05  # how far ahead of its pace a limit may run
DECREASE = 0.5  # a 429 multiplies the pace by this
INCREASE_PER_SECOND = 0.05  # of the ceiling, after a cut
MIN_RATE_SHARE = 0.01  # of the ceiling: a cut never goes below this


class Pace:
    """Spaces acquisitions out to ``rate`` units a second (generic cell rate algorithm)."""

    __slots__ = ("_due", "rate")

    def __init__(self, rate: float) -> None:
        self.rate = rate
        self._due = -math.inf  # when the next unit is due (the "theoretical arrival time")

    def reserve(self, amount: float, now: float) -> float:
        """Book ``amount`` units; return how many seconds to wait before using them."""
        start = max(self._due, now)
        self._due = start + amount / self.rate
        return max(0.0, start - BURST_SECONDS - now)

    def restart(self, at: float) -> None:
        """Forget every booking: the next unit is due at ``at``."""
        self._due = at

    def set_rate(self, rate: float, now: float) -> None:
        """Change the rate; what is already booked ahead is rescaled to it."""
        if self._due > now:
            self._due = now + (self._due - now) * self.rate / rate
        self.rate = rate


class Limit:
    """One kind of limit: its ceiling (units a second) and the pace currently kept below it."""

    def __init__(self, ceiling: float) -> None:
        self.ceiling = ceiling
        self.pace = Pace(ceiling)
        self.cut_at = -math.inf  # when the pace was last cut for a 429

    def cut(self, now: float) -> None:
        self.pace.set_rate(max(self.pace.rate * DECREASE, self.ceiling * MIN_RATE_SHARE), now)
        self.cut_at = now

    def recover(self, seconds: float, now: float) -> None:
        if self.pace.rate < self.ceiling:
            step = self.ceiling * INCREASE_PER_SECOND * seconds
            self.pace.set_rate(min(self.ceiling, self.pace.rate + step), now)

    def lower_ceiling(self, ceiling: float, now: float) -> None:
        self.ceiling = ceiling
        if self.pace.rate > ceiling:
            self.pace.set_rate(ceiling, now)


class Pacer:
    """Everything a worker waits for before sending, and what it learns from the answers."""

    def __init__(
        self,
        *,
        rpm: float = 0.0,
        tpm: float = 0.0,
        clock: Callable[[], float] | None = None,
        on_notice: Callable[[str], None] = lambda message: None,
    ) -> None:
        self.tpm = tpm
        self.limits: dict[Kind, Limit | None] = {
            "requests": Limit(rpm / 60) if rpm else None,
            "tokens": Limit(tpm / 60) if tpm else None,
        }
        self._clock = clock
        self._not_before = -math.inf
        self._epoch = 0  # bumped by every pause: bookings made before it are void
        self._probe: asyncio.Event | None = asyncio.Event()  # set once the first answer is in
        self._probing = False
        self._on_notice = on_notice
        self._sent = {"requests": 0, "tokens": 0}  # since the last tick
        self.observed: dict[Kind, float] = {"requests": 0.0, "tokens": 0.0}  # recent, a second

    def _now(self) -> float:
        return self._clock() if self._clock else asyncio.get_running_loop().time()

    async def wait_turn(self, tokens: int) -> float:
        """Wait until a request of ``tokens`` estimated tokens may go; return the time it goes."""
        if self._probe is not None:
            await self._wait_for_probe()
        while True:
            now = self._now()
            if self._not_before > now:
                await asyncio.sleep(self._not_before - now)
                continue
            epoch = self._epoch
            wait = self._reserve(tokens, now)
            if wait > 0:
                await asyncio.sleep(wait)
                if epoch != self._epoch:
                    continue  # a pause began while we slept: book again in the new schedule
            self._sent["requests"] += 1
            self._sent["tokens"] += tokens
            return now + wait

    async def _wait_for_probe(self) -> None:
        """The first request goes alone; the rest wait for its answer and the limits it states."""
        assert self._probe is not None
        if self._probing:
            await self._probe.wait()
        else:
            self._probing = True

    def answered(self) -> None:
        """An attempt has ended (any outcome): the probe, if this was it, is over."""
        if self._probe is not None:
            self._probe.set()
            self._probe = None

    def _reserve(self, tokens: int, now: float) -> float:
        wait = 0.0
        requests, token_limit = self.limits["requests"], self.limits["tokens"]
        if requests is not None:
            wait = requests.pace.reserve(1, now)
        if token_limit is not None:
            wait = max(wait, token_limit.pace.reserve(tokens, now))
        return wait

    def pause(self, seconds: float) -> None:
        """Send nothing for ``seconds`` from now; then start the pace afresh, without a burst."""
        until = self._now() + seconds
        if until <= self._not_before:
            return
        self._not_before = until
        self._epoch += 1
        for limit in self.limits.values():
            if limit is not None:
                limit.pace.restart(until)

    def rate_limited(self, kind: Kind | None, sent_at: float) -> None:
        """A request sent at ``sent_at`` got a 429 for ``kind`` (None: not said): slow down.

        With no ceiling for that kind, the recent rate becomes the ceiling to cut.
        """
        now = self._now()
        for k in (kind,) if kind else KINDS:
            limit = self.limits[k]
            if limit is None:
                if not self.observed[k]:
                    continue
                limit = self.limits[k] = Limit(self.observed[k])
            if sent_at > limit.cut_at:  # later 429s of the same episode don't cut again
                limit.cut(now)

    def tick(self, seconds: float) -> None:
        """Called every ``seconds`` on a timer: measure the recent rates, let the pace climb."""
        now = self._now()
        for kind in KINDS:
            rate = self._sent[kind] / seconds
            self.observed[kind] += 0.2 * (rate - self.observed[kind])
            self._sent[kind] = 0
            limit = self.limits[kind]
            if limit is not None:
                limit.recover(seconds, now)

    def observe(self, headers: Mapping[str, str]) -> None:
        """Heed the ``x-ratelimit-*`` headers of an answer, when it has any."""
        if (
            "x-ratelimit-limit-requests" not in headers
            and "x-ratelimit-limit-tokens" not in headers
        ):
            return
        now = self._now()
        for kind in KINDS:
            self._observe_limit(kind, headers.get(f"x-ratelimit-limit-{kind}"), now)
            if headers.get(f"x-ratelimit-remaining-{kind}") == "0":
                reset = parse_duration(headers.get(f"x-ratelimit-reset-{kind}", ""))
                if reset:
                    self.pause(reset)

    def _observe_limit(self, kind: Kind, value: str | None, now: float) -> None:
        try:
            per_minute = float(value) if value is not None else 0.0
        except ValueError:
            return
        if per_minute <= 0:
            return
        limit = self.limits[kind]
        if limit is not None and limit.ceiling * 60 <= per_minute * 1.0001:
            return
        if limit is None:
            self.limits[kind] = Limit(per_minute / 60)
        else:
            limit.lower_ceiling(per_minute / 60, now)
        flag = "--rpm" if kind == "requests" else "--tpm"
        self._on_notice(
            f"the endpoint allows {per_minute:,.0f} {kind}/min: pacing to that "
            f"(lower than {flag}, or {flag} not set)"
        )

    def never_fits(self, tokens: int) -> bool:
        """A request larger than the whole per-minute token budget could never be sent."""
        return bool(self.tpm) and tokens > self.tpm

    def slowed(self) -> str | None:
        """The pace, e.g. "3,000 requests/min", while it is below the ceiling; else None."""
        slow = [
            f"{limit.pace.rate * 60:,.0f} {kind}/min"
            for kind, limit in self.limits.items()
            if limit is not None and limit.pace.rate < limit.ceiling * 0.999
        ]
        return ", ".join(slow) or None

    def rates(self) -> dict[Kind, float | None]:
        """The current pace of each kind, per minute (None: not paced)."""
        return {k: None if v is None else v.pace.rate * 60 for k, v in self.limits.items()}
