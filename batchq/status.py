"""``batchq status``: a job's figures, read from disk without disturbing a running job.

Everything is read, nothing written: the journal's complete records give
the counts and tokens (a record being written right now is simply not
counted yet), the lock tells whether a process is running the job.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

from batchq.config import build_settings, read_job_toml
from batchq.errors import ConfigError
from batchq.job import JOB_TOML, _resolve, read_progress, read_state, running_pid
from batchq.journal import JOURNAL_NAME, read_journal
from batchq.progress import duration


def job_status(job_dir: Path) -> dict[str, Any]:
    """The figures of the job in ``job_dir`` as one JSON-ready dict."""
    if not (job_dir / JOB_TOML).exists():
        raise ConfigError(f"{job_dir} has no {JOB_TOML}: not a batchq job folder")
    job = _resolve(job_dir, build_settings(read_job_toml(job_dir / JOB_TOML), {}))
    state = read_state(job_dir)
    _, totals, _ = read_journal(job_dir / JOURNAL_NAME)
    total = state.get("input_requests")
    done = totals.ok + totals.failed
    pid = running_pid(job_dir)
    if pid is not None:
        phase = "running"
    elif total is not None and done >= total:
        phase = "finished"
    elif state:
        phase = "interrupted"
    else:
        phase = "not started"
    live = read_progress(job_dir) if pid is not None else {}
    return {
        "job": str(job_dir),
        "input": str(job.input),
        "state": phase,
        "pid": pid,
        "total": total,
        "done": done,
        "succeeded": totals.ok,
        "failed": totals.failed,
        "pending": None if total is None else max(0, total - done),
        "prompt_tokens": totals.prompt_tokens,
        "completion_tokens": totals.completion_tokens,
        "in_flight": live.get("in_flight"),
        "allowance": live.get("allowance"),
        "peak_in_flight": live.get("peak_in_flight"),
        "binding": live.get("binding"),
        "hedges": live.get("hedges"),
        "elapsed_s": live.get("elapsed_s", state.get("elapsed_s")),
        "retries": live.get("retries"),
        "rate_limited": live.get("rate_limited"),
        "pace": live.get("pace"),
        "results": str(job.results),
        "errors": str(job.errors),
    }


def render_status(f: dict[str, Any]) -> str:
    """The figures for a human."""
    state = f["state"] + (f" (pid {f['pid']})" if f["pid"] else "")
    total = "?" if f["total"] is None else f"{f['total']:,}"
    pending = "?" if f["pending"] is None else f"{f['pending']:,}"
    lines = [
        f"job {f['job']}: {state}",
        f"  {f['done']:,} of {total} done: {f['succeeded']:,} succeeded, "
        f"{f['failed']:,} failed, {pending} pending",
        f"  tokens: {f['prompt_tokens']:,} prompt + {f['completion_tokens']:,} completion",
    ]
    if f["state"] == "running" and f["in_flight"] is not None:
        lines.append(
            f"  running for {duration(f['elapsed_s'])}: {f['in_flight']}/{f['allowance']} "
            f"in flight ({f['binding']}), "
            f"{f['retries']:,} retries, {f['rate_limited']:,} 429s"
            + (f", pace {f['pace']}" if f["pace"] else "")
        )
    elif f["elapsed_s"] is not None:
        lines.append(f"  time spent running: {duration(f['elapsed_s'])}")
    lines.append(f"  results: {f['results']}")
    lines.append(f"  errors:  {f['errors']}")
    return "\n".join(lines)
