"""Structured answers for the built-in endpoint: JSON that fits the schema a request asks for.

A request that asks for JSON (``response_format`` on chat and completions,
``text.format`` on ``/v1/responses``) is answered with a deterministic
instance of its schema: the same prompt gets the same answer, and the choices
(enums, booleans, numbers) vary with the prompt, so a labelling job gets a
spread of labels. At ``invalid_json_rate`` the answer is broken instead, half
the time as text that is not JSON, half as JSON that does not fit the schema,
as real models sometimes answer. The generator knows the schema keywords that
structured outputs use; anything else it leaves out.
"""

from __future__ import annotations

import zlib
from typing import Any

JSONObject = dict[str, Any]

#: The schema of a request in JSON mode ({"type": "json_object"}): any object.
ANY_OBJECT: JSONObject = {"type": "object"}
_DEPTH = 16  # of nested schemas followed; deeper ones get null (a recursive $ref)


def requested_schema(body: JSONObject) -> JSONObject | None:
    """The schema a request body asks its answer to fit; None if it asks for no JSON."""
    fmt = body.get("response_format")
    if not isinstance(fmt, dict):
        text = body.get("text")
        fmt = text.get("format") if isinstance(text, dict) else None
    if not isinstance(fmt, dict):
        return None
    if fmt.get("type") == "json_object":
        return ANY_OBJECT
    if fmt.get("type") != "json_schema":
        return None
    nested = fmt.get("json_schema")  # chat completions nest it; the Responses API does not
    schema = (nested if isinstance(nested, dict) else fmt).get("schema")
    return schema if isinstance(schema, dict) else ANY_OBJECT


def fitting(schema: JSONObject, prompt: str) -> Any:
    """A value that fits ``schema``, chosen by ``prompt``: the same prompt, the same value."""
    return _instance(schema, schema, zlib.crc32(prompt.encode()), _DEPTH)


def unfitting(schema: JSONObject, draw: float) -> str:
    """An answer text that ``schema`` refuses: not JSON, or JSON of the wrong kind."""
    if draw < 0.5 or "type" not in schema:
        return '{"answer": "cut short'  # not JSON at all
    return '["not", "an", "object"]' if schema.get("type") == "object" else '{"not": "this"}'


def _instance(schema: Any, root: JSONObject, seed: int, depth: int) -> Any:
    if not isinstance(schema, dict) or depth <= 0:
        return None
    if isinstance(ref := schema.get("$ref"), str):
        return _instance(_resolve(ref, root), root, seed, depth - 1)
    if "const" in schema:
        return schema["const"]
    enum = schema.get("enum")
    if isinstance(enum, list) and enum:
        return enum[seed % len(enum)]
    for key in ("anyOf", "oneOf", "allOf"):
        options = schema.get(key)
        if isinstance(options, list) and options:
            return _instance(options[0], root, seed, depth - 1)
    kind = schema.get("type", "object" if "properties" in schema else None)
    if isinstance(kind, list):  # ["string", "null"]: the first that is not null
        kind = next((k for k in kind if k != "null"), "null")
    if kind == "object":
        properties = schema.get("properties")
        if not isinstance(properties, dict):
            return {}
        return {
            name: _instance(sub, root, seed + i, depth - 1)
            for i, (name, sub) in enumerate(properties.items())
        }
    if kind == "array":
        low = schema.get("minItems", 1)
        count = max(low, 1) if isinstance(low, int) else 1
        high = schema.get("maxItems")
        if isinstance(high, int):
            count = min(count, high)
        return [_instance(schema.get("items", {}), root, seed + i, depth - 1) for i in range(count)]
    if kind in ("integer", "number"):
        return _number(schema, seed, integer=kind == "integer")
    if kind == "boolean":
        return seed % 2 == 0
    if kind == "string":
        low = schema.get("minLength", 0)
        text = f"text {seed % 1000}"
        return text.ljust(low if isinstance(low, int) else 0, "x")[: schema.get("maxLength", 64)]
    return None


def _number(schema: JSONObject, seed: int, *, integer: bool) -> int | float:
    low = _bound(schema, "minimum", "exclusiveMinimum", 0, 1)
    high = _bound(schema, "maximum", "exclusiveMaximum", low + 10, -1)
    if integer:
        low, high = int(low), int(high)
        return low + seed % max(1, high - low + 1)
    return low + (seed % 1000) / 1000 * max(0.0, high - low)


def _bound(schema: JSONObject, name: str, exclusive: str, default: float, step: int) -> float:
    """A number's inclusive bound; an exclusive one moved a step inside."""
    for key, inside in ((name, 0), (exclusive, step)):
        value = schema.get(key)
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value + inside)
    return default


def _resolve(ref: str, root: JSONObject) -> Any:
    """A local reference: ``#/$defs/Label``, ``#/definitions/Label``, ``#``."""
    if not ref.startswith("#"):
        return None
    node: Any = root
    for part in filter(None, ref[1:].split("/")):
        key = part.replace("~1", "/").replace("~0", "~")
        node = node.get(key) if isinstance(node, dict) else None
    return node
