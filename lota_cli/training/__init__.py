"""Training: the loop every training stage shares and what it minimizes, the sparse layers that train only a
mask's entries, the engines (one process, DDP, FSDP2, DeepSpeed ZeRO) and how their processes are launched,
checkpoints to resume from, the numbers' destinations, and the set-up the stages start from."""

from lota_cli.training._checkpoints import Checkpointer, latest, newest_below, resume_point
from lota_cli.training._engines import (DeepSpeedZero, FullyShardedV2, Replicated, deepspeed_config, make_engine,
                                        shutdown)
from lota_cli.training._launch import check, failure, free_port, launch, launched, needs_launch, uses_fsdp
from lota_cli.training._loop import TrainResult, make_optimizer, optimizer_steps, train
from lota_cli.training._metrics import Metrics, finish_trackers, start_trackers
from lota_cli.training._objectives import PrecomputedReference, SparseOffReference, make_objective
from lota_cli.training._plan import model_shape, plan, smallest_fit
from lota_cli.training._setup import Run, export_model, load_base, lora_task_vector, setup
from lota_cli.training._sparse import attach_sparse, fold_sparse, sparse_off

__all__ = ["Checkpointer", "DeepSpeedZero", "FullyShardedV2", "Metrics", "PrecomputedReference", "Replicated", "Run",
           "SparseOffReference", "TrainResult", "attach_sparse", "check", "deepspeed_config", "export_model",
           "failure", "finish_trackers", "fold_sparse", "free_port", "latest", "launch", "launched", "load_base",
           "lora_task_vector", "make_engine", "make_objective", "make_optimizer", "model_shape", "needs_launch",
           "newest_below", "optimizer_steps", "plan", "resume_point", "setup", "shutdown", "smallest_fit",
           "sparse_off", "start_trackers", "train", "uses_fsdp"]
