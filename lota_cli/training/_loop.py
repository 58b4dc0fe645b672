"""The training loop every training stage shares: optimizer, schedule, accumulation, loss normalization.

Batch: one optimizer step sees train.batch_size x train.grad_accum sequences whatever the number of
processes N: each of its grad_accum micro-batches of train.batch_size sequences is sharded over the N
processes (train.batch_size / N each, the per-device batch), never duplicated.

Loss normalization: each micro-batch's loss is the sum of its target-token NLLs (train.objective=sft; for
dpo and simpo, of its pairs' losses) divided by the number of target tokens (pairs) in the whole global batch
(all micro-steps, all processes), times the number of processes (data-parallel engines average gradients
over processes). So the gradient of one optimizer step is the same whatever the number of processes or the
split of the global batch into micro-batches. What the objective is and what it compares with is
_objectives.py's.

What differs between engines is asked of the engine (_engines.py); checkpoints are _checkpoints.py's, the
numbers' destinations _metrics.py's.
"""

from __future__ import annotations

import math
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from lota_cli import LotaError
from lota_cli.config import OptimConfig, TrainConfig, TrainStageConfig
from lota_cli.console import progress_bar
from lota_cli.data import MicroBatches, collate
from lota_cli.runs import latest
from lota_cli.training._checkpoints import Checkpointer
from lota_cli.training._metrics import Metrics
from lota_cli.training._objectives import make_objective


def optimizer_steps(cfg: TrainConfig, n_items: int | None) -> int:
    """train.max_steps, or the steps of train.epochs passes over the items (examples, or packed sequences;
    streamed data has no count, and TrainStageConfig requires train.max_steps for it)."""
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_items / (cfg.batch_size * cfg.grad_accum)))


def make_optimizer(params: list[nn.Parameter], train: TrainConfig, optim: OptimConfig) -> torch.optim.Optimizer:
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=optim.momentum, weight_decay=train.weight_decay)
    if optim.name == "adamw8bit":  # bitsandbytes' blockwise 8-bit moments: 2 B an entry instead of 8
        from bitsandbytes.optim import AdamW8bit

        return AdamW8bit(params, lr=train.lr, betas=tuple(optim.betas), eps=optim.eps,
                         weight_decay=train.weight_decay)
    return torch.optim.AdamW(params, lr=train.lr, betas=tuple(optim.betas), eps=optim.eps,
                             weight_decay=train.weight_decay, foreach=False)


def make_schedule(optimizer: torch.optim.Optimizer, cfg: TrainConfig, steps: int):
    def factor(step: int) -> float:
        if step < cfg.warmup_steps:
            return (step + 1) / (cfg.warmup_steps + 1)
        progress = (step - cfg.warmup_steps) / max(1, steps - cfg.warmup_steps)
        if cfg.schedule == "cosine":
            return 0.5 * (1 + math.cos(math.pi * min(progress, 1.0)))
        if cfg.schedule == "linear":
            return max(0.0, 1 - progress)
        return 1.0

    return torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


class StopRequest:
    """SIGTERM / Ctrl-C set a flag; the loop saves a checkpoint at the next step boundary and exits."""

    def __init__(self):
        self.signal: int | None = None

    def __enter__(self):
        self._old = {s: signal.signal(s, self._handle) for s in (signal.SIGTERM, signal.SIGINT)}
        return self

    def _handle(self, signum, frame):
        if self.signal is not None:  # a second signal: stop now
            raise KeyboardInterrupt
        self.signal = signum

    def __exit__(self, *exc):
        for s, handler in self._old.items():
            signal.signal(s, handler)


@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # mean target-token NLL per optimizer step


def train(model: nn.Module, trainable: dict[str, nn.Parameter], data, pad_id: int,
          cfg: TrainStageConfig, out: Path, engine, depends: dict,
          after_step: Callable[[], None] | None = None, reference=None) -> TrainResult:
    """Train `trainable` on `data` (data.Fixed or Streamed); everything else in `model` must already be frozen.

    `depends` names the inputs the run is tied to (fingerprints); a checkpoint from other inputs is refused.
    `after_step` runs after every optimizer step (LoTTO uses it to restore frozen entries). `reference`: what
    train.objective=dpo compares with, the stage's model before training (_objectives.SparseOffReference or
    PrecomputedReference).
    """
    tcfg, acc = cfg.train, engine.accelerator
    objective = make_objective(tcfg, reference)
    if tcfg.objective != "sft":  # a checkpoint of another objective is refused
        depends = {**depends, "objective": tcfg.objective}
    steps = optimizer_steps(tcfg, data.n)
    model, optimizer = engine.prepare(model, make_optimizer(list(trainable.values()), tcfg, cfg.optim))
    # Made on the prepared optimizer (DeepSpeed may replace it) and stepped once per optimizer step by this
    # loop: accelerate's wrapper would step it once per process.
    schedule = make_schedule(optimizer, tcfg, steps)
    objective.start(model, data, steps, tcfg, pad_id, engine)  # on the model as loaded, before any checkpoint
    checkpoints = Checkpointer(out, depends, tcfg.keep_checkpoints, engine, trainable, optimizer, schedule)
    start, losses = checkpoints.restore(cfg.resume, steps)
    out.mkdir(parents=True, exist_ok=True)
    metrics = Metrics(out, acc, tcfg.log_every, steps, phase=depends.get("phase"),  # lotto names its phases
                      fresh=start == 0)
    world, rank, params = acc.num_processes, acc.process_index, list(trainable.values())

    model.train()
    with StopRequest() as stop, progress_bar(steps, start, acc.is_main_process) as bar:
        for step in range(start, steps):
            t0, tokens, sums = time.perf_counter(), 0, [0.0] * len(objective.metrics)
            micro = [(data.micro_indices(i), data.micro_batch(i))
                     for i in range(step * tcfg.grad_accum, (step + 1) * tcfg.grad_accum)]
            global_units = sum(objective.units(item) for _, items in micro for item in items)
            if global_units == 0:
                raise LotaError(f"step {step + 1}'s batch has no token to train on (check task.train_on and the "
                                "data's answers)")
            for indices, items in micro:
                mine = MicroBatches.shard(items, rank, world)
                batch = collate(objective.rows(mine), pad_id, data.packed)
                batch = {k: v.to(acc.device) for k, v in batch.items()}
                # accumulate(): gradients are synchronized (DDP's all-reduce; DeepSpeed's reduce, clip and
                # optimizer step, inside backward) on the last micro-step of the step only. accelerate and
                # DeepSpeed's engine.backward both divide the loss by grad_accum: the factor undoes that, so the
                # step's gradient is the single-process sum over the global batch.
                with acc.accumulate(model):
                    value, terms = objective.terms(model, batch, MicroBatches.shard(indices, rank, world))
                    acc.backward(value * (world * tcfg.grad_accum / global_units))
                sums = [total + term.item() for total, term in zip(sums, terms)]
                tokens += sum(len(ids) for item in mine for ids, _ in item)
            grad_norm = engine.clip_grad_norm(params, tcfg.max_grad_norm)
            # one all-reduce for the numbers and for a stop request that reached only some processes
            totals = acc.reduce(torch.tensor([*sums, float(stop.signal is not None)], dtype=torch.float64,
                                             device=acc.device), "sum")
            numbers = {name: totals[k].item() / global_units for k, name in enumerate(objective.metrics)}
            loss, stop_now = numbers.pop("loss"), totals[-1].item() > 0
            if not math.isfinite(loss):  # (DeepSpeed has already stepped by now; the run stops all the same)
                raise LotaError(f"the loss became {loss} at step {step + 1}; stopped. Last good checkpoint: "
                                f"{latest(out) or 'none (set train.save_every)'}. Lower train.lr or set "
                                "train.max_grad_norm")
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            losses.append(loss)
            elapsed, done = time.perf_counter() - t0, step + 1
            tok_s = tokens * world / elapsed
            bar.advance(loss=loss, tok_s=tok_s)
            metrics.record(done, loss=loss, lr=schedule.get_last_lr()[0], grad_norm=grad_norm, tokens_per_s=tok_s,
                           step_s=elapsed, **numbers)
            if tcfg.save_every and done % tcfg.save_every == 0 and done < steps:
                checkpoints.save(done, losses)
            if stop_now:
                saved = checkpoints.save(done, losses)
                raise LotaError(f"stopped by signal {stop.signal or 'on another process'} after step {done}; "
                                f"checkpoint {saved}; rerun the same command with resume=true to continue")
    model.eval()
    return TrainResult(steps, losses)
