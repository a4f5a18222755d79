"""Type-checked by `make lint` (mypy --strict), never run: the public API as users write it."""

from __future__ import annotations

import batchq


def answers(questions: list[str]) -> list[str | None]:
    results: list[batchq.Result] = batchq.run(questions, model="m", job="jobs/q", rpm=600)
    failed: list[batchq.Error] = [r.error for r in results if r.error is not None]
    assert all(isinstance(e.message, str) for e in failed)
    return [r.text for r in results]


async def streamed(bodies: list[dict[str, object]]) -> int:
    total = 0
    async with batchq.stream(bodies, model="m", concurrency="auto") as results:
        async for r in results:
            total += r.completion_tokens or 0
    more = await batchq.arun(bodies, model="m", progress=False)
    return total + len(more)


def exported(job: str) -> list[str | None]:
    try:
        return [r.custom_id for r in batchq.open_job(job).results()]
    except batchq.BatchqError as exc:
        raise SystemExit(exc.exit_code) from exc


def within_budget(questions: list[str], budget: float) -> float | None:
    prices = {"qwen-max": {"in": 2.4, "out": 9.6}}
    try:
        batchq.run(questions, model="m", job="jobs/q", prices=prices, max_cost=budget)
    except batchq.BudgetReached as exc:
        spent: float = exc.spent
        pending: int | None = exc.pending
        return spent if pending else None
    return None
