"""``batchq status``: a job's figures, read from disk without disturbing a running job.

Everything is read, nothing written: the journal's complete records give
the counts and tokens (a record being written right now is simply not
counted yet), the lock tells whether a process is running the job. A
sharded job's figures are its shards' summed, and each shard is listed.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import Any

from batchq.config import build_settings, window_hours
from batchq.cost import Prices, cost_figures, money
from batchq.errors import ConfigError
from batchq.job.batches import read_ledger
from batchq.job.folder import JOB_TOML, _resolve, read_progress, read_state, running_pid
from batchq.job.journal import JOURNAL_NAME, Totals, read_journal
from batchq.job.settings import read_job_toml
from batchq.job.shard import read_cut, shard_folders
from batchq.job.spend import SPEND_JSON, job_prices, read_spend
from batchq.stats import duration

#: Figures of a running process, from its progress.json; summed over running shards.
_LIVE_SUMS: tuple[str, ...] = ("in_flight", "allowance", "peak_in_flight", "hedges", "retries")
_LIVE_SUMS += ("rate_limited", "invalid_answers")


def job_status(job_dir: Path) -> dict[str, Any]:
    """The figures of the job in ``job_dir`` as one JSON-ready dict.

    A sharded job has ``shards``: one dict per shard (``shard``, ``state``,
    ``pid``, ``total``, ``done``, ``succeeded``, ``failed``, ``pending``,
    ``results``, ``errors``); its figures are their sums.
    """
    if not (job_dir / JOB_TOML).exists():
        raise ConfigError(f"{job_dir} has no {JOB_TOML}: not a batchq job folder")
    job = _resolve(job_dir, build_settings(read_job_toml(job_dir / JOB_TOML), {}))
    state = read_state(job_dir)
    total = state.get("input_requests")
    cut = read_cut(job_dir, state)
    prices = job_prices(job.settings) if job.settings.via == "live" else None
    model = job.settings.model
    if cut is None:
        part = _part(job_dir, job.results, job.errors, total, started=bool(state))
        part["batches"] = _batches(job_dir, job.settings.completion_window)
        spent, budget = _spent(job_dir, prices, model)
        part["cost"] = _cost(spent, part["done"], part["pending"], budget)
        return {"job": str(job_dir), "input": str(job.input), **part}
    parts = []
    count = cut.count
    for index, folder in enumerate(shard_folders(job_dir, count)):
        shard_state = read_state(folder) if folder.is_dir() else {}
        part = _part(
            folder,
            folder / "results.jsonl",
            folder / "errors.jsonl",
            shard_state.get("requests"),
            started=bool(shard_state),
        )
        part["spent"] = _spent(folder, prices, model)[0]
        parts.append({"shard": f"{index}/{count}", **part})
    done = sum(p["done"] for p in parts)
    running = [p for p in parts if p["pid"] is not None]
    if running:
        phase = "running"
    elif total is not None and done >= total:
        phase = "finished"
    elif any(p["state"] != "not started" for p in parts):
        phase = "interrupted"
    else:
        phase = "not started"
    figures = {
        "job": str(job_dir),
        "input": str(job.input),
        "state": phase,
        "pid": None,
        "total": total,
        "done": done,
        "pending": None if total is None else max(0, total - done),
    }
    for name in ("succeeded", "failed", "prompt_tokens", "completion_tokens"):
        figures[name] = sum(p[name] for p in parts)
    for name in _LIVE_SUMS:
        figures[name] = sum(p[name] or 0 for p in running) if running else None
    figures["binding"] = None
    figures["pace"] = None
    spent = None if prices is None else sum(p["spent"] for p in parts)
    figures["cost"] = _cost(spent, done, figures["pending"], None)  # no budget with shards
    elapsed = [p["elapsed_s"] for p in parts if p["elapsed_s"] is not None]
    figures["elapsed_s"] = max(elapsed) if elapsed else None  # the shards run side by side
    figures["results"] = str(job_dir / "shard-*" / "results.jsonl")
    figures["errors"] = str(job_dir / "shard-*" / "errors.jsonl")
    figures["shards"] = parts
    return figures


def _spent(
    run_dir: Path, prices: Prices | None, model: str | None
) -> tuple[float | None, float | None]:
    """What a folder's runs have spent, from its spend.json (None: the job has no price),
    and the budget its last run kept."""
    if prices is None:
        return None, None
    totals = Totals()  # the journal's are read only for a job that never had a price
    if not (run_dir / SPEND_JSON).exists():
        _, totals, _ = read_journal(run_dir / JOURNAL_NAME)
    tally, budget = read_spend(run_dir, totals, model)
    return prices.cost(tally), budget


def _cost(
    spent: float | None, done: int, pending: int | None, budget: float | None
) -> dict[str, Any] | None:
    return None if spent is None else cost_figures(spent, done, pending, budget)


def _part(
    run_dir: Path, results: Path, errors: Path, total: int | None, *, started: bool
) -> dict[str, Any]:
    """The figures of one process's folder: the job's, or a shard's."""
    _, totals, _ = read_journal(run_dir / JOURNAL_NAME)
    done = totals.ok + totals.failed
    pid = running_pid(run_dir)
    if pid is not None:
        phase = "running"
    elif total is not None and done >= total:
        phase = "finished"
    elif started:
        phase = "interrupted"
    else:
        phase = "not started"
    live = read_progress(run_dir) if pid is not None else {}
    return {
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
        "invalid_answers": live.get("invalid_answers"),
        "elapsed_s": live.get("elapsed_s", read_state(run_dir).get("elapsed_s")),
        "retries": live.get("retries"),
        "rate_limited": live.get("rate_limited"),
        "pace": live.get("pace"),
        "results": str(results),
        "errors": str(errors),
    }


def _batches(run_dir: Path, window: str) -> list[dict[str, Any]]:
    """The provider batches of a folder, as the ledger last saw them."""
    now = time.time()
    hours = window_hours(window) or 24
    rows = []
    for chunk in read_ledger(run_dir):
        created = chunk.created_at
        rows.append(
            {
                "chunk": chunk.name,
                "batch_id": chunk.batch_id,
                "state": chunk.status or ("collected" if chunk.collected else "submitting"),
                "open": not chunk.collected,
                "lines": chunk.count,
                "counts": chunk.counts,
                "attempt": chunk.attempt,
                "age_s": None if created is None else round(now - created, 1),
                "deadline": None if created is None else round(created + hours * 3600),
            }
        )
    return rows


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
    if (cost := f.get("cost")) is not None:
        line = f"  cost: {money(cost['spent'])} spent"
        if cost["projected"] is not None:
            line += f", ~{money(cost['projected'])} for the whole job"
        lines.append(line + (f"; budget {money(cost['budget'])}" if cost["budget"] else ""))
    if f["state"] == "running" and f["in_flight"] is not None:
        lines.append(
            f"  running for {duration(f['elapsed_s'])}: {f['in_flight']}/{f['allowance']} "
            f"in flight" + (f" ({f['binding']})" if f["binding"] else "") + ", "
            f"{f['retries']:,} retries, {f['rate_limited']:,} 429s"
            + (f", {f['invalid_answers']:,} invalid answers" if f.get("invalid_answers") else "")
            + (f", pace {f['pace']}" if f["pace"] else "")
        )
    elif f["elapsed_s"] is not None:
        lines.append(f"  time spent running: {duration(f['elapsed_s'])}")
    open_batches = [b for b in f.get("batches", ()) if b["open"]]
    if f.get("batches"):
        held = sum(b["lines"] for b in open_batches)
        lines.append(
            f"  provider batches: {len(f['batches'])}, {len(open_batches)} open "
            f"holding {held:,} lines"
        )
    for b in open_batches:
        age = "" if b["age_s"] is None else f", {duration(b['age_s'])} old"
        counts = b["counts"]
        done = (
            f", {counts.get('completed', 0):,}/{counts.get('total', b['lines']):,} done"
            if counts
            else ""
        )
        lines.append(
            f"    {b['batch_id'] or b['chunk']}: {b['state']}, {b['lines']:,} lines{done}{age}"
        )
    for part in f.get("shards", ()):
        shard_total = "?" if part["total"] is None else f"{part['total']:,}"
        pid = f" (pid {part['pid']})" if part["pid"] else ""
        lines.append(
            f"  shard {part['shard']}: {part['state']}{pid}, {part['done']:,} of "
            f"{shard_total} done ({part['failed']:,} failed)"
        )
    lines.append(f"  results: {f['results']}")
    lines.append(f"  errors:  {f['errors']}")
    return "\n".join(lines)
