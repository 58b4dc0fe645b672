"""Processes: how a training stage spreads over processes (what each engine then does is engines.py's).

Engines (conf/dist/<name>.yaml, chosen with `dist=<name>`):
  single  one process (the default).
  ddp     data parallel: every process holds the model, the trainable values and their optimizer state.
  zero2   DeepSpeed ZeRO-2: gradients and optimizer state of the trainable parameters are partitioned.
  zero3   DeepSpeed ZeRO-3: the parameters too, gathered module by module around its forward.
  fsdp    refused (see check): zero3 gives the same sharding.

Whatever the engine and the number of processes N, one optimizer step sees the same global batch of
train.batch_size x train.grad_accum sequences: each micro-step's train.batch_size sequences are split into
N shares of train.batch_size / N (the per-device batch; batch_size must be divisible by N), and the loss
is normalized so the gradient equals the single-process one (see loop.py).

Two ways to start N processes:
  lota calibrate dist=zero2 dist.num_processes=8        lota re-launches itself through `accelerate launch`
  accelerate launch --config_file my.yaml -m lota_cli calibrate ...
                                                         an existing accelerate set-up; with dist=single
                                                         the engine is the one that config chose
"""

from __future__ import annotations

import importlib
import importlib.util
import logging
import os
import socket
import subprocess
import sys
from pathlib import Path

import torch

from lota_cli import LotaError
from lota_cli.config import TrainStageConfig

log = logging.getLogger(__name__)

ZERO_STAGES = {"zero2": 2, "zero3": 3}
INSTALL_DEEPSPEED = "DS_BUILD_OPS=0 pip install 'lota-cli[deepspeed]'"


def launched() -> bool:
    """True inside processes started by a launcher (accelerate launch, torchrun, or lota itself)."""
    return "LOCAL_RANK" in os.environ or os.environ.get("LOTA_LAUNCHED") == "1"


def check(cfg: TrainStageConfig) -> None:
    """Refuse engine settings that cannot run, before anything is loaded or launched."""
    d = cfg.dist
    if d.engine == "fsdp":
        raise LotaError("dist=fsdp is not supported: FSDP flattens a layer's parameters into one shard that is "
                        "either all frozen or all trained, while LoTA trains values next to frozen weights in the "
                        "same layer; use dist=zero3 (the same parameter sharding) or dist=zero2")
    if d.engine == "single" and d.num_processes > 1 and not launched():
        raise LotaError(f"dist.num_processes={d.num_processes} needs an engine: dist=ddp, dist=zero2 or dist=zero3")
    if cfg.train.batch_size % d.num_processes:
        raise LotaError(f"train.batch_size={cfg.train.batch_size} must be divisible by dist.num_processes="
                        f"{d.num_processes}: each process takes an equal share of every micro-batch")
    if d.engine in ZERO_STAGES and importlib.util.find_spec("deepspeed") is None:
        raise LotaError(f"dist={d.engine} needs DeepSpeed, which is not installed: {INSTALL_DEEPSPEED}")
    if d.offload_params and d.engine != "zero3":
        raise LotaError("dist.offload_params=true needs dist=zero3 (only ZeRO-3 partitions the parameters)")
    if d.offload_optimizer and d.engine not in ZERO_STAGES:
        raise LotaError("dist.offload_optimizer=true needs dist=zero2 or dist=zero3")


def needs_launch(cfg: TrainStageConfig) -> bool:
    """Whether lota must start its processes itself: several of them, or a DeepSpeed engine (which needs a
    process group even for one process)."""
    return not launched() and (cfg.dist.num_processes > 1 or cfg.dist.engine in ZERO_STAGES)


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: TrainStageConfig, lota_args: list[str]) -> int:
    """Run `accelerate launch <flags from cfg.dist> -m lota_cli <lota_args>`; returns its exit status.

    The processes re-read the same overrides, so each builds the engine from cfg.dist (make_accelerator);
    the launcher only starts them: torchrun-style, which DeepSpeed needs even for one process.
    """
    d = cfg.dist
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(d.num_processes),
           "--num_machines", str(d.num_machines), "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "LOTA_LAUNCHED": "1"}
    if d.engine in ZERO_STAGES:
        cmd += ["--use_deepspeed", "--zero_stage", str(ZERO_STAGES[d.engine])]
    else:
        cmd += ["--multi_gpu"]
        if not torch.cuda.is_available():  # DDP over gloo; accelerate's --cpu alone would start one process
            env["ACCELERATE_USE_CPU"] = "true"
    if d.num_machines > 1:
        missing = [k for k in ("MACHINE_RANK", "MASTER_ADDR") if k not in os.environ]
        if missing:
            raise LotaError(f"dist.num_machines={d.num_machines}: set {' and '.join(missing)} on each machine "
                            "(and MASTER_PORT, default 29500), or use accelerate launch --config_file")
        cmd += ["--machine_rank", os.environ["MACHINE_RANK"], "--main_process_ip", os.environ["MASTER_ADDR"],
                "--main_process_port", os.environ.get("MASTER_PORT", "29500")]
    else:
        cmd += ["--main_process_port", str(_free_port())]
    if not torch.cuda.is_available() and "OMP_NUM_THREADS" not in env:  # share the cores, don't oversubscribe
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // d.num_processes))
    cmd += ["-m", "lota_cli", *lota_args]
    log.info("launching %d processes (%s): %s", d.num_processes, d.engine, " ".join(cmd))
    # The main process prints the written paths on stdout; the launcher itself may print there too (DeepSpeed
    # logs to stdout), so only lines naming written files are passed on to stdout, the rest to stderr.
    proc = subprocess.run(cmd, env=env, stdout=subprocess.PIPE, text=True)
    for line in proc.stdout.splitlines():
        print(line, file=sys.stdout if line and Path(line).exists() else sys.stderr, flush=True)
    return proc.returncode
