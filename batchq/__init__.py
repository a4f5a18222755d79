"""batchq: run a large JSONL file of LLM requests through any OpenAI-compatible endpoint.

From the command line (``batchq --help``), or from Python on the same engine::

    results = batchq.run(["Name a colour."], model="gpt-4o-mini", job="jobs/colours")

``run``, ``arun`` and ``stream`` are documented in ``batchq.api``; every
exception they raise is a ``BatchqError``.
"""

from importlib import import_module
from typing import TYPE_CHECKING, Any

from batchq.config import Settings
from batchq.errors import (
    BatchqError,
    BudgetReached,
    ConfigError,
    FatalEndpointError,
    InputError,
    JobLocked,
    JournalError,
    LimitsStoreError,
    StorageError,
)

# The one place the version is written (pyproject.toml reads it): asking
# importlib.metadata instead cost ~30 ms of every start.
__version__ = "0.1.0"

if TYPE_CHECKING:
    from batchq.api import arun, open_job, run, stream
    from batchq.job.results import Error, Result

# Loaded when first used, so that `batchq --help` and `import batchq` stay quick.
_LAZY = {
    "run": "batchq.api",
    "arun": "batchq.api",
    "stream": "batchq.api",
    "open_job": "batchq.api",
    "Result": "batchq.job.results",
    "Error": "batchq.job.results",
}


def __getattr__(name: str) -> Any:
    if name not in _LAZY:
        raise AttributeError(f"module 'batchq' has no attribute {name!r}")
    value = getattr(import_module(_LAZY[name]), name)
    globals()[name] = value
    return value


__all__ = [
    "BatchqError",
    "BudgetReached",
    "ConfigError",
    "Error",
    "FatalEndpointError",
    "InputError",
    "JobLocked",
    "JournalError",
    "LimitsStoreError",
    "Result",
    "Settings",
    "StorageError",
    "__version__",
    "arun",
    "open_job",
    "run",
    "stream",
]
