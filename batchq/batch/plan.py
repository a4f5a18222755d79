"""Which provider, and the job's pending lines split into batch files it will take.

Each chunk is one file of at most ``batch_max_lines`` lines and
``batch_max_bytes`` bytes, for one endpoint and one model (both providers
refuse a file that mixes them). Every line is uploaded under batchq's own
``custom_id`` (``batchq-<line>``): unique whatever the input's ids are, and
mapped back to the input line, and to the user's id, on the way in; the
user's ids are kept beside the file (``chunk-NNNNN.ids``).

A line no batch can take (too large for any file, or for an endpoint the
provider does not batch) is found here, before anything is uploaded, and
refused: the provider would fail the whole file for it.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path

import orjson

from batchq.answers import Answers
from batchq.config import Settings, show, window_hours
from batchq.errors import ConfigError
from batchq.job import durable
from batchq.job.batches import Chunk, to_ranges
from batchq.job.shard import Span
from batchq.reader import RequestTemplate, feed
from batchq.records import Outcome, Request

FLUSH = 1 << 20  # bytes a chunk's file buffers between writes


@dataclass(frozen=True, slots=True)
class Dialect:
    """What one provider's Batch API takes."""

    name: str
    endpoints: frozenset[str]
    max_window_hours: int


# OpenAI: every endpoint batchq sends, a 24 h window only. DashScope's compatible mode
# batches chat completions and embeddings only, and waits up to 14 days (336 h).
OPENAI = Dialect(
    "openai",
    frozenset({"/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses"}),
    24,
)
DASHSCOPE = Dialect("dashscope", frozenset({"/v1/chat/completions", "/v1/embeddings"}), 336)
DIALECTS = {d.name: d for d in (OPENAI, DASHSCOPE)}


def dialect_of(settings: Settings) -> Dialect:
    """The dialect named in the settings, else DashScope for its ``compatible-mode`` path."""
    if settings.batch_dialect is not None:
        return DIALECTS[settings.batch_dialect]
    return DASHSCOPE if "/compatible-mode/" in settings.base_url + "/" else OPENAI


def check_window(window: str, dialect: Dialect) -> None:
    """Refuse a completion window the provider would refuse."""
    hours = window_hours(window) or 0
    if dialect is OPENAI and window != "24h":
        raise ConfigError(f"completion_window {show(window)}: OpenAI's batches take only 24h")
    if not 24 <= hours <= dialect.max_window_hours:
        raise ConfigError(
            f"completion_window {show(window)} must be 24h to {dialect.max_window_hours}h "
            f"for {dialect.name}"
        )


@dataclass(slots=True)
class Plan:
    """New chunks, written to disk but not yet in the ledger; and what cannot go."""

    chunks: list[Chunk] = field(default_factory=list)
    rejected: list[Outcome] = field(default_factory=list)  # bad input lines: errors.jsonl
    refused: list[str] = field(default_factory=list)  # why lines cannot go (the first few)
    refused_count: int = 0

    def refuse(self, why: str) -> None:
        self.refused_count += 1
        if len(self.refused) < 5:
            self.refused.append(why)


class _Open:
    """A chunk being written: its file, its ids, how much it holds."""

    def __init__(self, folder: Path, number: int, url: str, model: str | None, attempt: int):
        self.chunk = Chunk(number, [], 0, attempt, url, model, 0)
        self.file = durable.open_file(folder / f"{self.chunk.name}.jsonl", truncate=True)
        self.ids = durable.open_file(folder / f"{self.chunk.name}.ids", truncate=True)
        self.lines: list[int] = []
        self.buffer = bytearray()
        self.id_buffer = bytearray()

    def add(self, line: bytes, request: Request) -> None:
        self.buffer += line
        self.id_buffer += orjson.dumps([request.line_no, request.custom_id]) + b"\n"
        self.lines.append(request.line_no)
        self.chunk.bytes += len(line)
        if len(self.buffer) >= FLUSH:
            self.flush()

    def flush(self) -> None:
        durable.write(self.file, bytes(self.buffer))
        durable.write(self.ids, bytes(self.id_buffer))
        self.buffer.clear()
        self.id_buffer.clear()

    def close(self) -> Chunk:
        """Flushed, fsynced and closed: the file is what a later run uploads."""
        try:
            self.flush()
            durable.fsync(self.file)
            durable.fsync(self.ids)
        finally:
            durable.close(self.file)
            durable.close(self.ids)
        self.chunk.lines = to_ranges(self.lines)
        self.chunk.count = len(self.lines)
        return self.chunk

    def discard(self) -> None:
        durable.close(self.file)
        durable.close(self.ids)


def upload_line(request: Request) -> bytes:
    """The request as a line of a batch input file, under batchq's own custom_id."""
    return b'{"custom_id":"batchq-%d","method":"POST","url":"%s","body":%b}\n' % (
        request.line_no,
        request.url.encode(),
        request.body,
    )


async def plan(
    settings: Settings,
    input_path: Path,
    span: Span,
    skip: Callable[[int], bool],
    attempts: dict[int, int],
    folder: Path,
    first_number: int,
    dialect: Dialect,
    answers: Answers | None = None,
) -> Plan:
    """Split every line of ``span`` that ``skip`` does not exclude into chunk files."""
    durable.make_dirs(folder)
    result = Plan()
    writing: dict[tuple[str, str | None, int], _Open] = {}
    number = first_number

    async def send(request: Request) -> None:
        nonlocal number
        line = upload_line(request)
        if request.url not in dialect.endpoints:
            result.refuse(f"line {request.line_no}: {dialect.name} does not batch {request.url}")
            return
        if len(line) > settings.batch_max_bytes:
            result.refuse(
                f"line {request.line_no}: {len(line):,} bytes, more than a batch file may hold "
                f"(--batch-max-bytes {settings.batch_max_bytes:,})"
            )
            return
        key = (request.url, _model(request), attempts.get(request.line_no, 0) + 1)
        current = writing.get(key)
        if current is not None and (
            len(current.lines) >= settings.batch_max_lines
            or current.chunk.bytes + len(line) > settings.batch_max_bytes
        ):
            result.chunks.append(writing.pop(key).close())
            current = None
        if current is None:
            current = writing[key] = _Open(folder, number, *key)
            number += 1
        current.add(line, request)

    async def reject(outcome: Outcome) -> None:
        result.rejected.append(outcome)

    try:
        template = RequestTemplate.from_settings(settings, answers)
        await feed(
            input_path, span.end, skip, template, send, reject,
            start=span.start, first_line=span.first_line,
        )  # fmt: skip
        for key in list(writing):
            result.chunks.append(writing.pop(key).close())
    finally:
        for left in writing.values():
            left.discard()
    if result.chunks:
        durable.fsync_dir(folder)
    result.chunks.sort(key=lambda c: c.number)
    return result


def _model(request: Request) -> str | None:
    model = orjson.loads(request.body).get("model")
    return model if isinstance(model, str) else None


#: What a batch file line adds to a request's body: its custom_id, method and url.
LINE_OVERHEAD = 100


def estimate(
    groups: dict[tuple[str, str], int],
    group_bytes: dict[tuple[str, str], int],
    largest: int,
    settings: Settings,
    dialect: Dialect,
) -> tuple[int, list[str]]:
    """How many batches ``validate --via batch`` expects, and what no batch would take."""
    batches, problems = 0, []
    for (url, model), lines in sorted(groups.items()):
        if url not in dialect.endpoints:
            problems.append(f"{lines:,} lines on {url}, which {dialect.name} does not batch")
            continue
        size = group_bytes[url, model] + lines * LINE_OVERHEAD
        batches += max(-(-lines // settings.batch_max_lines), -(-size // settings.batch_max_bytes))
    if largest + LINE_OVERHEAD > settings.batch_max_bytes:
        problems.append(f"a request of {largest:,} bytes, more than --batch-max-bytes")
    return batches, problems
