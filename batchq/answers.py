"""Structured answers: asking for JSON that fits a schema, and checking every answer.

A job with ``--json-schema FILE`` (or ``--json-mode``) asks the endpoint for
JSON in the form that endpoint takes: ``response_format`` on chat and
completions, ``text.format`` on ``/v1/responses``; a body that sets its own
keeps it. Every answer is then checked: the first choice's text must parse as
JSON and, with a schema, fit it. The schema is compiled to Python once by
fastjsonschema, so a small schema costs a few microseconds an answer
(benchmarks/answers.py). Only the lines on the job's own endpoint are asked and
checked: a line addressed elsewhere is sent as written, as the reader sends it.

An answer that does not fit is asked again, up to ``max_invalid`` times: as it
was, or with ``reask`` as a conversation that shows the model its answer and
what was wrong with it. What still does not fit is the job's ``invalid_output``
failure, with the last answer and the validator's message. An answer cut at
``max_tokens`` before its JSON ended is not asked again: the same limit would
cut it again, and every try is paid for.

Everything here is pure: the runner sends, this module decides.
"""

from __future__ import annotations

import json
import re
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any

import orjson

from batchq.config import JSONObject, Settings, show
from batchq.errors import ConfigError
from batchq.records import Outcome, Request, answer_text, error_line, with_extra

#: The endpoints whose answers carry text that can be JSON.
STRUCTURED_ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/responses")
JSON_OBJECT = {"type": "json_object"}
REASK = (
    "Your answer above is not valid: {message}. "
    "Answer again with only the JSON, fitting the schema you were given."
)


@dataclass(frozen=True, slots=True)
class Verdict:
    """An answer judged: its parsed JSON if it fits, else why not (``final``: asking again
    cannot help)."""

    fits: bool
    parsed: Any = None
    message: str = ""
    text: str | None = None
    final: bool = False


class Answers:
    """What a job asks of every answer, and the check of each one.

    Args:
        schema: a JSON Schema the answers must fit; None with ``--json-mode``:
            they must only parse.
        name: the schema's name, as the endpoint is told it.
        endpoint: the job's endpoint, whose answers are checked.
        max_invalid: how many times an answer that does not fit is asked again.
        reask: ask again with the validator's message as a follow-up turn,
            rather than as the request was.
        model: a pydantic model class (``response_model=`` in the Python API): an
            answer that fits the schema must also pass its ``model_validate``, whose
            own validators a JSON schema cannot express.
    """

    __slots__ = (
        *("_model", "_unfit", "_validate"),
        *("endpoint", "max_invalid", "name", "reask", "schema"),
    )

    def __init__(
        self,
        schema: JSONObject | None,
        *,
        name: str = "answer",
        endpoint: str = "/v1/chat/completions",
        max_invalid: int = 2,
        reask: bool = False,
        model: Any = None,
    ) -> None:
        self.schema = schema
        self._model = model
        self.name = _schema_name(name)
        self.endpoint = endpoint
        self.max_invalid = max_invalid
        self.reask = reask
        import fastjsonschema  # here: ~6 ms that a job without a schema does not pay

        self._unfit = fastjsonschema.JsonSchemaValueException
        try:
            self._validate = None if schema is None else fastjsonschema.compile(schema)
        except Exception as exc:
            # Whatever compiling the user's schema raises is the schema's fault: fastjsonschema
            # lets through re.error (a bad "pattern"), AttributeError ("properties": []) and
            # URLError (a remote "$ref" it could not fetch), besides its own exception.
            raise ConfigError(f"the JSON schema {self.name} is not a valid schema: {exc}") from None

    def request_fields(self, endpoint: str) -> JSONObject:
        """What a body on ``endpoint`` gets to ask for structured output (if it lacks it)."""
        if self.schema is None:
            fmt: JSONObject = dict(JSON_OBJECT)
        else:
            fmt = {"type": "json_schema", "name": self.name, "schema": self.schema, "strict": True}
        if endpoint == "/v1/responses":
            return {"text": {"format": fmt}}  # the Responses API's flat form
        if endpoint in STRUCTURED_ENDPOINTS:
            if self.schema is not None:
                fmt = {"type": "json_schema", "json_schema": {k: fmt[k] for k in _NESTED}}
            return {"response_format": fmt}
        return {}  # embeddings have no text to check

    def checks(self, url: str) -> bool:
        """Whether the answers of requests to ``url`` are checked."""
        return url == self.endpoint and url in STRUCTURED_ENDPOINTS

    def check(self, body: JSONObject) -> Verdict:
        """Judge one 2xx answer body."""
        text = answer_text(body)
        if text is None:
            return Verdict(False, message=_no_text(body))
        try:
            parsed = orjson.loads(text)
        except orjson.JSONDecodeError as exc:
            if _cut(body):
                message = (
                    "the answer was cut at its max_tokens before its JSON ended: "
                    "raise max_tokens (asking again would be cut the same way)"
                )
                return Verdict(False, message=message, text=text, final=True)
            return Verdict(False, message=f"the answer is not JSON ({exc})", text=text)
        try:
            if self._validate is not None:
                try:
                    self._validate(parsed)
                except self._unfit as exc:
                    return Verdict(False, message=_fit_message(exc), text=text)
            if self._model is not None:
                try:
                    self._model.model_validate(parsed)
                except ValueError as exc:  # pydantic's ValidationError is one
                    return Verdict(False, message=_model_message(exc), text=text)
        except RecursionError:
            # A recursive schema's validator recurses in Python, a level of the answer a
            # call: orjson reads 1024 levels, more than the stack allows. Asking again would
            # most likely fail the same way, so it is final.
            message = "the answer is nested too deeply to check"
            return Verdict(False, message=message, text=text, final=True)
        return Verdict(True, parsed, text=text)

    def check_line(self, line: bytes) -> Verdict:
        """Judge the answer in a results.jsonl line."""
        body = orjson.loads(line)["response"]["body"]
        return self.check(body)

    def again(self, request: Request, verdict: Verdict) -> Request:
        """The request to send after an answer that did not fit."""
        if not self.reask or verdict.text is None:
            return request
        body = orjson.loads(request.body)
        turns = [
            {"role": "assistant", "content": verdict.text},
            {"role": "user", "content": REASK.format(message=verdict.message)},
        ]
        if request.url == "/v1/chat/completions" and isinstance(body.get("messages"), list):
            body["messages"] = [*body["messages"], *turns]
        elif request.url == "/v1/responses" and body.get("input") is not None:
            given = body["input"]
            start = [{"role": "user", "content": given}] if isinstance(given, str) else given
            if not isinstance(start, list):
                return request
            body["input"] = [*start, *turns]
        else:  # /v1/completions has no turns: send it as it was
            return request
        added = (sum(len(turn["content"]) for turn in turns) + 3) // 4
        # replace(): the model, the prompt's estimate and the cap are the budget's (cost.py)
        return replace(
            request,
            body=orjson.dumps(body),
            tokens=request.tokens + added,
            prompt_estimate=request.prompt_estimate + added,
        )

    def invalid_outcome(self, last: Outcome, verdict: Verdict, answers: int) -> Outcome:
        """The errors.jsonl line of a request whose every answer (``answers``) did not fit,
        ``last`` the result line of the last.

        It keeps the last answer and the message. It is retryable: the request is
        sound and an answer is a sample, so ``--retry-failed`` may try it again
        (perhaps with a higher ``--max-invalid`` or ``--reask``).
        """
        output = orjson.loads(last.line)
        response, extra = output["response"], output["batchq"]
        tries = "the answer" if answers == 1 else f"all {answers} answers"
        line = error_line(
            last.line_no,
            output["custom_id"],
            "invalid_output",
            f"{tries} did not fit: {verdict.message}",
            status=response["status_code"],
            request_id=response["request_id"],
            body=response["body"],
            attempts=extra["attempts"],
            retryable=True,
            batch=extra.get("batch"),
        )
        return Outcome(last.line_no, False, line, last.prompt_tokens, last.completion_tokens)


@dataclass(slots=True)
class Invalid:
    """The answers of one request that did not fit and were asked again, and their tokens
    (paid for)."""

    answers: int = 0
    prompt_tokens: int = 0
    completion_tokens: int = 0

    def add(self, outcome: Outcome) -> None:
        self.answers += 1
        self.prompt_tokens += outcome.prompt_tokens
        self.completion_tokens += outcome.completion_tokens

    def record(self, outcome: Outcome, sent: Request, original: Request) -> Outcome:
        """``outcome`` with what its output line must say of the answers that did not fit.

        The line keeps their count (extra requests) and tokens under ``batchq.invalid``,
        and the request finally sent under ``batchq.sent`` when it was not the input
        line's own (--reask).
        The outcome's tokens include theirs, so the job counts every token it paid for.
        """
        if not self.answers:
            return outcome
        extra: JSONObject = {
            "invalid": {
                "asked_again": self.answers,
                "prompt_tokens": self.prompt_tokens,
                "completion_tokens": self.completion_tokens,
            }
        }
        if sent is not original:
            extra["sent"] = orjson.loads(sent.body)
        outcome.line = with_extra(outcome.line, extra)
        outcome.prompt_tokens += self.prompt_tokens
        outcome.completion_tokens += self.completion_tokens
        return outcome


def load_answers(settings: Settings, job_dir: Path, model: Any = None) -> Answers | None:
    """The job's answer check, its schema file read and compiled; None if it asks for none.
    ``model``: the pydantic model class the answers must also pass (``Answers``).

    Raises ConfigError (exit 2) for a schema file that cannot be read, is not
    JSON, or is not a valid schema.
    """
    if settings.json_schema is None and not settings.json_mode:
        return None
    schema, name = None, "answer"
    if settings.json_schema is not None:
        path = job_dir / Path(settings.json_schema).expanduser()
        schema = read_schema(path)
        title = schema.get("title")
        name = title if isinstance(title, str) else path.stem
    return Answers(
        schema, name=name, endpoint=settings.endpoint, max_invalid=settings.max_invalid,
        reask=settings.reask, model=model,
    )  # fmt: skip


def read_schema(path: Path) -> JSONObject:
    """A JSON Schema file as a dict; ConfigError with one line if it is not one."""
    try:
        schema = json.loads(path.read_text(encoding="utf-8"))
    except OSError as exc:
        raise ConfigError(f"cannot read the JSON schema {path}: {exc.strerror}") from None
    except (ValueError, UnicodeDecodeError) as exc:
        raise ConfigError(f"the JSON schema {path} is not JSON: {exc}") from None
    if not isinstance(schema, dict):
        raise ConfigError(f"the JSON schema {path} must be a JSON object, not {show(schema)}")
    return schema


_NESTED = ("name", "schema", "strict")


def _schema_name(name: str) -> str:
    # OpenAI takes a-z, A-Z, 0-9, _ and -, at most 64 characters.
    return re.sub(r"[^A-Za-z0-9_-]", "_", name)[:64] or "answer"


def _cut(body: JSONObject) -> bool:
    """Whether the answer stopped at its token limit."""
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        return choices[0].get("finish_reason") == "length"
    return body.get("status") == "incomplete"


def _no_text(body: JSONObject) -> str:
    choices = body.get("choices")
    if isinstance(choices, list) and choices and isinstance(choices[0], dict):
        message = choices[0].get("message")
        refusal = message.get("refusal") if isinstance(message, dict) else None
        if isinstance(refusal, str) and refusal:
            return f"the model refused: {show(refusal)}"
    return "the answer has no text"


def _model_message(exc: ValueError) -> str:
    """A pydantic ValidationError in one line: "the answer.label: Value error, ..."."""
    errors = getattr(exc, "errors", None)
    if not callable(errors):
        return f"the answer is not valid: {exc}"
    parts = []
    for error in errors()[:3]:
        where = ".".join(str(part) for part in error.get("loc", ()))
        parts.append(f"the answer{'.' + where if where else ''}: {error.get('msg', '')}")
    return "; ".join(parts)


def _fit_message(exc: Exception) -> str:
    # fastjsonschema names the root "data": "data.label must be one of [...]".
    message = str(getattr(exc, "message", exc))
    return "the answer" + message[4:] if message.startswith("data") else message
