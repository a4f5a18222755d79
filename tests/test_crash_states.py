"""Crash states, enumerated: power cuts at every point of a run, and recovery from each.

A run of a small job is recorded through ``batchq.job.durable.record``;
``crashsim`` builds every state of the job folder that a power cut at any
point could leave (unsynced data lost or torn, unsynced renames undone).
From each, the same command must finish the job with every input line
exactly once. The scenarios: a new job, run to its end (with commits while
it runs), a ``--retry-failed`` of a finished job, and the resume of a job
stopped halfway with uncommitted lines on disk.
"""

from __future__ import annotations

import errno
import shutil
from pathlib import Path

import pytest
from conftest import MockFactory
from crashsim import Disk, State, enumerate_states, materialize
from support import assert_exactly_once
from test_faults import CUSTOM_IDS, Faults, make_input, run

from batchq.job import durable
from batchq.live import runner

pytestmark = pytest.mark.slow


REWRITES = ("journal.bin.new", "errors.jsonl.new")


class Recorder:
    def __init__(self) -> None:
        self.ops: list[tuple[str, Path, object]] = []

    def __call__(self, op: str, path: Path, arg: object) -> None:
        self.ops.append((op, path, arg))


def explore(
    mock_server: MockFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: str
) -> int:
    """Record the scenario's run, then recover from every crash state; return how many."""
    monkeypatch.setattr(runner, "COMMIT_INTERVAL", 0.005)  # several commits in a small job
    server = mock_server()
    input_path = make_input(tmp_path)
    command: list[str | Path] = [
        input_path,
        "--base-url",
        server.url,
        "--model",
        "m",
        "-q",
        "--max-attempts",
        "1",
    ]
    job = tmp_path / "job"
    job.mkdir()
    if scenario == "retry-failed":
        assert run(*command, "--job", job).exit_code == 1
        command.append("--retry-failed")
    elif scenario == "resume":
        # Stopped by a failed fsync of the outputs: lines on disk that no record names.
        monkeypatch.setattr(durable, "inject", Faults(20, errno.EIO))
        assert run(*command, "--job", job).exit_code == 3
        monkeypatch.setattr(durable, "inject", None)
    disk = Disk.of(job)
    recorder = Recorder()
    monkeypatch.setattr(durable, "record", recorder)
    assert run(*command, "--job", job).exit_code == 1
    monkeypatch.setattr(durable, "record", None)
    assert_exactly_once(job, CUSTOM_IDS)

    states = enumerate_states(disk, recorder.ops)
    explored = sum(
        recover(state, tmp_path / f"crash-{i}", command, monkeypatch, nested=True)
        for i, state in enumerate(states)
    )
    print(f"{scenario}: {len(recorder.ops)} operations, {explored} crash states")
    return explored


def recover(
    state: State,
    folder: Path,
    command: list[str | Path],
    monkeypatch: pytest.MonkeyPatch,
    *,
    nested: bool,
) -> int:
    """Run ``command`` on a job left in ``state``; it must finish exactly once.

    ``nested``: where the state holds a ``--retry-failed`` rewrite in progress, which
    recovery rolls back or forward, also crash the recovery itself at every point,
    and recover from that. Returns how many states were recovered from.
    """
    materialize(state, folder)
    disk = Disk.of(folder)
    recorder = Recorder()
    monkeypatch.setattr(durable, "record", recorder)
    after = run(*command, "--job", folder)
    monkeypatch.setattr(durable, "record", None)
    assert after.exit_code == 1, ([name for name, _ in state], after.output)
    assert_exactly_once(folder, CUSTOM_IDS)
    shutil.rmtree(folder)
    explored = 1
    if nested and any(name in REWRITES for name, _ in state):
        inner = enumerate_states(disk, recorder.ops)
        for j, crashed in enumerate(inner):
            name = folder.with_name(f"{folder.name}-{j}")
            explored += recover(crashed, name, command, monkeypatch, nested=False)
    return explored


@pytest.mark.parametrize("scenario", ["new job", "retry-failed", "resume"])
def test_every_crash_state_recovers_exactly_once(
    mock_server: MockFactory, tmp_path: Path, monkeypatch: pytest.MonkeyPatch, scenario: str
) -> None:
    assert explore(mock_server, tmp_path, monkeypatch, scenario) > 10
