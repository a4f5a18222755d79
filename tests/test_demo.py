"""`make demo` on a fresh clone: the README's first command, as a new user runs it."""

from __future__ import annotations

import shutil
import subprocess
import sys
from pathlib import Path

import pytest
from support import clean_env, read_jsonl

ROOT = Path(__file__).resolve().parent.parent


@pytest.mark.slow
def test_make_demo_works_on_a_fresh_clone(tmp_path: Path) -> None:
    if not (ROOT / ".git").exists() or shutil.which("git") is None:
        pytest.skip("needs a git checkout to clone")
    clone = tmp_path / "batchq"
    subprocess.run(["git", "clone", "--quiet", str(ROOT), str(clone)], check=True)
    env = clean_env(PYTHON=sys.executable)
    done = subprocess.run(
        ["make", "demo"], cwd=clone, env=env, capture_output=True, text=True, timeout=600
    )
    assert done.returncode == 0, done.stdout + done.stderr
    assert "finished" in done.stdout and "320 succeeded, 0 failed, 0 pending" in done.stdout
    results = Path(done.stdout.split("results: ")[1].split()[0])
    lines = read_jsonl(results)
    assert len(lines) == 320
    assert {line["response"]["status_code"] for line in lines} == {200}
    assert not list((clone / "jobs").glob("*/results.jsonl"))  # the shipped demo job is untouched
