"""Output lines: the OpenAI Batch API output format, one JSON object per line."""

from __future__ import annotations

from typing import Any

import orjson
import pytest
from hypothesis import given
from hypothesis import strategies as st

from batchq.records import Request, error_line, result_line

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
