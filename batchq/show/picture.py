"""What ``batchq view`` and ``batchq report`` show of a job: its figures, its charts' series,
its failures by code. Read from disk only: no lock is taken, nothing is written.

The series come from each run folder's ``history.jsonl`` (job/history.py).
Its counters restart at every run, so they are first made the job's (each
run adds to where the one before ended); a sharded job's folders are then
added up at every instant one of them recorded. Rates are differences of
counters over the time between two points: a point left out by thinning
loses no count.
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import IO, Any

import orjson

from batchq.config import Settings, build_settings, shell_quote, strip_secrets
from batchq.errors import ConfigError
from batchq.job.folder import JOB_TOML, _resolve, read_progress, read_state
from batchq.job.history import read_history
from batchq.job.journal import JOURNAL_NAME, Totals, read_totals
from batchq.job.settings import read_job_toml
from batchq.job.shard import read_cut, shard_folders
from batchq.job.spend import job_prices, read_spend
from batchq.stats import duration

#: A folder holding a journal, and the results and errors files it commits.
Part = tuple[Path, Path, Path]

#: Counters of a run that restart at zero on a resume.
_RUN_COUNTERS = ("rate_limited", "invalid_answers", "prompt_tokens", "completion_tokens", "cost")
#: Figures of an instant, summed over the shards running then.
_GAUGES = ("in_flight", "allowance", "pace")
#: A progress.json older than this belongs to a process that is gone.
_STALE = 15.0
#: An endpoint chooses its error codes: each is cut to this many characters, and codes
#: beyond the first MAX_CODES are counted under OTHER_CODE, so the failures table, the
#: report and the page stay small whatever it sends.
CODE_CHARS = 64
MAX_CODES = 50
OTHER_CODE = "other"
#: The first example's message and custom_id are cut to this many characters.
_EXAMPLE_CHARS = 500


@dataclass(frozen=True, slots=True)
class JobFolder:
    """A job folder as the view reads it: settings, input, and each process's folder."""

    dir: Path
    settings: Settings
    input: Path
    parts: list[Part]
    sharded: bool


def open_folder(job_dir: Path) -> JobFolder:
    """The job in ``job_dir``; ConfigError (exit 2) if it is not a job folder."""
    if not (job_dir / JOB_TOML).exists():
        raise ConfigError(f"{job_dir} has no {JOB_TOML}: not a batchq job folder")
    job = _resolve(job_dir, build_settings(read_job_toml(job_dir / JOB_TOML), {}))
    cut = read_cut(job_dir, read_state(job_dir))
    if cut is None:
        return JobFolder(
            job_dir, job.settings, job.input, [(job_dir, job.results, job.errors)], False
        )
    parts = [
        (f, f / "results.jsonl", f / "errors.jsonl") for f in shard_folders(job_dir, cut.count)
    ]
    return JobFolder(job_dir, job.settings, job.input, parts, True)


def picture(folder: JobFolder, failures: Failures | None = None) -> dict[str, Any]:
    """Everything the page draws, as one JSON-ready dict: ``figures``, ``series``, ``failures``."""
    failures = failures or Failures(folder)
    # read once: a long job's journals are megabytes, and a running job's page asks every 3 s
    totals = [read_totals(run_dir / JOURNAL_NAME) for run_dir, _, _ in folder.parts]
    failures.update(totals)
    series = job_series([read_history(part[0]) for part in folder.parts])
    return {
        "figures": figures(folder, series, totals),
        "series": series,
        "failures": failures.summary(),
    }


def figures(folder: JobFolder, series: dict[str, Any], journals: list[Totals]) -> dict[str, Any]:
    """The job's headline figures: counts from the journals, the live ones from progress.json."""
    s = folder.settings
    ok = failed = prompt = completion = 0
    running, elapsed = [], 0.0
    now = time.time()
    for (run_dir, _, _), totals in zip(folder.parts, journals, strict=True):
        ok, failed = ok + totals.ok, failed + totals.failed
        prompt, completion = prompt + totals.prompt_tokens, completion + totals.completion_tokens
        live = read_progress(run_dir)
        spent = float(read_state(run_dir).get("elapsed_s") or 0)  # by the runs that ended
        if _alive(live, now):
            running.append(live)
            spent += _num(live.get("elapsed_s"))  # a damaged figure counts as none
        elapsed = max(elapsed, spent)  # shards run side by side
    total = read_state(folder.dir).get("input_requests")
    done = ok + failed
    if running:
        phase = "running"
    elif total is not None and done >= total:
        phase = "finished"
    elif done or series["t"]:
        phase = "interrupted"
    else:
        phase = "not started"
    rates = [r for r in series["done_rate"][-3:] if r is not None]
    rate = sum(rates) / len(rates) if rates else None
    pending = None if total is None else max(0, total - done)
    cost = None
    if (prices := job_prices(s) if s.via == "live" else None) is not None:
        # as billed (spend.json): cached tokens, prices by model, 2xx answers asked again
        parts = zip(folder.parts, journals, strict=True)
        spent = sum(prices.cost(read_spend(d, t, s.model)[0]) for (d, _, _), t in parts)
        cost = round(spent, 6)
    elif s.price_in or s.price_out:
        cost = round((prompt * s.price_in + completion * s.price_out) / 1e6, 6)
    return {
        "job": str(folder.dir),
        "name": folder.dir.name,
        "input": str(folder.input),
        "model": s.model,
        "endpoint": s.endpoint,
        "base_url": strip_secrets(s.base_url, mask="***")[0],
        "state": phase,
        "total": total,
        "done": done,
        "succeeded": ok,
        "failed": failed,
        "pending": pending,
        "prompt_tokens": prompt,
        "completion_tokens": completion,
        "cost": cost,
        "elapsed": duration(elapsed) if elapsed else None,
        "rate": None if rate is None else round(rate, 2),
        "mean_rate": _mean_rate(series) or (round(done / elapsed, 2) if elapsed else None),
        "eta": duration(pending / rate) if phase == "running" and pending and rate else None,
        "in_flight": sum(int(_num(r.get("in_flight"))) for r in running) if running else None,
        "binding": running[0].get("binding") if len(running) == 1 else None,
        "shards": len(folder.parts) if folder.sharded else None,
        "resume_command": f"batchq run {shell_quote(str(folder.dir))}"
        + (
            f" --shard I/{len(folder.parts)} for each shard I not finished"
            if folder.sharded
            else ""
        ),
        "updated": round(now, 3),
    }


def _mean_rate(series: dict[str, Any]) -> float | None:
    """Requests done a second while a run was running (the gaps between runs left out)."""
    t, rates = series["t"], series["done_rate"]
    spans = [(t[i] - t[i - 1], r) for i, r in enumerate(rates) if r is not None]
    seconds = sum(dt for dt, _ in spans)
    return round(sum(dt * r for dt, r in spans) / seconds, 2) if seconds else None


def _alive(progress: dict[str, Any], now: float) -> bool:
    """Whether the progress.json is a running process's: fresh, and its process is there."""
    pid, updated = progress.get("pid"), progress.get("updated")
    if not isinstance(pid, int) or not isinstance(updated, int | float) or now - updated > _STALE:
        return False
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True  # another user's process
    return True


def job_series(histories: list[list[dict[str, Any]]]) -> dict[str, Any]:
    """The charts' series, one value per point in time (``t``, Unix seconds) each."""
    parts = [_job_counters(records) for records in histories if records]
    points = parts[0] if len(parts) == 1 else _added(parts)
    t = [p["t"] for p in points]
    causes = sorted({cause for p in points for cause in p["retries"]})
    out: dict[str, Any] = {
        "t": t,
        "done": [p["done"] for p in points],
        "done_rate": _rate(points, "done"),
        "ok_rate": _rate(points, "ok"),
        "failed_rate": _rate(points, "failed"),
        "pace": [p["pace"] for p in points],
        "in_flight": [p["in_flight"] for p in points],
        "allowance": [p["allowance"] for p in points],
        "binding": [p["binding"] for p in points],
        "p50": [p["p50"] for p in points],
        "p95": [p["p95"] for p in points],
        "p99": [p["p99"] for p in points],
        "rate_limited": _rate(points, "rate_limited", per=60),
        "invalid_rate": _rate(points, "invalid_answers", per=60),
        "retries": {c: _rate(points, c, per=60, within="retries") for c in causes},
        "prompt_tps": _rate(points, "prompt_tokens"),
        "completion_tps": _rate(points, "completion_tokens"),
        "cost": [p.get("cost") for p in points] if any("cost" in p for p in points) else None,
    }
    return out


def _job_counters(records: list[dict[str, Any]]) -> list[dict[str, Any]]:
    """Records whose run counters count the whole job: a resumed run adds to the last."""
    base: dict[str, float] = {}
    base_retries: dict[str, float] = {}
    last: dict[str, Any] | None = None
    points = []
    for r in records:
        if last is not None and r.get("run") != last.get("run"):
            for name in _RUN_COUNTERS:
                base[name] = base.get(name, 0) + _num(last.get(name))
            for cause, n in _causes(last).items():
                base_retries[cause] = base_retries.get(cause, 0) + _num(n)
        point = {
            "t": r["t"],
            "gap": last is None or r.get("run") != last.get("run"),
            "done": _num(r.get("done")),
            "ok": _num(r.get("ok")),
            "failed": _num(r.get("failed")),
            "binding": r.get("binding"),
            **{g: _reading(r.get(g)) for g in _GAUGES},
            **{p: _reading(r.get(p)) for p in ("p50", "p95", "p99")},
        }
        for name in _RUN_COUNTERS:
            if name in r or name in base:
                point[name] = base.get(name, 0) + _num(r.get(name))
        retries = dict(base_retries)
        for cause, n in _causes(r).items():
            retries[cause] = retries.get(cause, 0) + _num(n)
        point["retries"] = retries
        points.append(point)
        last = r
    return points


def _added(parts: list[list[dict[str, Any]]]) -> list[dict[str, Any]]:
    """Several folders' points as one: at each instant any of them recorded, the sum of what
    each had recorded last (a folder not yet started counts nothing)."""
    instants = sorted(
        {(p["t"], i, k) for i, points in enumerate(parts) for k, p in enumerate(points)}
    )
    latest: dict[int, dict[str, Any]] = {}
    merged = []
    for t, i, k in instants:
        latest[i] = parts[i][k]
        current = list(latest.values())
        point: dict[str, Any] = {"t": t, "gap": False, "retries": {}}
        for name in ("done", "ok", "failed", *_RUN_COUNTERS):
            if any(name in p for p in current):
                point[name] = sum(_num(p.get(name)) for p in current)
        for name in _GAUGES:
            values = [p[name] for p in current if p.get(name) is not None]
            point[name] = round(sum(values), 3) if values else None
        for p in current:
            for cause, n in p["retries"].items():
                point["retries"][cause] = point["retries"].get(cause, 0) + n
        own = parts[i][k]  # latencies are of one folder's answers: the one that recorded now
        point.update({p: own.get(p) for p in ("p50", "p95", "p99", "binding")})
        merged.append(point)
    return merged


def _rate(
    points: list[dict[str, Any]], name: str, *, per: float = 1.0, within: str | None = None
) -> list[float | None]:
    """How fast a counter grew between each point and the one before (None for the first)."""
    out: list[float | None] = []
    for before, p in zip([None, *points], points, strict=False):
        if before is None or p["gap"] or p["t"] <= before["t"]:
            out.append(None)
            continue
        now_, then = (p[within], before[within]) if within else (p, before)
        grown = _num(now_.get(name)) - _num(then.get(name))
        out.append(round(max(0.0, grown) * per / (p["t"] - before["t"]), 3))
    return out


def _num(value: object) -> float:
    return value if isinstance(value, int | float) and not isinstance(value, bool) else 0


def _reading(value: object) -> float | None:
    """A gauge or latency as recorded; None when missing or damaged (not a number)."""
    return value if isinstance(value, int | float) and not isinstance(value, bool) else None


def _causes(record: dict[str, Any]) -> dict[str, Any]:
    """A record's retries by cause; none when missing or damaged (not an object)."""
    retries = record.get("retries")
    return retries if isinstance(retries, dict) else {}


@dataclass
class Failures:
    """The job's failures by ``error.code``: counts and the first of each, read incrementally
    from the committed part of each errors file (a file rewritten by ``--retry-failed`` is
    read afresh)."""

    folder: JobFolder
    codes: dict[str, dict[str, Any]] = field(default_factory=dict)
    _read: dict[Path, tuple[int, int]] = field(default_factory=dict)  # inode, bytes read

    def update(self, journals: list[Totals]) -> None:
        """Count what the errors files gained; ``journals`` are the parts' committed totals."""
        for (_, _, errors), totals in zip(self.folder.parts, journals, strict=True):
            try:
                with errors.open("rb") as f:
                    inode = os.fstat(f.fileno()).st_ino
                    known_inode, start = self._read.get(errors, (inode, 0))
                    if known_inode != inode or start > totals.errors_len:
                        self.codes.clear()  # rewritten: every file is read again
                        self._read.clear()
                        self.update(journals)
                        return
                    f.seek(start)
                    taken = self._count_lines(f, totals.errors_len - start)
            except FileNotFoundError:
                continue
            self._read[errors] = (inode, start + taken)

    def _count_lines(self, f: IO[bytes], limit: int) -> int:
        """Count the whole lines in the next ``limit`` bytes of ``f``; the bytes they took.
        A line at a time: memory holds one line, not the errors file of a million lines."""
        taken = 0
        for raw in f:
            if taken + len(raw) > limit or not raw.endswith(b"\n"):
                break
            taken += len(raw)
            self._count(raw)
        return taken

    def _count(self, raw: bytes) -> None:
        try:
            line = orjson.loads(raw)
            error = line.get("error") or {}
            code = str(error.get("code") or "unknown")[:CODE_CHARS]
        except (orjson.JSONDecodeError, AttributeError):
            return
        extra = line.get("batchq") or {}
        if code not in self.codes and len(self.codes) >= MAX_CODES:
            code = OTHER_CODE
        entry = self.codes.get(code)
        if entry is None:
            custom_id = line.get("custom_id")
            entry = self.codes[code] = {
                "code": code,
                "count": 0,
                "retryable": 0,
                "first": {
                    "line": extra.get("line"),
                    "custom_id": None if custom_id is None else str(custom_id)[:_EXAMPLE_CHARS],
                    "status": (line.get("response") or {}).get("status_code"),
                    "message": str(error.get("message") or "")[:_EXAMPLE_CHARS],
                },
            }
        entry["count"] += 1
        entry["retryable"] += bool(extra.get("retryable"))

    def summary(self) -> dict[str, Any]:
        codes = sorted(self.codes.values(), key=lambda c: -c["count"])
        retryable = sum(c["retryable"] for c in codes)
        command = f"batchq run {shell_quote(str(self.folder.dir))} --retry-failed"
        return {
            "total": sum(c["count"] for c in codes),
            "retryable": retryable,
            "codes": codes,
            "retry_command": command if retryable else None,
        }
