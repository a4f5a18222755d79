"""Every change batchq makes to a job's durable files goes through this module.

The journal, the outputs, ``job.toml`` and ``state.json`` reach the disk by
the functions below and by nothing else. That buys two things:

* one translation of the machine's failures (a full disk, an I/O error, a
  read-only folder, too many open files) into ``StorageError``: one line
  naming the path and the cause, exit 3, and the same command continues once
  the cause is gone;
* one place where tests stand between batchq and the file system.
  ``inject(op, path)`` runs before every operation and may raise ``OSError``
  (SQLite-style I/O-error tests: fail the Nth call). ``record(op, path, arg)``
  sees every operation, in an order a crash can rely on (ALICE-style crash
  states): changes are reported after they happened, fsyncs before they
  begin, so a change that races an fsync in another thread is never taken
  for synced when it may not be.

Operations: ``open`` (arg: True if the file was created), ``write`` (the
bytes, appended at the end or, after ``open`` with truncation, from 0),
``truncate`` (the length), ``fsync``, ``rename`` (the target path),
``unlink``, ``mkdir`` and ``fsync_dir``.
"""

from __future__ import annotations

import os
from collections.abc import Callable, Iterator
from contextlib import contextmanager, suppress
from pathlib import Path

from batchq.errors import StorageError

#: Test hooks; None in normal runs.
inject: Callable[[str, Path], None] | None = None
record: Callable[[str, Path, object], None] | None = None


class File:
    """An open durable file: its descriptor, and the path its errors name."""

    __slots__ = ("fd", "path")

    def __init__(self, fd: int, path: Path) -> None:
        self.fd = fd
        self.path = path


@contextmanager
def _doing(op: str, path: Path) -> Iterator[None]:
    try:
        if inject is not None:
            inject(op, path)
        yield
    except OSError as exc:
        raise StorageError.from_os(op, path, exc) from None


def _note(op: str, path: Path, arg: object = None) -> None:
    if record is not None:
        record(op, path, arg)


def open_file(path: Path, *, truncate: bool = False) -> File:
    """Open ``path`` for appending (created if missing), or emptied if ``truncate``."""
    flags = os.O_RDWR | os.O_CREAT | (os.O_TRUNC if truncate else os.O_APPEND)
    with _doing("open", path):
        existed = path.exists()
        fd = os.open(path, flags, 0o644)
    _note("open", path, not existed)
    if truncate:
        _note("truncate", path, 0)
    return File(fd, path)


def write(f: File, data: bytes) -> None:
    """Write all of ``data``; on a failure part of it may be on disk (the journal copes)."""
    view = memoryview(data)
    with _doing("write", f.path):
        while view:
            n = os.write(f.fd, view)
            if record is not None:  # the copy is for the recorder only
                record("write", f.path, bytes(view[:n]))
            view = view[n:]


def fsync(f: File) -> None:
    with _doing("fsync", f.path):
        _note("fsync", f.path)
        os.fsync(f.fd)


def truncate(f: File, length: int) -> None:
    with _doing("truncate", f.path):
        os.ftruncate(f.fd, length)
    _note("truncate", f.path, length)


def close(f: File) -> None:
    """Close, ignoring errors: whatever mattered was fsynced before, and checked then."""
    with suppress(OSError):
        os.close(f.fd)


def replace(source: Path, target: Path) -> None:
    with _doing("rename", source):
        os.replace(source, target)
    _note("rename", source, target)


def unlink(path: Path) -> None:
    """Remove ``path`` if it exists."""
    with _doing("unlink", path):
        try:
            os.unlink(path)
        except FileNotFoundError:
            return
    _note("unlink", path)


def fsync_dir(path: Path) -> None:
    """Make the names in folder ``path`` durable: creations, renames and removals."""
    with _doing("fsync_dir", path):
        _note("fsync_dir", path)
        fd = os.open(path, os.O_RDONLY)
        try:
            os.fsync(fd)
        finally:
            os.close(fd)


def make_dirs(path: Path) -> None:
    """``mkdir -p``, with each new folder's name made durable in its parent."""
    if path.is_dir():
        return
    make_dirs(path.parent)
    with _doing("mkdir", path):
        path.mkdir(exist_ok=True)
    _note("mkdir", path)
    fsync_dir(path.parent)


def atomic_write(path: Path, data: bytes) -> None:
    """Replace ``path`` by ``data`` so that a crash leaves either the old or the new file."""
    tmp = atomic_temp(path)
    write_synced(tmp, data)
    replace(tmp, path)
    fsync_dir(path.parent)


def atomic_temp(path: Path) -> Path:
    """Where ``atomic_write`` puts ``path``'s new bytes until they replace it."""
    return path.with_name(path.name + ".new")


def write_synced(path: Path, data: bytes) -> None:
    """Create or empty ``path``, write ``data`` and fsync it (its name is not yet durable)."""
    f = open_file(path, truncate=True)
    try:
        write(f, data)
        fsync(f)
    finally:
        close(f)
