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
- A redirect batchq does not follow, or an answer over ``--max-response-bytes``:
  not retried this run, but marked retryable, since a changed setting fixes it.
- A wait the endpoint asks for is trusted only up to ``max_wait``: a longer
  one stops the job (it would look hung for hours), and a negative, infinite
  or unreadable one is no header at all.

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
    UnusableAnswer,
)
from batchq.stats import duration

#: 4xx statuses that are worth sending again (the OpenAI SDKs retry these too).
RETRYABLE_4XX = frozenset({408, 409})
FATAL_CODES = frozenset({"insufficient_quota"})
YEAR = 365.25 * 86400


@dataclass(frozen=True, slots=True, kw_only=True)
class RetryPolicy:
    """How often and how patiently a request is retried."""

    max_attempts: int = 8
    max_rate_limited: int = 1000
    base_delay: float = 0.5
    max_delay: float = 60.0
    max_wait: float = 900.0  # the longest wait an endpoint may ask for; longer stops the job

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
    if isinstance(exc, UnusableAnswer):
        return GiveUp(retryable=True)
    if isinstance(exc, RateLimited):
        if _too_large(exc) or rate_limited >= policy.max_rate_limited:
            return GiveUp(retryable=not _too_large(exc))
        wait = retry_after(headers)
        if wait is not None and wait > policy.max_wait:
            return Fatal(wait_too_long(exc, wait, policy.max_wait))
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
    if wait is not None and wait > policy.max_wait:
        return Fatal(wait_too_long(exc, wait, policy.max_wait))
    return Retry(backoff if wait is None else max(backoff, wait))


def wait_too_long(
    exc: RequestError, wait: float, max_wait: float, now: Callable[[], float] = time.time
) -> str:
    """The one line that stops a job whose endpoint asked for a wait over ``max_wait``."""
    headers = exc.headers if isinstance(exc, HTTPStatusError) else {}
    # Only the values that are waits: any other header text could be anything, even the key.
    asked = ", ".join(
        f"{name}: {value[:40]}" for name, value in headers.items() if _is_wait(name, value)
    )
    status = f"HTTP {exc.status}" if isinstance(exc, HTTPStatusError) else "the endpoint"
    if wait < 10 * YEAR:
        back = time.strftime("%Y-%m-%d %H:%M UTC", time.gmtime(now() + wait))
        when = f"run the same command again after {back}, or now with a larger --max-wait"
    else:
        when = "check --base-url; the same command continues the job"
    return (
        f"the endpoint asked to wait {_long(wait)} ({status}, {asked}), longer than "
        f"--max-wait ({duration(max_wait)}); nothing pending is lost: {when}"
    )


def _long(seconds: float) -> str:
    if seconds < 2 * 86400:
        return duration(seconds)
    if seconds < 10 * YEAR:
        return f"{seconds / 86400:,.1f} days"
    return f"{seconds / YEAR:,.3g} years"


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
    A bare number is seconds. Anything else, and a negative or non-finite
    value (``-5``, ``nan``, ``1e400``, 400 digits of hours), is None: no header.
    """
    text = text.strip()
    parts = _DURATION_PART.findall(text)
    if not parts or "".join(n + u for n, u in parts) != text:
        return _seconds(text)
    return _finite(sum(float(n) * _UNIT_SECONDS[u] for n, u in parts))


def _seconds(text: str | None, scale: float = 1.0) -> float | None:
    """A bare number times ``scale``, if it is one, finite and not negative."""
    if text is None:
        return None
    try:
        return _finite(float(text) * scale)
    except ValueError:
        return None


def _finite(seconds: float) -> float | None:
    # Written so that NaN, which compares false with everything, is None too.
    return seconds + 0.0 if 0.0 <= seconds < math.inf else None


def retry_after(
    headers: Mapping[str, str], now: Callable[[], float] = time.time, *, resets: bool = True
) -> float | None:
    """How long the endpoint asked us to wait, from the first header that says, or None.

    An unusable value is skipped as if the header were absent, so the next one may say.
    ``resets``: also read the ``x-ratelimit-reset-*`` headers (for a 429).
    """
    ms = _seconds(headers.get("retry-after-ms"), 0.001)
    if ms is not None:
        return ms
    value = headers.get("retry-after")
    if value is not None:
        seconds = parse_duration(value)
        if seconds is None:
            seconds = _http_date(value, now)
        if seconds is not None:
            return seconds
    return _reset_time(headers) if resets else None


def _is_wait(header: str, value: str) -> bool:
    if header == "retry-after-ms":
        return _seconds(value) is not None
    if header == "retry-after":
        return parse_duration(value) is not None or _http_date(value, time.time) is not None
    return header.startswith("x-ratelimit-reset-") and parse_duration(value) is not None


def _http_date(value: str, now: Callable[[], float]) -> float | None:
    """Seconds until an HTTP date; a date in the past (clock skew) means now."""
    try:
        return _finite(max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - now()))
    except (TypeError, ValueError, OverflowError, IndexError):
        return None


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
