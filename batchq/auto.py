"""``--via auto``: the provider's batches for the bulk, the live engine for what they cannot do.

Two phases over the same job folder, one after the other, each holding the
job's lock in turn:

1. The batch executor, given the deadline. Lines no batch can take, and
   lines a batch left undone (5xx, expired), stay pending instead of going
   in another batch. A batch still open at the deadline less the time its
   unfinished lines would take live (at least a tenth of the time the run
   was given) is cancelled then, not before: every line it finishes until
   then is one fewer at full price. What it finished is kept, the rest
   stays pending.
2. The live engine, at full price, for every line still pending.

Every batch is collected before the live phase begins, so no line is
answered both ways and none is paid for twice.
"""

from __future__ import annotations

import time
from dataclasses import replace

from batchq.batch.executor import BatchOptions, run_batches
from batchq.config import deadline_seconds
from batchq.job.folder import Job
from batchq.live.runner import RunOptions, run_job
from batchq.stats import Stats


async def run_auto(job: Job, live: RunOptions, batch: BatchOptions) -> Stats:
    """Run ``job`` by batch until its deadline allows no more, then live; the two runs' stats."""
    s = job.settings
    seconds = deadline_seconds(s.deadline or "")
    assert seconds is not None  # Settings refuse --via auto without a deadline
    by_batch = await run_batches(
        job,
        replace(
            batch,
            live_after=True,
            deadline=time.time() + seconds,
            live_rate=s.rpm / 60 if s.rpm else None,
        ),
    )
    if by_batch.interrupted:
        return by_batch
    live_stats = await run_job(job, replace(live, retry_failed=False))  # retried in phase 1
    # A copy, to add the two phases up in: each phase's own counters stay as they were
    # counted, for --metrics-port, which adds them up itself while the run goes on.
    stats = replace(live_stats)
    stats.started = by_batch.started
    stats.ok_before, stats.failed_before = by_batch.ok_before, by_batch.failed_before
    stats.ok += by_batch.ok
    stats.failed += by_batch.failed
    stats.prompt_tokens += by_batch.prompt_tokens
    stats.completion_tokens += by_batch.completion_tokens
    stats.batch_prompt_tokens = by_batch.batch_prompt_tokens
    stats.batch_completion_tokens = by_batch.batch_completion_tokens
    stats.batches_created, stats.batches_open = by_batch.batches_created, by_batch.batches_open
    stats.by_batch = by_batch.ok + by_batch.failed
    return stats
