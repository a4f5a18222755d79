"""A file the user names for an export or a report (``-o FILE``), written whole.

The bytes go to a file beside it, which replaces it only once complete and on
disk: a failure part-way (a full disk) leaves the last export or report as it
was. A symlink's target is replaced, not the link; a device or a pipe
(``/dev/stdout``), which no rename may replace, is written in place.
"""

from __future__ import annotations

import errno
import os
import shutil
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path
from typing import IO, Any


@contextmanager
def replacing(path: Path, mode: str = "wb", **open_args: Any) -> Iterator[IO[Any]]:
    """``path`` opened for writing (``mode`` and ``open_args`` as ``open`` takes them)."""
    if path.exists() and not path.is_file():
        with path.open(mode, **open_args) as f:
            yield f
        return
    try:
        real = path.resolve()
    except RuntimeError:  # a loop of links, on 3.11 (later: OSError, as here)
        raise OSError(errno.ELOOP, os.strerror(errno.ELOOP), str(path)) from None
    partial = real.with_name(real.name + ".partial")
    f = partial.open(mode, **open_args)
    try:
        if real.exists():  # a file kept private stays so
            shutil.copymode(real, partial)
        with f:
            yield f
            f.flush()
            os.fsync(f.fileno())
        os.replace(partial, real)
    except BaseException:
        partial.unlink(missing_ok=True)
        raise
