"""Processes and engines: how a training stage spreads over processes, and the Accelerator it runs under.

Engines (conf/dist/<name>.yaml, chosen with `dist=<name>`):
  single  one process (the default).
  ddp     data parallel: every process holds the model, the trainable values and their optimizer state.
  zero2   DeepSpeed ZeRO-2: gradients and optimizer state of the trainable parameters are partitioned.
  zero3   DeepSpeed ZeRO-3: the parameters too, gathered module by module around its forward.
  fsdp    refused (see check): zero3 gives the same sharding.

Whatever the engine and the number of processes N, one optimizer step sees the same global batch of
train.batch_size x train.grad_accum sequences: each micro-step's train.batch_size sequences are split into
N shares of train.batch_size / N (the per-device batch; batch_size must be divisible by N), and the loss
is normalized so the gradient equals the single-process one (see training.py).

Two ways to start N processes:
  lota calibrate dist=zero2 dist.num_processes=8        lota re-launches itself through `accelerate launch`
  accelerate launch --config_file my.yaml -m lota_cli calibrate ...
                                                         an existing accelerate set-up; with dist=single
                                                         the engine is the one that config chose
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import socket
import subprocess
import sys
import warnings
from pathlib import Path

import torch

from lota_cli import LotaError
from lota_cli.config import TrainStageConfig

log = logging.getLogger(__name__)

ZERO_STAGES = {"zero2": 2, "zero3": 3}
INSTALL_DEEPSPEED = "DS_BUILD_OPS=0 pip install 'lota-cli[deepspeed]'"


def mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


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


def deepspeed_config(cfg: TrainStageConfig, world: int) -> dict:
    """The DeepSpeed settings lota owns: batch, accumulation and clipping follow train.*, so the step is the
    single-process one; ZeRO stage and offload follow dist.*. Mixed precision is filled in by accelerate
    from train.mixed_precision (bf16 where supported)."""
    d = cfg.dist
    zero = {"stage": ZERO_STAGES[d.engine]}
    if d.offload_optimizer:
        zero["offload_optimizer"] = {"device": "cpu", "pin_memory": True}
    if d.offload_params:
        zero["offload_param"] = {"device": "cpu", "pin_memory": True}
    return {**batch_settings(cfg, world), "zero_optimization": zero}


def batch_settings(cfg: TrainStageConfig, world: int) -> dict:
    t = cfg.train
    return {"train_micro_batch_size_per_gpu": max(1, t.batch_size // world),
            "gradient_accumulation_steps": t.grad_accum,
            "train_batch_size": max(1, t.batch_size // world) * t.grad_accum * world,
            "gradient_clipping": t.max_grad_norm or 0.0}  # 0: no clipping


def _quiet_deepspeed() -> None:
    """DeepSpeed compiles a shared-memory all-reduce op on first use on CPUs (minutes on a small machine); it
    only speeds up CPU training, which here is for tests, so plain gloo is used instead. And its calls to
    torch.distributed's renamed collectives warn at every step."""
    if not torch.cuda.is_available():
        importlib.import_module("deepspeed.comm.torch").build_shm_op = lambda: None
    warnings.filterwarnings("ignore", r"`torch\.distributed\.\w+` is deprecated", FutureWarning)


def make_accelerator(cfg: TrainStageConfig, out: Path):
    """The Accelerator for cfg.dist in this process: DeepSpeed when dist=zero2/zero3, otherwise whatever the
    launcher set up (DDP for several processes, nothing for one). Batch, accumulation and clipping always
    follow train.*, also under a user's accelerate / DeepSpeed config."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    check(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    handlers, plugin = [], None
    if "LOCAL_RANK" in os.environ:  # launched by accelerate / torchrun
        backend = cfg.dist.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        handlers.append(InitProcessGroupKwargs(backend=backend))
    if cfg.dist.engine in ZERO_STAGES:
        _quiet_deepspeed()
        # zero3_init_flag off: models load whole and ZeRO-3 partitions them at prepare (see whole_model_loading)
        plugin = DeepSpeedPlugin(hf_ds_config=deepspeed_config(cfg, world), zero3_init_flag=False)
    elif os.environ.get("ACCELERATE_USE_DEEPSPEED") == "true":
        _quiet_deepspeed()  # DeepSpeed from the user's accelerate config
    accelerator = Accelerator(
        mixed_precision=mixed_precision(cfg.train.mixed_precision),
        gradient_accumulation_steps=cfg.train.grad_accum,
        deepspeed_plugin=plugin,
        log_with=cfg.train.log_with,
        project_dir=str(out),
        kwargs_handlers=handlers,
    )
    accelerator.gradient_accumulation_steps = cfg.train.grad_accum  # an accelerate config's value would win
    own = accelerator.state.deepspeed_plugin
    if plugin is None and own is not None:  # DeepSpeed from the user's config: lota's train.* still rule the step
        own.deepspeed_config.update(batch_settings(cfg, accelerator.num_processes))
    return accelerator


def uses_deepspeed(accelerator) -> bool:
    return accelerator.state.deepspeed_plugin is not None


@contextlib.contextmanager
def whole_model_loading(accelerator):
    """Load a model whole even under ZeRO-3, whose settings would make transformers partition it on load.

    lota reads names, shapes and a fingerprint of the loaded model and edits its weights before training;
    ZeRO-3 partitions it at prepare (each process holds the whole model only until then).
    """
    plugin = accelerator.state.deepspeed_plugin
    if plugin is None:
        yield
        return
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        plugin.set_deepspeed_weakref()


def _in_deepspeed(param: torch.nn.Parameter) -> bool:
    """Whether a DeepSpeed ZeRO optimizer owns this parameter (ZeRO-3 tags it ds_id, ZeRO-1/2 _hp_mapping)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


def full_fp32(param: torch.nn.Parameter) -> torch.Tensor:
    """A trained parameter in full, in float32 (on its device).

    Under DeepSpeed this is the optimizer's fp32 master copy, gathered from its partitions (a collective:
    every process must call it, in the same order); the module's own copy may be bf16 (ZeRO's mixed
    precision) or an empty partition (ZeRO-3). Elsewhere it is the parameter itself.
    """
    if not _in_deepspeed(param):
        return param.detach().float()
    from deepspeed import zero
    from deepspeed.utils import safe_get_full_fp32_param

    full = safe_get_full_fp32_param(param)
    if full is None:  # ZeRO-3 and a parameter the optimizer does not train: the module's copy is all there is
        with zero.GatheredParameters([param]):
            full = param.detach().float().clone()
    return full.reshape(getattr(param, "ds_shape", param.shape))


@torch.no_grad()
def write_entries(param: torch.nn.Parameter, index: torch.Tensor, values: torch.Tensor) -> None:
    """param.view(-1)[index] = values, in every copy the engine keeps (a collective under DeepSpeed).

    DeepSpeed steps an fp32 master copy and copies it into the module's parameter after each step, so a
    write into the module alone would be undone at the next step: both copies are written.
    """
    if not _in_deepspeed(param):
        param.view(-1)[index.to(param.device)] = values.to(param.device, param.dtype)
        return
    from deepspeed import zero
    from deepspeed.utils import safe_set_full_fp32_param

    master = full_fp32(param)
    master.view(-1)[index.to(master.device)] = values.to(master.device, torch.float32)
    safe_set_full_fp32_param(param, master)
    with zero.GatheredParameters([param], modifier_rank=0):  # ZeRO-3: rank 0's full copy is re-partitioned
        param.data.view(-1)[index.to(param.device)] = values.to(param.device, param.dtype)
