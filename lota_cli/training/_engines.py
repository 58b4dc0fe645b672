"""Engines: the one place that knows how single-process, DDP, FSDP2 and DeepSpeed ZeRO training differ.

  single, ddp    `Replicated`: every process holds the model, the trainable values and their optimizer state;
                 accelerate wraps the model in DDP when there are several processes.
  fsdp           `FullyShardedV2`: torch's FSDP2 (`fully_shard` on each decoder layer and the root) shards every
                 parameter, frozen or trained, its gradient and optimizer state over the processes, each one a
                 DTensor; accelerate only runs the processes.
  zero2, zero3   `DeepSpeedZero`: DeepSpeed (through accelerate) partitions gradients and optimizer state
                 (zero2) and the parameters too (zero3); it keeps an fp32 master copy of what trains.

The loop and the stages call an Engine for everything that differs (loading, prepare, clipping, checkpoints,
reading and writing trained values, the model to export) and never ask which engine it is. How processes
are started is lota_cli.runs' business; the Accelerator here is built inside each of them.
"""

from __future__ import annotations

import contextlib
import importlib
import logging
import math
import os
import warnings
from pathlib import Path
from typing import Callable

import torch
from torch import nn
from torch.distributed.tensor import DTensor, Shard

from lota_cli import LotaError, first_line
from lota_cli.config import TrainStageConfig
from lota_cli.runs import ZERO_STAGES, check, uses_fsdp

log = logging.getLogger(__package__)


class Replicated:
    """One process, or DDP: the module's parameters are the trained values, whole, on every process."""

    def __init__(self, accelerator):
        self.accelerator = accelerator

    @property
    def is_main(self) -> bool:
        return self.accelerator.is_main_process

    def loading(self):
        """Context in which models load whole (DeepSpeed would otherwise partition them at load)."""
        return contextlib.nullcontext()

    def prepare(self, model: nn.Module, optimizer):
        return self.accelerator.prepare(model, optimizer)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float | None) -> float:
        """Clip to max_norm (None: only measure) and return the global gradient norm before clipping."""
        return float(self.accelerator.clip_grad_norm_(params, max_norm or float("inf")))

    def checkpoint_state(self, trainable: dict[str, nn.Parameter], optimizer) -> dict:
        """What state.pt holds beyond the loop's own state: the values and optimizer state, replicated on every
        process (the main one's copy is written)."""
        return {"trainable": {n: p.detach().cpu().clone() for n, p in trainable.items()},
                "optimizer": optimizer.state_dict()}

    def save_shards(self, directory: Path) -> None:
        """Per-process checkpoint files written beside state.pt: none when the state is replicated."""

    @torch.no_grad()
    def restore(self, checkpoint: Path, state: dict, trainable: dict[str, nn.Parameter], optimizer) -> None:
        if "trainable" not in state:
            raise LotaError(f"checkpoint {checkpoint} holds the shards of a partitioning engine (dist=fsdp, zero2 or "
                            "zero3), not replicated state: resume it with the dist= it was written with")
        for name, param in trainable.items():
            param.copy_(state["trainable"][name])
        optimizer.load_state_dict(state["optimizer"])

    def full_fp32(self, param: nn.Parameter) -> torch.Tensor:
        """A trained parameter in full, in float32, on its device (every process must call it)."""
        return param.detach().float()

    def trained_values(self, trainable: dict[str, nn.Parameter]) -> dict[str, torch.Tensor]:
        """The trained parameters in full, float32, on the CPU, on the main process ({} on the others).
        A collective under DeepSpeed: every process calls it."""
        values = {}
        for name, param in trainable.items():
            full = self.full_fp32(param)
            if self.is_main:
                values[name] = full.cpu()
        return values

    @torch.no_grad()
    def write_entries(self, param: nn.Parameter, index: torch.Tensor, values: torch.Tensor) -> None:
        """param.view(-1)[index] = values, in every copy of the parameter the engine keeps."""
        param.view(-1)[index.to(param.device)] = values.to(param.device, param.dtype)

    def model_for_export(self, model: nn.Module, load_fresh: Callable[[], nn.Module]) -> nn.Module:
        """The model whose weights an exported model starts from: here the trained module itself."""
        return self.accelerator.unwrap_model(model)


class DeepSpeedZero(Replicated):
    """ZeRO-2 / ZeRO-3: DeepSpeed steps an fp32 master copy of the trainable values, partitioned over the
    processes; the module's own copy may be bf16 (ZeRO's mixed precision) or an empty partition (ZeRO-3)."""

    def loading(self):
        return _whole_model_loading(self.accelerator)

    def prepare(self, model: nn.Module, optimizer):
        self.engine, optimizer = self.accelerator.prepare(model, optimizer)  # a deepspeed.DeepSpeedEngine
        return self.engine, optimizer

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float | None) -> float:
        # DeepSpeed already clipped inside backward (gradient_clipping = train.max_grad_norm) and stepped
        return float(self.engine.get_global_grad_norm() or 0.0)

    def checkpoint_state(self, trainable: dict[str, nn.Parameter], optimizer) -> dict:
        return {}  # partitioned: each process writes its own share (save_shards)

    def save_shards(self, directory: Path) -> None:
        """Each process's partition of the trainable values and optimizer state, frozen weights left out."""
        self.accelerator.wait_for_everyone()
        self.engine.save_checkpoint(str(directory), tag="engine", exclude_frozen_parameters=True, save_latest=False)
        self.accelerator.wait_for_everyone()

    def restore(self, checkpoint: Path, state: dict, trainable: dict[str, nn.Parameter], optimizer) -> None:
        self.engine.load_checkpoint(str(checkpoint), tag="engine", load_module_strict=False,
                               load_optimizer_states=True, load_lr_scheduler_states=False)

    def full_fp32(self, param: nn.Parameter) -> torch.Tensor:
        """The optimizer's fp32 master copy, gathered from its partitions (a collective, in the same order on
        every process). A parameter the optimizer does not train (ZeRO-3) is gathered from the module."""
        if not _in_deepspeed(param):
            return param.detach().float()
        from deepspeed import zero
        from deepspeed.utils import safe_get_full_fp32_param

        full = safe_get_full_fp32_param(param)
        if full is None:
            with zero.GatheredParameters([param]):
                full = param.detach().float().clone()
        return full.reshape(getattr(param, "ds_shape", param.shape))

    @torch.no_grad()
    def write_entries(self, param: nn.Parameter, index: torch.Tensor, values: torch.Tensor) -> None:
        """Both the master copy and the module's copy: a write into the module alone would be undone when
        DeepSpeed copies the master into it after the next step. A collective."""
        if not _in_deepspeed(param):
            return super().write_entries(param, index, values)
        from deepspeed import zero
        from deepspeed.utils import safe_set_full_fp32_param

        master = self.full_fp32(param)
        master.view(-1)[index.to(master.device)] = values.to(master.device, torch.float32)
        safe_set_full_fp32_param(param, master)
        with zero.GatheredParameters([param], modifier_rank=0):  # ZeRO-3: rank 0's full copy is re-partitioned
            param.data.view(-1)[index.to(param.device)] = values.to(param.device, param.dtype)

    def model_for_export(self, model: nn.Module, load_fresh: Callable[[], nn.Module]) -> nn.Module:
        """A fresh copy from disk: the engine's module may be partitioned or bf16, and frozen weights of an
        exported model must stay bitwise the base's."""
        return load_fresh()


def _in_deepspeed(param: nn.Parameter) -> bool:
    """Whether a DeepSpeed ZeRO optimizer owns this parameter (ZeRO-3 tags it ds_id, ZeRO-1/2 _hp_mapping)."""
    return hasattr(param, "ds_id") or hasattr(param, "_hp_mapping")


@contextlib.contextmanager
def _whole_model_loading(accelerator):
    """Load a model whole even under ZeRO-3, whose settings would make transformers partition it on load:
    lota reads names, shapes and a fingerprint of the loaded model and edits its weights before training;
    ZeRO-3 partitions it at prepare."""
    from transformers.integrations import unset_hf_deepspeed_config

    unset_hf_deepspeed_config()
    try:
        yield
    finally:
        accelerator.state.deepspeed_plugin.set_deepspeed_weakref()


class FullyShardedV2(Replicated):
    """FSDP2: `fully_shard` on each decoder layer (the model's `_no_split_modules`) and on the root, so every
    parameter, gradient and optimizer state is a DTensor sharded on dim 0 over the processes. It shards each
    parameter on its own, so a frozen weight and the trainable values beside it in one layer are fine, unlike
    FSDP1's one flat shard per layer. A layer's parameters are gathered around its forward and backward;
    gradients are reduce-scattered after every micro-step's backward (sharded accumulation, no whole gradient
    kept). The model is not handed to accelerate (which would wrap it in DDP); the optimizer is.

    fully_shard replaces the module's parameters with new (DTensor) ones: the stages and the loop keep the
    parameters they had before prepare, so every method here maps those to the sharded ones (`_sharded`), and
    their old storage is released. Under bf16 the sharded parameters stay in their own dtype (fp32 values:
    the master copy) and are gathered in bf16, gradients reduced in fp32 (MixedPrecisionPolicy)."""

    def __init__(self, accelerator, mixed_precision: str):
        super().__init__(accelerator)
        self.mixed_precision = mixed_precision
        self.mesh = None
        self._sharded: dict[int, nn.Parameter] = {}

    def _param(self, param: nn.Parameter) -> nn.Parameter:
        return self._sharded.get(id(param), param)

    def prepare(self, model: nn.Module, optimizer):
        from torch.distributed.device_mesh import init_device_mesh
        from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

        acc = self.accelerator
        # a second prepare (lotto's sparse phase): drop the earlier model's shards and optimizer state first
        self._sharded, self._before, self.optimizer = {}, [], None
        if self.mesh is None:
            self.mesh = init_device_mesh(acc.device.type, (acc.num_processes,))
        policy = (MixedPrecisionPolicy(param_dtype=torch.bfloat16, reduce_dtype=torch.float32)
                  if self.mixed_precision == "bf16" else MixedPrecisionPolicy())
        before = dict(model.named_parameters())
        layer_types = {name for m in model.modules() for name in (getattr(m, "_no_split_modules", None) or ())}
        layers = [m for m in model.modules() if type(m).__name__ in layer_types]
        for layer in layers + [model]:
            old = dict(layer.named_parameters())
            fully_shard(layer, mesh=self.mesh, mp_policy=policy)
            new = dict(layer.named_parameters())
            for name, p in old.items():  # release the whole copy (moved to the device by fully_shard)
                if new[name] is not p and not isinstance(p, DTensor):
                    p.data = torch.empty(0, dtype=p.dtype, device=p.device)
        log.info("FSDP2: %d %s layers and the root sharded over %d processes", len(layers),
                 "/".join(sorted(layer_types)) or "(no decoder)", acc.num_processes)
        after = dict(model.named_parameters())
        self._before = list(before.values())  # keeps their ids valid as keys
        self._sharded = {id(p): after[name] for name, p in before.items()}
        for group in optimizer.param_groups:
            group["params"] = [self._param(p) for p in group["params"]]
        self.optimizer = optimizer
        return model, acc.prepare(optimizer)

    def clip_grad_norm(self, params: list[nn.Parameter], max_norm: float | None) -> float:
        """torch's clip_grad_norm_ on the sharded gradients: the norm over all shards (a collective)."""
        norm = torch.nn.utils.clip_grad_norm_([self._param(p) for p in params], max_norm or float("inf"))
        return float(norm.full_tensor() if isinstance(norm, DTensor) else norm)

    def checkpoint_state(self, trainable: dict[str, nn.Parameter], optimizer) -> dict:
        return {"fsdp_processes": self.accelerator.num_processes}  # each process writes its shard (save_shards)

    def _shard_file(self, directory: Path, rank: int) -> Path:
        return directory / f"fsdp-shard-{rank:05d}-of-{self.accelerator.num_processes:05d}.pt"

    def save_shards(self, directory: Path) -> None:
        """This process's shard of the trainable values and of their optimizer state, as plain tensors (read
        back with weights_only=True), in the optimizer's parameter order."""
        acc = self.accelerator
        acc.wait_for_everyone()  # the main process has made `directory`
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        optimizer = self.optimizer.state_dict()
        optimizer["state"] = {i: {k: _local(v) for k, v in s.items()} for i, s in optimizer["state"].items()}
        torch.save({"values": [_local(p.detach()).clone() for p in params], "optimizer": optimizer},
                   self._shard_file(directory, acc.process_index))
        acc.wait_for_everyone()

    @torch.no_grad()
    def restore(self, checkpoint: Path, state: dict, trainable: dict[str, nn.Parameter], optimizer) -> None:
        written, now = state.get("fsdp_processes"), self.accelerator.num_processes
        if written is None:
            raise LotaError(f"checkpoint {checkpoint} was not written by dist=fsdp: resume it with the dist= it was "
                            "written with")
        if written != now:
            raise LotaError(f"checkpoint {checkpoint} holds the FSDP shards of {written} processes, this run has "
                            f"{now}: resume it with dist=fsdp dist.num_processes={written}")
        path = self._shard_file(checkpoint, self.accelerator.process_index)
        try:
            shard = torch.load(path, weights_only=True, map_location="cpu")
        except Exception as err:
            raise LotaError(f"cannot read checkpoint shard {path}: {first_line(err)}; delete {checkpoint} to "
                            "resume from an older one") from err
        params = [p for group in self.optimizer.param_groups for p in group["params"]]
        for param, local in zip(params, shard["values"], strict=True):
            _local(param).copy_(local)
        for i, entry in shard["optimizer"]["state"].items():  # per-entry state (Adam's m, v) back to DTensors
            param = params[int(i)]
            for key, value in entry.items():
                if isinstance(param, DTensor) and value.shape == _local(param).shape and value.dim() > 0:
                    entry[key] = DTensor.from_local(value.to(_local(param).device), param.device_mesh,
                                                    param.placements, shape=param.shape, stride=param.stride())
        self.optimizer.load_state_dict(shard["optimizer"])

    def full_fp32(self, param: nn.Parameter) -> torch.Tensor:
        """The whole parameter gathered from its shards (a collective, in the same order on every process)."""
        param = self._param(param).detach()
        return (param.full_tensor() if isinstance(param, DTensor) else param).float()

    @torch.no_grad()
    def write_entries(self, param: nn.Parameter, index: torch.Tensor, values: torch.Tensor) -> None:
        """Writes the entries that fall in this process's shard (rows start..start + rows of dim 0); the sharded
        parameter is the one the optimizer steps and the one gathered for the next forward."""
        param = self._param(param)
        if not isinstance(param, DTensor):
            return super().write_entries(param, index, values)
        local = _local(param)
        start, per_row = _shard_start(param), math.prod(param.shape[1:])
        lo, hi = start * per_row, (start + local.shape[0]) * per_row
        index = index.to(local.device).long()
        inside = (index >= lo) & (index < hi)
        local.view(-1)[index[inside] - lo] = values.to(local.device, local.dtype)[inside]

    def model_for_export(self, model: nn.Module, load_fresh: Callable[[], nn.Module]) -> nn.Module:
        """A fresh copy from disk: the engine's module is sharded."""
        return load_fresh()


def _local(tensor: torch.Tensor) -> torch.Tensor:
    """A DTensor's local shard (a view sharing its storage); any other tensor itself."""
    return tensor.to_local() if isinstance(tensor, DTensor) else tensor


def _shard_start(param) -> int:
    """The first dim-0 row of this process's shard: FSDP2 chunks dim 0 like torch.chunk (ceil-sized, the
    last shards short or empty)."""
    if tuple(param.placements) != (Shard(0),):
        raise LotaError(f"internal error: an FSDP parameter is sharded as {param.placements}, expected Shard(0)")
    rows, world = param.shape[0], param.device_mesh.size()
    chunk = -(-rows // world)
    start = min(param.device_mesh.get_local_rank() * chunk, rows)
    if _local(param).shape[0] != min(chunk, rows - start):
        raise LotaError(f"internal error: FSDP shard of {tuple(param.shape)} has {_local(param).shape[0]} rows "
                        f"at row {start}")
    return start


# --------------------------------------------------------------------------- building one

def mixed_precision(setting: str) -> str:
    if setting != "auto":
        return setting
    return "bf16" if torch.cuda.is_available() and torch.cuda.is_bf16_supported() else "no"


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


def make_engine(cfg: TrainStageConfig, out: Path) -> Replicated:
    """The engine for cfg.dist in this process: DeepSpeed when dist=zero2/zero3 (or a user's accelerate
    config chose it), FSDP2 when dist=fsdp (or a user's accelerate config chose FSDP version 2) on several
    processes, otherwise whatever the launcher set up (DDP for several processes, nothing for one).
    Batch, accumulation and clipping always follow train.*, also under a user's accelerate / DeepSpeed config."""
    from accelerate import Accelerator
    from accelerate.utils import DeepSpeedPlugin, InitProcessGroupKwargs

    check(cfg)
    world = int(os.environ.get("WORLD_SIZE", "1"))
    handlers, plugin = [], None
    if "LOCAL_RANK" in os.environ:  # launched by accelerate / torchrun
        backend = cfg.dist.backend or ("nccl" if torch.cuda.is_available() else "gloo")
        handlers.append(InitProcessGroupKwargs(backend=backend))
    fsdp = uses_fsdp(cfg)
    if os.environ.get("ACCELERATE_USE_FSDP") == "true":
        # lota shards with fully_shard itself (FullyShardedV2), or runs the engine named in dist=: accelerate
        # is to run plain processes and must not wrap the model (in its own FSDP, or in DDP: see prepare)
        os.environ["ACCELERATE_USE_FSDP"] = "false"
    if cfg.dist.engine in ZERO_STAGES:
        _quiet_deepspeed()
        # zero3_init_flag off: models load whole and ZeRO-3 partitions them at prepare (see _whole_model_loading)
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
    if own is None:
        if fsdp and accelerator.num_processes > 1:  # (on one process there is nothing to shard)
            return FullyShardedV2(accelerator, mixed_precision(cfg.train.mixed_precision))
        return Replicated(accelerator)
    if plugin is None:  # DeepSpeed from the user's config: lota's train.* still rule the step
        own.deepspeed_config.update(batch_settings(cfg, accelerator.num_processes))
    return DeepSpeedZero(accelerator)


def shutdown(succeeded: bool) -> None:
    """End this process's part in a multi-process run cleanly: after success every process waits for the
    others, then the process group is destroyed. Leaving it to interpreter exit let a rank abort in C++
    teardown ('terminate called without an active exception') after all its work was written. After a
    failure there is no wait: a peer that failed too would never arrive."""
    import torch.distributed as torch_dist

    if torch_dist.is_available() and torch_dist.is_initialized():
        if succeeded:
            torch_dist.barrier()
        torch_dist.destroy_process_group()
