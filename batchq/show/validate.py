"""``batchq validate``: a dry run that sends nothing and says what a run would send.

Every line goes through the same ``parse_line`` as a real run, so a line
that validates is a line that runs, with the job's model, system prompt and
defaults filled in. Tokens are estimated the same way as for ``--tpm``;
completion tokens are counted at their cap (``max_tokens`` and the like),
which is what a run can spend at most.

Finding duplicate ``custom_id``s keeps one dict entry per distinct id, the
one part of this command whose memory grows with the input.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson

from batchq.config import show
from batchq.errors import InputError
from batchq.reader import (
    RequestTemplate,
    check_jsonl,
    completion_cap,
    parse_line,
    prompt_tokens,
    without_bom,
)
from batchq.records import Request

EXAMPLES = 10  # bad lines and duplicates listed by line number


@dataclass(slots=True)
class Report:
    """What ``validate`` found in one input file."""

    path: str
    lines: int = 0
    blank: int = 0
    good: int = 0
    bad: int = 0
    bad_lines: list[tuple[int, str]] = field(default_factory=list)  # the first few
    duplicates: int = 0
    duplicate_ids: list[tuple[str, int, int]] = field(default_factory=list)  # id, first, again
    endpoints: Counter[str] = field(default_factory=Counter)
    models: Counter[str] = field(default_factory=Counter)
    prompt_tokens: int = 0
    prompt_counted: int = 0  # requests whose prompt the endpoint counted (--check-endpoint)
    completion_tokens: int = 0  # at most: the sum of the caps
    uncapped: int = 0  # requests with no completion cap, counted at 0 above
    price_in: float = 0.0  # per million tokens
    price_out: float = 0.0
    # lines and bytes a request line takes in a batch file, by (endpoint, model): --via batch
    groups: Counter[tuple[str, str]] = field(default_factory=Counter)
    group_bytes: Counter[tuple[str, str]] = field(default_factory=Counter)
    largest: int = 0  # bytes of the largest request body

    @property
    def cost(self) -> dict[str, float] | None:
        if not (self.price_in or self.price_out):
            return None
        prompt = self.prompt_tokens * self.price_in / 1e6
        completion = self.completion_tokens * self.price_out / 1e6
        return {"prompt": prompt, "completion": completion, "total": prompt + completion}

    def as_dict(self) -> dict[str, Any]:
        return {
            "input": self.path,
            "lines": self.lines,
            "blank": self.blank,
            "requests": self.good + self.bad,
            "usable": self.good,
            "bad": self.bad,
            "bad_lines": [{"line": n, "message": m} for n, m in self.bad_lines],
            "duplicate_custom_ids": self.duplicates,
            "duplicates": [
                {"custom_id": cid, "first_line": first, "line": again}
                for cid, first, again in self.duplicate_ids
            ],
            "endpoints": dict(self.endpoints.most_common()),
            "models": dict(self.models.most_common()),
            "prompt_tokens": self.prompt_tokens,
            "prompt_tokens_counted_by_endpoint": self.prompt_counted,
            "max_completion_tokens": self.completion_tokens,
            "requests_without_max_tokens": self.uncapped,
            "cost": self.cost,
        }


def validate(
    path: Path, template: RequestTemplate, *, price_in: float = 0.0, price_out: float = 0.0
) -> Report:
    """Read ``path`` as a run would and report on every line; sends nothing."""
    check_jsonl(path)
    report = Report(str(path), price_in=price_in, price_out=price_out)
    first_line_of: dict[str, int] = {}
    try:
        with path.open("rb") as f:
            for line_no, read in enumerate(f, start=1):
                report.lines = line_no
                raw = without_bom(read, line_no)
                if not raw.strip():
                    report.blank += 1
                    continue
                parsed = parse_line(raw, line_no, template)
                if isinstance(parsed, Request):
                    _count(report, parsed)
                    _check_duplicate(report, first_line_of, parsed.custom_id, line_no)
                else:
                    report.bad += 1
                    if len(report.bad_lines) < EXAMPLES:
                        report.bad_lines.append(
                            (line_no, orjson.loads(parsed.line)["error"]["message"])
                        )
    except OSError as exc:
        raise InputError(f"cannot read {path}: {exc.strerror}") from exc
    return report


def _count(report: Report, request: Request) -> None:
    body = orjson.loads(request.body)
    report.good += 1
    model = str(body.get("model", "(none)"))
    report.endpoints[request.url] += 1
    report.models[model] += 1
    report.groups[request.url, model] += 1
    report.group_bytes[request.url, model] += len(request.body)
    report.largest = max(report.largest, len(request.body))
    report.prompt_tokens += prompt_tokens(body)
    cap = completion_cap(body, request.url)
    if cap is None:
        report.uncapped += 1
    else:
        report.completion_tokens += cap


def _check_duplicate(report: Report, first_line_of: dict[str, int], cid: str, line: int) -> None:
    first = first_line_of.setdefault(cid, line)
    if first != line:
        report.duplicates += 1
        if len(report.duplicate_ids) < EXAMPLES:
            report.duplicate_ids.append((cid, first, line))


def render_report(report: Report) -> str:
    """The report for a human."""
    r = report
    lines = [
        f"batchq validate: {r.path}",
        f"  {r.lines:,} lines: {r.good + r.bad:,} requests, {r.blank:,} blank; "
        f"{r.good:,} usable, {r.bad:,} bad",
    ]
    lines += [f"  bad line {n}: {message}" for n, message in r.bad_lines]
    if r.bad > len(r.bad_lines):
        lines.append(f"  ... and {r.bad - len(r.bad_lines):,} more bad lines")
    if r.duplicates:
        lines.append(f"  duplicate custom_ids: {r.duplicates:,}")
        lines += [f"    {show(cid)} on lines {a} and {b}" for cid, a, b in r.duplicate_ids]
    lines.append("  endpoints: " + _counts(r.endpoints))
    lines.append("  models: " + _counts(r.models))
    how = "estimated"
    if r.prompt_counted:
        how = "prompt counted by the endpoint"
        how += f" for {r.prompt_counted:,} of {r.good:,}" if r.prompt_counted < r.good else ""
    lines.append(
        f"  tokens ({how}): {r.prompt_tokens:,} prompt + at most "
        f"{r.completion_tokens:,} completion"
        + (f" ({r.uncapped:,} requests set no max_tokens)" if r.uncapped else "")
    )
    if cost := r.cost:
        lines.append(
            f"  cost (estimated, at most): ${cost['total']:,.2f} "
            f"(${cost['prompt']:,.2f} prompt + ${cost['completion']:,.2f} completion)"
        )
    return "\n".join(lines)


def _counts(counter: Counter[str]) -> str:
    return ", ".join(f"{name} {n:,}" for name, n in counter.most_common()) or "none"
