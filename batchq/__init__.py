"""batchq: run a large JSONL file of LLM requests through any OpenAI-compatible endpoint.

The command line is the main interface (``batchq --help``). The pieces it is
built from are importable for programs that drive batchq themselves.
"""

from importlib.metadata import version

from batchq.config import Settings
from batchq.errors import (
    BatchqError,
    ConfigError,
    FatalEndpointError,
    InputError,
    JobLocked,
    JournalError,
)

__version__ = version("batchq")
__all__ = [
    "BatchqError",
    "ConfigError",
    "FatalEndpointError",
    "InputError",
    "JobLocked",
    "JournalError",
    "Settings",
    "__version__",
]
