"""The baseline batchq is measured against: the least a Python client can do per request.

A bare aiohttp + orjson worker pool with nothing of batchq's contract: no rate
limiter, no checkpoint, no retries, no job folder. It reads the same JSONL
input line by line (OpenAI Batch API lines or bare bodies), fills in the
model, posts each body to ``<base-url>/chat/completions`` from 64 workers
sharing one ``ClientSession`` (``TCPConnector(limit=64)``) fed by a bounded
``asyncio.Queue``, and writes ``{"custom_id", "response": {"status_code",
"body"}}`` lines with orjson, one ``write`` per batch of finished requests.

Whatever batchq costs beyond this program is the price of its promises
(exactly-once output, resumability, pacing, retries); ``benchmarks/run.py``
reports batchq's throughput, CPU time and memory as ratios to this one.

    python benchmarks/bare_client.py INPUT.jsonl OUTPUT.jsonl --base-url URL [--uvloop]
"""

from __future__ import annotations

import argparse
import asyncio
import sys
from collections.abc import Callable, Coroutine
from typing import Any, BinaryIO

import aiohttp
import orjson

WORKERS = 64
BATCH = 256  # most lines written per write()


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("input", help="JSONL input (Batch API lines or bare bodies)")
    parser.add_argument("output", help="JSONL output file (truncated)")
    parser.add_argument("--base-url", required=True, help="e.g. http://127.0.0.1:8080/v1")
    parser.add_argument("--model", default="m", help="model for bodies that name none")
    parser.add_argument("--workers", type=int, default=WORKERS)
    parser.add_argument("--uvloop", action="store_true", help="run on uvloop (if installed)")
    return parser.parse_args(argv)


def to_request(raw: bytes, line_no: int, model: str) -> tuple[str, bytes]:
    """The custom_id and serialised body of one input line."""
    obj = orjson.loads(raw)
    body = obj.get("body") if isinstance(obj.get("body"), dict) else obj
    custom_id = str(obj.get("custom_id") or body.pop("custom_id", None) or f"line-{line_no}")
    body.setdefault("model", model)
    return custom_id, orjson.dumps(body)


async def read_lines(src: BinaryIO, queue: asyncio.Queue[Any], model: str, workers: int) -> None:
    for line_no, raw in enumerate(src, 1):
        if raw.strip():
            await queue.put(to_request(raw, line_no, model))
    for _ in range(workers):
        await queue.put(None)


async def work(
    session: aiohttp.ClientSession, url: str, inbox: asyncio.Queue[Any], outbox: asyncio.Queue[Any]
) -> None:
    while (item := await inbox.get()) is not None:
        custom_id, body = item
        async with session.post(url, data=body) as resp:
            data = await resp.read()
            status = resp.status
        line = {"custom_id": custom_id, "response": {"status_code": status, "body": data}}
        await outbox.put(line)
    await outbox.put(None)


async def write_lines(dst: BinaryIO, outbox: asyncio.Queue[Any], workers: int) -> int:
    """Write finished requests, one write per batch; return how many."""
    done = finished_workers = 0
    while finished_workers < workers:
        batch = [await outbox.get()]
        while len(batch) < BATCH and not outbox.empty():
            batch.append(outbox.get_nowait())
        lines = []
        for item in batch:
            if item is None:
                finished_workers += 1
                continue
            item["response"]["body"] = orjson.loads(item["response"]["body"])
            lines.append(orjson.dumps(item, option=orjson.OPT_APPEND_NEWLINE))
        dst.write(b"".join(lines))
        done += len(lines)
    return done


async def main_async(args: argparse.Namespace, src: BinaryIO, dst: BinaryIO) -> int:
    url = args.base_url.rstrip("/") + "/chat/completions"
    inbox: asyncio.Queue[Any] = asyncio.Queue(maxsize=2 * args.workers)
    outbox: asyncio.Queue[Any] = asyncio.Queue(maxsize=4 * args.workers)
    connector = aiohttp.TCPConnector(limit=args.workers)
    headers = {"Content-Type": "application/json"}
    async with (
        aiohttp.ClientSession(connector=connector, headers=headers) as session,
        asyncio.TaskGroup() as tg,
    ):
        tg.create_task(read_lines(src, inbox, args.model, args.workers))
        for _ in range(args.workers):
            tg.create_task(work(session, url, inbox, outbox))
        writer = tg.create_task(write_lines(dst, outbox, args.workers))
    return writer.result()


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    run: Callable[[Coroutine[Any, Any, int]], int] = asyncio.run
    if args.uvloop:
        try:
            import uvloop
        except ImportError:
            print("--uvloop: uvloop is not installed (pip install uvloop)", file=sys.stderr)
            return 2
        run = uvloop.run
    # The bare client reads and writes with plain blocking file calls, as batchq does.
    with open(args.input, "rb", buffering=1 << 20) as src, open(args.output, "wb") as dst:
        done = run(main_async(args, src, dst))
    print(f"{done} requests", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
