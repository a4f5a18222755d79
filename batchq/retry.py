"""When to try a request again, and how long to wait first.

Plain functions and one frozen policy, no I/O: the worker loop in
``runner`` asks ``decide`` after every failure and does what it says.

- 5xx, 408, 409, timeouts and dropped connections: exponential backoff with
  full jitter, ``random() * min(max_delay, base_delay * 2 ** (attempt - 1))``,
  up to ``max_attempts`` attempts in all; a longer ``Retry-After`` the
  endpoint sent lengthens the wait.
- 429: wait what the endpoint asks (``Retry-After``, ``retry-after-ms``,
  ``x-ratelimit-reset-*``), pausing the whole pool. 429s have their own,
  much larger bound, ``max_rate_limited``: being told to slow down is not a
  sign that the request is broken.
- Other 4xx: never retried. 401, 403 and ``insufficient_quota`` are fatal
  for the whole job. ``x-should-retry: false`` is obeyed.

All times are float seconds.
"""

from __future__ import annotations

import email.utils
import math
import random
import re
import time
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any

import orjson

from batchq.errors import (
    EndpointUnreachable,
    HTTPStatusError,
    RateLimited,
    RequestError,
    RequestRejected,
    ServerError,
)

#: 4xx statuses that are worth sending again (the OpenAI SDKs retry these too).
RETRYABLE_4XX = frozenset({408, 409})
FATAL_CODES = frozenset({"insufficient_quota"})


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently a request is retried."""

    max_attempts: int = 8
    max_rate_limited: int = 1000
    base_delay: float = 0.5
    max_delay: float = 60.0

    def backoff(self, attempt: int, rng: Callable[[], float] = random.random) -> float:
        """The wait before attempt ``attempt + 1``: full jitter over an exponential ceiling."""
        return rng() * min(self.max_delay, self.base_delay * 2.0 ** min(attempt - 1, 64))


@dataclass(frozen=True, slots=True)
class Retry:
    """Send again after ``delay`` seconds; ``pause_all`` stops the whole pool that long."""

    delay: float
    pause_all: bool = False


@dataclass(frozen=True, slots=True)
class GiveUp:
    """Write the error line; ``retryable`` tells ``--retry-failed`` it may try later."""

    retryable: bool


@dataclass(frozen=True, slots=True)
class Fatal:
    """Stop the job: no request can succeed until the user fixes ``reason``."""

    reason: str


Decision = Retry | GiveUp | Fatal


def decide(exc: RequestError, attempts: int, rate_limited: int, policy: RetryPolicy) -> Decision:
    """What to do after ``exc`` ended attempt ``attempts`` (``rate_limited`` of them 429s)."""
    fatal = fatal_reason(exc)
    if fatal:
        return Fatal(fatal)
    headers = exc.headers if isinstance(exc, HTTPStatusError) else {}
    if headers.get("x-should-retry", "").lower() == "false":
        return GiveUp(retryable=exc.retryable)
    if isinstance(exc, RateLimited):
        if _too_large(exc) or rate_limited >= policy.max_rate_limited:
            return GiveUp(retryable=not _too_large(exc))
        wait = retry_after(headers)
        return Retry(policy.backoff(rate_limited) if wait is None else wait, pause_all=True)
    if isinstance(exc, RequestRejected) and exc.status not in RETRYABLE_4XX:
        return GiveUp(retryable=False)
    if attempts - rate_limited >= policy.max_attempts:
        if isinstance(exc, EndpointUnreachable):
            return Fatal(
                f"the endpoint cannot be reached ({exc}); check --base-url and the network"
            )
        return GiveUp(retryable=True)
    # An overloaded server gets ever longer waits: a Retry-After may lengthen the
    # backoff, never shorten it, and the x-ratelimit-reset-* headers that ride on
    # every answer are about the rate limit, not about this failure.
    backoff = policy.backoff(attempts - rate_limited)
    wait = retry_after(headers, resets=False)
    return Retry(backoff if wait is None else max(backoff, wait))


def fatal_reason(exc: RequestError) -> str | None:
    """Why no request of the job can succeed now, or None."""
    if not isinstance(exc, HTTPStatusError):
        return None
    if exc.status == 401:
        return "the endpoint refused the API key (401); set the right key and run again"
    if exc.status == 403:
        return "the endpoint forbids this (403): check the key's permissions, model and region"
    if exc.error_code in FATAL_CODES:
        return "the account has no quota left (insufficient_quota); add credit and run again"
    return None


def _too_large(exc: HTTPStatusError) -> bool:
    return "too large" in str(exc).lower()


def status_error(
    status: int, body: bytes, headers: Mapping[str, str], request_id: str | None
) -> HTTPStatusError:
    """The exception for a non-2xx answer, carrying its parsed body."""
    parsed: Any
    try:
        parsed = orjson.loads(body)
    except orjson.JSONDecodeError:
        parsed = body.decode("utf-8", "replace")[:2000]
    kind: type[HTTPStatusError]
    if status == 429:
        kind = RateLimited
    elif status >= 500:
        kind = ServerError
    else:
        kind = RequestRejected
    lowered = {name.lower(): value for name, value in headers.items()}
    return kind(status, parsed, request_id=request_id, headers=lowered)


_DURATION_PART = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def parse_duration(text: str) -> float | None:
    """Seconds in OpenAI's reset format (``"1s"``, ``"6m0s"``, ``"20ms"``, ``"1m30.5s"``), or None.

    ``ms`` is tried before ``m``: ``20ms`` is twenty milliseconds, not minutes.
    """
    text = text.strip()
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        try:  # a bare number of seconds
            seconds = float(text)
        except ValueError:
            return None
        return max(0.0, seconds) if math.isfinite(seconds) else None
    return sum(float(n) * _UNIT_SECONDS[u] for n, u in parts)


def retry_after(
    headers: Mapping[str, str], now: Callable[[], float] = time.time, *, resets: bool = True
) -> float | None:
    """How long the endpoint asked us to wait, from the first header that says, or None.

    ``resets``: also read the ``x-ratelimit-reset-*`` headers (for a 429).
    """
    ms = headers.get("retry-after-ms")
    if ms is not None:
        try:
            return max(0.0, float(ms) / 1000)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if value is not None:
        seconds = parse_duration(value)
        if seconds is not None:
            return seconds
        try:
            return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - now())
        except (TypeError, ValueError):
            pass
    return _reset_time(headers) if resets else None


def _reset_time(headers: Mapping[str, str]) -> float | None:
    """The reset time of the exhausted limit; of the sooner one when the headers don't say."""
    resets: dict[str, float] = {}
    for kind in ("requests", "tokens"):
        value = headers.get(f"x-ratelimit-reset-{kind}")
        seconds = parse_duration(value) if value is not None else None
        if seconds is not None:
            resets[kind] = seconds
    exhausted = [s for k, s in resets.items() if headers.get(f"x-ratelimit-remaining-{k}") == "0"]
    if exhausted:
        return max(exhausted)
    return min(resets.values()) if resets else None
