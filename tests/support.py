"""Running batchq the way a user does, and reading what it wrote."""

from __future__ import annotations

import os
import subprocess
import sys
import time
from collections import Counter
from collections.abc import Callable, Iterable
from pathlib import Path
from typing import Any

import orjson

#: Variables a developer's shell may set that would make a test depend on it.
_FOREIGN = ("OPENAI_API_KEY", "OPENAI_BASE_URL", "BATCHQ_TEST_KEY")


def clean_env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if k not in _FOREIGN}
    env.update(extra)
    return env


def batchq_cmd(*args: str | Path) -> list[str]:
    return [sys.executable, "-m", "batchq", *map(str, args)]


def batchq(
    *args: str | Path, cwd: Path, env: dict[str, str] | None = None, timeout: float = 120
) -> subprocess.CompletedProcess[str]:
    """Run ``batchq ARGS`` in a subprocess and wait for it."""
    return subprocess.run(
        batchq_cmd(*args),
        cwd=cwd,
        env=env or clean_env(),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


# Forks and execs the command given, then prints its exit status and peak RSS (KiB) as the
# last line. The peak is the child's own: a process exec'ed straight from pytest starts from
# pytest's peak, and RUSAGE_CHILDREN holds every child's of the session.
_PEAK_RSS = """\
import os, sys
pid = os.fork()
if pid == 0:
    os.execvp(sys.argv[1], sys.argv[1:])
_, status, usage = os.wait4(pid, 0)
print(os.waitstatus_to_exitcode(status), usage.ru_maxrss, flush=True)
"""


def batchq_peak_rss(
    *args: str | Path, cwd: Path, timeout: float = 120
) -> tuple[subprocess.CompletedProcess[str], float]:
    """``batchq(ARGS)``, and the peak RSS (MiB) of that batchq process alone."""
    launcher = [sys.executable, "-I", "-S", "-c", _PEAK_RSS, *batchq_cmd(*args)]
    done = subprocess.run(
        launcher, cwd=cwd, env=clean_env(), capture_output=True, text=True, timeout=timeout
    )
    stdout, _, last = done.stdout.rstrip("\n").rpartition("\n")
    code, peak_kib = map(int, last.split())
    return subprocess.CompletedProcess(args, code, stdout, done.stderr), peak_kib / 1024


def start(*args: str | Path, cwd: Path) -> subprocess.Popen[str]:
    """Start ``batchq ARGS`` in a subprocess, its output captured, without waiting."""
    return subprocess.Popen(
        batchq_cmd(*args),
        cwd=cwd,
        env=clean_env(),
        stdout=subprocess.PIPE,
        stderr=subprocess.PIPE,
        text=True,
    )


def write_jsonl(path: Path, objects: Iterable[Any]) -> Path:
    path.write_bytes(b"".join(orjson.dumps(o) + b"\n" for o in objects))
    return path


def read_jsonl(path: Path) -> list[dict[str, Any]]:
    if not path.exists():
        return []
    return [orjson.loads(line) for line in path.read_bytes().splitlines()]


def outputs(job: Path) -> tuple[list[dict[str, Any]], list[dict[str, Any]]]:
    """The lines of results.jsonl and errors.jsonl of a job folder."""
    return read_jsonl(job / "results.jsonl"), read_jsonl(job / "errors.jsonl")


def by_custom_id(lines: list[dict[str, Any]]) -> dict[str, dict[str, Any]]:
    ids = [line["custom_id"] for line in lines]
    assert len(ids) == len(set(ids)), "a custom_id appears twice"
    return {line["custom_id"]: line for line in lines}


def chat(prompt: str, custom_id: str | None = None, **body: Any) -> dict[str, Any]:
    """A bare chat body (custom_id inside, as users write them)."""
    line: dict[str, Any] = {"messages": [{"role": "user", "content": prompt}], **body}
    if custom_id is not None:
        line["custom_id"] = custom_id
    return line


def wait_for(condition: Callable[[], bool], timeout: float = 30.0) -> None:
    """Poll ``condition()`` until true: synchronise on state, never on a fixed sleep."""
    deadline = time.monotonic() + timeout
    while not condition():
        assert time.monotonic() < deadline, "condition not reached in time"
        time.sleep(0.01)


def assert_exactly_once(job: Path, custom_ids: list[str]) -> None:
    """Every custom_id once across results.jsonl and errors.jsonl; every line whole JSON."""
    lines = (job / "results.jsonl").read_bytes() + (job / "errors.jsonl").read_bytes()
    assert lines == b"" or lines.endswith(b"\n")
    seen = Counter(orjson.loads(line)["custom_id"] for line in lines.splitlines())
    duplicates = {cid: n for cid, n in seen.items() if n > 1}
    assert not duplicates, f"written twice: {sorted(duplicates)[:10]}"
    missing = set(custom_ids) - set(seen)
    assert not missing, f"missing: {sorted(missing)[:10]}"
    assert set(seen) == set(custom_ids)
