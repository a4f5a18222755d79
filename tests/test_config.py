"""`batchq.config`: validation with useful messages, where settings come from, and job.toml
written and read back exactly (a property over arbitrary `defaults` tables)."""

from __future__ import annotations

import math
import tomllib
from pathlib import Path
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from batchq.config import ENDPOINTS, OPENAI_BASE_URL, Settings, build_settings
from batchq.errors import ConfigError
from batchq.job.settings import read_job_toml, write_job_toml

# --- Settings validation -------------------------------------------------------------


@pytest.mark.parametrize(
    ("changes", "fragments"),
    [
        ({"endpoint": "/v1/chat"}, ["endpoint", '"/v1/chat"', *ENDPOINTS]),
        ({"endpoint": "chat/completions"}, ["endpoint", "/v1/chat/completions"]),
        ({"base_url": "api.openai.com/v1"}, ["base_url", '"api.openai.com/v1"', "http"]),
        ({"base_url": "ftp://example.com"}, ["base_url", "http"]),
        ({"base_url": "http://"}, ["base_url"]),
        ({"base_url": ""}, ["base_url"]),
        ({"api_key_env": "MY KEY"}, ["api_key_env", "name"]),
        ({"api_key_env": "1PASSWORD"}, ["api_key_env", "name"]),
        ({"api_key_env": ""}, ["api_key_env", "name"]),
        ({"concurrency": 0}, ["concurrency", ">= 1"]),
        ({"concurrency": 10_001}, ["concurrency", "<= 10000"]),
        ({"concurrency": True}, ["concurrency", "number"]),
        ({"rpm": -1.0}, ["rpm", ">= 0"]),
        ({"tpm": -0.5}, ["tpm", ">= 0"]),
        ({"rpm": "60"}, ["rpm", "number", '"60"']),
        ({"model": 5}, ["model in job.toml must be a string, not 5"]),
        ({"model": ["gpt"]}, ['model in job.toml must be a string, not ["gpt"]']),
        ({"system": {"a": 1}}, ["system in job.toml must be a string"]),
        ({"errors": 3}, ["errors in job.toml must be a string, not 3"]),
        ({"base_url": b"http://x"}, ["base_url in job.toml must be a string"]),
        ({"max_wait": -1.0}, ["max_wait", ">= 0"]),
        ({"max_wait": float("nan")}, ["max_wait", "not nan"]),
        ({"max_response_bytes": 0}, ["max_response_bytes", ">= 1"]),
        ({"max_response_bytes": 1.5}, ["max_response_bytes", "whole number, not 1.5"]),
        ({"max_attempts": 0}, ["max_attempts", ">= 1"]),
        ({"timeout": 0.0}, ["timeout", "> 0"]),
        ({"connect_timeout": -1.0}, ["connect_timeout", "> 0"]),
        ({"drain_timeout": -0.1}, ["drain_timeout", ">= 0"]),
        ({"max_invalid": -1}, ["max_invalid", ">= 0"]),
        ({"max_invalid": 1.5}, ["max_invalid", "whole number"]),
        ({"json_mode": "yes"}, ["json_mode must be true or false"]),
        ({"reask": 1}, ["reask must be true or false"]),
        ({"json_schema": 3}, ["json_schema in job.toml must be a string"]),
        ({"json_mode": True, "endpoint": "/v1/embeddings"}, ["embeddings have none"]),
    ],
)
def test_bad_settings_raise_config_error(changes: dict[str, Any], fragments: list[str]) -> None:
    with pytest.raises(ConfigError) as info:
        Settings(input="in.jsonl", **changes)
    message = str(info.value)
    for fragment in fragments:
        assert fragment in message
    assert isinstance(info.value, ValueError)
    assert info.value.exit_code == 2


@pytest.mark.parametrize(
    "key",
    [
        "sk-proj-4ZsWqQ3bJ9xLmN2pR7tY1uV8cK5dF0gH",
        "sk-ant-api03-abcdefABCDEF0123456789",
        "Bearer abc",
    ],
)
def test_a_key_given_as_api_key_env_is_refused(key: str) -> None:
    with pytest.raises(ConfigError, match="environment variable"):
        Settings(input="in.jsonl", api_key_env=key)


def test_the_refusal_does_not_repeat_the_key() -> None:
    key = "sk-proj-4ZsWqQ3bJ9xLmN2pR7tY1uV8cK5dF0gH"
    with pytest.raises(ConfigError) as info:
        Settings(input="in.jsonl", api_key_env=key)
    assert key not in str(info.value)
    assert key[8:] not in str(info.value)


@pytest.mark.parametrize(
    "key",
    [
        "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",  # Groq's key format
        "hf_AbCdEfGhIjKlMnOpQrStUvWxYz0123456789",  # a Hugging Face token
    ],
)
def test_keys_that_look_like_identifiers_are_refused_too(key: str) -> None:
    with pytest.raises(ConfigError):
        Settings(input="in.jsonl", api_key_env=key)


@pytest.mark.parametrize(
    "changes",
    [{"concurrency": 2.5}, {"max_attempts": 3.5}],
)
def test_counts_must_be_whole_numbers(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        Settings(input="in.jsonl", **changes)


@pytest.mark.parametrize("name", ["rpm", "tpm", "timeout"])
def test_nan_is_refused(name: str) -> None:
    with pytest.raises(ConfigError, match=name):
        nan: dict[str, Any] = {name: math.nan}
        Settings(input="in.jsonl", **nan)


@pytest.mark.parametrize(
    "changes",
    [
        {},
        {"base_url": "http://localhost:8000/v1"},
        {"base_url": "https://dashscope.aliyuncs.com/compatible-mode/v1"},
        {"api_key_env": "DASHSCOPE_API_KEY"},
        {"api_key_env": "_KEY2"},
        {"rpm": 0.0, "tpm": 0.0},
        {"drain_timeout": 0.0},
        {"concurrency": 1, "max_attempts": 1},
        {"concurrency": 10_000, "max_attempts": 1_000},
        *({"endpoint": endpoint} for endpoint in ENDPOINTS),
    ],
)
def test_good_settings_are_accepted(changes: dict[str, Any]) -> None:
    settings_ = Settings(input="in.jsonl", **changes)
    for name, value in changes.items():
        assert getattr(settings_, name) == value


def test_defaults() -> None:
    s = Settings(input="in.jsonl")
    assert (s.base_url, s.api_key_env, s.endpoint) == (
        OPENAI_BASE_URL,
        "OPENAI_API_KEY",
        "/v1/chat/completions",
    )
    assert (s.output, s.errors, s.model, s.system, s.defaults) == (
        "results.jsonl",
        "errors.jsonl",
        None,
        None,
        {},
    )
    assert s.request_key == {
        **{"endpoint": s.endpoint, "model": None, "system": None, "defaults": {}},
        **{"json_schema": None, "json_mode": False},  # what is asked of the answers, too
    }
    assert (s.max_invalid, s.reask) == (2, False)


# --- build_settings ------------------------------------------------------------------

BASE = {"input": "in.jsonl", "model": "toml-model", "rpm": 60, "defaults": {"max_tokens": 9}}


def test_command_line_wins_and_none_means_not_given() -> None:
    s = build_settings(BASE, {"model": "cli-model", "rpm": None, "concurrency": 8, "tpm": None})
    assert s.model == "cli-model"
    assert s.rpm == 60.0
    assert s.tpm == 0.0
    assert s.concurrency == 8
    assert s.defaults == {"max_tokens": 9}


def test_a_none_override_does_not_clear_a_toml_value() -> None:
    assert build_settings(BASE, {"model": None, "defaults": None}) == build_settings(BASE, {})


def test_integers_in_toml_become_floats_where_seconds_or_rates() -> None:
    s = build_settings({"input": "x", "rpm": 60, "tpm": 1000, "timeout": 30}, {})
    assert (type(s.rpm), type(s.tpm), type(s.timeout)) == (float, float, float)
    assert (s.rpm, s.tpm, s.timeout) == (60.0, 1000.0, 30.0)


@pytest.mark.parametrize(
    ("base", "overrides"),
    [
        ({"input": "x", "rpn": 10}, {}),
        ({"input": "x"}, {"api_key": "sk-secret"}),
        ({"input": "x", "zeta": 1, "alpha": 2}, {}),
    ],
)
def test_unknown_settings_are_refused(base: dict[str, Any], overrides: dict[str, Any]) -> None:
    unknown = sorted((set(base) | set(overrides)) - {"input"})
    with pytest.raises(ConfigError, match="unknown setting") as info:
        build_settings(base, overrides)
    assert ", ".join(unknown) in str(info.value)


def test_input_is_required() -> None:
    with pytest.raises(ConfigError, match="'input'"):
        build_settings({"model": "m"}, {})


def test_defaults_must_be_a_table() -> None:
    with pytest.raises(ConfigError, match="defaults"):
        build_settings({"input": "x", "defaults": 5}, {})


@pytest.mark.parametrize(
    "base",
    [
        {"input": "x", "base_url": 5},
        {"input": "x", "api_key_env": ["A"]},
        {"input": "x", "endpoint": ["/v1/embeddings"]},
    ],
)
def test_wrong_types_in_toml_are_config_errors(base: dict[str, Any]) -> None:
    with pytest.raises(ConfigError):
        build_settings(base, {})


# --- job.toml ------------------------------------------------------------------------


def round_trip(tmp_path: Path, s: Settings) -> dict[str, Any]:
    path = tmp_path / "job.toml"
    write_job_toml(path, s)
    assert [p.name for p in tmp_path.iterdir()] == ["job.toml"]  # no temporary file left
    return read_job_toml(path)


def test_job_toml_round_trip(tmp_path: Path) -> None:
    s = Settings(
        input="../data/in put.jsonl",
        base_url="http://localhost:8000/v1",
        api_key_env="LOCAL_KEY",
        endpoint="/v1/responses",
        model="qwen-plus",
        system='Answer in "one" line.\nNo \\ backslashes, no tabs\t, 日本語 ok.',
        defaults={"max_tokens": 64, "temperature": 0.0, "stop": ["\n\n"], "meta": {"a b": 1}},
        concurrency=3,
        rpm=120.5,
        tpm=1e6,
        max_attempts=2,
        timeout=12.5,
        drain_timeout=0.0,
    )
    stored = round_trip(tmp_path, s)
    assert build_settings(stored, {}) == s


def test_unset_values_are_left_out(tmp_path: Path) -> None:
    stored = round_trip(tmp_path, Settings(input="in.jsonl"))
    assert "model" not in stored and "system" not in stored
    assert stored["defaults"] == {}
    assert build_settings(stored, {}) == Settings(input="in.jsonl")


def test_job_toml_holds_the_variable_name_only(tmp_path: Path) -> None:
    write_job_toml(tmp_path / "job.toml", Settings(input="x", api_key_env="MY_KEY"))
    text = (tmp_path / "job.toml").read_text()
    assert 'api_key_env = "MY_KEY"' in text
    assert text.startswith("#")


def test_rewriting_job_toml_replaces_it(tmp_path: Path) -> None:
    path = tmp_path / "job.toml"
    write_job_toml(path, Settings(input="x", model="first"))
    write_job_toml(path, Settings(input="x", model="second"))
    assert read_job_toml(path)["model"] == "second"


def test_unreadable_job_toml(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="cannot read"):
        read_job_toml(tmp_path / "missing.toml")
    (tmp_path / "job.toml").write_text("input = 'x\nmodel = ")
    with pytest.raises(ConfigError, match="not valid TOML"):
        read_job_toml(tmp_path / "job.toml")


@pytest.mark.parametrize("changes", [{"timeout": math.inf}, {"rpm": math.inf}])
def test_non_finite_limits_are_refused(changes: dict[str, Any]) -> None:
    with pytest.raises(ConfigError, match="<="):
        Settings(input="x", **changes)


@pytest.mark.parametrize("value", [math.inf, math.nan])
def test_non_finite_defaults_are_refused_not_written(tmp_path: Path, value: float) -> None:
    with pytest.raises(ConfigError, match="not a finite number"):
        write_job_toml(tmp_path / "job.toml", Settings(input="x", defaults={"t": value}))
    assert not (tmp_path / "job.toml").exists()


@pytest.mark.parametrize("where", ["value", "key", "nested"])
def test_delete_character_round_trips(tmp_path: Path, where: str) -> None:
    cases: dict[str, dict[str, Any]] = {
        "value": {"stop": "a\x7fb"},
        "key": {"a\x7fb": 1},
        "nested": {"meta": {"list": ["\x7f"]}},
    }
    defaults = cases[where]
    assert round_trip(tmp_path, Settings(input="x", defaults=defaults))["defaults"] == defaults


toml_text = st.text(st.characters(exclude_categories=["Cs"]))
toml_values = st.recursive(
    st.booleans()
    | st.integers(min_value=-(2**63), max_value=2**63 - 1)
    | st.floats(allow_nan=False, allow_infinity=False)
    | toml_text,
    lambda inner: st.lists(inner, max_size=4) | st.dictionaries(toml_text, inner, max_size=4),
    max_leaves=15,
)


@settings(max_examples=150, deadline=None)
@given(defaults=st.dictionaries(toml_text, toml_values, max_size=6))
@example(defaults={"": "", "a.b": {"c d": []}, "x": {}, "[defaults]": "[x]"})
@example(defaults={"stop": ["\n", "\t", "\r", '"', "\\", "\x00", "\x1f", "\u2028"]})
@example(
    defaults={"big": 2**63 - 1, "small": -(2**63), "tiny": 5e-324, "huge": 1.7976931348623157e308}
)
@example(defaults={"mixed": [1, "a", [True], {"k": 0.5}], "neg_zero": -0.0})
def test_defaults_round_trip_through_job_toml(
    tmp_path_factory: pytest.TempPathFactory, defaults: dict[str, Any]
) -> None:
    path = tmp_path_factory.mktemp("toml") / "job.toml"
    s = Settings(input="in.jsonl", model="m", system="s", defaults=defaults)
    write_job_toml(path, s)
    with path.open("rb") as f:
        stored = tomllib.load(f)
    assert stored["defaults"] == defaults
    assert build_settings(stored, {}) == s
