"""How many requests may be in flight: the pool's allowance, fixed or found.

Users know their RPM/TPM tier, or nothing (a self-hosted server); they do not
know their endpoint's latency or how many requests it serves at once. So with
``--concurrency auto`` (the default) the allowance is worked out here, from
what the runner observes, and ``Gate`` holds the pool to it:

**Under a pace** (``--rpm``/``--tpm``, or limits the endpoint states) the
allowance follows Little's law, in flight = rate × latency, taken with a
recent high percentile of the latency (p90 of the last few hundred answers)
and half as much again of headroom, so the pace and not the pool is what
binds. Until the first answer is in, the latency is at least the time since
the first request went, so a slow model opens the pool as it waits instead
of idling.

**Without a pace** (vLLM, Ollama, llama.cpp, TGI: no limits stated anywhere)
``AdaptiveLimit`` finds the endpoint's knee from the latency it sees, in the
manner of TCP Vegas and Netflix's Gradient2 limit, with TCP's discipline of
judging a change only by requests sent after it:

- the *base* latency is the lowest median seen over a window, found while
  the pool is still small (it starts at ``INITIAL``);
- a window of answers whose median stays within ``TOLERANCE`` × base, while
  the pool was full, grows the limit: doubling per window until the first
  sign of a queue (slow start), then by its square root;
- a median above that shrinks the limit in proportion, limit × target/median
  (never below half), so it settles where the endpoint's queue is short;
- overload answers (503, 429, timeouts, dropped connections) in more than a
  few percent of a window cut it by a quarter.

Windows are medians of many answers, so one slow answer moves nothing, and
each change waits for answers to requests sent after it, so the limit cannot
be cut twice for one queue. Everything here but ``Gate`` is a pure function
of the observations and the clock it is handed: float seconds.
"""

from __future__ import annotations

import asyncio
import math
import resource
from collections import deque

INITIAL = 8  # the unpaced pool's first allowance: small enough to see the unloaded latency
FLOOR = 2
TOLERANCE = 1.7  # a median this many times the base latency means the endpoint is queueing
HEADROOM = 1.5  # over Little's law, so that the pace binds
PACED_PERCENTILE = 90
PACED_MIN = 16
OVERLOAD_SHARE = 0.05
FD_RESERVE = 64  # descriptors kept for files, the resolver, the event loop


class Gate:
    """A semaphore whose limit can move both ways while tasks wait on it (FIFO)."""

    def __init__(self, limit: int) -> None:
        self.limit = limit
        self.used = 0
        self._waiters: deque[asyncio.Future[None]] = deque()

    async def acquire(self) -> None:
        if self.used < self.limit and not self._waiters:
            self.used += 1
            return
        waiter = asyncio.get_running_loop().create_future()
        self._waiters.append(waiter)
        try:
            await waiter  # release() has counted us in already
        except asyncio.CancelledError:
            if waiter.done() and not waiter.cancelled():
                self.release()  # woken and cancelled at once: pass the place on
            else:
                self._waiters.remove(waiter)
            raise

    def release(self) -> None:
        self.used -= 1
        self._wake()

    @property
    def waiting(self) -> int:
        return len(self._waiters)

    def set_limit(self, limit: int) -> None:
        self.limit = limit
        self._wake()

    def _wake(self) -> None:
        while self._waiters and self.used < self.limit:
            waiter = self._waiters.popleft()
            if not waiter.done():
                self.used += 1
                waiter.set_result(None)


class RecentLatency:
    """The last ``size`` latencies, for a recent percentile."""

    def __init__(self, size: int = 512) -> None:
        self._samples: deque[float] = deque(maxlen=size)

    def add(self, seconds: float) -> None:
        self._samples.append(seconds)

    def __len__(self) -> int:
        return len(self._samples)

    def percentile(self, p: float) -> float | None:
        if not self._samples:
            return None
        ordered = sorted(self._samples)
        return ordered[min(len(ordered) - 1, int(p / 100 * len(ordered)))]


def paced_allowance(rate: float, latency: float, ceiling: int) -> int:
    """Little's law with headroom: enough in flight that ``rate`` a second binds."""
    wanted = math.ceil(rate * latency * HEADROOM)
    return max(min(PACED_MIN, ceiling), min(ceiling, wanted))


class AdaptiveLimit:
    """The unpaced pool's limit, found from answers (see the module docstring)."""

    def __init__(self, ceiling: int, initial: int = INITIAL) -> None:
        self.ceiling = ceiling
        self.limit = min(initial, ceiling)
        self.base: float | None = None  # the lowest window median: the unloaded latency
        self.slow_start = True
        self._since = -math.inf  # judge only requests sent after the last change
        self._latencies: list[float] = []
        self._overloads = 0
        self._peak = 0  # most in flight since the window began

    def sent(self, in_flight: int) -> None:
        """A request went out; ``in_flight`` counts it."""
        self._peak = max(self._peak, in_flight)

    def answered(self, sent_at: float, latency: float, *, overload: bool, now: float) -> None:
        """An attempt sent at ``sent_at`` ended after ``latency``; ``overload``: 503/429/timeout."""
        if sent_at < self._since:
            return
        if overload:
            self._overloads += 1
        else:
            self._latencies.append(latency)
        if len(self._latencies) + self._overloads >= max(8, min(64, self.limit // 2)):
            self._decide(now)

    def _decide(self, now: float) -> None:
        samples = len(self._latencies) + self._overloads
        limit = self.limit
        if self._overloads >= 3 and self._overloads > OVERLOAD_SHARE * samples:
            limit = math.floor(limit * 0.75)
            self.slow_start = False
        elif self._latencies:
            ordered = sorted(self._latencies)
            median = ordered[len(ordered) // 2]
            self.base = median if self.base is None else min(self.base, median)
            target = TOLERANCE * self.base
            if median > target:
                limit = math.floor(limit * max(0.5, target / median))
                self.slow_start = False
            elif self._peak >= 0.9 * limit:  # the pool was full: it is what binds
                limit += limit if self.slow_start else max(1, math.isqrt(limit))
        self.limit = max(FLOOR, min(self.ceiling, limit))
        self._since = now
        self._latencies.clear()
        self._overloads = 0
        self._peak = 0


def descriptor_ceiling(wanted: int) -> int:
    """Raise the soft open-file limit toward the hard one; the pool that then fits.

    Each connection is a descriptor, so a pool past the limit would fail to
    connect (or hang, waiting on a connection that can never open).
    """
    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    need = wanted + FD_RESERVE
    if soft != resource.RLIM_INFINITY and soft < need:
        raised = need if hard == resource.RLIM_INFINITY else min(hard, need)
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (raised, hard))
            soft = raised
        except (OSError, ValueError):
            pass
    if soft == resource.RLIM_INFINITY:
        return wanted
    return max(1, min(wanted, soft - FD_RESERVE))


class Pool:
    """The pool's allowance as the runner sees it: a gate, and what sets its limit."""

    def __init__(self, concurrency: int | str, max_concurrency: int) -> None:
        fixed = concurrency if isinstance(concurrency, int) else None
        self.fixed = fixed is not None
        self.wanted = fixed or max_concurrency
        self.ceiling = descriptor_ceiling(self.wanted)
        self.gate = Gate(self.ceiling if fixed else min(INITIAL, self.ceiling))
        self.adaptive = AdaptiveLimit(self.ceiling)
        self.recent = RecentLatency()
        self.in_flight = 0
        self.peak = 0  # the most in flight at once
        self._first_sent: float | None = None

    def sent(self, now: float) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight)
        self.adaptive.sent(self.in_flight)
        if self._first_sent is None:
            self._first_sent = now

    def answered(self, sent_at: float, now: float, *, ok: bool, overload: bool) -> None:
        self.in_flight -= 1
        if ok:
            self.recent.add(now - sent_at)
        if ok or overload:
            self.adaptive.answered(sent_at, now - sent_at, overload=overload, now=now)

    def resize(self, rate: float | None, now: float) -> None:
        """Set the allowance: Little's law under a pace of ``rate`` a second, else adaptive."""
        if self.fixed:
            return
        if rate is None:
            self.gate.set_limit(self.adaptive.limit)
            return
        latency = self.recent.percentile(PACED_PERCENTILE) or 0.0
        if len(self.recent) < 100 and self._first_sent is not None:
            # The first answers are the fast ones; the slow are still out, at least this old.
            latency = max(latency, now - self._first_sent)
        self.gate.set_limit(paced_allowance(rate, latency, self.ceiling))

    def binding(self, paced: bool) -> str:
        """What holds the sending back now: the pool, the pace, or the endpoint's capacity."""
        if self.gate.waiting:
            if self.fixed:
                return "--concurrency"
            if self.gate.limit >= self.ceiling:
                return "pool ceiling"
            return "pool" if paced else "endpoint capacity"
        return "pace" if paced else "input"
