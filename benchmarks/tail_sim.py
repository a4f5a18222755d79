"""The tail hedge against a simulated heavy tail: how long a job runs after its last send.

A discrete-event simulation on a fake clock drives the real ``Hedger.pick`` (the
runner calls it every 0.2 s once every request has gone out) and its latency
histogram, with capacity.py case 1's endpoint: 20,000 requests sent on the pace
of ``--rpm 10000`` (2% under it, as ``limiter.MARGIN`` paces), latency lognormal
of p50 0.8 s and p99 10 s (``--p99``), 1% 500s and 1% 503s after their latency.
As in ``Hedger.send``, the first success among an attempt's sends is the line's;
a 5xx ends the attempt once every send of it has failed, and the line is sent
again after the retry policy's backoff. A copy takes its turn at once (the pace
has room once nothing is left to send) and a latency of its own, drawn
independently, or (``--same-length F``) with that share F of its log-variance
the request's own: an endpoint whose latency follows the answer's length makes
copies as slow as the first (F = 1: the same latency, and later). The endpoint
has no limit of its own: copies add no load.

Each seed runs with no hedge, with one copy of a request out longer than the p95
(the rule before; the other rules as batchq's today), with batchq's rule
(``COPIES`` copies, each once the one before is out longer than the ``LATE``
percentile, until copies rarely win: ``FUTILE_SHARE``) and with that rule
copying whether copies win or not; the table gives the tail (seconds from the
last new request to the last answer) over the seeds, the copies sent (median, a
share of the requests) and the share of those that won::

    python benchmarks/tail_sim.py [--seeds N] [--lines N] [--p99 S] [--same-length F]
"""

from __future__ import annotations

import argparse
import heapq
import itertools
import math
import random
import statistics
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from batchq.live import hedge
from batchq.live.hedge import Hedger, _Flight
from batchq.live.limiter import MARGIN
from batchq.live.retry import RetryPolicy
from batchq.stats import LatencyHistogram

TICK = 0.2  # the runner's COMMIT_INTERVAL: Hedger.choose runs this often
RPM = 10_000
P50 = 0.8
RATE_500 = RATE_503 = 0.01
# A tail longer than this puts case 1 past 1.15x its 120 s floor: its sends end at 1.057x
# (the pace's margin, the retries, the start; makespan.py, medians of 3 at 063ceef).
OVER = (1.15 - 1.057) * 120


@dataclass(eq=False)
class Line:
    """One request: its attempt in flight and that attempt's sends not yet answered, and
    whether it is done."""

    flight: _Flight | None = None
    length: float | None = None  # the answer's own part of its latency (normal, --same-length)
    attempts: int = 0
    out: int = 0
    done: bool = False


@dataclass
class Sim:
    """One job on a fake clock: requests, their attempts and copies, and the hedger."""

    rng: random.Random
    hedger: Hedger | None
    p99: float
    same: float = 0.0  # the share of a latency's log-variance that the request sets
    latencies: LatencyHistogram = field(default_factory=LatencyHistogram)
    events: list[tuple[float, int, str, Line, _Flight | None, int]] = field(default_factory=list)
    order: Iterator[int] = field(default_factory=itertools.count)
    lines: dict[_Flight, Line] = field(default_factory=dict)  # whose attempt a flight is
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    last_answer: float = 0.0

    def at(self, when: float, what: str, line: Line, flight: _Flight | None = None) -> None:
        draw = self.rng.random()
        status = 500 if draw < RATE_500 else 503 if draw < RATE_500 + RATE_503 else 200
        heapq.heappush(self.events, (when, next(self.order), what, line, flight, status))

    def latency(self, line: Line) -> float:
        sigma = math.log(self.p99 / P50) / 2.3263
        if not self.same:  # (drawn as before the option: the same seeds, the same jobs)
            return self.rng.lognormvariate(math.log(P50), sigma)
        if line.length is None:
            line.length = self.rng.gauss(0.0, 1.0)
        own = math.sqrt(self.same) * line.length
        return P50 * math.exp(sigma * (own + math.sqrt(1 - self.same) * self.rng.gauss(0.0, 1.0)))

    def send(self, line: Line, now: float) -> None:
        """An attempt goes, where the hedger sees it."""
        line.attempts += 1
        line.flight = flight = _Flight(now, self.latencies, None, None, None, None)  # type: ignore[arg-type]
        self.lines[flight] = line
        if self.hedger is not None:
            self.hedger._flights.add(flight)
        line.out = 1
        self.at(now + self.latency(line), "first", line, flight)

    def answer(self, line: Line, flight: _Flight, what: str, status: int, now: float) -> None:
        """A send of an attempt answered (``what``: "first" or "copy"). As in
        ``Hedger.send``, a success ends the attempt and the line; a failure ends it only
        once every send of it has failed, and the line is sent again after the retry
        policy's backoff. The first's failure stops its copies being chosen."""
        if flight is not line.flight or line.done:
            return  # the attempt ended: this send was cancelled
        line.out -= 1
        if status != 200:
            flight.answered = flight.answered or what == "first"
            if line.out:
                return  # a send that went may still succeed
        line.flight = None
        if self.hedger is not None:
            self.hedger._flights.discard(flight)
            self.hedger.answered(now, status)
        if status != 200:
            self.at(now + self.policy.backoff(line.attempts, self.rng.random), "send", line)
            return
        if self.hedger is not None:  # as Hedger._won counts them
            by_copy = what == "copy"
            self.hedger.won += by_copy
            self.hedger.lost += flight.sent - by_copy
        line.done, self.last_answer = True, now
        self.latencies.add(now - flight.started)

    def copy(self, flight: _Flight, now: float) -> None:
        """``Hedger.choose``'s copy of ``flight``, its turn taken at once."""
        assert self.hedger is not None
        flight.sent += 1
        flight.copied = now
        self.hedger.sent += 1
        line = self.lines[flight]
        line.out += 1
        self.at(now + self.latency(line), "copy", line, flight)

    def run(self, lines: int) -> float:
        """The job: seconds from its last new request to its last answer."""
        rate = RPM * MARGIN / 60
        last_send = (lines - 1) / rate
        for n in range(lines):
            self.at(n / rate, "send", Line())
        tick = last_send  # the runner picks stragglers every TICK once nothing is left to send
        while self.events:
            when, _, what, line, flight, status = heapq.heappop(self.events)
            while self.hedger is not None and tick < when:
                for straggler in self.hedger.pick(tick):
                    self.copy(straggler, tick)
                tick += TICK
            if what == "send":
                self.send(line, when)
            else:
                assert flight is not None
                self.answer(line, flight, what, status, when)
        return self.last_answer - last_send


NEVER = 10**9  # copies raced before futility is judged: never
RULES = (  # name, copies of a request at most, the percentile a straggler is out longer
    # than, copies raced before their wins are judged
    ("none", 0, 0, NEVER),
    ("one copy, at the p95 (before)", 1, 95, NEVER),
    (f"{hedge.COPIES} copies, at the p{hedge.LATE} (batchq)", hedge.COPIES, hedge.LATE, None),
    ("the same, whether copies win or not", hedge.COPIES, hedge.LATE, NEVER),
)


@dataclass
class Run:
    tail: float
    sent: int  # copies
    won: float  # the share of the copies that raced which won (nan: none raced)


def tail(
    seed: int, lines: int, p99: float, same: float, copies: int, late: int, futile: int | None
) -> Run:
    """One job, hedged by that rule (no copies: no hedge; ``futile`` None: batchq's)."""
    hedger = Hedger(lines) if copies else None
    saved = hedge.COPIES, hedge.LATE, hedge.FUTILE_AFTER
    hedge.COPIES, hedge.LATE = copies, late
    hedge.FUTILE_AFTER = hedge.FUTILE_AFTER if futile is None else futile
    try:
        sim = Sim(random.Random(seed), hedger, p99, same)
        if hedger is None:
            return Run(sim.run(lines), 0, math.nan)
        hedger.latency = sim.latencies
        ended = sim.run(lines)
        raced = hedger.won + hedger.lost
        return Run(ended, hedger.sent, hedger.won / raced if raced else math.nan)
    finally:
        hedge.COPIES, hedge.LATE, hedge.FUTILE_AFTER = saved


def row(name: str, runs: list[Run], lines: int) -> list[str]:
    tails = sorted(r.tail for r in runs)
    won = [r.won for r in runs if not math.isnan(r.won)]
    return [
        name,
        f"{statistics.median(tails):.1f}",
        f"{tails[len(tails) * 9 // 10]:.1f}",
        f"{tails[-1]:.1f}",
        f"{sum(t > OVER for t in tails)} of {len(tails)}",
        f"{statistics.median(r.sent for r in runs) / lines:.2%}",
        f"{statistics.median(won):.0%}" if won else "",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=60)
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--p99", type=float, default=10.0, help="seconds (the p50 is 0.8 s)")
    parser.add_argument(
        "--same-length",
        type=float,
        default=0.0,
        help="the share (0-1) of a latency's log-variance the request sets: its copies share it",
    )
    args = parser.parse_args()
    if not 0 <= args.same_length <= 1:
        parser.error("--same-length is a share, from 0 to 1")
    started = time.process_time()
    rows = []
    for name, copies, late, futile in RULES:
        runs = [
            tail(seed, args.lines, args.p99, args.same_length, copies, late, futile)
            for seed in range(args.seeds)
        ]
        rows.append(row(name, runs, args.lines))
    cpu = time.process_time() - started
    print(
        f"{args.lines:,} requests, p99 {args.p99:g} s, same length {args.same_length:g}, "
        f"{args.seeds} seeds, {cpu:.0f} s CPU\n"
    )
    head = ["hedge", "tail p50 s", "p90 s", "max s", f"over {OVER:.1f} s", "copies", "won"]
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join("---" for _ in head) + " |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
