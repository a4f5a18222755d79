"""The view's input index: any line by number, in any order, while the file grows."""

from __future__ import annotations

import random
from pathlib import Path

from batchq.show.browse import STRIDE, InputLines


def test_every_line_by_number_in_any_order_as_the_file_grows(tmp_path: Path) -> None:
    rng = random.Random(7)
    lines = [b"x" * rng.randrange(0, 40) + str(i).encode() for i in range(3 * STRIDE + 5)]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines[:2000]) + b"\n" + lines[2000][:3])  # last line unfinished
    inputs = InputLines(path)
    assert inputs.count() == 2001
    assert inputs.line(2001) == lines[2000][:3]
    assert inputs.line(2002) is None
    with path.open("ab") as f:  # the unfinished line ends, and more are appended
        f.write(lines[2000][3:] + b"\n" + b"\r\n".join(lines[2001:]) + b"\r\n")
    assert inputs.count() == len(lines)
    order = list(range(1, len(lines) + 1))
    assert [inputs.line(n) for n in order] == lines  # read on, one after the other
    rng.shuffle(order)
    assert [inputs.line(n) for n in order] == [lines[n - 1] for n in order]
    assert inputs.line(0) is None and inputs.line(len(lines) + 1) is None
    inputs.close()


def test_lines_after_one_longer_than_a_read_are_found(tmp_path: Path) -> None:
    """A vision request's base64 image makes a line of megabytes."""
    lines = [b"first", b"i" * (3 << 20), *(b"after %d" % i for i in range(STRIDE + 2))]
    path = tmp_path / "in.jsonl"
    path.write_bytes(b"\n".join(lines) + b"\n" + b"u" * (2 << 20))  # and an unfinished one
    inputs = InputLines(path)
    assert inputs.count() == len(lines) + 1
    assert [inputs.line(n) for n in (len(lines), 3, 1, STRIDE + 1)] == [
        lines[-1],
        lines[2],
        lines[0],
        lines[STRIDE],
    ]
    assert inputs.line(2) == lines[1]
    inputs.close()
