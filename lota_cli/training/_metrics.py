"""Where a training run's numbers go: out/metrics.jsonl, accelerate's trackers (train.log_with) and the log,
on the main process only, every train.log_every steps and at the last.

Trackers: TensorBoard event files under out/lota (a run's settings as hparams in a subdirectory), a W&B run
directory under out/wandb; both get loss, lr, grad_norm, tokens_per_s and step_s (and gpu_mem_gb on GPUs)
per logged step, under `<phase>/` in a stage with several training phases (lotto: calibrate/, sparse-train/).
"""

from __future__ import annotations

import dataclasses
import json
import logging
from pathlib import Path

import torch

from lota_cli.io import append_line

log = logging.getLogger(__package__)
_RUNNING: list = []  # the trackers this process started; finish_trackers() closes them as the stage ends


def start_trackers(accelerator, cfg, out: Path) -> None:
    """Start the trackers of train.log_with, with the run's settings (model, task, train.*, optim.*, dist.*)."""
    settings = {"out": str(out), "model.path": cfg.model.path, "task.name": cfg.task.name}
    for group in ("train", "optim", "dist"):  # scalars only: TensorBoard's hparams take nothing else
        settings.update({f"{group}.{k}": v for k, v in dataclasses.asdict(getattr(cfg, group)).items()
                         if isinstance(v, (int, float, str, bool))})
    accelerator.init_trackers("lota", config=settings, init_kwargs={"wandb": {"dir": str(out)}})
    _RUNNING.extend(accelerator.trackers)


def finish_trackers() -> None:
    """Close the trackers (flushing W&B's run); the CLI calls it when a stage ends, after a failure too, while
    stdout still goes to stderr: W&B prints as it finishes, and stdout is for the written paths."""
    while _RUNNING:
        _RUNNING.pop().finish()


class Metrics:
    def __init__(self, out: Path, accelerator, every: int, steps: int, phase: str | None = None,
                 fresh: bool = True):
        """fresh: a run from its first step, whose metrics.jsonl starts empty (an earlier run's in the same out is
        replaced, not appended to); a resumed run appends to the steps before."""
        self.path, self.accelerator, self.every, self.steps = out / "metrics.jsonl", accelerator, every, steps
        self.prefix = f"{phase}/" if phase else ""
        if fresh and accelerator.is_main_process:
            self.path.unlink(missing_ok=True)

    def record(self, step: int, **values: float) -> None:
        """Record the numbers of optimizer step `step` (1-based) when it is due."""
        if not self.accelerator.is_main_process or (step % self.every and step != self.steps):
            return
        if torch.cuda.is_available():  # this process's peak so far
            values["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        append_line(self.path, json.dumps({"step": step, **values}))
        self.accelerator.log({self.prefix + k: v for k, v in values.items()}, step=step)
        pairs = (f" reward_accuracy {values['reward_accuracy']:.3f} margin {values['margin']:.4f}"
                 if "reward_accuracy" in values else "")  # a preference objective's
        log.info("step %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f%s", step, self.steps, values["loss"],
                 values["lr"], values["grad_norm"], values["tokens_per_s"], pairs)
