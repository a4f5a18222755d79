"""JSONL input -> ``Request``: pure parsing, plus a thin async feeder.

Two line forms are accepted:

1. an OpenAI Batch API line, ``{"custom_id", "method", "url", "body"}``, where
   ``method`` and ``url`` may be left out (Together and Mistral write
   ``{"custom_id", "body"}``); a line's own ``url`` is honoured;
2. a bare request body; its ``custom_id`` key, if any, is taken out, and the
   id is otherwise ``line-<N>``.

On the job's endpoint the job's ``model``, ``system`` prompt and default
parameters fill in what a body lacks (the body's own values win). Lines
addressed to another endpoint, say embeddings in a chat job, are sent as
written: a chat model or ``max_tokens`` would only make them fail.

A line that cannot become a request is not an exception but an ``Outcome``
for errors.jsonl, so one bad line never stops a job.
"""

from __future__ import annotations

import asyncio
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any, BinaryIO

import orjson

from batchq.config import ENDPOINTS, JSONObject, Settings, show
from batchq.errors import InputError
from batchq.records import Outcome, Request, error_line

if TYPE_CHECKING:  # pragma: no cover
    from batchq.answers import Answers

#: Completion tokens assumed for --tpm when neither the body nor the job sets a maximum.
FALLBACK_COMPLETION_TOKENS = 256
_MAX_TOKEN_KEYS = ("max_tokens", "max_completion_tokens", "max_output_tokens")
_BATCH_KEYS = frozenset({"custom_id", "method", "url", "body"})
_BOM = b"\xef\xbb\xbf"


class BadLine(ValueError):
    """Why one input line is not a usable request."""

    def __init__(self, code: str, message: str, custom_id: str | None = None) -> None:
        super().__init__(message)
        self.code = code
        self.custom_id = custom_id


@dataclass(frozen=True, slots=True)
class RequestTemplate:
    """What the job adds to every request on its own endpoint."""

    endpoint: str
    model: str | None
    system: str | None
    defaults: JSONObject

    @classmethod
    def from_settings(cls, settings: Settings, answers: Answers | None = None) -> RequestTemplate:
        """The template of ``settings``; with ``answers``, its bodies ask for structured output
        (unless a body, or the job's defaults, already say how)."""
        defaults = dict(settings.defaults)
        if settings.endpoint == "/v1/responses" and "max_tokens" in defaults:
            # --max-tokens means the same there, under the name the Responses API accepts.
            defaults.setdefault("max_output_tokens", defaults.pop("max_tokens"))
        if answers is not None:
            defaults = {**answers.request_fields(settings.endpoint), **defaults}
        return cls(settings.endpoint, settings.model, settings.system, defaults)


def parse_line(raw: bytes, line_no: int, template: RequestTemplate) -> Request | Outcome:
    """One input line as a ``Request``, or as the error ``Outcome`` that says what is wrong."""
    try:
        return _parse(raw, line_no, template)
    except BadLine as bad:
        custom_id = f"line-{line_no}" if bad.custom_id is None else bad.custom_id
        line = error_line(line_no, custom_id, bad.code, f"input line {line_no}: {bad}")
        return Outcome(line_no, False, line)


def _parse(raw: bytes, line_no: int, template: RequestTemplate) -> Request:
    try:
        obj = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise BadLine("invalid_json", _why(exc)) from None
    if not isinstance(obj, dict):
        raise BadLine("invalid_request", f"a JSON {_JSON_TYPES[type(obj)]}, not an object")
    if isinstance(obj.get("body"), dict) and set(obj) <= _BATCH_KEYS:
        custom_id = _custom_id(obj.get("custom_id"), line_no)
        body = dict(obj["body"])
        url = _batch_url(obj, custom_id, template.endpoint)
    else:
        body = obj
        custom_id = _custom_id(body.pop("custom_id", None), line_no)
        url = template.endpoint
    if url == template.endpoint:
        _fill_in(body, template)
    _check_body(body, url, custom_id)
    try:
        encoded = orjson.dumps(body)
    except orjson.JSONEncodeError as exc:  # e.g. nested deeper than orjson writes
        raise BadLine("invalid_request", f"cannot be sent as JSON ({exc})", custom_id) from None
    prompt, cap = prompt_tokens(body), completion_cap(body, url)
    model = body.get("model")
    model = model if isinstance(model, str) else None
    return Request(line_no, custom_id, url, encoded, _estimate(prompt, cap), model, prompt, cap)


_JSON_TYPES = {list: "array", str: "string", int: "number", float: "number", bool: "boolean"}
_JSON_TYPES[type(None)] = "null"


def _custom_id(value: Any, line_no: int) -> str:
    if value is None:
        return f"line-{line_no}"
    if isinstance(value, str | int) and not isinstance(value, bool):
        return str(value)
    raise BadLine(
        "invalid_request", f"custom_id must be a string or a whole number, not {show(value)}"
    )


def _batch_url(obj: JSONObject, custom_id: str, default: str) -> str:
    method = obj.get("method", "POST")
    if method != "POST":
        raise BadLine("invalid_request", f"method must be POST, not {show(method)}", custom_id)
    url = obj.get("url")
    if url is None:
        return default
    path = url
    if isinstance(url, str) and url.startswith("/") and not url.startswith("/v1/"):
        path = "/v1" + url  # "/chat/completions" as some tools write it
    if path not in ENDPOINTS:
        supported = ", ".join(ENDPOINTS)
        raise BadLine("invalid_request", f"url {show(url)} is not one of {supported}", custom_id)
    return str(path)


def _fill_in(body: JSONObject, template: RequestTemplate) -> None:
    endpoint = template.endpoint
    if endpoint == "/v1/chat/completions":
        if "messages" not in body and isinstance(body.get("prompt"), str):
            body["messages"] = [{"role": "user", "content": body.pop("prompt")}]
        messages = body.get("messages")
        if (
            template.system
            and isinstance(messages, list)
            and messages
            and not _has_system(messages)
        ):
            body["messages"] = [{"role": "system", "content": template.system}, *messages]
    elif endpoint == "/v1/responses":
        if "input" not in body and isinstance(body.get("prompt"), str):
            body["input"] = body.pop("prompt")
        if template.system and "instructions" not in body:
            body["instructions"] = template.system
    if template.model and "model" not in body:
        body["model"] = template.model
    for key, value in template.defaults.items():
        body.setdefault(key, value)


def _has_system(messages: list[Any]) -> bool:
    return any(isinstance(m, dict) and m.get("role") in ("system", "developer") for m in messages)


_REQUIRED = {
    "/v1/chat/completions": "messages",
    "/v1/completions": "prompt",
    "/v1/embeddings": "input",
    "/v1/responses": "input",
}


def _check_body(body: JSONObject, url: str, custom_id: str) -> None:
    needed = _REQUIRED[url]
    if needed not in body:
        also = " (or a 'prompt' string)" if needed == "messages" else ""
        raise BadLine("invalid_request", f"no '{needed}'{also} for {url}", custom_id)
    if needed == "messages" and not (isinstance(body["messages"], list) and body["messages"]):
        raise BadLine("invalid_request", "'messages' must be a non-empty list", custom_id)


def estimate_tokens(body: JSONObject, url: str) -> int:
    """Tokens the endpoint will count against TPM: the prompt's plus the completion cap.

    OpenAI reserves a request's ``max_tokens`` when it arrives, whatever the
    answer turns out to be, so the cap belongs in the estimate.
    """
    return _estimate(prompt_tokens(body), completion_cap(body, url))


def _estimate(prompt: int, cap: int | None) -> int:
    return max(1, prompt + (FALLBACK_COMPLETION_TOKENS if cap is None else cap))


def prompt_tokens(body: JSONObject) -> int:
    """The prompt's tokens, estimated as characters / 4 (no tokenizer download needed)."""
    prompt = body.get("messages", body.get("prompt", body.get("input", "")))
    return (_text_length(prompt) + 3) // 4


def completion_cap(body: JSONObject, url: str) -> int | None:
    """The most completion tokens a request may use, over all its answers; 0 for
    embeddings, None if unset.

    OpenAI bills (and reserves against TPM) ``max_tokens`` for each answer it generates:
    ``n`` of them, ``best_of`` if that is more, and each of a list ``prompt``'s prompts.
    """
    cap = answer_cap(body, url)
    return None if cap is None else cap * answers_generated(body, url)


def answer_cap(body: JSONObject, url: str) -> int | None:
    """The most completion tokens one answer may use (``max_tokens`` or its kin): what
    must fit in the context beside the prompt; 0 for embeddings, None if unset."""
    if url == "/v1/embeddings":
        return 0
    for key in _MAX_TOKEN_KEYS:
        value = body.get(key)
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    return None


def answers_generated(body: JSONObject, url: str) -> int:
    """How many answers a request has generated: ``n`` or ``best_of``, whichever is more,
    for each prompt of a list ``prompt`` on /v1/completions."""
    each = max(1, _positive_int(body.get("n")), _positive_int(body.get("best_of")))
    prompt = body.get("prompt")
    # A list of strings (or of token lists) is that many prompts; a list of ints is one.
    if url != "/v1/completions" or not isinstance(prompt, list) or not prompt:
        return each
    return each if all(isinstance(token, int) for token in prompt) else each * len(prompt)


def _positive_int(value: Any) -> int:
    """``value`` if it is a whole number above 0, else 0."""
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


def _text_length(value: Any) -> int:
    if isinstance(value, str):
        return len(value)
    if isinstance(value, list):
        return sum(_text_length(v) for v in value)
    if isinstance(value, dict):
        return _text_length(value.get("content", value.get("text", "")))
    return 0


#: How compressed files begin; orjson's reading of them ("surrogates not allowed") tells nobody.
_COMPRESSED = {
    b"\x1f\x8b": "gzip",
    b"PK\x03\x04": "zip",
    b"BZh": "bzip2",
    b"\x28\xb5\x2f\xfd": "zstd",
}
_COMPRESSED[b"\xfd7zXZ"] = "xz"


def without_bom(raw: bytes, line_no: int) -> bytes:
    """Line ``line_no`` of an input without the UTF-8 BOM some Windows editors begin files with."""
    return raw.removeprefix(_BOM) if line_no == 1 else raw


def check_jsonl(path: Path) -> None:
    """Refuse, with one line, a file that is not JSONL at all (its first line is no JSON object)."""
    try:
        with path.open("rb") as f:
            head = f.read(8)
            for magic, kind in _COMPRESSED.items():
                if head.startswith(magic):
                    raise InputError(
                        f"{path} is {kind}-compressed, not JSONL text; unpack it first"
                    )
            f.seek(0)
            for line_no, raw in enumerate(f, start=1):
                line = without_bom(raw, line_no)
                if line.strip():
                    try:
                        obj = orjson.loads(line)
                    except orjson.JSONDecodeError as exc:
                        raise InputError(
                            f"{path} is not JSONL: its first line (line {line_no}) is {_why(exc)}"
                        ) from None
                    if not isinstance(obj, dict):
                        raise InputError(
                            f"{path} is not JSONL: its first line (line {line_no}) is not a "
                            "JSON object"
                        )
                    return
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc


def _why(exc: orjson.JSONDecodeError) -> str:
    """What is wrong with a line, in words: orjson reports bad UTF-8 as "surrogates"."""
    if "utf-8" in str(exc).lower() or "surrogate" in str(exc).lower():
        return "not UTF-8 text (is the file binary, or in another encoding?)"
    return f"not valid JSON ({exc})"


async def feed(
    path: Path,
    size: int,
    is_done: Callable[[int], bool],
    template: RequestTemplate,
    send: Callable[[Request], Awaitable[None]],
    reject: Callable[[Outcome], Awaitable[None]],
    *,
    done_prefix: int = 0,
    start: int = 0,
    first_line: int = 1,
) -> int:
    """Read bytes ``start`` to ``size`` of ``path`` line by line; hand on every line not yet done.

    ``start`` is where line ``first_line`` begins (a shard's part of the
    input). Returns the number of the last line read. The file is streamed,
    never loaded: memory stays flat however long the input is. The first
    ``done_prefix`` lines, all done, are stepped over without being looked at
    one by one: a resumed job starts sending at once.
    """
    with path.open("rb", buffering=1 << 20) as f:
        skipped, offset = _skip_lines(f, done_prefix, size, start=start)
        line_no = first_line - 1 + skipped
        for raw in f:
            if offset >= size:
                break
            line = raw[: size - offset]
            offset += len(raw)
            line_no += 1
            line = without_bom(line, line_no)
            if line_no % 1024 == 0:
                await asyncio.sleep(0)  # skipping a long done prefix must not starve the loop
            if is_done(line_no) or not line.strip():
                continue
            parsed = parse_line(line, line_no, template)
            if isinstance(parsed, Request):
                await send(parsed)
            else:
                await reject(parsed)
    return line_no


def _skip_lines(
    f: BinaryIO, count: int, size: int, block_size: int = 1 << 20, *, start: int = 0
) -> tuple[int, int]:
    """Step over up to ``count`` whole lines in bytes ``start`` to ``size``, by counting newlines.

    Returns how many lines were stepped over and the offset after them, where ``f`` now is.
    """
    skipped = 0
    offset = block_start = start
    f.seek(start)
    while skipped < count and block_start < size:
        block = f.read(min(block_size, size - block_start))
        if not block:
            break
        newlines = block.count(b"\n")
        if skipped + newlines >= count:
            end = -1
            for _ in range(count - skipped):
                end = block.index(b"\n", end + 1)
            skipped, offset = count, block_start + end + 1
            break
        if newlines:
            skipped, offset = skipped + newlines, block_start + block.rfind(b"\n") + 1
        block_start += len(block)
    f.seek(offset)
    return skipped, offset
