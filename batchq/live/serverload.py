"""What a self-hosted server says of its own load, read for ``--concurrency auto``.

vLLM, llama.cpp (started with ``--metrics``), SGLang and TGI publish Prometheus
gauges at ``/metrics`` beside their ``/v1``: how many requests run in the
batch and how many wait for a place in it. A waiting count above zero says the
pool is past what the server can batch; none waiting with the pool full says
it takes more. That is what ``AdaptiveLimit`` otherwise probes for over
windows of answers, so with the gauges the pool reaches the server's batch in
a fraction of a second and holds it without a queue (``concurrency.py``).

The gauges are read once at the start; an endpoint without them (a hosted
API, a proxy: a 404, a web page, other metrics) is not asked again. They are
read again every ``POLL`` seconds (``OPENING`` while the pool is still
finding the batch) on a session of their own, so a reading never waits behind
a full pool's connections. Readings that fail ``GIVE_UP`` times in a row hand
the pool back to probing. The API key goes with the reading, to the same host
only (llama.cpp asks for it there).

Several deployments on one server (two models or two keys on one vLLM: one
``/metrics``) share one reader, and each reading is split among their pools
(``shares``) in proportion to the requests each has out. Each pool then sees
the part of the load that is its own, and together they act on a reading as
one pool would. (Read whole by each, the gauges showed none of them more of
its own out than the server ran, so none shrank: together they kept a queue.)
"""

from __future__ import annotations

import asyncio
import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Protocol

import aiohttp
from yarl import URL

from batchq import __version__
from batchq.live.concurrency import Pool
from batchq.live.transport import authorization

#: Each server's gauges: (running in the batch, waiting for a place in it).
GAUGES = {
    "vLLM": ("vllm:num_requests_running", "vllm:num_requests_waiting"),
    "llama.cpp": ("llamacpp:requests_processing", "llamacpp:requests_deferred"),
    "SGLang": ("sglang:num_running_reqs", "sglang:num_queue_reqs"),
    "TGI": ("tgi_batch_current_size", "tgi_queue_size"),
}
_NAMES = tuple(name for pair in GAUGES.values() for name in pair)
POLL = 0.25  # seconds between two readings, once the batch is known
OPENING = 0.05  # while the pool doubles toward it: each reading can double it
TIMEOUT = 2.0  # a reading's; a late one is stale anyway
GIVE_UP = 3  # readings failed in a row: the gauges are gone
MAX_BYTES = 4 << 20  # vLLM's page, histograms and all, is ~100 KB


@dataclass(frozen=True, slots=True)
class Load:
    server: str  # whose gauges: a key of GAUGES
    running: int
    waiting: int


def metrics_url(base_url: str) -> str:
    """Where a server whose API is at ``base_url`` (``.../v1``) publishes its gauges."""
    url = URL(base_url.rstrip("/"))
    return str(url.with_path(url.path.removesuffix("/v1").rstrip("/") + "/metrics"))


def parse(text: str) -> Load | None:
    """The load in a Prometheus text page, summed over its labels (a server of several
    models or engines); None when the page has no known server's two gauges."""
    sums: dict[str, float] = {}
    for line in text.splitlines():
        if not line.startswith(_NAMES):
            continue
        sample = line.partition(" # ")[0]  # an OpenMetrics exemplar follows the value
        if "{" in sample:
            name, _, labelled = sample.partition("{")
            value = labelled.rpartition("}")[2]
        else:
            name, _, value = sample.partition(" ") if " " in sample else sample.partition("\t")
        try:
            number = float(value.split()[0])
        except (IndexError, ValueError):
            continue
        if name in _NAMES and math.isfinite(number) and number >= 0:
            sums[name] = sums.get(name, 0.0) + number
    for server, (running, waiting) in GAUGES.items():
        counts = sums.get(running, math.nan), sums.get(waiting, math.nan)
        if all(math.isfinite(c) for c in counts):  # both there, and no sum past a float's range
            return Load(server, round(counts[0]), round(counts[1]))
    return None


class Gauges(Protocol):
    async def read(self) -> Load | None: ...

    async def close(self) -> None: ...


class LoadReader:
    """One session reading one server's gauges."""

    def __init__(self, base_url: str, api_key: str | None) -> None:
        self.url = metrics_url(base_url)
        self._headers = {"User-Agent": f"batchq/{__version__}"}
        self._headers.update(authorization(base_url, api_key))
        self._session: aiohttp.ClientSession | None = None

    async def read(self) -> Load | None:
        """The server's load now; None for any answer without the gauges.

        Raises OSError, aiohttp.ClientError or TimeoutError when no answer comes.
        """
        if self._session is None:
            self._session = aiohttp.ClientSession(
                connector=aiohttp.TCPConnector(limit=1),
                timeout=aiohttp.ClientTimeout(total=TIMEOUT),
                headers=self._headers,
            )
        async with self._session.get(self.url, allow_redirects=False) as resp:
            if resp.status != 200:
                return None
            page = bytearray()
            async for chunk in resp.content.iter_chunked(1 << 16):
                page += chunk
                if len(page) > MAX_BYTES:
                    return None
        return parse(page.decode("utf-8", "replace"))

    async def close(self) -> None:
        if self._session is not None:
            await self._session.close()


def shares(load: Load, in_flight: Sequence[int]) -> list[Load]:
    """Each pool's part of one server's ``load``, in proportion to the requests it has out
    (``in_flight``, one count a pool; equal parts while none are out).

    What runs is split into whole parts that sum to it (largest remainders). What waits is
    rounded up: a pool with any out sees one waiting whenever some wait, as a zero there
    would read as room and double a pool on a full server (one too many waiting shrinks a
    pool by about a request more).
    """
    weights = list(in_flight) if any(in_flight) else [1] * len(in_flight)
    total = sum(weights)
    exact = [load.running * weight for weight in weights]  # in 1/total parts
    running = [part // total for part in exact]
    largest = sorted(range(len(exact)), key=lambda i: -(exact[i] % total))
    for i in largest[: load.running - sum(running)]:
        running[i] += 1
    waiting = [-(-load.waiting * weight // total) for weight in weights]  # rounded up
    return [Load(load.server, r, w) for r, w in zip(running, waiting, strict=True)]


async def follow(
    reader: Gauges,
    pools: Sequence[Pool],
    clock: Callable[[], float],
    on_found: Callable[[str], None],
) -> None:
    """Size ``pools``, one server's (its deployments'), by its gauges for as long as it
    publishes them."""
    auto = [pool for pool in pools if not pool.fixed]  # (a fixed one's requests count in shares)
    try:
        first = await _reading(reader)
        if first is None:
            return  # no gauges here (a hosted API, a proxy): probing sizes the pool
        on_found(first.server)
        load: Load | None = first
        failed = 0
        while True:
            if load is None:
                failed += 1
                if failed >= GIVE_UP:
                    for pool in pools:
                        pool.unreported()
                    return
            else:
                failed = 0
                now = clock()
                parts = shares(load, [pool.in_flight for pool in pools])
                for pool, part in zip(pools, parts, strict=True):
                    pool.reported(part.running, part.waiting, now)
            opening = any(p.adaptive.batch is None and p.adaptive.limit < p.ceiling for p in auto)
            await asyncio.sleep(OPENING if opening else POLL)
            load = await _reading(reader)
    finally:
        await reader.close()


async def _reading(reader: Gauges) -> Load | None:
    try:
        return await reader.read()
    except (OSError, aiohttp.ClientError, TimeoutError, UnicodeError):
        return None
