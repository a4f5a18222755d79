"""The job folder's pieces that tests of whole runs reach only indirectly."""

from __future__ import annotations

import hashlib
import io

from hypothesis import given
from hypothesis import strategies as st

from batchq.job.folder import _Fingerprint

lines = st.lists(
    st.sampled_from([b"", b" ", b"\t\r", b"{}", b'{"a": 1}', b"  x  ", b"\x0b", b"\xc3\xa9"]),
    max_size=30,
)


@given(lines, st.sampled_from([b"\n", b"\r\n"]), st.booleans(), st.integers(1, 16))
def test_the_fingerprint_counts_non_blank_lines_across_chunks(
    parts: list[bytes], newline: bytes, final_newline: bool, chunk_size: int
) -> None:
    data = newline.join(parts) + (newline if final_newline else b"")
    fingerprint = _Fingerprint()
    fingerprint.chunk_size = chunk_size
    fingerprint.read(io.BytesIO(data), len(data))
    # The reader skips a line when bytes.strip() leaves nothing: the oracle does the same.
    assert fingerprint.finish() == sum(1 for line in data.split(b"\n") if line.strip())
    assert fingerprint.digest.hexdigest() == hashlib.sha256(data).hexdigest()
