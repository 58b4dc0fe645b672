"""Where a training run's numbers go: out/metrics.jsonl, accelerate's trackers (train.log_with) and the log,
on the main process only, every train.log_every steps and at the last."""

from __future__ import annotations

import json
import logging
from pathlib import Path

import torch

log = logging.getLogger(__name__)


class Metrics:
    def __init__(self, out: Path, accelerator, every: int, steps: int):
        self.path, self.accelerator, self.every, self.steps = out / "metrics.jsonl", accelerator, every, steps

    def record(self, step: int, **values: float) -> None:
        """Record the numbers of optimizer step `step` (1-based) when it is due."""
        if not self.accelerator.is_main_process or (step % self.every and step != self.steps):
            return
        record = {"step": step, **values}
        if torch.cuda.is_available():  # this process's peak so far
            record["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
        with open(self.path, "a") as f:
            f.write(json.dumps(record) + "\n")
        self.accelerator.log(record, step=step)
        log.info("step %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f", step, self.steps, record["loss"],
                 record["lr"], record["grad_norm"], record["tokens_per_s"])
