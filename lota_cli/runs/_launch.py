"""Processes: how a training stage spreads over processes (what each engine then does is training's _engines.py).

Engines (conf/dist/<name>.yaml, chosen with `dist=<name>`):
  single  one process (the default).
  ddp     data parallel: every process holds the model, the trainable values and their optimizer state.
  zero2   DeepSpeed ZeRO-2: gradients and optimizer state of the trainable parameters are partitioned.
  zero3   DeepSpeed ZeRO-3: the parameters too, gathered module by module around its forward.
  fsdp    torch FSDP2 (fully_shard per decoder layer and the root): every parameter, frozen or trained, its
          gradient and optimizer state sharded over the processes; launched like ddp (engines.FullyShardedV2).

Whatever the engine and the number of processes N, one optimizer step sees the same global batch of
train.batch_size x train.grad_accum sequences: each micro-step's train.batch_size sequences are split into
N shares of train.batch_size / N (the per-device batch; batch_size must be divisible by N), and the loss
is normalized so the gradient equals the single-process one (see _loop.py).

Two ways to start N processes:
  lota calibrate dist=zero2 dist.num_processes=8        lota re-launches itself through `accelerate launch`
  accelerate launch --config_file my.yaml -m lota_cli calibrate ...
                                                         an existing accelerate set-up; with dist=single
                                                         the engine is the one that config chose
                                                         (FSDP: version 2 only)
"""

from __future__ import annotations

import codecs
import importlib
import importlib.util
import logging
import os
import re
import shlex
import signal
import socket
import subprocess
import sys
import threading
from pathlib import Path

from lota_cli import LotaError
from lota_cli.config import TrainStageConfig
from lota_cli.console import terminal_env
from lota_cli.runs._layout import newest_below

log = logging.getLogger(__package__)

ZERO_STAGES = {"zero2": 2, "zero3": 3}
INSTALL_DEEPSPEED = "DS_BUILD_OPS=0 pip install 'lota-cli[deepspeed]'"


def launched() -> bool:
    """True inside processes started by a launcher (accelerate launch, torchrun, or lota itself)."""
    return "LOCAL_RANK" in os.environ or os.environ.get("LOTA_LAUNCHED") == "1"


def uses_fsdp(cfg: TrainStageConfig) -> bool:
    """dist=fsdp, or dist=single under a user's `accelerate launch --use_fsdp` (its config chose FSDP)."""
    engine = cfg.dist.engine
    return engine == "fsdp" or (engine == "single" and os.environ.get("ACCELERATE_USE_FSDP") == "true")


def check(cfg: TrainStageConfig) -> None:
    """Refuse engine settings that cannot run, before anything is loaded or launched."""
    d = cfg.dist
    if uses_fsdp(cfg):
        _check_fsdp(cfg)
    if d.engine == "single" and d.num_processes > 1 and not launched():
        raise LotaError(f"dist.num_processes={d.num_processes} needs an engine: dist=ddp, dist=fsdp, dist=zero2 or "
                        "dist=zero3")
    if cfg.train.batch_size % d.num_processes:
        raise LotaError(f"train.batch_size={cfg.train.batch_size} must be divisible by dist.num_processes="
                        f"{d.num_processes}: each process takes an equal share of every micro-batch")
    if d.engine in ZERO_STAGES and importlib.util.find_spec("deepspeed") is None:
        raise LotaError(f"dist={d.engine} needs DeepSpeed, which is not installed: {INSTALL_DEEPSPEED}")
    if d.offload_params and d.engine != "zero3":
        raise LotaError("dist.offload_params=true needs dist=zero3 (only ZeRO-3 partitions the parameters)")
    if d.offload_optimizer and d.engine not in ZERO_STAGES:
        raise LotaError("dist.offload_optimizer=true needs dist=zero2 or dist=zero3")


def _check_fsdp(cfg: TrainStageConfig) -> None:
    """What lota's FSDP2 engine does not do, in dist.* or in a user's accelerate FSDP config (FSDP_* variables)."""
    d, env = cfg.dist, os.environ
    if d.engine == "single" and env.get("FSDP_VERSION", "1") != "2":
        raise LotaError(f"your accelerate config chose FSDP version {env.get('FSDP_VERSION', '1')}, which shards a "
                        "layer as one flat tensor that is either all frozen or all trained, while LoTA trains values "
                        "next to frozen weights: set fsdp_version: 2 in it (or --fsdp_version 2), or use dist=zero3")
    offload = ("dist.offload_params=true" if d.offload_params else "dist.offload_optimizer=true"
               if d.offload_optimizer else "fsdp_offload_params in your accelerate config"
               if env.get("FSDP_OFFLOAD_PARAMS", "false").lower() == "true" else None)
    if offload:
        raise LotaError(f"{offload} is not supported with FSDP (lota's FSDP2 engine keeps shards and optimizer "
                        "state on the devices): use dist=zero3 with dist.offload_params / dist.offload_optimizer")
    if cfg.train.mixed_precision == "fp16":
        raise LotaError("train.mixed_precision=fp16 is not supported with dist=fsdp (it would need a sharded "
                        "gradient scaler): use bf16 or no")


def needs_launch(cfg: TrainStageConfig) -> bool:
    """Whether lota must start its processes itself: several of them, or a DeepSpeed engine (which needs a
    process group even for one process)."""
    return not launched() and (cfg.dist.num_processes > 1 or cfg.dist.engine in ZERO_STAGES)


def gpus() -> bool:
    """Whether this machine may run on GPUs, without importing torch where its build has no GPU support (torch's
    version.py: cuda and hip None, as in the CPU wheel); otherwise torch.cuda answers."""
    spec = importlib.util.find_spec("torch")
    version = Path(next(iter(spec.submodule_search_locations or []), "")) / "version.py" if spec else None
    if version is not None and version.is_file():
        built = dict(re.findall(r"^(cuda|hip)\s*(?::[^=]*)?=\s*(.+?)\s*$", version.read_text(), re.M))
        if built and all(value == "None" for value in built.values()):
            return False
    import torch

    return torch.cuda.is_available()


def free_port() -> int:
    """A TCP port free on this machine now (for a process group's rendezvous)."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(cfg: TrainStageConfig, lota_args: list[str], out: Path) -> None:
    """Run `accelerate launch <flags from cfg.dist> -m lota_cli <lota_args>`; a LotaError if it fails.

    The processes re-read the same overrides, so each builds the engine from cfg.dist (engines.make_engine);
    the launcher only starts them: torchrun-style, which DeepSpeed needs even for one process.
    """
    d, on_gpus = cfg.dist, gpus()
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", str(d.num_processes),
           "--num_machines", str(d.num_machines), "--mixed_precision", "no", "--dynamo_backend", "no"]
    env = {**os.environ, "LOTA_LAUNCHED": "1"}
    if d.engine in ZERO_STAGES:
        cmd += ["--use_deepspeed", "--zero_stage", str(ZERO_STAGES[d.engine])]
    else:  # ddp, and fsdp: lota shards with FSDP2 itself in each process (engines.FullyShardedV2)
        cmd += ["--multi_gpu"]
        if not on_gpus:  # DDP over gloo; accelerate's --cpu alone would start one process
            env["ACCELERATE_USE_CPU"] = "true"
    if d.num_machines > 1:
        missing = [k for k in ("MACHINE_RANK", "MASTER_ADDR") if k not in os.environ]
        if missing:
            raise LotaError(f"dist.num_machines={d.num_machines}: set {' and '.join(missing)} on each machine "
                            "(and MASTER_PORT, default 29500), or use accelerate launch --config_file")
        cmd += ["--machine_rank", os.environ["MACHINE_RANK"], "--main_process_ip", os.environ["MASTER_ADDR"],
                "--main_process_port", os.environ.get("MASTER_PORT", "29500")]
    else:
        cmd += ["--main_process_port", str(free_port())]
    if not on_gpus and "OMP_NUM_THREADS" not in env:  # share the cores, don't oversubscribe
        env["OMP_NUM_THREADS"] = str(max(1, (os.cpu_count() or 1) // d.num_processes))
    env.update(terminal_env())  # the main process draws its progress bar on this terminal, through the pipe
    cmd += ["-m", "lota_cli", *lota_args]
    log.info("launching %d processes (%s): %s", d.num_processes, d.engine, " ".join(cmd))
    proc = subprocess.Popen(cmd, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    stderr_text: list[str] = []
    # The main process prints the written paths on stdout; the launcher itself may print there too (DeepSpeed
    # logs to stdout), so only lines naming written files are passed on to stdout, the rest to stderr.
    # stderr is passed on as it comes, byte by byte (a progress bar redraws its line without a newline), and
    # kept to tell afterwards which process failed and how.
    threads = [threading.Thread(target=_forward, args=(proc.stdout, _stdout_or_stderr), daemon=True),
               threading.Thread(target=_pass_on, args=(proc.stderr, stderr_text), daemon=True)]
    for thread in threads:
        thread.start()
    status = proc.wait()
    for thread in threads:
        thread.join()
    if status != 0:
        raise LotaError(failure("".join(stderr_text).splitlines(keepends=True), status, out))


def _stdout_or_stderr(line: str):
    return sys.stdout if line.strip() and Path(line.strip()).exists() else sys.stderr


def _forward(stream, destination) -> None:
    for line in stream:
        print(line, end="", file=destination(line), flush=True)


def _pass_on(stream, keep: list[str]) -> None:
    """What a text stream holds, to stderr as it arrives (not line by line), and kept."""
    decoder = codecs.getincrementaldecoder("utf-8")(errors="replace")  # a character may span two reads
    while chunk := stream.buffer.read1(1 << 16):
        text = decoder.decode(chunk)
        sys.stderr.write(text)
        sys.stderr.flush()
        keep.append(text)


def failure(stderr_lines: list[str], status: int, out: Path) -> str:
    """One line for a failed multi-process run: the failing rank and how it failed (torch elastic's report
    names its root cause), its own error line if it printed one, and for a process that died the newest
    checkpoint and the command that resumes from it."""
    text = "".join(stderr_lines)
    root = text[text.find("Root Cause"):] if "Root Cause" in text else ""
    rank = re.search(r"rank\s*:\s*(\d+)", root)
    code = re.search(r"exitcode\s*:\s*(-?\d+)", root)
    exitcode = int(code.group(1)) if code else status
    own = [line.strip() for line in stderr_lines if line.startswith("lota ") and ": error: " in line]
    if exitcode >= 0 and own:  # a process stopped on an error lota explains (bad input, a NaN loss, a signal)
        return own[0].split(": error: ", 1)[1]
    who = f"process rank {rank.group(1)}" if rank else "a process"
    if exitcode < 0:
        try:
            how = f"was killed by {signal.Signals(-exitcode).name}"
        except ValueError:
            how = f"was killed by signal {-exitcode}"
    else:
        how = f"exited with status {exitcode}"
    newest = newest_below(out) or "none (set train.save_every=N to keep some)"
    args = [a for a in sys.argv[1:] if not a.lstrip("+").startswith("resume=")]
    command = shlex.join(["lota", *sys.argv[0].split()[1:], *args, "resume=true"])
    return f"{who} {how}; newest checkpoint: {newest}; resume with: {command}"
