"""``batchq view`` and ``batchq report`` in a real browser: Debian's chromium, driven by Playwright.

Screenshots of every page land in the test's tmp folder (``*.png``): look at them.
Without chromium (``make chromium`` installs it as root) these tests are skipped,
loudly; with CI=true they fail.
"""

from __future__ import annotations

import json
import os
import resource
import shutil
import signal
import socket
import subprocess
from collections import Counter
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import orjson
import pytest
from aiohttp import web
from conftest import MockFactory, RunningMock
from hostile import HostileServer, prompt_of
from support import batchq, batchq_cmd, chat, clean_env, outputs, start, wait_for, write_jsonl

from batchq.job.history import read_history
from batchq.mockserver.live import MockOptions
from batchq.show.browse import Browser
from batchq.show.picture import CODE_CHARS, MAX_CODES, OTHER_CODE, open_folder, picture

CHROMIUM = os.environ.get("BATCHQ_CHROMIUM", "/usr/bin/chromium")
LINES = 100_000
FAILING = 1_000  # every 1,000th line (7, 1007, ...) is refused with a 400

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def browser() -> Iterator[Any]:
    reason = None
    try:
        from playwright.sync_api import sync_playwright
    except ImportError:
        reason = "the playwright package is not installed (pip install -e '.[test]')"
    if reason is None and shutil.which(CHROMIUM) is None:
        reason = f"{CHROMIUM} is not installed (make chromium installs it as root)"
    if reason is not None:
        message = f"BROWSER TESTS SKIPPED: {reason}"
        if os.environ.get("CI", "").lower() == "true":
            pytest.fail(message.replace("SKIPPED", "CANNOT RUN ON CI"), pytrace=False)
        pytest.skip(message)
    with sync_playwright() as playwright:
        # --no-sandbox: chromium refuses to run as root (CI) with its sandbox on
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, args=["--no-sandbox"])
        yield chromium
        chromium.close()


@pytest.fixture(scope="module")
def big_job(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """A finished job of 100,000 lines, 100 of them refused (~20 s, shared by the tests)."""
    root = tmp_path_factory.mktemp("big")
    write_jsonl(
        root / "big.jsonl",
        (
            {"prompt": f"Prompt number {i}" + (" [[mock:status=400]]" if i % FAILING == 7 else "")}
            for i in range(1, LINES + 1)
        ),
    )
    server = RunningMock(MockOptions())
    try:
        done = batchq(
            "run",
            "big.jsonl",
            "--base-url",
            server.url,
            "--model",
            "m",
            "-q",
            cwd=root,
            timeout=300,
        )
    finally:
        server.close()
    assert done.returncode == 1, done.stderr  # some failed, as planned
    return root / "jobs" / "big"


class Viewer:
    """``batchq view JOB --no-open`` as a user starts it; its URL from what it prints."""

    def __init__(self, job: Path) -> None:
        self.process = start("view", job, "--port", "0", "--no-open", cwd=job.parent)
        assert self.process.stderr is not None
        line = self.process.stderr.readline()
        assert "http://127.0.0.1:" in line, line + self.process.stderr.read()
        self.url = line.split()[2]

    def stop(self) -> None:
        self.process.send_signal(signal.SIGINT)
        assert self.process.wait(timeout=30) == 0  # Ctrl-C is how a view ends


@pytest.fixture
def viewer() -> Iterator[Callable[[Path], Viewer]]:
    started: list[Viewer] = []

    def open_view(job: Path) -> Viewer:
        started.append(Viewer(job))
        return started[-1]

    yield open_view
    for v in started:
        v.stop()


class Page:
    """A browser tab that records console errors and failed requests."""

    def __init__(self, browser: Any, tmp_path: Path, *, offline: bool = False) -> None:
        self.context = browser.new_context(
            viewport={"width": 1400, "height": 1000}, offline=offline
        )
        self.page = self.context.new_page()
        self.errors: list[str] = []
        self.tmp_path = tmp_path
        self.page.on("console", lambda m: self.errors.append(m.text) if m.type == "error" else None)
        self.page.on("pageerror", lambda e: self.errors.append(str(e)))
        self.page.on("requestfailed", lambda r: self.errors.append(f"request failed: {r.url}"))

    def open(self, url: str) -> None:
        self.page.goto(url)
        self.page.wait_for_function("window.batchqRefreshes > 0")

    def charts(self) -> dict[str, list[list[Any]]]:
        data: dict[str, list[list[Any]]] = self.page.evaluate(
            "Object.fromEntries(Object.entries(window.batchqCharts).map(([k, v]) => [k, v.data]))"
        )
        return data

    def shot(self, name: str) -> None:
        self.page.screenshot(path=self.tmp_path / f"{name}.png", full_page=True)

    def rows(self) -> list[int]:
        lines: list[str] = self.page.eval_on_selector_all(
            "#rows tbody tr", "rows => rows.map(r => r.dataset.line)"
        )
        return [int(n) for n in lines]

    def close(self) -> None:
        self.context.close()


def _expected_charts(records: list[dict[str, Any]]) -> dict[str, dict[int, list[Any]]]:
    """What some charts' lines must be, straight from history.jsonl (index 0 is the time)."""
    return {
        "concurrency": {
            0: [r["t"] for r in records],
            1: [r["in_flight"] for r in records],
            2: [r["allowance"] for r in records],
        },
        "latency": {1: [r["p50"] for r in records], 3: [r["p99"] for r in records]},
    }


def _check_charts(charts: dict[str, list[list[Any]]], records: list[dict[str, Any]]) -> None:
    assert {"throughput", "concurrency", "latency", "limits", "tokens"} <= set(charts)
    for name, lines in charts.items():
        assert all(len(line) == len(records) for line in lines), name  # a point per record
    for name, lines in _expected_charts(records).items():
        for index, values in lines.items():
            assert charts[name][index] == values, (name, index)
    # the throughput's points add up to the job: rate x interval, summed, is what was done
    t, done_rate = charts["throughput"][0], charts["throughput"][1]
    done = sum(r * (t[i] - t[i - 1]) for i, r in enumerate(done_rate) if r is not None)
    assert done == pytest.approx(records[-1]["done"] - records[0]["done"], rel=0.01)


def test_the_view_of_a_finished_job_shows_its_files(
    browser: Any, big_job: Path, viewer: Callable[[Path], Viewer], tmp_path: Path
) -> None:
    view = viewer(big_job)
    tab = Page(browser, tmp_path)
    tab.open(view.url)
    tab.page.wait_for_selector("#rows tbody tr")
    tab.shot("view-finished")
    assert tab.page.get_attribute("body", "data-state") == "finished"
    records = read_history(big_job)
    assert len(records) >= 3
    _check_charts(tab.charts(), records)
    # failures by code: as many as errors.jsonl has of each, with the first example
    _, errors = outputs(big_job)
    by_code = Counter(e["error"]["code"] for e in errors)
    shown = tab.page.eval_on_selector_all(
        "#failures tbody tr", "rows => rows.map(r => [r.dataset.code, r.cells[1].textContent])"
    )
    assert {code: int(n.replace(",", "")) for code, n in shown} == dict(by_code)
    assert "line 7" in tab.page.inner_text("#failures tbody")
    assert tab.page.inner_text(".tile[data-k=failed] .v") == f"{len(errors):,}"
    assert tab.errors == []
    tab.close()


def test_paging_and_filtering_show_the_right_lines_of_100000(
    browser: Any, big_job: Path, viewer: Callable[[Path], Viewer], tmp_path: Path
) -> None:
    view = viewer(big_job)
    tab = Page(browser, tmp_path)
    tab.open(view.url)
    page = tab.page
    page.wait_for_selector("#rows tbody tr")
    assert tab.rows() == list(range(1, 51))
    first = page.inner_text("#rows tbody tr:first-child")
    assert "Prompt number 1\t" in first and "Prompt number 1" in first.split("\t")[2]

    def turn(button: str, to_page: int) -> None:
        page.click(button)
        page.wait_for_function(f"document.body.dataset.page === '{to_page}'")

    turn("#next", 2)
    assert tab.rows() == list(range(51, 101))
    turn("#next", 3)
    assert tab.rows() == list(range(101, 151))
    turn("#prev", 2)
    assert tab.rows() == list(range(51, 101))

    def show(status: str = "all", text: str = "", start: str = "") -> None:
        page.select_option("#f-status", status)
        page.fill("#f-text", text)
        page.fill("#f-from", start)
        page.evaluate("delete document.body.dataset.page")
        page.click("#filters button")
        page.wait_for_function("document.body.dataset.page === '1'")

    show("failed")
    assert tab.rows() == [i for i in range(1, LINES + 1) if i % FAILING == 7][:50]
    assert set(page.eval_on_selector_all("#rows .st", "s => s.map(e => e.className)")) == {
        "st failed"
    }
    turn("#next", 2)
    assert tab.rows() == [i for i in range(1, LINES + 1) if i % FAILING == 7][50:100]
    show("all", "number 77777")
    assert tab.rows() == [77777]
    show("ok", "", "99990")
    assert tab.rows() == [i for i in range(99990, LINES + 1) if i % FAILING != 7]
    assert page.is_disabled("#next")
    # a line's raw JSON, on demand
    page.click("#rows tbody tr[data-line='99990']")
    page.wait_for_selector("#raw:not([hidden])")
    raw = page.inner_text("#raw")
    assert '"prompt": "Prompt number 99990"' in raw and '"status_code": 200' in raw
    tab.shot("view-browser")
    assert tab.errors == []
    tab.close()


def test_the_page_refreshes_while_a_job_runs(
    browser: Any, mock_server: MockFactory, viewer: Callable[[Path], Viewer], tmp_path: Path
) -> None:
    server = mock_server(record=False)
    write_jsonl(tmp_path / "slow.jsonl", (chat(f"q{i}") for i in range(5_000)))
    run = start(
        "run", "slow.jsonl", "--base-url", server.url, "--model", "m", "--rpm", "1200", cwd=tmp_path
    )
    job = tmp_path / "jobs" / "slow"
    try:
        wait_for(lambda: len(read_history(job)) >= 2)
        view = viewer(job)
        tab = Page(browser, tmp_path)
        tab.open(view.url)
        page = tab.page
        page.wait_for_function("document.body.dataset.state === 'running'")
        seen = page.evaluate(
            "[window.batchqRefreshes, window.batchqCharts.throughput.data[0].length]"
        )
        # the page asks again by itself, and its charts grow with the history
        page.wait_for_function(
            f"window.batchqRefreshes >= {seen[0] + 2} && "
            f"window.batchqCharts.throughput.data[0].length > {seen[1]}",
            timeout=30_000,
        )
        assert "requests/s now" in page.inner_text("#tiles")
        tab.shot("view-running")
        assert tab.errors == []
        tab.close()
    finally:
        run.send_signal(signal.SIGINT)
        run.wait(timeout=60)
    assert run.returncode == 130, run.stderr.read() if run.stderr else ""
    # its progress.json stays behind, but its process is gone: the job is no longer running
    figures = picture(open_folder(job))["figures"]
    assert figures["state"] == "interrupted"
    assert figures["resume_command"] == f"batchq run {job}"


def test_the_report_opens_offline_with_the_same_charts(
    browser: Any, big_job: Path, tmp_path: Path
) -> None:
    report = tmp_path / "report.html"
    done = batchq("report", big_job, "-o", report, cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    tab = Page(browser, tmp_path, offline=True)
    tab.page.route(  # nothing may leave the file: every request but the file's own fails
        "**/*",
        lambda route: route.continue_() if route.request.url.startswith("file:") else route.abort(),
    )
    tab.open(report.as_uri())
    tab.shot("report")
    _check_charts(tab.charts(), read_history(big_job))
    assert tab.page.is_hidden("#browser-card")
    assert f"batchq view {big_job}" in tab.page.inner_text("#report-note")
    assert tab.errors == []
    tab.close()


def test_report_refuses_to_overwrite_the_jobs_own_files(big_job: Path, tmp_path: Path) -> None:
    before = (big_job / "results.jsonl").read_bytes()
    done = batchq("report", big_job, "-o", big_job / "results.jsonl", cwd=tmp_path)
    assert done.returncode == 2
    assert "would overwrite the results file" in done.stderr
    assert done.stderr.count("\n") == 1  # one line, no traceback
    assert (big_job / "results.jsonl").read_bytes() == before


def _small_job(tmp_path: Path, url: str, *extra: str, lines: list[Any] | None = None) -> Path:
    """A finished job of a few lines in tmp_path/jobs/in; the mock refuses `[[mock:status=400]]`."""
    write_jsonl(
        tmp_path / "in.jsonl", lines or [chat("q", "ok1"), chat("[[mock:status=400]]", "no1")]
    )
    done = batchq("run", "in.jsonl", "--base-url", url, "--model", "m", "-q", *extra, cwd=tmp_path)
    assert done.returncode in (0, 1), done.stderr
    return tmp_path / "jobs" / "in"


def _boot(report: str) -> Any:
    """The picture a report inlines, as its page reads it."""
    start = report.index("window.BATCHQ = ") + len("window.BATCHQ = ")
    return orjson.loads(report[start : report.index(";</script>", start)])


def test_placeholders_in_the_jobs_data_stay_data_in_the_report(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    # the page's template has {{script}}; a custom_id (or an endpoint's error message) may too,
    # and it had the ~74 KB of scripts put into the boot JSON, which then no longer parsed
    server = mock_server()
    job = _small_job(tmp_path, server.url, lines=[chat("[[mock:status=400]]", "{{script}}")])
    done = batchq("report", job, "-o", tmp_path / "r.html", cwd=tmp_path)
    assert done.returncode == 0, done.stderr
    report = (tmp_path / "r.html").read_text()
    assert report.count("window.BATCHQ = ") == 1 and report.count("/*! uPlot") == 1
    (failure,) = _boot(report)["picture"]["failures"]["codes"]
    assert failure["first"]["custom_id"] == "{{script}}"


def test_report_and_export_refuse_spend_json_and_the_json_schema(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    server = mock_server()
    (tmp_path / "label.json").write_text('{"type": "object"}')
    job = _small_job(
        tmp_path, server.url, "--price-in", "1", "--price-out", "2", "--max-cost", "5",
        "--json-schema", "label.json",
    )  # fmt: skip
    for own, what in ((job / "spend.json", "spend.json"), (tmp_path / "label.json", "schema")):
        before = own.read_bytes()
        for command in ("report", "export"):
            done = batchq(command, job, "-o", own, cwd=tmp_path)
            assert done.returncode == 2, done.stderr
            assert "would overwrite" in done.stderr and what in done.stderr
            assert done.stderr.count("\n") == 1
            assert own.read_bytes() == before
    # and what atomic_write writes before its rename
    done = batchq("report", job, "-o", job / "spend.json.new", cwd=tmp_path)
    assert done.returncode == 2, done.stderr


def test_a_report_that_cannot_be_written_leaves_the_old_one_whole(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    # a full disk, as a process limit on file size (no root or tmpfs needed): writes past
    # 32 KiB fail with EFBIG, a report is ~80 KB
    server = mock_server()
    job = _small_job(tmp_path, server.url)
    report = tmp_path / "report.html"
    report.write_text("the last good report")
    limit = 32 * 1024
    done = subprocess.run(
        batchq_cmd("report", job, "-o", report),
        cwd=tmp_path,
        env=clean_env(),
        capture_output=True,
        text=True,
        timeout=120,
        preexec_fn=lambda: resource.setrlimit(resource.RLIMIT_FSIZE, (limit, limit)),
        check=False,
    )
    assert done.returncode == 3, done.stderr  # as for a run: a condition outside batchq
    assert done.stderr.startswith("batchq: error: cannot write") and done.stderr.count("\n") == 1
    assert report.read_text() == "the last good report"
    assert sorted(p.name for p in tmp_path.glob("report.html*")) == ["report.html"]


def test_a_line_number_past_any_job_is_not_found(
    tmp_path: Path, mock_server: MockFactory, viewer: Callable[[Path], Viewer]
) -> None:
    import urllib.error
    import urllib.request

    server = mock_server()
    view = viewer(_small_job(tmp_path, server.url))
    with urllib.request.urlopen(view.url + "api/line/9999999999") as answer:
        assert orjson.loads(answer.read())["output"] is None  # the largest that may be asked
    for number in ("99999999999999999999999", "9" * 5000):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(view.url + "api/line/" + number)
        assert refused.value.code == 404
    view.stop()
    assert view.process.stderr is not None
    assert "Traceback" not in view.process.stderr.read()


def test_failures_by_code_stay_bounded_whatever_codes_the_endpoint_sends(
    tmp_path: Path, hostile: Callable[..., HostileServer]
) -> None:
    async def refuse(request: web.Request, body: bytes) -> web.StreamResponse:
        code = f"code-{prompt_of(body)}-" + "x" * 2000
        return web.json_response({"error": {"message": "no", "code": code}}, status=400)

    server = hostile(refuse)
    long_id = "id-" + "c" * 2000
    lines = [chat(str(i), f"{long_id}-{i}") for i in range(MAX_CODES + 10)]
    job = _small_job(tmp_path, server.url, lines=lines)
    failures = picture(open_folder(job))["failures"]
    codes = {c["code"]: c for c in failures["codes"]}
    assert failures["total"] == len(lines)
    assert len(codes) == MAX_CODES + 1  # the first 50, and the rest under "other"
    assert codes[OTHER_CODE]["count"] == 10
    assert all(len(code) <= CODE_CHARS for code in codes)
    assert all(len(c["first"]["custom_id"]) == 500 for c in codes.values())
    # the page's code filter sends a code as the table shows it, cut: it finds its line
    (cut,) = [code for code in codes if code.startswith("code-7-")]
    found = Browser(open_folder(job)).page(status="failed", code=cut)["rows"]
    assert [row["line"] for row in found] == [8]


def test_search_finds_text_as_the_page_shows_it_however_the_json_wrote_it(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    """Python's json.dumps, the usual way to make JSONL, writes "é" as "\\u00e9"."""
    server = mock_server()
    prompts = ["Où est le café crème?", 'Say "hello" please', "ÉCOLE normale", "Tab\there", "a b"]
    refused = [{"custom_id": p, "body": {"messages": [{"role": "user",
                "content": f"[[mock:status=400]] {p}"}]}} for p in prompts]  # fmt: skip
    (tmp_path / "in.jsonl").write_text("".join(json.dumps(line) + "\n" for line in refused))
    done = batchq("run", "in.jsonl", "--base-url", server.url, "--model", "m", "-q", cwd=tmp_path)
    assert done.returncode == 1, done.stderr
    browser = Browser(open_folder(tmp_path / "jobs" / "in"))
    searches = [("café", 1), ('say "hello"', 2), ("ÉCOLE", 3), ("école", 3), ("tab\there", 4)]
    for text, line in [*searches, ("CRÈME", 1), ('"a b"', 5), ("nowhere", None)]:
        rows = browser.page(text=text)["rows"]
        assert [row["line"] for row in rows] == ([] if line is None else [line]), text
    browser.close()


def test_view_of_a_folder_that_is_no_job_is_a_usage_error(tmp_path: Path) -> None:
    done = batchq("view", tmp_path, "--no-open", cwd=tmp_path)
    assert done.returncode == 2
    assert "not a batchq job folder" in done.stderr


def test_the_api_answers_json_of_the_job(big_job: Path, viewer: Callable[[Path], Viewer]) -> None:
    import urllib.error
    import urllib.request

    view = viewer(big_job)
    with urllib.request.urlopen(view.url + "api/line/7") as answer:
        line = orjson.loads(answer.read())
    assert line["input"]["prompt"].startswith("Prompt number 7 ")
    assert line["output"]["error"]["code"]
    with urllib.request.urlopen(view.url + "api/lines?status=pending") as answer:
        assert orjson.loads(answer.read())["rows"] == []  # the job is finished
    # a page whose host name was pointed at 127.0.0.1 (DNS rebinding) reads nothing
    elsewhere = urllib.request.Request(view.url + "api/line/7", headers={"Host": "evil.test"})
    with pytest.raises(urllib.error.HTTPError) as refused:
        urllib.request.urlopen(elsewhere)
    assert refused.value.code == 403


def test_a_file_damaged_while_the_view_runs_is_one_line_not_a_traceback(
    tmp_path: Path, mock_server: MockFactory
) -> None:
    import urllib.error
    import urllib.request

    server = mock_server()
    write_jsonl(tmp_path / "in.jsonl", [chat("q", "r")])
    done = batchq("run", "in.jsonl", "--base-url", server.url, "--model", "m",
                  "--price-in", "1", "--price-out", "1", "-q", cwd=tmp_path)  # fmt: skip
    assert done.returncode == 0, done.stderr
    job = tmp_path / "jobs" / "in"
    view = Viewer(job)
    try:
        (job / "spend.json").write_text("{damaged")
        with pytest.raises(urllib.error.HTTPError) as failed:
            urllib.request.urlopen(view.url + "api/picture")
        assert "spend.json is damaged" in orjson.loads(failed.value.read())["error"]
    finally:
        view.stop()
    assert view.process.stderr is not None
    assert "Traceback" not in view.process.stderr.read()  # aiohttp logged one before


def test_a_taken_port_is_a_usage_error(big_job: Path, tmp_path: Path) -> None:
    with socket.socket() as taken:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        port = taken.getsockname()[1]
        done = batchq("view", big_job, "--port", str(port), "--no-open", cwd=tmp_path)
    assert done.returncode == 2
    assert (
        done.stderr == f"batchq: error: cannot listen on 127.0.0.1:{port}: Address already in use\n"
    )
