"""lota calibrate: dense fine-tuning for a short while; the task vector is w_finetuned - w_base.

method=lora trains LoRA adapters instead (the baseline); their merged BA is the task vector, so a LoRA run
is evaluated and merged like any other. Over a quantized base (model.quantize, QLoRA calibration) the task
vector is scale·BA itself, computed from the adapters: the quantized weights cannot take it.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from lota_cli.artifacts import save_dense, stage_meta
from lota_cli.config import CalibrateConfig
from lota_cli.models import attach_lora, select_params, weight_shape
from lota_cli.tensors import torch_dtype
from lota_cli.training import PrecomputedReference, export_model, lora_task_vector, setup, train

log = logging.getLogger(__name__)


def run(cfg: CalibrateConfig, out: Path) -> list[Path]:
    run = setup(cfg, out, check=lambda model: select_params(model, cfg.params))
    model = run.model
    names = select_params(model, cfg.params)
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = {n: model.get_parameter(n) for n in names}
    main, quantized = run.is_main, bool(cfg.model.quantize)
    # over a quantized base there is nothing to copy: the task vector comes from the adapters
    base = None if quantized else run.start_values(trainable)
    log.info("calibrating %d tensors (%.1fM parameters)", len(names),
             sum(math.prod(weight_shape(p)) for p in trainable.values()) / 1e6)

    if cfg.method == "lora":  # the LoRA baseline: train adapters on the frozen weights, then fold BA into them
        model, fitted = attach_lora(model, names, cfg.lora)
    else:
        fitted = {n: p.requires_grad_(True) for n, p in trainable.items()}
    result = train(model, fitted, run.data, run.tokenizer.pad_token_id, cfg, out, run.engine,
                   depends={"stage": "calibrate", "method": cfg.method, "base": run.base_fingerprint},
                   reference=PrecomputedReference())
    if cfg.method == "lora":
        delta, trained = lora_task_vector(run, model, fitted, trainable, base)
        model = run.engine.accelerator.unwrap_model(model).get_base_model()  # merged in place (full precision)
    else:
        trained = run.engine.trained_values(trainable)
        delta = {n: trained[n] - base[n].float() for n in names} if main else {}

    written = []
    if main:
        dtype = torch_dtype(cfg.artifact_dtype)
        delta = {n: d.to(dtype) for n, d in delta.items()}
        meta = stage_meta("task_vector", "calibrate", cfg, cfg.model.path, run.base_fingerprint,
                          base_checkpoint=run.base_checkpoint)
        written.append(save_dense(out / "task_vector.safetensors", meta, delta))
        log.info("loss %.4f -> %.4f over %d steps", result.losses[0], result.losses[-1], result.steps)
        if cfg.save_model:
            written.append(export_model(run, cfg, model, out / "model", delta, added=True) if quantized
                           else export_model(run, cfg, model, out / "model", trained))
    return written
