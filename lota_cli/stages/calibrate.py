"""lota calibrate: dense fine-tuning for a short while; the task vector is w_finetuned - w_base."""

from __future__ import annotations

import logging
from pathlib import Path

from lota_cli.artifacts import save_dense, stage_meta
from lota_cli.config import CalibrateConfig
from lota_cli.models import DTYPES, save_model, select_params
from lota_cli.training import setup, train

log = logging.getLogger(__name__)


def run(cfg: CalibrateConfig, out: Path) -> list[Path]:
    run = setup(cfg, out)
    model = run.model
    names = select_params(model, cfg.params)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = {n: model.get_parameter(n).requires_grad_(True) for n in names}
    base = {n: p.detach().to("cpu", copy=True) for n, p in trainable.items()}
    log.info("calibrating %d tensors (%.1fM parameters)", len(names), sum(p.numel() for p in base.values()) / 1e6)

    result = train(model, trainable, run.examples, run.tokenizer.pad_token_id, cfg, out, run.accelerator,
                   depends={"stage": "calibrate", "base": run.base_fingerprint})

    written = []
    if run.accelerator.is_main_process:
        dtype = DTYPES[cfg.artifact_dtype]
        delta = {n: (p.detach().cpu().float() - base[n].float()).to(dtype) for n, p in trainable.items()}
        meta = stage_meta("task_vector", "calibrate", cfg, cfg.model.path, run.base_fingerprint)
        written.append(save_dense(out / "task_vector.safetensors", meta, delta))
        log.info("loss %.4f -> %.4f over %d steps", result.losses[0], result.losses[-1], result.steps)
        if cfg.save_model:
            written.append(save_model(run.accelerator.unwrap_model(model), run.tokenizer, out / "model"))
    return written
