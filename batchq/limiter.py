"""Pacing: requests per minute, tokens per minute, and pauses the endpoint asks for.

``--rpm`` is paced smoothly, one request per ``60 / rpm`` seconds, with
aiolimiter: an ``AsyncLimiter(rpm, 60)`` would let the whole minute's budget
through in its first instant, which per-second limits on the server reject.
``--tpm`` uses a small token bucket of its own (generic cell rate), because
a request's tokens can exceed any per-second share and aiolimiter refuses
an ``acquire`` larger than its capacity.

A 429 pauses the whole pool: ``pause`` moves one shared "not before" time,
and every worker waits for it before sending.

All times are float seconds on the event loop's clock.
"""

from __future__ import annotations

import asyncio

from aiolimiter import AsyncLimiter


class TokenPacer:
    """Spaces token use at ``tpm / 60`` tokens a second, allowing ``burst`` seconds' worth at once.

    Generic cell rate: each acquisition moves a virtual "next free" time by
    its size over the rate; a caller waits until that time is within the
    burst allowance.
    """

    def __init__(self, tpm: float, *, burst: float = 1.0) -> None:
        self.rate = tpm / 60.0
        self.burst = burst
        self._next_free = 0.0

    async def acquire(self, tokens: int) -> None:
        loop = asyncio.get_running_loop()
        now = loop.time()
        start = max(self._next_free, now)
        self._next_free = start + tokens / self.rate
        wait = self._next_free - self.burst - now
        if wait > 0:
            await asyncio.sleep(wait)


class Pacer:
    """Everything a worker waits for before it sends a request."""

    def __init__(self, *, rpm: float = 0.0, tpm: float = 0.0) -> None:
        self.tpm = tpm
        self._requests = AsyncLimiter(1, 60.0 / rpm) if rpm else None
        self._tokens = TokenPacer(tpm) if tpm else None
        self._not_before = 0.0

    async def wait_turn(self, tokens: int) -> None:
        """Return when a request of ``tokens`` estimated tokens may be sent."""
        loop = asyncio.get_running_loop()
        # A 429 seen while we slept may have moved the time on again: check until clear.
        while (delay := self._not_before - loop.time()) > 0:  # noqa: ASYNC110
            await asyncio.sleep(delay)
        if self._requests is not None:
            await self._requests.acquire()
        if self._tokens is not None:
            await self._tokens.acquire(tokens)

    def pause(self, seconds: float) -> None:
        """Send nothing for ``seconds`` from now (a 429 asked for it)."""
        loop = asyncio.get_running_loop()
        self._not_before = max(self._not_before, loop.time() + seconds)

    def never_fits(self, tokens: int) -> bool:
        """A request larger than the whole per-minute token budget could never be sent."""
        return bool(self.tpm) and tokens > self.tpm
