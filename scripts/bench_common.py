"""Shared pieces of scripts/bench.py: measurements in fresh child processes, peak RSS, result rows."""

from __future__ import annotations

import json
import os
import statistics
import subprocess
import sys
import threading
import time
from dataclasses import asdict, dataclass
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
GSM8K = ROOT.parent / "shared" / "data" / "gsm8k"  # the shared real data, beside the checkout
GiB, MiB = 1 << 30, 1 << 20
THREADS: dict = {"n": None}  # set from the config by bench.py


# --------------------------------------------------------------------------- results

@dataclass
class Figure:
    """One measured figure, with its target when it has one (op: '<=' or '>=')."""

    part: str
    name: str
    value: float | str | None
    unit: str = ""
    target: float | None = None
    op: str = "<="
    note: str = ""
    check: bool | None = None  # pass/fail of a figure without a numeric target (e.g. "same set")

    @property
    def ok(self) -> bool | None:
        if self.check is not None:
            return self.check
        if self.target is None or not isinstance(self.value, (int, float)):
            return None
        return self.value <= self.target if self.op == "<=" else self.value >= self.target

    def as_dict(self) -> dict:
        return {**asdict(self), "ok": self.ok}


def fmt(value, unit: str = "") -> str:
    if value is None:
        return "n/a"
    if isinstance(value, str):
        return value
    if isinstance(value, bool):
        return "yes" if value else "NO"
    if unit in ("B", "bytes"):
        return f"{value / MiB:,.1f} MiB" if abs(value) >= MiB else f"{value:,.0f} B"
    if unit == "s":
        return f"{value:.3g} s"
    if unit == "x":
        return f"{value:.3g}x"
    if isinstance(value, float):
        text = f"{value:.4g}" if abs(value) < 1e5 else f"{value:,.0f}"
    else:
        text = f"{value:,}"
    return f"{text} {unit}".strip()


# --------------------------------------------------------------------------- memory

def memory_bytes() -> int:
    """This machine's memory (MemTotal), 0 where /proc/meminfo does not say."""
    return next((int(line.split()[1]) * 1024 for line in open("/proc/meminfo") if line.startswith("MemTotal")), 0)


def status() -> dict[str, int]:
    """VmRSS, VmHWM, RssAnon, RssFile of this process, in bytes."""
    out = {}
    with open("/proc/self/status") as f:
        for line in f:
            key, _, rest = line.partition(":")
            if key in ("VmRSS", "VmHWM", "RssAnon", "RssFile"):
                out[key] = int(rest.split()[0]) * 1024
    return out


class PeakRSS:
    """Peak resident set of this process during a `with` block, relative to the start of the block.

    `extra`: VmHWM after minus VmRSS before, the kernel's own high-water mark (reset on entry through
    /proc/self/clear_refs), so no short spike is missed. `extra_anon`: the peak of anonymous memory (not
    counting file pages mapped in from the page cache), polled every millisecond, so approximate.
    """

    def __enter__(self) -> "PeakRSS":
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")  # reset VmHWM to the current RSS
        self.before = status()
        self._peak_anon, self._stop = self.before["RssAnon"], False
        self._thread = threading.Thread(target=self._poll, daemon=True)
        self._thread.start()
        return self

    def _poll(self) -> None:
        while not self._stop:
            self._peak_anon = max(self._peak_anon, status()["RssAnon"])
            time.sleep(0.001)

    def __exit__(self, *exc) -> None:
        self._stop = True
        self._thread.join()
        after = status()
        self._peak_anon = max(self._peak_anon, after["RssAnon"])
        self.extra = after["VmHWM"] - self.before["VmRSS"]
        self.extra_anon = self._peak_anon - self.before["RssAnon"]
        self.peak = after["VmHWM"]


def measure(fn, *args, **kwargs) -> tuple[object, dict]:
    """fn(*args, **kwargs) timed and with its peak RSS: (result, {'seconds', 'rss_extra', 'rss_extra_anon', 'rss_peak'})."""
    with PeakRSS() as rss:
        start = time.perf_counter()
        result = fn(*args, **kwargs)
        seconds = time.perf_counter() - start
    return result, {"seconds": seconds, "rss_extra": rss.extra, "rss_extra_anon": rss.extra_anon,
                    "rss_peak": rss.peak, "rss_before": rss.before["VmRSS"]}


# --------------------------------------------------------------------------- child processes

def child_env() -> dict[str, str]:
    """The offline environment every lota run from a script gets (lota_cli.testing), plus the bench's threads."""
    from lota_cli.testing import OFFLINE_ENV

    env = dict(OFFLINE_ENV)
    if THREADS.get("n"):  # torch's (OpenMP) intra-op threads in every child, including the CLIs they start
        env["OMP_NUM_THREADS"] = env["MKL_NUM_THREADS"] = str(THREADS["n"])
    env["PYTHONPATH"] = os.pathsep.join([str(ROOT), str(HERE)] + ([env["PYTHONPATH"]] if env.get("PYTHONPATH") else []))
    return env


def in_child(module: str, func: str, timeout: float = 900, **kwargs) -> dict:
    """Run scripts/<module>.py's func(**kwargs) in a fresh Python process; its JSON-able result."""
    cmd = [sys.executable, str(HERE / "bench.py"), "_child", module, func, json.dumps(kwargs)]
    proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env(), cwd=ROOT, timeout=timeout)
    marker = "@@bench-result@@"
    lines = [line for line in proc.stdout.splitlines() if line.startswith(marker)]
    if proc.returncode != 0 or not lines:
        tail = (proc.stderr or proc.stdout)[-3000:]
        raise RuntimeError(f"{module}.{func} failed (exit {proc.returncode}):\n{tail}")
    return json.loads(lines[-1][len(marker):])


def timed_lota(*args) -> dict:
    """`lota ARGS` in a fresh process: its wall time and peak RSS (bench_merge.timed)."""
    return in_child("bench_merge", "timed", cmd=[sys.executable, "-m", "lota_cli", *map(str, args)], timeout=3600)


def child_main(argv: list[str]) -> None:
    """Entry of a child process: `bench.py _child MODULE FUNC JSON`."""
    import importlib

    module, func, kwargs = argv[0], argv[1], json.loads(argv[2])
    sys.path[:0] = [str(ROOT), str(HERE)]
    result = getattr(importlib.import_module(module), func)(**kwargs)
    print("@@bench-result@@" + json.dumps(result), flush=True)


def median(values) -> float:
    return statistics.median(values)


def find_mergekit(cfg) -> str | None:
    """mergekit-yaml beside this interpreter, in cfg.mergekit_bin (mergekit's own venv), or on PATH."""
    import shutil

    where = [str(Path(sys.executable).parent), *([str(cfg.mergekit_bin)] if cfg.mergekit_bin else [])]
    return shutil.which("mergekit-yaml", path=os.pathsep.join(where)) or shutil.which("mergekit-yaml")


def log(msg: str) -> None:
    print(f"[bench {time.strftime('%H:%M:%S')}] {msg}", file=sys.stderr, flush=True)
