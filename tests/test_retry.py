"""`batchq.live.retry`: OpenAI's duration formats, which header says how long to wait, the
backoff's bounds, and what `decide` does for every class of failure."""

from __future__ import annotations

import email.utils
import math
import random
from datetime import UTC, datetime, timedelta

import orjson
import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from batchq.errors import (
    EndpointUnreachable,
    HTTPStatusError,
    InvalidResponse,
    RateLimited,
    Redirected,
    RequestError,
    RequestRejected,
    RequestTimeout,
    ResponseTooLarge,
    ServerError,
    TransportError,
)
from batchq.live.retry import (
    Fatal,
    GiveUp,
    Retry,
    RetryPolicy,
    decide,
    parse_duration,
    retry_after,
    status_error,
)

POLICY = RetryPolicy(max_attempts=4, max_rate_limited=50, base_delay=0.5, max_delay=60.0)


def http_error(
    status: int,
    *,
    code: str | None = None,
    message: str = "something went wrong",
    headers: dict[str, str] | None = None,
) -> HTTPStatusError:
    """An HTTP failure as the transport builds it, from an OpenAI-style error body."""
    body = {"error": {"message": message, "type": code or "api_error", "code": code}}
    return status_error(status, orjson.dumps(body), headers or {}, "req_123")


# --- parse_duration ------------------------------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("1s", 1.0),
        ("6m0s", 360.0),
        ("20ms", 0.02),
        ("1m30.5s", 90.5),
        ("1.574s", 1.574),
        ("2h", 7200.0),
        ("3", 3.0),
        ("0.5", 0.5),
        ("0s", 0.0),
        ("1h2m3s4ms", 3723.004),
        ("59m59.999s", 3599.999),
        ("250ms", 0.25),
        (" 7s ", 7.0),
        ("12", 12.0),
    ],
)
def test_parse_duration(text: str, seconds: float) -> None:
    result = parse_duration(text)
    assert result is not None
    assert result == pytest.approx(seconds, rel=1e-12, abs=1e-12)


@pytest.mark.parametrize(
    "text", ["", " ", "abc", "s", "ms", "1x", "1 s", "-1s", "1.5.5s", "5s later", "s5", "1e3s"]
)
def test_parse_duration_garbage_is_none(text: str) -> None:
    assert parse_duration(text) is None


def test_negative_bare_seconds_are_no_header() -> None:
    assert parse_duration("-5") is None


@pytest.mark.parametrize("text", ["inf", "Infinity", "1e999", "nan"])
def test_non_finite_numbers_are_not_durations(text: str) -> None:
    assert parse_duration(text) is None


parts = st.fixed_dictionaries(
    {},
    optional={
        "h": st.integers(0, 48),
        "m": st.integers(0, 59),
        "s": st.integers(0, 59_999).map(lambda thousandths: thousandths / 1000),
        "ms": st.integers(0, 999),
    },
)
SECONDS = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001}


def fmt(value: float) -> str:
    return f"{value:.3f}".rstrip("0").rstrip(".") if isinstance(value, float) else str(value)


@settings(max_examples=200, deadline=None)
@given(parts=parts.filter(bool))
@example(parts={"ms": 20})
@example(parts={"m": 6, "s": 0.0})
@example(parts={"s": 0.001})
def test_formatted_durations_parse_back(parts: dict[str, float]) -> None:
    text = "".join(f"{fmt(parts[unit])}{unit}" for unit in ("h", "m", "s", "ms") if unit in parts)
    expected = sum(value * SECONDS[unit] for unit, value in parts.items())
    result = parse_duration(text)
    assert result is not None, text
    assert math.isclose(result, expected, rel_tol=1e-9, abs_tol=1e-9), text


@settings(max_examples=300, deadline=None)
@given(text=st.text() | st.text(alphabet="0123456789.hms -e+:,", max_size=12))
def test_parse_duration_never_raises(text: str) -> None:
    result = parse_duration(text)
    assert result is None or (isinstance(result, float) and result >= 0.0), (text, result)


@settings(max_examples=200, deadline=None)
@given(text=st.text(st.characters(exclude_categories=["Nd"], exclude_characters="nN")))
def test_text_without_digits_is_no_duration(text: str) -> None:
    # 'n' is left out so that 'inf' and 'nan' can't be spelled: those are pinned by
    # test_non_finite_numbers_are_not_durations.
    assert parse_duration(text) is None


# --- retry_after ---------------------------------------------------------------------

NOW = datetime(2025, 3, 1, 12, 0, 0, tzinfo=UTC)


def http_date(moment: datetime) -> str:
    return email.utils.format_datetime(moment, usegmt=True)


def at_now() -> float:
    return NOW.timestamp()


@pytest.mark.parametrize(
    ("headers", "seconds"),
    [
        ({}, None),
        ({"retry-after-ms": "1500"}, 1.5),
        ({"retry-after-ms": "1500", "retry-after": "20"}, 1.5),
        ({"retry-after-ms": "soon", "retry-after": "2"}, 2.0),
        ({"retry-after-ms": "-40"}, None),
        ({"retry-after-ms": "-40", "retry-after": "3"}, 3.0),
        ({"retry-after-ms": "nan", "retry-after": "-5"}, None),
        ({"retry-after-ms": "inf"}, None),
        ({"retry-after-ms": "1e400"}, None),
        ({"retry-after-ms": "NaN", "x-ratelimit-reset-requests": "2s"}, 2.0),
        ({"retry-after": "-5", "x-ratelimit-reset-tokens": "-1"}, None),
        ({"retry-after": "999999"}, 999999.0),
        ({"retry-after": "1" + "0" * 400 + "h"}, None),
        ({"retry-after": "20"}, 20.0),
        ({"retry-after": "0.25"}, 0.25),
        ({"retry-after": "1m30s"}, 90.0),
        ({"retry-after": http_date(NOW + timedelta(seconds=30))}, 30.0),
        ({"retry-after": http_date(NOW - timedelta(minutes=5))}, 0.0),
        ({"retry-after": "3", "x-ratelimit-reset-requests": "10s"}, 3.0),
        ({"retry-after": "whenever", "x-ratelimit-reset-requests": "10s"}, 10.0),
        ({"retry-after": "whenever"}, None),
        ({"x-ratelimit-reset-requests": "6m0s"}, 360.0),
        ({"x-ratelimit-reset-tokens": "20ms"}, 0.02),
        ({"x-ratelimit-reset-requests": "junk", "x-ratelimit-reset-tokens": "2s"}, 2.0),
    ],
)
def test_retry_after_precedence(headers: dict[str, str], seconds: float | None) -> None:
    assert retry_after(headers, now=at_now) == (None if seconds is None else pytest.approx(seconds))


RESETS = {"x-ratelimit-reset-requests": "1s", "x-ratelimit-reset-tokens": "6m0s"}


@pytest.mark.parametrize(
    ("remaining", "seconds"),
    [
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "9000"}, 1.0),
        ({"x-ratelimit-remaining-requests": "12", "x-ratelimit-remaining-tokens": "0"}, 360.0),
        ({"x-ratelimit-remaining-requests": "0", "x-ratelimit-remaining-tokens": "0"}, 360.0),
        ({"x-ratelimit-remaining-requests": "3", "x-ratelimit-remaining-tokens": "5"}, 1.0),
        ({}, 1.0),
    ],
    ids=["requests-exhausted", "tokens-exhausted", "both", "neither", "no-remaining"],
)
def test_reset_of_the_exhausted_limit(remaining: dict[str, str], seconds: float) -> None:
    assert retry_after({**RESETS, **remaining}) == pytest.approx(seconds)


def test_headers_are_matched_whatever_their_case() -> None:
    exc = status_error(429, b"{}", {"Retry-After": "7", "X-RateLimit-Reset-Tokens": "1s"}, None)
    assert retry_after(exc.headers) == 7.0


# --- status_error --------------------------------------------------------------------


@pytest.mark.parametrize(
    ("status", "kind", "retryable"),
    [
        (429, RateLimited, True),
        (500, ServerError, True),
        (503, ServerError, True),
        (400, RequestRejected, False),
        (404, RequestRejected, False),
        (401, RequestRejected, False),
    ],
)
def test_status_error_classes(status: int, kind: type[HTTPStatusError], retryable: bool) -> None:
    exc = http_error(status, code="some_code", message="the reason", headers={"X-Req": "1"})
    assert type(exc) is kind
    assert exc.retryable is retryable
    assert (exc.status, exc.request_id, exc.headers) == (status, "req_123", {"x-req": "1"})
    assert exc.error_code == "some_code"
    assert "the reason" in str(exc)


def test_status_error_keeps_a_body_that_is_not_json() -> None:
    exc = status_error(502, b"<html>Bad gateway</html>", {}, None)
    assert isinstance(exc, ServerError)
    assert exc.body == "<html>Bad gateway</html>"
    assert exc.code == "http_502"


# --- backoff -------------------------------------------------------------------------


@pytest.mark.parametrize("attempt", range(1, 15))
def test_backoff_bounds(attempt: int) -> None:
    ceiling = min(60.0, 0.5 * 2 ** (attempt - 1))
    assert POLICY.backoff(attempt, rng=lambda: 0.0) == 0.0
    assert POLICY.backoff(attempt, rng=lambda: 1.0) == ceiling


def test_backoff_ceiling_doubles_then_caps() -> None:
    ceilings = [POLICY.backoff(a, rng=lambda: 1.0) for a in range(1, 12)]
    assert ceilings[:5] == [0.5, 1.0, 2.0, 4.0, 8.0]
    assert ceilings[-1] == 60.0
    assert ceilings == sorted(ceilings)


@settings(max_examples=200, deadline=None)
@given(
    attempt=st.integers(0, 1000),
    u=st.floats(0, 1),
    base=st.floats(0.001, 10),
    cap=st.floats(0.01, 600),
)
def test_backoff_is_full_jitter_under_the_cap(
    attempt: int, u: float, base: float, cap: float
) -> None:
    policy = RetryPolicy(base_delay=base, max_delay=cap)
    delay = policy.backoff(attempt, rng=lambda: u)
    assert 0.0 <= delay <= cap
    assert delay == pytest.approx(u * min(cap, base * 2.0 ** (attempt - 1)))


def test_backoff_of_a_very_late_attempt_is_capped() -> None:
    assert RetryPolicy(max_rate_limited=5000).backoff(1100, rng=lambda: 1.0) == 60.0


# --- decide --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("exc", "reason"),
    [
        (http_error(401, code="invalid_api_key"), "401"),
        (http_error(403, code="unsupported_country_region_territory"), "403"),
        (http_error(429, code="insufficient_quota"), "insufficient_quota"),
        (http_error(400, code="insufficient_quota"), "insufficient_quota"),
    ],
    ids=["401", "403", "429-quota", "400-quota"],
)
@pytest.mark.parametrize("attempts", [1, 3])
def test_fatal(exc: HTTPStatusError, reason: str, attempts: int) -> None:
    decision = decide(exc, attempts, 0, POLICY)
    assert isinstance(decision, Fatal)
    assert reason in decision.reason


def test_quota_as_error_type_only_is_fatal() -> None:
    body = {"error": {"message": "You exceeded your current quota", "type": "insufficient_quota"}}
    exc = status_error(429, orjson.dumps(body), {}, None)
    assert isinstance(decide(exc, 1, 0, POLICY), Fatal)


@pytest.mark.parametrize("status", [400, 404, 413, 422])
def test_rejected_requests_are_not_retried(status: int) -> None:
    assert decide(http_error(status), 1, 0, POLICY) == GiveUp(retryable=False)


@pytest.mark.parametrize("status", [408, 409, 500, 502, 503, 504])
def test_retried_until_max_attempts(status: int) -> None:
    exc = http_error(status)
    for attempts in range(1, POLICY.max_attempts):
        decision = decide(exc, attempts, 0, POLICY)
        assert isinstance(decision, Retry), attempts
        assert not decision.pause_all
        assert 0.0 <= decision.delay <= POLICY.backoff(attempts, rng=lambda: 1.0)
    assert decide(exc, POLICY.max_attempts, 0, POLICY) == GiveUp(retryable=True)


def test_a_server_retry_after_replaces_the_backoff() -> None:
    exc = http_error(503, headers={"Retry-After": "12"})
    assert decide(exc, 1, 0, POLICY) == Retry(12.0)


@pytest.mark.parametrize(
    "exc",
    [TransportError("connection reset"), RequestTimeout("no answer in 600 s")],
    ids=["dropped", "timeout"],
)
def test_transport_failures_retried_then_given_up(exc: TransportError) -> None:
    decision = decide(exc, 1, 0, POLICY)
    assert isinstance(decision, Retry) and not decision.pause_all
    assert decide(exc, POLICY.max_attempts, 0, POLICY) == GiveUp(retryable=True)


def test_unreachable_endpoint_retried_then_fatal() -> None:
    exc = EndpointUnreachable("connection refused")
    assert isinstance(decide(exc, 1, 0, POLICY), Retry)
    decision = decide(exc, POLICY.max_attempts, 0, POLICY)
    assert isinstance(decision, Fatal)
    assert "cannot be reached" in decision.reason


def test_429_pauses_everyone_for_the_time_asked() -> None:
    exc = http_error(429, code="rate_limit_exceeded", headers={"retry-after-ms": "2500"})
    assert decide(exc, 1, 0, POLICY) == Retry(2.5, pause_all=True)
    reset = http_error(
        429,
        headers={"x-ratelimit-remaining-tokens": "0", "x-ratelimit-reset-tokens": "1m30s"},
    )
    assert decide(reset, 1, 0, POLICY) == Retry(90.0, pause_all=True)


def test_429_without_headers_backs_off() -> None:
    decision = decide(http_error(429), 1, 0, POLICY)
    assert isinstance(decision, Retry) and decision.pause_all
    assert 0.0 <= decision.delay <= POLICY.max_delay


def test_429s_do_not_count_against_max_attempts() -> None:
    exc = http_error(429, headers={"retry-after": "1"})
    many = 10 * POLICY.max_attempts
    assert decide(exc, many, many - 1, POLICY) == Retry(1.0, pause_all=True)
    # A 5xx after many 429s still has its own max_attempts budget.
    server = http_error(500)
    assert isinstance(decide(server, many + 1, many, POLICY), Retry)
    spent = many + POLICY.max_attempts
    assert decide(server, spent, many, POLICY) == GiveUp(retryable=True)


def test_429s_have_their_own_bound() -> None:
    exc = http_error(429, headers={"retry-after": "1"})
    limit = POLICY.max_rate_limited
    assert decide(exc, limit + 1, limit, POLICY) == GiveUp(retryable=True)


@pytest.mark.parametrize(
    "message",
    [
        "Request too large for gpt-4o in organization org-x on tokens per min (TPM): "
        "Limit 30000, Requested 45000.",
        "request TOO LARGE",
    ],
)
def test_429_request_too_large_is_given_up(message: str) -> None:
    exc = http_error(429, code="rate_limit_exceeded", message=message)
    assert decide(exc, 1, 0, POLICY) == GiveUp(retryable=False)


@pytest.mark.parametrize(
    ("status", "retryable"), [(500, True), (503, True), (429, True), (400, False)]
)
@pytest.mark.parametrize("value", ["false", "False"])
def test_x_should_retry_false_is_obeyed(status: int, retryable: bool, value: str) -> None:
    exc = http_error(status, headers={"X-Should-Retry": value, "retry-after": "1"})
    assert decide(exc, 1, 0, POLICY) == GiveUp(retryable=retryable)


def test_x_should_retry_true_changes_nothing_for_a_5xx() -> None:
    exc = http_error(500, headers={"x-should-retry": "true", "retry-after": "4"})
    assert decide(exc, 1, 0, POLICY) == Retry(4.0)


# --- what an endpoint may not make batchq do (issue 13) ----------------------------------

WAIT_HEADERS = [
    "retry-after-ms",
    "retry-after",
    "x-ratelimit-reset-requests",
    "x-ratelimit-reset-tokens",
]
NONSENSE = [
    "-5",
    "-0.5",
    "nan",
    "NaN",
    "inf",
    "-inf",
    "Infinity",
    "1e400",
    "-1e400",
    "-3s",
    "soon",
    "",
]
numbers = st.from_regex(
    r"-?[0-9]{0,400}(\.[0-9]{0,20})?(e[+-]?[0-9]{1,4})?(ms|s|m|h)?", fullmatch=True
)
dates = st.datetimes(timezones=st.just(UTC)).map(lambda d: email.utils.format_datetime(d, True))
header_values = st.text() | numbers | dates | st.sampled_from(NONSENSE)


@settings(max_examples=500, deadline=None)
@given(headers=st.dictionaries(st.sampled_from(WAIT_HEADERS), header_values))
@example(headers={"retry-after-ms": "1e400"})
@example(headers={"retry-after": "Fri, 31 Dec 9999 23:59:59 GMT"})
@example(headers={"retry-after": "Mon, 01 Jan 0001 00:00:00 GMT"})
@example(headers={"x-ratelimit-reset-tokens": "9" * 400 + "h"})
def test_any_wait_headers_give_a_finite_non_negative_wait_or_none(headers: dict[str, str]) -> None:
    wait = retry_after(headers)
    assert wait is None or (type(wait) is float and 0.0 <= wait < math.inf), (headers, wait)


@settings(max_examples=300, deadline=None)
@given(
    name=st.sampled_from(WAIT_HEADERS[:2]),
    bad=st.sampled_from(NONSENSE),
    rest=st.dictionaries(st.sampled_from(WAIT_HEADERS[2:]), header_values),
)
def test_a_nonsense_wait_is_as_if_the_header_were_absent(
    name: str, bad: str, rest: dict[str, str]
) -> None:
    assert retry_after({name: bad, **rest}) == retry_after(rest)


@pytest.mark.parametrize("headers", [{"retry-after": "-5"}, {"retry-after-ms": "nan"}])
@pytest.mark.parametrize("status", [429, 503])
def test_a_nonsense_wait_gets_the_backoff_of_no_header(
    headers: dict[str, str], status: int
) -> None:
    random.seed(13)
    with_header = decide(http_error(status, headers=headers), 1, 0, POLICY)
    random.seed(13)
    without = decide(http_error(status), 1, 0, POLICY)
    assert with_header == without
    assert isinstance(with_header, Retry) and with_header.delay > 0


IN_AN_HOUR = email.utils.format_datetime(datetime.now(UTC) + timedelta(hours=1), True)


@pytest.mark.parametrize(
    ("status", "headers"),
    [
        *[(s, {"retry-after": "901"}) for s in (429, 503)],
        *[(s, {"retry-after-ms": "901000"}) for s in (429, 503)],
        *[(s, {"retry-after": IN_AN_HOUR}) for s in (429, 503)],
        # For a 5xx, x-ratelimit-reset-* is about to stop replacing the backoff: 429 only.
        (429, {"x-ratelimit-reset-requests": "16m"}),
    ],
)
def test_a_wait_over_max_wait_is_fatal(status: int, headers: dict[str, str]) -> None:
    decision = decide(http_error(status, headers=headers), 1, 0, RetryPolicy(max_wait=900))
    assert isinstance(decision, Fatal)
    assert "longer than --max-wait (15m00s)" in decision.reason
    name, value = next(iter(headers.items()))
    assert f"HTTP {status}, {name}: {value}" in decision.reason


def test_a_wait_of_exactly_max_wait_is_waited() -> None:
    exc = http_error(429, headers={"retry-after": "900"})
    assert decide(exc, 1, 0, RetryPolicy(max_wait=900)) == Retry(900.0, pause_all=True)


def test_the_fatal_line_shows_only_headers_that_are_waits() -> None:
    headers = {"retry-after-ms": "99999999", "retry-after": "Bearer sk-secret", "x-other": "1"}
    decision = decide(http_error(429, headers=headers), 1, 0, POLICY)
    assert isinstance(decision, Fatal)
    assert "retry-after-ms: 99999999" in decision.reason
    assert "sk-secret" not in decision.reason and "x-other" not in decision.reason


@pytest.mark.parametrize(
    "exc",
    [
        Redirected("moved", status=301),
        ResponseTooLarge("big", status=200),
    ],
)
def test_unusable_answers_are_given_up_at_once_but_stay_retryable(exc: RequestError) -> None:
    assert decide(exc, 1, 0, POLICY) == GiveUp(retryable=True)


def test_a_non_json_2xx_is_retried_like_a_5xx() -> None:
    exc = InvalidResponse("HTTP 200 (text/html) is not a JSON object")
    assert isinstance(decide(exc, 1, 0, POLICY), Retry)
    assert decide(exc, POLICY.max_attempts, 0, POLICY) == GiveUp(retryable=True)


def test_an_error_body_in_another_shape_is_quoted_as_json_not_python() -> None:
    exc = status_error(500, b'{"detail": "model \'x\' is not loaded", "ok": false}', {}, None)
    assert str(exc) == 'HTTP 500: {"detail":"model \'x\' is not loaded","ok":false}'
