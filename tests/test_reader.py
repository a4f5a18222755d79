"""`batchq.reader`: both input line forms, the job's fills, bad lines as error outcomes,
token estimates, and the async feeder on a real file. Parsers get property tests (STYLE §7):
dump arbitrary records with orjson, read them back."""

from __future__ import annotations

import io
from pathlib import Path
from typing import Any

import orjson
import pytest
from hypothesis import HealthCheck, example, given, settings
from hypothesis import strategies as st

from batchq.config import ENDPOINTS
from batchq.reader import (
    FALLBACK_COMPLETION_TOKENS,
    RequestTemplate,
    _skip_lines,
    check_jsonl,
    completion_cap,
    estimate_tokens,
    feed,
    parse_line,
)
from batchq.records import Outcome, Request

CHAT = "/v1/chat/completions"
FALLBACK = FALLBACK_COMPLETION_TOKENS
FAST_BAD = settings(max_examples=50, deadline=None)
SYSTEM = "Be brief."
TEMPLATE = RequestTemplate(CHAT, "job-model", SYSTEM, {"max_tokens": 64, "temperature": 0.2})
PLAIN = RequestTemplate(CHAT, None, None, {})
USER = {"role": "user", "content": "hello"}
SYSTEM_MESSAGE = {"role": "system", "content": SYSTEM}


def encode(line: dict[str, Any] | bytes) -> bytes:
    return line if isinstance(line, bytes) else orjson.dumps(line)


def request(
    line: dict[str, Any] | bytes, line_no: int = 1, template: RequestTemplate = TEMPLATE
) -> Request:
    parsed = parse_line(encode(line), line_no, template)
    assert isinstance(parsed, Request), orjson.loads(parsed.line)
    assert parsed.line_no == line_no
    return parsed


def sent(req: Request) -> dict[str, Any]:
    body = orjson.loads(req.body)
    assert isinstance(body, dict)
    return body


def rejected(
    line: dict[str, Any] | bytes, line_no: int = 7, template: RequestTemplate = TEMPLATE
) -> dict[str, Any]:
    """The errors.jsonl line a bad input line becomes, after checking its common shape."""
    parsed = parse_line(encode(line), line_no, template)
    assert isinstance(parsed, Outcome), parsed
    assert (parsed.ok, parsed.line_no) == (False, line_no)
    assert parsed.line.endswith(b"\n") and parsed.line.count(b"\n") == 1
    out = orjson.loads(parsed.line)
    assert isinstance(out, dict)
    assert out["batchq"]["line"] == line_no
    assert out["batchq"]["retryable"] is False
    assert out["response"] is None
    assert set(out["error"]) == {"code", "message"}
    assert out["error"]["message"].startswith(f"input line {line_no}: ")
    return out


# --- the two line forms -------------------------------------------------------------


@pytest.mark.parametrize(
    "extra",
    [
        {"method": "POST", "url": CHAT},
        {"url": CHAT},
        {"method": "POST"},
        {},
    ],
    ids=["method+url", "url-only", "method-only", "neither"],
)
def test_batch_api_line_with_or_without_method_and_url(extra: dict[str, Any]) -> None:
    req = request({"custom_id": "req-1", **extra, "body": {"messages": [USER]}}, line_no=3)
    assert (req.custom_id, req.url) == ("req-1", CHAT)
    assert sent(req) == {
        "messages": [SYSTEM_MESSAGE, USER],
        "model": "job-model",
        "max_tokens": 64,
        "temperature": 0.2,
    }


def test_batch_api_line_without_custom_id_is_named_by_its_line() -> None:
    assert request({"body": {"messages": [USER]}}, line_no=12).custom_id == "line-12"


def test_bare_body_custom_id_is_taken_out_of_the_body() -> None:
    req = request({"custom_id": "mine", "messages": [USER]}, template=PLAIN)
    assert req.custom_id == "mine"
    assert sent(req) == {"messages": [USER]}


@pytest.mark.parametrize("line_no", [1, 2, 999_999])
def test_bare_body_without_custom_id_is_line_n(line_no: int) -> None:
    req = request({"messages": [USER]}, line_no=line_no, template=PLAIN)
    assert req.custom_id == f"line-{line_no}"
    assert "custom_id" not in sent(req)


def test_integer_custom_id_becomes_its_string() -> None:
    assert request({"custom_id": 17, "body": {"messages": [USER]}}).custom_id == "17"
    assert request({"custom_id": 0, "messages": [USER]}).custom_id == "0"


def test_a_custom_id_inside_a_batch_body_is_left_in_the_body() -> None:
    req = request({"custom_id": "outer", "body": {"custom_id": "inner", "messages": [USER]}})
    assert req.custom_id == "outer"
    assert sent(req)["custom_id"] == "inner"


# --- prompt, system prompt, model and defaults ----------------------------------------


@pytest.mark.parametrize(
    "line",
    [{"prompt": "hi"}, {"custom_id": "p", "body": {"prompt": "hi"}}],
    ids=["bare", "batch"],
)
def test_prompt_becomes_one_user_message_after_the_system_prompt(line: dict[str, Any]) -> None:
    body = sent(request(line))
    assert body["messages"] == [SYSTEM_MESSAGE, {"role": "user", "content": "hi"}]
    assert "prompt" not in body


def test_prompt_without_a_job_system_prompt_is_the_only_message() -> None:
    assert sent(request({"prompt": "hi"}, template=PLAIN)) == {
        "messages": [{"role": "user", "content": "hi"}]
    }


def test_prompt_is_left_alone_when_messages_are_given() -> None:
    body = sent(request({"prompt": "unused", "messages": [USER]}, template=PLAIN))
    assert body == {"prompt": "unused", "messages": [USER]}


@pytest.mark.parametrize("role", ["system", "developer"])
@pytest.mark.parametrize("position", [0, 1])
def test_system_prompt_not_added_when_messages_have_one(role: str, position: int) -> None:
    messages = [USER]
    messages.insert(position, {"role": role, "content": "own instructions"})
    assert sent(request({"messages": messages}))["messages"] == messages


def test_system_prompt_goes_first_before_any_other_roles() -> None:
    messages = [USER, {"role": "assistant", "content": "hi"}, {"role": "user", "content": "?"}]
    assert sent(request({"messages": messages}))["messages"] == [SYSTEM_MESSAGE, *messages]


def test_body_values_win_over_model_and_defaults() -> None:
    own = {"messages": [USER], "model": "mine", "max_tokens": 5, "temperature": None}
    body = sent(request(own))
    assert body["model"] == "mine"
    assert body["max_tokens"] == 5
    assert body["temperature"] is None  # an explicit null is the body's own value too


def test_defaults_fill_only_what_is_missing() -> None:
    template = RequestTemplate(CHAT, "m", None, {"max_tokens": 9, "top_p": 0.5, "stop": ["\n"]})
    body = sent(request({"messages": [USER], "top_p": 1}, template=template))
    assert body == {"messages": [USER], "model": "m", "max_tokens": 9, "top_p": 1, "stop": ["\n"]}


def test_template_defaults_are_not_shared_between_requests() -> None:
    template = RequestTemplate(CHAT, None, None, {"stop": ["x"]})
    first = request({"messages": [USER]}, template=template)
    second = request({"messages": [USER], "stop": ["y"]}, template=template)
    assert sent(first)["stop"] == ["x"]
    assert sent(second)["stop"] == ["y"]
    assert template.defaults == {"stop": ["x"]}


@pytest.mark.parametrize(
    ("url", "body"),
    [
        ("/v1/embeddings", {"input": ["a", "b"]}),
        ("/v1/completions", {"prompt": "once upon"}),
        ("/v1/responses", {"input": "hi"}),
    ],
)
def test_lines_for_another_endpoint_are_sent_as_written(url: str, body: dict[str, Any]) -> None:
    req = request({"custom_id": "x", "method": "POST", "url": url, "body": body})
    assert req.url == url
    assert sent(req) == body


@pytest.mark.parametrize(
    ("url", "expected"),
    [("/chat/completions", CHAT), ("/embeddings", "/v1/embeddings")],
)
def test_url_without_v1_is_normalised(url: str, expected: str) -> None:
    body = {"messages": [USER]} if expected == CHAT else {"input": "x"}
    req = request({"custom_id": "x", "url": url, "body": body})
    assert req.url == expected
    filled = expected == CHAT  # only the job's own endpoint gets the job's fills
    assert ("model" in sent(req)) is filled


def test_completions_job_fills_model_and_defaults_but_no_messages() -> None:
    template = RequestTemplate("/v1/completions", "base", SYSTEM, {"max_tokens": 3})
    req = request({"prompt": "once"}, template=template)
    assert req.url == "/v1/completions"
    assert sent(req) == {"prompt": "once", "model": "base", "max_tokens": 3}


def test_responses_job_turns_prompt_into_input_and_system_into_instructions() -> None:
    template = RequestTemplate("/v1/responses", "r", SYSTEM, {})
    assert sent(request({"prompt": "hi"}, template=template)) == {
        "input": "hi",
        "instructions": SYSTEM,
        "model": "r",
    }
    own = sent(request({"input": "hi", "instructions": "mine"}, template=template))
    assert own["instructions"] == "mine"


# --- bad lines -----------------------------------------------------------------------


@pytest.mark.parametrize(
    ("line", "code", "fragment", "custom_id"),
    [
        (b"{not json", "invalid_json", "not valid JSON", "line-7"),
        (b'{"messages": [', "invalid_json", "not valid JSON", "line-7"),
        (b"\xff\xfe{}", "invalid_json", "not UTF-8 text", "line-7"),
        (b"[1, 2]", "invalid_request", "not an object", "line-7"),
        (b'"just text"', "invalid_request", "not an object", "line-7"),
        (b"42", "invalid_request", "not an object", "line-7"),
        (b"null", "invalid_request", "not an object", "line-7"),
        (
            {"custom_id": "a", "url": "/v1/images/generations", "body": {"prompt": "cat"}},
            "invalid_request",
            "/v1/images/generations",
            "a",
        ),
        ({"custom_id": "a", "url": 5, "body": {"messages": [USER]}}, "invalid_request", "url", "a"),
        (
            {"custom_id": "g", "method": "GET", "url": CHAT, "body": {"messages": [USER]}},
            "invalid_request",
            "method must be POST",
            "g",
        ),
        ({"temperature": 1}, "invalid_request", "no 'messages'", "line-7"),
        ({"messages": "hi"}, "invalid_request", "non-empty list", "line-7"),
        ({"prompt": ["a", "list"]}, "invalid_request", "no 'messages'", "line-7"),
        (
            {"custom_id": "c", "url": "/v1/completions", "body": {"input": "x"}},
            "invalid_request",
            "no 'prompt'",
            "c",
        ),
        (
            {"custom_id": "e", "url": "/v1/embeddings", "body": {"prompt": "x"}},
            "invalid_request",
            "no 'input'",
            "e",
        ),
    ],
)
def test_bad_lines_become_error_outcomes(
    line: dict[str, Any] | bytes, code: str, fragment: str, custom_id: str | None
) -> None:
    out = rejected(line)
    assert out["error"]["code"] == code
    assert fragment in out["error"]["message"]
    assert out["custom_id"] == custom_id


@pytest.mark.parametrize("custom_id", [["a"], {"id": 1}, 1.5, True, False])
@pytest.mark.parametrize("form", ["bare", "batch"])
def test_non_string_custom_id_is_a_bad_line(custom_id: Any, form: str) -> None:
    line = (
        {"custom_id": custom_id, "messages": [USER]}
        if form == "bare"
        else {"custom_id": custom_id, "body": {"messages": [USER]}}
    )
    out = rejected(line)
    assert out["error"]["code"] == "invalid_request"
    assert "custom_id must be a string" in out["error"]["message"]
    assert out["custom_id"] == "line-7"


def test_empty_messages_is_a_bad_line() -> None:
    out = rejected({"custom_id": "m", "messages": []}, template=PLAIN)
    assert out["custom_id"] == "m"
    assert "non-empty list" in out["error"]["message"]


def test_empty_messages_is_a_bad_line_even_with_a_job_system_prompt() -> None:
    out = rejected({"custom_id": "m", "messages": []}, template=TEMPLATE)
    assert "non-empty list" in out["error"]["message"]


@FAST_BAD
@given(custom_id=st.text(min_size=1))
def test_a_bad_line_keeps_its_custom_id(custom_id: str) -> None:
    out = rejected({"custom_id": custom_id, "messages": "not a list"})
    assert out["custom_id"] == custom_id


def test_a_bad_line_keeps_an_empty_custom_id() -> None:
    assert request({"custom_id": "", "messages": [USER]}).custom_id == ""
    assert rejected({"custom_id": "", "messages": "not a list"})["custom_id"] == ""


def test_deeply_nested_valid_json_is_a_bad_line_not_a_crash() -> None:
    depth = 300  # orjson.loads accepts up to 1024 levels; orjson.dumps stops at 255
    line = b'{"messages": [' + b"[" * depth + b"]" * depth + b"]}"
    assert isinstance(parse_line(line, 1, TEMPLATE), Request | Outcome)


# --- token estimates -----------------------------------------------------------------


@pytest.mark.parametrize(
    ("body", "url", "cap"),
    [
        ({"messages": [USER], "max_tokens": 100}, CHAT, 100),
        ({"messages": [USER], "max_tokens": 100, "n": 8}, CHAT, 800),  # billed n × max_tokens
        ({"messages": [USER], "max_completion_tokens": 10, "n": 3}, CHAT, 30),
        ({"messages": [USER], "max_tokens": 100, "n": 0}, CHAT, 100),  # the endpoint refuses
        ({"messages": [USER], "max_tokens": 100, "n": True}, CHAT, 100),
        ({"messages": [USER], "max_tokens": 100, "n": "8"}, CHAT, 100),
        ({"messages": [USER], "n": 8}, CHAT, None),
        ({"prompt": "a", "max_tokens": 10, "best_of": 5, "n": 2}, "/v1/completions", 50),
        ({"prompt": "a", "max_tokens": 10, "best_of": 2, "n": 4}, "/v1/completions", 40),
        ({"prompt": ["a", "b", "c"], "max_tokens": 10, "n": 2}, "/v1/completions", 60),
        ({"prompt": [[1, 2], [3]], "max_tokens": 10}, "/v1/completions", 20),
        ({"prompt": [1, 2, 3], "max_tokens": 10}, "/v1/completions", 10),  # token ids: one
        ({"input": "a", "max_output_tokens": 30, "n": 4}, "/v1/responses", 120),
        ({"input": ["a", "b"], "n": 4}, "/v1/embeddings", 0),
    ],
)
def test_the_completion_cap_counts_every_answer_billed(
    body: dict[str, Any], url: str, cap: int | None
) -> None:
    assert completion_cap(body, url) == cap


@pytest.mark.parametrize(
    ("body", "url", "tokens"),
    [
        ({"messages": [{"role": "user", "content": "abcd" * 10}]}, CHAT, 10 + FALLBACK),
        ({"messages": [{"role": "user", "content": "abcde"}]}, CHAT, 2 + FALLBACK),
        ({"messages": [{"role": "user", "content": "x" * 8}], "max_tokens": 100}, CHAT, 102),
        ({"messages": [USER], "max_completion_tokens": 7}, CHAT, 2 + 7),
        ({"input": "abcdefgh", "max_output_tokens": 30}, "/v1/responses", 2 + 30),
        ({"messages": [USER], "max_tokens": 4, "max_completion_tokens": 90}, CHAT, 2 + 4),
        ({"messages": [USER], "max_tokens": True}, CHAT, 2 + FALLBACK),
        ({"messages": [USER], "max_tokens": "50"}, CHAT, 2 + FALLBACK),
        (
            {"messages": [{"role": "user", "content": [{"type": "text", "text": "12345678"}]}]},
            CHAT,
            2 + FALLBACK,
        ),
        ({"prompt": "abcdefghijkl", "max_tokens": 1}, "/v1/completions", 3 + 1),
        ({"input": ["abcd", "efgh"]}, "/v1/embeddings", 2),
        ({"input": ""}, "/v1/embeddings", 1),
        ({"input": ["abcd"], "max_tokens": 500}, "/v1/embeddings", 1),
        ({"messages": [{"role": "user", "content": ""}], "max_tokens": 0}, CHAT, 1),
    ],
)
def test_estimate_tokens(body: dict[str, Any], url: str, tokens: int) -> None:
    assert estimate_tokens(body, url) == tokens


def test_request_tokens_count_the_filled_body() -> None:
    req = request({"messages": [{"role": "user", "content": "abcd"}]}, template=PLAIN)
    assert req.tokens == 1 + FALLBACK_COMPLETION_TOKENS
    capped = request({"messages": [{"role": "user", "content": "abcd"}]})  # max_tokens 64
    assert capped.tokens == (len("abcd") + len(SYSTEM) + 3) // 4 + 64


# --- feed ----------------------------------------------------------------------------


class Sink:
    def __init__(self) -> None:
        self.sent: list[Request] = []
        self.rejected: list[Outcome] = []

    async def send(self, req: Request) -> None:
        self.sent.append(req)

    async def reject(self, outcome: Outcome) -> None:
        self.rejected.append(outcome)


def write_lines(path: Path, lines: list[bytes]) -> list[int]:
    """Write ``lines`` (newline-terminated by the caller) and return each line's end offset."""
    path.write_bytes(b"".join(lines))
    ends, offset = [], 0
    for line in lines:
        offset += len(line)
        ends.append(offset)
    return ends


def nothing_done(line_no: int) -> bool:
    return False


LINES = [
    orjson.dumps({"messages": [USER]}) + b"\n",  # 1
    b"\n",  # 2 blank
    b"   \t\r\n",  # 3 blank
    orjson.dumps({"custom_id": "done", "messages": [USER]}) + b"\n",  # 4 done
    b"{broken\n",  # 5 bad
    orjson.dumps({"custom_id": "b6", "body": {"prompt": "six"}}) + b"\n",  # 6
    orjson.dumps({"custom_id": "late", "messages": [USER]}) + b"\n",  # 7
]


async def test_feed_skips_blank_and_done_lines(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    ends = write_lines(path, LINES)
    sink = Sink()
    lines = await feed(path, ends[-1], {4}.__contains__, TEMPLATE, sink.send, sink.reject)
    assert lines == 7
    assert [(r.line_no, r.custom_id) for r in sink.sent] == [(1, "line-1"), (6, "b6"), (7, "late")]
    assert [o.line_no for o in sink.rejected] == [5]
    assert orjson.loads(sink.rejected[0].line)["error"]["code"] == "invalid_json"


async def test_feed_and_check_jsonl_accept_a_byte_order_mark(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    ends = write_lines(path, [b'\xef\xbb\xbf{"prompt": "from a Windows editor"}\n'])
    check_jsonl(path)
    sink = Sink()
    await feed(path, ends[-1], nothing_done, TEMPLATE, sink.send, sink.reject)
    assert [r.line_no for r in sink.sent] == [1] and sink.rejected == []


async def test_feed_hands_on_parsed_requests(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    ends = write_lines(path, LINES)
    sink = Sink()
    await feed(path, ends[-1], nothing_done, TEMPLATE, sink.send, sink.reject)
    expected = [parse_line(LINES[n - 1], n, TEMPLATE) for n in (1, 4, 6, 7)]
    assert sink.sent == expected


@pytest.mark.parametrize("stop", [0, 3, 5, 6])
async def test_feed_stops_at_size(tmp_path: Path, stop: int) -> None:
    path = tmp_path / "in.jsonl"
    ends = write_lines(path, LINES)
    sink = Sink()
    size = ends[stop - 1] if stop else 0
    assert await feed(path, size, nothing_done, TEMPLATE, sink.send, sink.reject) == stop
    handed_on = [r.line_no for r in sink.sent] + [o.line_no for o in sink.rejected]
    assert sorted(handed_on) == [n for n in (1, 4, 5, 6, 7) if n <= stop]


async def test_feed_reads_a_last_line_without_newline(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    ends = write_lines(path, [b'{"prompt": "a"}\n', b'{"custom_id": "z", "prompt": "b"}'])
    sink = Sink()
    assert await feed(path, ends[-1], nothing_done, TEMPLATE, sink.send, sink.reject) == 2
    assert [r.custom_id for r in sink.sent] == ["line-1", "z"]
    assert sink.rejected == []


async def test_feed_ignores_bytes_appended_after_size(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    ends = write_lines(path, LINES[:2])
    with path.open("ab") as f:
        f.write(b'{"prompt": "appended later"}\n')
    sink = Sink()
    assert await feed(path, ends[-1], nothing_done, TEMPLATE, sink.send, sink.reject) == 2
    assert [r.line_no for r in sink.sent] == [1]


async def test_feed_skips_a_long_done_prefix(tmp_path: Path) -> None:
    path = tmp_path / "in.jsonl"
    line = b'{"prompt": "p"}\n'
    write_lines(path, [line] * 2050)
    sink = Sink()
    lines = await feed(
        path, len(line) * 2050, lambda n: n <= 2048, TEMPLATE, sink.send, sink.reject
    )
    assert lines == 2050
    assert [r.line_no for r in sink.sent] == [2049, 2050]


@pytest.mark.parametrize("done_prefix", [1, 3, 4])
async def test_feed_steps_over_a_done_prefix_as_if_it_read_it(
    tmp_path: Path, done_prefix: int
) -> None:
    path = tmp_path / "in.jsonl"
    ends = write_lines(path, LINES)
    sink = Sink()
    lines = await feed(
        path,
        ends[-1],
        lambda n: n <= done_prefix,
        TEMPLATE,
        sink.send,
        sink.reject,
        done_prefix=done_prefix,
    )
    assert lines == 7
    handed_on = [r.line_no for r in sink.sent] + [o.line_no for o in sink.rejected]
    assert sorted(handed_on) == [n for n in (1, 4, 5, 6, 7) if n > done_prefix]


@given(
    data=st.lists(st.sampled_from([b"\n", b"{}", b"ab", b" "]), max_size=40).map(b"".join),
    count=st.integers(0, 50),
    size_cut=st.integers(0, 10),
    block_size=st.integers(1, 8),
)
def test_skip_lines_stops_after_the_last_whole_line_it_may_skip(
    data: bytes, count: int, size_cut: int, block_size: int
) -> None:
    size = max(0, len(data) - size_cut)
    line_ends = [i + 1 for i, byte in enumerate(data[:size]) if byte == ord("\n")][:count]
    f = io.BytesIO(data)
    skipped, offset = _skip_lines(f, count, size, block_size)
    assert (skipped, offset) == (len(line_ends), line_ends[-1] if line_ends else 0)
    assert f.tell() == offset


# --- properties ----------------------------------------------------------------------

json_scalars = (
    st.none()
    | st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**64 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | st.text()
)
json_values = st.recursive(
    json_scalars,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner, max_size=4),
    max_leaves=12,
)
messages = st.lists(
    st.fixed_dictionaries(
        {
            "role": st.sampled_from(["system", "developer", "user", "assistant"]),
            "content": st.text(),
        }
    )
    | json_values,
    min_size=1,
    max_size=4,
)
bodies = st.builds(
    lambda extra, msgs: {**extra, "messages": msgs},
    st.dictionaries(st.text(), json_values, max_size=5),
    messages,
)
templates = st.sampled_from(
    [TEMPLATE, PLAIN, RequestTemplate(CHAT, "m", "", {"n": 2, "model": "ignored-by-model"})]
)


def filled(body: dict[str, Any], template: RequestTemplate) -> dict[str, Any]:
    """What DESIGN.md says the job adds to a chat body on its own endpoint."""
    expected = dict(body)
    has_system = any(
        isinstance(m, dict) and m.get("role") in ("system", "developer") for m in body["messages"]
    )
    if template.system and not has_system:
        expected["messages"] = [{"role": "system", "content": template.system}, *body["messages"]]
    if template.model:
        expected.setdefault("model", template.model)
    for key, value in template.defaults.items():
        expected.setdefault(key, value)
    return expected


FAST = settings(max_examples=100, deadline=None, suppress_health_check=[HealthCheck.too_slow])


@FAST
@given(body=bodies, custom_id=st.text(), template=templates, with_url=st.booleans())
@example(body={"messages": [USER], "model": None}, custom_id="", template=TEMPLATE, with_url=True)
def test_batch_line_round_trip(
    body: dict[str, Any], custom_id: str, template: RequestTemplate, with_url: bool
) -> None:
    line: dict[str, Any] = {"custom_id": custom_id, "body": body}
    if with_url:
        line |= {"method": "POST", "url": CHAT}
    req = request(orjson.dumps(line), line_no=5, template=template)
    assert req.custom_id == custom_id
    assert req.url == CHAT
    assert sent(req) == filled(body, template)
    assert req.tokens == estimate_tokens(sent(req), CHAT)


@FAST
@given(body=bodies, custom_id=st.one_of(st.none(), st.text()), template=templates)
def test_bare_body_round_trip(
    body: dict[str, Any], custom_id: str | None, template: RequestTemplate
) -> None:
    body.pop("custom_id", None)
    line = body if custom_id is None else {**body, "custom_id": custom_id}
    req = request(orjson.dumps(line), line_no=9, template=template)
    assert req.custom_id == ("line-9" if custom_id is None else custom_id)
    assert sent(req) == filled(body, template)


line_keys = st.sampled_from(
    ["custom_id", "method", "url", "body", "messages", "prompt", "input", "model"]
)
line_values = json_values | st.sampled_from(
    [*ENDPOINTS, "/chat/completions", "POST", "GET", {"messages": [USER]}, {"input": "x"}]
)
any_line = (
    st.binary(max_size=200)
    | st.builds(orjson.dumps, json_values)
    | st.builds(orjson.dumps, st.dictionaries(line_keys, line_values, max_size=5))
    | st.builds(
        lambda obj, cut: orjson.dumps(obj)[:cut],
        st.dictionaries(line_keys, line_values, max_size=5),
        st.integers(0, 100),
    )
)


@settings(max_examples=200, deadline=None)
@given(raw=any_line, line_no=st.integers(1, 2**31))
@example(raw=b"", line_no=1)
@example(raw=b"\xef\xbb\xbf{}", line_no=1)
@example(raw=b'{"messages": [1], "max_tokens": 18446744073709551615}', line_no=1)
def test_any_bytes_give_a_request_or_an_error_outcome(raw: bytes, line_no: int) -> None:
    parsed = parse_line(raw, line_no, TEMPLATE)
    if isinstance(parsed, Request):
        assert parsed.url in ENDPOINTS
        assert isinstance(orjson.loads(parsed.body), dict)
        assert parsed.tokens >= 1
    else:
        assert isinstance(parsed, Outcome)
        assert not parsed.ok
        out = orjson.loads(parsed.line)
        assert out["batchq"]["line"] == line_no
        assert out["error"]["code"] in ("invalid_json", "invalid_request")
