"""``--max-cost`` before each attempt: the budget's gate, beside the pace.

The arithmetic is ``cost.Meter``'s; this adds the waiting. An attempt that
fits with everything in flight at its worst goes at once. One that would fit
only once some of what is in flight has answered (answers usually cost far
less than their worst) waits for that. One that would cross the budget even
with nothing in flight stops the sending: the run lets what is in flight
finish and ends with exit 4.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Callable

from batchq.cost import WORST_COMPLETION_TOKENS, Meter, Verdict
from batchq.errors import ConfigError, Notify
from batchq.records import Request


class BudgetGate:
    """Reserves each attempt's worst cost until it has answered."""

    def __init__(self, meter: Meter, on_reached: Callable[[], None], on_notice: Notify) -> None:
        self.meter = meter
        self.on_reached = on_reached
        self.on_notice = on_notice
        self.stopped = False
        self.unpriced: ConfigError | None = None  # a model with no price stopped the sending
        self._told_no_cap = False
        self._room = asyncio.Event()  # set when a reservation is released

    async def reserve(self, request: Request) -> float | None:
        """The worst cost reserved for this attempt; None if it must not be sent."""
        worst = self.meter.worst(request)
        if worst is None:  # the budget cannot be kept: stop as at the budget, then say why
            self.unpriced = self.unpriced or ConfigError(
                f"model {request.model or '(none named)'} has no price, so --max-cost cannot "
                f'be kept: add [prices."{request.model or ""}"] to job.toml, or give '
                "--price-in and --price-out; nothing was lost"
            )
            self.on_reached()
            return None
        if request.completion_cap is None and not self._told_no_cap:
            self._told_no_cap = True
            self.on_notice(
                f"line {request.line_no} sets no max_tokens: the budget counts such requests "
                f"at {WORST_COMPLETION_TOKENS:,} completion tokens, which their answers may "
                "pass; set --max-tokens for a budget that holds",
                logging.WARNING,
            )
        while not self.stopped:
            verdict = self.meter.verdict(worst)
            if verdict is Verdict.SEND:
                self.meter.reserve(worst)
                return worst
            if verdict is Verdict.STOP:
                self.on_reached()
                return None
            self._room.clear()  # WAIT: something is in flight, and will release
            await self._room.wait()
        return None

    def release(self, worst: float) -> None:
        self.meter.release(worst)
        self._room.set()

    def stop(self) -> None:
        """The run is stopping: nothing more is reserved, and no one waits any longer."""
        self.stopped = True
        self._room.set()
