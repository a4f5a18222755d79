"""``spend.json``: the tokens a job was billed for, by model, across all its runs.

The journal's totals count the tokens of the lines that are done; the bill also
holds what no output line shows (a 2xx that was retried all the same), the cached
prompt tokens, and which model each answer came from. The live
runner counts them as answers arrive, and the journal saves them here, in its
commit thread, *before* each commit record: every line the journal calls done
has its cost in this file, so a budget still holds after a crash. (What was
answered but not yet committed when the process died is sent again, and its
first answer is not in the file: the bill can only be understated by that.)

One small JSON object, replaced atomically, read once when a job opens: a
million-line job resumes as fast as a ten-line one.
"""

from __future__ import annotations

from pathlib import Path
from typing import TYPE_CHECKING

import orjson

from batchq.config import Settings
from batchq.cost import NO_MODEL, Meter, Prices, Tally
from batchq.errors import ConfigError, JournalError
from batchq.job import durable as durable_io
from batchq.job.journal import Journal, Totals

if TYPE_CHECKING:  # pragma: no cover
    from batchq.job.folder import Job  # which reads SPEND_JSON from here

SPEND_JSON = "spend.json"


def job_prices(settings: Settings) -> Prices | None:
    """The job's prices; None if it has none (then no cost is shown)."""
    s = settings
    return Prices.from_settings(s.price_in, s.price_out, s.price_cached_in, s.prices)


def open_meter(job: Job, journal: Journal) -> Meter | None:
    """The run's meter, counting on from what the job's files say was spent, and saved
    with each commit of ``journal``; None for a job with no price."""
    settings = job.settings
    prices = job_prices(settings)
    if prices is None or settings.via != "live":  # batches: the summary's token-based cost
        return None
    if settings.max_cost is not None and job.shard is not None:
        raise ConfigError(
            "--max-cost does not go with --shard: the shards run as separate processes, "
            "which cannot keep one budget; run the job unsharded, or as separate jobs"
        )
    tally, _ = read_spend(job.run_dir, journal.totals, settings.model)
    journal.sidecar = SpendFile(job.run_dir, tally, settings.max_cost, durable=journal.durable)
    return Meter.open(prices, tally, settings.max_cost)


def read_spend(run_dir: Path, totals: Totals, model: str | None) -> tuple[Tally, float | None]:
    """The job's billed tokens so far, and the budget its last run kept.

    A job whose earlier runs had no price has no spend.json: the tokens of its
    done lines (the journal's ``totals``) stand for what they cost.
    """
    path = run_dir / SPEND_JSON
    try:
        data = orjson.loads(path.read_bytes())
        budget = data.get("budget")
        if budget is not None and not isinstance(budget, int | float):
            raise ValueError("budget is not a number")
        return Tally.from_json(data.get("tokens")), budget
    except FileNotFoundError:
        tally = Tally()
        if totals.prompt_tokens or totals.completion_tokens:
            tally.by_model[model or NO_MODEL] = [
                totals.ok, totals.prompt_tokens, 0, totals.completion_tokens,
            ]  # fmt: skip
        return tally, None
    except OSError as exc:
        raise JournalError(f"cannot read {path}: {exc.strerror}") from exc
    except (orjson.JSONDecodeError, AttributeError, ValueError) as exc:
        raise JournalError(
            f"{path} is damaged ({exc}): it keeps what the job has spent, for --max-cost; "
            "put it back, or remove it to count from the tokens of the done lines only"
        ) from None


class SpendFile:
    """What the journal saves beside each commit record: the tally as it is at the commit.

    ``snapshot`` runs on the event loop when a commit takes its lines; ``save`` in the
    commit's thread, before the record is written.
    """

    def __init__(
        self, run_dir: Path, tally: Tally, budget: float | None, *, durable: bool = True
    ) -> None:
        self.path = run_dir / SPEND_JSON
        self.tally = tally
        self.budget = budget
        self.durable = durable
        self._saved: bytes | None = None

    def snapshot(self) -> bytes:
        figures = {"tokens": self.tally.as_json(), "budget": self.budget}
        return orjson.dumps(figures, option=orjson.OPT_SORT_KEYS)

    def save(self, snapshot: bytes) -> None:
        if snapshot == self._saved:
            return
        if self.durable:
            durable_io.atomic_write(self.path, snapshot)
        else:  # --no-fsync, for measurements: whole after a crash of the process, not of power
            tmp = self.path.with_name(SPEND_JSON + ".new")
            f = durable_io.open_file(tmp, truncate=True)
            try:
                durable_io.write(f, snapshot)
            finally:
                durable_io.close(f)
            durable_io.replace(tmp, self.path)
        self._saved = snapshot
