"""``validate --check-endpoint``: which lines the endpoint would refuse, judged before any is paid.

``live/preflight.py`` asks the endpoint what it can tell (its models, their
context length, its tokenizer, which endpoint paths it serves) and counts
each line's prompt tokens; this module judges one request against those
facts, keeps the figures and renders them. It sends nothing itself.

The rules are the servers' own. vLLM (and OpenAI) refuse a request whose
prompt plus ``max_tokens`` passes the context, or, with no ``max_tokens``,
whose prompt alone fills it; llama.cpp refuses only a prompt that fills its
context (a long completion is cut short, not refused). A model the endpoint
does not list is refused, except by llama.cpp, which answers with its one
loaded model whatever the name. OpenAI's strict structured outputs take
only schemas of a documented subset (an object at the root, every object
closed with ``additionalProperties: false`` and listing all its properties
in ``required``), checked here; whether other servers take a schema is told
by nothing short of a completion, so those are reported as not checked.
"""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field
from typing import Any

from batchq.config import JSONObject, show
from batchq.reader import answer_cap

LISTED = 100  # lines listed one by one; --split-out writes them all
VLLM, LLAMA_CPP, OTHER = "vLLM", "llama.cpp", "OpenAI-compatible"


@dataclass(frozen=True, slots=True)
class EndpointFacts:
    """What the endpoint told about itself."""

    url: str  # the base URL, without secrets, as shown
    server: str  # VLLM, LLAMA_CPP or OTHER
    models: frozenset[str] | None = None  # None: no list, or any name is served
    context: dict[str, int] = field(default_factory=dict)  # model -> tokens; "": every model
    tokenizer: bool = False  # the endpoint counts prompt tokens exactly
    unserved: dict[str, int] = field(default_factory=dict)  # endpoint path -> status answered
    strict_schemas: bool = False  # OpenAI's: strict JSON schemas must fit its subset

    def context_of(self, model: str | None) -> int | None:
        return self.context.get(model or "", self.context.get(""))

    def describe(self) -> str:
        parts = [self.server]
        if self.models is not None:
            parts.append(f"models served: {len(self.models):,}")
        else:
            parts.append("any model name" if self.server == LLAMA_CPP else "no list of models")
        lengths = sorted(set(self.context.values()))
        if lengths:
            parts.append("context " + "/".join(f"{n:,}" for n in lengths) + " tokens")
        parts.append("its tokenizer counts" if self.tokenizer else "tokens estimated")
        return f"{self.url} ({', '.join(parts)})"


@dataclass(frozen=True, slots=True)
class Problem:
    """Why the endpoint would refuse a request, before anything is paid for."""

    code: str  # endpoint_not_served, model_not_found, context_length_exceeded, schema_not_supported
    message: str

    def as_dict(self) -> dict[str, str]:
        return {"code": self.code, "message": self.message}


def judge(facts: EndpointFacts, url: str, body: JSONObject, prompt: int) -> list[Problem]:
    """What the endpoint would refuse in ``body`` sent to ``url``, ``prompt`` tokens long."""
    if url in facts.unserved:
        status = facts.unserved[url]
        return [Problem("endpoint_not_served", f"{url} is not served (it answered {status})")]
    problems = []
    model = body.get("model")
    if facts.models is not None and isinstance(model, str) and model not in facts.models:
        problems.append(Problem("model_not_found", f"model {show(model)} is not served"))
    if (over := _over_context(facts, url, body, prompt)) is not None:
        problems.append(Problem("context_length_exceeded", over))
    if facts.strict_schemas and (why := _strict_problem(body)) is not None:
        problems.append(Problem("schema_not_supported", f"strict JSON schema: {why}"))
    return problems


def _strict_problem(body: JSONObject) -> str | None:
    asked = schema_of(body)
    return None if asked is None or not asked[1] else strict_violation(asked[0])


def _over_context(facts: EndpointFacts, url: str, body: JSONObject, prompt: int) -> str | None:
    model = body.get("model")
    context = facts.context_of(model if isinstance(model, str) else None)
    if context is None:
        return None
    cap = answer_cap(body, url)  # each answer, n or not, fits the context beside the prompt
    if cap is None or facts.server == LLAMA_CPP:
        if url == "/v1/embeddings" and prompt <= context:
            return None  # nothing is generated: a prompt may fill the context
        if prompt < context:
            return None
        return f"prompt {prompt:,} tokens fills the context of {context:,}"
    if prompt + cap <= context:
        return None
    return f"prompt {prompt:,} + max_tokens {cap:,} = {prompt + cap:,} tokens > context {context:,}"


def schema_of(body: JSONObject) -> tuple[Any, bool] | None:
    """The JSON schema a request asks its answer to fit, and whether strictly; None if none."""
    fmt: Any = body.get("response_format")
    if isinstance(fmt, dict) and fmt.get("type") == "json_schema":
        fmt = fmt.get("json_schema")  # chat completions nest it one level down
    else:
        text: Any = body.get("text")  # the Responses API's place for it
        fmt = text.get("format") if isinstance(text, dict) else None
        if not (isinstance(fmt, dict) and fmt.get("type") == "json_schema"):
            return None
    if not isinstance(fmt, dict):
        return {}, False
    return fmt.get("schema"), fmt.get("strict") is True


def strict_violation(schema: Any, where: str = "$") -> str | None:
    """Why OpenAI's strict mode would refuse ``schema``, or None if it fits the subset."""
    if not isinstance(schema, dict):
        return "the schema is not an object" if where == "$" else None
    if where == "$" and schema.get("type") != "object":
        return "the root must be an object (type: object)"
    if schema.get("type") == "object" or "properties" in schema:
        if schema.get("additionalProperties") is not False:
            return f"{where} needs additionalProperties: false"
        properties = schema.get("properties")
        names = set(properties) if isinstance(properties, dict) else set()
        required = schema.get("required")
        missing = sorted(names - set(required if isinstance(required, list) else []))
        if missing:
            return f"{where} must list every property in required (missing: {', '.join(missing)})"
    for inner, sub in _subschemas(schema, where):
        if (why := strict_violation(sub, inner)) is not None:
            return why
    return None


def _subschemas(schema: JSONObject, where: str) -> list[tuple[str, Any]]:
    found: list[tuple[str, Any]] = []
    for key in ("properties", "$defs", "definitions"):
        named = schema.get(key)
        if isinstance(named, dict):
            inner = where if key == "properties" else f"{where}.{key}"
            found += [(f"{inner}.{name}", sub) for name, sub in named.items()]
    if "items" in schema:
        found.append((f"{where}[]", schema["items"]))
    options = schema.get("anyOf")
    if isinstance(options, list):
        found += [(f"{where}.anyOf[{i}]", sub) for i, sub in enumerate(options)]
    return found


@dataclass(slots=True)
class Preflight:
    """What ``--check-endpoint`` found, line by line."""

    facts: EndpointFacts
    checked: int = 0  # usable requests judged
    counted: int = 0  # of which the endpoint's tokenizer counted the prompt
    prompt_tokens: int = 0  # counted where it could, estimated elsewhere
    would_fail: int = 0
    by_code: Counter[str] = field(default_factory=Counter)
    listed: list[tuple[int, str, list[Problem]]] = field(default_factory=list)
    schemas: int = 0  # requests with a JSON schema, which no pre-flight can test
    split_out: str | None = None
    split_lines: int = 0  # lines written to split_out: bad lines included

    def add(self, line_no: int, custom_id: str, problems: list[Problem]) -> None:
        if not problems:
            return
        self.would_fail += 1
        self.by_code.update(p.code for p in problems)
        if len(self.listed) < LISTED:
            self.listed.append((line_no, custom_id, problems))

    def as_dict(self) -> JSONObject:
        facts = self.facts
        return {
            "url": facts.url,
            "server": facts.server,
            "models": None if facts.models is None else sorted(facts.models),
            "context": facts.context,
            "tokenizer": facts.tokenizer,
            "not_served": facts.unserved,
            "checked": self.checked,
            "prompt_tokens": self.prompt_tokens,
            "prompt_tokens_counted_by_endpoint": self.counted,
            "would_fail": self.would_fail,
            "would_fail_by_code": dict(self.by_code.most_common()),
            "would_fail_lines": [
                {"line": n, "custom_id": cid, "problems": [p.as_dict() for p in problems]}
                for n, cid, problems in self.listed
            ],
            "schemas_not_checked": self.schemas,
            "split_out": self.split_out,
            "split_out_lines": self.split_lines,
        }


def render_preflight(report: Preflight) -> str:
    """The endpoint's part of ``validate``'s report, for a human."""
    r = report
    lines = [f"  endpoint: {r.facts.describe()}"]
    if not r.would_fail:
        lines.append("  would fail at the endpoint: none")
    else:
        codes = ", ".join(f"{code} {n:,}" for code, n in r.by_code.most_common())
        lines.append(f"  would fail at the endpoint: {r.would_fail:,} requests ({codes})")
        for line_no, custom_id, problems in r.listed:
            why = "; ".join(p.message for p in problems)
            lines.append(f"    line {line_no} ({show(custom_id)}): {why}")
        if r.would_fail > len(r.listed):
            lines.append(f"    ... and {r.would_fail - len(r.listed):,} more")
    if r.schemas:
        lines.append(
            f"  not checked: whether the endpoint takes the JSON schema these ask for: "
            f"{r.schemas:,} requests (only a completion would tell)"
        )
    if r.split_out is not None:
        lines.append(f"  wrote the {r.split_lines:,} lines that would fail to {r.split_out}")
    return "\n".join(lines)
