"""Reading stored bytes through memory maps of just the range wanted, and asking the kernel to read ahead.

A map of a tensor's bytes (not of the whole file) is what lets a stage stream a 16 GB file in pieces while
holding one piece in its resident set, not every page read so far: the pages are shared with the page cache,
so the first pass over a piece reads it straight from there, copying nothing.
"""

from __future__ import annotations

import contextlib
import mmap
import os
from typing import Iterator

import numpy as np

from lota_cli.tensors import numpy_dtype


def _map(file, offset: int, count: int, code: str, writable: bool, populate: bool) -> tuple[mmap.mmap | None,
                                                                                             np.ndarray]:
    """(the mapping, or None for no entries; the numpy array over it)."""
    dtype = numpy_dtype(code)
    if count == 0:
        return None, np.empty(0, dtype=dtype)
    with contextlib.ExitStack() as stack:
        fh = file if hasattr(file, "fileno") else stack.enter_context(open(file, "rb"))
        length = count * dtype.itemsize
        aligned = offset - offset % mmap.ALLOCATIONGRANULARITY  # mmap's own alignment kept
        # private either way: copy-on-write where writable (torch wants a writable buffer, or it warns), so a
        # write can never reach the file
        region = mmap.mmap(fh.fileno(), offset - aligned + length, offset=aligned,
                           prot=mmap.PROT_READ | (mmap.PROT_WRITE if writable else 0),
                           flags=mmap.MAP_PRIVATE | (getattr(mmap, "MAP_POPULATE", 0) if populate else 0))
    return region, np.frombuffer(region, dtype=dtype, count=count, offset=offset - aligned)


def map_array(file, offset: int, count: int, code: str, *, writable: bool = False,
              populate: bool = False) -> np.ndarray:
    """`count` entries of safetensors dtype `code` at byte `offset` of `file` (an open binary file or a path),
    as a flat numpy array (bfloat16 as uint16) over a private memory map of just those bytes, which lasts as
    long as the array (or a view of it) does. populate: read them in at once (MAP_POPULATE)."""
    return _map(file, offset, count, code, writable, populate)[1]


@contextlib.contextmanager
def mapped(file, offset: int, count: int, code: str) -> Iterator[np.ndarray]:
    """map_array (writable, copy-on-write) unmapped again on leaving the `with`, so that streaming a file
    through it piece by piece holds one piece at a time; the array is valid only inside the `with`."""
    region, view = _map(file, offset, count, code, writable=True, populate=False)
    try:
        yield view
    finally:
        del view
        if region is not None:
            try:
                region.close()
            except BufferError:  # the caller kept a view: the mapping goes when that is freed
                pass


def will_need(fileno: int, offset: int, length: int) -> None:
    """Ask the kernel to start reading `length` bytes of a file into the page cache now, without waiting: from
    a disk, what is read next arrives while the current work goes on. Where the system cannot, nothing."""
    try:
        os.posix_fadvise(fileno, offset, length, os.POSIX_FADV_WILLNEED)
    except (AttributeError, OSError):
        pass
