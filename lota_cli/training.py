"""The training loop every training stage shares: optimizer, schedule, accumulation, logging, checkpoints.

Loss normalization: each micro-batch's loss is the sum of its target-token NLLs divided by the number of
target tokens in the whole global batch (all micro-steps, all processes), times the number of processes
(data-parallel engines average gradients over processes). So the gradient of one optimizer step is the
same whatever the number of processes or the split of the global batch into micro-batches.
"""

from __future__ import annotations

import contextlib
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


def save_checkpoint(out: Path, step: int, state: dict, keep: int) -> Path:
    """Write a checkpoint atomically (temp dir + rename), keeping only the newest `keep`."""
    root = _checkpoint_dir(out)
    root.mkdir(parents=True, exist_ok=True)
    final = root / f"step-{step:08d}"
    tmp = root / f".tmp-step-{step:08d}"
    shutil.rmtree(tmp, ignore_errors=True)
    tmp.mkdir()
    torch.save(state, tmp / "state.pt")
    shutil.rmtree(final, ignore_errors=True)
    tmp.rename(final)
    for old in sorted(p for p in root.glob("step-*") if p.is_dir())[:-keep]:
        shutil.rmtree(old, ignore_errors=True)
    return final


def load_checkpoint(path: Path, depends: dict) -> dict:
    try:
        state = torch.load(path / "state.pt", weights_only=True, map_location="cpu")
    except Exception as err:
        raise LotaError(f"cannot read checkpoint {path}: {err}; delete it to resume from an older one") from err
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
    tcfg = cfg.train
    steps = optimizer_steps(tcfg, len(examples))
    optimizer = make_optimizer(list(trainable.values()), tcfg, cfg.optim)
    schedule = make_schedule(optimizer, tcfg, steps)
    model, optimizer, schedule = accelerator.prepare(model, optimizer, schedule)
    world, rank = accelerator.num_processes, accelerator.process_index
    batches = MicroBatches(len(examples), tcfg.batch_size, tcfg.seed)
    target_tokens = [len(e.target_ids) for e in examples]

    start, result = 0, TrainResult(steps)
    checkpoint = resume_point(cfg.resume, out)
    if checkpoint is not None:
        state = load_checkpoint(checkpoint, depends)
        with torch.no_grad():
            for name, param in trainable.items():
                param.copy_(state["trainable"][name])
        optimizer.load_state_dict(state["optimizer"])
        schedule.load_state_dict(state["schedule"])
        torch.set_rng_state(state["rng"])
        start, result.losses = state["step"], list(state["losses"])
        log.info("resumed from %s at step %d of %d", checkpoint, start, steps)

    def checkpoint_now(step: int) -> Path | None:
        state = {"step": step, "losses": result.losses, "depends": depends, "rng": torch.get_rng_state(),
                 "trainable": {n: p.detach().cpu().clone() for n, p in trainable.items()},
                 "optimizer": optimizer.state_dict(), "schedule": schedule.state_dict()}
        if accelerator.is_main_process:
            return save_checkpoint(out, step, state, tcfg.keep_checkpoints)
        return None

    out.mkdir(parents=True, exist_ok=True)
    metrics_path = out / "metrics.jsonl"
    model.train()
    params = list(trainable.values())
    with StopRequest() as stop, progress_bar(steps, start, accelerator.is_main_process) as bar:
        for step in range(start, steps):
            t0, tokens, loss_sum = time.perf_counter(), 0, 0.0
            micro = [batches.indices(step * tcfg.grad_accum + j) for j in range(tcfg.grad_accum)]
            global_targets = sum(target_tokens[i] for ids in micro for i in ids)
            for j, ids in enumerate(micro):
                batch = collate([examples[i] for i in MicroBatches.shard(ids, rank, world)], pad_id)
                batch = {k: v.to(accelerator.device) for k, v in batch.items()}
                sync = j == len(micro) - 1
                with accelerator.no_sync(model) if not sync else contextlib.nullcontext():
                    nll = token_nll_sum(model, batch)
                    accelerator.backward(nll * (world / global_targets))
                loss_sum += nll.item()
                tokens += int(batch["attention_mask"].sum())
            grad_norm = accelerator.clip_grad_norm_(params, tcfg.max_grad_norm or float("inf"))
            loss = accelerator.reduce(torch.tensor(loss_sum, device=accelerator.device), "sum").item() / global_targets
            if not math.isfinite(loss):
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
                          "grad_norm": float(grad_norm), "tokens_per_s": tok_s}
                with open(metrics_path, "a") as f:
                    f.write(json.dumps(record) + "\n")
                accelerator.log(record, step=done)
                log.info("step %d/%d loss %.4f lr %.2e grad_norm %.3f tokens/s %.0f", done, steps, loss,
                         record["lr"], record["grad_norm"], tok_s)
            if tcfg.save_every and done % tcfg.save_every == 0 and done < steps:
                checkpoint_now(done)
            if stop.signal is not None:
                saved = checkpoint_now(done)
                raise LotaError(f"stopped by signal {stop.signal} after step {done}; checkpoint {saved}; "
                                "rerun the same command with resume=true to continue")
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
    from lota_cli.dist import make_accelerator
    from lota_cli.models import fingerprint, load_model

    out.mkdir(parents=True, exist_ok=True)
    accelerator = make_accelerator(cfg, out)
    set_seed(cfg.train.seed)
    model, tokenizer = load_model(cfg.model)
    base = fingerprint(model)
    rows = load_rows(cfg.task, "train")
    examples = encode(tokenizer, cfg.task, rows)
    log.info("model %s (%.1fM parameters), task %s: %d training examples", cfg.model.path,
             sum(p.numel() for p in model.parameters()) / 1e6, cfg.task.name, len(examples))
    if cfg.train.log_with:
        accelerator.init_trackers("lota", config={"out": str(out)})
    return Run(accelerator, model, tokenizer, base, examples)
