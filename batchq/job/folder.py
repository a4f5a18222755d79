"""A job folder: where it is, its settings, its pinned input, and its lock.

A job lives in ``jobs/<input stem>/`` unless ``--job`` names another folder::

    job.toml        settings, human-editable (config.py)
    results.jsonl   one line per request that succeeded   } journal.py owns these
    errors.jsonl    one line per request that failed      }
    journal.bin     the checkpoint                        }
    state.json      the input's fingerprint and line count
    shards.json     where a sharded job's input is cut, written once (shard.py)
    lock            held by the process running the job (fcntl.flock)
    setup.lock      held for a moment while a run pins the input and settles job.toml
    shard-I-of-N/   a shard's own lock, journal, outputs and progress (shard.py)

**The input is pinned.** ``state.json`` records the size and SHA-256 of the
input as it was read. A later run hashes that many bytes again: if they
differ, the file was changed and the done-set would point at other lines,
so the run refuses. Bytes beyond the pinned size are lines appended since,
and become new requests.
"""

from __future__ import annotations

import asyncio
import contextlib
import fcntl
import hashlib
import os
import re
import stat
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, BinaryIO, TypeVar

import orjson

from batchq.config import REQUEST_SETTINGS, Settings, build_settings, strip_secrets
from batchq.errors import ConfigError, InputError, JobLocked, StorageError
from batchq.job import durable
from batchq.job.batches import CHUNKS, LEDGER
from batchq.job.history import HISTORY
from batchq.job.journal import JOURNAL_NAME
from batchq.job.settings import read_job_toml, write_job_toml
from batchq.job.shard import (
    SHARDS_JSON,
    Cut,
    Shard,
    Span,
    boundaries,
    count_newlines,
    file_line_start,
    read_cut,
    refuse_other_count,
    write_cut,
)
from batchq.job.spend import SPEND_JSON
from batchq.reader import check_jsonl, without_bom
from batchq.stats import Stats

T = TypeVar("T")

JOB_TOML = "job.toml"
STATE_JSON = "state.json"
PROGRESS_JSON = "progress.json"
LOCK = "lock"
SETUP_LOCK = "setup.lock"


@dataclass(frozen=True, slots=True)
class Job:
    """A job folder and its settings, with every path resolved.

    ``save`` says that job.toml is to be (re)written with ``settings``: the
    run does that once it holds the job's lock, so a run that is refused
    changes nothing. ``created``: job.toml did not exist when the job was
    opened. ``shard``: the part of the input this run takes (None: all of it).
    """

    dir: Path
    settings: Settings
    input: Path
    results: Path
    errors: Path
    save: bool = False
    created: bool = False
    shard: Shard | None = None

    @property
    def run_dir(self) -> Path:
        """Where this run's lock, journal and progress are: the shard's folder, or the job's."""
        return self.dir if self.shard is None else self.dir / self.shard.folder


def with_shard(job: Job, shard: Shard) -> Job:
    """``job`` as shard ``shard`` runs it: its outputs in the shard's folder."""
    if (job.settings.output, job.settings.errors) != _OUTPUTS:
        raise ConfigError(
            "--output and --errors do not go with --shard: each shard writes its own "
            "results.jsonl and errors.jsonl in JOB/shard-I-of-N/; `batchq export JOB -o FILE` "
            "merges them in input order"
        )
    folder = job.dir / shard.folder
    return replace(job, shard=shard, results=folder / _OUTPUTS[0], errors=folder / _OUTPUTS[1])


_OUTPUTS = ("results.jsonl", "errors.jsonl")  # config.Settings' defaults


def open_job(
    target: Path,
    *,
    job_dir: Path | None,
    overrides: Mapping[str, Any],
    defaults: Mapping[str, Any],
    default_base_url: str | None,
    force: bool,
) -> tuple[Job, list[str]]:
    """The job that ``batchq run TARGET`` means, created if new; and notes for the user.

    ``target`` is an input file or a job folder. ``overrides`` are settings
    given on the command line (None = not given), ``defaults`` request
    parameters given there. A new job gets a job.toml with every setting,
    its base URL falling back to ``default_base_url``; an existing job keeps
    what defines its requests unless ``force``.
    """
    if target.is_dir():
        job_dir = job_dir or target
        if not (job_dir / JOB_TOML).exists():
            raise ConfigError(
                f"{job_dir} has no {JOB_TOML}; start a job with: batchq run INPUT.jsonl"
            )
        input_override = None
    else:
        job_dir = job_dir or Path("jobs") / target.stem
        input_override = target
    toml = job_dir / JOB_TOML
    stored = read_job_toml(toml) if toml.exists() else None
    overrides = dict(overrides)
    if defaults:
        overrides["defaults"] = {**(stored or {}).get("defaults", {}), **defaults}
    if overrides.get("base_url") is None and (
        stored is None  # a new job
        or (default_base_url and strip_secrets(default_base_url)[0] == stored.get("base_url"))
    ):  # (or the job's own, with the credentials that job.toml does not keep)
        overrides["base_url"] = default_base_url
    if input_override is not None:
        overrides["input"] = _input_setting(input_override, job_dir)
    if overrides.get("json_schema") is not None:  # as given, relative to the cwd
        overrides["json_schema"] = _input_setting(Path(overrides["json_schema"]), job_dir)
    if stored is None:
        settings = build_settings({}, overrides)
        job = _resolve(job_dir, settings, save=True)
        _check_input(job.input)
        _check_outputs(job)
        _refuse_foreign_outputs(job)
        durable.make_dirs(job_dir)
        return replace(job, created=True), [f"new job in {job_dir}"]
    settings = build_settings(stored, overrides)
    before = build_settings(stored, {})
    job = _resolve(job_dir, settings)
    if job.input.resolve() != _resolve(job_dir, before).input.resolve():
        raise ConfigError(
            f"job {job_dir} was made for {_resolve(job_dir, before).input}, not {job.input}; "
            "name another folder with --job to start a separate job"
        )
    _check_input(job.input)
    _check_outputs(job)
    moved = [n for n in ("output", "errors") if getattr(settings, n) != getattr(before, n)]
    if moved:
        raise ConfigError(
            f"job {job_dir} already writes its {' and '.join(moved)} where job.toml says; "
            "to move them, move the files and edit job.toml"
        )
    changed = [n for n in REQUEST_SETTINGS if getattr(settings, n) != getattr(before, n)]
    if changed and not force:
        raise ConfigError(
            f"this would change {', '.join(changed)} of job {job_dir}, whose done requests "
            "used the old values; pass --force to change them anyway, or --job NEWDIR"
        )
    if changed:
        job = _resolve(job_dir, settings, save=True)
        return job, [f"--force: changed {', '.join(changed)} for the remaining requests"]
    return job, []


def _input_setting(input_path: Path, job_dir: Path) -> str:
    """The input as job.toml names it: relative to the job if both sit under the cwd."""
    absolute = input_path.absolute()
    if absolute.is_relative_to(Path.cwd()) and job_dir.absolute().is_relative_to(Path.cwd()):
        return os.path.relpath(absolute, job_dir.absolute())
    return str(absolute)


def _resolve(job_dir: Path, settings: Settings, *, save: bool = False) -> Job:
    def path(p: str) -> Path:
        # normpath, not resolve: the folder may not exist yet, and ".." must not need it
        return Path(os.path.normpath(job_dir / Path(p).expanduser()))

    return Job(
        job_dir,
        settings,
        path(settings.input),
        path(settings.output),
        path(settings.errors),
        save,
    )


def save_settings(job: Job) -> None:
    """Write job.toml if the job was created or changed.

    Call it holding the run's lock (the job's, or its shard's), so that a run
    refused for any reason, another process running the same part included,
    changes nothing. The job's setup lock makes it one step with the check that
    another run did not create the job meanwhile with other settings.
    """
    if not job.save:
        return
    with setup_lock(job.dir):
        job = _settle_created(job)
        if job.save:
            write_job_toml(job.dir / JOB_TOML, job.settings)


def prepare(job: Job) -> tuple[PinnedInput, Span]:
    """Pin the input, check job.toml, and find the part of the input this run takes.

    All of it under the job's setup lock, so that runs started at the same
    instant on one folder (a scheduler's shards) neither race on job.toml and
    state.json nor disagree about them. A sharded job's count is fixed by its
    first shard; ConfigError (exit 2) for another count, for a sharded job run
    whole, or for a whole job started before as shards.
    """
    with setup_lock(job.dir):
        job = _settle_created(job)
        pinned = pin_input(job)
        cut = read_cut(job.dir, read_state(job.dir))
        refuse_other_count(job.dir, cut, job.shard)
        if job.shard is None:
            span = Span(0, pinned.size, 1, pinned.requests)
        else:
            if cut is None:
                if (job.dir / JOURNAL_NAME).exists() or running_pid(job.dir) is not None:
                    raise ConfigError(
                        f"job {job.dir} was started as one process, not as shards; finish it "
                        "that way (without --shard), or start afresh with --job NEWDIR"
                    )
                cut = Cut(job.shard.count, pinned.size)
            if not (job.dir / SHARDS_JSON).exists():  # new, or kept in state.json until now
                write_cut(job.dir, cut)
            span = _shard_span(job, job.shard, cut.size, pinned.size)
            durable.make_dirs(job.run_dir)
    return pinned, span


def _settle_created(job: Job) -> Job:
    """A job this run created may have been created meanwhile by another run: keep that one's
    job.toml if it means the same requests, refuse if not."""
    toml = job.dir / JOB_TOML
    if not (job.created and toml.exists()):
        return job
    theirs = build_settings(read_job_toml(toml), {})
    changed = [n for n in REQUEST_SETTINGS if getattr(theirs, n) != getattr(job.settings, n)]
    if changed or theirs.input != job.settings.input:
        raise ConfigError(
            f"job {job.dir} was created at the same moment by another run, with another "
            f"{', '.join(changed) or 'input'}; give every shard the same options"
        )
    return replace(job, save=False)


def _shard_span(job: Job, shard: Shard, shard_size: int, size: int) -> Span:
    """Shard's bytes, cut from the input as it was when the job was sharded: lines appended
    since then belong to the last shard."""
    try:
        with job.input.open("rb") as f:
            starts = boundaries(shard_size, shard.count, file_line_start(f, shard_size))
            start = starts[shard.index]
            end = starts[shard.index + 1] if shard.index + 1 < shard.count else size
            first_line = count_newlines(f, start) + 1
            f.seek(start)
            counter = _Fingerprint()
            counter.read(f, end - start)
    except OSError as exc:
        raise InputError(f"cannot read {job.input}: {exc.strerror}") from exc
    return Span(start, end, first_line, counter.finish())


@contextmanager
def setup_lock(job_dir: Path) -> Iterator[None]:
    """Hold the job's setup lock, waiting for it: only runs starting take it, for a moment."""
    durable.make_dirs(job_dir)
    lock = durable.open_file(job_dir / SETUP_LOCK)
    try:
        fcntl.flock(lock.fd, fcntl.LOCK_EX)
        yield
    finally:
        durable.close(lock)


def _check_input(path: Path) -> None:
    """Refuse an input that is not a regular file: a pipe or FIFO can be read only once."""
    try:
        regular = stat.S_ISREG(path.stat().st_mode)
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    if not regular:
        raise InputError(
            f"{path} is not a regular file (a pipe, FIFO or device can be read only once, "
            "but a job reads its input on every run); save it to a file first, e.g. "
            "`cat > requests.jsonl`, and run that"
        )
    check_jsonl(path)


#: The files of a job folder that an output must not be.
_OWN_FILES = (
    JOB_TOML,
    STATE_JSON,
    SHARDS_JSON,
    PROGRESS_JSON,
    LOCK,
    SETUP_LOCK,
    JOURNAL_NAME,
    LEDGER,
    HISTORY,
    SPEND_JSON,
    PROGRESS_JSON + ".tmp",  # where each is written before it replaces the file
    HISTORY + ".tmp",
)


def job_files(
    job_dir: Path,
    input_path: Path,
    parts: Sequence[tuple[Path, Path, Path]],
    json_schema: str | None,
) -> dict[Path, str]:
    """Every file a job reads or writes, and what it is: ``parts`` are the folders that
    hold a journal (the job's, or each shard's) with their results and errors files;
    ``json_schema`` is job.toml's setting (relative to the job folder)."""
    files = {input_path: "the input"}
    if json_schema is not None:
        files[job_dir / Path(json_schema).expanduser()] = "the JSON schema"
    for folder in (job_dir, *(part[0] for part in parts)):
        for name in _OWN_FILES:
            files[folder / name] = f"the job's own {name}"
            # durable.atomic_write's (job.toml, state.json, spend.json, ...)
            files[durable.atomic_temp(folder / name)] = "a file batchq writes"
        for chunk in (folder / CHUNKS).glob("*"):  # the files of its provider batches
            files[chunk] = f"the job's own {CHUNKS}/{chunk.name}"
    for run_dir, results, errors in parts:
        files[results] = "the results file"
        files[errors] = "the errors file"
        for rewritten in (errors, run_dir / JOURNAL_NAME):  # --retry-failed's rewrites
            files[rewritten.with_name(rewritten.name + ".new")] = "a file batchq writes"
    return files


def same_file(path: Path, files: Mapping[Path, str]) -> str | None:
    """What ``path`` is among ``files``, if it is one of them: the same path once symlinks
    are resolved, or the same file under another name (a hard link)."""
    resolved = {_resolved(p): what for p, what in files.items()}
    if (what := resolved.get(_resolved(path))) is not None:
        return what
    try:
        found = path.stat()
    except OSError:
        return None  # no file there, so none that another name could reach
    for other, what in files.items():
        with contextlib.suppress(OSError):
            if os.path.samestat(found, other.stat()):
                return what
    return None


def _resolved(path: Path) -> Path:
    """``path`` with its symlinks resolved; a loop of links names no file, and stays."""
    try:
        return path.resolve()
    except (RuntimeError, OSError):  # "Symlink loop" (3.11), ELOOP (3.13)
        return path


def _check_outputs(job: Job) -> None:
    """Refuse outputs that share a file with each other, the input or the job's own files,
    or whose folder is missing: found on the first run, not by a resume cutting a file short."""
    results, errors = (Path(os.path.abspath(p)) for p in (job.results, job.errors))
    taken = {Path(os.path.abspath(job.input)): "the input"}
    for name in _OWN_FILES:
        taken[Path(os.path.abspath(job.dir / name))] = f"the job's own {name}"
    for name, path in (("output", results), ("errors", errors)):
        clash = same_file(path, taken)
        if clash or path.name.endswith(".new"):  # the name of a rewrite in progress
            raise ConfigError(f"{name} {path} would overwrite {clash or 'a file batchq writes'}")
        taken[path] = "the results file"
        folder = path.parent
        if folder != Path(os.path.abspath(job.dir)) and not folder.is_dir():
            raise ConfigError(f"{name} {path}: folder {folder} does not exist; create it first")
        if path.exists() and not path.is_file():
            raise ConfigError(f"{name} {path} is not a regular file")


def _refuse_foreign_outputs(job: Job) -> None:
    """A new job must not truncate files it did not write."""
    for path in (job.results, job.errors):
        if path.exists() and path.stat().st_size and not (job.dir / STATE_JSON).exists():
            raise ConfigError(f"{path} already exists and is not batchq's; choose another path")


def read_state(job_dir: Path) -> dict[str, Any]:
    """The job's state.json, or {} for a job that has not started."""
    try:
        state = orjson.loads((job_dir / STATE_JSON).read_bytes())
    except FileNotFoundError:
        return {}
    except (OSError, orjson.JSONDecodeError) as exc:
        raise ConfigError(
            f"{job_dir / STATE_JSON} is unreadable ({exc}); delete it to re-pin"
        ) from exc
    if not isinstance(state, dict) or any(
        key in state and not _STATE_TYPES[key](state[key]) for key in _STATE_TYPES
    ):
        raise ConfigError(
            f"{job_dir / STATE_JSON} was changed outside batchq and is damaged; delete it "
            "to pin the input afresh (only if the input itself has not changed)"
        )
    return state


def _count(value: object) -> bool:
    return type(value) is int and value >= 0


def _text(value: object) -> bool:
    return isinstance(value, str)


def _seconds(value: object) -> bool:
    return type(value) in (int, float)


_STATE_TYPES: dict[str, Callable[[object], bool]] = {
    "input_size": _count,
    "input_requests": _count,
    "input_sha256": _text,
    "elapsed_s": _seconds,
    "shards": _count,  # the cut, where a batchq before shards.json kept it
    "shard_size": _count,
}


def write_state(job_dir: Path, state: Mapping[str, Any]) -> None:
    durable.atomic_write(job_dir / STATE_JSON, orjson.dumps(state, option=orjson.OPT_INDENT_2))


@dataclass(frozen=True, slots=True)
class PinnedInput:
    """How much of the input this run reads, and how many requests that is."""

    size: int
    requests: int  # non-blank lines


def add_elapsed(job_dir: Path, seconds: float) -> None:
    """Add a run's duration to the job's total, for ``batchq status``.

    A figure, not state: a full disk here must not turn a finished run into a failed one.
    """
    state = read_state(job_dir)
    with contextlib.suppress(StorageError):
        elapsed = round(state.get("elapsed_s", 0.0) + seconds, 1)
        write_state(job_dir, {**state, "elapsed_s": elapsed})


def write_progress(job_dir: Path, stats: Stats) -> None:
    """Leave the running job's live figures for ``batchq status``: best effort, atomic and
    not fsynced, for they are a view, not state, and are rewritten every few seconds."""
    figures = {
        "pid": os.getpid(),
        "updated": time.time(),
        "elapsed_s": round(stats.elapsed, 1),
        "in_flight": stats.in_flight,
        "allowance": stats.allowance,
        "peak_in_flight": stats.peak_in_flight,
        "binding": stats.binding,
        "hedges": stats.hedges,
        "invalid_answers": stats.invalid_answers,
        "retries": stats.retries,
        "rate_limited": stats.rate_limited,
        "pace": stats.pace,
        "deployments": {name: d.figures() for name, d in stats.deployments.items()} or None,
    }
    tmp = job_dir / (PROGRESS_JSON + ".tmp")
    with contextlib.suppress(OSError):  # a full disk stops the run at its next commit
        tmp.write_bytes(orjson.dumps(figures))
        os.replace(tmp, job_dir / PROGRESS_JSON)


def read_progress(job_dir: Path) -> dict[str, Any]:
    try:
        figures = orjson.loads((job_dir / PROGRESS_JSON).read_bytes())
    except (OSError, orjson.JSONDecodeError):
        return {}
    return figures if isinstance(figures, dict) else {}


def pin_input(job: Job) -> PinnedInput:
    """Check the input against its fingerprint and record the new one.

    The same pass counts the requests, so progress knows its total from the
    start. Raises InputError if bytes the job already read have changed.
    """
    state = read_state(job.dir)
    pinned_size = state.get("input_size", 0)
    counter = _Fingerprint()
    try:
        with job.input.open("rb") as f:
            size = os.fstat(f.fileno()).st_size
            if pinned_size:
                known = state.get("input_requests")
                # The pinned bytes were counted when they were pinned: hash them only.
                counter.read(f, pinned_size, count=type(known) is not int)
                if size < pinned_size or counter.digest.hexdigest() != state.get("input_sha256"):
                    raise InputError(_changed(job))
                if size > pinned_size and not _line_break_at(f, pinned_size):
                    raise InputError(_changed(job))  # the last line was extended, not appended to
                if type(known) is int:
                    counter.requests = known
            counter.read(f, size - pinned_size)
    except OSError as exc:
        raise InputError(f"cannot read {job.input}: {exc.strerror}") from exc
    requests = counter.finish()
    if size != pinned_size or state.get("input_requests") != requests:
        state = {**state, "input_size": size, "input_sha256": counter.digest.hexdigest()}
        write_state(job.dir, {**state, "input_requests": requests})
    return PinnedInput(size, requests)


# A newline, then a line bytes.strip() would empty, ended within the same chunk.
# Led by a literal, so the regex engine jumps from newline to newline.
_BEFORE_BLANK_LINE = re.compile(rb"\n(?=[ \t\r\x0b\x0c]*\n)")


class _Fingerprint:
    """SHA-256 of the bytes read, and a count of their non-blank lines, in one pass.

    Chunks are counted where they lie, never joined or copied: only the first
    line of a chunk (which began in an earlier one) and its unfinished last
    line need looking at on their own.
    """

    chunk_size = 1 << 20

    def __init__(self) -> None:
        self.digest = hashlib.sha256()
        self.requests = 0
        self._blank_so_far = True  # the line being read holds only whitespace so far

    def read(self, f: BinaryIO, length: int, *, count: bool = True) -> None:
        while length > 0:
            at_start = f.tell() == 0
            chunk = f.read(min(length, self.chunk_size))
            if not chunk:
                return
            self.digest.update(chunk)
            length -= len(chunk)
            if count:
                self._count(without_bom(chunk, 1) if at_start else chunk)

    def _count(self, chunk: bytes) -> None:
        first_end = chunk.find(b"\n")
        if first_end < 0:
            self._blank_so_far = self._blank_so_far and not chunk.strip()
            return
        first_blank = self._blank_so_far and not chunk[:first_end].strip()
        blank = first_blank + len(_BEFORE_BLANK_LINE.findall(chunk))
        self.requests += chunk.count(b"\n") - blank
        self._blank_so_far = not chunk[chunk.rfind(b"\n") + 1 :].strip()

    def finish(self) -> int:
        return self.requests + (0 if self._blank_so_far else 1)


def _line_break_at(f: BinaryIO, size: int) -> bool:
    """Whether the first ``size`` bytes end a line, or the bytes after them begin by ending it."""
    position = f.tell()
    f.seek(size - 1)
    around = f.read(2)
    f.seek(position)
    return b"\n" in around


def _changed(job: Job) -> str:
    return (
        f"{job.input} has changed since job {job.dir} began (not just appended to), so its "
        f"checkpoint no longer matches; to start afresh, delete {job.dir} or use --job NEWDIR"
    )


@contextmanager
def job_lock(job_dir: Path) -> Iterator[None]:
    """Hold the job's lock while the block runs; a second runner gets JobLocked.

    ``flock`` is released by the kernel when its holder dies, so a lock left
    by a killed run never blocks a resume.
    """
    lock = durable.open_file(job_dir / LOCK)
    fd = lock.fd
    try:
        if not _flock_exclusive(fd):
            pid = os.pread(fd, 32, 0).decode(errors="replace").strip() or "?"
            raise JobLocked(
                f"job {job_dir} is already being run by process {pid}; "
                "wait for it to finish or stop it first"
            ) from None
        with contextlib.suppress(
            OSError
        ):  # the pid only informs; a full disk must not stop us here
            os.ftruncate(fd, 0)
            os.pwrite(fd, str(os.getpid()).encode(), 0)
        yield
    finally:
        durable.close(lock)


async def wait_out(future: asyncio.Future[Any]) -> None:
    """Wait until ``future`` is done, however often the caller is cancelled meanwhile; then
    raise the caller's cancellation, if there was one. For work that must not be left
    running behind the caller: a thread on the job's files, the engine's task. The
    future's own outcome is left in it."""
    cancelled: asyncio.CancelledError | None = None
    while not future.done():
        try:
            await asyncio.wait([future])
        except asyncio.CancelledError as exc:
            cancelled = exc
    if cancelled is not None:
        raise cancelled


async def to_thread_to_the_end(
    fn: Callable[..., T], *args: Any, undo: Callable[[T], None] | None = None
) -> T:
    """``fn(*args)`` on a thread, waited for even if the caller is cancelled meanwhile:
    cancelling cannot stop a thread, and the job's lock must not be let go while one
    still works on the job. A cancellation is raised once the thread is done: its
    failure instead, if it failed (a full disk is the news); else after ``undo(its
    result)`` has released what it opened."""
    task = asyncio.ensure_future(asyncio.to_thread(fn, *args))
    try:
        await wait_out(task)
    except asyncio.CancelledError:
        if task.exception() is None and undo is not None:
            await to_thread_to_the_end(undo, task.result())
        task.result()
        raise
    return task.result()


def _flock_exclusive(fd: int, tries: int = 50) -> bool:
    """Take the lock if no run holds it.

    ``batchq status`` holds a shared lock for the instant it takes to test
    it, so a lock that is busy is tried again for a little while before it
    counts as another run's: a status must never make a starting run fail.
    """
    for _ in range(tries):
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
            return True
        except BlockingIOError:
            time.sleep(0.01)
    return False


def running_pid(job_dir: Path) -> int | None:
    """The pid of the process running the job, or None if none is."""
    try:
        fd = os.open(job_dir / LOCK, os.O_RDONLY)
    except FileNotFoundError:
        return None
    try:
        fcntl.flock(fd, fcntl.LOCK_SH | fcntl.LOCK_NB)
    except BlockingIOError:
        text = os.pread(fd, 32, 0).decode(errors="replace").strip()
        return int(text) if text.isdigit() else -1
    finally:
        os.close(fd)  # closing releases a shared lock we may have taken
    return None
