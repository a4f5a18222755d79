"""job.toml: a job's settings as a commented, human-editable file.

It never holds an API key, only the *name* of the environment variable that
does. Written atomically: a power cut must never leave an empty job.toml.
"""

from __future__ import annotations

import json
import math
import re
import tomllib
from dataclasses import fields
from pathlib import Path
from typing import Any

from batchq.config import DEPLOYMENT_FIELDS, DeploymentSpec, Settings, show, strip_secrets
from batchq.errors import ConfigError
from batchq.job.durable import atomic_write


def read_job_toml(path: Path) -> dict[str, Any]:
    """The settings stored in a job.toml, as plain values."""
    try:
        with path.open("rb") as f:
            return tomllib.load(f)
    except OSError as exc:
        raise ConfigError(f"cannot read {path}: {exc.strerror}") from exc
    except tomllib.TOMLDecodeError as exc:
        raise ConfigError(f"{path} is not valid TOML: {exc}") from exc
    except UnicodeDecodeError:  # TOML is UTF-8; an editor may have saved Latin-1 or UTF-16
        raise ConfigError(f"{path} is not valid TOML: it is not UTF-8 text") from None
    except RecursionError:  # tomllib recurses a level a call
        raise ConfigError(f"{path} is not valid TOML: it is nested too deeply") from None


def read_deployments_file(path: Path) -> list[Any]:
    """The ``[[deployments]]`` tables of a ``--deployments`` file (checked by config)."""
    tables = read_job_toml(path).get("deployments")
    if not isinstance(tables, list) or not tables:
        raise ConfigError(f"{path} has no [[deployments]] tables (name, base_url, ...)")
    return tables


def write_job_toml(path: Path, settings: Settings) -> None:
    """Write ``settings`` as a commented job.toml, atomically."""
    lines = [
        "# batchq job settings. Edit freely; options given on the command line win.",
        "# Paths are relative to this folder. The API key is read from the environment",
        "# variable named by api_key_env and is never written here.",
    ]
    for f in fields(Settings):
        value = getattr(settings, f.name)
        if f.name in ("limits_store", "base_url") and value is not None:
            value = strip_secrets(value)[0]  # a password typed into job.toml by hand, too
        if f.name not in ("defaults", "deployments", "prices") and value is not None:
            lines.append(f"{_toml_key(f.name)} = {_toml_value(value)}")
    lines.append("")
    lines.append("[defaults]  # request parameters a line's own body does not set")
    lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in settings.defaults.items())
    for spec in settings.deployments:  # each key is read from its api_key_env, never written
        lines.append("")
        lines.append("[[deployments]]")
        for name in DEPLOYMENT_FIELDS:
            value = getattr(spec, name)
            if name == "base_url":
                value = strip_secrets(value)[0]
            if value is not None and value != getattr(_PLAIN, name, None):
                lines.append(
                    f"{name} = {_toml_value(list(value) if name == 'endpoints' else value)}"
                )
    for model, row in settings.prices.items():  # tables, so that more are added as tables
        lines += ["", f"[prices.{_toml_string(model)}]  # per million tokens"]
        lines.extend(f"{_toml_key(k)} = {_toml_value(v)}" for k, v in row.items())
    # fsynced, then renamed, then the folder fsynced: a power cut must never leave an empty
    # job.toml, which no later run could resume from.
    atomic_write(path, ("\n".join(lines) + "\n").encode())


#: A deployment's defaults, which its [[deployments]] table leaves out.
_PLAIN = DeploymentSpec(name="-", base_url="http://-")


def _toml_key(key: str) -> str:
    return key if re.fullmatch(r"[A-Za-z0-9_-]+", key) else _toml_string(key)


def _toml_string(text: str) -> str:
    # JSON's escapes are a subset of TOML's; but JSON leaves DEL (U+007F) bare, TOML does not.
    return json.dumps(text, ensure_ascii=False).replace("\x7f", "\\u007f")


def _toml_value(value: Any) -> str:
    if isinstance(value, bool):
        return "true" if value else "false"
    if isinstance(value, float) and not math.isfinite(value):
        raise ConfigError(f"cannot store {value} in job.toml: not a finite number")
    if isinstance(value, int | float):
        return json.dumps(value)
    if isinstance(value, str):
        return _toml_string(value)
    if isinstance(value, list):
        return "[" + ", ".join(_toml_value(v) for v in value) + "]"
    if isinstance(value, dict):
        items = ", ".join(f"{_toml_key(str(k))} = {_toml_value(v)}" for k, v in value.items())
        return "{ " + items + " }" if items else "{}"
    raise ConfigError(f"cannot store {show(value)} in job.toml")
