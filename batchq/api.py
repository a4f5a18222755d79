"""batchq from Python: the engine of ``batchq run``, for scripts and notebooks.

::

    import batchq

    results = batchq.run(
        ["Name a colour.", "Name a fruit."],
        model="qwen-max",
        base_url="https://dashscope.aliyuncs.com/compatible-mode/v1",
        api_key_env="DASHSCOPE_API_KEY",
        job="jobs/colours",  # checkpointed: run the cell again after a crash
    )
    for r in results:
        print(r.custom_id, r.ok, r.text)

``run`` is synchronous and returns one ``Result`` per request, in input
order; ``arun`` is the same for async code; ``stream`` yields the same
results, those that earlier runs of the job left done first, the others as
they complete. Options carry the command line's names (``model``,
``base_url``, ``rpm``, ``concurrency``, ``max_tokens``, ...). A request that
fails is a Result with ``ok == False``; only bad settings and conditions that
stop a job raise, from the ``BatchqError`` tree (``exit_code`` 2, 3 or 4, as the
command line would exit), never ``SystemExit``: ``max_cost=`` reached raises
``BudgetReached`` once what was in flight is written, and the same call with
a higher ``max_cost`` goes on.

With ``job=DIR`` the requests are written to ``DIR/input.jsonl`` and the run
is checkpointed there exactly as ``batchq run`` does: the same call after a
crash, a Ctrl-C or a kernel restart sends only what is missing and returns
every result. Without it the job lives in a temporary folder, removed
afterwards. The API key is taken from ``api_key=`` or the environment and
is written nowhere. An option given as None is not given. The notices the
command line prints go to the ``batchq`` logger (see ``_notify``).

With ``shard="I/N"`` (or ``(I, N)``, or ``"auto"`` under a scheduler) the
call runs part I of N of the job, as ``batchq run --shard`` does, and returns
that part's results; N calls may start at once on one ``job=`` folder, each
in its own process, and ``batchq.open_job(DIR).results()`` gives them all.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import logging
import os
import sys
import tempfile
import threading
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterable, Iterator
from pathlib import Path
from types import TracebackType
from typing import TYPE_CHECKING, Any, Generic, TypeVar, cast

import orjson

from batchq.config import (
    LIMITS_STORE_ENV,
    SETTING_NAMES,
    build_settings,
    deployment_keys,
    ignored_base_url,
    store_password,
)
from batchq.errors import ConfigError, InputError, StorageError
from batchq.job import durable
from batchq.job import folder as jobs
from batchq.job.folder import JOB_TOML, Job
from batchq.job.results import OutputIndex, Result
from batchq.job.settings import read_job_toml
from batchq.job.shard import Shard, parse_shard
from batchq.stats import Stats

if TYPE_CHECKING:  # aiohttp and the engine load on the first run, not on `import batchq`
    from batchq.live.transport import Transport

T = TypeVar("T")
#: Where the engine's notices go; batchq adds no handler (see ``_notify``).
log = logging.getLogger("batchq")
Requests = Iterable[str | dict[str, Any]] | str | os.PathLike[str]

INPUT = "input.jsonl"
SCHEMA = "schema.json"  # json_schema= or response_model='s schema, in the job folder
STREAM_BUFFER = 1024  # results a stream holds that its reader has not taken yet
_REQUEST_DEFAULTS = ("max_tokens", "temperature")
_STRING_BODY = {"/v1/embeddings": "input", "/v1/responses": "input"}


def run(requests: Requests, **options: Any) -> list[Result]:
    """Run every request through the endpoint; one Result per request, in input order.

    Callable from plain code, from a thread, and from a Jupyter cell (where an
    event loop already runs in the calling thread: the engine then runs on a
    thread of its own). Ctrl-C stops the run, resumable with ``job=``.

    Args:
        requests: strings (one user message each), request bodies (dicts), or
            Batch API lines (dicts with ``custom_id`` and ``body``); or the
            path of a JSONL file. Items without a ``custom_id`` get
            ``line-<N>``, N counting from 1.
        **options: the command line's options by name (``model``,
            ``base_url``, ``api_key_env``, ``endpoint``, ``system``,
            ``max_tokens``, ``temperature``, ``params``, ``rpm``, ``tpm``,
            ``concurrency``, ``max_attempts``, ``timeout``, ``hedge``,
            ``retry_failed``, ``force``, ``limits_store``, ``price_in``,
            ``price_out``, ``price_cached_in``, ``prices`` (by model: ``{"m":
            {"in": 2.4, "out": 9.6}}``), ``max_cost``, ``metrics_port``, ``deployments``
            (a list of dicts, as the ``[[deployments]]`` tables of job.toml), ...), plus ``job``
            (a folder), ``shard`` (``"I/N"``, ``(I, N)`` or ``"auto"``: this
            part of the job, whose results are returned), ``api_key`` (the
            key itself), ``progress`` (default True) and ``transport`` (an
            object with ``async send(path, body)``).

    Raises:
        BatchqError: ``ConfigError``, ``InputError``, ``JobLocked``,
            ``JournalError`` for what the command line exits 2 for;
            ``FatalEndpointError`` and the machine's failures for exit 3;
            ``BudgetReached`` (exit 4) when ``max_cost`` stopped the run.
    """
    return _run_sync(lambda: arun(requests, **options))


async def arun(requests: Requests, **options: Any) -> list[Result]:
    """``run`` for async code: the same arguments, awaited on the caller's loop."""
    async with _Prepared(requests, options) as prepared:
        await prepared.run()
        with prepared.index() as index:
            return [prepared.shaped(r) for r in index.results()]


class stream:  # a function by its use: ``async with batchq.stream(...) as results``
    """Results as they complete, for pipelines that cannot hold a list::

        async with batchq.stream(requests, model="m", job="jobs/big") as results:
            async for r in results:
                ...

    A stream yields every request of the job once, as ``arun`` returns them:
    first those that earlier runs of ``job=`` left done, in input order, then
    the others as they complete. So a stream left early (or cut short by a
    crash) and the stream that resumes it yield every line at least once
    between them; the resumed one, run to the end, yields each exactly once.

    The engine runs in a task this context owns, not inside the generator
    (yielding from inside a TaskGroup is the trap PEP 789 describes). Leaving
    the block early (``break``, an exception) stops the run, resumable with
    ``job=``, and returns once the run has stopped and let go of the job. An
    error that stopped the run is raised from the ``async for``, or on leaving
    early if the block raised nothing itself; a cancellation aimed at the
    caller is always raised.
    """

    def __init__(self, requests: Requests, **options: Any) -> None:
        self._prepared = _Prepared(requests, options)
        self._queue: asyncio.Queue[Result | None] = asyncio.Queue(maxsize=STREAM_BUFFER)
        self._task: asyncio.Task[None] | None = None
        self._ended = False  # the reader has seen how the run ended
        self._done_delivered = False

    async def __aenter__(self) -> AsyncIterator[Result]:
        await self._prepared.__aenter__()
        self._prepared.on_open = self._deliver_done
        self._prepared.on_outcomes = self._deliver
        self._task = asyncio.ensure_future(self._run())
        return self._results()

    async def _run(self) -> None:
        try:
            await self._prepared.run()
        finally:
            # Never waits for room, which a reader that left would never make: with none,
            # the reader finds the end by the task being done.
            with contextlib.suppress(asyncio.QueueFull):
                self._queue.put_nowait(None)

    async def _deliver_done(self) -> None:
        # The job is open and locked, and nothing is appended yet: what the files hold
        # now is what earlier runs left done. Only the first time: under via="auto" the
        # live phase opens the job again, after the batches' lines were yielded.
        if self._done_delivered:
            return
        self._done_delivered = True
        index = await jobs.to_thread_to_the_end(self._prepared.index)
        for result in index.results():
            await self._queue.put(self._prepared.shaped(result))

    async def _deliver(self, lines: list[bytes]) -> None:
        for line in lines:
            await self._queue.put(self._prepared.shaped(Result.from_output(orjson.loads(line))))

    async def _results(self) -> AsyncIterator[Result]:
        assert self._task is not None
        while not (self._queue.empty() and self._task.done()):
            if (result := await self._queue.get()) is None:
                break
            yield result
        self._ended = True
        await self._task  # raises what stopped the run, if anything did

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        try:
            await self._stop(raise_error=exc is None)
        finally:
            await self._prepared.__aexit__(exc_type, exc, tb)

    async def _stop(self, *, raise_error: bool) -> None:
        """Stop the run and wait until it has let go of the job; raise what stopped it."""
        task = self._task
        if task is None or self._ended:
            return
        task.cancel()  # nothing, if it has ended
        await jobs.wait_out(task)  # the caller's own cancellation is raised, once the run ended
        error = None if task.cancelled() else task.exception()
        if error is not None and raise_error:  # else the block's own exception is the news
            raise error


def open_job(path: str | os.PathLike[str]) -> JobResults:
    """A job folder's results, read in input order: ``batchq.open_job(DIR).results()``."""
    return JobResults(Path(path))


class JobResults:
    """A job folder, for reading what its runs have written."""

    def __init__(self, path: Path) -> None:
        from batchq.show.status import job_status

        figures = job_status(path)  # raises ConfigError if it is not a job folder
        self.path = path
        self._input = Path(figures["input"])
        self._json_schema = build_settings(read_job_toml(path / JOB_TOML), {}).json_schema
        shards = figures.get("shards")
        if shards:  # every shard's outputs, merged into the input's order
            self._parts = [
                (Path(p["results"]).parent, Path(p["results"]), Path(p["errors"])) for p in shards
            ]
        else:
            self._parts = [(path, Path(figures["results"]), Path(figures["errors"]))]

    def index(self) -> OutputIndex:
        """The index of the job's outputs; close it when done (``with job.index() as index``)."""
        first, *more = self._parts
        return OutputIndex(*first, more=more)

    def refuse_as_output(self, path: Path) -> None:
        """ConfigError (exit 2) if ``path`` is one of the job's own files: writing an export
        there would destroy what it reads, or the job itself."""
        what = jobs.same_file(
            path, jobs.job_files(self.path, self._input, self._parts, self._json_schema)
        )
        if what is not None:
            raise ConfigError(
                f"-o {path} would overwrite {what} of job {self.path}; export to another file"
            )

    def results(self) -> Iterator[Result]:
        """Every done request's Result, in input order."""
        return _results_then_close(self.index())  # indexed now: a damaged job raises here


def _results_then_close(index: OutputIndex) -> Iterator[Result]:
    with index:
        yield from index.results()


# --- Preparing a run -------------------------------------------------------------------


class _Prepared:
    """The job a call means: its folder (made temporary without ``job=``), input and options."""

    def __init__(self, requests: Requests, options: dict[str, Any]) -> None:
        self.requests = requests
        # None is "not given", for every option alike (``rpm=None`` as ``max_tokens=None``).
        self.options = {name: value for name, value in options.items() if value is not None}
        self.on_outcomes: Callable[[list[bytes]], Awaitable[None]] | None = None
        self.on_open: Callable[[], Awaitable[None]] | None = None
        self._temporary: tempfile.TemporaryDirectory[str] | None = None
        self.job: Job | None = None
        self.response_model: Any = None  # a pydantic model class: Result.parsed is one

    def shaped(self, result: Result) -> Result:
        """``result`` with its parsed answer as an instance of ``response_model``, if given.

        A live run checked every answer with the model; one that does not pass it (an
        answer from a batch, or from a run with another model) keeps the plain parsed
        JSON, rather than raising from the middle of the results.
        """
        if self.response_model is None or result.parsed is None:
            return result
        try:
            instance = self.response_model.model_validate(result.parsed)
        except ValueError:  # pydantic's ValidationError is one
            return result
        return dataclasses.replace(result, parsed=instance)

    async def __aenter__(self) -> _Prepared:
        folder = self.options.pop("job", None)
        if folder is None:
            self._temporary = tempfile.TemporaryDirectory(prefix="batchq-")
            folder = self._temporary.name
        self.dir = Path(folder)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        if self._temporary is not None:
            self._temporary.cleanup()

    async def run(self) -> Stats:
        from batchq.live.runner import RunOptions, run_job
        from batchq.show.metrics import metrics_of, served

        options = self.options
        api_key = options.pop("api_key", None)
        progress = options.pop("progress", True)
        transport: Transport | None = options.pop("transport", None)
        retry_failed = bool(options.pop("retry_failed", False))
        force = bool(options.pop("force", False))
        shard = options.pop("shard", None)
        if shard is not None and self._temporary is not None:
            raise ConfigError("shard= needs job=: the shards of a job share its folder")
        if options.get("via", "live") != "live" and self._temporary is not None:
            raise ConfigError(
                f"via={options['via']!r} needs job=DIR: the provider's batches outlive the call, "
                "and the job folder is the only record of what they bill"
            )
        self.response_model = options.pop("response_model", None)
        schema = _schema_option(options.pop("json_schema", None), self.response_model)
        if isinstance(schema, dict):  # kept in the job folder, where job.toml can name it
            await asyncio.to_thread(durable.make_dirs, self.dir)
            options["json_schema"] = str(await asyncio.to_thread(_keep_schema, self.dir, schema))
        elif schema is not None:
            options["json_schema"] = str(_absolute(schema))
        defaults = dict(options.pop("params", None) or {})
        defaults.update({k: options.pop(k) for k in _REQUEST_DEFAULTS if k in options})
        if options.get("limits_store") is None:  # as the command line's --limits-store
            options["limits_store"] = os.environ.get(LIMITS_STORE_ENV) or None
        # The password is kept apart, for this run only: job.toml never holds it.
        options["limits_store"], password = store_password(options["limits_store"], os.environ)
        unknown = sorted(set(options) - SETTING_NAMES)
        if unknown or "input" in options:
            raise ConfigError(f"unknown option(s): {', '.join(unknown or ['input'])}")
        target = await asyncio.to_thread(self._input, options.get("endpoint"))
        job, notes = await asyncio.to_thread(
            jobs.open_job,
            target,
            job_dir=self.dir,
            overrides=options,
            defaults=defaults,
            default_base_url=os.environ.get("OPENAI_BASE_URL") or None,
            force=force,
        )
        if shard is not None:
            job = jobs.with_shard(job, _shard(shard))
        self.job = job
        for note in notes:
            _notify(note)
        if api_key is None:
            api_key = os.environ.get(job.settings.api_key_env) or None
        if job.settings.deployments and (
            options.get("base_url") or os.environ.get("OPENAI_BASE_URL")
        ):
            _notify(ignored_base_url(job.settings))
        metrics = metrics_of(job, _notify)  # None without metrics_port=
        watch = None if metrics is None else metrics.watch
        run_options = RunOptions(
            api_key=api_key,
            deployment_keys=deployment_keys(job.settings, os.environ),
            limits_store_password=password,
            retry_failed=retry_failed,
            progress_every=(0.5 if sys.stderr.isatty() or "ipykernel" in sys.modules else 10.0)
            if progress
            else None,
            transport=transport,
            on_notice=_notify,
            on_outcomes=self.on_outcomes,
            on_open=self.on_open,
            on_stats=watch,
            response_model=self.response_model,
        )
        # No signal handlers (they are the application's), so nothing sets stats.interrupted:
        # a Ctrl-C reaches the engine as cancellation, and leaves as KeyboardInterrupt.
        if job.settings.via == "live":
            stats = await served(metrics, run_job(job, run_options))
            if stats.budget_reached:
                from batchq.cost import budget_reached

                raise budget_reached(stats)
            return stats
        if transport is not None:
            raise ConfigError("transport= goes with via='live': batches go to the provider's API")
        from batchq.auto import run_auto  # here: a live run does not pay for their import
        from batchq.batch.executor import BatchOptions, run_batches

        batch_options = BatchOptions(
            api_key=api_key,
            retry_failed=retry_failed,
            on_notice=_notify,
            on_outcomes=self.on_outcomes,
            on_open=self.on_open,
            on_stats=watch,
        )
        if job.settings.via == "batch":
            return await served(metrics, run_batches(job, batch_options))
        return await served(metrics, run_auto(job, run_options, batch_options))

    def index(self) -> OutputIndex:
        assert self.job is not None
        return OutputIndex(self.job.run_dir, self.job.results, self.job.errors)

    def _input(self, endpoint: str | None) -> Path:
        """The input file: the path given, or the requests written to the job's input."""
        if isinstance(self.requests, str | os.PathLike):
            return Path(self.requests).absolute()
        toml = self.dir / JOB_TOML
        if endpoint is None and toml.exists():
            # A rerun that leaves endpoint= out means the job's own: its strings must
            # become the same bodies as the first run's, or the input would not match.
            stored = read_job_toml(toml).get("endpoint")
            endpoint = stored if isinstance(stored, str) else None  # else: job.toml says why
        durable.make_dirs(self.dir)
        return write_input(self.dir / INPUT, self.requests, endpoint)


def _notify(message: str, level: int = logging.INFO) -> None:
    """The engine's notices, as a library gives them: to the ``batchq`` logger.

    No handler is added. An application that set up logging gets them its way;
    one that did not (a script, a notebook) still sees WARNING and above (a lost
    limits store, lines cut and sent again, the open-file cap) on stderr, from
    Python's last-resort handler, and INFO (new job, resuming, the --retry-failed
    count) after ``logging.basicConfig(level=logging.INFO)``.
    """
    log.log(level, "%s", message)


def _schema_option(schema: object, model: Any) -> dict[str, Any] | str | os.PathLike[str] | None:
    """``json_schema=`` (a dict or a file) or ``response_model=`` (a pydantic model class)."""
    if model is not None:
        if schema is not None:
            raise ConfigError("give json_schema= or response_model=, not both")
        if not callable(getattr(model, "model_json_schema", None)):
            raise ConfigError(
                f"response_model= takes a pydantic model class, not {type(model).__name__}"
            )
        return cast(dict[str, Any], model.model_json_schema())
    if schema is None or isinstance(schema, dict | str | os.PathLike):
        return schema
    raise ConfigError(f"json_schema= takes a dict or a file path, not {type(schema).__name__}")


def _absolute(path: str | os.PathLike[str]) -> Path:
    return Path(path).absolute()


def _keep_schema(folder: Path, schema: dict[str, Any]) -> Path:
    """``schema`` as the job folder's schema.json, rewritten only if it changed."""
    path = folder / SCHEMA
    data = orjson.dumps(schema, option=orjson.OPT_INDENT_2 | orjson.OPT_APPEND_NEWLINE)
    with _reading(path):
        same = path.exists() and path.read_bytes() == data
    if not same:
        durable.atomic_write(path, data)
    return path


def _shard(spec: object) -> Shard:
    """``shard=`` as the command line's ``--shard`` takes it, or a pair ``(I, N)``."""
    if isinstance(spec, str):
        return parse_shard(spec, os.environ)
    if isinstance(spec, tuple) and len(spec) == 2 and all(type(n) is int for n in spec):
        return Shard(*spec)
    raise ConfigError(f'shard= takes "I/N", (I, N) or "auto", not {spec!r}')


def write_input(path: Path, requests: Iterable[str | dict[str, Any]], endpoint: str | None) -> Path:
    """Write ``requests`` as JSONL at ``path``, unless the same requests are there already.

    Calling the same cell again writes the same bytes, which the job's pinned
    fingerprint recognises; requests added at the end are new requests. Fewer
    requests, or others, would make the job's checkpoint point at the wrong
    lines (and the job would still run, and return, every stored one), so they
    are refused before anything is touched. Shards of one job write at once:
    each through a file of its own, and the same requests leave the file in
    place, so no shard ever reads another's half-written input. Every write
    goes through ``durable``: a full disk or an I/O error is a StorageError.
    """
    key = _STRING_BODY.get(endpoint or "", "prompt")
    tmp = path.with_name(f".{path.name}.{uuid.uuid4().hex[:12]}.new")
    try:
        _write_requests(tmp, requests, key)
        with _reading(path):
            if path.exists():
                if not _extends(tmp, path):
                    raise InputError(
                        f"these requests are not the ones job {path.parent} was made for (nor "
                        "those with more at the end); pass another job= folder to start a "
                        "separate job"
                    )
                if tmp.stat().st_size == path.stat().st_size:
                    return path  # the same requests: nothing to replace
        durable.replace(tmp, path)
        durable.fsync_dir(path.parent)
    finally:
        with contextlib.suppress(StorageError):  # a file of our own, never read: only litter
            durable.unlink(tmp)
    return path


def _write_requests(path: Path, requests: Iterable[str | dict[str, Any]], key: str) -> None:
    """Each request as one JSON line, written in blocks of about 1 MiB, then fsynced."""
    f = durable.open_file(path, truncate=True)
    try:
        block = bytearray()
        for n, item in enumerate(requests, 1):
            body: object = {key: item} if isinstance(item, str) else item
            if not isinstance(body, dict):
                raise InputError(f"a request must be a string or a dict, not {type(body).__name__}")
            try:
                block += orjson.dumps(body, option=orjson.OPT_APPEND_NEWLINE)
            except orjson.JSONEncodeError as exc:
                raise InputError(f"request {n} cannot be written as JSON: {exc}") from None
            if len(block) >= 1 << 20:
                durable.write(f, bytes(block))
                block.clear()
        durable.write(f, bytes(block))
        durable.fsync(f)
    finally:
        durable.close(f)


@contextlib.contextmanager
def _reading(path: Path) -> Iterator[None]:
    """Reads fail as writes do: one line naming the path and the cause."""
    try:
        yield
    except OSError as exc:
        raise StorageError.from_os("read", path, exc) from None


def _extends(new: Path, old: Path) -> bool:
    """Whether ``new`` holds ``old``'s bytes, then perhaps more."""
    size = old.stat().st_size
    if new.stat().st_size < size:
        return False
    with new.open("rb") as a, old.open("rb") as b:
        while size > 0:
            chunk = b.read(min(size, 1 << 20))
            if not chunk or a.read(len(chunk)) != chunk:
                return False
            size -= len(chunk)
    return True


def _run_sync(make: Callable[[], Awaitable[T]]) -> T:
    """Run a coroutine to the end from synchronous code, whatever loop the thread has."""
    try:
        asyncio.get_running_loop()
    except RuntimeError:
        return asyncio.run(_coroutine(make))
    return _OwnThread(make).result()


async def _coroutine(make: Callable[[], Awaitable[T]]) -> T:
    return await make()


class _OwnThread(Generic[T]):
    """A coroutine on an event loop of its own thread; Ctrl-C in the caller cancels it."""

    def __init__(self, make: Callable[[], Awaitable[T]]) -> None:
        self._make = make
        self._loop = asyncio.new_event_loop()
        self._task: asyncio.Task[Any] | None = None
        self._outcome: tuple[bool, Any] = (False, None)
        self._thread = threading.Thread(target=self._main, name="batchq", daemon=True)

    def _main(self) -> None:
        asyncio.set_event_loop(self._loop)
        try:
            self._task = self._loop.create_task(_coroutine(self._make))
            self._outcome = (True, self._loop.run_until_complete(self._task))
        except BaseException as exc:  # handed to the caller's thread, raised there
            self._outcome = (False, exc)
        finally:
            self._loop.close()

    def result(self) -> T:
        self._thread.start()
        try:
            self._thread.join()
        except KeyboardInterrupt:  # the notebook's interrupt: stop the run, then say so
            if self._task is not None:
                self._loop.call_soon_threadsafe(self._task.cancel)
            self._thread.join()
            raise
        ok, value = self._outcome
        if not ok:
            raise value
        return cast(T, value)
