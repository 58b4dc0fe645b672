"""Building and loading the native kernels (merge.c): compiled on first use, loaded through ctypes.

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
from functools import lru_cache
from pathlib import Path

from lota_cli import cache_root

log = logging.getLogger(__package__)
SOURCE = Path(__file__).with_name("merge.c")
FLAGS = ["-O3", "-shared", "-fPIC", "-std=c11"]  # portable code: no -march=native (caches can be shared)
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
