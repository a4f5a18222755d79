"""The `--concurrency auto` controller against simulated endpoints: a matrix of shapes.

A discrete-event simulation on a fake clock drives the real controller
(``batchq.live.concurrency.Pool``: its gate, ``sent``/``answered`` and the
runner's ``resize`` every 0.2 s) and the limiter's real ``Pace``, against an
endpoint of ``slots`` served at once (a full batch answers half as slowly
again), an optional waiting room (503 beyond it, retried a second later),
latency fixed or lognormal, a pace given (``--rpm``) or stated by the first
answer's headers, capacity that changes halfway through the job, a server some
milliseconds away, load gauges published as vLLM's ``/metrics`` does (read as
``serverload.follow`` reads them, and handed to ``Pool.reported``); and a
client whose event loop costs CPU per answer (so a 1 ms endpoint makes batchq
the bottleneck, as it is on a real machine).

Each cell runs the job with ``auto`` and with fixed pools around the
endpoint's capacity, and reports the share of the best fixed pool's
throughput (requests / makespan) and the p50 latency against an unloaded
request's. ``python benchmarks/capacity_sim.py`` (``make bench-capacity-sim``)
prints the matrix; tests/test_capacity_sim.py asserts its floor on a subset.
"""

from __future__ import annotations

import argparse
import heapq
import math
import random
import statistics
import sys
import time
from collections import deque
from collections.abc import Callable
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Generic, TypeVar

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchq.live.concurrency import Pool
from batchq.live.limiter import BURST_SECONDS, Pace
from batchq.live.serverload import OPENING, POLL

TICK = 0.2  # the runner's COMMIT_INTERVAL: Pool.resize runs this often
PROBE_SECONDS = 1.0  # the first request goes alone this long at most (the limiter's)
BATCHING = 0.5  # a full batch answers this much more slowly than a lone request
RETRY_AFTER = 1.0  # a 503 is sent again this long after
LOOP_COST = 0.3e-3  # CPU seconds of one event-loop pass (epoll, the tick's bookkeeping)
ANSWER_COST = 0.15e-3  # and of one answer (parse, checkpoint, write, send the next)
CEILING = 1024  # --max-concurrency's default
SLOTS = (1, 2, 4, 16, 64, 256, 1024)
GOAL = (0.9, 2.0)  # every cell: share of the best fixed pool, p50 × unloaded
GOOD = (0.95, 1.5)  # most cells

T = TypeVar("T")  # what a simulated request or answer carries


@dataclass(frozen=True)
class Shape:
    """An endpoint's shape and the job sent to it; ``slots`` is the matrix's column."""

    name: str
    latency: float  # an unloaded request's (the median, if heavy-tailed), seconds
    sigma: float = 0.0  # lognormal σ of the latency; 0: fixed
    queue: float | None = None  # waiting room, as a multiple of the slots; full: 503
    change: float = 1.0  # the slots are multiplied by this halfway through the job
    pace: float | None = None  # --rpm, as a multiple of the endpoint's capacity
    stated: bool = False  # the pace is learnt from the first answer's headers
    requests: int | None = None  # the job; None: a minute of the endpoint at capacity
    refused: float = 0.0  # this share of requests is answered 503 at once, whatever the load
    gauges: bool = False  # the endpoint publishes its load (running, waiting), as vLLM does
    wire: float = 0.0  # seconds between client and server, each way (0: the same machine)


@dataclass(frozen=True)
class Reading:
    """The endpoint's gauges at one moment: requests in its slots, and queued for one."""

    running: int
    waiting: int


@dataclass
class Outcome:
    requests: int
    makespan: float
    latencies: list[float] = field(default_factory=list)
    retries: int = 0
    peak: int = 0

    @property
    def throughput(self) -> float:
        return self.requests / self.makespan

    @property
    def p50(self) -> float:
        ordered = sorted(self.latencies)
        return ordered[len(ordered) // 2]


def capacity(slots: int, shape: Shape) -> float:
    """Answers a second with every slot busy (the lognormal's mean, not its median)."""
    mean = shape.latency * math.exp(shape.sigma**2 / 2)
    return slots / (mean * (1 + BATCHING * (slots - 1) / slots))


def job_size(slots: int, shape: Shape) -> int:
    if shape.requests is not None:
        return shape.requests
    rate = capacity(slots, shape)
    if shape.pace is not None:
        rate = min(rate, shape.pace * capacity(slots, shape))
    # A minute of the endpoint at capacity (a large job), and ~30 rounds of it at least.
    return int(min(40_000, max(1_000, 30 * slots, 60 * rate)))


def unloaded(shape: Shape) -> float:
    """A lone request's latency as the client sees it: the endpoint's, the way there and back,
    and one loop pass."""
    return shape.latency + 2 * shape.wire + LOOP_COST + ANSWER_COST


class Endpoint(Generic[T]):
    """``slots`` served at once (a full batch answers ``BATCHING`` more slowly), the rest
    queued FIFO or, past the waiting room, refused with a 503; ``push(at, kind, ticket)``
    schedules a "served" or "refused" answer to the request ``ticket``."""

    def __init__(
        self, slots: int, shape: Shape, rng: random.Random, push: Callable[[float, str, T], None]
    ) -> None:
        self.shape, self.rng, self.push = shape, rng, push
        self.room = slots  # the slots now (a change of capacity moves it)
        self.busy = 0
        self.waiting: deque[T] = deque()

    def arrive(self, ticket: T, now: float) -> None:
        shape = self.shape
        if shape.refused and self.rng.random() < shape.refused:
            self.push(now + 0.001, "refused", ticket)
        elif self.busy < self.room:
            self._serve(ticket, now)
        elif shape.queue is not None and len(self.waiting) >= shape.queue * self.room:
            self.push(now + 0.001, "refused", ticket)
        else:
            self.waiting.append(ticket)

    def load(self) -> Reading:
        """Its gauges now (answers on their way back are no longer counted)."""
        return Reading(self.busy, len(self.waiting))

    def served(self, now: float) -> None:
        """A "served" answer went: its slot takes the next queued request."""
        self.busy -= 1
        while self.waiting and self.busy < self.room:
            self._serve(self.waiting.popleft(), now)

    def _serve(self, ticket: T, now: float) -> None:
        self.busy += 1
        shape, draw = self.shape, self.shape.latency
        if shape.sigma:
            draw = self.rng.lognormvariate(math.log(shape.latency), shape.sigma)
        self.push(now + draw * (1 + BATCHING * (self.busy - 1) / self.room), "served", ticket)


class ClientLoop(Generic[T]):
    """The client's event loop: it handles every answer in at once in one pass, which costs
    ``LOOP_COST`` and ``ANSWER_COST`` an answer; ``push(at, "handled", None)`` schedules the
    pass's end, when the caller ``take``s its answers and ``start``s the next pass."""

    def __init__(self, push: Callable[[float, str, None], None]) -> None:
        self.push = push
        self.inbox: list[T] = []  # answers the loop has yet to handle
        self.passing: list[T] = []  # those it handles in its current pass
        self.busy_until = 0.0

    def arrived(self, answer: T, now: float) -> None:
        self.inbox.append(answer)
        self.start(now)

    def start(self, now: float) -> None:
        if not self.inbox or self.passing:
            return
        self.passing.extend(self.inbox)
        self.inbox.clear()
        self.busy_until = now + LOOP_COST + ANSWER_COST * len(self.passing)
        self.push(self.busy_until, "handled", None)

    def take(self) -> list[T]:
        """The pass is over: its answers."""
        handled, self.passing = self.passing, []
        return handled

    def lag(self, now: float) -> float:
        """How late a timer due ``now`` runs: the current pass must end first."""
        return self.busy_until - now if self.passing else 0.0


def simulate(
    slots: int, shape: Shape, concurrency: int | str, seed: int = 1, trace: list[str] | None = None
) -> Outcome:
    """Run the job through a ``Pool(concurrency)`` against the endpoint, on a fake clock."""
    rng = random.Random(seed)
    total = job_size(slots, shape)
    pool = Pool(concurrency, CEILING)
    rate = None if shape.pace is None else shape.pace * capacity(slots, shape)
    pace = None if rate is None else Pace(rate)
    known = rate is not None and not shape.stated  # a pace the client is told up front
    now, seq = 0.0, 0
    events: list[tuple[float, int, str, float]] = []  # (at, seq, kind, a request's sent-at)
    ready, done, sent_total = total, 0, 0
    probing = True  # the first request goes alone until answered, or a second
    answered = False
    out = Outcome(total, 0.0)

    def push(at: float, kind: str, sent_at: float | None = None) -> None:
        nonlocal seq
        seq += 1
        heapq.heappush(events, (at, seq, kind, sent_at or 0.0))

    endpoint = Endpoint(slots, shape, rng, push)
    # Answers (a request's sent-at, served or refused), and the gauges' readings: each is an
    # HTTP answer the loop handles in its turn, at an answer's cost (serverload.parse takes
    # ~0.13 ms on an 86 KB vLLM-like page).
    client: ClientLoop[tuple[float, bool] | Reading] = ClientLoop(push)

    def arrive(sent_at: float) -> None:
        pool.sent(sent_at)
        if shape.wire:
            push(now + shape.wire, "reach", sent_at)
        else:
            endpoint.arrive(sent_at, now)

    def fill() -> None:
        nonlocal ready, sent_total
        gate = pool.gate
        while ready and gate.used < gate.limit:
            if probing and sent_total:
                return
            gate.used += 1
            ready -= 1
            sent_total += 1
            at = now if pace is None or not known else max(now, pace.reserve(1, now))
            at = max(now, at - BURST_SECONDS)
            if at > now:
                push(at, "send")
            else:
                arrive(now)
        out.peak = max(out.peak, pool.in_flight)

    def handled() -> None:
        nonlocal done, probing, known, answered
        for answer in client.take():
            if isinstance(answer, Reading):
                gauged(answer)
                continue
            sent_at, ok = answer
            pool.answered(sent_at, now, ok=ok, overload=not ok)
            pool.gate.used -= 1
            if ok:
                done += 1
                out.latencies.append(now - sent_at)
            else:
                out.retries += 1
                push(now + RETRY_AFTER, "retry")
            if not answered:  # its headers state the pace, if the endpoint states one
                probing, answered, known = False, True, rate is not None
        fill()
        client.start(now)

    def gauged(reading: Reading) -> None:
        """``serverload.follow``: hand the reading to the pool, sleep, read again."""
        pool.reported(reading.running, reading.waiting, now)
        push(now + (OPENING if pool.adaptive.batch is None else POLL), "read")

    readings: deque[Reading] = deque()  # on their way back to the client
    if shape.gauges and not pool.fixed:  # (the runner follows the gauges for auto pools only)
        push(0.0, "read")  # the first reading at the start

    push(0.0, "tick")
    changed = False
    while done < total:
        now, _, kind, sent_at = heapq.heappop(events)
        if kind == "served" or kind == "refused":
            if kind == "served":
                endpoint.served(now)
            if shape.wire:
                push(now + shape.wire, f"{kind}, back", sent_at)
            else:
                client.arrived((sent_at, kind == "served"), now)
        elif kind == "served, back" or kind == "refused, back":
            client.arrived((sent_at, kind == "served, back"), now)
        elif kind == "reach":
            endpoint.arrive(sent_at, now)
        elif kind == "handled":
            handled()
            if not changed and shape.change != 1.0 and done >= total // 2:
                changed, endpoint.room = True, max(1, round(slots * shape.change))
        elif kind == "send":
            arrive(now)
        elif kind == "read":
            # A timer of the client's loop: the GET goes when the current pass ends, and the
            # server's answer is the gauges when it gets there, as a request would.
            push(now + client.lag(now) + shape.wire, "gauge")
        elif kind == "gauge":
            if shape.wire:
                readings.append(endpoint.load())
                push(now + shape.wire, "gauge, back")
            else:
                client.arrived(endpoint.load(), now)
        elif kind == "gauge, back":
            client.arrived(readings.popleft(), now)
        elif kind == "retry":
            ready += 1
            fill()
        elif kind == "tick":
            if probing and now >= PROBE_SECONDS:
                probing = False
            # The tick is a timer of the client's loop: it runs when the current pass ends.
            pool.lagged(client.lag(now))
            pool.resize(rate if known else None, now)
            if trace is not None:  # what the controller did, for reading a cell
                a = pool.adaptive
                trace.append(
                    f"{now:7.1f} s: allowance {pool.gate.limit:5,} in flight {pool.in_flight:5,} "
                    f"answered {done:6,} slow start {a.slow_start:d} capping {a.capping:d} "
                    f"client-bound {a.client_bound:d} opening {a.opening:,}"
                    + (f" told {a.told:d} batch {a.batch}" if shape.gauges else "")
                )
            fill()
            push(now + TICK, "tick")
    out.makespan = now
    return out


def fixed_pools(slots: int, shape: Shape) -> list[int]:
    """The fixed pools to beat: powers of two around what the endpoint can hold."""
    hold = slots * max(1.0, shape.change)
    if shape.pace is not None or shape.sigma:
        hold = max(hold, min(CEILING, capacity(slots, shape) * shape.latency * 8))
    low, high = max(1, hold / 2), min(CEILING, max(4 * hold, 64))
    return [2**k for k in range(11) if low <= 2**k <= high]


@dataclass
class Run:
    """One seed of a cell: auto's outcome, and the best fixed pool's."""

    auto: Outcome
    best: int
    best_outcome: Outcome


@dataclass
class Cell:
    """A shape at a slot count, run with a few seeds: medians, and their spread."""

    slots: int
    shape: Shape
    runs: list[Run]
    cpu: float

    def _reference(self, run: Run) -> float:
        """The best fixed pool's throughput; under a pace, no more than the pace (a fixed pool
        sends unpaced until a stated pace is known, which a real endpoint would refuse)."""
        best = run.best_outcome.throughput
        if self.shape.pace is None:
            return best
        return min(best, self.shape.pace * capacity(self.slots, self.shape))

    @property
    def shares(self) -> list[float]:
        return sorted(r.auto.throughput / self._reference(r) for r in self.runs)

    @property
    def slowdowns(self) -> list[float]:
        return sorted(r.auto.p50 / unloaded(self.shape) for r in self.runs)

    @property
    def share(self) -> float:
        return statistics.median(self.shares)

    @property
    def slowdown(self) -> float:
        return statistics.median(self.slowdowns)

    @property
    def verdict(self) -> str:
        if self.share >= GOOD[0] and self.slowdown <= GOOD[1]:
            return "good"
        return "ok" if self.share >= GOAL[0] and self.slowdown <= GOAL[1] else "MISS"


def cell(slots: int, shape: Shape, seeds: int = 1) -> Cell:
    started = time.process_time()
    runs = []
    for seed in range(1, seeds + 1):
        auto = simulate(slots, shape, "auto", seed)
        fixed = {n: simulate(slots, shape, n, seed) for n in fixed_pools(slots, shape)}
        best = max(fixed, key=lambda n: fixed[n].throughput)
        runs.append(Run(auto, best, fixed[best]))
    return Cell(slots, shape, runs, time.process_time() - started)


LOGNORMAL = math.log(10 / 0.8) / 2.326  # p50 0.8 s, p99 10 s: capacity.py's case 1

SHAPES: tuple[Shape, ...] = (
    Shape("fixed 1 ms", 0.001),
    Shape("fixed 0.2 s", 0.2),
    Shape("fixed 2 s", 2.0),
    Shape("fixed 10 s", 10.0),
    Shape("lognormal 0.8 s σ1.09", 0.8, sigma=LOGNORMAL),
    Shape("lognormal 0.05 s σ0.5", 0.05, sigma=0.5),
    Shape("0.2 s, queue = slots, 503 past it", 0.2, queue=1.0),
    Shape("0.2 s, capacity halves mid-run", 0.2, change=0.5),
    Shape("0.2 s, capacity doubles mid-run", 0.2, change=2.0),
    Shape("0.2 s, --rpm at 0.5× capacity", 0.2, pace=0.5),
    Shape("0.2 s, --rpm at 3× capacity", 0.2, pace=3.0),
    Shape("lognormal 0.8 s, stated pace 0.5×", 0.8, sigma=LOGNORMAL, pace=0.5, stated=True),
    # capacity.py's case 1: 10,000 RPM far below what the endpoint serves, 1% 503s
    Shape("lognormal 0.8 s, --rpm at 0.1×, 1% 503s", 0.8, sigma=LOGNORMAL, pace=0.1, refused=0.01),
    Shape("2 s, stated pace at 3× capacity", 2.0, pace=3.0, stated=True),
    Shape("short job: 120 × 0.2 s", 0.2, requests=120),
    Shape("short job: 120 × 2 s", 2.0, requests=120),
    # A server 20 ms away: a sixth of a request's round trip is on the wire, where the
    # server's gauges do not count it.
    Shape("0.2 s, 20 ms away", 0.2, wire=0.02),
)
# Every shape again, its endpoint publishing its load as vLLM does at /metrics.
SHAPES += tuple(replace(s, name=f"{s.name} (gauges)", gauges=True) for s in SHAPES)


def matrix(
    shapes: tuple[Shape, ...] = SHAPES, slots: tuple[int, ...] = SLOTS, seeds: int = 1
) -> list[Cell]:
    return [cell(n, shape, seeds) for shape in shapes for n in slots]


def table(cells: list[Cell]) -> str:
    """Rows: shapes; columns: slots; each cell: share of best fixed / p50 × unloaded."""
    columns = sorted({c.slots for c in cells})
    rows: dict[str, dict[int, Cell]] = {}
    for c in cells:
        rows.setdefault(c.shape.name, {})[c.slots] = c
    head = "| endpoint \\ slots | " + " | ".join(f"{n:,}" for n in columns) + " |"
    lines = [head, "| --- |" + " ---: |" * len(columns)]
    for name, by_slots in rows.items():
        shown = []
        for n in columns:
            c = by_slots.get(n)
            if c is None:
                shown.append("")
                continue
            mark = "" if c.verdict == "good" else " ✗" if c.verdict == "MISS" else " ~"
            shown.append(f"{c.share:.2f} / {c.slowdown:.1f}×{mark}")
        lines.append(f"| {name} | " + " | ".join(shown) + " |")
    return "\n".join(lines)


def details(cells: list[Cell]) -> str:
    lines = [
        "| endpoint | slots | requests | share of best fixed (spread) | p50 × unloaded (spread) "
        "| best fixed pool | its p50 × unloaded | auto's peak | auto's retries | CPU s |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for c in cells:
        first, unloaded_p50 = c.runs[0], unloaded(c.shape)
        lines.append(
            f"| {c.shape.name} | {c.slots:,} | {first.auto.requests:,} "
            f"| {c.share:.2f} ({c.shares[0]:.2f}–{c.shares[-1]:.2f}) "
            f"| {c.slowdown:.2f} ({c.slowdowns[0]:.2f}–{c.slowdowns[-1]:.2f}) "
            f"| {first.best:,} | {first.best_outcome.p50 / unloaded_p50:.2f} "
            f"| {first.auto.peak:,} | {first.auto.retries:,} | {c.cpu:.2f} |"
        )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", help="only the shapes whose name contains this")
    parser.add_argument("--slots", help="comma-separated slot counts (default: all)")
    parser.add_argument("--details", action="store_true", help="a line per cell too")
    parser.add_argument("--seeds", type=int, default=3, help="runs per cell (medians)")
    args = parser.parse_args()
    shapes = tuple(s for s in SHAPES if not args.rows or args.rows in s.name)
    slots = tuple(int(n) for n in args.slots.split(",")) if args.slots else SLOTS
    started = time.process_time()
    cells = matrix(shapes, slots, args.seeds)
    print(table(cells))
    if args.details:
        print()
        print(details(cells))
    verdicts = [c.verdict for c in cells]
    print(
        f"\n{len(cells)} cells: {verdicts.count('good')} good (≥ {GOOD[0]}, ≤ {GOOD[1]}×), "
        f"{verdicts.count('ok')} ok (≥ {GOAL[0]}, ≤ {GOAL[1]}×), {verdicts.count('MISS')} miss; "
        f"medians of {args.seeds} seeds; {time.process_time() - started:.1f} s of CPU"
    )


if __name__ == "__main__":
    main()
