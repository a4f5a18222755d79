"""Several deployments as one pool, simulated: does the routing fill each endpoint to its knee?

Over real sockets (benchmarks/deployments.py) four mock servers and the
client share the machine's cores, so that figure measures the machine. Here
the endpoints are independent, as four GPUs are: each is capacity_sim.py's
``Endpoint`` (slots served at once, a full batch half as slow again), and the
client's event loop is its ``ClientLoop`` (CPU a pass and an answer).

The pool is batchq's own: the real ``Router`` and a ``Deployment`` per
endpoint, each with its real ``Pool`` (``--concurrency auto``) and
``Pacer``, run on asyncio with a virtual clock. As many workers as the
runner starts (the sum of the pools' ceilings) do what its ``_attempt``
does: pick a deployment; if none has room, wait for a released slot or the
tick; take the deployment's gate and its turn in the pace; send. Every 0.2 s
a tick resizes each pool and wakes as many waiters as there is room, as the
runner's ``_tick`` does. No tail hedge (``--no-hedge``).

Each case reports, per deployment, its share of the lines, its throughput
as a share of its capacity and its p50 latency against an unloaded
request's; and the pool's throughput against the sum of the capacities and
against the sum of each endpoint alone at its best fixed pool (capacity_sim's
``cell``, which also gives ``--concurrency auto`` alone on that endpoint: a
miss there is the controller's, not the routing's). The seed orders the
deployments in the pool (the router breaks ties by that order) and draws
the latencies of heavy-tailed shapes.

``python benchmarks/deployments_sim.py`` prints the table;
tests/test_deployments_sim.py asserts the floor on the four-endpoint case.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import math
import random
import selectors
import statistics
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from capacity_sim import (
    CEILING,
    RETRY_AFTER,
    TICK,
    ClientLoop,
    Endpoint,
    Shape,
    capacity,
    cell,
    unloaded,
)

from batchq.live.concurrency import Pool
from batchq.live.deployments import Deployment, Router
from batchq.live.limiter import Pacer
from batchq.live.transport import Response

GOAL = (0.9, 2.0)  # issue 23: the pool's share of the summed capacity; each p50 × unloaded
ANSWERED = Response(200, {}, b"{}", None)  # what the router's health check is told


@dataclass(frozen=True)
class Case:
    """Endpoints of ``slots`` each, all of one shape, and a job of ``seconds`` of their sum."""

    name: str
    slots: tuple[int, ...]
    shape: Shape
    seconds: float = 60.0

    @property
    def capacity(self) -> float:
        return sum(capacity(n, self.shape) for n in self.slots)

    @property
    def lines(self) -> int:
        return round(self.seconds * self.capacity)


CASES = (
    Case("16/64/256/256 slots, 0.2 s", (16, 64, 256, 256), Shape("fixed 0.2 s", 0.2)),
    Case("16/64/256/256 slots, 1 s", (16, 64, 256, 256), Shape("fixed 1 s", 1.0)),
    Case("2 × 64 slots, 0.2 s", (64, 64), Shape("fixed 0.2 s", 0.2)),
    Case("16 + 256 slots, 0.2 s", (16, 256), Shape("fixed 0.2 s", 0.2)),
)


class _Instant(selectors.SelectSelector):
    """A selector that waits for nothing: the time the loop would sleep passes at once."""

    def __init__(self, clock: _Clock) -> None:
        super().__init__()
        self.clock = clock

    def select(self, timeout: float | None = None) -> list[Any]:
        if timeout is None:
            raise RuntimeError("nothing is scheduled: the simulation is stuck")
        self.clock.now += timeout
        return []


@dataclass
class _Clock:
    now: float = 0.0


class VirtualLoop(asyncio.SelectorEventLoop):
    """asyncio on a virtual clock: timers fire in order, and no real time passes."""

    def __init__(self) -> None:
        self._clock = _Clock()
        super().__init__(_Instant(self._clock))

    def time(self) -> float:
        return self._clock.now


@dataclass
class Served:
    """What one deployment did in a run."""

    name: str
    slots: int
    latencies: list[float] = field(default_factory=list)


@dataclass
class Run:
    lines: int
    makespan: float
    served: list[Served]  # in the case's order, whatever the pool's

    @property
    def throughput(self) -> float:
        return self.lines / self.makespan


def simulate(case: Case, seed: int = 1, trace: list[str] | None = None) -> Run:
    """Run ``case``'s job through the real router and pools, on a virtual clock."""
    loop = VirtualLoop()
    try:
        return loop.run_until_complete(_run(case, seed, trace))
    finally:
        loop.close()


async def _run(case: Case, seed: int, trace: list[str] | None) -> Run:
    loop = asyncio.get_running_loop()
    rng = random.Random(seed)

    def push(at: float, kind: str, ticket: Any) -> None:
        loop.call_at(at, on_event, kind, ticket)

    served = [Served(f"gpu{n}-{i}", n) for i, n in enumerate(case.slots)]
    endpoints: dict[Deployment, Endpoint[Any]] = {}
    by_deployment: dict[Deployment, Served] = {}
    for s in served:
        d = Deployment(s.name, Pacer(), Pool("auto", CEILING))
        endpoints[d] = Endpoint(s.slots, case.shape, random.Random(rng.random()), push)
        by_deployment[d] = s
    order = list(endpoints)
    rng.shuffle(order)  # the router breaks ties by the pool's order
    router = Router(order)
    client: ClientLoop[tuple[asyncio.Future[bool], bool]] = ClientLoop(push)
    remaining = case.lines

    def on_event(kind: str, ticket: Any) -> None:
        now = loop.time()
        if kind == "handled":
            for answer, ok in client.take():
                answer.set_result(ok)
            client.start(now)
            return
        answer, endpoint = ticket
        if kind == "served":
            endpoint.served(now)
        client.arrived((answer, kind == "served"), now)

    async def attempt() -> bool:
        """The runner's ``_attempt``, without a budget or a hedge."""
        while (picked := router.pick(loop.time())) is None:
            await router.wait()  # every deployment is full: the first with room takes it
        d, probe = picked
        pool, pacer = d.pool, d.pacer
        await pool.gate.acquire()
        try:
            started = await pacer.wait_turn(0)
            pool.sent(started)
            answer: asyncio.Future[bool] = loop.create_future()
            endpoints[d].arrive((answer, endpoints[d]), loop.time())
            try:
                ok = await answer
            finally:
                pacer.answered()
                pool.answered(started, loop.time(), ok=ok, overload=not ok)
        finally:
            pool.gate.release()
            router.released()
        router.observe(d, probe, ANSWERED if ok else Response(503, {}, b"", None), loop.time())
        if ok:
            by_deployment[d].latencies.append(loop.time() - started)
        return ok

    async def worker() -> None:
        nonlocal remaining
        while remaining:
            remaining -= 1
            while True:
                if await attempt():
                    break
                await asyncio.sleep(RETRY_AFTER)  # a 503: off the pool, the slot serves another

    async def tick() -> None:
        """The runner's ``_tick`` and ``_steer``: resize each pool, wake waiters for room."""
        while True:
            await asyncio.sleep(TICK)
            now = loop.time()
            for d in order:
                d.pacer.tick(TICK)
                d.pool.resize(d.pacer.request_rate(), now)
            router.released(None if router.all_out() else router.room(now) + 1)
            if trace is not None:
                trace.append(
                    f"{now:6.1f} s "
                    + " ".join(
                        f"{d.name}: {d.pool.gate.limit:,}/{d.pool.in_flight:,}"
                        for d in router.deployments
                    )
                )

    ticking = asyncio.create_task(tick())
    workers = sum(d.pool.ceiling for d in order)  # as the runner starts
    await asyncio.gather(*(worker() for _ in range(workers)))
    ticking.cancel()
    with contextlib.suppress(asyncio.CancelledError):
        await ticking
    return Run(case.lines, loop.time(), served)


@dataclass
class Alone:
    """One endpoint of a case by itself (capacity_sim's cell): its best fixed pool's
    throughput, and ``--concurrency auto``'s share of it."""

    best: int
    throughput: float
    auto_share: float
    auto_slowdown: float


def alone(slots: int, shape: Shape) -> Alone:
    c = cell(slots, shape)
    run = c.runs[0]
    return Alone(run.best, run.best_outcome.throughput, c.share, c.slowdown)


@dataclass
class Result:
    """A case, run with a few seeds: medians."""

    case: Case
    runs: list[Run]
    alone: list[Alone]
    cpu: float

    def _median(self, of: Callable[[Run], float]) -> float:
        return statistics.median(of(r) for r in self.runs)

    @property
    def share(self) -> float:
        """Of the summed capacity."""
        return self._median(lambda r: r.throughput / self.case.capacity)

    @property
    def of_alone(self) -> float:
        """Of the summed best fixed pools, each endpoint alone."""
        return self._median(lambda r: r.throughput / sum(a.throughput for a in self.alone))

    def lines(self, i: int) -> float:
        return self._median(lambda r: len(r.served[i].latencies) / r.lines)

    def filled(self, i: int) -> float:
        """Deployment ``i``'s throughput over the run, a share of its capacity."""
        cap = capacity(self.case.slots[i], self.case.shape)
        return self._median(lambda r: len(r.served[i].latencies) / r.makespan / cap)

    def slowdown(self, i: int) -> float:
        """Deployment ``i``'s p50 × unloaded."""
        return self._median(lambda r: _p50(r.served[i].latencies) / unloaded(self.case.shape))

    @property
    def worst(self) -> float:
        return max(self.slowdown(i) for i in range(len(self.case.slots)))

    @property
    def verdict(self) -> str:
        return "PASS" if self.share >= GOAL[0] and self.worst <= GOAL[1] else "MISS"


def _p50(latencies: list[float]) -> float:
    return sorted(latencies)[len(latencies) // 2] if latencies else math.nan


def run_case(case: Case, seeds: int = 3) -> Result:
    started = time.process_time()
    runs = [simulate(case, seed) for seed in range(1, seeds + 1)]
    endpoints = [alone(n, case.shape) for n in case.slots]
    return Result(case, runs, endpoints, time.process_time() - started)


def table(result: Result) -> str:
    case = result.case
    lines = [
        f"### {case.name}: {case.lines:,} lines ({case.seconds:g} s of the summed capacity, "
        f"{case.capacity:,.0f} req/s)",
        "",
        "| deployment | slots | capacity req/s | lines served | share of its capacity "
        "| p50 / unloaded | alone: best fixed pool (req/s) | alone: auto / best fixed, p50 |",
        "| --- | ---: | ---: | ---: | ---: | ---: | ---: | ---: |",
    ]
    for i, slots in enumerate(case.slots):
        a = result.alone[i]
        lines.append(
            f"| {result.runs[0].served[i].name} | {slots:,} "
            f"| {capacity(slots, case.shape):,.0f} | {result.lines(i):.0%} "
            f"| {result.filled(i):.0%} | {result.slowdown(i):.2f}× "
            f"| {a.best:,} ({a.throughput:,.0f}) | {a.auto_share:.2f}, {a.auto_slowdown:.2f}× |"
        )
    throughput = statistics.median(r.throughput for r in result.runs)
    lines += [
        "",
        f"Pool: **{throughput:,.0f} req/s**, **{result.share:.0%}** of the summed capacity, "
        f"{result.of_alone:.0%} of the endpoints alone at their best fixed pools summed; "
        f"the slowest p50 {result.worst:.2f}× unloaded (goal ≥ {GOAL[0]:.0%}, "
        f"≤ {GOAL[1]:g}×: {result.verdict}). Medians of {len(result.runs)} seeds, "
        f"{result.cpu:.1f} s of CPU.",
    ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--cases", help="only the cases whose name contains this")
    parser.add_argument("--seeds", type=int, default=3, help="runs per case (medians)")
    parser.add_argument("--trace", action="store_true", help="each pool's allowance a tick")
    args = parser.parse_args()
    cases = [c for c in CASES if not args.cases or args.cases in c.name]
    started = time.process_time()
    for case in cases:
        if args.trace:
            trace: list[str] = []
            simulate(case, 1, trace)
            print("\n".join(trace))
        print(table(run_case(case, args.seeds)))
        print()
    print(f"{len(cases)} cases in {time.process_time() - started:.1f} s of CPU")


if __name__ == "__main__":
    main()
