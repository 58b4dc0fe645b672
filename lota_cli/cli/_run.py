"""Composing a stage's config with Hydra (from the package's conf/, overrides, sweeps, --cfg) and running it:
its paths on stdout, everything else on stderr; a training stage asked for several processes re-launched
through `accelerate launch`."""

from __future__ import annotations

import contextlib
import importlib
import os
import sys
from pathlib import Path

from lota_cli import LotaError
from lota_cli.cli._errors import Debug, debug_requested, reported
from lota_cli.cli._help import stage_help
from lota_cli.cli._lock import exclusive, locked_out
from lota_cli.cli._stages import STAGES

# Hydra flags followed by a value, so that value is not mistaken for a positional input
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}
_INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def _split_positional(args: list[str]) -> tuple[list[str], list[str]]:
    """Separate positional paths from Hydra overrides and flags."""
    positional, rest, i = [], [], 0
    while i < len(args):
        arg = args[i]
        rest_of_flag = arg in _FLAGS_WITH_VALUE or (arg in ("--info", "-i") and i + 1 < len(args)
                                                    and args[i + 1] in _INFO_VALUES)
        if rest_of_flag:
            rest += args[i:i + 2]
            i += 2
            continue
        if arg.startswith("-") or "=" in arg:
            rest.append(arg)
        else:
            positional.append(arg)
        i += 1
    return positional, rest


def _quote(path: str) -> str:
    return "'" + path.replace("\\", "\\\\").replace("'", "\\'") + "'"


def _launch_if_needed(cfg, stage: str, out: Path, raw_out: str) -> bool:
    """Start the stage's processes through `accelerate launch` when cfg.dist asks for them; True if it did.

    The processes get this job's overrides and its resolved `out` (whose default holds the time, which would
    differ between processes); their main process prints the paths. A failed launch is a LotaError naming the
    failed process, and how to resume.
    """
    from hydra.core.hydra_config import HydraConfig

    from lota_cli import runs  # torch-free: the launching process never imports torch

    if runs.launched() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "${now:" in raw_out:
        raise LotaError("under accelerate launch, set out=DIR: the default out holds the start time, which "
                        "differs between the processes")
    runs.check(cfg)
    if not runs.needs_launch(cfg):
        return False
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("out=")]
    runs.launch(cfg, [stage, *overrides, f"out={_quote(str(out))}"], out)
    return True


def _end_processes(succeeded: bool) -> None:
    """Finish this process's trackers (train.log_with) and its part in a multi-process run."""
    training = sys.modules.get("lota_cli.training")  # only the stages that trained imported it
    if training is not None:
        training.finish_trackers()
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        from lota_cli.training import shutdown  # only stages that trained (or ran lm_eval) started a group

        shutdown(succeeded)


def run_stage(stage: str, args: list[str]) -> None:
    """Compose the stage's config with Hydra (sweeps, --cfg, overrides) and run it; exits non-zero on failure."""
    spec = STAGES[stage]
    if spec.positional:
        paths, args = _split_positional(args)
        if paths:
            args = [f"inputs=[{','.join(map(_quote, paths))}]"] + args
    Debug.value = debug_requested(args)
    with reported(stage):
        import hydra
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        from lota_cli.config import CONF_DIR, TrainStageConfig, register_resolvers, register_schemas

        register_schemas(spec.module)
        register_resolvers()
        if "--help" in args or "-h" in args:
            print(stage_help(stage, [a for a in args if a not in ("--help", "-h")]))
            return
        def task(dict_cfg) -> None:
            Debug.value = Debug.value or bool(dict_cfg.get("debug", False))
            with reported(stage):  # the schemas' checks (__post_init__) run here
                cfg = OmegaConf.to_object(dict_cfg)
            out = Path(HydraConfig.get().runtime.output_dir)
            raw_out = str(OmegaConf.to_container(dict_cfg, resolve=False).get("out"))
            succeeded = False
            # reported here too, not only around hydra.main: Hydra would print its own line for a failed job;
            # the job's own out locked too (the default, an interpolated one), if the command line's was not
            with reported(stage), exclusive(out.resolve(), stage):
                try:
                    if isinstance(cfg, TrainStageConfig) and _launch_if_needed(cfg, stage, out, raw_out):
                        return
                    # imported only now: composing, --cfg and --help never load torch
                    module = importlib.import_module(f"lota_cli.stages.{spec.module}")
                    with contextlib.redirect_stdout(sys.stderr):  # libraries that print (DeepSpeed logs there)
                        written = module.run(cfg, out)
                    succeeded = True
                finally:
                    with contextlib.redirect_stdout(sys.stderr):  # W&B prints as its run finishes
                        _end_processes(succeeded)
            for path in written:
                print(path, flush=True)

        sys.argv = [f"lota {stage}", *args]
        os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing; `reported` prints one line
        with exclusive(locked_out(args), stage), _composed_once(args):  # before Hydra writes out/.hydra, lota.log
            try:
                hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=spec.module)(task)()
            except AssertionError as err:  # OmegaConf, setting a key inside a config group that holds nothing
                unchosen = _unchosen_groups(spec.module, args)
                if "Unexpected type for root: NoneType" not in str(err) or not unchosen:
                    raise
                group, override = unchosen[0]
                raise LotaError(f"{override}: lota {stage} has no {group} chosen (none by default), so {group}.* "
                                f"has nothing to set; choose one first, e.g. {group}=gsm8k {override}") from None
            except OSError as err:  # Hydra writing out/.hydra before the stage runs: a full disk names no file
                if err.filename:
                    raise
                where = locked_out(args) or "the run's out= directory"
                raise LotaError(f"could not write the run's files (.hydra/, lota.log) in {where}: "
                                f"{err.strerror or err}; make sure it is a writable directory with free space (or "
                                "choose another out=)") from err


def _unchosen_groups(config: str, args: list[str]) -> list[tuple[str, str]]:
    """(group, override) of each override that sets a key of a config group the stage's defaults leave empty
    (eval's `task: null`) with no `group=` choice on the command line."""
    from omegaconf import OmegaConf

    from lota_cli.config import CONF_DIR

    defaults = OmegaConf.load(CONF_DIR / f"{config}.yaml").get("defaults", [])
    empty = {group for entry in defaults if OmegaConf.is_dict(entry) for group, choice in entry.items()
             if choice is None}
    keys = [(arg.split("=", 1)[0].lstrip("+~"), arg) for arg in args if "=" in arg]
    chosen = {key for key, _ in keys}
    groups = [(key.partition(".")[0], arg) for key, arg in keys if "." in key]
    return [(group, arg) for group, arg in groups if group in empty and group not in chosen]


@contextlib.contextmanager
def _composed_once(args: list[str]):
    """Hydra composes the whole config an extra time before a run only to read hydra.mode (a third of a
    second of every start-up here), which lota's configs never set. Unless an override sets it, the probe
    answers "not set", and the command line's -m / --multirun decides, as Hydra does after such an answer."""
    from hydra._internal.hydra import Hydra

    if any(arg.lstrip("+~").startswith("hydra.mode") for arg in args) or not hasattr(Hydra, "get_mode"):
        yield
        return
    probe = Hydra.get_mode
    Hydra.get_mode = lambda self, *args, **kwargs: None
    try:
        yield
    finally:
        Hydra.get_mode = probe
