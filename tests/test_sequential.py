"""lota_cli.io's SequentialFile: a file written front to back from aligned buffers (direct I/O where the file system
takes it) holds exactly the bytes given, in order, whatever the sizes of the writes; failures surface."""

from __future__ import annotations

import errno
import os

import numpy as np
import pytest

from lota_cli.io import _sequential as sequential


@pytest.mark.parametrize("direct", [True, False], ids=["direct", "cached"])
def test_the_file_holds_exactly_what_was_written(tmp_path, monkeypatch, direct):
    monkeypatch.setattr(sequential, "BUFFER", 4 * sequential.ALIGN)  # many flushes, parts across buffers
    rng = np.random.default_rng(0)
    path = tmp_path / "f"
    fd = os.open(path, os.O_RDWR | os.O_CREAT)
    out, expected = sequential.SequentialFile(fd, direct=direct), bytearray()
    for step in range(60):
        n = int(rng.integers(0, 3 * sequential.ALIGN))
        data = rng.integers(0, 256, n, dtype=np.uint8).tobytes()
        if step % 2:
            out.write(data)
        else:
            out.reserve(n)[:] = data  # filled in place
        expected += data
    out.close(patches=((8, b"patched!"),))
    os.close(fd)
    expected[8:16] = b"patched!"
    assert path.read_bytes() == bytes(expected)


def test_a_write_that_fails_is_raised_not_lost(tmp_path):
    fd = os.open("/dev/full", os.O_WRONLY)  # every write: ENOSPC
    try:
        out = sequential.SequentialFile(fd, direct=False)
        with pytest.raises(OSError) as err:  # by a later write (once the thread has failed) or by close
            out.write(b"x" * (3 * sequential.BUFFER))
            out.close()
        assert err.value.errno == errno.ENOSPC
    finally:
        os.close(fd)
