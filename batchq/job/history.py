"""``history.jsonl``: a running job's figures every few seconds, for ``batchq view`` and ``report``.

The live runner's ticker (never a request), and the batch executor each
time it looks at its batches, append one small JSON line every ``every``
seconds to the folder of the process (the job's, or a shard's)::

    {"t": 1764670000.1, "run": 1764669000.0, "every": 2.0, "done": 5120, "ok": 5100,
     "failed": 20, "in_flight": 64, "allowance": 64, "binding": "pace", "pace": 50.0,
     "p50": 0.41, "p95": 0.9, "p99": 1.3, "rate_limited": 3, "retries": {"429": 3},
     "prompt_tokens": 81920, "completion_tokens": 40960, "cost": 0.0123}

``done``, ``ok`` and ``failed`` count the whole job; ``rate_limited``,
``retries``, the tokens and ``cost`` count the run that began at ``run``
(they restart at zero on a resume); ``p50``-``p99`` are the latencies of
the answers since the record before.

**Bounded.** When the file holds ``max_records`` records, it is rewritten
keeping every other one and the interval doubles: the file never holds more
than ``max_records`` lines (~0.7 MB at the default 2,000), however long the
job. Only counters are kept, never rates, so a record dropped loses no
count: a rate is the difference of two records that remain.

**Durable enough.** Lines are appended unbuffered and never fsynced (a view,
not state): a crash may leave a torn last line, which ``read_history`` skips.
A full disk silently stops the history; the run itself stops at its next
commit.
"""

from __future__ import annotations

import contextlib
import os
import time
from collections.abc import Callable
from pathlib import Path
from typing import IO, Any

import orjson

from batchq.stats import LatencyHistogram, Stats

HISTORY = "history.jsonl"
EVERY = 2.0  # seconds between records while the history is short
MAX_RECORDS = 2_000


def read_history(run_dir: Path) -> list[dict[str, Any]]:
    """The records of ``run_dir``'s history, oldest first; a torn or damaged line is skipped."""
    try:
        raw = (run_dir / HISTORY).read_bytes()
    except OSError:
        return []
    records = []
    for line in raw.splitlines():
        try:
            record = orjson.loads(line)
        except orjson.JSONDecodeError:
            continue
        if isinstance(record, dict) and isinstance(record.get("t"), int | float):
            records.append(record)
    return records


class History:
    """The writer of one run folder's history; ``due`` and ``record`` are called by the ticker."""

    def __init__(
        self,
        run_dir: Path,
        *,
        prices: tuple[float, float] = (0.0, 0.0),
        every: float = EVERY,
        max_records: int = MAX_RECORDS,
        clock: Callable[[], float] = time.time,
    ) -> None:
        self.path = run_dir / HISTORY
        self.clock = clock  # the records' time: Unix seconds
        self.prices = prices
        self.max_records = max(2, max_records)
        self.run = round(clock(), 3)
        earlier = read_history(run_dir)
        self.records = len(earlier)
        # A resumed job keeps the interval its history had grown to.
        self.every = max([every, *(r["every"] for r in earlier[-1:] if _number(r.get("every")))])
        self._next = 0.0  # the first record at once: a short run still shows a point
        self._latency = LatencyHistogram()  # what the last record had seen
        self._file: IO[bytes] | None = None

    def due(self, now: float) -> bool:
        return now >= self._next

    def record(self, stats: Stats, now: float, *, pace: float | None) -> None:
        """Append one record of ``stats``; ``now`` is the loop's clock, ``pace`` requests/s."""
        self._next = now + self.every
        line = orjson.dumps(self._figures(stats, pace), option=orjson.OPT_APPEND_NEWLINE)
        with contextlib.suppress(OSError):  # a view, not state: see the module's docstring
            if self.records >= self.max_records:
                self._thin()
            if self._file is None:
                self._file = self.path.open("ab", buffering=0)
            self._file.write(line)
            self.records += 1

    def close(self) -> None:
        if self._file is not None:
            with contextlib.suppress(OSError):
                self._file.close()
            self._file = None

    def _figures(self, stats: Stats, pace: float | None) -> dict[str, Any]:
        latency = _since(stats.latency, self._latency)
        self._latency = LatencyHistogram(list(stats.latency.counts), stats.latency.total)
        price_in, price_out = self.prices
        figures: dict[str, Any] = {
            "t": round(self.clock(), 3),
            "run": self.run,
            "every": self.every,
            "done": stats.done,
            "ok": stats.ok_before + stats.ok,
            "failed": stats.failed_before + stats.failed,
            "in_flight": stats.in_flight,
            "allowance": stats.allowance,
            "binding": stats.binding,
            "pace": None if pace is None else round(pace, 3),
            "rate_limited": stats.rate_limited,
            "retries": dict(stats.retry_causes),
            "prompt_tokens": stats.prompt_tokens,
            "completion_tokens": stats.completion_tokens,
            "invalid_answers": stats.invalid_answers,  # asked again: --json-schema
        }
        for p in (50, 95, 99):
            value = latency.percentile(p)
            figures[f"p{p}"] = None if value is None else round(value, 4)
        if stats.cost is not None:  # counted answer by answer (cost.py), this run's
            figures["cost"] = round(stats.run_cost, 6)
        elif price_in or price_out:
            cost = stats.prompt_tokens * price_in + stats.completion_tokens * price_out
            figures["cost"] = round(cost / 1e6, 6)
        return figures

    def _thin(self) -> None:
        """Keep every other record (the newest among them) and double the interval."""
        self.close()
        lines = [orjson.dumps(r) for r in read_history(self.path.parent)]
        # the newest record is kept: with the one about to be written, the last gap is `every`
        kept = lines[1::2] if len(lines) % 2 == 0 else lines[0::2]
        tmp = self.path.with_name(HISTORY + ".tmp")
        tmp.write_bytes(b"".join(line + b"\n" for line in kept))
        os.replace(tmp, self.path)
        self.records = len(kept)
        self.every *= 2


def _since(now: LatencyHistogram, before: LatencyHistogram) -> LatencyHistogram:
    """The answers ``now`` counted that ``before`` had not."""
    counts = [a - b for a, b in zip(now.counts, before.counts, strict=True)]
    return LatencyHistogram(counts, now.total - before.total)


def _number(value: object) -> bool:
    return isinstance(value, int | float) and not isinstance(value, bool) and value > 0
