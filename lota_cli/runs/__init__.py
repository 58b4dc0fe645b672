"""A training run outside its model, torch-free: how its processes are started and what an engine setting
needs (_launch), and where its checkpoints lie in out (_layout). The command's launching process reads this
room alone, so it never imports torch while its training processes run."""

from lota_cli.runs._launch import (INSTALL_DEEPSPEED, ZERO_STAGES, check, failure, free_port, launch, launched,
                                   needs_launch, uses_fsdp)
from lota_cli.runs._layout import checkpoint_dir, latest, newest_below

__all__ = ["INSTALL_DEEPSPEED", "ZERO_STAGES", "check", "checkpoint_dir", "failure", "free_port", "latest", "launch",
           "launched", "needs_launch", "newest_below", "uses_fsdp"]
