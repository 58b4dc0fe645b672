"""Exact streaming top-k selection over many tensors: the k entries of largest |value| as packed bits.

The reference implementation concatenates every |delta| and calls topk, which needs about five times the
task vector in RAM. Here selection streams the tensors in fixed-size flat pieces (CHUNK entries) through
reused buffers, so the memory it adds is the output bits (1 bit per entry) plus a few MiB, whatever the size
of the model, and each piece is read once per pass straight from the page cache (artifacts.StoredTensor.mapped):

  1. A sample of random blocks of 64 consecutive entries of every tensor (at least 1M entries or 1/1024 of
     them, and 32 blocks of each tensor) estimates how many entries lie above any value, with a standard
     error that allows for neighbouring entries being alike (cluster sampling); this brackets the k-th
     largest |value| between lo and hi, Z standard errors either side. Small blocks from many rows keep the
     bracket narrow also when layers and rows differ in scale by orders of magnitude (a task vector after a
     step or two of calibration), so one pass suffices there too.
  2. One pass: entries > hi are surely selected (kept as packed bits), entries in the band [lo, hi] are
     candidates (position and value kept: a small fraction of the entries); every value is also checked
     to be finite. The candidates are then resolved exactly (np.partition finds the threshold among them).
  3. Only when the band holds too many entries (candidate_budget) does the pass count them in a 65536-bin
     histogram of their float bits instead, which narrows the band for one more pass (rarely two); a
     bracket that missed restarts from the full range of values. So the usual cost is one pass.

Either way exactly k entries are chosen; ties at the threshold go to the entry that comes first (tensor
order, then row-major position), so the result is deterministic and depends neither on the sample nor on
the number of threads. The per-piece work is numpy's (SIMD, the GIL released) or the native scan's, and the
tensors of a pass are scanned on torch's intra-op thread count of threads (OMP_NUM_THREADS), each in buffers
of its own.

A source is a mapping from tensor name to a torch tensor, a numpy array, a safetensors slice, or an
artifact's StoredTensor (artifacts.Artifact.raw), which streams from the page cache without copying (see
StoredTensor.mapped). All of it is numpy: selecting from an artifact never imports torch; a torch tensor is
read through its numpy view (bfloat16 as uint16, as stored).
"""

from __future__ import annotations

import contextlib
import math
import os
import sys
import threading
from concurrent.futures import ThreadPoolExecutor
from typing import Iterator, Mapping

import numpy as np

from lota_cli import LotaError, native
from lota_cli.tensors import as_numpy, count_bits, nonfinite, numpy_dtype, set_bits, set_positions

EXCLUDED = -1.0  # |delta| is never negative, so excluded entries can never be selected
CHUNK = 1 << 20  # entries per piece of the streaming pass: 4 MiB of float32, small enough to stay in cache
SAMPLE_SIZE = 1 << 20  # values the sample aims at, at least (1/1024 of the entries when that is more)
MIN_SAMPLE_BLOCKS = 32  # blocks sampled from every tensor at least (all of them when it has fewer)
BLOCK = 64  # sampling unit: consecutive entries (a quarter page of float32: many rows sampled for its cost)
Z = 6.0  # bracket half-width, in standard errors of the estimated count above a value
CANDIDATE_BUDGET = 0.02  # keep at most this fraction of all entries as candidates; beyond it, histogram
CANDIDATE_CAP = 1 << 26  # and at most this many (8 bytes each: 512 MiB) whatever the model's size


# --------------------------------------------------------------------------- reading a source

def _shape(x) -> tuple[int, ...]:
    return tuple(x.get_shape()) if hasattr(x, "get_shape") else tuple(x.shape)


class _Stream:
    """|value| of a source's tensors as flat float32, piece by piece, in buffers reused by each thread.

    The per-piece work is numpy's (SIMD, the GIL released), so tensors can be scanned on several threads
    at once (`threads`, torch's intra-op thread count: OMP_NUM_THREADS=1 keeps one). Excluded entries read
    as EXCLUDED; a NaN or Inf anywhere is refused, naming the tensor.
    """

    def __init__(self, source: Mapping, excluded: Mapping | None):
        self.source = source
        self.excluded = {n: np.asarray(bits) for n, bits in (excluded or {}).items()}
        self.numel = {n: math.prod(_shape(source[n])) for n in source}
        self._size = min(CHUNK, max(self.numel.values(), default=1))
        self._local = threading.local()
        self.threads = max(1, min(intra_op_threads(), len(self.numel)))

    def buffers(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """This thread's (|values|, flags, flags) buffers of CHUNK entries."""
        local = self._local
        if not hasattr(local, "mag"):
            local.mag = np.empty(self._size, dtype=np.float32)
            local.flags = np.empty(self._size, dtype=np.bool_), np.empty(self._size, dtype=np.bool_)
        return local.mag, *local.flags

    def map(self, fn, names: list[str]) -> list:
        """[fn(name) for name in names], on `threads` threads, in order."""
        if self.threads == 1:
            return [fn(name) for name in names]
        with ThreadPoolExecutor(self.threads) as pool:
            return list(pool.map(fn, names))

    @staticmethod
    def _abs(piece: np.ndarray, out: np.ndarray) -> None:
        if piece.dtype == np.float32:
            np.abs(piece, out=out)
        elif piece.dtype == np.uint16:  # bfloat16 as stored: the top half of a float32
            as_int = out.view(np.uint32)
            np.left_shift(piece, 16, out=as_int, dtype=np.uint32)
            np.bitwise_and(as_int, 0x7FFFFFFF, out=as_int)
        else:
            out[:] = piece
            np.abs(out, out=out)

    def _flat(self, name: str) -> np.ndarray | None:
        """The whole tensor, flat, for sources that cannot be mapped piecewise (None: use mapped)."""
        x = self.source[name]
        if hasattr(x, "mapped"):
            return None
        return as_numpy(x if isinstance(x, np.ndarray) or hasattr(x, "detach") else x[:])

    def _stored(self, name: str, flat: np.ndarray | None) -> np.dtype:
        """The numpy dtype the pieces of `name` come in."""
        return flat.dtype if flat is not None else numpy_dtype(self.source[name].dtype)

    def _finite(self, name: str, out: np.ndarray) -> None:
        top = out.max() if out.size else 0.0
        if not math.isfinite(top):  # max propagates NaN, and is Inf if any entry is
            raise self._nonfinite(name)

    @staticmethod
    def _nonfinite(name: str) -> LotaError:
        return nonfinite(f"tensor {name!r}", "the run that made it diverged, so redo it (lower train.lr, or enable "
                                             "train.max_grad_norm)")

    @contextlib.contextmanager
    def _piece(self, name: str, start: int, stop: int, flat: np.ndarray | None) -> Iterator[np.ndarray]:
        """Entries [start, stop) of `name` as they are stored: a slice of `flat`, or a mapping of the file
        (copy-free: what reads it reads the page cache), valid inside the `with`."""
        if flat is not None:
            yield flat[start:stop]
            return
        with self.source[name].mapped(start, stop) as piece:
            yield piece
            del piece  # before the mapping closes

    def _exclude(self, name: str, positions: np.ndarray, out: np.ndarray) -> None:
        if name in self.excluded:
            bits = self.excluded[name]
            out[((bits[positions >> 3] >> (positions & 7)) & 1).astype(np.bool_)] = EXCLUDED

    def read_into(self, name: str, start: int, stop: int, flat: np.ndarray | None, out: np.ndarray) -> np.ndarray:
        """|values| of entries [start, stop) of `name` into `out` (float32, stop - start long)."""
        with self._piece(name, start, stop, flat) as piece:
            self._abs(piece, out)
            del piece
        self._finite(name, out)
        if name in self.excluded:  # (start need not be a multiple of 8: sampled rows)
            bits = self.excluded[name][start // 8:(start + out.size + 7) // 8]
            skip = start % 8
            out[np.unpackbits(bits, count=skip + out.size, bitorder="little")[skip:].view(np.bool_)] = EXCLUDED
        return out

    def gather(self, name: str, starts: np.ndarray, block: int) -> np.ndarray:
        """|values| of the blocks of `block` entries at `starts`, as a (blocks, block) matrix; entries past
        the tensor's end read as EXCLUDED. One mapping of the tensor: only the sampled pages are read."""
        n = self.numel[name]
        positions = starts[:, None] + np.arange(block)
        inside = positions < n
        positions = np.minimum(positions, n - 1).reshape(-1)
        out = np.empty(positions.size, dtype=np.float32)
        flat = self._flat(name)
        if flat is not None:
            self._abs(flat[positions], out)
        else:
            with self.source[name].mapped() as whole:
                self._abs(whole[positions], out)
                del whole
        self._finite(name, out)
        self._exclude(name, positions, out)
        out = out.reshape(-1, block)
        out[~inside] = EXCLUDED
        return out

    def chunks(self, name: str, flat: np.ndarray | None = None) -> Iterator[tuple[int, np.ndarray]]:
        """(start, |values| of entries [start, start + CHUNK)) over the tensor (`flat`: _flat's, if the
        caller has it); each array is valid until the next step, in this thread's buffer."""
        n, flat = self.numel[name], self._flat(name) if flat is None else flat
        mag = self.buffers()[0]
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            yield start, self.read_into(name, start, stop, flat, mag[:stop - start])

    def bands(self, name: str, lo: float, hi: float) -> Iterator[tuple[int, np.ndarray, np.ndarray, np.ndarray]]:
        """(start, packed bits of the entries > hi, positions from start of those in [lo, hi], their |values|)
        per CHUNK of `name`, NaN or Inf refused: one native pass a chunk (lota_cli.native.scan) where the
        kernels are built and the tensor is float32 or bfloat16 (the same result as numpy's several), else
        numpy's. The arrays are this thread's buffers, valid until the next step."""
        lib, flat = native.kernels(), self._flat(name)
        if lib is None or self._stored(name, flat) not in (np.float32, np.uint16):
            _, sure_flags, band_flags = self.buffers()
            for start, mag in self.chunks(name, flat):
                c = mag.size
                sure = np.packbits(np.greater(mag, hi, out=sure_flags[:c]), bitorder="little")
                at_least = np.packbits(np.greater_equal(mag, lo, out=band_flags[:c]), bitorder="little")
                np.bitwise_xor(at_least, sure, out=at_least)  # lo <= |value| <= hi, as packed bits
                where = set_positions(at_least)
                yield start, sure, where, mag[where]
            return
        local = self._local
        if not hasattr(local, "band"):
            local.band = native.ScanBuffers(self._size)
        n, excluded = self.numel[name], self.excluded.get(name)
        for start in range(0, n, CHUNK):
            stop = min(n, start + CHUNK)
            skip = None if excluded is None else excluded[start // 8:(stop + 7) // 8]
            with self._piece(name, start, stop, flat) as piece:
                count = local.band.scan(lib, piece, lo, hi, skip)
                del piece
            if count < 0:
                raise self._nonfinite(name)
            yield start, local.band.sure[:(stop - start + 7) // 8], local.band.positions[:count], \
                local.band.values[:count]


def intra_op_threads() -> int:
    """torch's intra-op thread count where torch is imported; else what it would be: OMP_NUM_THREADS, or the
    cores this process may run on."""
    torch = sys.modules.get("torch")
    if torch is not None:
        return torch.get_num_threads()
    env = os.environ.get("OMP_NUM_THREADS", "")
    if env.isdigit() and int(env) > 0:
        return int(env)
    return len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count() or 1


# --------------------------------------------------------------------------- selection

def _bracket(stream: _Stream, names: list[str], k: int, total: int, seed: int = 0) -> tuple[float, float]:
    """(lo, hi): values with, by a random-block estimate, fewer than k entries above hi and more than k at or
    above lo, each Z standard errors away from k. Exact when the sample covers every entry."""
    gen = np.random.default_rng(seed)
    fraction = min(1.0, max(SAMPLE_SIZE, total >> 10) / max(total, 1))
    plans = []  # (name, blocks in the tensor, sorted starts of the sampled blocks or None for all of it)
    for name in names:
        n = stream.numel[name]
        if n == 0:
            continue
        block = min(n, BLOCK)
        blocks = math.ceil(n / block)
        take = min(blocks, max(MIN_SAMPLE_BLOCKS, math.ceil(fraction * blocks)))
        # distinct blocks drawn in O(take) (not a permutation of all of them: 1.7 s of 8B entries' extract)
        picks = None if take == blocks else np.sort(gen.choice(blocks, take, replace=False))
        plans.append((name, blocks, picks))

    def sample(plan):
        name, blocks, picks = plan
        if picks is None:  # small tensor: all of it, and no sampling error
            values = np.concatenate([chunk.copy() for _, chunk in stream.chunks(name)])
            return values.reshape(1, -1), 1, 1, 1.0
        block = min(stream.numel[name], BLOCK)
        return stream.gather(name, picks.astype(np.int64) * block, block), blocks, picks.size, blocks / picks.size

    strata = stream.map(sample, plans)  # (block matrix of sampled values, blocks, blocks sampled, weight)

    # weighted values, largest first: key = (float bits << 32) | stratum, sorted as uint64 (fast, SIMD)
    keys = []
    for s, (matrix, *_rest) in enumerate(strata):
        v = matrix[matrix >= 0]
        keys.append((v.view(np.uint32).astype(np.uint64) << np.uint64(32)) | np.uint64(s))
    keys = np.sort(np.concatenate(keys))[::-1] if keys else np.empty(0, np.uint64)
    if keys.size == 0:
        return 0.0, math.inf
    weight = np.array([w for *_rest, w in strata], dtype=np.float64)[(keys & np.uint64(0xFFFFFFFF)).astype(np.int64)]
    above = np.cumsum(weight)  # above[i]: estimated entries >= value i
    values = (keys >> np.uint64(32)).astype(np.uint32).view(np.float32)

    t0 = float(values[min(int(np.searchsorted(above, k)), values.size - 1)])
    var = 0.0
    for matrix, blocks, take, w in strata:
        if take == blocks:
            continue
        per_block = (matrix >= t0).sum(axis=1)
        hits, m = float(per_block.sum()), float((matrix >= 0).sum())
        cluster = blocks * blocks * (1 - take / blocks) * float(per_block.var(ddof=1)) / take if take > 1 else 0.0
        p = (hits + 1) / (m + 2)  # smoothed: a stratum with no sampled hit still gets some uncertainty
        binomial = (blocks * matrix.shape[1]) ** 2 * (1 - take / blocks) * p * (1 - p) / m
        var += max(cluster, binomial)
    delta = Z * math.sqrt(var) + 1
    i_hi = int(np.searchsorted(above, k - delta)) - 1  # last value with estimated count < k - delta
    hi = float(values[i_hi]) if i_hi >= 0 else math.inf
    i_lo = int(np.searchsorted(above, k + delta))  # first value with estimated count >= k + delta
    lo = float(values[i_lo]) if i_lo < values.size else 0.0
    return min(lo, hi), hi


def _float_bits(value: float) -> int:
    return int(np.float32(value).view(np.int32))


def _pass(stream: _Stream, names: list[str], k: int, lo: float, hi: float, budget: float,
          above_known: int | None = None):
    """One pass over every entry: those > hi are selected; those in the band [lo, hi] are resolved thus:
      - the band fits the budget: positions and values are kept, and the rest of k taken from them exactly;
      - the band is one value (lo == hi) and how many lie above it is known: its first entries are taken
        in order, on the fly;
      - otherwise: a 65536-bin histogram of the band (over the float bits) narrows it for another pass.
    Returns ('done', bits), ('narrow', lo, hi, entries above hi), or ('miss',) when fewer than k entries
    are >= lo or more than k are > hi. Tensors are scanned on stream.threads threads, except in the
    one-value case, whose ties go to the first entries in tensor order.
    """
    if above_known is not None and lo == hi:
        return _pass_ties(stream, names, k, lo, above_known)
    lo_bits = _float_bits(lo)
    shift = max(0, (_float_bits(hi) - lo_bits).bit_length() - 16)
    band_total = [0]
    lock = threading.Lock()

    def histogram(values: np.ndarray) -> np.ndarray:
        return np.bincount((values.view(np.int32) - lo_bits) >> shift, minlength=1 << 16)

    def scan(name: str):
        """(packed bits of entries > hi, band positions, band values or None, band histogram or None)."""
        n = stream.numel[name]
        packed = np.empty((n + 7) // 8, dtype=np.uint8)
        positions, values, hist = [], [], None
        for start, sure, where, band in stream.bands(name, lo, hi):
            packed[start // 8:start // 8 + sure.size] = sure
            if not where.size:
                continue
            with lock:
                band_total[0] += where.size
                wide = band_total[0] > budget
            if wide:  # too wide to keep: count it instead, with what this tensor kept so far
                hist = np.zeros(1 << 16, dtype=np.int64) if hist is None else hist
                for kept in [*values, band]:
                    hist += histogram(kept)
                positions, values = [], []
            else:
                positions.append(where + start)
                values.append(band.copy())
        dtype = np.int32 if n < 2**31 else np.int64
        return (packed, np.concatenate(positions).astype(dtype) if positions else np.empty(0, dtype),
                np.concatenate(values) if values else np.empty(0, np.float32), hist)

    scans = stream.map(scan, names)
    bits = {name: packed for name, (packed, *_rest) in zip(names, scans)}
    n_sure = sum(count_bits(b) for b in bits.values())
    n_band = band_total[0]
    if n_sure > k or n_sure + n_band < k:
        return ("miss",)
    need = k - n_sure
    if need == 0:
        return ("done", bits)
    if n_band > budget:  # narrow: every band entry counted in one histogram, whichever tensor kept it
        hist = np.zeros(1 << 16, dtype=np.int64)
        for _, _, values, part in scans:
            hist += histogram(values) if part is None else part
        above = np.cumsum(hist[::-1])[::-1]  # above[j]: band entries in bins >= j
        j = int(np.flatnonzero(above >= need).max())
        n_above = n_sure + (int(above[j + 1]) if j + 1 < above.size else 0)
        bin_lo, bin_hi = lo_bits + (j << shift), min(_float_bits(hi), lo_bits + ((j + 1) << shift) - 1)
        as_float = np.array([bin_lo, bin_hi], dtype=np.int32).view(np.float32)
        return ("narrow", float(as_float[0]), float(as_float[1]), n_above)
    pool = np.concatenate([values for _, _, values, _ in scans])
    threshold = np.partition(pool, pool.size - need)[pool.size - need]  # the need-th largest
    ties = need - int((pool > threshold).sum())
    for name, (_, positions, values, _) in zip(names, scans):
        take = values > threshold
        tied = np.flatnonzero(values == threshold)[:max(ties, 0)]
        take[tied] = True
        ties -= tied.size
        set_bits(bits[name], positions[take])
    return ("done", bits)


def _pass_ties(stream: _Stream, names: list[str], k: int, value: float, above_known: int):
    """_pass for a band of one value above which `above_known` entries lie: the entries > value and the first
    k - above_known entries equal to it (tensor order, then row-major), taken on the fly in one thread."""
    ties_left = k - above_known
    bits, n_sure = {}, 0
    _, sure_flags, band_flags = stream.buffers()
    for name in names:
        n = stream.numel[name]
        packed = np.empty((n + 7) // 8, dtype=np.uint8)
        for start, mag in stream.chunks(name):
            c = mag.size
            packed[start // 8:(start + c + 7) // 8] = np.packbits(np.greater(mag, value, out=sure_flags[:c]),
                                                                 bitorder="little")
            if ties_left:
                where = np.flatnonzero(np.equal(mag, value, out=band_flags[:c]))[:ties_left]
                set_bits(packed, where + start)
                ties_left -= where.size
        n_sure += count_bits(packed)
        bits[name] = packed
    if ties_left or n_sure != k:
        return ("miss",)
    return ("done", bits)


def candidate_budget(total: int) -> float:
    """How many band entries a pass keeps as candidates before it counts them in a histogram instead."""
    return max(min(CANDIDATE_BUDGET * total, CANDIDATE_CAP), 1 << 16)


def _resolve(stream: _Stream, names: list[str], k: int, total: int, lo: float, hi: float) -> dict[str, np.ndarray]:
    """Passes until the band around the k-th largest value is resolved: one when the bracket holds (the usual
    case), two or three when it is too wide, and a restart from the full range when it misses."""
    budget = candidate_budget(total)
    above_known = None
    for _ in range(8):  # each narrowing divides the band's range of float bits by 65536: 3 suffice
        result = _pass(stream, names, k, lo, hi, budget, above_known)
        if result[0] == "done":
            return result[1]
        if result[0] == "miss":
            if (lo, hi) == (0.0, math.inf):
                raise AssertionError("top-k selection: the full range cannot miss")
            lo, hi, above_known = 0.0, math.inf, None
        else:
            lo, hi, above_known = result[1:]
    raise AssertionError("top-k selection did not converge")


def _select_exact(source, names, k, excluded, stream: _Stream | None = None):
    """The same selection without the sample: narrowing from the full range of values (three passes)."""
    stream = stream or _Stream({n: source[n] for n in names}, excluded)
    return _resolve(stream, names, k, sum(stream.numel[n] for n in names), 0.0, math.inf)


def top_k_mask(source: Mapping, k: int, excluded: Mapping | None = None) -> dict[str, np.ndarray]:
    """Exactly k entries of largest |value| across all tensors of `source`, as packed bits per tensor (uint8
    numpy arrays, little bit order).

    `excluded` maps names to packed bits (numpy or torch) of entries that may not be chosen (earlier LoTTO
    masks).
    """
    names = list(source)
    total = sum(math.prod(_shape(source[n])) for n in names)
    free = total - sum(count_bits(b) for n, b in (excluded or {}).items() if n in source)
    if not 0 <= k <= free:
        raise LotaError(
            f"cannot select {k:,} entries: only {free:,} of {total:,} ({free / max(total, 1):.2%}) are free"
            + (" after the earlier masks; lower the density (raise the sparsity) or start a new chain" if excluded else "")
        )
    if k == 0:
        return {n: np.zeros((math.prod(_shape(source[n])) + 7) // 8, dtype=np.uint8) for n in names}
    stream = _Stream(source, excluded)
    lo, hi = _bracket(stream, names, k, total)
    return _resolve(stream, names, k, total, lo, hi)


def k_for(sparsity: float, numel: int) -> int:
    """Number of entries kept at a sparsity: round((1 - sparsity) * numel)."""
    return round(numel - sparsity * numel)  # not (1 - s) * n: 1 - 0.9 is 0.0999..., which rounds 1.5 down
