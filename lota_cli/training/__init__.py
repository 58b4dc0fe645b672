"""Training: the loop every training stage shares and what it minimizes, the sparse layers that train only a
mask's entries, the engines (one process, DDP, FSDP2, DeepSpeed ZeRO; how their processes are launched is
lota_cli.runs'), checkpoints to resume from, the numbers' destinations, and the set-up the stages start from."""

from lota_cli.training._checkpoints import Checkpointer, resume_point
from lota_cli.training._engines import (DeepSpeedZero, FullyShardedV2, Replicated, deepspeed_config, make_engine,
                                        shutdown)
from lota_cli.training._loop import TrainResult, make_optimizer, optimizer_steps, train
from lota_cli.training._metrics import Metrics, finish_trackers, start_trackers
from lota_cli.training._objectives import PrecomputedReference, SparseOffReference, make_objective
from lota_cli.training._plan import model_shape, plan, smallest_fit
from lota_cli.training._setup import Run, export_model, load_base, lora_task_vector, setup
from lota_cli.training._sparse import attach_sparse, fold_sparse

__all__ = ["Checkpointer", "DeepSpeedZero", "FullyShardedV2", "Metrics", "PrecomputedReference", "Replicated",
           "Run", "SparseOffReference", "TrainResult", "attach_sparse", "deepspeed_config", "export_model",
           "finish_trackers", "fold_sparse", "load_base", "lora_task_vector", "make_engine", "make_objective",
           "make_optimizer", "model_shape", "optimizer_steps", "plan", "resume_point", "setup", "shutdown",
           "smallest_fit", "start_trackers", "train"]
