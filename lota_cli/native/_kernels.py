"""The native kernels' Python side: the finiteness pass, top-k's scan buffers and the fused merge."""

from __future__ import annotations

import ctypes
import os
import threading
from concurrent.futures import ThreadPoolExecutor
from functools import lru_cache

import numpy as np

from lota_cli import LotaError
from lota_cli.native._build import kernels
from lota_cli.tensors import as_numpy, count_bits_per, dtype_code, finite_array, numpy_dtype

# merge.c's dtype codes, by the numpy dtype the data is held in (bfloat16 as uint16)
KERNEL_DTYPES = {numpy_dtype("F32"): 0, numpy_dtype("BF16"): 1, numpy_dtype("F16"): 2}
_P = ctypes.c_void_p
_I64 = ctypes.c_int64


def all_finite(x, code: str | None = None) -> bool:
    """No NaN or Inf in `x`: a torch tensor, or a numpy array of stored data of safetensors dtype `code`
    (default: the dtype its numpy dtype holds, uint16 being bfloat16). The one finiteness check: one
    vectorized pass of the kernels for float32, float16 and bfloat16 where they are built (several times
    numpy's), else numpy's (tensors.finite_array); other dtypes hold no NaN or are numpy's."""
    if not isinstance(x, np.ndarray):  # a torch tensor: its numpy view
        code, x = dtype_code(x.dtype), as_numpy(x)
    elif code is None:
        code = "BF16" if x.dtype == np.uint16 else dtype_code(x.dtype)
    lib = kernels()
    if lib is None or code not in ("F32", "F16", "BF16") or not x.flags.c_contiguous:
        return finite_array(x, code)
    return lib.lota_first_nonfinite(x.ctypes.data, KERNEL_DTYPES[x.dtype], x.size) < 0


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
        return lib.lota_scan(piece.ctypes.data, KERNEL_DTYPES[piece.dtype], piece.size, lo, hi,
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
    task_arithmetic's (fma per input, from 0); scale applied after, as ops.merge does. piece: the
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
        bad = self.lib.lota_merge_into(piece.ctypes.data, KERNEL_DTYPES[piece.dtype], piece.size, ctypes.byref(ins))
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
