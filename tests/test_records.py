"""Output lines: the OpenAI Batch API output format, one JSON object per line."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchq.records import (
    KEY_REMOVED,
    MAX_ANSWER_DEPTH,
    KeyScrubber,
    Request,
    error_line,
    key_scrubber,
    result_line,
    splices,
)

REQUEST = Request(7, "req-7", "/v1/chat/completions", b"{}", 10)

json_values = st.recursive(
    st.none() | st.booleans() | st.integers(-(2**53), 2**53) | st.text(),
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=20,
)


def expected(body: Any) -> dict[str, Any]:
    return {
        "id": "batch_req_7",
        "custom_id": "req-7",
        "response": {"status_code": 200, "request_id": "req_x", "body": body},
        "error": None,
        "batchq": {"line": 7, "attempts": 2},
    }


@given(st.dictionaries(st.text(), json_values, max_size=6), st.booleans())
def test_a_result_line_is_one_line_holding_the_answer(body: dict[str, Any], pretty: bool) -> None:
    # The endpoint's bytes as sent: compact, or pretty-printed over several lines.
    raw = orjson.dumps(body, option=orjson.OPT_INDENT_2 if pretty else 0)
    line = result_line(REQUEST, 200, "req_x", raw, body, attempts=2)
    assert line.endswith(b"\n") and line.count(b"\n") == 1
    assert orjson.loads(line) == expected(body)


@pytest.mark.parametrize("raw", [b'{"a": 1,  "b" : [1, 2]}', b'["x"]', b'"just a string"'])
def test_spaced_and_non_object_answers(raw: bytes) -> None:
    body = orjson.loads(raw)
    assert orjson.loads(result_line(REQUEST, 200, "req_x", raw, body, attempts=2)) == expected(body)


@pytest.mark.parametrize("depth", [1, MAX_ANSWER_DEPTH - 1, MAX_ANSWER_DEPTH, MAX_ANSWER_DEPTH + 1])
@pytest.mark.parametrize("bracket", [b"[]", b'{"a":}'])
def test_an_answer_splices_only_if_its_line_reads_back(depth: int, bracket: bytes) -> None:
    opening, closing = bracket[:-1], bracket[-1:]
    raw = opening * (depth - 1) + b"[" + b" " * 3000 + b"]" + closing * (depth - 1)
    body = orjson.loads(raw)  # every depth here is one orjson reads
    try:
        orjson.loads(result_line(REQUEST, 200, None, raw, body, attempts=1))
        reads_back = True
    except orjson.JSONDecodeError:
        reads_back = False
    assert splices(raw) is reads_back is (depth <= MAX_ANSWER_DEPTH)
    assert splices(b'{"text": "' + b"{[" * 3000 + b'"}')  # brackets in a string are no depth


def test_an_error_line_says_what_happened() -> None:
    line = error_line(
        7,
        "req-7",
        "server_error",
        "HTTP 503: busy",
        status=503,
        body={"e": 1},
        attempts=8,
        retryable=True,
    )
    assert orjson.loads(line) == {
        "id": "batch_req_7",
        "custom_id": "req-7",
        "response": {"status_code": 503, "request_id": None, "body": {"e": 1}},
        "error": {"code": "server_error", "message": "HTTP 503: busy"},
        "batchq": {"line": 7, "attempts": 8, "retryable": True},
    }


# --- KeyScrubber: the API key out of every output line ------------------------------------

KEY = "sk-test-0123456789abcdef"


def test_a_line_without_the_key_is_passed_through_untouched() -> None:
    line = b'{"custom_id":"a","response":{"body":{"text":"sk-test but not the key"}}}\n'
    assert KeyScrubber(KEY).scrub(line) is line


@pytest.mark.parametrize(
    "value",
    [
        f"Bearer {KEY}",
        {"echo": KEY, KEY: [KEY, 1, None]},
        ["x", {"deep": [f"..{KEY}..{KEY}"]}],
    ],
)
def test_the_key_is_replaced_everywhere_and_the_line_stays_json(value: object) -> None:
    line = orjson.dumps({"custom_id": "a", "body": value}, option=orjson.OPT_APPEND_NEWLINE)
    clean = KeyScrubber(KEY).scrub(line)
    assert KEY.encode() not in clean and clean.endswith(b"\n")
    assert KEY_REMOVED in orjson.dumps(orjson.loads(clean)).decode()


def test_a_key_spelled_in_json_escapes_is_found() -> None:
    escaped = "".join(f"\\u{ord(c):04x}" for c in KEY).encode()
    line = b'{"body":{"text":"' + escaped + b'"}}\n'
    assert orjson.loads(KeyScrubber(KEY).scrub(line)) == {"body": {"text": KEY_REMOVED}}


def test_escapes_that_cannot_spell_the_key_leave_the_line_as_it_came() -> None:
    # A Go server writes <, > and & as \u003c..., an ASCII-only encoder é as \u00e9: such a
    # line is not decoded (nor rewritten) for want of the key.
    line = b'{"body":{"text":"\\u003cb\\u003e caf\\u00e9 \\ud83d\\ude00 \\"sk-test\\" \\n"}}\n'
    assert KeyScrubber(KEY).scrub(line) is line


def test_a_key_partly_escaped_in_upper_case_hex_is_found() -> None:
    line = b'{"body":{"text":"s\\u006B-test-0123456789abcdef"}}\n'  # "k" as \u006B
    assert orjson.loads(KeyScrubber(KEY).scrub(line)) == {"body": {"text": KEY_REMOVED}}


def test_a_key_with_a_slash_written_as_an_escaped_slash_is_found() -> None:
    # PHP's json_encode writes "/" as "\/" by default.
    key = "abc/def+ghi=jkl"
    line = b'{"body":{"text":"abc\\/def+ghi=jkl"}}\n'
    assert orjson.loads(KeyScrubber(key).scrub(line)) == {"body": {"text": KEY_REMOVED}}


@pytest.mark.parametrize("key", [None, "", "EMPTY", "ollama", "1234567"])
def test_placeholder_keys_are_not_scrubbed(key: str | None) -> None:
    # "ollama" would otherwise vanish from model names in every answer.
    assert key_scrubber(key) is None
