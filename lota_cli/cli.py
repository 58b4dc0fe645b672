"""`lota <stage> [hydra overrides...]`: dispatch to a stage composed by Hydra from conf/.

stdout carries only the paths a stage wrote, one per line (with several processes, the main one's); logs and
progress go to stderr. A user error is one line on stderr and exit status 1 (`debug=true` shows the traceback).
A training stage asked to run on several processes (dist=...) re-launches itself through `accelerate launch`.
"""

from __future__ import annotations

import contextlib
import importlib
import importlib.util
import logging
import os
import sys
from pathlib import Path

from lota_cli import LotaError

CONF_DIR = Path(__file__).resolve().parent / "conf"

# stage -> (module, one-line description)
STAGES = {
    "calibrate": ("calibrate", "dense fine-tuning for a short while; writes the task vector w_ft - w_base"),
    "extract": ("extract", "mask of the largest-magnitude entries of a task vector (one global threshold)"),
    "sparse-train": ("sparse_train", "train only the masked entries from the base; writes the LoTA sparse delta"),
    "lotto": ("lotto", "LoTTO: a new task after earlier adapters, its mask disjoint from theirs"),
    "merge": ("merge", "combine task vectors / sparse deltas: sum, task_arithmetic, ties, dare, magnitude"),
    "overlap": ("overlap", "pairwise mask overlap, Jaccard index and sign agreement of artifacts"),
    "eval": ("eval", "NLL, exact match and ROUGE-L of a base, base + deltas, or a saved model"),
    "info": ("info", "describe an artifact: kind, base, density per layer, bytes per parameter"),
}
# stages that take positional artifact paths (`lota merge a.st b.st`), passed on as `inputs=[...]`
POSITIONAL_INPUTS = {"merge", "overlap"}
# Hydra flags followed by a value, so that value is not mistaken for a positional input
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}
_INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}


def usage() -> str:
    width = max(map(len, STAGES))
    lines = ["usage: lota <stage> [key=value ...] [hydra flags: --cfg job, -m, --help]", "", "stages:"]
    lines += [f"  {name:<{width}}  {desc}" for name, (_, desc) in STAGES.items()]
    lines += ["", "Run `lota <stage> --help` for a stage's configuration; see README.md for the pipeline."]
    return "\n".join(lines)


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


def _register_resolvers() -> None:
    from omegaconf import OmegaConf

    def package_dir(name: str) -> str:
        spec = importlib.util.find_spec(name)
        if spec is None or not spec.submodule_search_locations:
            raise LotaError(f"package {name!r} is not installed (pip install --no-deps {name.replace('_', '-')})")
        return spec.submodule_search_locations[0]

    def gpu_count() -> int:  # the default dist.num_processes of the multi-process engines
        import torch

        return max(1, torch.cuda.device_count())

    OmegaConf.register_new_resolver("lota.package_dir", package_dir, replace=True)
    OmegaConf.register_new_resolver("lota.gpu_count", gpu_count, replace=True)


def _launch_if_needed(cfg, stage: str, out: Path, raw_out: str) -> bool:
    """Start the stage's processes through `accelerate launch` when cfg.dist asks for them; True if it did.

    The processes get this job's overrides and its resolved `out` (whose default holds the time, which would
    differ between processes); their main process prints the paths. A failed launch exits with its status.
    """
    from hydra.core.hydra_config import HydraConfig

    from lota_cli import dist

    if dist.launched() and int(os.environ.get("WORLD_SIZE", "1")) > 1 and "${now:" in raw_out:
        raise LotaError("under accelerate launch, set out=DIR: the default out holds the start time, which "
                        "differs between the processes")
    dist.check(cfg)
    if not dist.needs_launch(cfg):
        return False
    overrides = [o for o in HydraConfig.get().overrides.task if not o.startswith("out=")]
    status = dist.launch(cfg, [stage, *overrides, f"out={_quote(str(out))}"])
    if status != 0:
        raise SystemExit(status)
    return True


def run_stage(stage: str, args: list[str]) -> None:
    """Compose the stage's config with Hydra and run it; exits non-zero on failure."""
    import hydra
    from hydra.core.hydra_config import HydraConfig
    from omegaconf import OmegaConf

    from lota_cli.config import TrainStageConfig, register_schemas

    module_name, _ = STAGES[stage]
    module = importlib.import_module(f"lota_cli.stages.{module_name}")
    if stage in POSITIONAL_INPUTS:
        paths, args = _split_positional(args)
        if paths:
            args = [f"inputs=[{','.join(map(_quote, paths))}]"] + args
    register_schemas()
    _register_resolvers()
    log = logging.getLogger(f"lota.{stage}")

    def task(dict_cfg) -> None:
        debug = bool(dict_cfg.get("debug", False))
        try:
            cfg = OmegaConf.to_object(dict_cfg)
            out = Path(HydraConfig.get().runtime.output_dir)
            raw_out = str(OmegaConf.to_container(dict_cfg, resolve=False).get("out"))
            if isinstance(cfg, TrainStageConfig) and _launch_if_needed(cfg, stage, out, raw_out):
                return
            with contextlib.redirect_stdout(sys.stderr):  # libraries that print (DeepSpeed logs to stdout)
                written = module.run(cfg, out)
        except (LotaError, OSError) as err:
            if debug:
                raise
            message = str(err) if isinstance(err, LotaError) else f"{err.strerror or err}: {err.filename or ''}"
            log.debug("error", exc_info=True)
            print(f"lota {stage}: error: {message}", file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        except Exception as err:  # an unexpected failure: one line unless debugging
            if debug:
                raise
            log.debug("error", exc_info=True)
            print(f"lota {stage}: {type(err).__name__}: {err} (rerun with debug=true for the traceback)",
                  file=sys.stderr, flush=True)
            raise SystemExit(1) from None
        for path in written or []:
            print(path, flush=True)

    sys.argv = [f"lota {stage}", *args]
    os.environ["HYDRA_FULL_ERROR"] = "1"  # Hydra raises instead of printing; we print one line below
    try:
        hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=module_name)(task)()
    except Exception as err:  # composition errors: unknown keys, bad overrides, an out= that cannot be made
        if "debug=true" in args:
            raise
        print(f"lota {stage}: error: {_one_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


_HYDRA_NOISE = ("full_key:", "reference_type=", "object_type=", "Config search path", "provider=",
                "Set the environment")


def _one_line(err: Exception) -> str:
    """Hydra's multi-line composition errors as one line a user can act on."""
    if isinstance(err, OSError):
        return f"cannot create the output directory {err.filename}: {err.strerror}; choose a writable out="
    lines = [line.strip() for e in (err, err.__cause__) if e is not None for line in str(e).splitlines()]
    return "; ".join(dict.fromkeys(line for line in lines if line and not line.startswith(_HYDRA_NOISE)))


def main(argv: list[str] | None = None) -> None:
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    stage, args = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"lota: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    if stage == "info":
        from lota_cli.stages.info import main as info_main

        raise SystemExit(info_main(args))
    run_stage(stage, args)
