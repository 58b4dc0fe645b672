"""lota plan: the memory a stage needs per device, from the model's config alone (no weights load), for each
engine and device count, and the fewest devices of plan.device_memory that hold it.

The estimate's parts and what each counts are lota_cli.training's plan. The table goes to stderr, the whole
estimate to out/plan.json (its path on stdout).
"""

from __future__ import annotations

import json
import logging
from pathlib import Path

from rich.table import Table

from lota_cli import LotaError
from lota_cli.config import ENGINES, REPLICATED_ENGINES, PlanConfig, parse_size
from lota_cli.console import stderr
from lota_cli.io import write_text
from lota_cli.models import skeleton
from lota_cli.training import model_shape, plan, smallest_fit

log = logging.getLogger(__name__)
GIB = 2**30


def run(cfg: PlanConfig, out: Path) -> list[Path]:
    opts = cfg.plan
    model = skeleton(cfg.model)
    if model is None:
        raise LotaError(f"cannot build {cfg.model.path!r} from its config alone: give a model directory (or hub id) "
                        "holding its config.json")
    shape = model_shape(model, cfg)
    method, memory, overhead = cfg.method(), parse_size(opts.device_memory), parse_size(opts.overhead)
    engines = [e for e in ENGINES if not cfg.replicated_setting() or e in REPLICATED_ENGINES]
    # (phase, how it trains): lotto plans the larger of its calibration and its sparse training
    phases = [("calibrate", method), ("sparse-train", "sparse")] if opts.stage == "lotto" else [(opts.stage, method)]
    estimates = {}
    for engine in engines:
        counts = [1] if engine == "single" else list(opts.devices)
        per_count = {n: max((plan(shape, cfg, phase, opts.density, how, engine, n, overhead) for phase, how in phases),
                            key=lambda part: part["total"]) for n in counts}
        fewest = [smallest_fit(shape, cfg, phase, opts.density, how, engine, memory, overhead) for phase, how in phases]
        estimates[engine] = {"devices": {str(n): parts for n, parts in per_count.items()},
                             "fewest_devices": None if None in fewest else max(fewest)}
    result = {"model": cfg.model.path, "stage": opts.stage, "method": method, "dtype": cfg.model.dtype,
              "quantize": cfg.model.quantize, "density": opts.density if method == "sparse" else None,
              "batch_size": cfg.train.batch_size, "max_length": cfg.task.max_length,
              "gradient_checkpointing": cfg.model.gradient_checkpointing, "device_memory": memory,
              "selected_parameters": shape.selected, "engines": estimates}
    stderr.print(_table(result, memory))
    return [write_text(out / "plan.json", json.dumps(result, indent=2) + "\n")]


def _table(result: dict, memory: int) -> Table:
    fewest = ", ".join(f"{engine} {e['fewest_devices'] or ('none' if engine == 'single' else 'over 1024')}"
                       for engine, e in result["engines"].items())
    table = Table(title=f"{result['stage']} ({result['method']}) of {result['model']}: GiB per device",
                  caption=f"fewest devices of {memory / GIB:.1f} GiB: {fewest}")
    for column in ("engine", "N", "base", "values", "grads", "optim", "activ", "temp", "process", "total", "fits"):
        table.add_column(column, justify="left" if column == "engine" else "right")
    for engine, estimate in result["engines"].items():
        for n, parts in estimate["devices"].items():
            cells = [parts[k] / GIB for k in ("base", "values", "gradients", "optimizer", "activations", "temporaries",
                                             "overhead", "total")]
            table.add_row(engine, n, *(f"{c:.2f}" for c in cells), "yes" if parts["total"] <= memory else "no")
    return table
