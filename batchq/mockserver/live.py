"""The built-in OpenAI-compatible endpoint (`batchq mock-server`), scriptable for tests.

It answers `/v1/chat/completions`, `/v1/completions`, `/v1/embeddings`, `/v1/responses` and
`/v1/models` with deterministic, OpenAI-shaped replies: the reply text is "Echo: " plus the
first 100 characters of the prompt, and a token is four characters. Times are float seconds.
Like vLLM it also serves `POST /tokenize` (the count a completion's usage would report) and,
with `max_model_len`, reports the context length in `/v1/models` and answers a request past
it with vLLM's 400; with `models`, a model it does not serve gets vLLM's 404.

One method, `_Mock._decide`, chooses every answer, in the order a real endpoint reaches it:

    auth (401) -> quota (429) -> body (400) -> model (404) -> context (400)
    -> scripted faults -> RPM/TPM (429)
    -> random faults (500, 503, drop) -> the reply

`_Mock._send` then waits for the latency and sends it, or dribbles it out slowly.

Latency shapes of real endpoints: `latency` (fixed) plus `latency_jitter` (uniform) plus a
lognormal draw of median `latency_p50` and 99th percentile `latency_p99` (a heavy tail, as
hosted APIs have). With `slots=K` the endpoint behaves like a GPU serving a batch: at most
K requests are served at once, the rest queue FIFO, and each one's delay is stretched by
`1 + slot_load_factor * (busy - 1) / K`, so a full batch is slower per request but still
serves more per second than a small one. The stats report what the server saw: requests
in it at most (`max_in_flight`), served at most (`max_serving`), the median time in it
and in its queue of a uniform sample of its 200 answers, and the TPM charge of its 200
answers (`accepted_tokens`, counted whether or not a TPM is enforced). With `record` they
also list every arrival and every 200's arrival time and charge (`accepted`), all
`time.time()`, as `first_at` and `last_at` are.

A request that asks for JSON (`response_format`, or `text.format` on `/v1/responses`) is
answered with JSON that fits its schema, or, at `invalid_json_rate`, with an answer that does
not parse or fit (structured.py); the stats count both (`structured`, `invalid_answers`).

Scripted faults are directives inside the prompt, so a test writes the fault beside the
request that meets it: `[[mock:fail=2]]` (the first 2 arrivals of this exact prompt get 503;
`fail=2:500` for 500), `[[mock:drop=1]]` (close the connection with no answer),
`[[mock:status=400]]` (always that status) and `[[mock:sleep=0.5]]` (answer late;
`sleep=30:1`: only the first arrival, as a straggler whose second copy is quick). Arrivals
are counted only for prompts holding a directive, so memory stays bounded without `record`.

Rate limits mimic OpenAI's: a sliding 60-second window of accepted requests and of their
estimated tokens, plus a 1-second window allowing 1.2/60 of the minute's limit, because
OpenAI also rejects bursts over short windows. `x-ratelimit-reset-*` give the time until the
budget takes one more request (or token): "0s" while it would take one now, else the time
until a window frees room. OpenAI's own value (the time until the budget is full again) can be
longer; ours is exactly what a client waiting on it needs.

Benchmarks push thousands of requests per second through this: fixed bodies are encoded
once, there is no middleware or access log, and the windows are deques with running sums.
"""

from __future__ import annotations

import asyncio
import functools
import hashlib
import itertools
import math
import random
import re
import statistics
import struct
import time
from collections import Counter, deque
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass, field, replace
from types import TracebackType
from typing import TYPE_CHECKING, Any

import orjson
from aiohttp import web

from batchq.mockserver.structured import fitting, requested_schema, unfitting

if TYPE_CHECKING:  # mockserver.batches builds on this module, so it is imported where it is used
    from batchq.mockserver.batches import BatchAPI

__all__ = ["MockOptions", "MockServer", "build_app", "format_duration", "serve_forever"]

JSONObject = dict[str, Any]


@dataclass(frozen=True, slots=True, kw_only=True)
class MockOptions:
    """All times in float seconds; rates are fractions 0..1 of requests."""

    latency: float = 0.0  # fixed delay before every answer
    latency_jitter: float = 0.0  # plus uniform(0, latency_jitter)
    rate_500: float = 0.0  # fraction answered 500
    rate_503: float = 0.0  # fraction answered 503
    drop_rate: float = 0.0  # fraction whose connection is closed with no answer
    slow_body: float = 0.0  # seconds over which the body is dribbled out in chunks
    api_key: str | None = None  # if set, require "Authorization: Bearer <api_key>", else 401
    insufficient_quota: bool = False  # every request answered 429 insufficient_quota
    rpm: int = 0  # requests per minute (0 = no limit)
    tpm: int = 0  # tokens per minute (0 = no limit)
    latency_p50: float = 0.0  # plus a lognormal draw of this median (0 = none) ...
    latency_p99: float = 0.0  # ... and this 99th percentile (0 = the median: no spread)
    slots: int = 0  # at most this many served at once, the rest queue FIFO (0 = no limit)
    slot_load_factor: float = 0.5  # a full batch serves each request 1 + this times slower
    rate_limit_headers: bool = True  # send x-ratelimit-* (vLLM-like servers do not)
    gauges: str = ""  # publish the load at /metrics as "vllm" or "llamacpp" does ("": 404)
    seed: int | None = None  # for the random faults, jitter and lognormal draws
    record: bool = False  # keep per-prompt arrivals and 200s in stats(); memory grows
    # vLLM's context length: in /v1/models and /tokenize, and a prompt + max_tokens past it
    # is answered 400 as vLLM answers it (0 = no limit, nothing reported).
    max_model_len: int = 0
    models: tuple[str, ...] = ()  # serve only these, others 404 as vLLM does (): any model)
    invalid_json_rate: float = 0.0  # structured answers that do not parse or fit (structured.py)
    # The Files + Batches API (batchq.mockserver.batches); its times are virtual seconds.
    batch_time_scale: float = 60.0  # virtual seconds per real second
    batch_lines_per_second: float = 10.0  # a batch's pace, in lines per virtual second
    batch_step_seconds: float = 30.0  # validating, finalizing and cancelling each take this
    batch_max_lines: int = 50_000  # more lines fail the batch's validation
    batch_max_file_bytes: int = 0  # uploads refused past this (0: 200 MB OpenAI, 500 MB DashScope)
    batch_enqueued_tokens: int = 0  # per model, over unfinished batches (0 = no limit)
    batch_lost_upload_rate: float = 0.0  # file stored, then the connection closed unanswered
    batch_lost_create_rate: float = 0.0  # batch created, then the connection closed
    batch_lost_cancel_rate: float = 0.0  # cancel done, then the connection closed
    batch_late_failure_rate: float = 0.0  # valid batches that fail when validation ends
    batch_expire_rate: float = 0.0  # batches whose window closes halfway through their lines
    batch_truncated_download_rate: float = 0.0  # contents cut short of their Content-Length
    batch_rate_429: float = 0.0  # Files and Batches requests answered 429
    batch_rate_5xx: float = 0.0  # ... and 500

    def __post_init__(self) -> None:
        rates: tuple[str, ...] = ("rate_500", "rate_503", "drop_rate", "batch_rate_429")
        rates += ("batch_rate_5xx", "invalid_json_rate")
        faults = ("lost_upload", "lost_create", "lost_cancel", "late_failure", "expire")
        faults_rates = (f"batch_{fault}_rate" for fault in (*faults, "truncated_download"))
        for name in (*rates, *faults_rates):
            if not 0.0 <= getattr(self, name) <= 1.0:
                raise ValueError(f"{name} must be between 0 and 1, got {getattr(self, name)!r}")
        for name in ("batch_time_scale", "batch_lines_per_second"):
            if not 0 < getattr(self, name) < math.inf:
                raise ValueError(f"{name} must be a positive number, got {getattr(self, name)!r}")
        # One random draw picks among the three faults, so together they must fit in 1.
        if self.rate_500 + self.rate_503 + self.drop_rate > 1.0 + 1e-9:
            raise ValueError("rate_500 + rate_503 + drop_rate must not exceed 1")
        numbers = ("latency", "latency_jitter", "latency_p50", "latency_p99", "slow_body")
        batch_numbers = ("batch_step_seconds", "batch_max_file_bytes", "batch_enqueued_tokens")
        limits = ("slot_load_factor", "slots", "rpm", "tpm", "max_model_len")
        for name in (*numbers, *batch_numbers, *limits):
            if not 0 <= getattr(self, name) < math.inf:
                raise ValueError(
                    f"{name} must be a non-negative number, got {getattr(self, name)!r}"
                )
        if self.gauges not in _GAUGES:
            raise ValueError(f"gauges must be one of {sorted(_GAUGES)}, got {self.gauges!r}")
        if self.latency_p99 and not self.latency_p99 >= self.latency_p50 > 0:
            raise ValueError(
                "latency_p99 needs 0 < latency_p50 <= latency_p99, got"
                f" latency_p50={self.latency_p50!r}, latency_p99={self.latency_p99!r}"
            )

    @property
    def lognormal(self) -> tuple[float, float] | None:
        """(mu, sigma) of the lognormal latency, or None without one."""
        if not self.latency_p50:
            return None
        p99 = self.latency_p99 or self.latency_p50
        return math.log(self.latency_p50), math.log(p99 / self.latency_p50) / _Z99


# The load's gauges as each server names them at /metrics: (running, waiting), and a line
# of another metric around them, as a real page has.
_GAUGES = {
    "": None,
    "vllm": (
        'vllm:num_requests_running{model_name="m"}',
        'vllm:num_requests_waiting{model_name="m"}',
    ),
    "llamacpp": ("llamacpp:requests_processing", "llamacpp:requests_deferred"),
}

# The 99th percentile of a normal distribution, in standard deviations above its median.
_Z99 = statistics.NormalDist().inv_cdf(0.99)


def format_duration(seconds: float) -> str:
    """Format seconds as OpenAI's rate-limit headers do: "20ms", "1s", "6m0s", "1m30.5s".

    Rounded up to the millisecond, so a client that waits this long is never early.
    """
    ms = max(0, math.ceil(seconds * 1000 - 1e-6))
    if ms < 1000:
        return f"{ms}ms" if ms else "0s"
    hours, rest = divmod(ms, 3_600_000)
    minutes, rest = divmod(rest, 60_000)
    text = f"{rest / 1000:.3f}".rstrip("0").rstrip(".") + "s"
    text = f"{minutes}m{text}" if hours or minutes else text
    return f"{hours}h{text}" if hours else text


# --- Requests: prompt text, directives, validation ---------------------------------------


class _BadRequest(Exception):
    """The request cannot be served; answered 400."""

    def __init__(self, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.param = param


@dataclass(frozen=True, slots=True)
class _Script:
    status: int = 0
    fail: int = 0
    fail_status: int = 503
    drop: int = 0
    sleep: float = 0.0
    sleepers: int = 0  # how many arrivals sleep (0 = every one)


_MARK = "[[mock:"
_DIRECTIVE = re.compile(r"\[\[mock:(\w+)=([^\]]*)\]\]")


def _number(text: str, low: float, high: float, kind: type[int] | type[float] = int) -> Any:
    value = kind(text)
    if not low <= value <= high:
        raise ValueError(f"{text} is not between {low} and {high}")
    return value


def _parse_script(prompt: str) -> _Script:
    fields: dict[str, Any] = {}
    try:
        for name, value in _DIRECTIVE.findall(prompt):
            if name in ("status", "drop"):
                low, high = (400, 599) if name == "status" else (0, math.inf)
                fields[name] = _number(value, low, high)
            elif name == "sleep":
                seconds, _, count = value.partition(":")
                fields["sleep"] = _number(seconds, 0, math.inf, float)
                fields["sleepers"] = _number(count or "0", 0, math.inf)
            elif name == "fail":
                count, _, status = value.partition(":")
                fields["fail"] = _number(count, 0, math.inf)
                fields["fail_status"] = _number(status or "503", 400, 599)
            else:
                raise ValueError(f"unknown directive {name!r}")
    except ValueError as exc:
        raise _BadRequest(f"Bad mock directive in prompt: {exc}.") from exc
    return _Script(**fields)


def _inputs(value: Any, param: str) -> list[str]:
    """The texts of a string or a list (of strings or token arrays) prompt."""
    if isinstance(value, str):
        return [value]
    if isinstance(value, list) and value:
        if all(isinstance(item, int) for item in value):  # a single token array
            return [orjson.dumps(value).decode()]
        return [item if isinstance(item, str) else orjson.dumps(item).decode() for item in value]
    raise _BadRequest(f"Invalid value for '{param}': expected a string or an array.", param)


def _content_text(content: Any) -> str:
    if isinstance(content, list):  # parts: {"type": "text" | "input_text", "text": ...}
        parts = (part.get("text") for part in content if isinstance(part, dict))
        return "\n".join(text for text in parts if isinstance(text, str))
    return content if isinstance(content, str) else ""  # None: a turn with tool calls only


def _messages_text(value: Any, param: str) -> str:
    if isinstance(value, str) and param == "input":  # /v1/responses takes a plain string too
        return value
    if not isinstance(value, list) or not value or not all(isinstance(m, dict) for m in value):
        raise _BadRequest(f"Invalid value for '{param}': expected an array of messages.", param)
    return "\n".join(_content_text(message.get("content")) for message in value)


def _max_tokens(body: JSONObject) -> int | None:
    for key in ("max_completion_tokens", "max_tokens", "max_output_tokens"):
        value = body.get(key)
        if value is not None:
            if not isinstance(value, int) or isinstance(value, bool) or value < 0:
                raise _BadRequest(f"Invalid '{key}': expected a non-negative integer.", key)
            return value
    return None


def _tokens(text: str) -> int:
    return max(1, (len(text) + 3) // 4)


@dataclass(frozen=True, slots=True)
class _Call:
    body: JSONObject
    model: str
    prompt: str
    max_tokens: int | None
    script: _Script | None
    answer: str | None = None  # the text to answer with, when the request asks for JSON

    @property
    def budget(self) -> int:
        """Tokens charged to TPM, estimated before answering as OpenAI does."""
        return _tokens(self.prompt) + (16 if self.max_tokens is None else self.max_tokens)


# --- Replies: (body, prompt tokens, completion tokens) -----------------------------------

_Reply = tuple[JSONObject, int, int]


def _completion(call: _Call) -> tuple[str, int, str]:
    """The reply text, its tokens and finish reason, cut short by max tokens."""
    text = "Echo: " + call.prompt[:100] if call.answer is None else call.answer
    if call.max_tokens is not None and call.max_tokens < _tokens(text):
        return text[: call.max_tokens * 4], call.max_tokens, "length"
    return text, _tokens(text), "stop"


def _envelope(id_: str, kind: str, call: _Call, choice: JSONObject, done: int) -> _Reply:
    used = _tokens(call.prompt)
    usage = {"prompt_tokens": used, "completion_tokens": done, "total_tokens": used + done}
    body = {"id": id_, "object": kind, "created": int(time.time()), "model": call.model}
    return {**body, "choices": [choice], "usage": usage}, used, done


def _chat_reply(call: _Call, rid: str) -> _Reply:
    text, done, finish = _completion(call)
    message = {"role": "assistant", "content": text, "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": finish}
    return _envelope(f"chatcmpl-{rid}", "chat.completion", call, choice, done)


def _text_reply(call: _Call, rid: str) -> _Reply:
    text, done, finish = _completion(call)
    choice = {"text": text, "index": 0, "logprobs": None, "finish_reason": finish}
    return _envelope(f"cmpl-{rid}", "text_completion", call, choice, done)


def _embedding(text: str) -> list[float]:
    digest = hashlib.blake2b(text.encode(), digest_size=16).digest()
    return [round(n / 32767.5 - 1.0, 6) for n in struct.unpack("<8H", digest)]


def _embeddings_reply(call: _Call, rid: str) -> _Reply:
    texts = _inputs(call.body["input"], "input")
    data = [
        {"object": "embedding", "index": i, "embedding": _embedding(t)} for i, t in enumerate(texts)
    ]
    used = _tokens(call.prompt)
    usage = {"prompt_tokens": used, "total_tokens": used}
    return {"object": "list", "data": data, "model": call.model, "usage": usage}, used, 0


def _responses_reply(call: _Call, rid: str) -> _Reply:
    text, done, finish = _completion(call)
    content = [{"type": "output_text", "text": text, "annotations": []}]
    message = {"type": "message", "id": f"msg_{rid}", "status": "completed", "role": "assistant"}
    cut = finish == "length"
    used = _tokens(call.prompt)
    return (
        {
            "id": f"resp_{rid}",
            "object": "response",
            "created_at": int(time.time()),
            "model": call.model,
            "status": "incomplete" if cut else "completed",
            "incomplete_details": {"reason": "max_output_tokens"} if cut else None,
            "output": [{**message, "content": content}],
            "usage": {"input_tokens": used, "output_tokens": done, "total_tokens": used + done},
        },
        used,
        done,
    )


@dataclass(frozen=True, slots=True)
class _Endpoint:
    param: str  # the body field that holds the prompt
    prompt: Callable[[Any, str], str]
    reply: Callable[[_Call, str], _Reply]
    renamed: Mapping[str, str] = field(default_factory=dict)  # refused, as OpenAI refuses them
    generates: bool = True  # embeddings do not: their prompt alone must fit the context

    def parse(self, raw: bytes) -> _Call:
        try:
            body = orjson.loads(raw)
        except orjson.JSONDecodeError as exc:
            raise _BadRequest("We could not parse the JSON body of your request.") from exc
        if not isinstance(body, dict):
            raise _BadRequest("The request body must be a JSON object.")
        model = body.get("model")
        if not isinstance(model, str) or not model:
            raise _BadRequest("Missing required parameter: 'model'.", "model")
        if body.get(self.param) is None:
            raise _BadRequest(f"Missing required parameter: '{self.param}'.", self.param)
        for name, new_name in self.renamed.items():
            if name in body:
                message = f"Unsupported parameter: '{name}'. This endpoint calls it '{new_name}'."
                raise _BadRequest(message, name)
        prompt = self.prompt(body[self.param], self.param)
        script = _parse_script(prompt) if _MARK in prompt else None
        return _Call(body, model, prompt, _max_tokens(body), script)


def _joined(value: Any, param: str) -> str:
    return "\n".join(_inputs(value, param))


_ENDPOINTS = {
    "/v1/chat/completions": _Endpoint("messages", _messages_text, _chat_reply),
    "/v1/completions": _Endpoint("prompt", _joined, _text_reply),
    "/v1/embeddings": _Endpoint("input", _joined, _embeddings_reply, generates=False),
    "/v1/responses": _Endpoint(
        "input", _messages_text, _responses_reply, {"max_tokens": "max_output_tokens"}
    ),
}
_MODEL_IDS = ("gpt-4o-mini", "gpt-4o", "text-embedding-3-small", "mock")


def _models_body(options: MockOptions) -> bytes:
    """/v1/models: with a context length, each model reports it as vLLM does."""
    extra = {"max_model_len": options.max_model_len} if options.max_model_len else {}
    data = [
        {"id": m, "object": "model", "owned_by": "batchq", **extra}
        for m in options.models or _MODEL_IDS
    ]
    return orjson.dumps({"object": "list", "data": data})


def _context_error(call: _Call, endpoint: _Endpoint, max_model_len: int) -> bytes | None:
    """vLLM's 400 for a request past the context: prompt + max_tokens, or the prompt alone
    when no max_tokens is set (vLLM then generates up to the context's end)."""
    used = _tokens(call.prompt)
    cap = call.max_tokens if endpoint.generates else 0
    if cap is None and used >= max_model_len:
        message = (
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {used} tokens in the messages, Please reduce the length of the messages."
        )
    elif cap is not None and used + cap > max_model_len:
        message = (
            f"This model's maximum context length is {max_model_len} tokens. However, you "
            f"requested {used + cap} tokens ({used} in the messages, {cap} in the completion). "
            "Please reduce the length of the messages or completion."
        )
    else:
        return None
    return _error_body(message, "BadRequestError")


def _tokenize_reply(raw: bytes, max_model_len: int) -> bytes:
    """vLLM's /tokenize: the tokens of a prompt or of chat messages, counted exactly as the
    completion's usage.prompt_tokens counts them (four characters a token)."""
    try:
        body = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _BadRequest("We could not parse the JSON body of your request.") from exc
    if not isinstance(body, dict) or ("messages" in body) == ("prompt" in body):
        raise _BadRequest("Expected a JSON object with either 'prompt' or 'messages'.")
    if "messages" in body:
        text = _messages_text(body["messages"], "messages")
    else:
        text = _joined(body["prompt"], "prompt")
    count = _tokens(text)
    # A token id per four characters (its first one's code point): the same text, the same
    # tokens; cheap, as a benchmark of clients asks thousands a second.
    tokens = [ord(c) for c in text[::4]] or [0]
    answer: JSONObject = {"count": count, "tokens": tokens, "token_strs": None}
    if max_model_len:
        answer["max_model_len"] = max_model_len
    return orjson.dumps(answer)


# --- Error bodies ------------------------------------------------------------------------


def _error_body(
    message: str, kind: str, param: str | None = None, code: str | None = None
) -> bytes:
    return orjson.dumps({"error": {"message": message, "type": kind, "param": param, "code": code}})


_SCRIPTED = "(scripted by the mock endpoint)"
_KNOWN_ERRORS: dict[int, tuple[str, str, str | None]] = {  # (message, type, code) as OpenAI's
    401: ("Incorrect API key provided.", "invalid_request_error", "invalid_api_key"),
    403: (
        "Country, region, or territory not supported",
        "request_forbidden",
        "unsupported_country_region_territory",
    ),
    429: (f"Rate limit reached {_SCRIPTED}.", "requests", "rate_limit_exceeded"),
    500: (
        "The server had an error while processing your request. Sorry about that!",
        "server_error",
        None,
    ),
    503: ("The engine is currently overloaded, please try again later.", "server_error", None),
}
_SCRIPTED_429_HEADERS = {"retry-after": "1", "retry-after-ms": "100"}
_QUOTA = "You exceeded your current quota, please check your plan and billing details."
_QUOTA_BODY = _error_body(_QUOTA, "insufficient_quota", code="insufficient_quota")


@functools.cache
def _status_body(status: int) -> bytes:
    kind = "server_error" if status >= 500 else "invalid_request_error"
    message, kind, code = _KNOWN_ERRORS.get(status, (f"Error {status} {_SCRIPTED}.", kind, None))
    return _error_body(message, kind, code=code)


# --- Rate limits -------------------------------------------------------------------------


class _Window:
    """Amounts accepted during the last `period` seconds, with their running sum."""

    __slots__ = ("_events", "limit", "period", "used")

    def __init__(self, limit: int, period: float) -> None:
        self.limit, self.period, self.used = limit, period, 0
        self._events: deque[tuple[float, int]] = deque()

    def expire(self, now: float) -> None:
        while self._events and self._events[0][0] <= now - self.period:
            self.used -= self._events.popleft()[1]

    def wait(self, amount: int, now: float) -> float:
        """Seconds until `amount` fits (0: now); walks the deque only when it does not fit."""
        # An empty window takes anything, or a request bigger than the 1-second share of
        # the TPM could never pass; the minute window turns away truly oversized ones first.
        left = self.used
        if left == 0 or left + amount <= self.limit:
            return 0.0
        for stamp, size in self._events:
            left -= size
            if left == 0 or left + amount <= self.limit:
                return stamp + self.period - now
        raise AssertionError("unreachable: an emptied window takes anything")

    def add(self, amount: int, now: float) -> None:
        self._events.append((now, amount))
        self.used += amount


class _Limit:
    """One budget (requests or tokens) per minute, smoothed over 1-second windows."""

    __slots__ = ("limit", "minute", "name", "second", "unit")

    def __init__(self, limit: int, unit: str, name: str) -> None:
        self.limit, self.unit, self.name = limit, unit, name
        self.minute = _Window(limit, 60.0)
        self.second = _Window(math.ceil(limit / 60 * 1.2), 1.0)

    def wait(self, amount: int, now: float) -> float:
        self.minute.expire(now)
        self.second.expire(now)
        return max(self.minute.wait(amount, now), self.second.wait(amount, now))

    def add(self, amount: int, now: float) -> None:
        self.minute.add(amount, now)
        self.second.add(amount, now)

    def headers(self, now: float) -> dict[str, str]:
        # reset: the time until this budget takes one more unit (0s: it does now), which
        # is the wait a client needs; OpenAI's own value may be larger, never smaller.
        return {
            f"x-ratelimit-limit-{self.unit}": str(self.limit),
            f"x-ratelimit-remaining-{self.unit}": str(max(0, self.limit - self.minute.used)),
            f"x-ratelimit-reset-{self.unit}": format_duration(self.wait(1, now)),
        }


class _RateLimiter:
    """Server-side RPM and TPM, rejecting as OpenAI does."""

    def __init__(self, rpm: int, tpm: int) -> None:
        self.requests = _Limit(rpm, "requests", "requests per min (RPM)") if rpm else None
        self.tokens = _Limit(tpm, "tokens", "tokens per min (TPM)") if tpm else None

    def admit(self, call: _Call, now: float) -> tuple[bytes, float | None] | None:
        """Charge the call, or return a 429 body and the seconds to wait (None: forever)."""
        tokens, org = call.budget, f"{call.model} in organization org-batchq-mock"
        if self.tokens is not None and tokens > self.tokens.limit:
            message = (
                f"Request too large for {org} on {self.tokens.name}: Limit {self.tokens.limit}, "
                f"Requested {tokens}. The input or output tokens must be reduced in order to "
                "run successfully."
            )
            return _error_body(message, "tokens", code="rate_limit_exceeded"), None
        charges = [(lim, n) for lim, n in ((self.requests, 1), (self.tokens, tokens)) if lim]
        for limit, amount in charges:
            if (wait := limit.wait(amount, now)) > 0:
                message = (
                    f"Rate limit reached for {org} on {limit.name}: Limit {limit.limit}, Used "
                    f"{limit.minute.used}, Requested {amount}. Please try again in "
                    f"{format_duration(wait)}. Visit https://platform.openai.com/account/rate-limits"
                    " to learn more."
                )
                return _error_body(message, limit.unit, code="rate_limit_exceeded"), wait
        for limit, amount in charges:
            limit.add(amount, now)
        return None

    def headers(self, now: float) -> dict[str, str]:
        limits = [limit for limit in (self.requests, self.tokens) if limit is not None]
        return {key: value for limit in limits for key, value in limit.headers(now).items()}


# --- Statistics --------------------------------------------------------------------------


class _Reservoir:
    """A uniform sample of at most `size` values of a stream (Vitter's algorithm R).

    A whole run's median in constant memory; the last N values would tell only its end.
    """

    __slots__ = ("_random", "count", "size", "values")

    def __init__(self, size: int = 1024) -> None:
        self.size, self.count, self.values = size, 0, list[float]()
        self._random = random.Random().random  # its own, so the seeded faults stay as seeded

    def add(self, value: float) -> None:
        self.count += 1
        if self.count <= self.size:
            self.values.append(value)
        elif (slot := int(self._random() * self.count)) < self.size:
            self.values[slot] = value

    def median(self) -> float | None:
        return statistics.median(self.values) if self.values else None


@dataclass(slots=True)
class _Stats:
    """Counters since start or reset; `prompts` and `arrivals` are kept only when recording.

    `in_flight` counts the completion requests inside the server now, queued or served;
    a reset carries it over, as those requests are still there.
    """

    record: bool
    in_flight: int = 0
    max_in_flight: int = 0
    max_serving: int = 0  # with slots; without, every request in the server is served
    latency: _Reservoir = field(default_factory=_Reservoir)  # arrival to answer, 200s only
    queue_wait: _Reservoir = field(default_factory=_Reservoir)  # arrival to a slot, 200s
    requests: int = 0
    dropped: int = 0
    rate_limited: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0
    accepted_tokens: int = 0  # the TPM charge of the 200 answers (`_Call.budget`)
    structured: int = 0  # 200 answers to requests that asked for JSON (structured.py)
    invalid_answers: int = 0  # of those, answered with JSON that does not parse or fit
    gauge_reads: int = 0  # GET /metrics, not counted in requests
    first_at: float | None = None
    last_at: float | None = None
    by_status: Counter[int] = field(default_factory=Counter)
    by_path: Counter[str] = field(default_factory=Counter)
    prompts: Counter[str] = field(default_factory=Counter)
    arrivals: list[tuple[float, str]] = field(default_factory=list)
    waits: list[tuple[float, float]] = field(default_factory=list)  # 429s: when, for how long
    accepted: list[tuple[float, int]] = field(default_factory=list)  # 200s: arrival, charge

    def arrive(self, path: str, prompt: str | None) -> float:
        """Count an arrival; return its time (``time.time()``, as every time in the stats)."""
        self.last_at = now = time.time()
        self.first_at = self.first_at or now
        self.requests += 1
        self.by_path[path] += 1
        if self.record and prompt is not None:
            self.prompts[prompt] += 1
            self.arrivals.append((now, prompt))
        return now

    def accept(self, arrived: float, tokens: int) -> None:
        """A request that arrived at ``arrived`` is answered 200, charged ``tokens`` to TPM."""
        self.accepted_tokens += tokens
        if self.record:
            self.accepted.append((arrived, tokens))

    def enter(self) -> None:
        self.in_flight += 1
        if self.in_flight > self.max_in_flight:
            self.max_in_flight = self.in_flight

    def snapshot(self, slots: int) -> JSONObject:
        out: JSONObject = {
            "in_flight": self.in_flight,
            "max_in_flight": self.max_in_flight,
            "max_serving": self.max_serving if slots else self.max_in_flight,
            "latency_p50": self.latency.median(),
            "queue_wait_p50": self.queue_wait.median() if slots else 0.0,
            "requests": self.requests,
            "by_status": {str(status): n for status, n in sorted(self.by_status.items())},
            "by_path": dict(self.by_path),
            "dropped": self.dropped,
            "rate_limited": self.rate_limited,
            "prompt_tokens": self.prompt_tokens,
            "completion_tokens": self.completion_tokens,
            "accepted_tokens": self.accepted_tokens,
            "structured": self.structured,
            "invalid_answers": self.invalid_answers,
            "gauge_reads": self.gauge_reads,
            "first_at": self.first_at,
            "last_at": self.last_at,
        }
        if self.record:
            out["prompts"] = dict(self.prompts)
            out["arrivals"] = [[at, prompt] for at, prompt in self.arrivals]
            out["waits"] = [[at, seconds] for at, seconds in self.waits]
            out["accepted"] = [[at, tokens] for at, tokens in self.accepted]
        return out


# --- The application ---------------------------------------------------------------------

_JSON = "application/json"
_SLOW_CHUNKS = 4


class _Mock:
    """The endpoint's state and handlers; one per application."""

    def __init__(self, options: MockOptions) -> None:
        self.options = options
        self.stats = _Stats(options.record)
        self._rng = random.Random(options.seed)
        self._lognormal = options.lognormal
        self._ids = itertools.count(1)
        self._auth = None if options.api_key is None else f"Bearer {options.api_key}"
        self._limiter = (
            _RateLimiter(options.rpm, options.tpm) if options.rpm or options.tpm else None
        )
        self._scripted: dict[str, int] = {}  # arrivals of each prompt that holds a directive
        # Bound to the event loop on first use, so the app can be built outside one.
        self._slots = asyncio.Semaphore(options.slots) if options.slots else None
        self._serving = 0  # slots busy now
        self._waiting = 0  # requests waiting for a slot
        self._slowdown = options.slot_load_factor / options.slots if options.slots else 0.0
        self.batches: BatchAPI | None = None  # the Files + Batches routes, once added
        self._models = _models_body(options)

    def reset(self) -> None:
        in_flight = self.stats.in_flight
        self.stats = _Stats(
            self.options.record,
            in_flight=in_flight,
            max_in_flight=in_flight,
            max_serving=self._serving,
        )
        self._scripted.clear()
        if self._limiter is not None:
            self._limiter = _RateLimiter(self.options.rpm, self.options.tpm)
        if self.batches is not None:
            self.batches.reset()

    def snapshot(self) -> JSONObject:
        out = self.stats.snapshot(self.options.slots)
        if self.batches is not None:
            out["batches"] = self.batches.snapshot()
        return out

    def _request_id(self) -> str:
        return f"{next(self._ids):024x}"

    def _authorized(self, request: web.Request) -> bool:
        return self._auth is None or request.headers.get("Authorization") == self._auth

    async def handle(self, request: web.Request, endpoint: _Endpoint) -> web.StreamResponse:
        arrived = time.monotonic()
        self.stats.enter()
        try:
            return await self._answer(request, endpoint, arrived)
        finally:
            self.stats.in_flight -= 1  # a reset carries the count over, so this is the one

    async def _answer(
        self, request: web.Request, endpoint: _Endpoint, arrived: float
    ) -> web.StreamResponse:
        rid = self._request_id()
        headers = {"x-request-id": f"req_{rid}"}
        call: _Call | _BadRequest
        try:
            call = endpoint.parse(await request.read())
        except _BadRequest as exc:
            call = exc
        at = self.stats.arrive(request.path, call.prompt if isinstance(call, _Call) else "")
        status, body, sleep = self._decide(request, endpoint, call, rid, headers)
        if status == 200 and isinstance(call, _Call):
            self.stats.accept(at, call.budget)
            if self.batches is not None:  # a line billed live and by a batch is billed twice
                self.batches.live_answered(request.path, call.body)
        if self._limiter is not None and self.options.rate_limit_headers:
            headers.update(self._limiter.headers(time.monotonic()))  # OpenAI: on every answer
        delay = self._delay(sleep)
        if self._slots is not None:
            queued = await self._serve(self._slots, delay)
            delay = 0.0  # served
            if status == 200:
                self.stats.queue_wait.add(queued)
        response = await self._send(request, status, body, headers, delay)
        if status == 200:
            self.stats.latency.add(time.monotonic() - arrived)
        return response

    def _delay(self, sleep: float) -> float:
        """The time this answer takes to compute: fixed, scripted, jitter and lognormal."""
        opts = self.options
        delay = opts.latency + sleep
        if opts.latency_jitter:
            delay += self._rng.uniform(0.0, opts.latency_jitter)
        if self._lognormal is not None:
            delay += self._rng.lognormvariate(*self._lognormal)
        return delay

    async def _serve(self, slots: asyncio.Semaphore, delay: float) -> float:
        """Wait for a free slot, hold it while computing; return the seconds queued."""
        queued = time.monotonic()
        self._waiting += 1
        try:
            await slots.acquire()  # FIFO: waiters are woken in arrival order
        finally:
            self._waiting -= 1
        started = time.monotonic()
        self._serving += 1
        self.stats.max_serving = max(self.stats.max_serving, self._serving)
        try:
            # A batching GPU: each request in the batch slows the others a little,
            # yet K together still finish more per second than one alone.
            if delay > 0:
                await asyncio.sleep(delay * (1.0 + self._slowdown * (self._serving - 1)))
        finally:
            self._serving -= 1
            slots.release()
        return started - queued

    def _decide(
        self,
        request: web.Request,
        endpoint: _Endpoint,
        call: _Call | _BadRequest,
        rid: str,
        headers: dict[str, str],
    ) -> tuple[int, bytes | None, float]:
        """Choose the answer: status, body (None: close the connection) and extra delay."""
        if not self._authorized(request):
            return 401, _status_body(401), 0.0  # the body never echoes the key received
        if self.options.insufficient_quota:
            return 429, _QUOTA_BODY, 0.0
        if isinstance(call, _BadRequest):
            return 400, _error_body(str(call), "invalid_request_error", call.param), 0.0
        if self.options.models and call.model not in self.options.models:
            message = f"The model `{call.model}` does not exist."
            return 404, _error_body(message, "NotFoundError", "model", "model_not_found"), 0.0
        if self.options.max_model_len and (
            too_long := _context_error(call, endpoint, self.options.max_model_len)
        ):
            return 400, too_long, 0.0
        script = call.script or _Script()
        sleep = script.sleep
        if call.script is not None:
            arrival = self._scripted[call.prompt] = self._scripted.get(call.prompt, 0) + 1
            if script.sleepers and arrival > script.sleepers:
                sleep = 0.0
            if arrival <= script.drop:
                return 0, None, sleep
            status = script.status or (script.fail_status if arrival <= script.fail else 0)
            if status:
                if status == 429:
                    headers.update(_SCRIPTED_429_HEADERS)
                    if self.stats.record:
                        told = int(_SCRIPTED_429_HEADERS["retry-after-ms"]) / 1000
                        self.stats.waits.append((time.time(), told))
                return status, _status_body(status), sleep
        if self._limiter is not None and (rejected := self._limiter.admit(call, time.monotonic())):
            body, wait = rejected
            self.stats.rate_limited += 1
            if wait is not None:  # a request too large for the TPM gets no hint: never retry
                headers["retry-after"] = str(max(1, math.ceil(wait)))
                headers["retry-after-ms"] = str(max(1, math.ceil(wait * 1000)))
                if self.stats.record:
                    self.stats.waits.append((time.time(), math.ceil(wait * 1000) / 1000))
            return 429, body, sleep
        if fault := self._random_fault():
            return fault, None if fault < 0 else _status_body(fault), sleep
        if (schema := requested_schema(call.body)) is not None:
            call = self._structured(call, schema)
        reply, used, done = endpoint.reply(call, rid)
        self.stats.prompt_tokens += used
        self.stats.completion_tokens += done
        return 200, orjson.dumps(reply), sleep

    def _structured(self, call: _Call, schema: JSONObject) -> _Call:
        """``call`` to be answered with JSON: fitting its schema, or not at the set rate."""
        self.stats.structured += 1
        rate = self.options.invalid_json_rate
        if rate and self._rng.random() < rate:
            self.stats.invalid_answers += 1
            return replace(call, answer=unfitting(schema, self._rng.random()))
        return replace(call, answer=orjson.dumps(fitting(schema, call.prompt)).decode())

    def _random_fault(self) -> int:
        """-1 to drop, 500 or 503 for a random fault, else 0; one draw picks among them."""
        opts = self.options
        if not (opts.drop_rate or opts.rate_500 or opts.rate_503):
            return 0
        draw = self._rng.random()
        if draw < opts.drop_rate:
            return -1
        if draw < opts.drop_rate + opts.rate_500:
            return 500
        return 503 if draw < opts.drop_rate + opts.rate_500 + opts.rate_503 else 0

    async def _send(
        self,
        request: web.Request,
        status: int,
        body: bytes | None,
        headers: dict[str, str],
        delay: float,
    ) -> web.StreamResponse:
        opts = self.options
        if delay > 0:
            await asyncio.sleep(delay)
        if body is None:
            self.stats.dropped += 1
            if request.transport is not None:
                request.transport.close()
            # aiohttp quietly fails to write this to the closed transport, so the client
            # sees the connection closed with no answer (ServerDisconnectedError).
            return web.Response()
        self.stats.by_status[status] += 1
        if not opts.slow_body:
            return web.Response(body=body, status=status, headers=headers, content_type=_JSON)
        response = web.StreamResponse(status=status, headers=headers)
        response.content_type, response.content_length = _JSON, len(body)
        await response.prepare(request)
        step = -(-len(body) // _SLOW_CHUNKS)
        for start in range(0, len(body), step):
            await asyncio.sleep(opts.slow_body / _SLOW_CHUNKS)
            await response.write(body[start : start + step])
        await response.write_eof()
        return response

    async def models(self, request: web.Request) -> web.StreamResponse:
        self.stats.arrive(request.path, None)
        headers = {"x-request-id": f"req_{self._request_id()}"}
        if not self._authorized(request):
            return await self._send(request, 401, _status_body(401), headers, self._delay(0.0))
        return await self._send(request, 200, self._models, headers, self._delay(0.0))

    async def tokenize(self, request: web.Request) -> web.StreamResponse:
        self.stats.arrive(request.path, None)
        headers = {"x-request-id": f"req_{self._request_id()}"}
        if not self._authorized(request):
            return await self._send(request, 401, _status_body(401), headers, 0.0)
        try:
            body = _tokenize_reply(await request.read(), self.options.max_model_len)
        except _BadRequest as exc:
            error = _error_body(str(exc), "invalid_request_error", exc.param)
            return await self._send(request, 400, error, headers, 0.0)
        return await self._send(request, 200, body, headers, 0.0)

    async def not_found(self, request: web.Request) -> web.StreamResponse:
        self.stats.arrive(request.path, None)
        headers = {"x-request-id": f"req_{self._request_id()}"}
        message = f"Invalid URL ({request.method} {request.path})"
        body = _error_body(message, "invalid_request_error")
        return await self._send(request, 404, body, headers, self._delay(0.0))

    async def metrics(self, request: web.Request) -> web.StreamResponse:
        """The load, as vLLM or llama.cpp publish it; not counted as a request."""
        self.stats.gauge_reads += 1
        names = _GAUGES[self.options.gauges]
        if names is None:
            return web.Response(status=404, text="404: Not Found")
        if not self._authorized(request):
            return web.Response(status=401, text="Unauthorized")
        running, waiting = self.stats.in_flight, 0
        if self._slots:
            # As a scheduler's step counts them: a slot just freed has its next request, though
            # that request's task has not run yet (a batch finishing together once read as a
            # third of it running and the rest waiting, which a client then shrank to).
            held = self._serving + self._waiting
            running, waiting = min(held, self.options.slots), max(0, held - self.options.slots)
        lines = [
            "# HELP batchq_mock_requests_total Requests since the start.",
            "# TYPE batchq_mock_requests_total counter",
            f"batchq_mock_requests_total {self.stats.requests}",
            f"{names[0]} {float(running)}",
            f"{names[1]} {float(waiting)}",
        ]
        return web.Response(text="\n".join(lines) + "\n", content_type="text/plain")

    async def stats_view(self, request: web.Request) -> web.StreamResponse:
        return web.Response(body=orjson.dumps(self.snapshot()), content_type=_JSON)

    async def reset_view(self, request: web.Request) -> web.StreamResponse:
        self.reset()
        return web.Response(body=b'{"reset": true}', content_type=_JSON)

    def set_limits(self, rpm: int, tpm: int) -> None:
        """Enforce new limits from now on, as a shared account's would change."""
        self.options = replace(self.options, rpm=rpm, tpm=tpm)
        self._limiter = _RateLimiter(rpm, tpm) if rpm or tpm else None

    async def limits_view(self, request: web.Request) -> web.StreamResponse:
        try:
            wanted = orjson.loads(await request.read())
            self.set_limits(int(wanted.get("rpm", 0)), int(wanted.get("tpm", 0)))
        except (orjson.JSONDecodeError, AttributeError, TypeError, ValueError):
            body = _error_body('expected {"rpm": N, "tpm": N}', "invalid_request_error")
            return web.Response(status=400, body=body, content_type=_JSON)
        limits = {"rpm": self.options.rpm, "tpm": self.options.tpm}
        return web.Response(body=orjson.dumps(limits), content_type=_JSON)


_STATE = web.AppKey("batchq_mock", _Mock)
_Handler = Callable[[web.Request], Awaitable[web.StreamResponse]]


def _route(mock: _Mock, endpoint: _Endpoint) -> _Handler:
    async def handler(request: web.Request) -> web.StreamResponse:
        return await mock.handle(request, endpoint)

    return handler


def build_app(options: MockOptions) -> web.Application:
    """Build the endpoint as an aiohttp application (`MockServer` runs one)."""
    from batchq.mockserver.batches import BatchAPI  # it imports this module's replies

    mock = _Mock(options)
    app = web.Application(client_max_size=64 * 1024 * 1024)  # prompts can be long
    app[_STATE] = mock
    for prefix in ("", "/compatible-mode"):  # OpenAI's paths, and DashScope's
        for path, endpoint in _ENDPOINTS.items():
            app.router.add_post(prefix + path, _route(mock, endpoint))
        app.router.add_get(prefix + "/v1/models", mock.models)
    app.router.add_post("/tokenize", mock.tokenize)  # vLLM's, beside /v1 as vLLM serves it
    mock.batches = BatchAPI(mock)
    mock.batches.add_routes(app.router)
    app.router.add_get("/metrics", mock.metrics)
    app.router.add_get("/_mock/stats", mock.stats_view)
    app.router.add_post("/_mock/reset", mock.reset_view)
    app.router.add_post("/_mock/limits", mock.limits_view)
    # Added last, so it only gets what nothing else matched, a wrong method included.
    app.router.add_route("*", "/{tail:.*}", mock.not_found)
    return app


class MockServer:
    """Async context manager running the endpoint on host:port (port 0 = a free port).

    Args:
        options: the faults and limits to apply; by default every request succeeds at once.
        host: the address to listen on.
        port: the port to listen on; 0 picks a free one, which `url` then shows.
    """

    def __init__(
        self, options: MockOptions | None = None, *, host: str = "127.0.0.1", port: int = 0
    ) -> None:
        self.options = options if options is not None else MockOptions()
        self._host, self._port = host, port
        self._app = build_app(self.options)
        self._runner: web.AppRunner | None = None
        self._url: str | None = None

    @property
    def url(self) -> str:
        """The base URL including /v1, e.g. "http://127.0.0.1:41234/v1"; set once started."""
        if self._url is None:
            raise RuntimeError("the mock server is not running; call start() first")
        return self._url

    async def start(self) -> None:
        """Start listening; raises OSError if the port is taken."""
        if self._runner is not None:
            raise RuntimeError("the mock server is already running")
        # handler_cancellation stops handlers whose client gave up (timeout tests), so
        # closing does not wait for them; shutdown_timeout bounds the wait for the rest.
        runner = web.AppRunner(
            self._app, access_log=None, handler_cancellation=True, shutdown_timeout=0.5
        )
        await runner.setup()
        try:
            await web.TCPSite(runner, self._host, self._port).start()
        except BaseException:
            await runner.cleanup()
            raise
        self._runner = runner
        host, port = runner.addresses[0][:2]
        self._url = f"http://{f'[{host}]' if ':' in host else host}:{port}/v1"

    async def aclose(self) -> None:
        """Stop listening and close open connections; does nothing if not running."""
        runner, self._runner, self._url = self._runner, None, None
        if runner is not None:
            await runner.cleanup()

    async def __aenter__(self) -> MockServer:
        await self.start()
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        await self.aclose()

    def stats(self) -> dict[str, Any]:
        """The counters since start or the last reset, as GET /_mock/stats returns them."""
        return self._app[_STATE].snapshot()

    def reset(self) -> None:
        """Zero all counters, directive arrival counts and rate-limit windows."""
        self._app[_STATE].reset()


async def serve_forever(
    options: MockOptions, *, host: str, port: int, ready: Callable[[str], None]
) -> None:
    """Run the endpoint until cancelled, calling `ready(url)` once it listens."""
    async with MockServer(options, host=host, port=port) as server:
        ready(server.url)
        await asyncio.Event().wait()
