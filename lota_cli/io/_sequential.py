"""A file written front to back from aligned buffers, with direct I/O (O_DIRECT) for the large ones.

Through the page cache, every page of a 16 GB model is allocated, dirtied and reclaimed by the kernel on the
writer's CPU time: copying a 5 GB shard that way took 9-17 s here, 8-15 s of it system time, against 4 s
(1.3 s system) with direct I/O from aligned buffers, which also leaves the page cache to the files the next
stage reads. `SequentialFile` gathers what is written into page-aligned buffers that a thread writes while
the next fills: `write(data)` copies bytes in, `reserve(n)` hands out the next n bytes of the file to be filled
in place (a merge reads base weights straight into it and adds the deltas there). A file system that refuses
direct I/O (tmpfs, say) gets the same writes through the cache.
"""

from __future__ import annotations

import errno
import fcntl
import mmap
import os
import queue
import threading

ALIGN = 4096  # direct I/O's unit of offsets, lengths and buffer addresses (one page covers every disk here)
BUFFER = 64 << 20  # bytes a buffer holds
BUFFERS = 3  # one filling, up to two being written
DIRECT_MIN = 256 << 20  # smaller files go through the page cache: too short for direct I/O to matter


class SequentialFile:
    """Writes the open file `fd` from offset 0 on, in order; `close()` writes what is left, trims the file to
    the bytes written and syncs it to disk. Errors of the writes (a full disk) are raised by the next
    `write`, `reserve` or `close`."""

    def __init__(self, fd: int, direct: bool):
        self.fd, self.position = fd, 0
        self.direct = direct and _set_direct(fd, True)
        self._free: queue.Queue = queue.Queue()
        for _ in range(BUFFERS):
            self._free.put(mmap.mmap(-1, BUFFER))  # anonymous: page-aligned, touched only where filled
        self._buffer, self._fill, self._base = self._free.get(), 0, 0  # _base: file offset of _buffer[0]
        self._jobs: queue.Queue = queue.Queue()
        self._error: OSError | None = None
        self._thread = threading.Thread(target=self._write_jobs, name="lota-write", daemon=True)
        self._thread.start()

    def write(self, data) -> None:
        """Append the bytes of `data` (any buffer)."""
        data = memoryview(data).cast("B")
        while data.nbytes:
            n = min(data.nbytes, BUFFER - ALIGN)
            self.reserve(n)[:] = data[:n]
            data = data[n:]

    def reserve(self, n: int) -> memoryview:
        """The next n bytes of the file (at most BUFFER - ALIGN) as a writable buffer whose address is as
        aligned as the file offset; what it holds at the next call (or close) is what the file gets."""
        if n > BUFFER - ALIGN:
            raise ValueError(f"reserve({n}): at most {BUFFER - ALIGN} bytes at a time")
        if self._fill + n > BUFFER:
            self._flush(self._fill // ALIGN * ALIGN)
        view = memoryview(self._buffer)[self._fill:self._fill + n]
        self._fill += n
        self.position += n
        return view

    def _flush(self, length: int) -> None:
        """Hand the buffer's first `length` bytes (a multiple of ALIGN) to the writing thread; what follows
        them starts the next buffer."""
        self._raise()
        full, tail = self._buffer, self._fill - length
        self._jobs.put((full, length, self._base))
        self._buffer = self._free.get()
        if tail:
            self._buffer[:tail] = full[length:self._fill]  # the writer reads only [0, length) of `full`
        self._base, self._fill = self._base + length, tail

    def _write_jobs(self) -> None:
        while (job := self._jobs.get()) is not None:
            buffer, length, offset = job
            try:
                if self._error is None:
                    self._write(buffer, length, offset)
            except OSError as err:
                self._error = err
            finally:
                self._free.put(buffer)

    def _write(self, buffer: mmap.mmap, length: int, offset: int) -> None:
        view, done = memoryview(buffer), 0
        while done < length:
            try:
                written = os.pwrite(self.fd, view[done:length], offset + done)
            except OSError as err:
                if err.errno != errno.EINVAL or not self.direct:
                    raise
                self.direct = _set_direct(self.fd, False)  # opened, but refused at the write: go cached
                continue
            if written == 0:
                raise OSError(errno.EIO, "write returned 0")
            done += written

    def _raise(self) -> None:
        if self._error is not None:
            raise self._error

    def close(self, patches: tuple[tuple[int, bytes], ...] = ()) -> None:
        """Write what is left, trim the file to the bytes written, apply `patches` ((offset, bytes) over what
        was written: a header whose checksums are known only at the end), fsync it."""
        try:
            padded = -(-self._fill // ALIGN) * ALIGN
            self._buffer[self._fill:padded] = bytes(padded - self._fill)  # direct writes are whole blocks
            self._fill = padded
            if padded:
                self._flush(padded)
        finally:
            self._stop()
        self._raise()
        os.ftruncate(self.fd, self.position)
        if self.direct and patches:
            self.direct = _set_direct(self.fd, False)  # patches are small and unaligned: through the cache
        for offset, data in patches:
            view, done = memoryview(data), 0
            while done < len(data):
                done += os.pwrite(self.fd, view[done:], offset + done)
        os.fsync(self.fd)

    def _stop(self) -> None:
        """End the writing thread once the writes handed to it are done (also after an error)."""
        if self._thread.is_alive():
            self._jobs.put(None)
            self._thread.join()

    def abandon(self) -> None:
        """Stop without writing what is left (the file is being discarded)."""
        self._error = self._error or OSError(errno.ECANCELED, "abandoned")
        self._stop()


def _set_direct(fd: int, on: bool) -> bool:
    """Turn direct I/O on or off for `fd`; whether it is on now (off where the system has none)."""
    flag = getattr(os, "O_DIRECT", 0)
    if not flag:
        return False
    try:
        flags = fcntl.fcntl(fd, fcntl.F_GETFL)
        fcntl.fcntl(fd, fcntl.F_SETFL, flags | flag if on else flags & ~flag)
    except OSError:
        return False
    return on
