"""A job's settings: what they are, their defaults, and how they are checked.

job/settings.py reads and writes them as ``job.toml``.

Settings come from three places, later ones winning: the defaults below,
the job's ``job.toml``, and the command line. ``job.toml`` is written on the
first run and is meant to be edited by hand; it never holds an API key, only
the *name* of the environment variable that does.

Settings split in two: those that define what a request *is* (endpoint,
model, system prompt, default parameters) and those that only say how fast
or how patiently to send it. A resumed job may change the second kind
freely; changing the first would mix two different jobs in one results
file, so it needs ``--force``.

All times are float seconds.
"""

from __future__ import annotations

import json
import os
import re
import shlex
from collections.abc import Mapping
from dataclasses import dataclass, field, fields, replace
from typing import Any
from urllib.parse import parse_qsl, quote, unquote, urlencode, urlsplit

from batchq.errors import ConfigError

JSONObject = dict[str, Any]

OPENAI_BASE_URL = "https://api.openai.com/v1"
ENDPOINTS = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings", "/v1/responses")
#: Settings that change what is sent; a resumed job keeps them unless forced.
REQUEST_SETTINGS = ("endpoint", "model", "system", "defaults", "json_schema", "json_mode")


@dataclass(frozen=True, slots=True, kw_only=True)
class Settings:
    """Everything job.toml can hold; paths are as written there (relative to the job)."""

    input: str
    output: str = "results.jsonl"
    errors: str = "errors.jsonl"
    base_url: str = OPENAI_BASE_URL
    api_key_env: str = "OPENAI_API_KEY"
    endpoint: str = "/v1/chat/completions"
    model: str | None = None
    system: str | None = None
    defaults: JSONObject = field(default_factory=dict)
    concurrency: int | str = "auto"  # "auto": sized to the pace or the endpoint's capacity
    max_concurrency: int = 1024  # the ceiling of an "auto" pool
    hedge: bool = True  # duplicate stragglers once nothing is left to send
    rpm: float = 0.0
    tpm: float = 0.0
    max_attempts: int = 8
    timeout: float = 600.0
    connect_timeout: float = 30.0
    drain_timeout: float = 5.0
    max_wait: float = 900.0  # the longest wait an endpoint may ask for; longer stops the job
    max_response_bytes: int = 32 * 1024 * 1024  # of one answer, after decompression
    limits_store: str | None = None  # redis://HOST:PORT/DB shared by the processes of one account
    limits_key: str | None = None  # None: the base URL and a hash of the API key
    via: str = "live"  # "live": real time; "batch": the provider's Batch API; "auto": both
    deadline: str | None = None  # --via auto: "90m", "6h", "2d" from the start of a run
    batch_dialect: str | None = None  # "openai" or "dashscope"; None: from the base URL
    completion_window: str = "24h"
    batch_max_lines: int = 50_000  # of one batch file
    batch_max_bytes: int = 190_000_000  # of one batch file (OpenAI takes 200 MB)
    batch_poll: float = 30.0  # seconds between looks at the open batches
    price_in: float = 0.0  # per million prompt tokens, for the summary's cost; 0: not shown
    price_out: float = 0.0  # per million completion tokens
    deployments: tuple[DeploymentSpec, ...] = ()  # several endpoints as one pool; (): base_url
    metrics_port: int | None = None  # serve Prometheus metrics while running; 0: a free port
    metrics_host: str = "127.0.0.1"  # where to bind them: loopback unless said otherwise
    price_cached_in: float | None = None  # per million cached prompt tokens; None: as price_in
    prices: dict[str, dict[str, float]] = field(default_factory=dict)  # by model: in, out, ...
    max_cost: float | None = None  # the job's budget, in the prices' currency (live runs)
    json_schema: str | None = None  # a JSON Schema file every answer must fit (answers.py)
    json_mode: bool = False  # answers must be JSON ({"type": "json_object"}), of no schema
    max_invalid: int = 2  # times an answer that does not fit is asked again
    reask: bool = False  # ask again showing the model its answer and what is wrong with it

    def __post_init__(self) -> None:
        for name in _TEXT:
            value = getattr(self, name)
            if not (isinstance(value, str) or (value is None and name in _OPTIONAL_TEXT)):
                raise ConfigError(f"{name} in job.toml must be a string, not {show(value)}")
        if self.endpoint not in ENDPOINTS:
            raise ConfigError(
                f"endpoint {show(self.endpoint)} is not one of {', '.join(ENDPOINTS)}"
            )
        _check_base_url("base_url", self.base_url)
        if self.limits_store is not None and not re.match(
            r"^(redis|rediss|unix)://", self.limits_store
        ):
            raise ConfigError(
                "limits_store must be a Redis URL such as redis://127.0.0.1:6379/0, "
                f"not {show(strip_secrets(self.limits_store)[0].split('@')[-1])}"
            )
        if self.limits_key is not None and not self.limits_key.strip():
            raise ConfigError("limits_key must not be empty")
        _check_env_name("api_key_env", self.api_key_env)
        if isinstance(self.concurrency, str) and self.concurrency != "auto":
            raise ConfigError(
                f'concurrency must be "auto" or a whole number, not {self.concurrency!r}'
            )
        if not isinstance(self.concurrency, str):
            _check_range("concurrency", self.concurrency, 1, 10_000, integer=True)
        _check_range("max_concurrency", self.max_concurrency, 1, 10_000, integer=True)
        if not isinstance(self.hedge, bool):
            raise ConfigError(f"hedge must be true or false, not {self.hedge!r}")
        _check_range("max_attempts", self.max_attempts, 1, 1_000, integer=True)
        for name in ("rpm", "tpm"):
            _check_range(name, getattr(self, name), 0, 1e12)
        for name in ("timeout", "connect_timeout", "drain_timeout"):
            _check_range(name, getattr(self, name), 0, 1e9, open_low=name != "drain_timeout")
        _check_range("max_wait", self.max_wait, 0, 1e9)
        _check_range("max_response_bytes", self.max_response_bytes, 1, 1 << 40, integer=True)
        _check_choice("via", self.via, VIAS)
        if self.deadline is not None and deadline_seconds(self.deadline) is None:
            raise ConfigError(
                f"deadline must be a duration such as 40s, 90m, 6h or 2d, not {show(self.deadline)}"
            )
        if self.via == "auto" and self.deadline is None:
            raise ConfigError("--via auto needs --deadline: when the job must be done by")
        if self.batch_dialect is not None:
            _check_choice("batch_dialect", self.batch_dialect, DIALECTS)
        _check_range("batch_max_lines", self.batch_max_lines, 1, 10_000_000, integer=True)
        _check_range("batch_max_bytes", self.batch_max_bytes, 1024, 1 << 40, integer=True)
        _check_range("batch_poll", self.batch_poll, 0, 86_400, open_low=True)
        for name in ("price_in", "price_out"):
            _check_range(name, getattr(self, name), 0, 1e9)
        if not isinstance(self.deployments, tuple):
            raise ConfigError("deployments must be a list of [[deployments]] tables")
        if self.deployments and self.via != "live":
            raise ConfigError(
                f"--via {self.via} sends to one provider account (base_url); [[deployments]] "
                "are for --via live"
            )
        for spec in self.deployments:
            if spec.endpoints is not None and self.endpoint not in spec.endpoints:
                raise ConfigError(
                    f"deployment {spec.name!r} does not serve {self.endpoint} (its endpoints: "
                    f"{', '.join(spec.endpoints)}): every deployment must serve the job's lines"
                )
        if self.metrics_port is not None:
            _check_range("metrics_port", self.metrics_port, 0, 65535, integer=True)
        if not self.metrics_host.strip():
            raise ConfigError("metrics_host must name an address, such as 127.0.0.1 or 0.0.0.0")
        for name in ("json_mode", "reask"):
            if not isinstance(getattr(self, name), bool):
                raise ConfigError(f"{name} must be true or false, not {show(getattr(self, name))}")
        _check_range("max_invalid", self.max_invalid, 0, 100, integer=True)
        if (self.json_schema is not None or self.json_mode) and self.endpoint == "/v1/embeddings":
            raise ConfigError(
                "--json-schema and --json-mode check text answers: embeddings have none"
            )
        self._check_prices()

    def _check_prices(self) -> None:
        if self.price_cached_in is not None:
            _check_range("price_cached_in", self.price_cached_in, 0, 1e9)
        if not isinstance(self.prices, dict):
            raise ConfigError('prices in job.toml must be a table, e.g. [prices."gpt-4o-mini"]')
        for model, row in self.prices.items():
            if not isinstance(row, dict) or not set(row) <= {"in", "out", "cached_in"}:
                raise ConfigError(
                    f"prices.{show(model)} must be a table of in, out and cached_in "
                    "(per million tokens), e.g. { in = 0.15, out = 0.6 }"
                )
            for name, value in row.items():
                _check_range(f"prices.{show(model)}.{name}", value, 0, 1e9)
        if self.max_cost is None:
            return
        _check_range("max_cost", self.max_cost, 0, 1e12, open_low=True)
        if not (self.price_in or self.price_out or self.prices):
            raise ConfigError(
                "--max-cost needs prices: --price-in and --price-out (per million tokens), "
                "or a [prices] table in job.toml"
            )
        if self.via != "live":
            raise ConfigError(
                f"--max-cost goes with --via live: a provider batch is billed as a whole once "
                f"it is sent, so no budget can stop it halfway (this job has via {self.via})"
            )

    @property
    def request_key(self) -> dict[str, Any]:
        """The settings that define what a request is."""
        return {name: getattr(self, name) for name in REQUEST_SETTINGS}


def _check_base_url(name: str, url: str) -> None:
    if not re.match(r"^https?://[^/\s]+", url):
        shown = show(strip_secrets(url, mask="***")[0])
        raise ConfigError(
            f"{name} {shown} is not an http(s) URL "
            "(e.g. https://api.openai.com/v1 or http://localhost:8000/v1)"
        )
    try:  # urllib, not yarl, which would cost every command ~30 ms of start-up
        parts = urlsplit(url)  # an IPv6 host without its "]" raises
        _ = parts.port  # a port that is no number, or past 65535
        (parts.hostname or "").encode("idna")  # as a name lookup would: "....", a long label
    except ValueError:  # UnicodeError is one
        raise ConfigError(
            f"{name} {show(strip_secrets(url, mask='***')[0])} has no valid host and port "
            "(a port is a number up to 65535; an IPv6 address is written in brackets, as "
            "http://[::1]:8000/v1)"
        ) from None


def _check_env_name(name: str, value: str) -> None:
    if not _ENV_NAME.fullmatch(value) or _key_like(value):
        # Never echo the value: it may be the key itself, pasted in the wrong place.
        raise ConfigError(
            f"{name} must be the *name* of an environment variable, such as "
            "OPENAI_API_KEY, not the key itself (batchq never stores the key)"
        )


@dataclass(frozen=True, slots=True, kw_only=True)
class DeploymentSpec:
    """One endpoint of a job's pool: a replica, a key, a region or a fallback provider.

    ``api_key_env`` None: the job's ``api_key_env``; ``model`` None: the model the line
    names; ``max_concurrency`` None: the job's; ``endpoints`` None: it serves them all.
    """

    name: str
    base_url: str
    api_key_env: str | None = None
    model: str | None = None
    rpm: float = 0.0
    tpm: float = 0.0
    max_concurrency: int | None = None
    weight: float = 1.0
    limits_key: str | None = None
    endpoints: tuple[str, ...] | None = None

    def __post_init__(self) -> None:
        if not isinstance(self.name, str) or not _DEPLOYMENT_NAME.fullmatch(self.name):
            raise ConfigError(
                f"name must be 1-64 letters, digits, '.', '_' or '-', not {show(self.name)}"
            )
        for text in ("base_url", "api_key_env", "model", "limits_key"):
            value = getattr(self, text)
            if not (isinstance(value, str) or (value is None and text != "base_url")):
                raise ConfigError(f"{text} must be a string, not {show(value)}")
        _check_base_url("base_url", self.base_url)
        if self.api_key_env is not None:
            _check_env_name("api_key_env", self.api_key_env)
        for rate in ("rpm", "tpm"):
            _check_range(rate, getattr(self, rate), 0, 1e12)
        if self.max_concurrency is not None:
            _check_range("max_concurrency", self.max_concurrency, 1, 10_000, integer=True)
        _check_range("weight", self.weight, 0, 1e6, open_low=True)
        if self.limits_key is not None and not self.limits_key.strip():
            raise ConfigError("limits_key must not be empty")
        if self.endpoints is not None:
            for endpoint in self.endpoints:
                _check_choice("endpoints", endpoint, ENDPOINTS)


DEPLOYMENT_FIELDS = tuple(f.name for f in fields(DeploymentSpec))
_DEPLOYMENT_NAME = re.compile(r"[A-Za-z0-9._-]{1,64}")


def parse_deployments(value: Any) -> tuple[DeploymentSpec, ...]:
    """``[[deployments]]`` tables (from job.toml, a --deployments file or the API) as specs.

    Raises ConfigError naming the table and the field at fault.
    """
    if isinstance(value, tuple) and all(isinstance(d, DeploymentSpec) for d in value):
        return value
    if not isinstance(value, list | tuple) or not all(isinstance(d, Mapping) for d in value):
        raise ConfigError("deployments must be a list of [[deployments]] tables")
    if not value:  # else the job would quietly go to base_url, with its key
        raise ConfigError(
            "deployments is empty: name an endpoint in a [[deployments]] table, or remove "
            "the line to send to base_url"
        )
    specs: list[DeploymentSpec] = []
    for number, table in enumerate(value, 1):
        where = f"deployment {number}" + (
            f" ({show(table['name'])})" if isinstance(table.get("name"), str) else ""
        )
        unknown = sorted(set(table) - set(DEPLOYMENT_FIELDS))
        if unknown:
            raise ConfigError(f"{where}: unknown field(s) {', '.join(map(str, unknown))}")
        missing = [name for name in ("name", "base_url") if name not in table]
        if missing:
            raise ConfigError(f"{where}: needs {' and '.join(missing)}")
        values = dict(table)
        for rate in ("rpm", "tpm", "weight"):
            if isinstance(values.get(rate), int) and not isinstance(values.get(rate), bool):
                values[rate] = float(values[rate])
        if isinstance(values.get("endpoints"), str):  # else taken a character at a time
            raise ConfigError(f'{where}: endpoints must be a list, e.g. ["/v1/chat/completions"]')
        if isinstance(values.get("endpoints"), list):
            values["endpoints"] = tuple(values["endpoints"])
        try:
            specs.append(DeploymentSpec(**values))
        except ConfigError as exc:
            raise ConfigError(f"{where}: {exc}") from None
    names = [spec.name for spec in specs]
    if twice := sorted({name for name in names if names.count(name) > 1}):
        raise ConfigError(f"deployment names must differ: {', '.join(twice)} appears twice")
    return tuple(specs)


def pool_of(settings: Settings) -> tuple[DeploymentSpec, ...]:
    """The deployments a job sends to: its ``[[deployments]]``, else its one base URL."""
    if settings.deployments:
        return settings.deployments
    single = DeploymentSpec(
        name="default",
        base_url=settings.base_url,
        api_key_env=settings.api_key_env,
        rpm=settings.rpm,
        tpm=settings.tpm,
        limits_key=settings.limits_key,
    )
    return (single,)


def deployment_keys(settings: Settings, env: Mapping[str, str]) -> dict[str, str | None]:
    """Each deployment's API key, read from its variable (None: no key, fine locally)."""
    return {
        spec.name: env.get(spec.api_key_env or settings.api_key_env) or None
        for spec in settings.deployments
    }


def as_deployment(settings: Settings, spec: DeploymentSpec) -> Settings:
    """The job's settings as one deployment of its pool serves them (for ``validate``)."""
    return replace(
        settings,
        base_url=spec.base_url,
        api_key_env=spec.api_key_env or settings.api_key_env,
        model=spec.model or settings.model,
        deployments=(),
    )


def ignored_base_url(settings: Settings) -> str:
    """The one notice when a base URL is given beside ``[[deployments]]``."""
    names = ", ".join(spec.name for spec in settings.deployments)
    return f"--base-url / OPENAI_BASE_URL is not used: the job sends to its deployments ({names})"


_TEXT = (
    *("input", "output", "errors", "base_url", "api_key_env", "endpoint", "model", "system"),
    *("limits_store", "limits_key", "via", "batch_dialect", "completion_window", "deadline"),
    "metrics_host",
    "json_schema",
)
_OPTIONAL_TEXT: tuple[str, ...] = (
    *("model", "system", "limits_store", "limits_key", "batch_dialect", "deadline"),
    "json_schema",
)
_ENV_NAME = re.compile(r"[A-Za-z_][A-Za-z0-9_]{0,63}")
#: What API keys start with (OpenAI, Groq, Hugging Face, xAI, ...), never an env var name.
_KEY_LIKE = re.compile(r"(sk|gsk|hf|xai|pk|rk|key)[-_][A-Za-z0-9]{8}|AIza", re.IGNORECASE)
#: Random-looking: long hex (many providers' keys are 32-64 hex digits), or a long run of
#: letters and digits with no underscore, which variable names use between words.
_RANDOM = re.compile(r"[0-9A-Fa-f]{24,}|(?=.*\d)[A-Za-z0-9]{20,}")


def _key_like(name: str) -> bool:
    return bool(_KEY_LIKE.match(name) or _RANDOM.fullmatch(name))


VIAS = ("live", "batch", "auto")
DIALECTS = ("openai", "dashscope")


def _check_choice(name: str, value: Any, choices: tuple[str, ...]) -> None:
    if value not in choices:
        raise ConfigError(f"{name} must be one of {', '.join(choices)}, not {show(value)}")


def deadline_seconds(text: str) -> float | None:
    """A duration such as ``40s``, ``90m``, ``6h`` or ``2d`` in seconds; None if it is not one."""
    match = re.fullmatch(r"(\d{1,9}(?:\.\d+)?)([smhd])", text.strip())
    if not match:
        return None
    seconds = float(match[1]) * {"s": 1, "m": 60, "h": 3600, "d": 86400}[match[2]]
    return seconds if seconds > 0 else None


def window_hours(window: str) -> int | None:
    """A completion window (``24h``, ``14d``) in hours; None if it is not one."""
    match = re.fullmatch(r"(\d{1,6})([hd])", window)
    return int(match[1]) * (24 if match[2] == "d" else 1) if match else None


def show(value: Any) -> str:
    """A value from the user's data as JSON, shortened: no Python reprs in messages."""
    try:
        text = json.dumps(value, ensure_ascii=False, default=str)
    except ValueError:  # e.g. a nested structure too deep
        text = str(type(value).__name__)
    return text if len(text) <= 80 else text[:77] + "..."


def shell_quote(arg: str) -> str:
    """``arg`` as a shell word that names it exactly: a path's bytes that are not UTF-8
    (held as surrogates) as bash's ``$'\\xff'``, where ``shlex.quote`` would print text
    that names another folder, and a pasted resume command would start a new job."""
    try:
        arg.encode()
    except UnicodeEncodeError:
        return "$'" + "".join(f"\\x{b:02x}" for b in os.fsencode(arg)) + "'"
    return shlex.quote(arg)


def shell_join(args: list[str]) -> str:
    return " ".join(map(shell_quote, args))


def _check_range(
    name: str,
    value: float,
    low: float,
    high: float,
    *,
    open_low: bool = False,
    integer: bool = False,
) -> None:
    kind = (int,) if integer else (int, float)
    if isinstance(value, bool) or not isinstance(value, kind):
        raise ConfigError(
            f"{name} must be {'a whole' if integer else 'a'} number, not {show(value)}"
        )
    # Written so that NaN, which compares false with everything, fails too.
    if not (low <= value <= high) or (open_low and value == low):
        bound = f"> {low:g}" if open_low else f">= {low:g}"
        raise ConfigError(f"{name} must be {bound} and <= {high:g}, not {value:g}")


SETTING_NAMES = frozenset(f.name for f in fields(Settings))
#: Names the limits store when neither the command line nor the call does (over job.toml).
LIMITS_STORE_ENV = "BATCHQ_LIMITS_STORE"
#: The store's password when its URL has none (job.toml keeps the URL without it).
LIMITS_STORE_PASSWORD_ENV = "BATCHQ_LIMITS_STORE_PASSWORD"
#: Query parameters that carry a credential: Azure's api-key, a proxy's token, Redis's password.
_SECRET_PARAM = re.compile(
    r"(api[-_]?)?keys?|.*[-_]key|.*token|.*secret|pass(word|wd)?|auth.*|sig(nature)?|credentials?",
    re.IGNORECASE,
)


def strip_secrets(url: str, *, mask: str | None = None) -> tuple[str, list[str]]:
    """``url`` without the secrets it carries, and those secrets (to use or hash, never show).

    A secret is the password of the URL's userinfo (the user name stays: it names an
    account, and Redis ACLs need it) and the value of a query parameter named like a
    credential (``api-key``, ``token``, ``password``, ...); the userinfo's comes first.
    With ``mask``, each secret is replaced by it instead of left out.
    """
    try:
        parts = urlsplit(url)
        password = parts.password
    except ValueError:
        parts = None
    if parts is None or not _readable(url):  # keep nothing that may be a secret
        return re.sub(r"^(\w+://).*@", r"\1", url).partition("?")[0], []
    secrets = [unquote(password)] if password else []
    netloc = parts.netloc
    if password is not None:
        userinfo, _, host = netloc.rpartition("@")
        user = userinfo.partition(":")[0] + (f":{mask}" if password and mask else "")
        netloc = f"{user}@{host}" if user else host
    query = []
    for name, value in parse_qsl(parts.query, keep_blank_values=True):
        if value and _SECRET_PARAM.fullmatch(name):
            secrets.append(value)
            if mask is None:
                continue
            value = mask
        query.append((name, value))
    if not secrets:
        return url, []  # as it was written, not as urllib would write it again
    text = urlencode(query, safe="*", quote_via=quote)
    # Not urlunsplit: it writes unix:///path as unix:/path, which is no longer a store URL.
    public = f"{parts.scheme}://{netloc}{parts.path}" + (f"?{text}" if text else "")
    return public + (f"#{parts.fragment}" if parts.fragment else ""), secrets


def _readable(url: str) -> bool:
    """Whether urllib reads ``url``'s host and port: a password's "/", "?" or "#" ends
    the host early, and what follows is no port."""
    try:
        _ = urlsplit(url).port
    except ValueError:
        return False
    return True


def url_secrets(settings: Settings) -> list[str]:
    """The credentials in the base URLs of ``settings`` and of its deployments: kept out
    of job.toml, and removed, like an API key, from whatever an endpoint echoes."""
    urls = [settings.base_url, *(spec.base_url for spec in settings.deployments)]
    return [secret for url in urls if url for secret in strip_secrets(url)[1]]


def with_path(base_url: str, path: str) -> str:
    """``path`` under ``base_url``, whose query (``?api-key=``) stays at the end."""
    base, sep, query = base_url.partition("?")
    return base.rstrip("/") + path + sep + query


def store_password(url: str | None, env: Mapping[str, str]) -> tuple[str | None, str | None]:
    """A limits store's URL without its password, and the password to use with it.

    The password is the URL's own (``redis://:PW@host`` or ``?password=PW``), else the
    environment's ``BATCHQ_LIMITS_STORE_PASSWORD``: job.toml only ever gets the URL.
    """
    if url is not None and "@" in url and not _readable(url):
        raise ConfigError(
            "the limits store URL cannot be read: write a '/', '?' or '#' in its "
            "password as %2F, %3F, %23"
        )
    public, secrets = (None, []) if url is None else strip_secrets(url)  # url: job.toml's
    return public, (secrets[0] if secrets else env.get(LIMITS_STORE_PASSWORD_ENV) or None)


def build_settings(base: Mapping[str, Any], overrides: Mapping[str, Any]) -> Settings:
    """Settings from job.toml values overlaid by command-line ones (``None`` = not given)."""
    merged = dict(base)
    merged.update({k: v for k, v in overrides.items() if v is not None})
    unknown = sorted(set(merged) - SETTING_NAMES)
    if unknown:
        raise ConfigError(f"unknown setting(s) in job.toml: {', '.join(unknown)}")
    if "input" not in merged:
        raise ConfigError("job.toml has no 'input' setting (the path of the JSONL input)")
    if not isinstance(merged.get("defaults", {}), dict):
        raise ConfigError("'defaults' in job.toml must be a table, e.g. [defaults]")
    if "deployments" in merged:
        merged["deployments"] = parse_deployments(merged["deployments"])
    for name in ("rpm", "tpm", "timeout", "connect_timeout", "drain_timeout", "max_wait"):
        if isinstance(merged.get(name), int) and not isinstance(merged.get(name), bool):
            merged[name] = float(merged[name])
    try:
        return Settings(**merged)
    except TypeError as exc:  # a value of the wrong type in job.toml
        raise ConfigError(f"job.toml: {exc}") from exc
