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
``AdaptiveLimit`` finds the endpoint's knee by probing its throughput, after
BBR's idea of probing the bottleneck: throughput grows in proportion to the
requests in flight until the endpoint is full; past that, more in flight is
only a longer queue. So it measures the answers a second each limit brings,
over windows of at least a second and four median latencies (in slow start
half a second and two, or, once a window holds 256 answers, a quarter second
and four: an endpoint answering in milliseconds), and

- quadruples the limit from ``INITIAL`` while throughput keeps up, the
  median latency stays within twice the lowest seen and Little's law
  accounts for the pool (slow start: four short windows take it to 1,024;
  a step of eight would cross a small server's knee unseen);
- when it stops keeping up, the endpoint is full: the limit goes to the
  pool that Little's law says fills it, the throughput seen times the
  lowest mean latency seen, with headroom (a batching server answers a
  full batch more slowly), and no less than the last limit that gained;
- then, every few windows, tries a fifth less (kept if it loses almost
  nothing: it sheds a queue) or a quarter more (kept only if it earns half
  its proportional gain), going on in a direction while it pays, so the
  limit follows a capacity that changes;
- cuts by a quarter when overload answers (503, 429, timeouts, dropped
  connections) are more than a few percent of a window.

Latency-based designs (TCP Vegas; Netflix's Vegas and Gradient2 limits;
Envoy's adaptive concurrency filter) compare each window's latency with a
minimum. An LLM's latency varies tenfold with the length of its answer, and
a minimum taken over noisy windows drifts low until a healthy endpoint looks
congested and the pool collapses; measured throughput is what a user wants
and, counted over many answers, it is steady. Windows are long, so one slow
answer moves nothing, and each judges answers to requests sent under the
limit it measures (it lets the answers to earlier ones pass first; and a
step's gain counts only if Little's law, rate × latency, accounts for the
pool: a queue still building up at the endpoint is not throughput).
**Under a pace against an endpoint that cannot keep up with it** (a
self-hosted server behind a gateway's limit), Little's law would follow the
latency of the endpoint's growing queue up to the ceiling. So
``AdaptiveLimit`` watches the paced pool too, judging nothing by throughput
(the pace caps it, so a larger pool never seems to gain, and a probe would
cut the pool the pace needs). It caps the pool only when two windows in a
row fall short of the pace with the pool full (with room in it, the pace
held sending, not the endpoint) *and* even their fastest answers (the p10)
take three times the lowest p10 seen, and more than the window before: a
queue that grows delays every request, while an LLM's heavy tail (long
answers) moves the median and the tail but leaves its short answers fast,
and the first answers' bias toward the fast ones lowers the baseline, never
raises a window. The cap is the knee (Little's law at the lowest mean
latency), then probed as without a pace; a full window that keeps the pace
again, unqueued, lifts it. A cap for overload answers grows by a quarter
with each full window that has few of them and no queue. The paced pool
opens from ``PACED_MIN`` by two with each answer (TCP's slow start grows
per ACK), not as the pace asks before any answer says the endpoint has
room, until sixteen answers in a row each take twice the lowest median of
as many (a queue delays every answer, a heavy tail only some); windows then
judge the pool reached, and cap it at the knee only if it brought less than
half as many answers again as the last window's and the window's fastest
answers wait too.
Once a window keeps the pace, Little's law sizes the pool.

The first request goes alone (the limiter's probe), so its latency is the
endpoint's unloaded one: without a pace, a first window whose median is twice
that is a queue (a server of one or two slots, which the first allowance
overfills), and slow start begins again from what Little's law says was not
queued (if that pool brings as many answers, the endpoint is full there:
one slot gets one request). An unpaced pool whose fastest answers and median
both wait sheds a fifth a window. When the event loop's lag (the runner's tick
measures it) is a fifth of the median latency, batchq is the bottleneck, not
the endpoint: the unpaced pool grows while throughput holds and Little's law
accounts for it (by slow start's steps, then doubling) rather than reading its
own lag as the endpoint's queue.

**When the server tells its load** (vLLM, llama.cpp, SGLang and TGI publish
how many requests run in their batch and how many wait for a place in it:
``serverload.py`` reads them), nothing needs probing: while none wait, the
pool is full and the server runs more than half of it, it doubles at each
reading; when some wait and what it runs stopped growing, the batch is full
and the pool shrinks to the share of ours that runs (only while more of ours
are out than it runs at all: the waiting may be other clients'); once the batch
is known, the pool grows back to it when the server runs fewer, and past it
by an eighth every two seconds (pools of eight or more: a llama.cpp server's
slots are fixed), in case the batch grew (shorter prompts free KV cache).
``benchmarks/capacity_sim.py`` runs all of this against simulated endpoints.
Everything here but ``Gate`` is a pure function of the observations and
the clock it is handed: float seconds.
"""

from __future__ import annotations

import asyncio
import contextlib
import math
import resource
from collections import deque
from collections.abc import AsyncIterator

INITIAL = 4  # the unpaced pool's first allowance
GROWTH = 4  # per window in slow start: 4 → 1,024 in four windows
FLOOR = 1  # a server of one slot (llama.cpp) is best served one request at a time
WINDOW = 1.0  # the shortest measurement of a limit's throughput
WINDOW_LATENCIES = 4  # and at least this many median latencies
KEEP = 0.98  # of the best throughput: a smaller pool that keeps this much is kept
SHRINK, GROW = 0.8, 1.25  # a probe's step
MIN_ANSWERS = 16
ENOUGH = 256  # answers that measure a rate well: a slow-start window holding them may end
SHORTEST = 0.25  # after this and four median latencies (so the runner's 0.2 s tick falls in it)
PROBE_EVERY = 4  # measurements of the best limit between two probes of another
SLOW_START_GAIN = 1.5  # four times the pool must bring this much more throughput
QUEUEING = 2.0  # and keep the median latency within this many times the lowest seen
HEADROOM = 1.5  # over Little's law: the pace binds, a batching endpoint fills
PACED_PERCENTILE = 90
PACED_MIN = 16
PER_ANSWER = 2  # the paced pool opens by this much an answer (TCP's slow start: one an ACK)
QUEUE_SIGN = 16  # answers in a row each twice the lowest median of as many: a queue
OVERLOAD_SHARE = 0.05
PACE_KEPT = 0.9  # of the pace: answers this fast mean the pace binds, not the endpoint
QUEUED = 3.0  # a window's fastest answers (p10) this many times the lowest seen: a queue
GROWING = 1.25  # and this many times the last window's: a queue that grows
FD_RESERVE = 64  # descriptors kept for files, the resolver, the event loop
REGROW = 2.0  # seconds between two steps up by an eighth at the server's known batch
CLIENT_BOUND = 0.2  # the event loop's lag, as a share of the median latency: batchq is the
# bottleneck, not the endpoint (a timer waits for the loop's current pass, a part of it)


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
            elif waiter in self._waiters:  # (_wake drops cancelled waiters itself)
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
    """The unpaced pool's limit, found by probing the endpoint's throughput.

    A step: set a limit, let the answers to requests sent before it pass (a
    median latency in slow start; two p90s after, when a smaller limit must
    also let the endpoint's queue drain), then count answers over a window of
    at least ``MIN_ANSWERS``, a second and four median latencies (half a
    second and two in slow start). That is the throughput at that limit; the
    step's verdict compares it with the best limit's. The rules are in the
    module docstring.
    """

    def __init__(self, ceiling: int, initial: int = INITIAL) -> None:
        self.ceiling = ceiling
        self.limit = min(initial, ceiling)
        self.best: tuple[int, float] | None = None  # (limit, its answers a second)
        self.slow_start = True
        self.base = math.inf  # the lowest median latency seen: the endpoint unloaded
        self.base_mean = math.inf  # and the lowest mean, for Little's law (heavy tails)
        self.base_fast = math.inf  # and the lowest p10: a queue delays even the fastest
        self.steps = 0
        self.windows = 0  # measurements judged
        self.pace: float | None = None  # requests a second, when a pace sizes the pool
        self.capping = False  # under a pace: the endpoint fell behind, this limit caps the pool
        self.overloaded = False  # and what showed it: overload answers (else a queue)
        self._behind = False  # the last paced window showed a growing queue, short of the pace
        self._last_fast = math.inf  # the last window's p10
        self.opening = PACED_MIN  # under a pace, the most in flight the answers have made room for
        self._opened = 0.0  # and the answers a second it brought
        self.open = False  # and it is done: a window kept the pace, or the endpoint's knee showed
        self.per_answer = True  # and it grows with each answer: no queue has shown
        self._refused = False  # overload answers cut it: only more answers open it again
        self.asked = 0  # what Little's law asks at the pace, in flight
        self._last_answers: deque[float] = deque(maxlen=QUEUE_SIGN)
        self._unqueued = math.inf  # the lowest median of QUEUE_SIGN answers in a row
        self.first: float | None = None  # the first answer's latency: the probe's, sent alone
        self.client_bound = False  # the last window's time went to our own event loop
        self._probe = 1.0  # the factor of the last probe
        self._queue = (0, math.inf)  # a first window that was a queue: its limit, answers a second
        self.told = False  # the server's gauges size the pool (``reported``): no probing
        self.batch: int | None = None  # what its batch ran when requests last waited
        self._running = 0  # what it ran at the last reading
        self._regrown = -math.inf  # when the pool last grew past the known batch
        self._last_lag = 0.0  # the event loop's lag at the runner's last tick
        self._latency = RecentLatency(256)
        self._step(-math.inf)

    def _step(self, now: float) -> None:
        """Begin measuring the current limit."""
        p90 = self._latency.percentile(90) or 0.0
        median = self._latency.percentile(50) or 0.0
        if self.slow_start or self.watching:  # a coarse measure will do
            self._from = now + median
            self._span(median)
        else:  # after a cut, the endpoint's queue drains first: its answers come fast
            self._from = now + 2 * p90
            self._until = self._soonest = self._from + max(WINDOW, WINDOW_LATENCIES * median)
        self._first = self._last = 0.0  # when the window's first and last answers came
        self._window: list[float] = []  # the window's latencies
        self._overloads = 0
        self._peak = 0  # the most in flight during the window
        self._sent = 0  # requests sent during the window
        self._lag: float | None = None  # the event loop's longest lag in the window's ticks

    def _span(self, median: float) -> None:
        """A coarse window: half a second and two ``median`` latencies; or, once it holds
        ``ENOUGH`` answers, four of them and a tick: an endpoint answering in milliseconds
        is measured in a quarter of a second, and its job of seconds is not spent ramping up."""
        self._until = self._from + max(WINDOW / 2, 2 * median)
        self._soonest = min(self._until, self._from + max(SHORTEST, WINDOW_LATENCIES * median))

    def sent(self, in_flight: int, now: float) -> None:
        """A request went out at ``now``; ``in_flight`` counts it."""
        if self._from == -math.inf:  # the first request: the first measurement begins
            self._from = now
            self._until = self._soonest = now + WINDOW
        if now >= self._from:
            self._peak = max(self._peak, in_flight)
            self._sent += 1

    def answered(self, latency: float, *, overload: bool, now: float) -> None:
        """An attempt ended at ``now`` after ``latency``; ``overload``: 503, 429, a timeout."""
        if overload:
            self._overloads += now >= self._from
            return
        self._latency.add(latency)
        if self.first is None:
            self.first = latency
            if self.pace is None:  # the probe's: the first window measures the pool after it
                self._from = now + latency
                self._span(latency)
                return
        if self.per_answer and self.watching and not self.open and self.asked > self.opening:
            self._open_per_answer(latency)
        if now < self._from:
            return
        if not self._window:
            self._first = now
        self._window.append(latency)
        self._last = now
        answers = len(self._window)
        if answers >= MIN_ANSWERS and (
            now >= self._until or (answers >= ENOUGH and now >= self._soonest)
        ):
            self._decide(now)

    def _open_per_answer(self, latency: float) -> None:
        """Open the paced pool by ``PER_ANSWER`` an answer while the opening holds it below
        the pace, until answers show a queue.

        As TCP's slow start grows its window per ACK. Fourfold steps, each a window of a
        median's wait and two medians' count (1.3-2.4 s for capacity.py's case 1), left the
        pool seconds below the pace. A queue delays every answer, a heavy tail only some
        and a full batch all by half: ``QUEUE_SIGN`` answers in a row each slower than twice
        the lowest median of as many in a row are a queue. Its answers come a queued
        latency late, when the pool has grown past it: a slot server paced far above gets
        up to ten batches (four by fourfold windows). Then the windows judge the pool
        reached (``_decide``)."""
        last = self._last_answers
        last.append(latency)
        if len(last) == QUEUE_SIGN:
            ordered = sorted(last)
            self._unqueued = min(self._unqueued, ordered[QUEUE_SIGN // 2])
            # The knee's latency: the windows, a median apart, see the pool already grown.
            self.base_mean = min(self.base_mean, sum(ordered) / QUEUE_SIGN)
            if ordered[0] > QUEUEING * self._unqueued:
                self.per_answer = False
                return
        self.opening = min(self.ceiling, self.opening + PER_ANSWER)

    def lagged(self, seconds: float) -> None:
        """The event loop ran a timer ``seconds`` late: time our own CPU took, not the endpoint."""
        self._last_lag = seconds
        self._lag = max(self._lag or 0.0, seconds)

    def reported(self, running: int, waiting: int, in_flight: int, now: float) -> None:
        """The server's gauges: ``running`` in its batch and ``waiting`` for a place in
        it (every client's), read at ``now`` with ``in_flight`` of ours out."""
        self.told = True
        grew, self._running = running > self._running, running
        if self.batch is not None and running > self.batch:
            self.batch = running  # it runs more than it did when requests last waited
        if waiting > 0:
            # Waiting alone is no full batch: a server admits a burst over a few steps
            # (vLLM's prefill budget, TGI's batch merges) while its running count grows. One
            # that stopped growing with requests waiting is full, and of ours the share that
            # runs is what it takes; but only if more of ours are out than it runs at all,
            # else the waiting may all be other clients', and shrinking to a share of their
            # queue at every reading would starve us to one.
            if not grew and 0 < running < in_flight:
                self.batch = running
                self.limit = max(FLOOR, math.floor(in_flight * running / (running + waiting)))
        elif in_flight >= self.limit and running > self.limit / 2:
            # Ours are out and the server runs more than the pool before its last doubling
            # could: the step reached it, and there is room. (Not "runs them all": ours on
            # the wire, and answers our loop has yet to handle, are not in its count; at a
            # sixth of the round trip away, or a client-bound loop, the pool never grew.)
            if self.batch is None:  # how much is not known yet
                self.limit = min(self.ceiling, self.limit * 2)
            elif running < 0.9 * self.batch:  # it ran more when requests waited: room again
                self.limit = min(self.ceiling, self.limit + self.batch - running)
            elif now - self._regrown >= REGROW:  # a larger batch? (shorter prompts, KV cache)
                self.limit = min(self.ceiling, self.limit + self.limit // 8)
                self._regrown = now

    def unreported(self) -> None:
        """The gauges are gone: probe again, from the pool they set."""
        if self.told:
            self.told, self.slow_start, self.best = False, False, None
            # From here: a paced pool is sized by Little's law, as once its opening is done
            # (not from 16 again), and no window is taken for the first, after the lone probe.
            self.opening, self.open, self.windows = self.ceiling, True, max(self.windows, 1)

    def _decide(self, now: float) -> None:
        if self.told:  # the server's gauges size the pool: a window has nothing to add
            self._step(now)
            return
        # Between the first and the last answer: a window's edges would cut batches
        # of answers (a GPU server's come together) into a noisy count.
        answers = len(self._window)
        rate = (answers - 1) / max(self._last - self._first, 1e-9)
        ordered = sorted(self._window)
        median, fast = ordered[answers // 2], ordered[answers // 10]
        mean = sum(self._window) / answers
        queued = fast > QUEUED * self.base_fast
        # Little's law accounts for the pool (rate × latency ≈ in flight): requests still out
        # far longer than those answered are a queue building up, not throughput.
        accounted = rate * mean >= self.limit / QUEUEING
        # The first request went alone, so its latency is the endpoint's unloaded one (a
        # sample of it). A first window whose median takes twice that is a queue already: a
        # server of a slot or two, which the first allowance overfills.
        started_full = self.windows == 0 and median > QUEUEING * (self.first or math.inf)
        # (A window shorter than the runner's tick may hold none: the last tick's lag, then.)
        lag = self._last_lag if self._lag is None else self._lag
        self.client_bound = lag >= CLIENT_BOUND * median
        last_fast, self._last_fast = self._last_fast, fast
        self.base = min(self.base, median)
        self.base_mean = min(self.base_mean, mean)
        self.base_fast = min(self.base_fast, fast)
        limit, best = self.limit, self.best
        answers += self._overloads
        paced = self.pace is not None
        overloaded = self._overloads >= 3 and self._overloads > OVERLOAD_SHARE * answers
        behind, self._behind = self._behind, False
        if overloaded and self.watching and not self.open:
            # While the paced pool opens, a cut narrows the opening and it goes on: a cap
            # there (a few chance 503s in a small window) grew back a quarter a long window,
            # minutes below the pace. It stops growing with each answer too: an endpoint
            # that refuses what it cannot serve (503s, dropped connections) shows no queue,
            # and the answers' growth undid each cut within a window (68% of attempts 503s).
            self.opening = limit = max(PACED_MIN, math.floor(limit * 0.75))
            self.per_answer, self._refused = False, True
        elif overloaded:
            limit, self.best, self.slow_start = math.floor(limit * 0.75), None, False
            self.capping = self.overloaded = paced
        elif self.watching:
            assert self.pace is not None
            # (Sending went on: at the tail only the slowest answers are left, and retries.)
            growing = fast > GROWING * last_fast
            if rate >= PACE_KEPT * self.pace:
                self.open, self.opening = True, self.ceiling  # the pace binds: Little's law
            elif not self.open and self.asked >= self.opening:  # the opening binds, not the pace
                if self.per_answer and self.opening < self.ceiling:
                    self._opened = rate  # it grows with each answer (``_open_per_answer``)
                elif self._peak < 0.9 * limit:
                    pass  # the pool was not full: the opening learnt nothing
                elif rate >= SLOW_START_GAIN * self._opened or (
                    fast <= QUEUEING * self._unqueued and not self._refused
                ):
                    # Short of the pace, the pool full, the answers queued or refused or the
                    # opening at the ceiling, but more in flight brought more answers, or the
                    # window's fastest show no queue (a heavy tail's slow run of answers, not
                    # an endpoint that refuses instead of queueing): room after all.
                    self._opened, self.per_answer = rate, True
                    self._last_answers.clear()
                else:  # more in flight brought no more answers: the endpoint is full
                    limit = self._knee(max(rate, self._opened), self.opening)
                    self.best, self.capping, self.overloaded = None, True, False
                    self.open, self.opening = True, self.ceiling
            elif (
                rate < PACE_KEPT * self.pace
                and self._peak >= 0.9 * limit  # (with room in the pool, the pace held sending)
                and queued
                and growing
                and self._sent >= answers / 2
            ):
                # Short of the pace, and even the fastest answers wait longer and longer: the
                # endpoint holds a growing queue, which more in flight would only lengthen.
                # Two windows in a row: the first seconds' answers, the fast ones, set a p10
                # baseline far too low for a heavy tail (0.06 s against 0.2 s), whose windows
                # then fall 10% short of the pace by chance (one in twenty), or as the pipe
                # fills; the cap at the knee that followed stalled capacity.py's case 1.
                if behind:
                    limit, self.best, self.capping = self._knee(rate, limit), None, True
                    self.overloaded = False
                self._behind = True
        elif self._peak < 0.9 * limit:
            pass  # the pool was not full (the input ran dry, or the tail): nothing learnt
        elif self.pace is not None and rate >= PACE_KEPT * self.pace and not queued:
            self.capping = self.overloaded = False  # the endpoint keeps up: the pace sizes the pool
            self.best = None
        elif self.overloaded and not queued:
            # Capped for overload answers, and this full window had few of them and no queue:
            # the endpoint takes more. Grow at once; waiting for the probes kept a cap that the
            # first seconds' chance 503s set (a few in a small window) below the pace for
            # minutes, as the pace can never be kept under it.
            limit, self.best = math.ceil(limit * GROW), None
        elif self.client_bound and not paced and (best is None or limit > best[0]):
            # Our own event loop is the bottleneck: what the endpoint could serve is out of
            # sight, and a larger pool hands the loop more answers a pass. Double it while that
            # costs no throughput; go back to the best pool when it does, and probe from there
            # as usual (measured again and again, a lucky window's rate does not pin it there).
            # In slow start, by its steps: a 1 ms endpoint's job lasts seconds. Only while
            # Little's law accounts for the pool, as slow start asks: a queue still building
            # up is no throughput, in the endpoint or in our loop. (Slow start's step to 1,024
            # on a 256-slot server opened 768 connections in one pass of the loop, 0.3 s: read
            # as client-bound, the step was kept, then shed by a fifth a 7 s window: p50 4.2x.)
            if best is None or (rate >= KEEP * best[1] and accounted):
                self.best = (limit, max(rate, best[1] if best else 0.0))
                limit *= GROWTH if self.slow_start else 2
                self.slow_start = self.slow_start and limit < self.ceiling
            else:
                limit, self.slow_start = best[0], False
        elif started_full and not paced:
            # Slow start again from the pool that Little's law says was not queued: if the
            # probe's was only a fast answer of a heavy tail, that costs a window, no more.
            assert self.first is not None
            self._queue = (limit, rate)
            limit, self.best = _unqueued(limit, self.first, median), None
        elif (
            not paced
            and not self.slow_start
            and not self.client_bound  # (our own loop's lag, not the endpoint's queue)
            and queued
            and median > QUEUEING * self.base
        ):
            # Even the fastest answers wait, and the median with them (a heavy tail moves only
            # the median): the endpoint holds a queue (its capacity fell, or a probe
            # overshot), which a smaller pool sheds at no cost in throughput. A fifth less
            # each window while it shows: the lowest latencies seen are estimates, biased low.
            limit, self.best = min(limit - 1, math.ceil(limit * SHRINK)), None
        elif best is None and self.slow_start and KEEP * self._queue[1] <= rate:
            # Slow start again below a first window that was a queue, and this smaller pool
            # brings as many answers as its larger one did: the endpoint is full already,
            # and the step up would only measure that queue again (one slot's 4 in flight).
            # (Not when it merely brings more than a step up must gain: from a heavy tail's
            # noisy windows of 16 answers, that ended slow start on a large server.)
            queue_limit, queue_rate = self._queue
            limit = max(limit, self._knee(max(rate, queue_rate), queue_limit))
            self.slow_start = False
        elif best is None:
            self.best = (limit, rate)
            limit = limit * GROWTH if self.slow_start else limit
        elif self.slow_start:
            # A gain counts only if the answers did not slow down with it, and if Little's
            # law accounts for the pool.
            if rate >= SLOW_START_GAIN * best[1] and median <= QUEUEING * self.base and accounted:
                self.best = (limit, rate)
                self.slow_start = limit < self.ceiling  # at the ceiling, and no queue: done
                limit *= GROWTH
            else:  # full: the knee lies below this limit, and not below the last that gained
                limit = max(best[0], self._knee(max(rate, best[1]), limit))
                self.best, self.slow_start = None, False
        elif best[0] == limit:
            self.best = (limit, (best[1] + rate) / 2)  # the best limit, measured again
            self.steps += 1
            if self.steps % PROBE_EVERY == 0:  # less first: it sheds a queue
                self._probe = SHRINK if self.steps // PROBE_EVERY % 2 else GROW
                limit = _probed(limit, self._probe)
        elif rate >= best[1] * (1 + (limit / best[0] - 1) / 2 if limit > best[0] else KEEP):
            # A larger pool must earn half its proportional gain, or it is only a
            # longer queue; a smaller one is kept if it loses almost nothing. Either
            # way the next step goes on in the same direction.
            self.best = (limit, rate)
            limit = _probed(limit, self._probe)
        else:
            limit = best[0]
        self.limit = max(FLOOR, min(self.ceiling, limit))
        self.windows += 1
        self._step(now)

    @property
    def watching(self) -> bool:
        """Under a pace, and not capping it."""
        return self.pace is not None and not self.capping

    def under_pace(self, rate: float | None, allowance: int) -> int:
        """The allowance under a pace of ``rate`` a second (None: none) for which Little's
        law wants ``allowance``: that, until the endpoint falls behind the pace."""
        self.pace, self.asked = rate, allowance
        if self.told:  # the server's gauges cap what the pace asks for
            return min(allowance, self.limit)
        if not self.capping:
            self.limit, self.slow_start = min(allowance, self.opening), False
        return min(allowance, self.limit)

    def _knee(self, capacity: float, high: int) -> int:
        """Little's law at the unloaded latency: the pool that fills an endpoint serving
        ``capacity`` a second, with headroom for a batch's slower answers."""
        return min(high, _whole(capacity * self.base_mean * HEADROOM))


def _unqueued(limit: int, unloaded: float, queued: float) -> int:
    """The pool at which the fastest answers, ``queued`` seconds at ``limit`` in flight, would
    take ``unloaded`` (Little's law), with headroom for a batch's slower answers."""
    return _whole(limit * unloaded / queued * HEADROOM)


def _whole(pool: float) -> int:
    """The pool, rounded down: on a server of a slot or two a request too many doubles the
    latency, and one too few costs only the round trip its slot idles between answers.
    (One slot asks 1.5, Little's law with headroom; the first request's connection made
    that 1.55 in one real run of two, and the nearest pool, 2, kept one waiting for good.)
    """
    return math.floor(pool)


def _probed(limit: int, factor: float) -> int:
    """The limit a probe by ``factor`` tries: at least one request more or less."""
    if factor < 1:
        return min(limit - 1, math.ceil(limit * factor))
    return max(limit + 1, math.ceil(limit * factor))


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
        self.copies = 0  # the tail hedge's, holding a place (``copy_slot``)
        self.peak = 0  # the most in flight at once
        self._first_sent: float | None = None
        self._allowance = self.ceiling  # what Little's law asked at the last resize, under a pace

    def sent(self, now: float) -> None:
        self.in_flight += 1
        self.peak = max(self.peak, self.in_flight + self.copies)
        if self.fixed:  # nothing to learn: keep the request path as short as it was
            return
        self.adaptive.sent(self.in_flight, now)
        if self._first_sent is None:
            self._first_sent = now

    def answered(self, sent_at: float, now: float, *, ok: bool, overload: bool) -> None:
        self.in_flight -= 1
        if self.fixed:
            return
        if ok:
            self.recent.add(now - sent_at)
        if ok or overload:
            self.adaptive.answered(now - sent_at, overload=overload, now=now)

    def resize(self, rate: float | None, now: float) -> None:
        """Set the allowance: Little's law under a pace of ``rate`` a second, else adaptive."""
        if self.fixed:
            return
        if rate is None:
            self.adaptive.pace = None
            self.gate.set_limit(self.adaptive.limit)
            return
        latency = self.recent.percentile(PACED_PERCENTILE) or 0.0
        if len(self.recent) < 100 and self._first_sent is not None:
            # The first answers are the fast ones; the slow are still out, at least this old.
            latency = max(latency, now - self._first_sent)
        self._allowance = paced_allowance(rate, latency, self.ceiling)
        self.gate.set_limit(self.adaptive.under_pace(rate, self._allowance))

    def reported(self, running: int, waiting: int, now: float) -> None:
        """The server's gauges; the gate follows at once."""
        if self.fixed:
            return
        self.adaptive.reported(running, waiting, self.in_flight, now)
        if self.adaptive.pace is None:
            self.gate.set_limit(self.adaptive.limit)
        else:  # the gauges cap what the pace asks for at once, not at the next resize
            self.gate.set_limit(min(self._allowance, self.adaptive.limit))

    def unreported(self) -> None:
        """The gauges are gone: the pool is probed again."""
        if not self.fixed:
            self.adaptive.unreported()

    def lagged(self, seconds: float) -> None:
        """The event loop ran a timer ``seconds`` late (the runner's tick measures it)."""
        if not self.fixed:
            self.adaptive.lagged(seconds)

    @contextlib.asynccontextmanager
    async def copy_slot(self) -> AsyncIterator[None]:
        """A place for a hedge's copy while it is out: the allowance bounds every request
        in flight, copies too (``--concurrency 1`` is one: a copy could only queue behind
        its first on a server of one slot)."""
        await self.gate.acquire()
        self.copies += 1
        self.peak = max(self.peak, self.in_flight + self.copies)
        try:
            yield
        finally:
            self.copies -= 1
            self.gate.release()

    def all_out(self) -> bool:
        """No request waits for a place in the pool, or holds one but has not gone out (it
        waits for its turn in the pace, or for the budget). (A copy counts as out.)"""
        return not self.gate.waiting and self.gate.used == self.in_flight + self.copies

    def binding(self, paced: bool) -> str:
        """What holds the sending back now: the pool, the pace, or the endpoint's capacity."""
        # Slots are held by requests waiting for their turn in the pace too (and for a
        # moment by those between two attempts): the pool binds when nearly every slot
        # is out at the endpoint.
        if self.in_flight >= 0.9 * self.gate.limit:
            if self.fixed:
                return "--concurrency"
            if self.gate.limit >= self.ceiling:
                return "pool ceiling"
            return "pool" if paced and not self.adaptive.capping else "endpoint capacity"
        return "pace" if paced else "input"
