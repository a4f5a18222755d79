"""What checking an answer against a schema costs (--json-schema): microseconds per answer.

The goal is at most 10 µs per answer for a small schema, so that checking is
never what limits a job. Measured in-process on a labelling schema (an enum
and a bounded number, no other keys), with answers that fit and answers that
do not, for:

- ``jsonschema`` (the reference validator, a validator object made once; ``is_valid``
  only, without the message batchq needs for an answer that does not fit);
- ``fastjsonschema`` (compiled to Python once), the validator batchq uses;
- ``Answers.check``: what batchq does per answer body (find the text, parse it, validate);
- ``Answers.check_line``: the same from the rendered results.jsonl line (what the
  live runner calls: it also parses the output line).

Each row is the median of ``--runs`` timings of ``--answers`` calls (min–max in brackets)
and its ratio to jsonschema. Usage: ``python benchmarks/answers.py [--answers N] [--runs N]``.
"""

from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent))

import fastjsonschema
import harness  # a sibling module, found through the line above
import jsonschema
import orjson

from batchq.answers import Answers
from batchq.records import Request, result_line

SCHEMA = {
    "type": "object",
    "properties": {
        "label": {"type": "string", "enum": ["positive", "negative", "neutral"]},
        "score": {"type": "number", "minimum": 0, "maximum": 1},
    },
    "required": ["label", "score"],
    "additionalProperties": False,
}
FITS = '{"label": "negative", "score": 0.25}'
UNFIT = '{"label": "angry", "score": 0.25}'


def chat_body(text: str) -> dict[str, Any]:
    message = {"role": "assistant", "content": text, "refusal": None}
    choice = {"index": 0, "message": message, "logprobs": None, "finish_reason": "stop"}
    usage = {"prompt_tokens": 40, "completion_tokens": 12, "total_tokens": 52}
    return {
        "id": "chatcmpl-1",
        "object": "chat.completion",
        "model": "m",
        "choices": [choice],
        "usage": usage,
    }


def per_call(fn: Callable[[], object], calls: int, runs: int) -> list[float]:
    """Microseconds per call, one figure a run."""
    found = []
    for _ in range(runs):
        started = time.perf_counter()
        for _ in range(calls):
            fn()
        found.append((time.perf_counter() - started) / calls * 1e6)
    return found


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--answers", type=int, default=20_000)
    parser.add_argument("--runs", type=int, default=7)
    args = parser.parse_args()
    reference = jsonschema.Draft7Validator(SCHEMA)
    compiled = fastjsonschema.compile(SCHEMA)
    answers = Answers(SCHEMA)
    request = Request(1, "c", "/v1/chat/completions", b"{}", 1)
    rows = []
    for kind, text in (("fits", FITS), ("does not fit", UNFIT)):
        value = orjson.loads(text)
        body = chat_body(text)
        raw = orjson.dumps(body)
        line = result_line(request, 200, "req_1", raw, body, attempts=1)

        def fast(value: Any = value) -> None:
            with contextlib.suppress(fastjsonschema.JsonSchemaValueException):
                compiled(value)

        variants: dict[str, Callable[[], object]] = {
            "jsonschema (reference)": lambda value=value: reference.is_valid(value),
            "fastjsonschema": fast,
            "Answers.check (body)": lambda body=body: answers.check(body),
            "Answers.check_line (line)": lambda line=line: answers.check_line(line),
        }
        baseline = None
        for name, fn in variants.items():
            spread = harness.Spread.of(per_call(fn, args.answers, args.runs))
            baseline = baseline or spread.median
            rows.append([kind, name, spread.show(".2f"), f"{spread.median / baseline:.2f}"])
    print(harness.table(["answer", "validator", "µs per answer", "× jsonschema"], rows))
    checked = [float(r[2].split()[0]) for r in rows if r[1].startswith("Answers.check_line")]
    print(
        f"\nbatchq's whole check, from the output line: at most {max(checked):.2f} µs per answer "
        f"(goal: <= 10 µs); median of {args.runs} runs of {args.answers:,}"
    )
    return 0 if statistics.median(checked) <= 10 else 1


if __name__ == "__main__":
    raise SystemExit(main())
