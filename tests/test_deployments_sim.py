"""The pool of deployments fills each endpoint to its knee (benchmarks/deployments_sim.py).

Issue 23's figure: four endpoints of 16, 64, 256 and 256 slots (0.2 s) served
as one pool at >= 90% of the sum of their capacities, each at <= 2x its
unloaded latency. Over real sockets on two cores the mock servers and the
client share the CPU, so that figure measures the machine; here the real
``Router``, ``Deployment``s and ``Pool``s run on a virtual clock against
independent simulated endpoints, as four GPUs are: a few seconds of CPU, no
sockets, no sleeps.
"""

from __future__ import annotations

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1] / "benchmarks"))

from deployments_sim import CASES, GOAL, Result, simulate


def test_four_endpoints_are_each_filled_to_their_knee() -> None:
    case = CASES[0]
    assert case.slots == (16, 64, 256, 256)
    result = Result(case, [simulate(case, seed=1)], [], 0.0)
    share, slowdown = GOAL
    assert result.share >= share, f"{result.share:.3f} of the summed capacity"
    for i, slots in enumerate(case.slots):
        # Routing by room: the 16-slot box is as full as the 256-slot ones, none flooded.
        assert result.filled(i) >= share, f"{slots} slots: {result.filled(i):.3f} of capacity"
        assert result.slowdown(i) <= slowdown, f"{slots} slots: p50 {result.slowdown(i):.2f}×"
