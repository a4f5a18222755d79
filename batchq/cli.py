"""The command line: flags become settings, errors become one line and an exit status.

No module below this one imports click. Exit statuses: 0 every request
succeeded; 1 finished with some in errors.jsonl; 2 bad usage, settings or
input; 3 stopped by the endpoint (bad key, no quota, unreachable, a wait
longer than --max-wait) or the machine (full disk, I/O error, permission),
resumable; 4 stopped at the budget (--max-cost), resumable with a higher one;
130 interrupted, resumable; 70 a bug in batchq.
"""

from __future__ import annotations

import asyncio
import contextlib
import dataclasses
import gc
import logging
import os
import signal
import sys
import traceback
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import IO, TYPE_CHECKING, Any, NoReturn

import click
import orjson

from batchq.config import (
    ENDPOINTS,
    LIMITS_STORE_ENV,
    LIMITS_STORE_PASSWORD_ENV,
    as_deployment,
    deployment_keys,
    ignored_base_url,
    shell_join,
    shell_quote,
    store_password,
    strip_secrets,
    url_secrets,
)
from batchq.errors import BatchqError, StorageError

if TYPE_CHECKING:  # pragma: no cover
    from batchq.batch.executor import BatchOptions
    from batchq.config import Settings
    from batchq.reader import RequestTemplate
    from batchq.show.preflight import Preflight
    from batchq.show.validate import Report
    from batchq.stats import Stats

EXIT_OK, EXIT_FAILED, EXIT_USAGE, EXIT_FATAL, EXIT_INTERRUPTED = 0, 1, 2, 3, 130
EXIT_BUDGET = 4
# The GC collects its youngest generation when allocations outrun frees by this many
# (CPython: 700). With workers waiting for a place in the pool, at 700 it ran ~10x as often
# as without: a tenth of a 1 ms endpoint's throughput (benchmarks/CAPACITY.md).
GC_YOUNG = 7_000


class Failure(click.ClickException):
    """A BatchqError, shown as one line with its own exit status."""

    def __init__(self, error: BatchqError) -> None:
        super().__init__(str(error))
        self.exit_code = error.exit_code  # type: ignore[misc]

    def show(self, file: IO[Any] | None = None) -> None:
        click.echo(f"batchq: error: {self.message}", err=True)


class Concurrency(click.ParamType):  # type: ignore[type-arg]
    """``auto`` or a whole number from 1 to 10,000."""

    name = "auto|N"

    def convert(self, value: Any, param: click.Parameter | None, ctx: click.Context | None) -> Any:
        if value == "auto" or isinstance(value, int):
            return value
        try:
            number = int(value)
        except ValueError:
            self.fail(f"{value!r} is not auto or a whole number", param, ctx)
        if not 1 <= number <= 10_000:
            self.fail(f"{number} is not between 1 and 10,000", param, ctx)
        return number


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.version_option(package_name="batchq")
def cli() -> None:
    """Run a large JSONL file of LLM requests through any OpenAI-compatible endpoint.

    Interrupted jobs continue where they stopped: run the same command again.
    """


def _param(ctx: click.Context, option: click.Parameter, values: tuple[str, ...]) -> dict[str, Any]:
    params = {}
    for item in values:
        key, sep, raw = item.partition("=")
        if not sep or not key:
            raise click.BadParameter(f"{item!r} is not KEY=VALUE", ctx, option)
        try:
            params[key] = orjson.loads(raw)
        except orjson.JSONDecodeError:
            params[key] = raw  # a bare word is a string
    return params


def _from_cwd(ctx: click.Context, option: click.Parameter, value: str | None) -> str | None:
    # As users expect of a path typed on the command line; job.toml keeps it absolute,
    # since its own relative paths are relative to the job folder.
    return None if value is None else str(Path(value).expanduser().absolute())


_REQUEST_OPTIONS = [
    click.option("--model", help="Model for requests that name none."),
    click.option(
        "--endpoint",
        type=click.Choice(ENDPOINTS),
        help="Endpoint of lines that name none [default: /v1/chat/completions].",
    ),
    click.option("--system", help="System prompt for chat requests that have none."),
    click.option("--max-tokens", type=click.IntRange(min=1), help="Default max_tokens."),
    click.option("--temperature", type=float, help="Default temperature."),
    click.option(
        "-p",
        "--param",
        "params",
        multiple=True,
        callback=_param,
        metavar="KEY=VALUE",
        help="Another default body parameter (VALUE is JSON, or a string). Repeatable.",
    ),
]


def request_options(command: Callable[..., None]) -> Callable[..., None]:
    """The options that shape what a request is, shared by ``run`` and ``validate``."""
    for option in reversed(_REQUEST_OPTIONS):
        command = option(command)
    return command


def _defaults(
    params: dict[str, Any], max_tokens: int | None, temperature: float | None
) -> dict[str, Any]:
    """The default body parameters the request options give."""
    defaults = dict(params)
    if max_tokens is not None:
        defaults["max_tokens"] = max_tokens
    if temperature is not None:
        defaults["temperature"] = temperature
    return defaults


@cli.command()
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@click.option(
    "--job",
    "job_dir",
    type=click.Path(file_okay=False, path_type=Path),
    help="Job folder [default: jobs/<input stem>].",
)
@click.option(
    "--base-url",
    help="Endpoint base URL, ending in /v1 [default: $OPENAI_BASE_URL, "
    "else https://api.openai.com/v1].",
)
@click.option(
    "--api-key-env",
    metavar="NAME",
    help="Environment variable holding the API key [default: OPENAI_API_KEY].",
)
@request_options
@click.option("--rpm", type=click.FloatRange(min=0), help="Requests per minute (0 = no limit).")
@click.option("--tpm", type=click.FloatRange(min=0), help="Tokens per minute (0 = no limit).")
@click.option(
    "--limits-store",
    metavar="URL",
    envvar=LIMITS_STORE_ENV,
    help="Share --rpm/--tpm, pauses and the endpoint's limits with every process naming "
    f"this Redis, e.g. redis://127.0.0.1:6379/0 [env: {LIMITS_STORE_ENV}; its password, "
    f"never written to job.toml, may come from {LIMITS_STORE_PASSWORD_ENV}].",
)
@click.option(
    "--limits-key",
    metavar="KEY",
    help="The account's name in the store [default: the base URL and a hash of the API key].",
)
@click.option(
    "--deployments",
    type=click.Path(exists=True, dir_okay=False, path_type=Path),
    help="A TOML file of [[deployments]] (name, base_url, api_key_env, model, rpm, tpm, "
    "max_concurrency, weight, limits_key): send to all of them as one pool.",
)
@click.option(
    "--concurrency",
    type=Concurrency(),
    help="Requests in flight at once: auto (sized to the pace, or to the endpoint's "
    "capacity) or a fixed number [default: auto].",
)
@click.option(
    "--max-concurrency",
    type=click.IntRange(1, 10_000),
    help="The most requests in flight that auto may reach [default: 1024].",
)
@click.option(
    "--hedge/--no-hedge",
    default=None,
    help="Once nothing is left to send, send a copy of requests slower than the p80 "
    "latency (at most 1% of the job's requests); the first answer wins [default: on].",
)
@click.option(
    "--max-attempts",
    type=click.IntRange(min=1),
    help="Attempts per request on 5xx, timeouts, drops [default: 8].",
)
@click.option(
    "--timeout",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds for one attempt [default: 600].",
)
@click.option(
    "--drain-timeout",
    type=click.FloatRange(min=0),
    help="Seconds in-flight requests get to finish after Ctrl-C [default: 5].",
)
@click.option(
    "--max-wait",
    type=click.FloatRange(min=0),
    help="Longest wait, in seconds, an endpoint may ask for (Retry-After and the like); "
    "a longer one stops the job (exit 3) [default: 900].",
)
@click.option(
    "--max-response-bytes",
    type=click.IntRange(min=1),
    help="Largest answer kept, after decompression; a larger one is a failed request "
    "[default: 33554432, i.e. 32 MiB].",
)
@click.option(
    "--output",
    callback=_from_cwd,
    help="Results file, relative to the current folder [default: results.jsonl in the job folder].",
)
@click.option(
    "--errors",
    callback=_from_cwd,
    help="Errors file, relative to the current folder [default: errors.jsonl in the job folder].",
)
@click.option(
    "--via",
    type=click.Choice(["live", "batch", "auto"]),
    help="live: call the endpoint in real time; batch: through the provider's Batch API, "
    "at half price, within --completion-window; auto: by batch, and live for what batches "
    "cannot do before --deadline [default: live].",
)
@click.option(
    "--deadline",
    metavar="DURATION",
    help="With --via auto: when the job must be done, from the start of the run "
    "(40s, 90m, 6h, 2d).",
)
@click.option(
    "--batch-dialect",
    type=click.Choice(["openai", "dashscope"]),
    help="Whose Batch API [default: dashscope for a compatible-mode/v1 base URL, else openai].",
)
@click.option(
    "--completion-window",
    metavar="24h",
    help="How long a batch may take: 24h (OpenAI), up to 336h or 14d (DashScope) [default: 24h].",
)
@click.option(
    "--batch-max-lines",
    type=click.IntRange(min=1),
    help="Lines in one batch file [default: 50000].",
)
@click.option(
    "--batch-max-bytes",
    type=click.IntRange(min=1024),
    help="Bytes in one batch file [default: 190000000].",
)
@click.option(
    "--batch-poll",
    type=click.FloatRange(min=0, min_open=True),
    help="Seconds between looks at the open batches [default: 30].",
)
@click.option(
    "--price-in",
    type=click.FloatRange(min=0),
    help="Price of a million prompt tokens: the summary shows the cost (by batch at half).",
)
@click.option(
    "--price-out",
    type=click.FloatRange(min=0),
    help="Price of a million completion tokens.",
)
@click.option(
    "--metrics-port",
    type=click.IntRange(0, 65535),
    metavar="PORT",
    help="While running, serve Prometheus metrics at http://127.0.0.1:PORT/metrics "
    "(0: a free port, printed).",
)
@click.option(
    "--metrics-host",
    metavar="ADDRESS",
    help="Where --metrics-port listens; 0.0.0.0 for a scraper on another host or pod "
    "(the metrics hold counts, no secrets) [default: 127.0.0.1].",
)
@click.option(
    "--price-cached-in",
    type=click.FloatRange(min=0),
    help="Price of a million cached prompt tokens [default: as --price-in]. Prices by "
    'model go in job.toml: [prices."MODEL"] in = ..., out = ..., cached_in = ...',
)
@click.option(
    "--max-cost",
    type=click.FloatRange(min=0, min_open=True),
    help="The job's budget, in the prices' currency: no request goes that could take the "
    "job past it, counting what is in flight at its worst; reached, the run stops (exit 4).",
)
@click.option(
    "--json-schema",
    type=click.Path(exists=True, dir_okay=False),
    help="A JSON Schema file: ask for answers that fit it, and check every one.",
)
@click.option(
    "--json-mode/--no-json-mode",
    default=None,
    help='Ask for JSON answers ({"type": "json_object"}) and check that each parses.',
)
@click.option(
    "--max-invalid",
    type=click.IntRange(0, 100),
    help="Times an answer that does not parse or fit is asked again [default: 2].",
)
@click.option(
    "--reask/--no-reask",
    default=None,
    help="Ask again with the answer and what is wrong with it as a follow-up turn "
    "[default: off: as the request was].",
)
@click.option(
    "--detach",
    is_flag=True,
    help="With --via batch: return once every batch is created; the same command collects them.",
)
@click.option("--retry-failed", is_flag=True, help="Send the retryable failures again first.")
@click.option(
    "--force",
    is_flag=True,
    help="Allow changing model, endpoint, system, defaults or the JSON schema of a begun job.",
)
@click.option(
    "--shard",
    "shard_spec",
    metavar="I/N|auto",
    help="Run part I of N of the input (I from 0), in JOB/shard-I-of-N/; auto: from "
    "JOB_COMPLETION_INDEX and $BATCHQ_SHARDS, or SLURM_ARRAY_TASK_ID and _COUNT.",
)
@click.option(
    "--fsync/--no-fsync",
    default=True,
    show_default=True,
    help="Make the checkpoint survive power loss (off only for measurements).",
)
@click.option(
    "--progress-every",
    type=click.FloatRange(min=0.1),
    help="Seconds between progress lines [default: 0.5 on a terminal, else 10].",
)
@click.option("-q", "--quiet", is_flag=True, help="No progress line, only the summary.")
@click.option("--json-summary", is_flag=True, help="Also print the summary as JSON on stdout.")
def run(
    target: Path,
    job_dir: Path | None,
    max_tokens: int | None,
    temperature: float | None,
    params: dict[str, Any],
    retry_failed: bool,
    detach: bool,
    force: bool,
    shard_spec: str | None,
    fsync: bool,
    progress_every: float | None,
    quiet: bool,
    json_summary: bool,
    **settings: Any,
) -> None:
    """Start, or continue, the job for TARGET (an input .jsonl file or a job folder)."""
    from batchq.job.folder import open_job, with_shard
    from batchq.job.shard import parse_shard
    from batchq.live.runner import RunOptions, run_job
    from batchq.show.metrics import metrics_of, served
    from batchq.show.progress import render_summary, summary

    defaults = _defaults(params, max_tokens, temperature)
    env_base_url = os.environ.get("OPENAI_BASE_URL")
    if settings["deployments"] is not None:
        from batchq.job.settings import read_deployments_file

        try:
            settings["deployments"] = read_deployments_file(settings["deployments"])
        except BatchqError as exc:
            raise Failure(exc) from None
    typed_store = settings["limits_store"]
    try:
        settings["limits_store"], password = store_password(typed_store, os.environ)
        # Parsed before the job is opened: a spec refused leaves no folder behind.
        shard = None if shard_spec is None else parse_shard(shard_spec, os.environ)
        job, notes = open_job(
            target,
            job_dir=job_dir,
            overrides=settings,
            defaults=defaults,
            default_base_url=env_base_url or None,
            force=force,
        )
        if shard is not None:
            job = with_shard(job, shard)
        for note in notes:
            _notice(note)
        if typed_store and strip_secrets(typed_store)[1] and _typed("limits_store"):
            _notice(
                f"the limits store's password is not kept in job.toml; next time, set "
                f"{LIMITS_STORE_PASSWORD_ENV} or give the URL in {LIMITS_STORE_ENV}"
            )
        if url_secrets(job.settings) and (_typed("base_url") or _typed("deployments")):
            _notice(
                "a base URL's credentials are not kept in job.toml; next time, give the same "
                "--base-url (or set it in OPENAI_BASE_URL) or --deployments file again"
            )
        if progress_every is None:
            progress_every = 0.5 if sys.stderr.isatty() else 10.0
        if job.settings.deployments and (settings["base_url"] or env_base_url):
            _notice(ignored_base_url(job.settings))
        api_key = os.environ.get(job.settings.api_key_env) or None
        via = job.settings.via
        if detach and via != "batch":
            raise click.UsageError("--detach goes with --via batch: nothing else can detach")
        metrics = metrics_of(job, _notice)  # None without --metrics-port
        watch = None if metrics is None else metrics.watch
        live = RunOptions(
            api_key=api_key,
            deployment_keys=deployment_keys(job.settings, os.environ),
            limits_store_password=password,
            retry_failed=retry_failed,
            durable=fsync,
            progress_every=None if quiet else progress_every,
            on_notice=_notice,
            handle_signals=True,
            on_stats=watch,
        )
        if via == "live":
            stats = asyncio.run(served(metrics, run_job(job, live)))
        else:  # imported only here: a live run's start does not pay for them (~0.1 s)
            from batchq.auto import run_auto
            from batchq.batch.executor import run_batches

            batch = _batching(api_key, retry_failed=retry_failed, detach=detach, fsync=fsync)
            batch = dataclasses.replace(batch, on_stats=watch)
            if via == "batch":
                stats = asyncio.run(served(metrics, run_batches(job, batch)))
            else:
                stats = asyncio.run(served(metrics, run_auto(job, live, batch)))
    except BatchqError as exc:
        raise Failure(exc) from None
    except Interrupted:  # a signal while the pipeline was not handling them
        _notice(f"interrupted; to resume: {_resume()}")
        sys.exit(EXIT_INTERRUPTED)
    at_budget = stats.budget_reached and not stats.interrupted
    resume = _resume_with_more(stats) if at_budget else _resume()
    figures = summary(
        stats,
        results=str(job.results),
        errors=str(job.errors),
        resume=resume,
        prices=(job.settings.price_in, job.settings.price_out),
    )
    click.echo(render_summary(figures), err=True)
    if json_summary:
        click.echo(orjson.dumps(figures).decode())
    if stats.interrupted:
        sys.exit(EXIT_INTERRUPTED)
    if at_budget:  # one line: spent, pending, and the command that goes on
        from batchq.cost import budget_reached

        click.echo(f"batchq: {budget_reached(stats)}; to go on: {resume}", err=True)
        sys.exit(EXIT_BUDGET)
    sys.exit(EXIT_FAILED if stats.failed_before + stats.failed else EXIT_OK)


def _resume_with_more(stats: Stats) -> str:
    """The command that continues a job stopped at its budget, with a budget that should
    see it through (its projected cost and a tenth more)."""
    from batchq.cost import suggested_budget

    more = suggested_budget(
        stats.cost or 0.0, stats.done, stats.pending, stats.budget or 0.0, stats.budget_wanted
    )
    args = _resume_args()
    for i, arg in enumerate(args):  # the budget typed this time gives way to the higher one
        if arg == "--max-cost" and i + 1 < len(args):
            del args[i : i + 2]
            break
        if arg.startswith("--max-cost="):
            del args[i]
            break
    return shell_join([*args, "--max-cost", f"{more:.2f}"])


def _batching(
    api_key: str | None, *, retry_failed: bool, detach: bool, fsync: bool, cancel: bool = False
) -> BatchOptions:
    from batchq.batch.executor import BatchOptions

    return BatchOptions(
        api_key=api_key,
        retry_failed=retry_failed,
        durable=fsync,
        detach=detach,
        cancel=cancel,
        on_notice=_notice,
        handle_signals=True,
    )


@cli.command()
@click.argument("job_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
def cancel(job_dir: Path) -> None:
    """Cancel JOB_DIR's open provider batches, and collect what they finished.

    Lines a cancelled batch did not finish are pending again: `batchq run JOB_DIR`
    sends them, live or by batch. A sharded job's batches are cancelled shard by shard.
    """
    from batchq.batch.executor import run_batches
    from batchq.job.batches import LEDGER
    from batchq.job.folder import open_job, read_state, with_shard
    from batchq.job.shard import Shard, read_cut
    from batchq.show.progress import render_summary, summary

    interrupted = False
    try:
        job, _ = open_job(
            job_dir, job_dir=None, overrides={}, defaults={}, default_base_url=None, force=False
        )
        cut = read_cut(job_dir, read_state(job_dir))
        parts = (
            [job]
            if cut is None
            else [with_shard(job, Shard(i, cut.count)) for i in range(cut.count)]
        )
        api_key = os.environ.get(job.settings.api_key_env) or None
        options = _batching(api_key, retry_failed=False, detach=False, fsync=True, cancel=True)
        for part in parts:
            if cut is not None and not (part.run_dir / LEDGER).exists():
                continue  # a shard that never ran by batch
            stats = asyncio.run(run_batches(part, options))
            figures = summary(
                stats,
                results=str(part.results),
                errors=str(part.errors),
                resume=f"batchq run {shell_quote(str(job_dir))}",
                prices=(job.settings.price_in, job.settings.price_out),
            )
            click.echo(render_summary(figures), err=True)
            interrupted = interrupted or stats.interrupted
    except BatchqError as exc:
        raise Failure(exc) from None
    except Interrupted:
        sys.exit(EXIT_INTERRUPTED)
    sys.exit(EXIT_INTERRUPTED if interrupted else EXIT_OK)


def _resume() -> str:
    """The command that continues this job: the one that was run, as it was typed, but
    without secrets. The store's password comes from the environment (the notice at the
    start says which variable); a credential in the base URL shows as ``***``."""
    return shell_join(_resume_args())


def _resume_args() -> list[str]:
    # --detach left out: the same command without it waits for the batches and collects them
    args = [arg for arg in sys.argv[1:] if arg not in ("--retry-failed", "--detach")]
    for i, arg in enumerate(args):
        name, equals, value = arg.partition("=")
        if i > 0 and args[i - 1] in _URL_OPTIONS:  # --base-url URL
            args[i] = strip_secrets(arg, mask=_URL_OPTIONS[args[i - 1]])[0]
        elif equals and name in _URL_OPTIONS:  # --base-url=URL
            args[i] = f"{name}={strip_secrets(value, mask=_URL_OPTIONS[name])[0]}"
    return ["batchq", *args]


#: Options whose URL may hold a secret, and what stands for it in a printed command
#: (None: left out).
_URL_OPTIONS = {"--limits-store": None, "--base-url": "***"}


def _typed(name: str) -> bool:
    """Whether the option ``name`` of this command was given on the command line."""
    source = click.get_current_context().get_parameter_source(name)
    return source is click.core.ParameterSource.COMMANDLINE


def _notice(message: str, level: int = logging.INFO) -> None:
    """Every notice, whatever its level: the command line has no log to send them to."""
    click.echo(f"batchq: {message}", err=True)


@cli.command()
@click.argument("job_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--json", "as_json", is_flag=True, help="Print the figures as one JSON object.")
def status(job_dir: Path, as_json: bool) -> None:
    """Show the progress of the job in JOB_DIR, running or not."""
    from batchq.show.status import job_status, render_status

    try:
        figures = job_status(job_dir)
    except BatchqError as exc:
        raise Failure(exc) from None
    if as_json:
        click.echo(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(render_status(figures))


@cli.command()
@click.argument("job_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    help="Write here instead of to stdout.",
)
@click.option(
    "--format",
    "fmt",
    type=click.Choice(["jsonl", "csv"]),
    help="[default: csv if --output ends in .csv, else jsonl]",
)
@click.option(
    "--fields",
    help="CSV columns, comma-separated [default: custom_id,text,prompt_tokens,"
    "completion_tokens,error]; also line, ok, status_code, attempts, error_code, and "
    "parsed.KEY (a field of the answer read as JSON, e.g. parsed.label).",
)
def export(job_dir: Path, output: Path | None, fmt: str | None, fields: str | None) -> None:
    """Every done request of the job in JOB_DIR once, in input order: results and
    errors merged, as JSONL (the output lines) or CSV."""
    from batchq.api import open_job
    from batchq.job.results import (
        CSV_FIELDS,
        DEFAULT_CSV_FIELDS,
        known_field,
        write_csv,
        write_jsonl,
    )

    fmt = fmt or ("csv" if output is not None and output.suffix == ".csv" else "jsonl")
    columns = tuple(f.strip() for f in fields.split(",")) if fields else DEFAULT_CSV_FIELDS
    unknown = [c for c in columns if not known_field(c)]
    if unknown:
        raise click.BadParameter(
            f"unknown field(s) {', '.join(unknown)}; choose from {', '.join(CSV_FIELDS)}, "
            "or parsed.KEY",
            param_hint="--fields",
        )
    try:
        job = open_job(job_dir)
        if output is not None:
            job.refuse_as_output(output)  # before opening it truncates the file
        with job.index() as index:
            if fmt == "csv":
                with _opened(output, "w") as text:
                    written = write_csv(index, text, columns)
            else:
                with _opened(output, "wb") as raw:
                    written = write_jsonl(index, raw)
    except BatchqError as exc:
        raise Failure(exc) from None
    except BrokenPipeError:  # `batchq export JOB | head`: the reader had enough
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())  # no flush error at exit
        sys.exit(1)
    except OSError as exc:
        raise Failure(StorageError.from_os("write", output or Path("<stdout>"), exc)) from None
    _notice(f"exported {written:,} requests in input order")


@cli.command()
@click.argument("job_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option("--port", type=click.IntRange(0, 65535), default=0, help="[default: 0, a free port]")
@click.option("--no-open", is_flag=True, help="Print the URL only; do not open a browser.")
def view(job_dir: Path, port: int, no_open: bool) -> None:
    """Serve a read-only page of the job in JOB_DIR on 127.0.0.1: charts over its life,
    failures by code, results beside their prompts. Works while the job runs; Ctrl-C stops."""
    from batchq.show.view import serve

    def ready(url: str) -> None:
        click.echo(f"batchq view: {url}  (Ctrl-C to stop)", err=True)
        if not no_open:
            import webbrowser

            webbrowser.open(url)

    try:
        asyncio.run(serve(job_dir, port, ready))
    except BatchqError as exc:
        raise Failure(exc) from None


@cli.command()
@click.argument("job_dir", type=click.Path(exists=True, file_okay=False, path_type=Path))
@click.option(
    "-o",
    "--output",
    type=click.Path(dir_okay=False, path_type=Path),
    required=True,
    help="The HTML file to write.",
)
def report(job_dir: Path, output: Path) -> None:
    """Write the charts and failures of the job in JOB_DIR as one self-contained HTML file
    (no server, no network needed to open it)."""
    from batchq.show.view import write_report

    try:
        write_report(job_dir, output)
    except BatchqError as exc:
        raise Failure(exc) from None
    except OSError as exc:
        raise click.ClickException(f"cannot write {output}: {exc.strerror}") from None
    _notice(f"wrote {output}")


@contextlib.contextmanager
def _opened(path: Path | None, mode: str) -> Iterator[Any]:
    """``path`` opened for writing, written whole (show/outfile.py), or stdout (text or
    binary as ``mode`` says)."""
    from batchq.show.outfile import replacing

    binary = "b" in mode
    if path is None:
        yield sys.stdout.buffer if binary else sys.stdout
        return
    encoding, newline = (None, None) if binary else ("utf-8", "")
    with replacing(path, mode, encoding=encoding, newline=newline) as f:
        yield f


@cli.command()
@click.argument("target", type=click.Path(exists=True, path_type=Path))
@request_options
@click.option(
    "--price-in",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Price of a million prompt tokens, for a cost estimate.",
)
@click.option(
    "--price-out",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Price of a million completion tokens.",
)
@click.option(
    "--via",
    type=click.Choice(["live", "batch", "auto"]),
    help="batch or auto: also show the batches a run would make, and their cost.",
)
@click.option("--base-url", help="The endpoint, for which provider's batches [default: job's].")
@click.option("--batch-dialect", type=click.Choice(["openai", "dashscope"]))
@click.option("--batch-max-lines", type=click.IntRange(min=1))
@click.option("--batch-max-bytes", type=click.IntRange(min=1024))
@click.option(
    "--check-endpoint",
    is_flag=True,
    help="Also ask the endpoint (models, context length, tokenizer, paths served) which "
    "lines it would refuse; no completion is called.",
)
@click.option(
    "--api-key-env",
    metavar="NAME",
    help="With --check-endpoint: the variable holding the API key [default: job's, "
    "else OPENAI_API_KEY].",
)
@click.option(
    "--split-out",
    type=click.Path(dir_okay=False, path_type=Path),
    help="With --check-endpoint: write the lines that would fail to FILE.",
)
@click.option("--json", "as_json", is_flag=True, help="Print the report as one JSON object.")
def validate(
    target: Path,
    max_tokens: int | None,
    temperature: float | None,
    params: dict[str, Any],
    price_in: float,
    price_out: float,
    check_endpoint: bool,
    split_out: Path | None,
    as_json: bool,
    **settings: Any,
) -> None:
    """Check TARGET (an input .jsonl or a job folder) as a run would, sending nothing.

    With --check-endpoint, also ask the endpoint which lines it would refuse (prompt and
    max_tokens past the context, a model or path it does not serve), calling no
    completion. Exit status 0 if every line is a usable request that the endpoint would
    take, 1 if some are not; 3 if the endpoint cannot be asked.
    """
    from batchq.answers import load_answers
    from batchq.config import build_settings
    from batchq.job.folder import JOB_TOML
    from batchq.job.settings import read_job_toml
    from batchq.reader import RequestTemplate
    from batchq.show.validate import render_report
    from batchq.show.validate import validate as check

    try:
        stored: dict[str, Any] = {"input": str(target)}
        if target.is_dir():
            stored = read_job_toml(target / JOB_TOML)
        elif settings["base_url"] is None:  # as run's new job would take it
            settings["base_url"] = os.environ.get("OPENAI_BASE_URL") or None
        if split_out is not None and not check_endpoint:
            raise click.UsageError("--split-out goes with --check-endpoint")
        given = _defaults(params, max_tokens, temperature)
        overrides = {**settings, "defaults": {**stored.get("defaults", {}), **given}}
        job_settings = build_settings(stored, overrides)
        path = target / job_settings.input if target.is_dir() else target
        # A job folder's --json-schema is added to each body at send time: judge those bodies.
        answers = load_answers(job_settings, target) if target.is_dir() else None
        template = RequestTemplate.from_settings(job_settings, answers)
        report = check(
            path,
            template,
            price_in=price_in or job_settings.price_in,
            price_out=price_out or job_settings.price_out,
        )
        preflight = None
        pool: dict[str, Preflight] = {}  # [[deployments]]: each is asked in turn
        if check_endpoint and job_settings.deployments:
            if split_out is not None:
                raise click.UsageError("--split-out goes with one endpoint, not [[deployments]]")
            for spec in job_settings.deployments:
                one = as_deployment(job_settings, spec)
                served = RequestTemplate.from_settings(one, answers)  # under its model name
                pool[spec.name] = _preflight(path, one, served, report, None)
        elif check_endpoint:
            preflight = _preflight(path, job_settings, template, report, split_out)
            # The endpoint's count replaces the estimate, in the cost too.
            report.prompt_tokens, report.prompt_counted = preflight.prompt_tokens, preflight.counted
        figures = report.as_dict()
        if job_settings.via != "live":
            figures["batch"] = _batch_plan(report, job_settings)
        if preflight is not None:
            figures["endpoint"] = preflight.as_dict()
        if pool:
            figures["deployments"] = {name: p.as_dict() for name, p in pool.items()}
    except BatchqError as exc:
        raise Failure(exc) from None
    if as_json:
        click.echo(orjson.dumps(figures, option=orjson.OPT_INDENT_2).decode())
    else:
        click.echo(render_report(report))
        if "batch" in figures:
            click.echo(_render_batch_plan(figures["batch"]))
        from batchq.show.preflight import render_preflight

        if preflight is not None:
            click.echo(render_preflight(preflight))
        for name, checked in pool.items():
            click.echo(f"  deployment {name}:\n" + render_preflight(checked))
    refused = any(p.would_fail > 0 for p in [*pool.values(), *([preflight] if preflight else [])])
    sys.exit(EXIT_OK if report.bad == 0 and not refused else EXIT_FAILED)


def _preflight(
    path: Path,
    settings: Settings,
    template: RequestTemplate,
    report: Report,
    split_out: Path | None,
) -> Preflight:
    """``validate --check-endpoint``: the endpoint's verdict on every line."""
    from batchq.live.preflight import check_endpoint

    def progress(line: str) -> None:
        _notice(f"validate: {line}")

    return asyncio.run(
        check_endpoint(
            path,
            template,
            base_url=settings.base_url,
            api_key=os.environ.get(settings.api_key_env) or None,
            key_env=settings.api_key_env,
            urls=report.endpoints,
            connect_timeout=settings.connect_timeout,
            split_out=split_out,
            progress=progress,
        )
    )


def _batch_plan(report: Report, settings: Settings) -> dict[str, Any]:
    """What ``--via batch`` would make of the report's requests, and their cost."""
    from batchq.batch.plan import dialect_of, estimate

    dialect = dialect_of(settings)
    batches, problems = estimate(
        report.groups, report.group_bytes, report.largest, settings, dialect
    )
    cost = report.cost
    return {
        "dialect": dialect.name,
        "batches": batches,
        "cannot_batch": problems,
        "cost_live": None if cost is None else cost["total"],
        "cost_batch": None if cost is None else cost["total"] / 2,  # both providers: half
    }


def _render_batch_plan(plan: dict[str, Any]) -> str:
    lines = [f"  by batch ({plan['dialect']}): {plan['batches']:,} batches"]
    if plan["cost_live"] is not None:
        lines[0] += f", cost at most ${plan['cost_batch']:,.2f} (live: ${plan['cost_live']:,.2f})"
    lines += [f"  cannot go by batch: {problem}" for problem in plan["cannot_batch"]]
    return "\n".join(lines)


_Decorator = Callable[[Callable[..., None]], Callable[..., None]]


def _rate(name: str, text: str) -> _Decorator:
    return click.option(name, type=click.FloatRange(0, 1), default=0.0, help=text)


_BATCH_OPTIONS: list[_Decorator] = [
    click.option(
        "--batch-time-scale",
        type=click.FloatRange(min=0, min_open=True),
        default=60.0,
        show_default=True,
        help="Batches: virtual seconds per real second (86400: a 24h window in 1 s).",
    ),
    click.option(
        "--batch-lines-per-second",
        type=click.FloatRange(min=0, min_open=True),
        default=10.0,
        show_default=True,
        help="Batches: lines processed per virtual second.",
    ),
    click.option(
        "--batch-step-seconds",
        type=click.FloatRange(min=0),
        default=30.0,
        show_default=True,
        help="Batches: virtual seconds that validating, finalizing and cancelling each take.",
    ),
    click.option(
        "--batch-max-lines",
        type=click.IntRange(min=1),
        default=50_000,
        show_default=True,
        help="Batches: a file with more lines fails validation.",
    ),
    click.option(
        "--batch-max-file-bytes",
        type=click.IntRange(min=0),
        default=0,
        help="Refuse larger uploads (0: 200 MB under /v1, 500 MB under /compatible-mode/v1).",
    ),
    click.option(
        "--batch-enqueued-tokens",
        type=click.IntRange(min=0),
        default=0,
        help="Fail batches with token_limit_exceeded past this many enqueued tokens a model.",
    ),
    _rate("--batch-lost-upload-rate", "Fraction of uploads stored but left unanswered."),
    _rate("--batch-lost-create-rate", "Fraction of batches created but left unanswered."),
    _rate("--batch-lost-cancel-rate", "Fraction of cancels done but left unanswered."),
    _rate("--batch-late-failure-rate", "Fraction of valid batches failing at validation."),
    _rate("--batch-expire-rate", "Fraction of batches expiring halfway through their lines."),
    _rate("--batch-truncated-download-rate", "Fraction of downloads cut short, then closed."),
    _rate("--batch-rate-429", "Fraction of Files and Batches requests answered 429."),
    _rate("--batch-rate-5xx", "Fraction of Files and Batches requests answered 500."),
]


def _batch_options(command: Callable[..., None]) -> Callable[..., None]:
    """The Files + Batches API's clock, limits and faults, for ``mock-server``."""
    for option in reversed(_BATCH_OPTIONS):
        command = option(command)
    return command


@cli.command("mock-server")
@click.option("--host", default="127.0.0.1", show_default=True)
@click.option(
    "--port",
    type=click.IntRange(0, 65535),
    default=0,
    show_default=True,
    help="0 picks a free port.",
)
@click.option("--latency", type=click.FloatRange(min=0), default=0.0, help="Seconds per answer.")
@click.option(
    "--latency-jitter",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Plus up to this many seconds at random.",
)
@click.option(
    "--latency-p50",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Plus a lognormal draw of this median, in seconds.",
)
@click.option(
    "--latency-p99",
    type=click.FloatRange(min=0),
    default=0.0,
    help="The lognormal draw's 99th percentile (needs --latency-p50).",
)
@click.option(
    "--slots",
    type=click.IntRange(min=0),
    default=0,
    help="Serve at most this many at once, like a GPU; the rest queue (0: no limit).",
)
@click.option(
    "--slot-load-factor",
    type=click.FloatRange(min=0),
    default=0.5,
    show_default=True,
    help="A full batch of slots serves each request this much slower (0.5: 1.5x).",
)
@click.option(
    "--gauges",
    type=click.Choice(["vllm", "llamacpp"]),
    default=None,
    help="Publish the load (requests served, requests waiting) at /metrics as vLLM or "
    "llama.cpp do.",
)
@click.option("--rate-500", type=click.FloatRange(0, 1), default=0.0, help="Fraction of 500s.")
@click.option("--rate-503", type=click.FloatRange(0, 1), default=0.0, help="Fraction of 503s.")
@click.option(
    "--drop-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Fraction of connections closed without an answer.",
)
@click.option(
    "--slow-body",
    type=click.FloatRange(min=0),
    default=0.0,
    help="Seconds over which each body is dribbled out.",
)
@click.option(
    "--api-key",
    "api_key_env",
    metavar="NAME",
    help="Require the key held by environment variable NAME.",
)
@click.option("--insufficient-quota", is_flag=True, help="Answer every request 429 quota.")
@click.option("--rpm", type=click.IntRange(min=0), default=0, help="Server-side request limit.")
@click.option("--tpm", type=click.IntRange(min=0), default=0, help="Server-side token limit.")
@click.option(
    "--rate-limit-headers/--no-rate-limit-headers",
    default=True,
    show_default=True,
    help="Send x-ratelimit-* headers; without them, limits show only as 429s (like vLLM).",
)
@click.option(
    "--max-model-len",
    type=click.IntRange(min=0),
    default=0,
    help="A context length, as vLLM reports it in /v1/models and /tokenize; a prompt plus "
    "max_tokens past it is answered 400 (0: no limit).",
)
@click.option(
    "--served-model",
    "models",
    multiple=True,
    metavar="NAME",
    help="Serve only this model (repeatable); others are answered 404 [default: any "
    "model, though /v1/models lists four].",
)
@click.option(
    "--invalid-json-rate",
    type=click.FloatRange(0, 1),
    default=0.0,
    help="Fraction of answers to JSON requests that do not parse or fit their schema.",
)
@click.option("--seed", type=int, help="Seed of the random faults and latencies.")
@click.option(
    "--record",
    is_flag=True,
    help="List every arrival, and each 200's arrival time and TPM charge, in /_mock/stats "
    "(memory grows with every request).",
)
@_batch_options
def mock_server(host: str, port: int, api_key_env: str | None, **faults: Any) -> None:
    """Serve the built-in OpenAI-compatible endpoint, for dry runs and tests."""
    from batchq.mockserver.live import MockOptions, serve_forever

    api_key = os.environ.get(api_key_env) if api_key_env else None
    if api_key_env and not api_key:
        raise click.BadParameter(f"${api_key_env} is empty", param_hint="--api-key")
    faults["gauges"] = faults["gauges"] or ""
    try:
        options = MockOptions(api_key=api_key, **faults)
    except ValueError as exc:  # flags that click checks one by one, but not together
        raise click.UsageError(str(exc)) from exc

    def ready(url: str) -> None:
        click.echo(f"batchq mock-server: listening on {url}", err=True)
        click.echo(url)  # the first line of stdout, for scripts

    with contextlib.suppress(Interrupted):  # Ctrl-C is how one stops it
        asyncio.run(serve_forever(options, host=host, port=port, ready=ready))


@cli.command()
@click.option(
    "--source",
    type=click.Path(exists=True, file_okay=False, path_type=Path),
    default=Path("jobs/demo"),
    show_default=True,
    help="The demo job to copy.",
)
def demo(source: Path) -> None:
    """Run the demo job against the built-in endpoint on a free port."""
    from batchq.demo import run_demo

    try:
        code = run_demo(source, notice=_notice)
    except BatchqError as exc:
        raise Failure(exc) from None
    sys.exit(code)


class Interrupted(SystemExit):
    """SIGINT or SIGTERM while the pipeline does not handle them itself: exit 130.

    Not a KeyboardInterrupt, which click turns into "Aborted!" and exit 1 ("finished
    with failures"); a SystemExit, which asyncio re-raises from any callback where it
    would log and swallow other exceptions.
    """


def _interrupt(signum: int, frame: object) -> None:
    raise Interrupted(EXIT_INTERRUPTED)


def main() -> NoReturn:
    """The console script: click, plus one line instead of a traceback for our own errors."""
    gc.set_threshold(GC_YOUNG, *gc.get_threshold()[1:])  # our process (not batchq.run's caller's)
    # SIGTERM means what Ctrl-C means, from the very start: the pipeline handles both
    # itself once it runs; until then both stop batchq with exit 130.
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, _interrupt)
    try:
        cli.main(prog_name="batchq")
    except Interrupted:
        _notice("interrupted")
        sys.exit(EXIT_INTERRUPTED)
    except OSError as exc:  # the machine's failure that no module below named: still one line
        where = f"{exc.filename}: " if exc.filename else ""
        _notice(f"error: {where}{exc.strerror or exc}; fix that and run the same command again")
        sys.exit(EXIT_FATAL)
    except Exception:  # a bug in batchq: the traceback helps us, the line tells the user
        traceback.print_exc()
        click.echo("batchq: internal error: this is a bug in batchq; please report it", err=True)
        sys.exit(70)
    sys.exit(0)
