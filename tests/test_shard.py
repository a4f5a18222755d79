"""Shards: the cut of the input, and N real processes on one job folder.

The cut is a pure function, checked as a property for any content and any
N. The rest runs `batchq run --shard` as subprocesses against the built-in
endpoint, all started at once as a scheduler starts them, and checks the
promise where a user sees it: every input line exactly once across the
shards, and `status` and `export` of the whole job.
"""

from __future__ import annotations

import io
import itertools
import random
import re
import signal
import subprocess
import threading
from collections import Counter
from functools import partial
from pathlib import Path

import orjson
import pytest
from conftest import MockFactory
from hypothesis import example, given
from hypothesis import strategies as st
from support import batchq, batchq_cmd, chat, clean_env, wait_for, write_jsonl

import batchq as api
from batchq.errors import ConfigError
from batchq.job.folder import job_lock, open_job, prepare, read_state, save_settings, with_shard
from batchq.job.shard import Cut, Shard, boundaries, file_line_start, parse_shard, read_cut

# --- the cut -----------------------------------------------------------------------------


def _line_start(data: bytes):  # type: ignore[no-untyped-def]
    """The oracle: the first line start at or after an offset, from the bytes themselves."""

    def find(offset: int) -> int:
        starts = [0] + [i + 1 for i, b in enumerate(data) if b == 0x0A]
        return min([s for s in starts if s >= offset] + [len(data)])

    return find


def _lines(data: bytes) -> list[bytes]:
    """The lines as batchq reads them: ended by a newline, the last one maybe not."""
    return re.findall(rb"[^\n]*\n|[^\n]+\Z", data)


@given(
    data=st.lists(
        st.one_of(st.just(b"\n"), st.binary(max_size=3), st.just(b"x" * 50)), max_size=40
    ).map(b"".join),
    count=st.integers(1, 60),
)
@example(data=b"", count=3)
@example(data=b"a" * 100 + b"\nb\n", count=4)  # a line longer than several shards
@example(data=b"\n\n\n", count=10)  # more shards than lines
@example(data=b"abc", count=2)  # no newline at all
def test_every_line_is_in_exactly_one_shard(data: bytes, count: int) -> None:
    size = len(data)
    starts = boundaries(size, count, _line_start(data))
    f = io.BytesIO(data + b"appended past the size\n")
    assert starts == boundaries(size, count, file_line_start(f, size))
    assert len(starts) == count + 1 and starts[0] == 0 and starts[-1] == size
    assert starts == sorted(starts)
    for i in range(count):  # the definition: the first line start at or after i*size/N
        assert starts[i] == _line_start(data)(i * size // count)
    shards = [data[starts[i] : starts[i + 1]] for i in range(count)]
    assert b"".join(shards) == data
    per_shard = [_lines(s) for s in shards]
    assert [line for part in per_shard for line in part] == _lines(data)  # each once, in order
    for i, part in enumerate(shards[:-1]):  # never a line cut in two
        assert part == b"" or part.endswith(b"\n") or starts[i + 1] == size


@pytest.mark.parametrize(
    ("spec", "env", "expected"),
    [
        ("2/4", {}, Shard(2, 4)),
        (" 0 / 1 ", {}, Shard(0, 1)),
        ("auto", {"JOB_COMPLETION_INDEX": "3", "BATCHQ_SHARDS": "8"}, Shard(3, 8)),
        ("auto", {"SLURM_ARRAY_TASK_ID": "1", "SLURM_ARRAY_TASK_COUNT": "4"}, Shard(1, 4)),
        (
            "auto",
            {
                "SLURM_ARRAY_TASK_ID": "14",
                "SLURM_ARRAY_TASK_COUNT": "3",
                "SLURM_ARRAY_TASK_MIN": "10",
                "SLURM_ARRAY_TASK_STEP": "2",
            },
            Shard(2, 3),
        ),
    ],
)
def test_shard_specs(spec: str, env: dict[str, str], expected: Shard) -> None:
    assert parse_shard(spec, env) == expected


@pytest.mark.parametrize(
    ("spec", "env"),
    [
        ("4/4", {}),
        ("-1/4", {}),
        ("1/0", {}),
        ("half", {}),
        ("auto", {}),
        ("auto", {"JOB_COMPLETION_INDEX": "0"}),  # no count
        ("auto", {"JOB_COMPLETION_INDEX": "x", "BATCHQ_SHARDS": "2"}),
    ],
)
def test_bad_shard_specs_are_config_errors(spec: str, env: dict[str, str]) -> None:
    with pytest.raises(ConfigError):
        parse_shard(spec, env)


@pytest.mark.parametrize(
    ("spec", "env"),
    [
        ("0/99999999999999999999999", {}),
        ("0/10001", {}),
        ("auto", {"JOB_COMPLETION_INDEX": "0", "BATCHQ_SHARDS": "1000000000"}),
    ],
)
def test_too_many_shards_are_refused_before_anything_is_written(
    tmp_path: Path, mock_server: MockFactory, spec: str, env: dict[str, str]
) -> None:
    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [chat("x")])
    args = ["run", "in.jsonl", "--job", "job", "--base-url", server.url, "--model", "m"]
    done = batchq(*args, "--shard", spec, cwd=tmp_path, env=clean_env(**env))
    assert done.returncode == 2, done.stderr
    assert "Traceback" not in done.stderr and "N must be at most 10,000 shards" in done.stderr
    assert not (tmp_path / "job").exists()
    assert parse_shard("9999/10000", {}) == Shard(9999, 10_000)


# --- many processes on one job -----------------------------------------------------------


def _input(tmp_path: Path, n: int) -> list[str]:
    ids = [f"r-{i}" for i in range(n)]
    lines: list[object] = [chat(cid, custom_id=cid) for cid in ids]
    # A long line, and lines without a custom_id: their ids are the input's line numbers.
    lines[7] = chat("x" * 5000, custom_id=ids[7])
    for i in (3, n - 1):
        lines[i] = chat(ids[i])
        ids[i] = f"line-{i + 1}"
    write_jsonl(tmp_path / "in.jsonl", lines)
    return ids


def _start(tmp_path: Path, url: str, shard: str, *extra: str) -> subprocess.Popen[str]:
    args = ["run", "in.jsonl", "--job", "job", "--base-url", url, "--model", "m", "-q"]
    return subprocess.Popen(
        batchq_cmd(*args, "--shard", shard, *extra),
        cwd=tmp_path,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def _all_outputs(job: Path) -> bytes:
    return b"".join(
        (folder / name).read_bytes()
        for folder in sorted(job.glob("shard-*"))
        for name in ("results.jsonl", "errors.jsonl")
        if (folder / name).exists()
    )


def _longer_than(job: Path, length: int) -> bool:
    return len(_all_outputs(job)) > length


def assert_exactly_once_across_shards(job: Path, ids: list[str]) -> None:
    lines = _all_outputs(job)
    assert lines == b"" or lines.endswith(b"\n")
    seen = Counter(orjson.loads(line)["custom_id"] for line in lines.splitlines())
    assert not {cid: n for cid, n in seen.items() if n > 1}, "written twice"
    assert set(seen) == set(ids)


def _run_all(tmp_path: Path, url: str, count: int) -> None:
    procs = [_start(tmp_path, url, f"{i}/{count}") for i in range(count)]
    for proc in procs:
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, stderr


def test_four_shards_started_at_once_run_every_line_once(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(latency=0.005)
    ids = _input(tmp_path, 400)
    _run_all(tmp_path, server.url, 4)
    job = tmp_path / "job"
    assert_exactly_once_across_shards(job, ids)
    assert server.stats()["requests"] == 400
    assert read_cut(job, {}) == Cut(4, (tmp_path / "in.jsonl").stat().st_size)

    status = batchq("status", "job", "--json", cwd=tmp_path)
    figures = orjson.loads(status.stdout)
    assert (figures["state"], figures["total"], figures["done"]) == ("finished", 400, 400)
    assert [p["shard"] for p in figures["shards"]] == ["0/4", "1/4", "2/4", "3/4"]
    assert all(p["state"] == "finished" for p in figures["shards"])
    assert sum(p["total"] for p in figures["shards"]) == 400
    assert "shard 3/4: finished" in batchq("status", "job", cwd=tmp_path).stdout

    exported = batchq("export", "job", cwd=tmp_path)
    assert exported.returncode == 0, exported.stderr
    rows = [orjson.loads(line) for line in exported.stdout.splitlines()]
    assert [r["custom_id"] for r in rows] == ids  # input order, across the shards
    assert [r.line for r in api.open_job(job).results()] == list(range(1, 401))
    shard_results = job / "shard-1-of-4" / "results.jsonl"
    before = shard_results.read_bytes()
    for name in ("results.jsonl", "journal.bin"):
        refused = batchq("export", "job", "-o", f"job/shard-1-of-4/{name}", cwd=tmp_path)
        assert refused.returncode == 2 and "shard-1-of-4" in refused.stderr
    assert shard_results.read_bytes() == before

    # A rerun of any shard finds it done and sends nothing.
    server.reset()
    _run_all(tmp_path, server.url, 4)
    assert server.stats()["requests"] == 0


def test_shards_killed_at_random_and_run_again_give_every_line_once(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server(latency=0.01, latency_jitter=0.02)
    ids = _input(tmp_path, 600)
    job = tmp_path / "job"
    rng = random.Random(15)
    procs = {i: _start(tmp_path, server.url, f"{i}/4", "--concurrency", "8") for i in range(4)}
    killed = 0
    for _ in range(3):  # three rounds: kill some shards mid-run, start them again
        before = len(_all_outputs(job))
        wait_for(partial(_longer_than, job, before))
        for i in rng.sample(range(4), 2):
            procs[i].send_signal(signal.SIGKILL)
            procs[i].communicate(timeout=30)
            killed += procs[i].returncode == -signal.SIGKILL
            procs[i] = _start(tmp_path, server.url, f"{i}/4", "--concurrency", "8")
    for i, proc in procs.items():
        _, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 0, (i, stderr)
    assert killed >= 3
    assert_exactly_once_across_shards(job, ids)
    figures = orjson.loads(batchq("status", "job", "--json", cwd=tmp_path).stdout)
    assert (figures["state"], figures["done"], figures["succeeded"]) == ("finished", 600, 600)


def test_changing_the_count_or_running_whole_is_refused_with_the_way_out(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    _input(tmp_path, 40)
    _run_all(tmp_path, server.url, 2)
    other = _start(tmp_path, server.url, "0/3")
    _, stderr = other.communicate(timeout=60)
    assert other.returncode == 2
    assert "started as 2 shards, not 3" in stderr and "--shard I/2" in stderr
    assert not (tmp_path / "job" / "shard-0-of-3").exists()
    whole = batchq("run", "job", "--base-url", server.url, cwd=tmp_path)
    assert whole.returncode == 2 and "runs as 2 shards" in whole.stderr

    # A job begun as one process cannot become shards.
    args = ["run", "in.jsonl", "--job", "one", "--base-url", server.url, "--model", "m"]
    assert batchq(*args, cwd=tmp_path).returncode == 0
    sharded = batchq(*args, "--shard", "0/2", cwd=tmp_path)
    assert sharded.returncode == 2 and "started as one process" in sharded.stderr


def test_a_shard_refused_beside_its_running_self_leaves_job_toml_alone(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    _input(tmp_path, 20)
    _run_all(tmp_path, server.url, 2)
    job = tmp_path / "job"
    before = (job / "job.toml").read_bytes()
    with job_lock(job / "shard-0-of-2"):  # shard 0 is running
        refused = _start(tmp_path, server.url, "0/2", "--force", "--model", "other")
        _, stderr = refused.communicate(timeout=60)
    assert refused.returncode == 2 and "already being run" in stderr
    assert (job / "job.toml").read_bytes() == before  # every shard's settings, unchanged
    forced = _start(tmp_path, server.url, "1/2", "--force", "--model", "other")
    _, stderr = forced.communicate(timeout=60)
    assert forced.returncode == 0, stderr
    assert b'model = "other"' in (job / "job.toml").read_bytes()  # once it runs, it changes


def test_lines_appended_after_sharding_belong_to_the_last_shard(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    ids = _input(tmp_path, 30)
    _run_all(tmp_path, server.url, 3)
    with (tmp_path / "in.jsonl").open("ab") as f:
        f.write(
            b"".join(orjson.dumps(chat(f"new-{i}", custom_id=f"new-{i}")) + b"\n" for i in range(5))
        )
    server.reset()
    _run_all(tmp_path, server.url, 3)
    assert server.stats()["requests"] == 5
    last = (tmp_path / "job" / "shard-2-of-3" / "results.jsonl").read_bytes()
    assert b'"new-4"' in last
    assert_exactly_once_across_shards(tmp_path / "job", ids + [f"new-{i}" for i in range(5)])


def test_following_the_advice_for_a_damaged_state_keeps_the_cut(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    ids = [f"r-{i}" for i in range(40)]  # lines of one length: the cut is mid-input
    write_jsonl(tmp_path / "in.jsonl", [chat(cid, custom_id=cid) for cid in ids])
    _run_all(tmp_path, server.url, 2)
    new = [f"n-{i}" for i in range(40)]  # the input doubles: a cut now would fall elsewhere
    with (tmp_path / "in.jsonl").open("ab") as f:
        f.write(b"".join(orjson.dumps(chat(cid, custom_id=cid)) + b"\n" for cid in new))
    job = tmp_path / "job"
    (job / "state.json").write_text('{"input_size": "damaged"}')
    damaged = _start(tmp_path, server.url, "0/2")
    _, stderr = damaged.communicate(timeout=60)
    assert damaged.returncode == 2 and "delete it" in stderr
    (job / "state.json").unlink()  # as the message says
    server.reset()
    _run_all(tmp_path, server.url, 2)
    assert server.stats()["requests"] == len(new)  # the new lines only, all in the last shard
    assert_exactly_once_across_shards(job, ids + new)

    # A job sharded by a batchq that kept the cut in state.json gets its shards.json.
    cut = read_cut(job, {})
    assert cut is not None and cut.size < (tmp_path / "in.jsonl").stat().st_size
    (job / "shards.json").unlink()
    legacy = {**read_state(job), "shards": cut.count, "shard_size": cut.size}
    (job / "state.json").write_bytes(orjson.dumps(legacy))
    _run_all(tmp_path, server.url, 2)
    assert read_cut(job, {}) == cut

    # The cut itself is not to be deleted, and its loss is refused, not guessed at.
    (job / "shards.json").write_text("{")
    damaged = _start(tmp_path, server.url, "1/2")
    _, stderr = damaged.communicate(timeout=60)
    assert damaged.returncode == 2 and "shards.json is damaged" in stderr
    assert "delete" not in stderr and "Traceback" not in stderr
    (job / "shards.json").unlink()
    (job / "state.json").unlink()
    for args in (["--shard", "1/2"], []):
        lost = batchq("run", "job", "--base-url", server.url, *args, cwd=tmp_path)
        assert lost.returncode == 2 and "where its input was cut is lost" in lost.stderr
    assert server.stats()["requests"] == len(new)


def test_creating_a_job_is_safe_when_every_shard_starts_at_once(tmp_path: Path) -> None:
    write_jsonl(tmp_path / "in.jsonl", [chat(f"q{i}") for i in range(100)])
    barrier = threading.Barrier(8)
    spans: dict[int, tuple[int, int, int, int]] = {}
    failures: list[BaseException] = []

    def shard(i: int) -> None:
        try:
            job, _ = open_job(
                tmp_path / "in.jsonl",
                job_dir=tmp_path / "job",
                overrides={"model": "m"},
                defaults={},
                default_base_url="http://127.0.0.1:9/v1",
                force=False,
            )
            barrier.wait()
            _, span = prepare(job := with_shard(job, Shard(i, 8)))
            save_settings(job)  # as a run does once it holds its shard's lock
            spans[i] = (span.start, span.end, span.first_line, span.requests)
        except BaseException as exc:  # collected for the assertion below
            failures.append(exc)

    threads = [threading.Thread(target=shard, args=(i,)) for i in range(8)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=30)
    assert not failures
    ordered = [spans[i] for i in range(8)]
    assert ordered[0][0] == 0 and ordered[-1][1] == (tmp_path / "in.jsonl").stat().st_size
    assert all(a[1] == b[0] for a, b in itertools.pairwise(ordered))
    assert sum(s[3] for s in ordered) == 100
    assert read_cut(tmp_path / "job", {}) == Cut(8, (tmp_path / "in.jsonl").stat().st_size)
    assert (tmp_path / "job" / "job.toml").exists()


def test_shard_auto_reads_the_schedulers_index_and_status_shows_what_is_left(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    ids = _input(tmp_path, 50)
    args = ["run", "in.jsonl", "--job", "job", "--base-url", server.url, "--model", "m"]
    k8s = clean_env(JOB_COMPLETION_INDEX="0", BATCHQ_SHARDS="2")
    first = batchq(*args, "--shard", "auto", cwd=tmp_path, env=k8s)
    assert first.returncode == 0, first.stderr
    figures = orjson.loads(batchq("status", "job", "--json", cwd=tmp_path).stdout)
    assert figures["state"] == "interrupted" and figures["pending"] == 50 - figures["done"]
    assert [p["state"] for p in figures["shards"]] == ["finished", "not started"]

    slurm = clean_env(SLURM_ARRAY_TASK_ID="1", SLURM_ARRAY_TASK_COUNT="2")
    second = batchq(*args, "--shard", "auto", cwd=tmp_path, env=slurm)
    assert second.returncode == 0, second.stderr
    assert_exactly_once_across_shards(tmp_path / "job", ids)

    new = ["run", "in.jsonl", "--job", "other", "--base-url", server.url, "--model", "m"]
    moved = batchq(*new, "--shard", "0/2", "--output", "out.jsonl", cwd=tmp_path)
    assert moved.returncode == 2 and "do not go with --shard" in moved.stderr
    assert not (tmp_path / "other" / "job.toml").exists()
    nothing = batchq(*args, "--shard", "auto", cwd=tmp_path)
    assert nothing.returncode == 2 and "JOB_COMPLETION_INDEX" in nothing.stderr
