"""The native merge kernels (lota_cli/native): bit for bit what merging's torch path computes, their overlap
counts equal merging.delta_overlap's, and without a compiler lota merges all the same."""

from __future__ import annotations

import itertools
import logging
import math
import os
import subprocess
import sys

import numpy as np
import pytest
import torch

from conftest import kernels
from lota_cli import native
from lota_cli.ops import delta_overlap, merge

pytestmark = pytest.mark.skipif(kernels() is None, reason="no C compiler to build the kernels")


def torch_path(base, masks, values, method, weights, scale):
    """merge's own arithmetic: each input laid over the union of positions, merged, added, rounded once."""
    positions = np.flatnonzero(np.logical_or.reduce(masks))
    compact = []
    for mask, v in zip(masks, values):
        c = torch.zeros(positions.size)
        c[torch.from_numpy(mask[positions])] = v.float()
        compact.append(c)
    merged = merge(method, compact, scale=scale, **({"weights": weights} if method == "task_arithmetic" else {}))
    out, at = base.clone(), torch.from_numpy(positions)
    out[at] = (out[at].float() + merged).to(out.dtype)
    return out, {pair: delta_overlap(compact[pair[0]], compact[pair[1]])
                 for pair in itertools.combinations(range(len(masks)), 2)}


@pytest.mark.parametrize("simd", [True, False], ids=["simd", "scalar"])
@pytest.mark.parametrize("trial", range(36))
def test_the_kernel_is_the_torch_merge_bit_for_bit(trial, simd):
    """Both of the kernel's paths (the AVX-512 one where this CPU has it, for whole words of 64 entries; the
    scalar one, for the rest and for other CPUs) against the torch arithmetic."""
    rng = np.random.default_rng(trial)
    n, m = int(rng.integers(1, 3000)), 1 + trial % 3
    masks = [rng.random(n) < d for d in rng.random(m)]
    values = []
    for mask in masks:
        v = torch.from_numpy(rng.standard_normal(int(mask.sum())).astype(np.float32) * 1e-2)
        v[::7] = 0.0  # held zeros: not counted as held by the overlap, added all the same
        values.append(v.to(torch.bfloat16) if trial % 2 else v)
    method = "task_arithmetic" if trial % 4 == 0 else "sum"
    weights = [float(w) for w in rng.standard_normal(m)] if method == "task_arithmetic" else None
    scale = 0.7 if trial % 5 == 1 else 1.0
    dtype = (torch.bfloat16, torch.float32, torch.float16)[trial % 3]
    base = torch.randn(n, generator=torch.Generator().manual_seed(trial)).to(dtype)
    base[::11] = -0.0
    expected, overlaps = torch_path(base, masks, values, method, weights, scale)

    fused = native.FusedMerge(native.kernels(), [np.packbits(mask, bitorder="little") for mask in masks],
                              [v.view(torch.uint16).numpy() if v.dtype == torch.bfloat16 else v.numpy() for v in values],
                              weights, scale, piece=64 * int(rng.integers(1, 6)), simd=simd)
    out = base.clone()
    flat = (out.view(torch.uint16) if dtype == torch.bfloat16 else out).numpy()
    step = fused.piece * int(rng.integers(1, 5))
    for start in range(0, n, step):
        fused.into(flat[start:start + step], start)
    assert torch.equal(out.view(torch.uint8), expected.view(torch.uint8))
    for k, (i, j) in enumerate(itertools.combinations(range(m), 2)):
        o = overlaps[i, j]
        assert (fused.nonzero[i], fused.nonzero[j], fused.shared[k], fused.agree[k]) == (o.a, o.b, o.shared, o.agree)


def test_a_count_of_values_unlike_the_count_of_positions_is_refused():
    bits = np.packbits(np.array([1, 0, 1, 1, 0, 0, 0, 0, 1], dtype=bool), bitorder="little")
    with pytest.raises(ValueError) as err:
        native.FusedMerge(native.kernels(), [bits, bits], [np.ones(4, np.float32), np.ones(3, np.float32)])
    assert err.value.args == (1,)


@pytest.mark.parametrize("simd", [True, False], ids=["simd", "scalar"])
def test_an_overflowing_sum_names_its_entry(simd):
    base = torch.full((256,), 3e38)
    held = (np.arange(256) == 5) | (np.arange(256) == 133)
    fused = native.FusedMerge(native.kernels(), [np.packbits(held, bitorder="little")],
                              [np.array([1.0, 1e38], np.float32)], piece=256, simd=simd)
    with pytest.raises(OverflowError) as err:
        fused.into(base.numpy(), 0)
    assert err.value.args == (133,)


@pytest.mark.parametrize("simd", [True, False], ids=["simd", "scalar"])
@pytest.mark.parametrize("bad", [math.nan, math.inf], ids=["nan", "inf"])
def test_a_nan_or_inf_value_is_refused_naming_its_input(simd, bad):
    held = np.arange(200) % 3 == 0
    values = np.full(int(held.sum()), 1e-3, np.float32)
    damaged = values.copy()
    damaged[50] = bad
    bits = np.packbits(held, bitorder="little")
    fused = native.FusedMerge(native.kernels(), [bits, bits], [values, damaged], piece=200, simd=simd)
    with pytest.raises(FloatingPointError) as err:
        fused.into(np.zeros(200, np.float32), 0)
    assert err.value.args == (1,)


def test_without_a_compiler_kernels_is_none_and_says_so(monkeypatch, tmp_path, caplog):
    built = os.environ["LOTA_CACHE"]  # the run's cache, which holds a build already
    monkeypatch.setenv("LOTA_CACHE", str(tmp_path))
    try:
        for env, message in ((("CC", "/bin/false"), "could not build"), (("LOTA_NATIVE", "0"), None),
                             (("CC", str(tmp_path / "no-such-cc")), "no C compiler")):
            native.kernels.cache_clear()
            with monkeypatch.context() as patch, caplog.at_level(logging.INFO, "lota_cli.native"):
                patch.setenv(*env)
                caplog.clear()
                assert native.kernels() is None
                assert (message in caplog.text) if message else not caplog.text
        native.kernels.cache_clear()
        monkeypatch.setenv("LOTA_CACHE", built)  # (that a build lands in the cache: the damaged-build test)
        assert native.kernels() is not None
    finally:
        native.kernels.cache_clear()


def test_a_damaged_cached_build_is_built_again(tmp_path):
    """A truncated library in the cache (a full disk, say) is built again, in a fresh process (one that has
    loaded a library keeps it)."""
    from lota_cli import cache_root

    assert native.kernels() is not None  # built (or found) in this session's cache
    (built,) = (cache_root() / "native").glob("merge-*.so")
    damaged = tmp_path / "native" / built.name  # what a fresh cache holds after a full disk cut it short
    damaged.parent.mkdir()
    damaged.write_bytes(built.read_bytes()[:100])
    load = [sys.executable, "-c", "from lota_cli import native; print(native.kernels() is not None)"]
    env = {**os.environ, "LOTA_CACHE": str(tmp_path)}
    assert subprocess.run(load, env=env, capture_output=True, text=True, check=True).stdout.strip() == "True"
    assert damaged.stat().st_size == built.stat().st_size


@pytest.mark.parametrize("simd", [True, False], ids=["simd", "scalar"])
@pytest.mark.parametrize("trial", range(12))
def test_the_scan_is_the_numpy_pass(trial, simd):
    """native.scan (one pass of top-k selection) against its numpy definition: entries > hi as packed bits,
    those in [lo, hi] as positions and |values|, excluded entries in neither; ties at lo and hi included."""
    rng = np.random.default_rng(100 + trial)
    n = int(rng.integers(1, 5000))
    values = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
    values[::13] = 0.5  # ties at the bounds
    values[::17] = -0.25
    bf16 = trial % 2 == 1
    if bf16:
        values = values.to(torch.bfloat16)
    mag = values.float().abs().numpy()
    lo, hi = (0.25, 0.5) if trial % 3 else (0.0, float("inf"))
    excluded = rng.random(n) < 0.3 if trial % 4 else np.zeros(n, bool)
    mag_free = np.where(excluded, -1.0, mag)
    buffers = native.ScanBuffers(n)
    piece = values.view(torch.int16).numpy().view(np.uint16) if bf16 else values.numpy()
    count = buffers.scan(native.kernels(), piece, lo, hi, np.packbits(excluded, bitorder="little") if trial % 4 else None,
                         simd=simd)
    band = np.flatnonzero((mag_free >= lo) & (mag_free <= hi))
    assert count == band.size
    assert np.array_equal(buffers.sure[:(n + 7) // 8], np.packbits(mag_free > hi, bitorder="little"))
    assert np.array_equal(buffers.positions[:count], band)
    assert np.array_equal(buffers.values[:count], mag[band])


@pytest.mark.parametrize("simd", [True, False], ids=["simd", "scalar"])
def test_the_scan_refuses_nan_and_inf_naming_the_entry(simd):
    values = np.zeros(100, np.float32)
    values[70] = -math.inf
    assert native.ScanBuffers(100).scan(native.kernels(), values, 0.0, 1.0, None, simd=simd) == -1 - 70


@pytest.mark.parametrize("dtype", [np.float32, np.uint16, np.float16], ids=["float32", "bfloat16", "float16"])
def test_all_finite_finds_nan_and_inf_anywhere(dtype):
    """native.all_finite (vectorized blocks, then a tail) against numpy's answer, for every position of a bad
    entry near the blocks' edges and in tails of every length."""
    rng = np.random.default_rng(7)
    for n in (1, 15, 16, 31, 32, 33, 100, 4097, 5000):
        clean = torch.from_numpy(rng.standard_normal(n).astype(np.float32))
        as_dtype = {np.float32: clean, np.uint16: clean.to(torch.bfloat16), np.float16: clean.half()}[dtype]
        array = as_dtype.view(torch.int16).numpy().view(np.uint16) if dtype is np.uint16 else as_dtype.numpy()
        assert native.all_finite(array)
        for at in {0, n // 2, n - 1, min(n - 1, 31), min(n - 1, 4096)}:
            for bad in (math.nan, -math.inf):
                damaged = as_dtype.clone()
                damaged[at] = bad
                damaged = damaged.view(torch.int16).numpy().view(np.uint16) if dtype is np.uint16 else damaged.numpy()
                assert not native.all_finite(damaged), (n, at, bad)
