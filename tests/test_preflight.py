"""``batchq validate --check-endpoint``: the lines it lists are exactly those that then fail live.

The built-in endpoint plays vLLM (``--max-model-len``, ``/tokenize``, ``--served-model``);
a small server in the test plays llama.cpp (``owned_by: llamacpp``, ``/props``,
``/apply-template``, ``/tokenize`` with ``content``); a real ``llama-server`` is used
when one is installed. No test calls a completion during the pre-flight: the endpoint's
own counters say so.
"""

from __future__ import annotations

import asyncio
import os
import random
import shutil
import socket
import subprocess
import time
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from conftest import MockFactory
from hostile import HostileServer
from support import batchq, chat, clean_env, outputs, read_jsonl, write_jsonl

from batchq.show.preflight import LLAMA_CPP, VLLM, EndpointFacts, judge

Hostile = Callable[..., HostileServer]
KEY = "sk-proj-" + "Z9y8X7w6" * 6


def _validate(input_path: Path, url: str, *args: str, env: dict[str, str] | None = None) -> Any:
    return batchq(
        "validate", input_path, "--base-url", url, "--check-endpoint", *args,
        cwd=input_path.parent, env=env,
    )  # fmt: skip


def _figures(done: subprocess.CompletedProcess[str]) -> dict[str, Any]:
    figures: dict[str, Any] = orjson.loads(done.stdout)
    return figures


def _listed(figures: dict[str, Any]) -> set[str]:
    return {entry["custom_id"] for entry in figures["endpoint"]["would_fail_lines"]}


# --- The judgement, by the servers' own rules ---------------------------------------------


def test_vllm_refuses_prompt_plus_max_tokens_past_the_context_or_a_prompt_that_fills_it() -> None:
    facts = EndpointFacts(url="u", server=VLLM, context={"m": 100})
    body: dict[str, Any] = {"model": "m", "max_tokens": 10}
    assert judge(facts, "/v1/chat/completions", body, 90) == []
    [problem] = judge(facts, "/v1/chat/completions", body, 91)
    assert problem.code == "context_length_exceeded"
    assert "91 + max_tokens 10 = 101 tokens > context 100" in problem.message
    uncapped = {"model": "m"}  # vLLM then generates to the context's end
    assert judge(facts, "/v1/chat/completions", uncapped, 99) == []
    assert judge(facts, "/v1/chat/completions", uncapped, 100)[0].code == "context_length_exceeded"
    assert judge(facts, "/v1/embeddings", uncapped, 100) == []  # nothing generated
    assert judge(facts, "/v1/embeddings", uncapped, 101) != []


def test_llama_cpp_refuses_only_a_prompt_that_fills_its_context_whatever_the_model_name() -> None:
    facts = EndpointFacts(url="u", server=LLAMA_CPP, context={"": 100})
    long_answer = {"model": "any-name", "max_tokens": 500}  # cut short, not refused
    assert judge(facts, "/v1/chat/completions", long_answer, 99) == []
    assert judge(facts, "/v1/chat/completions", long_answer, 100) != []


def test_a_path_not_served_is_the_one_reason_given_and_an_unknown_model_is_named() -> None:
    facts = EndpointFacts(
        url="u", server=VLLM, models=frozenset({"m"}), context={"": 10},
        unserved={"/v1/responses": 404},
    )  # fmt: skip
    [problem] = judge(facts, "/v1/responses", {"model": "x"}, 1_000)
    assert problem.code == "endpoint_not_served" and "404" in problem.message
    both = judge(facts, "/v1/chat/completions", {"model": "x", "max_tokens": 5}, 6)
    assert [p.code for p in both] == ["model_not_found", "context_length_exceeded"]
    assert judge(facts, "/v1/chat/completions", {"model": "m", "max_tokens": 5}, 5) == []


def _strict(schema: dict[str, Any]) -> dict[str, Any]:
    json_schema = {"name": "label", "strict": True, "schema": schema}
    return {"model": "m", "response_format": {"type": "json_schema", "json_schema": json_schema}}


def test_openai_strict_schemas_outside_its_subset_are_refused_and_others_not_judged() -> None:
    openai = EndpointFacts(url="u", server="OpenAI-compatible", strict_schemas=True)
    closed = {
        "type": "object",
        "properties": {"label": {"type": "string"}, "tags": {"type": "array", "items": {
            "type": "object", "properties": {"t": {"type": "string"}},
            "required": ["t"], "additionalProperties": False}}},
        "required": ["label", "tags"],
        "additionalProperties": False,
    }  # fmt: skip
    assert judge(openai, "/v1/chat/completions", _strict(closed), 10) == []
    open_item = orjson.loads(orjson.dumps(closed))
    del open_item["properties"]["tags"]["items"]["additionalProperties"]
    [problem] = judge(openai, "/v1/chat/completions", _strict(open_item), 10)
    assert problem.code == "schema_not_supported"
    assert "$.tags[] needs additionalProperties: false" in problem.message
    optional = {**closed, "required": ["label"]}
    [problem] = judge(openai, "/v1/chat/completions", _strict(optional), 10)
    assert "(missing: tags)" in problem.message
    array = {"type": "json_schema", "name": "n", "strict": True, "schema": {"type": "array"}}
    responses = {"model": "m", "input": "x", "text": {"format": array}}
    assert "root must be an object" in judge(openai, "/v1/responses", responses, 1)[0].message
    loose = _strict(optional)
    loose["response_format"]["json_schema"]["strict"] = False  # best effort: any schema goes
    assert judge(openai, "/v1/chat/completions", loose, 10) == []
    vllm = EndpointFacts(url="u", server=VLLM)  # guided decoding takes these: not judged
    assert judge(vllm, "/v1/chat/completions", _strict(optional), 10) == []


# --- The built-in endpoint as vLLM --------------------------------------------------------


async def test_the_mocks_tokenize_counts_what_its_completions_report_as_prompt_tokens(
    mock_server: MockFactory,
) -> None:
    import aiohttp

    server = mock_server(max_model_len=50)
    root = server.url.removesuffix("/v1")
    messages = [{"role": "system", "content": "be brief"}, {"role": "user", "content": "hi " * 9}]
    async with aiohttp.ClientSession() as session:
        for path, key, prompt in [
            ("/v1/chat/completions", "messages", messages),
            ("/v1/completions", "prompt", "some text " * 7),
        ]:
            async with session.post(root + "/tokenize", json={key: prompt}) as resp:
                counted = await resp.json()
            body = {"model": "m", key: prompt, "max_tokens": 5}
            async with session.post(server.url + path.removeprefix("/v1"), json=body) as resp:
                usage = (await resp.json())["usage"]
            assert counted["count"] == usage["prompt_tokens"] == len(counted["tokens"])
            assert counted["max_model_len"] == 50
        async with session.get(server.url + "/models") as resp:
            assert {m["max_model_len"] for m in (await resp.json())["data"]} == {50}


# --- End to end: listed before, failed live -------------------------------------------------


def _mixed_lines(n: int) -> list[dict[str, Any]]:
    """Chat lines around a context of 64 tokens, some over, plus the other ways to fail."""
    rng = random.Random(7)
    lines: list[dict[str, Any]] = []
    for i in range(n):
        line = chat("x" * rng.randrange(150, 240), f"r{i}")
        if rng.random() < 0.7:
            line["max_tokens"] = rng.randrange(1, 12)
        lines.append(line)
    # Two messages of 108 characters: estimated 54 tokens (characters / 4); the endpoint,
    # joining the turns, counts 55. Only its tokenizer sees that 55 + 10 passes 64.
    turns = [{"role": "system", "content": "s" * 108}, {"role": "user", "content": "u" * 108}]
    lines.append({"custom_id": "exact-over", "messages": turns, "max_tokens": 10})
    lines.append({"custom_id": "exact-fits", "messages": turns, "max_tokens": 9})
    lines.append(chat("hello", "unknown-model", model="gpt-5"))
    embed = {"model": "gpt-4o-mini", "input": "e" * 300}  # 75 tokens: past 64
    lines.append({"custom_id": "embed-over", "url": "/v1/embeddings", "body": embed})
    small = {**embed, "input": "e"}
    lines.append({"custom_id": "embed-fits", "url": "/v1/embeddings", "body": small})
    return lines


def test_the_lines_listed_are_exactly_those_that_then_fail_live(
    mock_server: MockFactory, tmp_path: Path
) -> None:
    server = mock_server(max_model_len=64, models=("gpt-4o-mini",))
    lines = _mixed_lines(600)  # more than one chunk of tokenizer calls
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    done = _validate(source, server.url, "--model", "gpt-4o-mini", "--json",
                     "--split-out", "fail.jsonl")  # fmt: skip
    assert done.returncode == 1, done.stderr
    figures = _figures(done)
    endpoint = figures["endpoint"]
    assert endpoint["server"] == "vLLM" and endpoint["context"] == {"gpt-4o-mini": 64}
    assert endpoint["prompt_tokens_counted_by_endpoint"] == endpoint["checked"] == len(lines)
    stats = server.stats()
    assert stats["prompt_tokens"] == stats["completion_tokens"] == 0  # no completion computed
    listed = _listed(figures)
    assert {"exact-over", "unknown-model", "embed-over"} <= listed
    assert not {"exact-fits", "embed-fits"} & listed
    assert endpoint["would_fail"] == len(listed)  # under the listing limit: every one listed
    split = read_jsonl(tmp_path / "fail.jsonl")
    assert [line["custom_id"] for line in split] == [
        line["custom_id"] for line in lines if line["custom_id"] in listed
    ]  # in input order, as written

    run = batchq("run", source, "--model", "gpt-4o-mini", "--base-url", server.url,
                 "--quiet", cwd=tmp_path)  # fmt: skip
    assert run.returncode == 1, run.stderr
    results, errors = outputs(tmp_path / "jobs" / "in")
    assert {e["custom_id"] for e in errors} == listed
    assert len(results) == len(lines) - len(listed)
    assert {e["response"]["status_code"] for e in errors} == {400, 404}


def test_a_clean_file_passes_with_exit_0_and_a_bare_lines_id_is_kept_in_the_split_file(
    mock_server: MockFactory, tmp_path: Path
) -> None:
    server = mock_server(max_model_len=64)
    source = write_jsonl(tmp_path / "in.jsonl", [chat("fine"), chat("y" * 400)])
    done = _validate(source, server.url, "--model", "mock", "--split-out", "fail.jsonl")
    assert done.returncode == 1
    assert 'line 2 ("line-2"): prompt 100 tokens fills the context of 64' in done.stdout
    assert [line["custom_id"] for line in read_jsonl(tmp_path / "fail.jsonl")] == ["line-2"]
    write_jsonl(source, [chat("fine")])
    done = _validate(source, server.url, "--model", "mock")
    assert done.returncode == 0, done.stdout + done.stderr
    assert "would fail at the endpoint: none" in done.stdout
    # a credential in the query stays at the end of every URL asked (was: /v1?api-key=.../models)
    done = _validate(source, server.url + "?api-key=query-secret-0123", "--model", "mock")
    assert done.returncode == 0, done.stdout + done.stderr


# --- llama.cpp's shape ------------------------------------------------------------------


def _llama_cpp(n_ctx: int) -> Callable[[web.Request, bytes], Any]:
    """llama.cpp's server as far as the pre-flight asks it: a token per character + BOS."""

    async def handler(request: web.Request, body: bytes) -> web.StreamResponse:
        asked = orjson.loads(body) if body else {}
        path = request.path
        if path == "/v1/models":
            model = {"id": "local.gguf", "object": "model", "owned_by": "llamacpp"}
            return web.json_response({"object": "list", "data": [model]})
        if path == "/props":
            return web.json_response({"default_generation_settings": {"n_ctx": n_ctx}})
        if path == "/apply-template":
            turns = "".join(f"<|{m['role']}|>{m['content']}" for m in asked["messages"])
            return web.json_response({"prompt": turns + "<|assistant|>"})
        if path == "/tokenize":
            return web.json_response({"tokens": [1] + [ord(c) for c in asked["content"]]})
        if path == "/v1/embeddings":
            message = "This server does not support embeddings. Start it with `--embeddings`"
            return web.json_response({"error": {"code": 501, "message": message}}, status=501)
        if path == "/v1/chat/completions" and not asked.get("messages"):
            return web.json_response({"error": {"message": "'messages' is required"}}, status=400)
        return web.json_response({"error": {"message": "File Not Found"}}, status=404)

    return handler


def test_llama_cpp_counts_templated_chat_and_refuses_only_what_fills_its_context(
    hostile: Hostile, tmp_path: Path
) -> None:
    server = hostile(_llama_cpp(n_ctx=40))
    template = len("<|user|>") + len("<|assistant|>")  # 21 characters, plus BOS: 22 tokens
    lines = [
        chat("a" * 17, "fits", max_tokens=500),  # 39 tokens: llama.cpp cuts the answer short
        chat("a" * 18, "fills"),  # 40 tokens: the whole context
        {"custom_id": "embed", "url": "/v1/embeddings", "body": {"input": "e", "model": "x"}},
    ]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    done = _validate(source, server.url, "--model", "whatever-name", "--json")
    assert done.returncode == 1, done.stderr
    endpoint = _figures(done)["endpoint"]
    assert endpoint["server"] == "llama.cpp" and endpoint["context"] == {"": 40}
    assert endpoint["not_served"] == {"/v1/embeddings": 501}
    assert endpoint["prompt_tokens"] == (1 + template + 17) + (1 + template + 18) + 1
    assert _listed(_figures(done)) == {"fills", "embed"}
    completions = [s for s in server.seen if s.path == "/v1/chat/completions"]
    assert [s.body for s in completions] == [b"{}"]  # the probe: nothing to generate from


def test_a_404_about_the_missing_model_does_not_make_a_path_unserved(
    hostile: Hostile, tmp_path: Path
) -> None:
    async def ollama(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": "llama3"}]})
        if request.path == "/v1/chat/completions":  # Ollama's answer to an empty body
            return web.json_response({"error": {"message": 'model "" not found'}}, status=404)
        return web.json_response({"error": {"message": "404 page not found"}}, status=404)

    server = hostile(ollama)
    responses = {"model": "llama3", "input": "hi"}
    lines = [chat("hi", "chat"), {"custom_id": "resp", "url": "/v1/responses", "body": responses}]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    done = _validate(source, server.url, "--model", "llama3", "--json")
    endpoint = _figures(done)["endpoint"]
    assert endpoint["not_served"] == {"/v1/responses": 404}
    assert _listed(_figures(done)) == {"resp"}
    assert endpoint["prompt_tokens_counted_by_endpoint"] == 0  # no tokenizer: estimated


def test_a_job_folder_is_checked_against_its_own_endpoint_and_key_variable(
    mock_server: MockFactory, tmp_path: Path
) -> None:
    server = mock_server(api_key=KEY, max_model_len=64)
    source = write_jsonl(tmp_path / "in.jsonl", [chat("hi", "ok")])
    env = clean_env(MY_KEY=KEY)
    run = batchq("run", source, "--model", "mock", "--base-url", server.url,
                 "--api-key-env", "MY_KEY", "--quiet", cwd=tmp_path, env=env)  # fmt: skip
    assert run.returncode == 0, run.stderr
    write_jsonl(source, [chat("hi", "ok"), chat("z" * 300, "long")])  # appended: a new line
    done = batchq("validate", tmp_path / "jobs" / "in", "--check-endpoint", "--json",
                  cwd=tmp_path, env=env)  # fmt: skip
    assert done.returncode == 1, done.stderr
    figures = _figures(done)
    assert _listed(figures) == {"long"}
    assert figures["prompt_tokens_counted_by_endpoint"] == 2


def test_a_job_folder_s_json_schema_is_in_the_requests_checked(
    mock_server: MockFactory, tmp_path: Path
) -> None:
    """answers.py adds the schema at send time: validate must judge the bodies run sends."""
    server = mock_server()
    source = write_jsonl(tmp_path / "in.jsonl", [chat("hi", "a"), chat("ho", "b")])
    schema = {"type": "object", "properties": {"label": {"type": "string"}}}
    (tmp_path / "label.json").write_bytes(orjson.dumps(schema))
    run = batchq("run", source, "--model", "mock", "--base-url", server.url,
                 "--json-schema", "label.json", "--quiet", cwd=tmp_path)  # fmt: skip
    assert run.returncode == 0, run.stderr
    job = tmp_path / "jobs" / "in"
    done = batchq("validate", job, "--check-endpoint", "--json", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    assert _figures(done)["endpoint"]["schemas_not_checked"] == 2  # 0 before: not seen
    (tmp_path / "label.json").write_text("{not json")  # as run would, validate refuses it
    done = batchq("validate", job, cwd=tmp_path)
    assert done.returncode == 2, done.stderr
    assert "label.json is not JSON" in done.stderr and "Traceback" not in done.stderr


def test_a_user_and_password_in_the_url_beside_a_key_is_one_line_exit_2(
    mock_server: MockFactory, tmp_path: Path
) -> None:
    """aiohttp refuses a Bearer header beside a URL's credentials: that was exit 70."""
    server = mock_server()
    source = write_jsonl(tmp_path / "in.jsonl", [chat("hi", "a")])
    url = server.url.replace("http://", "http://user:hunter2@")
    env = clean_env(OPENAI_API_KEY=KEY)
    for command in (["validate", source, "--check-endpoint"], ["run", source, "--quiet"]):
        done = batchq(*command, "--model", "mock", "--base-url", url, cwd=tmp_path, env=env)
        assert done.returncode == 2, done.stderr
        assert "user and password" in done.stderr and "Traceback" not in done.stderr
        assert KEY not in done.stderr and "hunter2" not in done.stderr
    assert server.stats()["requests"] == 0


def test_tokenizer_calls_overlap_but_at_most_16_at_once(hostile: Hostile, tmp_path: Path) -> None:
    inside, most = 0, 0

    async def vllm(request: web.Request, body: bytes) -> web.StreamResponse:
        nonlocal inside, most
        if request.path == "/v1/models":
            model = {"id": "m", "object": "model", "max_model_len": 1000}
            return web.json_response({"object": "list", "data": [model]})
        if request.path != "/tokenize":
            return web.json_response({"error": {"message": "bad request"}}, status=400)
        inside += 1
        most = max(most, inside)
        await asyncio.sleep(0.005)  # a tokenizer's time, so that calls can overlap
        inside -= 1
        return web.json_response({"count": 7, "max_model_len": 1000, "tokens": [1] * 7})

    source = write_jsonl(tmp_path / "in.jsonl", [chat(f"line {i}") for i in range(300)])
    done = _validate(source, hostile(vllm).url, "--model", "m", "--json")
    assert done.returncode == 0, done.stderr
    assert _figures(done)["endpoint"]["prompt_tokens_counted_by_endpoint"] == 300
    assert 2 <= most <= 16


def test_a_context_length_of_true_is_no_context_length(hostile: Hostile, tmp_path: Path) -> None:
    """JSON's ``true`` is an int to Python: taken as a length of 1, every line was listed."""

    async def odd_vllm(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.path == "/v1/models":
            model = {"id": "m", "object": "model", "max_model_len": True}
            return web.json_response({"object": "list", "data": [model]})
        if request.path == "/tokenize":
            return web.json_response({"count": 7, "max_model_len": True, "tokens": [1] * 7})
        return web.json_response({"error": {"message": "bad request"}}, status=400)

    source = write_jsonl(tmp_path / "in.jsonl", [chat("hello", "a"), chat("world", "b")])
    done = _validate(source, hostile(odd_vllm).url, "--model", "m", "--json")
    assert done.returncode == 0, done.stderr
    endpoint = _figures(done)["endpoint"]
    assert not endpoint["context"] and _listed(_figures(done)) == set()


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        port: int = s.getsockname()[1]
        return port


@pytest.fixture
def llama_server() -> Iterator[str]:
    """A real llama.cpp server with a small context, or a loud skip."""
    binary, model = shutil.which("llama-server"), os.environ.get("BATCHQ_LLAMA_GGUF")
    if binary is None or not model:
        pytest.skip(
            "NOT RUN: the pre-flight against a real llama.cpp server needs `llama-server` "
            "on PATH and BATCHQ_LLAMA_GGUF naming a small .gguf model"
        )
    port = _free_port()
    proc = subprocess.Popen(
        [binary, "-m", model, "-c", "256", "-np", "1", "--port", str(port)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    url = f"http://127.0.0.1:{port}"
    try:
        deadline = time.monotonic() + 120
        import urllib.request

        while True:  # the model loads: /health answers 503 until then
            try:
                with urllib.request.urlopen(url + "/health", timeout=2) as resp:
                    if resp.status == 200:
                        break
            except OSError:
                pass
            assert proc.poll() is None, "llama-server exited"
            assert time.monotonic() < deadline, "llama-server did not load its model in 120 s"
            time.sleep(0.2)  # polling a starting server, not synchronising a test
        yield url + "/v1"
    finally:
        proc.terminate()
        proc.wait(timeout=30)


def test_against_a_real_llama_cpp_server_the_lines_listed_are_those_that_fail(
    llama_server: str, tmp_path: Path
) -> None:
    lines = [chat("word " * n, f"r{n}", max_tokens=4) for n in (1, 20, 100, 200, 240, 300, 600)]
    source = write_jsonl(tmp_path / "in.jsonl", lines)
    done = _validate(source, llama_server, "--model", "local", "--json")
    assert done.returncode in (0, 1), done.stderr
    figures = _figures(done)
    assert figures["endpoint"]["server"] == "llama.cpp"
    assert figures["endpoint"]["prompt_tokens_counted_by_endpoint"] == len(lines)
    run = batchq("run", source, "--model", "local", "--base-url", llama_server, "--quiet",
                 "--timeout", "120", cwd=tmp_path, timeout=600)  # fmt: skip
    _, errors = outputs(tmp_path / "jobs" / "in")
    assert {"r300", "r600"} <= _listed(figures)  # past 256 tokens whatever the tokenizer
    assert {e["custom_id"] for e in errors} == _listed(figures), run.stderr


# --- An endpoint that cannot be asked: one line, exit 3 ----------------------------------


def test_a_refused_key_is_one_line_exit_3_and_the_key_is_never_printed(
    mock_server: MockFactory, tmp_path: Path
) -> None:
    server = mock_server(api_key=KEY)
    source = write_jsonl(tmp_path / "in.jsonl", [chat("hi")])
    wrong = clean_env(OPENAI_API_KEY=KEY[:-1] + "Q")
    done = _validate(source, server.url, "--model", "mock", env=wrong)
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "401" in done.stderr and "$OPENAI_API_KEY" in done.stderr
    assert KEY[:-1] not in done.stdout + done.stderr
    right = _validate(source, server.url, "--model", "mock", env=clean_env(OPENAI_API_KEY=KEY))
    assert right.returncode == 0, right.stderr
    assert KEY not in right.stdout + right.stderr


def test_an_api_without_a_list_of_models_is_still_checked(hostile: Hostile, tmp_path: Path) -> None:
    async def bare(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.path == "/v1/chat/completions":
            return web.json_response({"error": {"message": "no messages"}}, status=400)
        return web.Response(text="404 page not found", status=404)  # as Go servers answer

    server = hostile(bare)
    source = write_jsonl(tmp_path / "in.jsonl", [chat("hi", "a"), chat("there", "b")])
    done = _validate(source, server.url, "--model", "m")
    assert done.returncode == 0, done.stderr
    assert "(OpenAI-compatible, no list of models, tokens estimated)" in done.stdout
    assert "would fail at the endpoint: none" in done.stdout


def test_a_key_refused_for_completions_though_models_are_public_is_exit_3(
    hostile: Hostile, tmp_path: Path
) -> None:
    async def gateway(request: web.Request, body: bytes) -> web.StreamResponse:
        if request.path == "/v1/models":
            return web.json_response({"object": "list", "data": [{"id": "m"}]})
        return web.json_response({"error": {"message": "Invalid API key"}}, status=401)

    source = write_jsonl(tmp_path / "in.jsonl", [chat("hi")])
    done = _validate(source, hostile(gateway).url, "--model", "m")
    assert done.returncode == 3 and done.stderr.count("\n") == 1
    assert "/v1/chat/completions answered 401: the API key was refused" in done.stderr


@pytest.mark.parametrize("status", [200, 502])
def test_a_web_page_instead_of_the_api_is_one_line_exit_3(
    hostile: Hostile, tmp_path: Path, status: int
) -> None:
    async def page(request: web.Request, body: bytes) -> web.StreamResponse:
        return web.Response(text="<html><body>Welcome</body></html>", status=status,
                            content_type="text/html")  # fmt: skip

    server = hostile(page)
    source = write_jsonl(tmp_path / "in.jsonl", [chat("hi")])
    done = _validate(source, server.url, "--model", "m", "--split-out", "fail.jsonl")
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert f"answered {status} with text/html, not JSON" in done.stderr
    assert not (tmp_path / "fail.jsonl").exists()  # nothing judged, nothing written


def test_an_unreachable_endpoint_is_one_line_exit_3(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat("hi")])
    done = _validate(source, f"http://127.0.0.1:{_free_port()}/v1", "--model", "m")
    assert done.returncode == 3
    assert done.stderr.count("\n") == 1 and "Traceback" not in done.stderr
    assert "cannot reach" in done.stderr and "Connection refused" in done.stderr


def test_split_out_without_check_endpoint_is_a_usage_error(tmp_path: Path) -> None:
    source = write_jsonl(tmp_path / "in.jsonl", [chat("hi")])
    done = batchq("validate", source, "--split-out", "x.jsonl", cwd=tmp_path)
    assert done.returncode == 2 and "--split-out goes with --check-endpoint" in done.stderr
