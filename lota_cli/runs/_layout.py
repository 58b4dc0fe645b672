"""Where a training run keeps its checkpoints in its out directory (out/checkpoints/step-00000040/state.pt;
lotto's phases in out/calibrate and out/sparse-train), found without torch: the launching process names the
newest one when a process of its run dies."""

from __future__ import annotations

from pathlib import Path


def checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def latest(out: Path) -> Path | None:
    """The newest complete checkpoint of out (its state.pt written)."""
    done = sorted(p for p in checkpoint_dir(out).glob("step-*") if (p / "state.pt").is_file())
    return done[-1] if done else None


def newest_below(out: Path) -> Path | None:
    """The most recently written complete checkpoint of out or of its phases (lotto: out/calibrate, ...)."""
    done = [p.parent for p in out.glob("**/checkpoints/step-*/state.pt")]
    return max(done, key=lambda p: (p / "state.pt").stat().st_mtime) if done else None
