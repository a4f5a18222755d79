"""The tail hedge against a simulated heavy tail: how long a job runs after its last send.

A discrete-event simulation on a fake clock drives the real ``Hedger.pick`` (the
runner calls it every 0.2 s once nothing is left to send) and its latency
histogram, with capacity.py case 1's endpoint: 20,000 requests sent on the
pace of ``--rpm 10000`` (2% under it, as ``limiter.MARGIN`` paces), latency
lognormal of p50 0.8 s and p99 10 s, 1% 500s and 1% 503s after their latency,
retried after the retry policy's backoff. A copy takes its turn at once (the
pace has room once nothing is left to send) and a latency of its own.

Each seed runs with one copy a request at most (``COPIES = 1``, the baseline)
and with batchq's ``COPIES``, and with no hedge; the table gives the tail
(seconds from the last new request to the last answer) over the seeds, and
the copies sent::

    python benchmarks/tail_sim.py [--seeds N] [--lines N]
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
P50, P99 = 0.8, 10.0
RATE_500 = RATE_503 = 0.01
# A tail longer than this puts case 1 past 1.15x its 120 s floor: its sends end at 1.057x
# (the pace's margin, the retries, the start; makespan.py, medians of 3 at 063ceef).
PAST_115 = (1.15 - 1.057) * 120


@dataclass(eq=False)
class Line:
    """One request: its attempt in flight, its sends not yet answered, whether it is done."""

    flight: _Flight | None = None
    attempts: int = 0
    out: int = 0  # sends of this attempt not yet answered: the first and its copies
    done: bool = False


@dataclass
class Sim:
    """One job on a fake clock: requests, their attempts and copies, and the hedger."""

    rng: random.Random
    hedger: Hedger | None
    latencies: LatencyHistogram = field(default_factory=LatencyHistogram)
    events: list[tuple[float, int, str, Line, int]] = field(default_factory=list)
    order: Iterator[int] = field(default_factory=itertools.count)
    lines: dict[_Flight, Line] = field(default_factory=dict)  # whose attempt a flight is
    policy: RetryPolicy = field(default_factory=RetryPolicy)
    last_answer: float = 0.0

    def at(self, when: float, what: str, line: Line, status: int = 0) -> None:
        heapq.heappush(self.events, (when, next(self.order), what, line, status))

    def reply(self, line: Line, now: float, what: str) -> None:
        """A send of ``line`` (``what``: "first" or "copy"), answered after its latency."""
        draw = self.rng.random()
        status = 500 if draw < RATE_500 else 503 if draw < RATE_500 + RATE_503 else 200
        latency = self.rng.lognormvariate(math.log(P50), math.log(P99 / P50) / 2.3263)
        line.out += 1
        self.at(now + latency, what, line, status)

    def send(self, line: Line, now: float) -> None:
        """An attempt goes, where the hedger sees it."""
        line.attempts += 1
        line.flight = _Flight(now, self.latencies, None, None, None, None)  # type: ignore[arg-type]
        self.lines[line.flight] = line
        if self.hedger is not None:
            self.hedger._flights.add(line.flight)
        self.reply(line, now, "first")

    def answer(self, line: Line, what: str, status: int, now: float) -> None:
        """A send answered: the line is done, or its attempt failed once every send of it
        has (then it is sent again after the backoff, as the runner does)."""
        line.out -= 1
        if line.done:
            return  # a copy that lost: the runner has cancelled it
        assert line.flight is not None
        if self.hedger is not None:
            self.hedger.answered(now, status)
        if what == "first" and status != 200:
            line.flight.answered = True  # its copies may still answer; no new one is chosen
        if status != 200 and line.out:
            return
        if self.hedger is not None:
            self.hedger._flights.discard(line.flight)
        if status != 200:
            self.at(now + self.policy.backoff(line.attempts, self.rng.random), "send", line)
            return
        line.done, self.last_answer = True, now
        self.latencies.add(now - line.flight.started)

    def copy(self, flight: _Flight, now: float) -> None:
        """``Hedger.choose``'s copy of ``flight``, its turn taken at once."""
        assert self.hedger is not None
        flight.sent += 1
        flight.copied = now
        self.hedger.sent += 1
        self.reply(self.lines[flight], now, "copy")

    def run(self, lines: int) -> float:
        """The job: seconds from its last new request to its last answer."""
        rate = RPM * MARGIN / 60
        last_send = (lines - 1) / rate
        for n in range(lines):
            self.at(n / rate, "send", Line())
        tick = last_send  # the runner picks stragglers every TICK once nothing is left to send
        while self.events:
            when, _, what, line, status = heapq.heappop(self.events)
            while self.hedger is not None and tick < when:
                for flight in self.hedger.pick(tick):
                    self.copy(flight, tick)
                tick += TICK
            if what == "send":
                self.send(line, when)
            else:
                self.answer(line, what, status, when)
        return self.last_answer - last_send


def tail(seed: int, lines: int, copies: int | None) -> tuple[float, int]:
    """One job's tail and the copies it sent (``copies``: of a request at most; None: no
    hedge)."""
    hedger = None if copies is None else Hedger(lines)
    saved, hedge.COPIES = hedge.COPIES, copies or 0
    try:
        sim = Sim(random.Random(seed), hedger)
        if hedger is not None:
            hedger.latency = sim.latencies
        return sim.run(lines), 0 if hedger is None else hedger.sent
    finally:
        hedge.COPIES = saved


def row(name: str, runs: list[tuple[float, int]]) -> list[str]:
    tails = sorted(t for t, _ in runs)
    past = sum(t > PAST_115 for t in tails)
    return [
        name,
        f"{statistics.median(tails):.1f}",
        f"{tails[len(tails) * 9 // 10]:.1f}",
        f"{tails[-1]:.1f}",
        f"{past} of {len(tails)}",
        f"{statistics.median(c for _, c in runs):,.0f}",
    ]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--seeds", type=int, default=40)
    parser.add_argument("--lines", type=int, default=20_000)
    args = parser.parse_args()
    started = time.process_time()
    rows = []
    for name, copies in (("none", None), ("one copy at most", 1), ("COPIES", hedge.COPIES)):
        runs = [tail(seed, args.lines, copies) for seed in range(args.seeds)]
        rows.append(row(name if name != "COPIES" else f"{copies} copies at most", runs))
    head = ["hedge", "tail p50 s", "p90 s", "max s", "runs past 1.15x", "copies"]
    cpu = time.process_time() - started
    print(f"{args.lines:,} requests, {args.seeds} seeds, {cpu:.0f} s CPU\n")
    print("| " + " | ".join(head) + " |")
    print("| " + " | ".join("---" for _ in head) + " |")
    for r in rows:
        print("| " + " | ".join(r) + " |")


if __name__ == "__main__":
    main()
