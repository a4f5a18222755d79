"""What a job costs: prices, the tokens the endpoint billed, and the budget's arithmetic.

Pure: no files, no clock, no event loop. The live runner feeds it; job/spend.py
keeps its ``Tally`` beside the journal; show/ renders it.

Money is counted from what the endpoint *reported*: the ``usage`` of every 2xx
answer, whichever attempt it answered (a retry that got a 2xx, an invalid
answer asked again, the winning copy of a hedge). A 5xx, a 429 or a dropped
connection reports nothing and costs nothing here. With no price, no cost is
shown and none is guessed.

A budget (``--max-cost``) is kept by never sending a request that could take the
job past it, counting every request in flight at its worst: as many prompt
tokens as its body has bytes (a byte-level BPE makes at most one token of a
byte, and the body's JSON outweighs a chat template's few tokens a message;
grown by the largest ratio of reported tokens to bytes seen so far, as images
by URL can pass it; an image inlined as a data URL counts ``IMAGE_WORST_TOKENS``,
not its bytes) plus its completion cap (``max_tokens`` and its kin, times
``n``; ``WORST_COMPLETION_TOKENS`` when a request sets none, which the endpoint
does not reveal). Not the characters / 4 that pace ``--tpm``: a Chinese prompt
makes about one token a character, and its first requests would all have gone
at a quarter of their cost.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import Enum
from typing import Any

from batchq.errors import BudgetReached
from batchq.records import Request
from batchq.stats import Stats

PER_TOKENS = 1_000_000  # prices are per million tokens
#: Completion tokens a budget assumes for a request that sets no maximum. Endpoints let
#: such a request run to the model's context; set --max-tokens for a budget that holds.
WORST_COMPLETION_TOKENS = 4096
NO_MODEL = ""  # the tally's key for requests that name no model (the endpoint's default)
#: The most prompt tokens one image costs: Qwen-VL's 16,384 at its largest (OpenAI's
#: models stay under 2,500).
IMAGE_WORST_TOKENS = 16_384
_DATA_URL = re.compile(rb"data:[\w.+/-]*;base64,[A-Za-z0-9+/=]*")


@dataclass(frozen=True, slots=True)
class Price:
    """Per million tokens: prompt, completion, and cached prompt (None: as other prompt)."""

    input: float
    output: float
    cached_input: float | None = None

    def of(self, prompt: int, cached: int, completion: int) -> float:
        """The price of one answer's tokens; ``cached`` is part of ``prompt``."""
        cached_rate = self.input if self.cached_input is None else self.cached_input
        return (
            (prompt - cached) * self.input + cached * cached_rate + completion * self.output
        ) / PER_TOKENS


@dataclass(frozen=True, slots=True)
class Prices:
    """The job's price list: one per model (``[prices]`` in job.toml), else the default."""

    default: Price | None
    by_model: Mapping[str, Price] = field(default_factory=dict)

    @classmethod
    def from_settings(
        cls,
        price_in: float,
        price_out: float,
        price_cached_in: float | None,
        table: Mapping[str, Mapping[str, float]],
    ) -> Prices | None:
        """None when no price is set at all: then nothing is shown or guessed."""
        default = None
        if price_in or price_out:
            default = Price(price_in, price_out, price_cached_in)
        by_model = {
            model: Price(row.get("in", 0.0), row.get("out", 0.0), row.get("cached_in"))
            for model, row in table.items()
        }
        if default is None and not by_model:
            return None
        return cls(default, by_model)

    def of(self, model: str | None) -> Price | None:
        return self.by_model.get(model or NO_MODEL, self.default)

    def cost(self, tally: Tally) -> float:
        """What ``tally``'s tokens cost; tokens of a model with no price count nothing."""
        total = 0.0
        for model, (_, prompt, cached, completion) in tally.by_model.items():
            if (price := self.of(model)) is not None:
                total += price.of(prompt, cached, completion)
        return total

    def unpriced(self, tally: Tally) -> list[str]:
        """The models in ``tally`` that have no price."""
        return sorted(m or "(no model)" for m in tally.by_model if self.of(m) is None)


def usage_tokens(body: Mapping[str, Any]) -> tuple[int, int, int]:
    """Prompt, cached prompt and completion tokens of an answer's ``usage`` (chat,
    completions, embeddings and responses shapes); zeros where it says nothing."""
    usage = body.get("usage")
    if not isinstance(usage, dict):
        return 0, 0, 0
    prompt = _count(usage.get("prompt_tokens", usage.get("input_tokens")))
    completion = _count(usage.get("completion_tokens", usage.get("output_tokens")))
    details = usage.get("prompt_tokens_details", usage.get("input_tokens_details"))
    cached = _count(details.get("cached_tokens")) if isinstance(details, dict) else 0
    return prompt, min(cached, prompt), completion


def _count(value: Any) -> int:
    return value if isinstance(value, int) and not isinstance(value, bool) and value > 0 else 0


@dataclass(slots=True)
class Tally:
    """Tokens billed, by model: ``[answers, prompt, cached prompt, completion]``."""

    by_model: dict[str, list[int]] = field(default_factory=dict)

    def add(self, model: str | None, prompt: int, cached: int, completion: int) -> None:
        row = self.by_model.get(model or NO_MODEL)
        if row is None:
            row = self.by_model[model or NO_MODEL] = [0, 0, 0, 0]
        row[0] += 1
        row[1] += prompt
        row[2] += cached
        row[3] += completion

    def copy(self) -> Tally:
        return Tally({model: list(row) for model, row in self.by_model.items()})

    def merge(self, other: Tally) -> None:
        for model, row in other.by_model.items():
            mine = self.by_model.setdefault(model, [0, 0, 0, 0])
            for i, n in enumerate(row):
                mine[i] += n

    @property
    def answers(self) -> int:
        return sum(row[0] for row in self.by_model.values())

    def as_json(self) -> dict[str, Any]:
        return {model: dict(zip(_FIELDS, row, strict=True)) for model, row in self.by_model.items()}

    @classmethod
    def from_json(cls, data: Any) -> Tally:
        """A tally as ``as_json`` wrote it; ValueError if it is not one."""
        if not isinstance(data, dict):
            raise ValueError("not an object")
        tally = cls()
        for model, row in data.items():
            if not isinstance(row, dict):
                raise ValueError(f"{model}: not an object")
            counts = [row.get(name, 0) for name in _FIELDS]
            if not all(type(n) is int and n >= 0 for n in counts):
                raise ValueError(f"{model}: counts must be whole numbers")
            tally.by_model[str(model)] = counts
        return tally


_FIELDS = ("answers", "prompt_tokens", "cached_tokens", "completion_tokens")


class Verdict(Enum):
    SEND = "send"  # within the budget even if everything in flight costs its worst
    WAIT = "wait"  # would fit once what is in flight has answered (and cost less)
    STOP = "stop"  # would cross the budget even with nothing in flight


@dataclass(slots=True)
class Meter:
    """One run's money: spent before it (from the job's files), spent since, and with a
    budget, what is in flight at its worst.

    The runner asks ``verdict`` before a request goes, ``reserve``s its worst cost,
    ``release``s it when the attempt ends however it ends, and adds what a 2xx
    reported with ``paid``; nothing between ``release`` and ``paid`` may yield.
    """

    prices: Prices
    tally: Tally  # every run's tokens, this one's included
    limit: float | None = None  # --max-cost
    spent_before: float = 0.0
    spent: float = 0.0  # this run's
    reserved: float = 0.0  # worst cost of the requests in flight
    reservations: int = 0  # requests in flight (with a budget)
    prompt_ratio: float = 1.0  # reported prompt tokens / body bytes, at most, seen so far
    unpriced: set[str] = field(default_factory=set)  # models answered that have no price
    wanted: float = 0.0  # with the budget reached: what the job would have needed to go on

    @classmethod
    def open(cls, prices: Prices, tally: Tally, limit: float | None) -> Meter:
        return cls(prices, tally, limit, spent_before=prices.cost(tally))

    @property
    def total(self) -> float:
        """Spent by the job so far, every run."""
        return self.spent_before + self.spent

    def worst(self, request: Request) -> float | None:
        """The most ``request`` can cost; None if its model has no price."""
        price = self.prices.of(request.model)
        if price is None:
            return None
        cap = request.completion_cap
        completion = WORST_COMPLETION_TOKENS if cap is None else cap
        prompt = round(prompt_bound(request.body) * self.prompt_ratio)
        return price.of(prompt, 0, completion)

    def verdict(self, worst: float) -> Verdict:
        if self.limit is None or self.total + self.reserved + worst <= self.limit:
            return Verdict.SEND
        if self.reservations and self.total + worst <= self.limit:
            return Verdict.WAIT  # what is in flight will answer, and free its reservation
        self.wanted = max(self.wanted, self.total + worst)
        return Verdict.STOP

    def reserve(self, worst: float) -> None:
        self.reserved += worst
        self.reservations += 1

    def release(self, worst: float) -> None:
        self.reservations -= 1
        # Exactly nothing once nothing is in flight: float sums do not cancel out exactly,
        # and a crumb left over must never make a request wait for a release to come.
        self.reserved = self.reserved - worst if self.reservations else 0.0

    def paid(self, request: Request, prompt: int, cached: int, completion: int) -> bool:
        """Count one 2xx answer's reported tokens; False the first time its model turns
        out to have no price (its tokens are kept, and cost nothing until it has one)."""
        self.tally.add(request.model, prompt, cached, completion)
        bound = prompt_bound(request.body)
        if bound and prompt > bound * self.prompt_ratio:
            self.prompt_ratio = prompt / bound
        price = self.prices.of(request.model)
        if price is not None:
            self.spent += price.of(prompt, cached, completion)
            return True
        model = request.model or NO_MODEL
        if model in self.unpriced:
            return True
        self.unpriced.add(model)
        return False


def prompt_bound(body: bytes) -> int:
    """The most prompt tokens a request's ``body`` can make: one a byte, but for an image
    inlined as a data URL, whose tokens follow its pixels, not its bytes (a 300 KB photo
    is about a thousand): ``IMAGE_WORST_TOKENS`` each."""
    if b";base64," not in body:
        return len(body)
    images = _DATA_URL.findall(body)
    return len(body) - sum(map(len, images)) + IMAGE_WORST_TOKENS * len(images)


def projected(spent: float, done: int, pending: int | None) -> float | None:
    """The job's total cost if every pending line costs what a done line did on average."""
    if pending is None or not done:
        return None
    return spent + spent / done * pending


def cost_figures(
    spent: float, done: int, pending: int | None, budget: float | None
) -> dict[str, Any]:
    """The job's cost as the summary and ``status --json`` show it."""
    total = projected(spent, done, pending)
    return {
        "spent": round(spent, 6),
        "projected": None if total is None else round(total, 6),
        "budget": budget,
    }


def suggested_budget(
    spent: float, done: int, pending: int | None, limit: float, wanted: float = 0.0
) -> float:
    """A budget that should see the job through: the projection, room for the last
    request's worst (what the request it stopped at needed beyond what was spent,
    ``wanted - spent``) and a tenth more, rounded up to a cent; never less than half
    again the budget that was reached."""
    room = max(0.0, wanted - spent)
    budget = max(limit * 1.5, ((projected(spent, done, pending) or 0.0) + room) * 1.1)
    return -(-budget * 100 // 1) / 100


def budget_reached(stats: Stats) -> BudgetReached:
    """What a run that stopped at its budget tells its user (exit 4)."""
    spent, limit, pending = stats.cost or 0.0, stats.budget or 0.0, stats.pending
    left = "" if pending is None else f", {pending:,} lines pending"
    return BudgetReached(
        f"stopped at the budget: {money(spent)} spent of {money(limit)} (--max-cost){left}; "
        "nothing is lost",
        spent=spent,
        limit=limit,
        pending=pending,
    )


def money(amount: float) -> str:
    """An amount as the summary shows it: cents, or four places below one unit."""
    return f"${amount:,.2f}" if amount >= 1 or amount == 0 else f"${amount:.4f}"
