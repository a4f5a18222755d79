"""The values that flow through the pipeline, and their JSONL form.

A ``Request`` is one input line made ready to send: its body is already
serialised, so a retry costs no work. An ``Outcome`` is what comes back,
already rendered as the output line the writer appends, so the writer does
nothing but join bytes.

Output lines follow the OpenAI Batch API output format::

    {"id": ..., "custom_id": ..., "response": {"status_code", "request_id", "body"} | null,
     "error": {"code", "message"} | null, "batchq": {"line", "attempts", ...}}

Everything batchq adds sits under the one extra key ``batchq``.
"""

from __future__ import annotations

import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

import orjson


# Not frozen: a frozen dataclass's __init__ sets each field through object.__setattr__,
# a measurable cost for values made once per request. Nothing mutates them.
@dataclass(slots=True)
class Request:
    """One request, ready to send."""

    line_no: int  # 1-based line of the input file; the request's identity in the job
    custom_id: str
    url: str  # endpoint path, e.g. "/v1/chat/completions"
    body: bytes  # JSON, serialised once
    tokens: int  # estimated prompt + completion tokens, for --tpm
    model: str | None = None  # the body's, for the price of a job that mixes models
    prompt_estimate: int = 0  # of ``tokens``, the prompt's
    completion_cap: int | None = None  # max_tokens (or kin) × answers (n); None: not set


@dataclass(slots=True)
class Outcome:
    """The output line of one request and what the job counts about it."""

    line_no: int
    ok: bool
    line: bytes  # the rendered JSONL line, newline included
    prompt_tokens: int = 0
    completion_tokens: int = 0
    cached_tokens: int = 0  # of prompt_tokens, those the endpoint served from its cache


def result_line(
    request: Request,
    status: int,
    request_id: str | None,
    raw_body: bytes,
    body: Any,
    *,
    attempts: int,
    hedged: bool = False,
    batch: str | None = None,
    deployment: str | None = None,
) -> bytes:
    """The results.jsonl line of a request the endpoint answered with 2xx.

    ``raw_body`` is the answer as received and ``body`` the same decoded. The
    raw bytes are spliced in (they are valid JSON: they were decoded), which
    saves encoding every answer again, and also keeps an answer nested deeper
    than orjson writes. A line break in valid JSON can only be whitespace
    between tokens, so a pretty-printed answer is put on one line by turning
    its line breaks into spaces.
    """
    extra: dict[str, Any] = {"line": request.line_no, "attempts": attempts}
    if hedged:  # copies were sent; the first answer is this one
        extra["hedged"] = True
    if batch is not None:  # answered in this provider batch, not live
        extra["batch"] = batch
    if deployment is not None:  # the deployment of a [[deployments]] pool that answered
        extra["deployment"] = deployment
    if isinstance(body, dict | list):
        if b"\n" in raw_body or b"\r" in raw_body:
            raw_body = raw_body.translate(_LINE_BREAKS_TO_SPACES)
        head = orjson.dumps(
            {
                "id": f"batch_req_{request.line_no}",
                "custom_id": request.custom_id,
                "response": {"status_code": status, "request_id": request_id},
            }
        )
        tail = orjson.dumps({"error": None, "batchq": extra})
        # head ends in "}}": reopen "response" to add its body, then the rest of the line.
        return b"".join((head[:-2], b',"body":', raw_body, b"},", tail[1:], b"\n"))
    return orjson.dumps(
        {
            "id": f"batch_req_{request.line_no}",
            "custom_id": request.custom_id,
            "response": {"status_code": status, "request_id": request_id, "body": body},
            "error": None,
            "batchq": extra,
        },
        option=orjson.OPT_APPEND_NEWLINE,
    )


_LINE_BREAKS_TO_SPACES = bytes.maketrans(b"\r\n", b"  ")

#: How deeply orjson reads nested JSON: a line nested deeper cannot be read back.
READ_DEPTH = 1024
#: The levels ``result_line`` puts around a spliced body: the line's object and "response".
_SPLICE_DEPTH = 2
#: The deepest answer whose result line still reads back.
MAX_ANSWER_DEPTH = READ_DEPTH - _SPLICE_DEPTH


def splices(raw_body: bytes) -> bool:
    """Whether ``raw_body``, valid JSON, nests shallowly enough to read back from its result line.

    A body that orjson just read may be nested up to ``READ_DEPTH`` levels; spliced
    into its line, two levels deeper, it would make every later read of the job fail.
    Each level takes two bytes and one opening bracket, so only a body with more of
    both than ``MAX_ANSWER_DEPTH`` can be too deep, and only such a body (rare: long,
    and full of brackets) is parsed a second time, inside the levels the line adds.
    """
    if len(raw_body) <= 2 * MAX_ANSWER_DEPTH + 1:
        return True
    if raw_body.count(b"{") + raw_body.count(b"[") <= MAX_ANSWER_DEPTH:
        return True
    try:
        orjson.loads(b"[" * _SPLICE_DEPTH + raw_body + b"]" * _SPLICE_DEPTH)
    except orjson.JSONDecodeError:
        return False
    return True


def error_line(
    line_no: int,
    custom_id: str | None,
    code: str,
    message: str,
    *,
    status: int | None = None,
    request_id: str | None = None,
    body: Any = None,
    attempts: int = 0,
    retryable: bool = False,
    batch: str | None = None,
) -> bytes:
    """The errors.jsonl line of a request that failed for good, or of a bad input line.

    ``retryable`` marks failures that ``--retry-failed`` sends again: 5xx,
    timeouts, dropped connections, 429s. Rejected requests and bad input
    lines are not retryable; sending them again would fail the same way.
    """
    response = None
    if status is not None:
        response = {"status_code": status, "request_id": request_id, "body": body}
    extra: dict[str, Any] = {"line": line_no, "attempts": attempts, "retryable": retryable}
    if batch is not None:
        extra["batch"] = batch
    line = {
        "id": f"batch_req_{line_no}",
        "custom_id": custom_id,
        "response": response,
        "error": {"code": code, "message": message},
        "batchq": extra,
    }
    try:
        return orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE)
    except orjson.JSONEncodeError:  # a body nested deeper than orjson writes
        body = "(not kept: nested too deeply)"
        return error_line(
            line_no,
            custom_id,
            code,
            message,
            status=status,
            request_id=request_id,
            body=body,
            attempts=attempts,
            retryable=retryable,
            batch=batch,
        )


def usage_tokens(body: dict[str, Any]) -> tuple[int, int]:
    """Prompt and completion tokens from an answer's ``usage``, in either API's names."""
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return 0, 0
    prompt = usage.get("prompt_tokens", usage.get("input_tokens"))
    completion = usage.get("completion_tokens", usage.get("output_tokens"))
    return _count(prompt), _count(completion)


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) else 0


def answer_text(body: dict[str, Any]) -> str | None:
    """The generated text of a chat, completions or responses answer; None if it has none."""
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        choice = choices[0]
        message = choice.get("message")
        if isinstance(message, dict):
            content = message.get("content")
            return content if isinstance(content, str) else None
        text = choice.get("text")
        return text if isinstance(text, str) else None
    if isinstance(body.get("output_text"), str):
        return str(body["output_text"])
    parts = [
        part.get("text")
        for item in body.get("output") or []
        if isinstance(item, dict) and item.get("type") == "message"
        for part in item.get("content") or []
        if isinstance(part, dict) and part.get("type") == "output_text"
    ]
    texts = [p for p in parts if isinstance(p, str)]
    return "".join(texts) if texts else None


def with_extra(line: bytes, extra: dict[str, Any]) -> bytes:
    """An output line with more keys under its ``batchq`` key, which every line ends with.

    Spliced, not decoded and written again: the line may hold an answer nested
    deeper than orjson writes.
    """
    assert line.endswith(b"}}\n"), line[-40:]
    return b"".join((line[:-3], b",", orjson.dumps(extra)[1:], b"}\n"))


#: What an API key is replaced with wherever it would be written.
KEY_REMOVED = "[api key removed]"
_REMOVED = KEY_REMOVED.encode()
#: Shorter "keys" are placeholders for local servers ("EMPTY", "ollama"), not secrets,
#: and would match ordinary words in the answers.
MIN_SCRUBBED_KEY = 8


class KeyScrubber:
    """Takes the API key out of output lines, even when an endpoint echoes it back.

    A line without the key costs one scan for it, and one for a JSON escape that
    could spell one of the key's characters in other bytes (``\\u0073`` for "s",
    ``\\/`` for "/"). Only such a line, or one with the key, is decoded and the key
    replaced in every string, so the line stays valid JSON whatever the key is.
    Other escapes (``\\u00e9`` of an ASCII-only answer, ``\\u003c`` from a Go
    server) cannot hide the key, and decoding every line that holds one cost ten
    times the scan.
    """

    __slots__ = ("_escapes", "_needle", "key")

    def __init__(self, key: str) -> None:
        self.key = key
        self._needle = key.encode()
        self._escapes = _escapes_of(key)

    def text(self, text: str) -> str:
        return text.replace(self.key, KEY_REMOVED)

    def raw(self, data: bytes) -> bytes:
        """``data`` with every plain occurrence of the key replaced (one scan when none)."""
        return data.replace(self._needle, _REMOVED) if self._needle in data else data

    def scrub(self, line: bytes) -> bytes:
        if self._needle not in line and (b"\\" not in line or not self._escapes.search(line)):
            return line
        try:
            return orjson.dumps(self._clean(orjson.loads(line)), option=orjson.OPT_APPEND_NEWLINE)
        except (orjson.JSONDecodeError, orjson.JSONEncodeError):  # too deep: the plain key only
            return self.raw(line)

    def _clean(self, value: Any) -> Any:
        if isinstance(value, str):
            return value.replace(self.key, KEY_REMOVED)
        if isinstance(value, list):
            return [self._clean(v) for v in value]
        if isinstance(value, dict):
            return {self._clean(k): self._clean(v) for k, v in value.items()}
        return value


#: JSON's short escapes, of the characters that have one.
_SHORT_ESCAPES = {'"': '\\"', "\\": "\\\\", "/": "\\/", "\b": "\\b", "\f": "\\f"}
_SHORT_ESCAPES |= {"\n": "\\n", "\r": "\\r", "\t": "\\t"}


def _escapes_of(key: str) -> re.Pattern[bytes]:
    """A pattern of every JSON escape that decodes to a character of ``key``."""
    found = set()
    for char in set(key):
        # \uXXXX in either case; beyond the BMP, the first of the surrogate pair's escapes.
        unit = char.encode("utf-16-be")[:2].hex()
        found.add("\\\\u" + "".join(f"[{c}{c.upper()}]" if c.isalpha() else c for c in unit))
        if char in _SHORT_ESCAPES:
            found.add(re.escape(_SHORT_ESCAPES[char]))
    return re.compile("|".join(sorted(found)).encode())


def key_scrubber(key: str | None) -> KeyScrubber | None:
    """A scrubber for ``key``, or None when there is no key worth hiding."""
    return KeyScrubber(key) if key and len(key) >= MIN_SCRUBBED_KEY else None


def scrubbers(*secrets: str | None) -> list[KeyScrubber]:
    """A scrubber for each secret worth hiding (API keys, a base URL's credentials)."""
    return [s for secret in dict.fromkeys(secrets) if (s := key_scrubber(secret)) is not None]


def hidden(text: str, scrubbers: Iterable[KeyScrubber]) -> str:
    """``text`` with every secret of ``scrubbers`` removed: for messages that may quote a
    URL or an answer (aiohttp's errors name the URL, a credential in its query too)."""
    for scrubber in scrubbers:
        text = scrubber.text(text)
    return text
