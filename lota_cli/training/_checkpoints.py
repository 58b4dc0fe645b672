"""Checkpoints of a training run: written atomically (temp dir + rename), the newest `keep` kept, tied to the
run's inputs, and read back to resume bitwise where the run stopped.

out/checkpoints/step-00000040/state.pt holds the loop's state (step, losses, schedule, RNG) and, for a
replicated engine, the trainable values and optimizer state; a partitioning engine (DeepSpeed) writes each
process's share beside it (Engine.save_shards).
"""

from __future__ import annotations

import logging
import shutil
from pathlib import Path

import torch

from lota_cli import LotaError, first_line
from lota_cli.runs import checkpoint_dir, latest

log = logging.getLogger(__package__)


def resume_point(resume, out: Path) -> Path | None:
    """The checkpoint to resume from: `resume=true` picks the newest in out, `resume=PATH` that one."""
    if resume in (False, None, "false"):
        return None
    if resume is True or resume == "true":
        found = latest(out)
        if found is None:
            log.warning("resume=true but %s holds no checkpoint; starting from scratch", checkpoint_dir(out))
        return found
    path = Path(str(resume))
    if not (path / "state.pt").is_file():
        raise LotaError(f"resume={resume}: no checkpoint there (expected {path / 'state.pt'})")
    return path


class Checkpointer:
    """Saves and restores one run's training state through its engine."""

    def __init__(self, out: Path, depends: dict, keep: int, engine, trainable: dict, optimizer, schedule):
        self.out, self.depends, self.keep, self.engine = out, depends, keep, engine
        self.trainable, self.optimizer, self.schedule = trainable, optimizer, schedule

    def restore(self, resume, steps: int) -> tuple[int, list[float]]:
        """(first step to run, losses so far) of a run of `steps` steps: (0, []) for a fresh run."""
        path = resume_point(resume, self.out)
        if path is None:
            return 0, []
        state = self._read(path)
        self.engine.restore(path, state, self.trainable, self.optimizer)
        self.schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        log.info("resumed from %s at step %d of %d", path, state["step"], steps)
        return state["step"], list(state["losses"])

    def _read(self, path: Path) -> dict:
        try:
            state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
        except Exception as err:
            why = ("it holds Python objects besides tensors, which lota never unpickles"
                   if type(err).__name__ == "UnpicklingError" else first_line(err))
            raise LotaError(f"cannot read checkpoint {path}: {why}; delete it to resume from an older one") from err
        if state.get("depends") != self.depends:
            raise LotaError(f"checkpoint {path} belongs to another run (inputs differ: {state.get('depends')} vs "
                            f"{self.depends}); use a fresh `out` or the matching inputs")
        return state

    def save(self, step: int, losses: list[float]) -> Path:
        """Write the state after `step` optimizer steps (every process calls it); returns the checkpoint."""
        state = {"step": step, "losses": losses, "depends": self.depends, "rng": torch.get_rng_state(),
                 "schedule": self.schedule.state_dict(),
                 **self.engine.checkpoint_state(self.trainable, self.optimizer)}
        main, root = self.engine.is_main, checkpoint_dir(self.out)
        final, tmp = root / f"step-{step:08d}", root / f".tmp-step-{step:08d}"
        if main:
            root.mkdir(parents=True, exist_ok=True)
            shutil.rmtree(tmp, ignore_errors=True)
            tmp.mkdir()
        self.engine.save_shards(tmp)
        if main:
            try:
                torch.save(state, tmp / "state.pt")
            except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError
                shutil.rmtree(tmp, ignore_errors=True)
                raise LotaError(f"could not write checkpoint {final}: {first_line(err)}; free space in {root} "
                                "(older checkpoints are kept)") from err
            shutil.rmtree(final, ignore_errors=True)
            tmp.rename(final)
            for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-self.keep]:
                shutil.rmtree(old, ignore_errors=True)
        self.engine.accelerator.wait_for_everyone()
        return final
