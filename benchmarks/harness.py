"""What the benchmarks stand on: endpoints, inputs, and measuring one child process.

Every figure comes from a child process measured from the outside, so batchq
and the baseline are timed the same way, start-up included:

* wall time from the fork to ``os.wait4`` returning;
* CPU time (user + sys) and peak RSS (``ru_maxrss``) from that child's own
  rusage, as ``wait4`` reports it, so nothing else on the machine counts.
  A tiny launcher process does the fork and the ``wait4`` (see ``measure``).

Each child runs in a session of its own and is killed, with its process
group, when it outlives its time limit or the benchmark is interrupted. The
endpoints (nginx, the built-in mock server) are context managers that stop
what they started, within seconds, however the block exits. Nothing here
talks to anything but 127.0.0.1.
"""

from __future__ import annotations

import contextlib
import os
import platform
import random
import re
import select
import shutil
import signal
import socket
import statistics
import subprocess
import sys
import time
import urllib.request
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import orjson

#: The fixed answer nginx gives: a chat.completion with usage, as an OpenAI endpoint sends it.
CHAT_COMPLETION = (
    '{"id":"chatcmpl-bench","object":"chat.completion","created":1700000000,"model":"m",'
    '"choices":[{"index":0,"message":{"role":"assistant","content":"A fixed answer from the '
    'benchmark endpoint."},"finish_reason":"stop"}],'
    '"usage":{"prompt_tokens":42,"completion_tokens":12,"total_tokens":54}}'
)

NGINX_CONF = """\
worker_processes 1;
daemon off;
pid {tmp}/nginx.pid;
error_log {tmp}/nginx-error.log warn;
events {{ worker_connections 4096; }}
http {{
    access_log off;
    client_body_temp_path {tmp}/body;
    proxy_temp_path {tmp}/proxy;
    fastcgi_temp_path {tmp}/fastcgi;
    uwsgi_temp_path {tmp}/uwsgi;
    scgi_temp_path {tmp}/scgi;
    keepalive_requests 10000000;
    keepalive_timeout 300s;
    client_body_buffer_size 64k;
    server {{
        listen 127.0.0.1:{port};
        location = /v1/chat/completions {{
            default_type application/json;
            add_header x-request-id $request_id always;
            return 200 '{body}';
        }}
    }}
}}
"""

WRK_SCRIPT = """\
wrk.method = "POST"
wrk.headers["Content-Type"] = "application/json"
wrk.body = '{"model":"m","messages":[{"role":"user","content":"a benchmark prompt"}]}'
"""


class BenchError(RuntimeError):
    """A benchmark could not be run or measured; the message says why."""


# --- measuring a child ---------------------------------------------------------------------


@dataclass(frozen=True, slots=True)
class Run:
    """One measured child process."""

    wall: float  # seconds
    cpu: float  # user + sys seconds of the child
    rss_mib: float  # peak resident set size of the child
    started_at: float  # time.time() just before the child was started


def child_env() -> dict[str, str]:
    """The environment for children: no API key or base URL of the user's leaks in."""
    drop = {"OPENAI_API_KEY", "OPENAI_BASE_URL"}
    return {k: v for k, v in os.environ.items() if k not in drop}


def _kill_group(pid: int, sig: int = signal.SIGKILL) -> None:
    with contextlib.suppress(ProcessLookupError, PermissionError):
        os.killpg(pid, sig)


# Linux gives an exec'ed process the peak RSS of the address space it replaced as its own
# ru_maxrss floor; run straight from this (large) process, every child would report at least
# our peak. So a minimal Python launcher forks the measured command and reports its rusage:
# the floor is then the launcher's ~10 MiB, well under what any client uses.
_LAUNCHER = """\
import os, sys, time
argv = sys.argv[1:]
started_at, start = time.time(), time.perf_counter()
pid = os.fork()
if pid == 0:
    try:
        os.dup2(2, 1)
        os.execvp(argv[0], argv)
    finally:
        os._exit(127)
_, status, ru = os.wait4(pid, 0)
wall = time.perf_counter() - start
code = os.waitstatus_to_exitcode(status)
print(started_at, wall, ru.ru_utime + ru.ru_stime, ru.ru_maxrss, code, flush=True)
"""


def measure(cmd: Sequence[str | Path], *, timeout: float, log: Path, cwd: Path) -> Run:
    """Run ``cmd`` to completion, killed after ``timeout`` s; raise BenchError unless it exits 0.

    Its output goes to ``log``. Wall time runs from the fork to the end of ``wait4``.
    """
    launcher = [sys.executable, "-I", "-S", "-c", _LAUNCHER, *(str(c) for c in cmd)]
    with log.open("wb") as out:
        proc = subprocess.Popen(
            launcher,
            stdin=subprocess.DEVNULL,
            stdout=subprocess.PIPE,
            stderr=out,
            cwd=cwd,
            env=child_env(),
            start_new_session=True,
        )
        try:
            report, _ = proc.communicate(timeout=timeout)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait(timeout=10)
            tail = log.read_text(errors="replace")[-2000:]
            raise BenchError(
                f"{Path(cmd[0]).name} … stopped after {timeout:g} s:\n{tail}"
            ) from None
        except BaseException:  # the benchmark itself was interrupted
            _kill_group(proc.pid)
            proc.wait(timeout=10)
            raise
    fields = report.split()
    if proc.returncode != 0 or len(fields) != 5 or fields[4] != b"0":
        tail = log.read_text(errors="replace")[-2000:]
        raise BenchError(f"{' '.join(map(str, cmd))}\nfailed: {report!r}\n{tail}")
    started_at, wall, cpu, maxrss = (float(f) for f in fields[:4])
    return Run(wall, cpu, maxrss / 1024, started_at)


@dataclass(frozen=True, slots=True)
class Spread:
    """Median and range of repeated measurements."""

    median: float
    low: float
    high: float

    @classmethod
    def of(cls, values: Sequence[float]) -> Spread:
        return cls(statistics.median(values), min(values), max(values))

    def show(self, fmt: str = ",.0f") -> str:
        return f"{self.median:{fmt}} ({self.low:{fmt}}–{self.high:{fmt}})"


# --- tools and endpoints -------------------------------------------------------------------


def ensure_nginx(say: Callable[[str], None]) -> None:
    """Install nginx (and wrk, if the archive has it) from apt when absent, as on fresh CI."""
    if shutil.which("nginx") and shutil.which("wrk"):
        return
    sudo = [] if os.geteuid() == 0 else ["sudo", "-n"]
    env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
    system_pid = Path("/run/nginx.pid")
    had_system_nginx = system_pid.exists()

    def apt(*args: str) -> bool:
        say(f"apt-get {' '.join(args)}")
        cmd = [*sudo, "apt-get", "-qq", *args]
        done = subprocess.run(cmd, env=env, stdout=subprocess.DEVNULL, timeout=600, check=False)
        return done.returncode == 0

    apt("update")
    if not shutil.which("nginx") and not apt("install", "-y", "nginx"):
        raise BenchError("nginx is not installed and `apt-get install -y nginx` failed")
    if not shutil.which("wrk"):
        apt("install", "-y", "wrk")  # optional: only proves nginx is not the bottleneck
    if system_pid.exists() and not had_system_nginx:  # the package started a service: stop it
        subprocess.run([*sudo, "nginx", "-s", "quit"], timeout=30, check=False)


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _wait_listening(port: int, proc: subprocess.Popen[bytes], timeout: float = 10) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise BenchError(f"server exited with status {proc.returncode} before listening")
        with contextlib.suppress(OSError), socket.create_connection(("127.0.0.1", port), 0.5):
            return
        time.sleep(0.05)
    raise BenchError(f"nothing listens on port {port} after {timeout:g} s")


def stop(proc: subprocess.Popen[bytes]) -> None:
    """SIGTERM the process group, SIGKILL it after 5 s; returns within ~15 s."""
    if proc.poll() is None:
        _kill_group(proc.pid, signal.SIGTERM)
        try:
            proc.wait(timeout=5)
        except subprocess.TimeoutExpired:
            _kill_group(proc.pid)
            proc.wait(timeout=10)
    _kill_group(proc.pid)  # any worker left behind by its leader


def _spawn(cmd: Sequence[str | Path], log: Path, **kwargs: Any) -> subprocess.Popen[bytes]:
    with log.open("ab") as err:
        return subprocess.Popen(
            [str(c) for c in cmd],
            stdin=subprocess.DEVNULL,
            stderr=err,
            env=child_env(),
            start_new_session=True,
            **kwargs,
        )


@contextlib.contextmanager
def nginx(tmp: Path) -> Iterator[str]:
    """nginx answering POST /v1/chat/completions with CHAT_COMPLETION; yields its base URL."""
    home = tmp / "nginx"
    home.mkdir()
    port = free_port()
    conf = home / "nginx.conf"
    conf.write_text(NGINX_CONF.format(tmp=home, port=port, body=CHAT_COMPLETION))
    log = home / "nginx-error.log"
    cmd = ["nginx", "-c", conf, "-p", home, "-e", log]
    proc = _spawn(cmd, log, stdout=subprocess.DEVNULL)
    try:
        _wait_listening(port, proc)
        yield f"http://127.0.0.1:{port}/v1"
    finally:
        stop(proc)


@contextlib.contextmanager
def mock_server(
    batchq: Path, tmp: Path, *, latency: float = 0.0, options: Sequence[str] = ()
) -> Iterator[str]:
    """``batchq mock-server`` in its own process; yields its base URL (ending in /v1).

    ``options`` are more flags of ``mock-server`` (``--slots``, ``--rpm``, ...).
    """
    cmd: list[str | Path] = [batchq, "mock-server", "--port", "0", "--latency", str(latency)]
    cmd += options
    proc = _spawn(cmd, tmp / f"mock-{latency:g}.log", stdout=subprocess.PIPE)
    try:
        yield read_url(proc)
    finally:
        stop(proc)
        if proc.stdout is not None:
            proc.stdout.close()


def read_url(proc: subprocess.Popen[bytes]) -> str:
    """The base URL a ``batchq mock-server`` prints first; BenchError if none within 15 s."""
    assert proc.stdout is not None
    ready, _, _ = select.select([proc.stdout], [], [], 15)
    url = proc.stdout.readline().decode().strip() if ready else ""
    if not url.startswith("http://127.0.0.1:"):
        raise BenchError(f"batchq mock-server did not print its URL (got {url!r})")
    return url


def mock_call(base_url: str, path: str, *, post: bool = False) -> dict[str, Any]:
    """GET (or POST) one of the mock server's ``/_mock/...`` routes."""
    root = base_url.removesuffix("/v1")
    request = urllib.request.Request(root + path, method="POST" if post else "GET")
    with urllib.request.urlopen(request, timeout=10) as resp:
        result: dict[str, Any] = orjson.loads(resp.read())
    return result


def wrk_rate(url: str, tmp: Path, seconds: int) -> float | None:
    """Requests/s that wrk (1 thread, 64 connections) gets from ``url``; None without wrk."""
    if not shutil.which("wrk"):
        return None
    script = tmp / "post.lua"
    script.write_text(WRK_SCRIPT)
    cmd = ["wrk", "-t1", "-c64", f"-d{seconds}s", "-s", str(script), url]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=seconds + 30, check=True)
    if found := re.search(r"Requests/sec:\s*([\d.]+)", done.stdout):
        return float(found.group(1))
    raise BenchError(f"cannot read wrk's output:\n{done.stdout}")


# --- inputs --------------------------------------------------------------------------------

_WORDS = (
    *("the", "of", "and", "to", "in", "is", "that", "for", "it", "as", "was", "with", "be"),
    *("by", "on", "not", "this", "are", "or", "from", "at", "which", "but", "have", "an"),
    *("model", "token", "batch", "request", "answer", "summarise", "translate", "explain"),
    *("rate", "limit", "endpoint", "retry", "json", "line", "they", "you", "there", "one"),
)


def write_input(path: Path, lines: int, *, seed: int = 1) -> None:
    """``lines`` OpenAI Batch API lines of chat bodies whose prompts vary from a few to
    thousands of characters (log-normal, median ~150). Deterministic: a shorter input is a
    prefix of a longer one."""
    rng = random.Random(seed)
    blob = " ".join(rng.choice(_WORDS) for _ in range(100_000))
    system = {"role": "system", "content": "You are a concise assistant."}
    chunk: list[bytes] = []
    with path.open("wb") as f:
        for n in range(1, lines + 1):
            size = min(int(rng.lognormvariate(5.0, 1.0)) + 8, 8000)
            start = rng.randrange(len(blob) - size)
            messages = [{"role": "user", "content": blob[start : start + size]}]
            body: dict[str, Any] = {"messages": [system, *messages] if n % 4 == 0 else messages}
            body["max_tokens"] = (16, 64, 256)[n % 3]
            if n % 5 == 0:
                body["temperature"] = 0.2
            line = {"custom_id": f"req-{n}", "method": "POST", "url": "/v1/chat/completions"}
            line["body"] = body
            chunk.append(orjson.dumps(line, option=orjson.OPT_APPEND_NEWLINE))
            if len(chunk) == 10_000:
                f.write(b"".join(chunk))
                chunk = []
        f.write(b"".join(chunk))


def line_offset(path: Path, lines: int) -> int:
    """The byte offset at which line ``lines + 1`` of ``path`` starts."""
    offset = 0
    with path.open("rb") as f:
        for _, raw in zip(range(lines), f, strict=False):
            offset += len(raw)
    return offset


def copy_bytes(src: Path, dst: Path, start: int, end: int) -> None:
    """Append bytes ``start:end`` of ``src`` to ``dst``."""
    with src.open("rb") as f, dst.open("ab") as out:
        f.seek(start)
        left = end - start
        while left > 0 and (chunk := f.read(min(left, 1 << 22))):
            out.write(chunk)
            left -= len(chunk)


def once_each(paths: Iterable[Path], lines: int) -> tuple[int, int, int]:
    """(input lines written once, missing, written more than once) over the output lines
    in ``paths``, by the input line number batchq records in each (``"batchq":{"line":N``)."""
    seen = bytearray(lines + 1)
    mark = b'"batchq":{"line":'
    for path in paths:
        with path.open("rb") as f:
            for raw in f:
                at = raw.rfind(mark)
                number = int(raw[at + len(mark) :].split(b",", 1)[0].split(b"}", 1)[0])
                seen[number] = min(seen[number] + 1, 255)
    counts = seen[1:]
    return counts.count(1), counts.count(0), lines - counts.count(1) - counts.count(0)


def count_lines(path: Path) -> int:
    total = 0
    with path.open("rb") as f:
        while chunk := f.read(1 << 22):
            total += chunk.count(b"\n")
    return total


# --- reporting -----------------------------------------------------------------------------


def machine() -> str:
    model = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    system = f"{platform.system()} {platform.release()}"
    return f"nproc {os.cpu_count()}, {model}, Python {platform.python_version()}, {system}"


def revision(repo: Path) -> str:
    """The commit measured, and whether ``batchq/`` had uncommitted changes (read-only git)."""

    def git(*args: str) -> str:
        cmd = ["git", "-C", str(repo), *args]
        return subprocess.run(cmd, capture_output=True, text=True, timeout=10, check=True).stdout

    try:
        commit = git("rev-parse", "--short", "HEAD").strip()
        dirty = git("status", "--porcelain", "--", "batchq").strip()
    except (OSError, subprocess.SubprocessError):
        return "unknown (no git)"
    return commit + (" + uncommitted changes in batchq/" if dirty else "")


def table(headers: Sequence[str], rows: Sequence[Sequence[str]]) -> str:
    """A Markdown table; columns after the first are right-aligned."""
    align = ["---"] + ["---:"] * (len(headers) - 1)
    lines = [headers, align, *rows]
    return "\n".join("| " + " | ".join(cells) + " |" for cells in lines)
