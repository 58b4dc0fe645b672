"""What the training stages (calibrate, sparse-train, lotto) share around the loop: the set-up they start
from, and writing the trained model at the end."""

from __future__ import annotations

import logging
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lota_cli.config import TrainStageConfig
from lota_cli.data import train_data
from lota_cli.models import (add_delta, fingerprint, load_model, lora_delta, merge_lora, model_saved_fingerprint,
                             save_model, skeleton)
from lota_cli.training._sparse import attach_sparse, fold_sparse
from lota_cli.training._engines import make_engine
from lota_cli.training._metrics import start_trackers

log = logging.getLogger(__package__)


@dataclass
class Run:
    """What every training stage starts from."""

    engine: object  # the engine (_engines.Replicated or a subclass)
    model: nn.Module
    tokenizer: object
    base_fingerprint: str
    data: object  # data.Fixed or data.Streamed: what the loop trains on
    base_checkpoint: str = ""  # the base's weights as saved (models.model_saved_fingerprint)

    @property
    def is_main(self) -> bool:
        return self.engine.is_main

    def start_values(self, params: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """The parameters' values before training, for the delta: copied to the CPU on the main process (the one
        that writes it), before any engine partitions them; {} on the others."""
        return {n: p.detach().to("cpu", copy=True) for n, p in params.items()} if self.is_main else {}


def setup(cfg: TrainStageConfig, out: Path, check: Callable[[nn.Module], None] | None = None) -> Run:
    """Engine, seeded RNG, model + tokenizer, base fingerprint and the training data (data.train_data).

    `check(model)` refuses inputs that do not fit the model (a mask's names and shapes, a selection lota
    cannot train) on the model's weightless skeleton, before anything loads or is written; the stage checks
    the loaded model again (which is all there is where no skeleton can be built)."""
    from accelerate.utils import set_seed

    if check is not None and (outline := skeleton(cfg.model)) is not None:
        check(outline)
    out.mkdir(parents=True, exist_ok=True)
    engine = make_engine(cfg, out)
    if not engine.is_main:  # one process speaks; the others only warn
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(cfg.train.seed)
    with engine.loading():
        model, tokenizer = load_model(cfg.model)
    base = fingerprint(model)
    data = train_data(tokenizer, cfg)
    unit = "sequences" if data.packed else "pairs" if cfg.task.format == "preference" else "examples"
    what = "streamed" if data.n is None else f"{data.n} training {unit}"
    log.info("model %s (%.1fM parameters), task %s: %s", cfg.model.path,
             sum(p.numel() for p in model.parameters()) / 1e6, cfg.task.name, what)
    if cfg.train.log_with:
        start_trackers(engine.accelerator, cfg, out)
    return Run(engine, model, tokenizer, base, data, model_saved_fingerprint(model))


def load_base(cfg: TrainStageConfig, engine, previous=()) -> nn.Module:
    """A fresh copy of the base model from disk, whole (also under ZeRO-3), on the CPU, with the earlier
    sparse deltas `previous` (artifacts) added."""
    with engine.loading():
        model, _ = load_model(cfg.model)
    for artifact in previous:
        add_delta(model, artifact)
    return model


def lora_task_vector(run: Run, peft_model, fitted: dict[str, nn.Parameter], selected: dict[str, nn.Parameter],
                     start: dict[str, torch.Tensor] | None) -> tuple[dict, dict | None]:
    """(delta, trained) of a LoRA run, float32, on the main process ({} on the others). Over a full-precision
    base, the adapters are merged into the very parameters `selected` holds: trained is their merged values,
    delta those minus `start` (their values before training). Over a quantized base (start None) the weights
    cannot take the merge: delta is scale·BA computed from the adapters (`fitted`), and trained None."""
    unwrapped = run.engine.accelerator.unwrap_model(peft_model)
    if start is None:
        adapters = run.engine.trained_values(fitted)
        return (lora_delta(unwrapped, adapters, list(selected)) if run.is_main else {}), None
    merge_lora(unwrapped)
    trained = run.engine.trained_values(selected)
    return ({n: trained[n] - start[n].float() for n in selected} if run.is_main else {}), trained


def export_model(run: Run, cfg: TrainStageConfig, model: nn.Module, directory: Path,
                 trained: dict[str, torch.Tensor], positions: dict[str, torch.Tensor] | None = None,
                 previous=(), added: bool = False) -> Path:
    """Write the trained model as a Hugging Face directory (main process only): the engine's model (or, where
    that may be partitioned or cast, a fresh base + `previous` deltas) with the `trained` values in place,
    dense (`added`: deltas added to the weights) or at `positions`. Weights that did not train stay bitwise
    the base's. Over a quantized base, the fresh base is its full-precision checkpoint (as QLoRA users merge
    into the fp16 base): the values trained against the quantized weights are written over the unquantized."""
    if cfg.model.quantize:
        log.info("the values trained against the %s-quantized base; writing them over its full-precision "
                 "weights (model.dtype=%s)", cfg.model.quantize, cfg.model.dtype)
        full = replace(cfg, model=replace(cfg.model, quantize=None))
        model = load_base(full, run.engine, previous)
    else:
        model = run.engine.model_for_export(model, lambda: load_base(cfg, run.engine, previous))
    if positions is None:
        with torch.no_grad():
            for name, value in trained.items():
                param = model.get_parameter(name)
                if added:
                    param.add_(value.to(param.dtype))
                else:
                    param.copy_(value)
    else:
        attach_sparse(model, positions, trained)
        fold_sparse(model, list(positions))
    return save_model(model, run.tokenizer, directory)
