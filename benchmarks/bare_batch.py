"""The provider's own time: the least a client can do with the Files + Batches API.

``benchmarks/batch.py`` measures ``batchq run --via batch`` against this
program on the same built-in endpoint. It takes batch input files already
split (the split is not timed), and for each one, in turn, uploads it and
creates its batch, as batchq does; then polls every open batch each
``--poll`` seconds and downloads the output file of each finished one to
disk. No job folder, no ledger, no checkpoint, no check of what comes back.
What it takes is what the provider (here the mock server: parsing the
uploads, answering each line, serving the downloads) needs, plus the least
client work; batchq's time beyond it is its own.

    python benchmarks/bare_batch.py --base-url URL --poll 0.2 OUT_DIR FILE.jsonl...
"""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path
from typing import Any

import aiohttp


async def upload_and_create(session: aiohttp.ClientSession, base: str, path: Path) -> str:
    with path.open("rb") as f:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", f, filename=path.name, content_type="application/jsonl")
        async with session.post(f"{base}/files", data=form) as response:
            file: dict[str, Any] = await response.json()
    body = {
        "input_file_id": file["id"],
        "endpoint": "/v1/chat/completions",
        "completion_window": "24h",
    }
    async with session.post(f"{base}/batches", json=body) as response:
        batch: dict[str, Any] = await response.json()
    return str(batch["id"])


async def download(session: aiohttp.ClientSession, base: str, file_id: str, target: Path) -> None:
    async with session.get(f"{base}/files/{file_id}/content") as response:
        with target.open("wb") as f:
            async for block in response.content.iter_chunked(1 << 16):
                f.write(block)


async def main(base: str, poll: float, out: Path, files: list[Path]) -> None:
    timeout = aiohttp.ClientTimeout(total=600)
    async with aiohttp.ClientSession(timeout=timeout) as session:
        open_ids = [await upload_and_create(session, base, path) for path in files]
        while open_ids:
            for batch_id in list(open_ids):
                async with session.get(f"{base}/batches/{batch_id}") as response:
                    batch = await response.json()
                if batch["status"] in ("completed", "failed", "expired", "cancelled"):
                    open_ids.remove(batch_id)
                    if batch.get("output_file_id"):
                        target = out / f"{batch_id}.jsonl"
                        await download(session, base, batch["output_file_id"], target)
            if open_ids:
                await asyncio.sleep(poll)


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--base-url", required=True)
    parser.add_argument("--poll", type=float, default=0.2)
    parser.add_argument("out", type=Path)
    parser.add_argument("files", type=Path, nargs="+")
    args = parser.parse_args()
    asyncio.run(main(args.base_url, args.poll, args.out, args.files))
