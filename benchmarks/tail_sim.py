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
independently: an endpoint whose latency follows the answer's length would make
copies as slow as the first, and the gain smaller. The endpoint has no limit of
its own: copies add no load.

Each seed runs with no hedge, with one copy of a request out longer than the p95
(the rule before; the other rules as batchq's today) and with batchq's rule
(``COPIES`` copies, each once the one before is out longer than the ``LATE``
percentile); the table gives the tail (seconds from the last new request to the
last answer) over the seeds, and the copies sent (median, a share of the
requests)::

    python benchmarks/tail_sim.py [--seeds N] [--lines N] [--p99 S]
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
    attempts: int = 0
    out: int = 0
    done: bool = False


@dataclass
class Sim:
    """One job on a fake clock: requests, their attempts and copies, and the hedger."""

    rng: random.Random
    hedger: Hedger | None
    p99: float
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

    def latency(self) -> float:
        return self.rng.lognormvariate(math.log(P50), math.log(self.p99 / P50) / 2.3263)

    def send(self, line: Line, now: float) -> None:
        """An attempt goes, where the hedger sees it."""
        line.attempts += 1
        line.flight = flight = _Flight(now, self.latencies, None, None, None, None)  # type: ignore[arg-type]
        self.lines[flight] = line
        if self.hedger is not None:
            self.hedger._flights.add(flight)
        line.out = 1
        self.at(now + self.latency(), "first", line, flight)

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
        self.at(now + self.latency(), "copy", line, flight)

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


RULES = (  # name, copies of a request at most, the percentile a straggler is out longer than
    ("none", 0, 0),
    ("one copy, at the p95 (before)", 1, 95),
    (f"{hedge.COPIES} copies, at the p{hedge.LATE} (batchq)", hedge.COPIES, hedge.LATE),
)


def tail(seed: int, lines: int, p99: float, copies: int, late: int) -> tuple[float, int]:
    """One job's tail and the copies it sent, hedged by that rule (no copies: no hedge)."""
    hedger = Hedger(lines) if copies else None
    saved = hedge.COPIES, hedge.LATE
    hedge.COPIES, hedge.LATE = copies, late
    try:
        sim = Sim(random.Random(seed), hedger, p99)
        if hedger is not None:
            hedger.latency = sim.latencies
        return sim.run(lines), 0 if hedger is None else hedger.sent
    finally:
        hedge.COPIES, hedge.LATE = saved


def row(name: str, runs: list[tuple[float, int]], lines: int) -> list[str]:
    tails = sorted(t for t, _ in runs)
    return [
        name,
        f"{statistics.median(tails):.1f}",
        f"{tails[len(tails) * 9 // 10]:.1f}",
        f"{tails[-1]:.1f}",
        f"{sum(t > OVER for t in tails)} of {len(tails)}",
        f"{statistics.median(c for _, c in runs) / lines:.2%}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=60)
    parser.add_argument("--lines", type=int, default=20_000)
    parser.add_argument("--p99", type=float, default=10.0, help="seconds (the p50 is 0.8 s)")
    args = parser.parse_args()
    started = time.process_time()
    rows = []
    for name, copies, late in RULES:
        runs = [tail(seed, args.lines, args.p99, copies, late) for seed in range(args.seeds)]
        rows.append(row(name, runs, args.lines))
    cpu = time.process_time() - started
    print(f"{args.lines:,} requests, p99 {args.p99:g} s, {args.seeds} seeds, {cpu:.0f} s CPU\n")
    head = ["hedge", "tail p50 s", "p90 s", "max s", f"over {OVER:.1f} s", "copies"]
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join("---" for _ in head) + " |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
