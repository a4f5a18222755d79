"""The states a crash can leave a job folder in, rebuilt from batchq's recorded file operations.

After ALICE ("All File Systems Are Not Created Equal", OSDI 2014): every
change batchq makes to a job's files goes through ``batchq.job.durable``, whose
``record`` hook reports it (changes after they happen, fsyncs before they
begin). ``Disk`` replays those operations on a model of one folder and,
after each of them, lists the contents a power cut at that moment may leave:

* file data: what the last fsync of the file made durable, or everything
  written since, or the unsynced part cut in the middle (a torn write);
* names (creations, renames, removals): as the last fsync of the folder left
  them, or after each later change in order (as the metadata journals of
  ext4 and XFS keep them), or with any one of the later changes alone (a file
  system that reorders them, as ALICE also considers).

A file's data and its name are independent: a file fsynced under a name that
was not yet durable is lost with the name.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass, field
from pathlib import Path

State = tuple[tuple[str, bytes], ...]  # (name, content) of each file, sorted by name


@dataclass(eq=False)
class Inode:
    data: bytearray
    synced: bytes  # what the disk holds for certain

    def torn(self) -> Iterator[bytes]:
        """The unsynced changes cut short: by one byte, in the middle, at the first byte."""
        common = 0
        for old, new in zip(self.synced, self.data, strict=False):
            if old != new:
                break
            common += 1
        unsynced = len(self.data) - common
        for kept in {unsynced - 1, unsynced // 2, 1}:
            if 0 < kept < unsynced:
                yield bytes(self.data[: common + kept])


@dataclass
class Disk:
    """One folder, as the operations recorded so far left it in memory and on disk."""

    folder: Path
    names: dict[str, Inode] = field(default_factory=dict)
    durable_names: dict[str, Inode] = field(default_factory=dict)
    unsynced_names: list[dict[str, Inode]] = field(default_factory=list)  # after each change
    changes: list[Callable[[dict[str, Inode]], object]] = field(default_factory=list)

    @classmethod
    def of(cls, folder: Path) -> Disk:
        """The folder as it is now, all of it durable."""
        names = {}
        for path in sorted(folder.iterdir()):
            if path.is_file():
                data = path.read_bytes()
                names[path.name] = Inode(bytearray(data), data)
        return cls(folder, names, dict(names))

    def apply(self, op: str, path: Path, arg: object) -> None:
        if op == "fsync_dir":
            if path == self.folder:
                self.durable_names = dict(self.names)
                self.unsynced_names, self.changes = [], []
            return
        if path.parent != self.folder:
            return
        name = path.name
        if op == "open" and arg:
            self._rename(lambda names: names.__setitem__(name, Inode(bytearray(), b"")))
        elif op == "write":
            assert isinstance(arg, bytes)
            self.names[name].data += arg
        elif op == "truncate":
            assert isinstance(arg, int)
            del self.names[name].data[arg:]
        elif op == "fsync":
            self.names[name].synced = bytes(self.names[name].data)
        elif op == "rename":
            assert isinstance(arg, Path) and arg.parent == self.folder
            self._rename(lambda names: names.__setitem__(arg.name, names.pop(name)))
        elif op == "unlink":
            self._rename(lambda names: names.pop(name))

    def _rename(self, change: Callable[[dict[str, Inode]], object]) -> None:
        change(self.names)
        self.unsynced_names.append(dict(self.names))
        self.changes.append(change)

    def _names_after_a_crash(self) -> Iterator[dict[str, Inode]]:
        yield self.durable_names
        yield from self.unsynced_names
        for change in self.changes[1:]:  # the first alone is the first in order
            names = dict(self.durable_names)
            try:
                change(names)
            except KeyError:  # it needs an earlier change, e.g. a rename of a new file
                continue
            yield names

    def crash_states(self) -> Iterator[State]:
        """What a power cut now may leave.

        For each set of names: all data lost since its fsync, or all of it kept; and
        each file on its own kept, lost or torn while the others are lost or kept.
        """
        for names in self._names_after_a_crash():
            synced = {name: inode.synced for name, inode in names.items()}
            written = {name: bytes(inode.data) for name, inode in names.items()}
            yield _state(synced)
            yield _state(written)
            for name, inode in names.items():
                yield _state({**synced, name: written[name]})
                yield _state({**written, name: synced[name]})
                for torn in inode.torn():
                    yield _state({**synced, name: torn})
                    yield _state({**written, name: torn})


def _state(files: dict[str, bytes]) -> State:
    return tuple(sorted(files.items()))


def enumerate_states(disk: Disk, ops: list[tuple[str, Path, object]]) -> list[State]:
    """Every distinct state a crash at any point of ``ops``, applied to ``disk``, may leave."""
    seen: dict[State, None] = dict.fromkeys(disk.crash_states())
    for op in ops:
        disk.apply(*op)
        seen.update(dict.fromkeys(disk.crash_states()))
    return list(seen)


def materialize(state: State, folder: Path) -> None:
    folder.mkdir(parents=True)
    for name, data in state:
        (folder / name).write_bytes(data)
