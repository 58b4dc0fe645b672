"""lota calibrate: dense fine-tuning for a short while; the task vector is w_finetuned - w_base.

method=lora trains LoRA adapters instead (the baseline); their merged BA is the task vector, so a LoRA run
is evaluated and merged like any other.
"""

from __future__ import annotations

import logging
from pathlib import Path

import torch

from lota_cli import lora
from lota_cli.artifacts import save_dense, stage_meta
from lota_cli.config import CalibrateConfig
from lota_cli.dist import uses_deepspeed
from lota_cli.models import DTYPES, save_model, select_params
from lota_cli.training import load_base, setup, train, trained_values

log = logging.getLogger(__name__)


def run(cfg: CalibrateConfig, out: Path) -> list[Path]:
    run = setup(cfg, out)
    model = run.model
    names = select_params(model, cfg.params)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = {n: model.get_parameter(n).requires_grad_(True) for n in names}
    # Only the main process writes the delta, so only it keeps the base, copied before any engine partitions it.
    main = run.accelerator.is_main_process
    base = {n: p.detach().to("cpu", copy=True) for n, p in trainable.items()} if main else {}
    log.info("calibrating %d tensors (%.1fM parameters)", len(names), sum(p.numel() for p in trainable.values()) / 1e6)

    fitted = trainable
    if cfg.method == "lora":  # the LoRA baseline: train adapters on the frozen weights, then fold BA into them
        for p in trainable.values():
            p.requires_grad_(False)
        model, fitted = lora.attach(model, names, cfg.lora)
    result = train(model, fitted, run.examples, run.tokenizer.pad_token_id, cfg, out, run.accelerator,
                   depends={"stage": "calibrate", "method": cfg.method, "base": run.base_fingerprint})
    if cfg.method == "lora":
        model = lora.merge(run.accelerator.unwrap_model(model))
    trained = trained_values(run.accelerator, trainable)

    written = []
    if main:
        dtype = DTYPES[cfg.artifact_dtype]
        delta = {n: (trained[n] - base[n].float()).to(dtype) for n in names}
        meta = stage_meta("task_vector", "calibrate", cfg, cfg.model.path, run.base_fingerprint)
        written.append(save_dense(out / "task_vector.safetensors", meta, delta))
        log.info("loss %.4f -> %.4f over %d steps", result.losses[0], result.losses[-1], result.steps)
        if cfg.save_model:
            if uses_deepspeed(run.accelerator):  # see load_base
                model = load_base(cfg, run.accelerator)
                with torch.no_grad():
                    for n in names:
                        model.get_parameter(n).copy_(trained[n])
            written.append(save_model(run.accelerator.unwrap_model(model), run.tokenizer, out / "model"))
    return written
