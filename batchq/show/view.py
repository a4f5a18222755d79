"""``batchq view``: a read-only local web page of a job; ``batchq report``: the same as one file.

The page (``static/page.html``, ``view.js``, ``view.css``) draws its charts
with uPlot (MIT, vendored in ``static/``: no network, no build step). The
server answers on 127.0.0.1 only, reads the job's files and never writes
them, and takes no lock; what it reads again for a running job's page (every
3 s) is throttled to a tenth of a core however large the job.

Routes: ``/`` the page, ``/static/NAME`` its files, ``/api/picture`` the
figures, series and failures (show/picture.py), ``/api/lines`` a page of
the results browser (show/browse.py), ``/api/line/N`` one line's raw JSON.

The report is the same page with its scripts, styles and the job's picture
inlined: it opens from a file, offline, and has no results browser.
"""

from __future__ import annotations

import asyncio
import contextlib
import html
import os
import re
import signal
import time
from collections.abc import Callable
from importlib import resources
from pathlib import Path
from typing import Any

import orjson
from aiohttp import web
from aiohttp.typedefs import Handler

from batchq.errors import BatchqError, ConfigError, StorageError
from batchq.job.folder import job_files, same_file
from batchq.show.browse import Browser
from batchq.show.outfile import replacing
from batchq.show.picture import Failures, JobFolder, open_folder, picture

#: The page's own files, and what they are served as.
STATIC = {
    "uPlot.iife.min.js": "text/javascript",
    "uPlot.min.css": "text/css",
    "view.js": "text/javascript",
    "view.css": "text/css",
}
_STATUSES = ("all", "ok", "failed", "pending")
PICTURE_EVERY = 1.0  # seconds a picture is served again before it is read afresh
_PLACEHOLDER = re.compile(r"\{\{(title|style|boot|script)\}\}")  # page.html's


def _static(name: str) -> str:
    return resources.files("batchq.show").joinpath("static", name).read_text(encoding="utf-8")


def page(folder: JobFolder, data: dict[str, Any] | None = None) -> str:
    """The page's HTML: linking its files (served), or with them and ``data`` inlined (report)."""
    title = html.escape(f"batchq · {folder.dir.name}")
    if data is None:
        style = '<link rel="stylesheet" href="static/uPlot.min.css">\n'
        style += '<link rel="stylesheet" href="static/view.css">'
        script = '<script src="static/uPlot.iife.min.js"></script>\n'
        script += '<script src="static/view.js"></script>'
        boot: dict[str, Any] = {"mode": "live"}
    else:
        style = "".join(f"<style>{_static(n)}</style>\n" for n in ("uPlot.min.css", "view.css"))
        licence = f"/*! uPlot's licence:\n{_static('uPlot.LICENSE')}*/\n"  # MIT: copies keep it
        script = "".join(
            f"<script>{_inline(_static(n))}</script>\n" for n in ("uPlot.iife.min.js", "view.js")
        ).replace("<script>", "<script>" + licence, 1)
        boot = {"mode": "report", "picture": data}
    # "</script" or "<!--" in a prompt would end or upset the script: in JSON "<" can only be
    # inside a string, where "\u003c" is the same character
    boot_json = orjson.dumps(boot).decode().replace("<", "\\u003c")
    parts = {
        "title": title,
        "style": style,
        "boot": f"<script>window.BATCHQ = {boot_json};</script>",
        "script": script,
    }
    # one pass: a "{{script}}" in the job's data (a custom_id, an endpoint's error message)
    # is text, not a place for the ~74 KB of scripts that would break the boot JSON
    return _PLACEHOLDER.sub(lambda m: parts[m[1]], _static("page.html"))


def _inline(js: str) -> str:
    return js.replace("</script", "<\\/script")


def write_report(job_dir: Path, out: Path) -> None:
    """Write ``job_dir``'s report to ``out``: one HTML file, no server, no network.

    ConfigError (exit 2) if ``out`` is one of the job's own files; StorageError (exit 3)
    if it cannot be written, and then an earlier report there is left whole."""
    folder = open_folder(job_dir)
    files = job_files(folder.dir, folder.input, folder.parts, folder.settings.json_schema)
    what = same_file(out, files)
    if what is not None:
        raise ConfigError(f"-o {out} would overwrite {what} of job {job_dir}; choose another file")
    try:
        with replacing(out) as f:
            f.write(page(folder, picture(folder)).encode())
    except OSError as exc:
        raise StorageError.from_os("write", out, exc) from None


class View:
    """The web application of one job folder."""

    def __init__(self, folder: JobFolder) -> None:
        self.folder = folder
        self.browser = Browser(folder)
        self.failures = Failures(folder)
        self._picture_lock = asyncio.Lock()  # one picture at a time: it reads every file
        self._picture: tuple[float, bytes] | None = None  # until when it serves, and itself
        self.app = web.Application(middlewares=[_local_only, _one_line_errors])
        self.app.add_routes(
            [
                web.get("/", self.index),
                web.get("/static/{name}", self.static),
                web.get("/api/picture", self.picture),
                web.get("/api/lines", self.lines),
                # ten digits: more is no line of a job, and would not fit the index's 64-bit numbers
                web.get(r"/api/line/{line:\d{1,10}}", self.line),
            ]
        )
        self.app.on_cleanup.append(self._close)

    async def _close(self, app: web.Application) -> None:
        self.browser.close()

    async def index(self, request: web.Request) -> web.Response:
        return web.Response(text=page(self.folder), content_type="text/html")

    async def static(self, request: web.Request) -> web.Response:
        name = request.match_info["name"]
        if name not in STATIC:
            raise web.HTTPNotFound()
        return web.Response(text=_static(name), content_type=STATIC[name])

    async def picture(self, request: web.Request) -> web.Response:
        async with self._picture_lock:
            now = time.monotonic()
            if self._picture is None or now >= self._picture[0]:
                data = await asyncio.to_thread(picture, self.folder, self.failures)
                took = time.monotonic() - now
                # at most a tenth of a core however large the job, and however many tabs ask
                self._picture = (now + max(PICTURE_EVERY, 10 * took), orjson.dumps(data))
        return web.Response(body=self._picture[1], content_type="application/json")

    async def lines(self, request: web.Request) -> web.Response:
        q = request.query
        try:
            start = int(q.get("from", "1"))
            limit = min(200, max(1, int(q.get("limit", "50"))))
        except ValueError:
            raise web.HTTPBadRequest(text="from and limit are line counts") from None
        status = q.get("status", "all")
        if status not in _STATUSES:
            raise web.HTTPBadRequest(text=f"status is one of {', '.join(_STATUSES)}")
        found = await asyncio.to_thread(
            self.browser.page,
            start,
            status=status,
            code=q.get("code", ""),
            text=q.get("q", ""),
            limit=limit,
        )
        return _json(found)

    async def line(self, request: web.Request) -> web.Response:
        found = await asyncio.to_thread(self.browser.raw, int(request.match_info["line"]))
        return _json(found)


@web.middleware
async def _local_only(request: web.Request, handler: Handler) -> web.StreamResponse:
    """Answer only requests addressed to this machine by name: a web page elsewhere that
    points its own host name at 127.0.0.1 (DNS rebinding) must not read the job."""
    if request.host.rsplit(":", 1)[0] not in ("127.0.0.1", "localhost"):
        raise web.HTTPForbidden(text="batchq view answers http://127.0.0.1 only")
    return await handler(request)


@web.middleware
async def _one_line_errors(request: web.Request, handler: Handler) -> web.StreamResponse:
    """A job file damaged while the view runs (spend.json, state.json): its one-line
    reason to the page, not aiohttp's traceback on the terminal."""
    try:
        return await handler(request)
    except BatchqError as exc:
        return web.Response(body=orjson.dumps({"error": str(exc)}), status=500,
                            content_type="application/json")  # fmt: skip


def _json(data: Any) -> web.Response:
    return web.Response(body=orjson.dumps(data), content_type="application/json")


async def serve(
    job_dir: Path, port: int, on_ready: Callable[[str], None], *, stop: asyncio.Event | None = None
) -> None:
    """Serve ``job_dir``'s page on 127.0.0.1:``port`` (0: a free one) until ``stop`` is set,
    or SIGINT/SIGTERM; ``on_ready(url)`` once it answers. ConfigError if it is no job folder
    or the port is taken."""
    view = View(open_folder(job_dir))
    runner = web.AppRunner(view.app, access_log=None)
    await runner.setup()
    try:
        site = web.TCPSite(runner, "127.0.0.1", port)
        try:
            await site.start()
        except OSError as exc:
            reason = os.strerror(exc.errno) if exc.errno else str(exc)
            raise ConfigError(f"cannot listen on 127.0.0.1:{port}: {reason}") from None
        bound = runner.addresses[0][1]
        stop = stop or asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            with contextlib.suppress(NotImplementedError, RuntimeError):
                loop.add_signal_handler(sig, stop.set)
        on_ready(f"http://127.0.0.1:{bound}/")
        await stop.wait()
    finally:
        await runner.cleanup()
