"""The training loop every training stage shares: optimizer, schedule, accumulation, logging, checkpoints.

Batch: one optimizer step sees train.batch_size x train.grad_accum sequences whatever the number of
processes N: each of its grad_accum micro-batches of train.batch_size sequences is sharded over the N
processes (train.batch_size / N each, the per-device batch), never duplicated.

Loss normalization: each micro-batch's loss is the sum of its target-token NLLs divided by the number of
target tokens in the whole global batch (all micro-steps, all processes), times the number of processes
(data-parallel engines average gradients over processes). So the gradient of one optimizer step is the
same whatever the number of processes or the split of the global batch into micro-batches.
"""

from __future__ import annotations

import json
import logging
import math
import shutil
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Callable

import torch
import torch.nn.functional as F
from torch import nn

from lota_cli import LotaError
from lota_cli.config import OptimConfig, TrainConfig, TrainStageConfig
from lota_cli.data import IGNORE, Example, MicroBatches, collate
from lota_cli.progress import progress_bar

log = logging.getLogger(__name__)


def optimizer_steps(cfg: TrainConfig, n_examples: int) -> int:
    if cfg.max_steps is not None:
        return cfg.max_steps
    return max(1, math.ceil(cfg.epochs * n_examples / (cfg.batch_size * cfg.grad_accum)))


def make_optimizer(params: list[nn.Parameter], train: TrainConfig, optim: OptimConfig) -> torch.optim.Optimizer:
    if optim.name == "sgd":
        return torch.optim.SGD(params, lr=train.lr, momentum=optim.momentum, weight_decay=train.weight_decay)
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


def token_nll_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Sum over target tokens of -log p(token | prefix), in float32."""
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    return F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), batch["labels"][:, 1:].flatten(),
                           ignore_index=IGNORE, reduction="sum")


# --------------------------------------------------------------------------- checkpoints

def _checkpoint_dir(out: Path) -> Path:
    return out / "checkpoints"


def latest_checkpoint(out: Path) -> Path | None:
    done = sorted(p for p in _checkpoint_dir(out).glob("step-*") if (p / "state.pt").is_file())
    return done[-1] if done else None


def save_checkpoint(out: Path, step: int, state: dict, keep: int, accelerator=None, engine=None) -> Path:
    """Write a checkpoint atomically (temp dir + rename), keeping only the newest `keep`.

    With several processes the main one writes state.pt; under DeepSpeed every process also writes its own
    partition of the trainable values and optimizer state (engine.save_checkpoint, frozen weights left out).
    """
    main = accelerator is None or accelerator.is_main_process
    root = _checkpoint_dir(out)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    if main:
        root.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
        tmp.mkdir()
    if engine is not None:
        accelerator.wait_for_everyone()
        engine.save_checkpoint(str(tmp), tag="engine", exclude_frozen_parameters=True, save_latest=False)
        accelerator.wait_for_everyone()
    if main:
        try:
            torch.save(state, tmp / "state.pt")
        except (OSError, RuntimeError) as err:  # torch reports a full disk as a RuntimeError
            shutil.rmtree(tmp, ignore_errors=True)
            raise LotaError(f"could not write checkpoint {final}: {_first_line(err)}; free space in {root} "
                            "(older checkpoints are kept)") from err
        shutil.rmtree(final, ignore_errors=True)
        tmp.rename(final)
        for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
            shutil.rmtree(old, ignore_errors=True)
    if accelerator is not None:
        accelerator.wait_for_everyone()
    return final


def _first_line(err: Exception) -> str:
    return next((line for line in str(err).splitlines() if line.strip()), type(err).__name__)[:200]


def load_checkpoint(path: Path, depends: dict) -> dict:
    try:
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except Exception as err:
        why = ("it holds Python objects besides tensors, which lota never unpickles"
               if type(err).__name__ == "UnpicklingError" else _first_line(err))
        raise LotaError(f"cannot read checkpoint {path}: {why}; delete it to resume from an older one") from err
    if state.get("depends") != depends:
        raise LotaError(f"checkpoint {path} belongs to another run (inputs differ: {state.get('depends')} vs "
                        f"{depends}); use a fresh `out` or the matching inputs")
    return state


def resume_point(resume, out: Path) -> Path | None:
    """The checkpoint to resume from: `resume=true` picks the newest in out, `resume=PATH` that one."""
    if resume in (False, None, "false"):
        return None
    if resume is True or resume == "true":
        found = latest_checkpoint(out)
        if found is None:
            log.warning("resume=true but %s holds no checkpoint; starting from scratch", _checkpoint_dir(out))
        return found
    path = Path(str(resume))
    if not (path / "state.pt").is_file():
        raise LotaError(f"resume={resume}: no checkpoint there (expected {path / 'state.pt'})")
    return path


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


# --------------------------------------------------------------------------- the loop

@dataclass
class TrainResult:
    steps: int
    losses: list[float] = field(default_factory=list)  # mean target-token NLL per optimizer step


def train(
    model: nn.Module,
    trainable: dict[str, nn.Parameter],
    examples: list[Example],
    pad_id: int,
    cfg: TrainStageConfig,
    out: Path,
    accelerator,
    depends: dict,
    after_step: Callable[[], None] | None = None,
) -> TrainResult:
    """Train `trainable` on `examples`; everything else in `model` must already be frozen.

    `depends` names the inputs the run is tied to (fingerprints); a checkpoint from other inputs is refused.
    `after_step` runs after every optimizer step (LoTTO uses it to restore frozen entries).
    """
    from lota_cli.dist import uses_deepspeed

    tcfg = cfg.train
    steps = optimizer_steps(tcfg, len(examples))
    optimizer = make_optimizer(list(trainable.values()), tcfg, cfg.optim)
    model, optimizer = accelerator.prepare(model, optimizer)
    # The schedule is made on the prepared optimizer (DeepSpeed may replace the optimizer) and stepped once per
    # optimizer step by this loop: accelerate's wrapper would step it once per process.
    schedule = make_schedule(optimizer, tcfg, steps)
    engine = model if uses_deepspeed(accelerator) else None
    world, rank = accelerator.num_processes, accelerator.process_index
    batches = MicroBatches(len(examples), tcfg.batch_size, tcfg.seed)
    target_tokens = [len(e.target_ids) for e in examples]

    start, result = 0, TrainResult(steps)
    checkpoint = resume_point(cfg.resume, out)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, depends)
        if engine is not None:
            engine.load_checkpoint(str(checkpoint), tag="engine", load_module_strict=False,
                                   load_optimizer_states=True, load_lr_scheduler_states=False)
        else:
            with torch.no_grad():
                for name, param in trainable.items():
                    param.copy_(state["trainable"][name])
            optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        start, result.losses = state["step"], list(state["losses"])
        log.info("resumed from %s at step %d of %d", checkpoint, start, steps)

    def checkpoint_now(step: int) -> Path:
        state = {"step": step, "losses": result.losses, "depends": depends, "rng": torch.get_rng_state(),
                 "schedule": schedule.state_dict()}
        if engine is None:  # replicated on every process: the main one's copy is the state
            state["trainable"] = {n: p.detach().cpu().clone() for n, p in trainable.items()}
            state["optimizer"] = optimizer.state_dict()
        return save_checkpoint(out, step, state, tcfg.keep_checkpoints, accelerator, engine)

    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    model.train()
    params = list(trainable.values())
    with StopRequest() as stop, progress_bar(steps, start, accelerator.is_main_process) as bar:
        for step in range(start, steps):
            t0, tokens, loss_sum = time.perf_counter(), 0, 0.0
            micro = [batches.indices(step * tcfg.grad_accum + j) for j in range(tcfg.grad_accum)]
            global_targets = sum(target_tokens[i] for ids in micro for i in ids)
            for ids in micro:
                batch = collate([examples[i] for i in MicroBatches.shard(ids, rank, world)], pad_id)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                # accumulate(): gradients are synchronized (DDP's all-reduce; DeepSpeed's reduce, clip and
                # optimizer step, inside backward) on the last micro-step of the step only. accelerate and
                # DeepSpeed's engine.backward both divide the loss by grad_accum: the factor undoes that, so the
                # step's gradient is the single-process sum over the global batch.
                with accelerator.accumulate(model):
                    nll = token_nll_sum(model, batch)
                    accelerator.backward(nll * (world * tcfg.grad_accum / global_targets))
                loss_sum += nll.item()
                tokens += int(batch["attention_mask"].sum())
            if engine is None:
                grad_norm = float(accelerator.clip_grad_norm_(params, tcfg.max_grad_norm or float("inf")))
            else:  # DeepSpeed clipped by the same rule (gradient_clipping = train.max_grad_norm) and stepped
                grad_norm = float(engine.get_global_grad_norm() or 0.0)
            # one all-reduce for the loss and for a stop request that reached only some processes
            totals = accelerator.reduce(torch.tensor([loss_sum, float(stop.signal is not None)],
                                                     dtype=torch.float64, device=accelerator.device), "sum")
            loss, stop_now = totals[0].item() / global_targets, totals[1].item() > 0
            if not math.isfinite(loss):  # (DeepSpeed has already stepped by now; the run stops all the same)
                last = latest_checkpoint(out)
                raise LotaError(f"the loss became {loss} at step {step + 1}; stopped. Last good checkpoint: "
                                f"{last or 'none (set train.save_every)'}. Lower train.lr or set train.max_grad_norm")
            optimizer.step()
            schedule.step()
            optimizer.zero_grad(set_to_none=True)
            if after_step is not None:
                after_step()
            result.losses.append(loss)
            elapsed = time.perf_counter() - t0
            tok_s = tokens * world / elapsed
            bar.advance(loss=loss, tok_s=tok_s)
            done = step + 1
            if accelerator.is_main_process and (done % tcfg.log_every == 0 or done == steps):
                record = {"step": done, "loss": loss, "lr": schedule.get_last_lr()[0],
                          "grad_norm": grad_norm, "tokens_per_s": tok_s, "step_s": elapsed}
                if torch.cuda.is_available():  # this process's peak so far
                    record["gpu_mem_gb"] = torch.cuda.max_memory_allocated() / 2**30
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                accelerator.log(record, step=done)
                log.info("step %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f", done, steps, loss,
                         record["lr"], record["grad_norm"], tok_s)
            if tcfg.save_every and done % tcfg.save_every == 0 and done < steps:
                checkpoint_now(done)
            if stop_now:
                saved = checkpoint_now(done)
                raise LotaError(f"stopped by signal {stop.signal or 'on another process'} after step {done}; "
                                f"checkpoint {saved}; rerun the same command with resume=true to continue")
    model.eval()
    return result



# --------------------------------------------------------------------------- stage set-up

@dataclass
class Run:
    """What every training stage starts from."""

    accelerator: object
    model: nn.Module
    tokenizer: object
    base_fingerprint: str
    examples: list[Example]


def setup(cfg: TrainStageConfig, out: Path) -> Run:
    """Accelerator, seeded RNG, model + tokenizer, base fingerprint and encoded training examples."""
    from accelerate.utils import set_seed

    from lota_cli.data import encode, load_rows
    from lota_cli.dist import make_accelerator, whole_model_loading
    from lota_cli.models import fingerprint, load_model

    out.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg, out)
    if not accelerator.is_main_process:  # one process speaks; the others only warn
        logging.getLogger().setLevel(logging.WARNING)
    set_seed(cfg.train.seed)
    with whole_model_loading(accelerator):
        model, tokenizer = load_model(cfg.model)
    base = fingerprint(model)
    rows = load_rows(cfg.task, "train")
    examples = encode(tokenizer, cfg.task, rows)
    log.info("model %s (%.1fM parameters), task %s: %d training examples", cfg.model.path,
             sum(p.numel() for p in model.parameters()) / 1e6, cfg.task.name, len(examples))
    if cfg.train.log_with:
        accelerator.init_trackers("lota", config={"out": str(out)})
    return Run(accelerator, model, tokenizer, base, examples)


def trained_values(accelerator, trainable: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
    """The trained parameters in full, float32, on the CPU: on the main process ({} on the others).

    Every process must call it: under DeepSpeed it gathers each parameter from the optimizer's fp32
    partitions, one at a time, and only the main process keeps the result.
    """
    from lota_cli.dist import full_fp32

    values = {}
    for name, param in trainable.items():
        full = full_fp32(param)
        if accelerator.is_main_process:
            values[name] = full.cpu()
    return values


def load_base(cfg: TrainStageConfig, accelerator) -> nn.Module:
    """A fresh copy of the base model from disk, whole (also under ZeRO-3), on the CPU.

    Under DeepSpeed a saved model is rebuilt as base + trained values on the main process: the engine's own
    module may be partitioned (ZeRO-3) or cast to bf16, and frozen weights must stay bitwise the base's.
    """
    from lota_cli.dist import whole_model_loading
    from lota_cli.models import load_model

    with whole_model_loading(accelerator):
        model, _ = load_model(cfg.model)
    return model
