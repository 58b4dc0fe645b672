"""Processes and engines: the Accelerator a training stage runs under."""

from __future__ import annotations

import os
from pathlib import Path

import torch

from lota_cli.config import TrainStageConfig


def mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


def make_accelerator(cfg: TrainStageConfig, out: Path):
    from accelerate import Accelerator
    from accelerate.utils import InitProcessGroupKwargs

    handlers = []
    if int(os.environ.get("WORLD_SIZE", "1")) > 1:  # launched by accelerate / torchrun
        backend = cfg.dist.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        handlers.append(InitProcessGroupKwargs(backend=backend))
    return Accelerator(
        mixed_precision=mixed_precision(cfg.train.mixed_precision),
        log_with=cfg.train.log_with,
        project_dir=str(out),
        kwargs_handlers=handlers,
    )
