"""``batchq demo``: the demo job against the built-in endpoint, in a fresh folder.

The endpoint runs in this process on a free port, with some latency and a
few transient faults (503s, dropped connections) so the retries show. The
job runs in a new temporary folder, so the demo can be run any number of
times and never touches the shipped ``jobs/demo``.
"""

from __future__ import annotations

import asyncio
import tempfile
from pathlib import Path

from batchq.config import build_settings
from batchq.errors import Notify
from batchq.job.folder import JOB_TOML, open_job
from batchq.job.settings import read_job_toml, write_job_toml
from batchq.live.runner import RunOptions, run_job
from batchq.mockserver.live import MockOptions, MockServer
from batchq.show.progress import render_summary, summary
from batchq.stats import Stats

DEMO_FAULTS = MockOptions(latency=0.05, latency_jitter=0.15, rate_503=0.03, drop_rate=0.01, seed=7)


def run_demo(source: Path, *, notice: Notify) -> int:
    """Copy the demo job's settings to a temporary folder and run it; return the exit status."""
    stored = read_job_toml(source / JOB_TOML)
    settings = build_settings(stored, {})
    job_dir = Path(tempfile.mkdtemp(prefix="batchq-demo-"))
    input_path = (source / settings.input).resolve()
    stats = asyncio.run(_run(job_dir, stored, input_path, notice))
    figures = summary(
        stats,
        results=str(job_dir / settings.output),
        errors=str(job_dir / settings.errors),
        resume=f"batchq run {job_dir}",
    )
    print(render_summary(figures))
    if stats.interrupted:
        return 130
    return 1 if stats.failed_before + stats.failed else 0


async def _run(job_dir: Path, stored: dict[str, object], input_path: Path, notice: Notify) -> Stats:
    async with MockServer(DEMO_FAULTS) as server:
        notice(f"built-in endpoint on {server.url} (latency 50-200 ms, 3% 503s, 1% drops)")
        settings = build_settings(stored, {"input": str(input_path), "base_url": server.url})
        write_job_toml(job_dir / JOB_TOML, settings)
        job, _ = open_job(
            job_dir, job_dir=None, overrides={}, defaults={}, default_base_url=None, force=False
        )
        notice(f"demo job in {job_dir}")
        options = RunOptions(progress_every=1.0, on_notice=notice, handle_signals=True)
        return await run_job(job, options)
