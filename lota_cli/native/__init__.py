"""Native merge kernels (merge.c), compiled on first use and called through ctypes.

The C file ships with the package; the first merge compiles it with the system C compiler (`$CC`, else
cc/gcc/clang: no Python headers, well under a second) into the cache ($LOTA_CACHE or ~/.cache/lota, under
native/), keyed by the source, the compiler and the platform, so later runs load it at once. Without a
compiler, or with LOTA_NATIVE=0, `kernels()` is None and callers take their numpy/torch path, which gives
the same results bitwise, only slower. ctypes releases the GIL during a call, so kernels on two threads run
in parallel.
"""

from __future__ import annotations

import ctypes
import hashlib
import logging
import os
import platform
import shutil
import subprocess
import sys
import tempfile
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache
from pathlib import Path

import numpy as np

from lota_cli import LotaError, cache_root
from lota_cli.stored import count_bits_per, finite_array

log = logging.getLogger(__name__)
SOURCE = Path(__file__).with_name("merge.c")
FLAGS = ["-O3", "-shared", "-fPIC", "-std=c11"]  # portable code: no -march=native (caches can be shared)
DTYPE_CODES = {np.dtype(np.float32): 0, np.dtype("uint16"): 1, np.dtype(np.float16): 2}  # uint16: bfloat16 bits
_STORED = {np.dtype(np.float32): "F32", np.dtype("uint16"): "BF16", np.dtype(np.float16): "F16"}
_P = ctypes.c_void_p
_I64 = ctypes.c_int64


def _compiler() -> str | None:
    """$CC if set (and only it), else the first of cc, gcc, clang on PATH."""
    names = [os.environ["CC"]] if os.environ.get("CC") else ["cc", "gcc", "clang"]
    return next(filter(None, map(shutil.which, names)), None)


def _build(compiler: str) -> Path:
    """The compiled library, built once per (source, compiler, platform) into the cache, atomically."""
    version = subprocess.run([compiler, "--version"], capture_output=True, text=True, timeout=30).stdout
    key = hashlib.sha256("\0".join([SOURCE.read_text(), version, *FLAGS, platform.machine(), sys.platform])
                         .encode()).hexdigest()[:16]
    target = cache_root() / "native" / f"merge-{key}.so"
    if target.is_file():
        return target
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(prefix=".merge-", suffix=".so", dir=target.parent)
    os.close(fd)
    try:
        done = subprocess.run([compiler, *FLAGS, "-o", tmp, str(SOURCE)], capture_output=True, text=True, timeout=120)
        if done.returncode:
            raise OSError(done.stderr.strip().splitlines()[-1] if done.stderr.strip() else "compiler failed")
        os.replace(tmp, target)  # concurrent builders each rename a complete file
    finally:
        Path(tmp).unlink(missing_ok=True)
    return target


@lru_cache(maxsize=None)
def kernels() -> ctypes.CDLL | None:
    """The loaded kernels, or None (LOTA_NATIVE=0, no C compiler, or a failed build: logged once)."""
    if os.environ.get("LOTA_NATIVE", "1").strip().lower() in ("0", "false", "no", "off"):
        return None
    compiler = _compiler()
    if compiler is None:
        log.info("no C compiler found (set CC=): merging with numpy, which is slower")
        return None
    try:
        library = _build(compiler)
        try:
            lib = ctypes.CDLL(str(library))
        except OSError:  # a damaged cached build (a disk that filled up, say): built again, once
            library.unlink(missing_ok=True)
            lib = ctypes.CDLL(str(_build(compiler)))
    except (OSError, subprocess.SubprocessError) as err:
        log.warning("could not build lota's merge kernels with %s (%s): merging with numpy, which is slower",
                    compiler, err)
        return None
    lib.lota_merge_into.restype = _I64
    lib.lota_merge_into.argtypes = [_P, ctypes.c_int, _I64, _P]
    lib.lota_scan.restype = _I64
    lib.lota_scan.argtypes = [_P, ctypes.c_int, _I64, ctypes.c_float, ctypes.c_float, _P, _P, _P, _P, ctypes.c_int]
    lib.lota_first_nonfinite.restype = _I64
    lib.lota_first_nonfinite.argtypes = [_P, ctypes.c_int, _I64]
    return lib


def all_finite(array: np.ndarray) -> bool:
    """No NaN or Inf in a float32, float16 or bfloat16 (as uint16) array: one vectorized pass of the kernels'
    where they are built (several times numpy's), else numpy's (stored.finite_array)."""
    lib = kernels()
    if lib is None or not array.flags.c_contiguous:
        return finite_array(array, _STORED[array.dtype])
    return lib.lota_first_nonfinite(array.ctypes.data, DTYPE_CODES[array.dtype], array.size) < 0


class ScanBuffers:
    """One thread's output buffers for `scan` over pieces of up to `size` entries."""

    def __init__(self, size: int):
        self.sure = np.empty((size + 7) // 8, np.uint8)
        self.positions = np.empty(size + 16, np.int64)
        self.values = np.empty(size + 16, np.float32)

    def scan(self, lib, piece: np.ndarray, lo: float, hi: float, excluded: np.ndarray | None,
             simd: bool = True) -> int:
        """One pass of top-k selection over a piece's |values| (float32, or bfloat16 as uint16; contiguous):
        the bits of entries > hi into `sure`, the positions and |values| of those in [lo, hi] into
        `positions` / `values`, entries set in `excluded` (packed bits, or None) in neither. Returns the band's
        count, or -1 - i where entry i is NaN or Inf."""
        piece = np.ascontiguousarray(piece)
        return lib.lota_scan(piece.ctypes.data, DTYPE_CODES[piece.dtype], piece.size, lo, hi,
                             None if excluded is None else np.ascontiguousarray(excluded).ctypes.data,
                             self.sure.ctypes.data, self.positions.ctypes.data, self.values.ctypes.data, simd)


MAX_INPUTS = 16  # as merge.c


class _Inputs(ctypes.Structure):
    _fields_ = [("m", ctypes.c_int), ("bits", _P * MAX_INPUTS), ("values", _P * MAX_INPUTS),
                ("bf16", ctypes.c_int * MAX_INPUTS), ("left", _I64 * MAX_INPUTS),
                ("weights", ctypes.c_float * MAX_INPUTS), ("weighted", ctypes.c_int), ("scale", ctypes.c_float),
                ("apply_scale", ctypes.c_int), ("simd", ctypes.c_int), ("used", _I64 * MAX_INPUTS), ("nonzero", _I64 * MAX_INPUTS),
                ("shared", _I64 * (MAX_INPUTS * (MAX_INPUTS - 1) // 2)),
                ("agree", _I64 * (MAX_INPUTS * (MAX_INPUTS - 1) // 2))]


class FusedMerge:
    """One tensor's sparse inputs merged into the base's pieces by one pass of merge.c each: the inputs'
    packed masks and values are read where they lie, never unpacked or laid over their union. Pieces are
    independent (each knows where its values start), so threads can run them side by side.

    bits: each input's packed mask (uint8, little bit order); values: its held values in row-major order
    (float32, or bfloat16 as uint16); weights: None for `sum` (value_0 + value_1 + ...), else
    task_arithmetic's (fma per input, from 0); scale applied after, as merging.merge does. piece: the
    entries of each run a thread takes (a multiple of 8). simd: take the kernel's AVX-512 path where the CPU
    has it (the same bits as the scalar one, which simd=False forces: the tests compare them). Raises ValueError(i) when input i's count of set
    bits is not its count of values; `into` raises FloatingPointError(i) when a value of input i is NaN or
    Inf (the kernel checks each as it adds it)."""

    _NONE = np.zeros(1, dtype=np.float32)  # a clamped read where an input has no values left: 0 as either dtype

    def __init__(self, lib, bits: list[np.ndarray], values: list[np.ndarray], weights=None, scale: float = 1.0,
                 piece: int = 1 << 21, simd: bool = True):
        if not 1 <= len(bits) <= MAX_INPUTS:
            raise TypeError(f"the merge kernels take 1 to {MAX_INPUTS} inputs, not {len(bits)}")
        if piece % 8:
            raise ValueError("pieces must hold a multiple of 8 entries")
        self.lib, self.bits, self.values, self.piece = lib, bits, values, piece
        self.first = []  # per input: the index of its first value in each piece
        for i, (b, v) in enumerate(zip(bits, values)):
            counts = count_bits_per(b, piece // 8)
            if int(counts.sum()) != v.size:
                raise ValueError(i)
            self.first.append(np.concatenate([[0], np.cumsum(counts)]))
        self.template = _Inputs(m=len(bits), weighted=weights is not None, scale=scale, apply_scale=scale != 1.0,
                                simd=simd)
        for i, v in enumerate(values):
            self.template.bf16[i] = v.dtype == np.uint16
            self.template.weights[i] = 1.0 if weights is None else weights[i]
        self.nonzero, self.shared, self.agree = [0] * len(bits), [0] * _pairs(len(bits)), [0] * _pairs(len(bits))
        self._lock = threading.Lock()

    def into(self, piece: np.ndarray, start: int, fill=None) -> None:
        """Add the merged delta to entries [start, start + piece.size) of the tensor, given as `piece`
        (float32, float16, or bfloat16 as uint16), in place, its runs of `self.piece` entries on threads side
        by side; start a multiple of self.piece. fill(run, run_start), when given, first fills each run on the
        thread that then merges it (the entries stay in that core's cache). Raises OverflowError(entry) where a
        sum is not finite in the piece's dtype."""
        def run(at: int) -> None:
            if fill is not None:
                fill(piece[at:at + self.piece], start + at)
            self._run(piece[at:at + self.piece], start + at)

        list(_threads().map(run, range(0, piece.size, self.piece)))  # re-raises

    def _run(self, piece: np.ndarray, start: int) -> None:
        index, m = start // self.piece, len(self.bits)
        if start % self.piece:
            raise ValueError(f"a piece starts at {start}, not a multiple of {self.piece}")
        ins = _Inputs.from_buffer_copy(self.template)  # each call its own
        for i, (bits, values) in enumerate(zip(self.bits, self.values)):
            at, stop = int(self.first[i][index]), int(self.first[i][index + 1])
            ins.bits[i] = bits.ctypes.data + start // 8
            ins.values[i] = values[at:].ctypes.data if stop > at else self._NONE.ctypes.data
            ins.left[i] = stop - at
        bad = self.lib.lota_merge_into(piece.ctypes.data, DTYPE_CODES[piece.dtype], piece.size, ctypes.byref(ins))
        if bad <= -100:
            raise FloatingPointError(-100 - bad)  # input i holds a NaN or Inf value
        if bad == -2:
            raise LotaError("this build of lota's merge kernels has no float16 (a compiler without _Float16): "
                            "set LOTA_NATIVE=0")
        if bad >= 0:
            raise OverflowError(start + int(bad))
        if bad != -1 or any(ins.used[i] != self.first[i][index + 1] - self.first[i][index] for i in range(m)):
            raise AssertionError(f"merge kernel: piece at {start} returned {bad}")
        with self._lock:
            for i in range(m):
                self.nonzero[i] += ins.nonzero[i]
            for p in range(_pairs(m)):
                self.shared[p] += ins.shared[p]
                self.agree[p] += ins.agree[p]


@lru_cache(maxsize=None)
def _threads() -> ThreadPoolExecutor:
    """Threads for the kernels (ctypes releases the GIL): a few, as the pass is bound by memory beyond."""
    return ThreadPoolExecutor(max(1, min(4, len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity")
                                         else os.cpu_count() or 1)), thread_name_prefix="lota-merge")


def _pairs(m: int) -> int:
    return m * (m - 1) // 2
