"""Shards: one job run as N processes, each over a contiguous part of the input.

Shard I of N (I counting from 0, as Kubernetes' ``JOB_COMPLETION_INDEX``
does) takes the bytes ``[start_I, start_{I+1})`` of the input, where
``start_I`` is the first line start at or after ``I * size // N`` and
``start_N`` is ``size``. The cuts fall on line starts, so every line lies in
exactly one shard, a line longer than a shard included (the shards it would
have crossed are then empty). ``boundaries`` is that rule as a pure function.

A shard runs in its own folder, ``JOB/shard-I-of-N/``, with its own lock,
journal, outputs and progress; the job's ``job.toml`` and ``state.json``
(the pinned input, whole) are shared. Line numbers stay the input's, so the
ids ``line-N`` and the order of ``batchq export`` are the whole job's.

**The count is fixed when the job is sharded**, with the input's size then
(the cut, in ``shards.json``): changing N, or running a sharded job whole (or
a started whole job as shards), is refused. Lines appended to the input
afterwards belong to the last shard. The cut has a file of its own, written
once: ``state.json`` is rewritten as the input grows, and the way out of a
damaged one is to delete it, which must not lose where the shards' parts
begin (re-cut at another size, lines done by one shard would fall into its
neighbour's part and be sent and written twice). A job sharded by a batchq
that kept the cut in ``state.json`` gets its ``shards.json`` on its next run.

What several shards share is created and checked under the job's
``setup.lock`` (``job.setup_lock``), held only for that moment: all N may
start at the same instant on the same folder, as a scheduler starts them.
"""

from __future__ import annotations

import re
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any, BinaryIO

import orjson

from batchq.errors import ConfigError
from batchq.job import durable

#: The environment variable that gives ``--shard auto`` its count beside JOB_COMPLETION_INDEX.
SHARDS_ENV = "BATCHQ_SHARDS"
#: The file of a sharded job's cut.
SHARDS_JSON = "shards.json"
#: The most shards a job is cut into: the cut seeks once a shard, and an export indexes
#: two files a shard (results.py: 32,768 at most).
MAX_SHARDS = 10_000

_SPEC = re.compile(r"\s*(\d+)\s*/\s*(\d+)\s*")


@dataclass(frozen=True, slots=True)
class Shard:
    """Shard ``index`` of ``count``, 0 <= index < count."""

    index: int
    count: int

    def __post_init__(self) -> None:
        if not 0 <= self.index < self.count:
            raise ConfigError(
                f"--shard {self.index}/{self.count}: I must be at least 0 and less than N "
                "(shards count from 0, as JOB_COMPLETION_INDEX does)"
            )
        if self.count > MAX_SHARDS:
            raise ConfigError(
                f"--shard {self.index}/{self.count}: N must be at most {MAX_SHARDS:,} shards"
            )

    @property
    def folder(self) -> str:
        return folder_name(self.index, self.count)

    def __str__(self) -> str:
        return f"{self.index}/{self.count}"


def folder_name(index: int, count: int) -> str:
    """The folder of shard ``index`` of ``count`` inside its job."""
    return f"shard-{index}-of-{count}"


def parse_shard(spec: str, env: Mapping[str, str]) -> Shard:
    """``I/N``, or ``auto``: the scheduler's index and count from ``env``.

    ``auto`` reads ``JOB_COMPLETION_INDEX`` (a Kubernetes Indexed Job) with the
    count from ``BATCHQ_SHARDS`` (Kubernetes does not pass ``completions`` to
    the pod), else Slurm's ``SLURM_ARRAY_TASK_ID`` and ``SLURM_ARRAY_TASK_COUNT``
    (an array ``--array=A-B[:STEP]`` is counted from A in steps of STEP).
    Raises ConfigError if neither is there or a value is not a number.
    """
    if spec.strip() != "auto":
        match = _SPEC.fullmatch(spec)
        if match is None:
            raise ConfigError(f"--shard {spec!r} is not I/N (e.g. 0/4) or auto")
        return Shard(int(match[1]), int(match[2]))
    if "JOB_COMPLETION_INDEX" in env:
        if SHARDS_ENV not in env:
            raise ConfigError(
                f"--shard auto: JOB_COMPLETION_INDEX is set but {SHARDS_ENV} is not; set "
                f"{SHARDS_ENV} to the Job's completions in the pod's env"
            )
        return Shard(_number(env, "JOB_COMPLETION_INDEX"), _number(env, SHARDS_ENV))
    if "SLURM_ARRAY_TASK_ID" in env:
        task, count = _number(env, "SLURM_ARRAY_TASK_ID"), _number(env, "SLURM_ARRAY_TASK_COUNT")
        first = _number(env, "SLURM_ARRAY_TASK_MIN", default=0)
        step = max(1, _number(env, "SLURM_ARRAY_TASK_STEP", default=1))
        if (task - first) % step:
            raise ConfigError(f"--shard auto: Slurm task {task} is not in the array's steps")
        return Shard((task - first) // step, count)
    raise ConfigError(
        f"--shard auto needs JOB_COMPLETION_INDEX and {SHARDS_ENV} (Kubernetes), or "
        "SLURM_ARRAY_TASK_ID and SLURM_ARRAY_TASK_COUNT (Slurm); or give --shard I/N"
    )


def _number(env: Mapping[str, str], name: str, default: int | None = None) -> int:
    value = env.get(name)
    if value is None and default is not None:
        return default
    if value is None or not value.strip().isdigit():
        raise ConfigError(f"--shard auto: ${name} is {value!r}, not a whole number")
    return int(value)


def boundaries(size: int, count: int, line_start: Callable[[int], int]) -> list[int]:
    """Where each of ``count`` shards of a ``size``-byte input begins, and ``size`` last.

    Shard I covers ``[result[I], result[I + 1])``. ``line_start(offset)`` is
    the first line start at or after ``offset`` (``size`` if there is none).
    """
    return [min(size, line_start(i * size // count)) for i in range(count)] + [size]


def file_line_start(f: BinaryIO, size: int) -> Callable[[int], int]:
    """``line_start`` for ``boundaries`` over the first ``size`` bytes of an open file."""

    def line_start(offset: int) -> int:
        if offset <= 0:
            return 0
        f.seek(offset - 1)  # a line starts at offset if the byte before it ends one
        position = offset - 1
        while position < size:
            chunk = f.read(min(1 << 16, size - position))
            if not chunk:
                break
            newline = chunk.find(b"\n")
            if newline >= 0:
                return position + newline + 1
            position += len(chunk)
        return size

    return line_start


def count_newlines(f: BinaryIO, end: int) -> int:
    """How many newlines the first ``end`` bytes of ``f`` hold."""
    f.seek(0)
    count = position = 0
    while position < end:
        chunk = f.read(min(1 << 20, end - position))
        if not chunk:
            break
        count += chunk.count(b"\n")
        position += len(chunk)
    return count


@dataclass(frozen=True, slots=True)
class Span:
    """The part of the input one run reads: bytes ``[start, end)``, from line ``first_line``,
    holding ``requests`` non-blank lines."""

    start: int
    end: int
    first_line: int
    requests: int


def shard_folders(job_dir: Path, count: int) -> list[Path]:
    return [job_dir / folder_name(i, count) for i in range(count)]


@dataclass(frozen=True, slots=True)
class Cut:
    """How a sharded job's input is cut: into ``count`` parts of its first ``size`` bytes."""

    count: int
    size: int


def read_cut(job_dir: Path, state: Mapping[str, Any]) -> Cut | None:
    """The job's cut, or None if it was never sharded; ``state`` is its state.json, where a
    batchq before shards.json kept the cut. ConfigError (exit 2) if shards.json is damaged."""
    path = job_dir / SHARDS_JSON
    try:
        cut = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        cut = state  # None unless it holds the keys
    except (OSError, orjson.JSONDecodeError) as exc:
        raise _damaged(path, str(exc)) from exc
    else:
        if not (isinstance(cut, dict) and _whole(cut.get("shards"), 1)):
            raise _damaged(path, "changed outside batchq")
        if not _whole(cut.get("shard_size"), 0):
            raise _damaged(path, "changed outside batchq")
    count, size = cut.get("shards"), cut.get("shard_size")
    if isinstance(count, int) and isinstance(size, int):
        return Cut(count, size)
    return None


def write_cut(job_dir: Path, cut: Cut) -> None:
    data = {"shards": cut.count, "shard_size": cut.size}
    durable.atomic_write(job_dir / SHARDS_JSON, orjson.dumps(data, option=orjson.OPT_INDENT_2))


def _whole(value: object, least: int) -> bool:
    return type(value) is int and value >= least


def _damaged(path: Path, why: str) -> ConfigError:
    # Not "delete it": without the cut, the shards' done lines cannot be placed.
    return ConfigError(
        f"{path} is damaged ({why}); it records where the job's input was cut among its "
        'shards, {"shards": N, "shard_size": BYTES}: restore it from a backup, or start '
        "afresh with --job NEWDIR"
    )


def refuse_other_count(job_dir: Path, cut: Cut | None, shard: Shard | None) -> None:
    """Refuse (ConfigError, exit 2) to run a job with another count than it was sharded with,
    or one run as shards whose cut is lost."""
    if cut is None:
        if any(job_dir.glob("shard-*-of-*")):  # folder_name's folders
            raise ConfigError(
                f"job {job_dir} was run as shards, but where its input was cut is lost "
                f"({SHARDS_JSON} is missing); cut afresh, lines done by one shard would be "
                "sent again by another: start afresh with --job NEWDIR"
            )
        return
    count = cut.count
    if shard is None:
        raise ConfigError(
            f"job {job_dir} runs as {count} shards; run each with --shard I/{count} "
            f"(I from 0 to {count - 1}): `batchq status` and `batchq export` see the whole job"
        )
    if count != shard.count:
        raise ConfigError(
            f"job {job_dir} was started as {count} shards, not {shard.count}: its shards' "
            f"checkpoints cover other parts of the input; run it with --shard I/{count}, "
            f"or start afresh with --job NEWDIR (or delete {job_dir})"
        )
