"""`lota <stage> [hydra overrides...]`: compose a stage's config with Hydra from the package's conf/ and run it.

stdout carries only the paths a stage wrote, one per line (with several processes, the main one's); logs and
progress go to stderr. Any failure is one line on stderr and exit status 1 (`debug=true` shows the
traceback), whether it happened composing the config or running the stage. A training stage asked to run on
several processes (dist=...) re-launches itself through `accelerate launch`.
"""

from __future__ import annotations

import contextlib
import dataclasses
import importlib
import importlib.resources
import importlib.util
import logging
import os
import sys
import time
import typing
from pathlib import Path

from lota_cli import LotaError, __version__

# The configs are package data (lota_cli/conf), found the same way from a checkout, a wheel or an sdist.
CONF_DIR = Path(str(importlib.resources.files("lota_cli") / "conf"))


@dataclasses.dataclass(frozen=True)
class Stage:
    module: str  # lota_cli.stages.<module>, and the config conf/<module>.yaml
    does: str
    writes: str
    positional: bool = False  # takes artifact paths as positional arguments (`lota merge a b`): inputs=[...]


STAGES = {
    "calibrate": Stage("calibrate", "dense fine-tuning for a short while; the task vector is w_ft - w_base",
                       "out/task_vector.safetensors (and out/model with save_model=true), metrics.jsonl, lota.log"),
    "extract": Stage("extract", "mask of the largest entries of a task vector (or: of the weights, random, gradients)",
                     "out/mask.safetensors"),
    "sparse-train": Stage("sparse_train", "train only the masked entries from the base: the LoTA adapter",
                          "out/sparse_delta.safetensors (and out/model with save_model=true), metrics.jsonl"),
    "lotto": Stage("lotto", "LoTTO: a new task after earlier adapters, its mask disjoint from theirs",
                   "out/mask.safetensors, out/sparse_delta.safetensors (and out/model with save_model=true)"),
    "merge": Stage("merge", "combine task vectors / sparse deltas of one base with a merge method",
                   "out/merged.safetensors, or a model directory at output_model", positional=True),
    "overlap": Stage("overlap", "pairwise mask overlap, Jaccard index and sign agreement of artifacts",
                     "out/overlap.json (tables on stderr)", positional=True),
    "export": Stage("export", "sparse deltas as PEFT adapters (Super-Tuning), or base + deltas as a model",
                    "out/peft (adapter_config.json, adapter_model.safetensors; several inputs: out/peft/NAME/), "
                    "or out/model with format=model", positional=True),
    "data": Stage("data", "show and measure the training data a training stage would compose (same arguments)",
                  "out/stats.json, out/preview.jsonl (examples with their trained tokens; data.show=N on stderr)"),
    "eval": Stage("eval", "NLL, exact match, ROUGE or lm-eval tasks of a base, base + deltas, or a saved model",
                  "out/results.json, out/examples.jsonl (per-example scores; tables on stderr)"),
    "info": Stage("info", "describe an artifact: kind, base, density per layer, bytes per parameter",
                  "nothing (tables on stderr; --json prints JSON on stdout)"),
}
# Hydra flags followed by a value, so that value is not mistaken for a positional input
_FLAGS_WITH_VALUE = {"--cfg", "-c", "--package", "-p", "--config-path", "-cp", "--config-name", "-cn",
                     "--config-dir", "-cd", "--experimental-rerun"}
_INFO_VALUES = {"all", "config", "defaults", "defaults-tree", "plugins", "searchpath"}
_HYDRA_NOISE = ("full_key:", "reference_type=", "object_type=", "Config search path", "provider=",
                "Set the environment")
LOCK_FILE = ".lota.lock"

log = logging.getLogger("lota")


def usage() -> str:
    width = max(map(len, STAGES))
    lines = [f"lota {__version__}: Lottery Ticket Adaptation for Hugging Face causal LMs", "",
             "usage: lota <stage> [key=value ...] [--cfg job] [-m key=a,b ...] [--help]", "", "stages:"]
    lines += [f"  {name:<{width}}  {stage.does}" for name, stage in STAGES.items()]
    lines += ["", "`lota <stage> --help` lists what a stage reads and writes; see README.md for the pipeline."]
    return "\n".join(lines)


# --------------------------------------------------------------------------- errors: one reporter

class _Debug:
    """Whether failures show their traceback: `debug=` on the command line (any spelling Hydra reads as true),
    or the composed config's `debug` once there is one."""

    value = False


def _debug_requested(args: list[str]) -> bool:
    from hydra.core.override_parser.overrides_parser import OverridesParser
    from omegaconf.nodes import BooleanNode

    wanted = [a for a in args if a.lstrip("+").startswith("debug=")]
    try:
        overrides = OverridesParser.create().parse_overrides(wanted)
        return any(bool(BooleanNode(o.value())._value()) for o in overrides)
    except Exception:  # a malformed debug= is reported by the composition itself
        return False


@contextlib.contextmanager
def reported(stage: str):
    """Run a stage's work; any failure becomes one line `lota <stage>: ...` on stderr and exit status 1."""
    try:
        yield
    except BrokenPipeError:  # the reader of stdout went away (`lota merge --help | head`): leave quietly
        os.dup2(os.open(os.devnull, os.O_WRONLY), sys.stdout.fileno())
        raise SystemExit(1) from None
    except Exception as err:
        if _Debug.value:
            raise
        logging.getLogger(f"lota.{stage}").debug("error", exc_info=True)
        print(f"lota {stage}: {_one_line(err)}", file=sys.stderr, flush=True)
        raise SystemExit(1) from None


def _one_line(err: Exception) -> str:
    """What went wrong, in one line a user can act on."""
    if isinstance(err, LotaError):
        return f"error: {err}"
    if isinstance(err, OSError):
        return f"error: {err.strerror or err}" + (f": {err.filename}" if err.filename else "")
    from hydra.errors import HydraException
    from omegaconf.errors import OmegaConfBaseException

    lines = [line.strip() for e in (err, err.__cause__) if e is not None for line in str(e).splitlines()]
    text = "; ".join(dict.fromkeys(line for line in lines if line and not line.startswith(_HYDRA_NOISE)))
    if isinstance(err, (HydraException, OmegaConfBaseException)):  # composition: a bad key, value or override
        return f"error: {text}"
    return f"{type(err).__name__}: {text} (rerun with debug=true for the traceback)"


# --------------------------------------------------------------------------- composing and running a stage

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
    differ between processes); their main process prints the paths. A failed launch is a LotaError naming the
    failed process, and how to resume.
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
    dist.launch(cfg, [stage, *overrides, f"out={_quote(str(out))}"], out)
    return True


def _holds_lock() -> bool:
    """Only the process that speaks for a run takes its lock: not the processes lota launched (their
    launcher holds it), not the other ranks or machines of a user's launcher."""
    return (os.environ.get("LOTA_LAUNCHED") != "1" and os.environ.get("RANK", "0") == "0"
            and os.environ.get("MACHINE_RANK", "0") == "0")


def _locked_out(args: list[str]) -> Path | None:
    """The output directory to lock: an `out=` given on the command line, when the stage will run (not for
    --cfg, --info, --help). A sweep locks its root, the jobs' parent. The default out holds the start time, so
    two runs share it only if started in the same second; an interpolated out= is not locked."""
    if any(a in ("--cfg", "-c", "--info", "-i", "--hydra-help") or a.startswith("--cfg=") for a in args):
        return None
    values = [a.split("=", 1)[1] for a in args if a.lstrip("+").startswith("out=")]
    if not values or "${" in values[-1]:
        return None
    return Path(values[-1].strip("'\"")).resolve()


@contextlib.contextmanager
def exclusive(out: Path | None, stage: str):
    """Hold out/.lota.lock while the stage runs, so a second command given the same out= refuses at once
    instead of overwriting the first one's checkpoints. An flock: a killed run leaves no stale lock."""
    import fcntl

    if out is None or not _holds_lock():
        yield
        return
    out.mkdir(parents=True, exist_ok=True)
    handle = open(out / LOCK_FILE, "a+")
    try:
        fcntl.flock(handle, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        handle.seek(0)
        holder = handle.read().strip() or "another process"
        handle.close()
        raise LotaError(f"out={out} is in use by {holder}; wait for it to finish or choose another out=") from None
    handle.seek(0)
    handle.truncate()
    handle.write(f"`lota {stage}` (pid {os.getpid()}, started {time.strftime('%Y-%m-%d %H:%M:%S')})\n")
    handle.flush()
    try:
        yield
    finally:
        handle.close()  # releases the lock


def _end_processes(succeeded: bool) -> None:
    """Finish this process's trackers (train.log_with) and its part in a multi-process run."""
    if "lota_cli.metrics" in sys.modules:  # the training loop's
        from lota_cli.metrics import finish_trackers

        finish_trackers()
    distributed = sys.modules.get("torch.distributed")
    if distributed is not None and distributed.is_available() and distributed.is_initialized():
        from lota_cli.engines import shutdown  # only stages that trained (or ran lm_eval) started a group

        shutdown(succeeded)


def run_stage(stage: str, args: list[str]) -> None:
    """Compose the stage's config with Hydra (sweeps, --cfg, overrides) and run it; exits non-zero on failure."""
    spec = STAGES[stage]
    if spec.positional:
        paths, args = _split_positional(args)
        if paths:
            args = [f"inputs=[{','.join(map(_quote, paths))}]"] + args
    _Debug.value = _debug_requested(args)
    with reported(stage):
        import hydra
        from hydra.core.hydra_config import HydraConfig
        from omegaconf import OmegaConf

        from lota_cli.config import TrainStageConfig, register_schemas

        register_schemas(spec.module)
        _register_resolvers()
        if "--help" in args or "-h" in args:
            print(stage_help(stage, [a for a in args if a not in ("--help", "-h")]))
            return
        def task(dict_cfg) -> None:
            _Debug.value = _Debug.value or bool(dict_cfg.get("debug", False))
            with reported(stage):  # the schemas' checks (__post_init__) run here
                cfg = OmegaConf.to_object(dict_cfg)
            out = Path(HydraConfig.get().runtime.output_dir)
            raw_out = str(OmegaConf.to_container(dict_cfg, resolve=False).get("out"))
            succeeded = False
            # reported here too, not only around hydra.main: Hydra would print its own line for a failed job
            with reported(stage):
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
        with exclusive(_locked_out(args), stage), _composed_once(args):  # before Hydra writes out/.hydra, lota.log
            hydra.main(version_base="1.3", config_path=str(CONF_DIR), config_name=spec.module)(task)()


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


# --------------------------------------------------------------------------- --help

def stage_help(stage: str, overrides: list[str]) -> str:
    """What the stage does and writes, its config groups, and every key it reads with its value and meaning."""
    from hydra import compose, initialize_config_dir

    from lota_cli import config

    spec = STAGES[stage]
    overrides = [a for a in overrides if "=" in a and not a.startswith("-")]
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        cfg = compose(config_name=spec.module, overrides=overrides, return_hydra_config=True)
    schema = config.SCHEMAS[spec.module]
    usage_args = " A.safetensors B.safetensors ..." if spec.positional else ""
    lines = [f"lota {stage}: {spec.does}", f"writes: {spec.writes}", "",
             f"usage: lota {stage}{usage_args} [key=value ...] [--cfg job] [-m key=a,b ...]"]
    groups = {k: v for k, v in cfg.hydra.runtime.choices.items() if not k.startswith("hydra")}
    if groups:
        lines += ["", "config groups (group=option):"]
        for group, choice in groups.items():
            folder = group.split("@")[0]
            options = sorted(p.stem for p in (CONF_DIR / folder).glob("*.yaml"))
            lines.append(f"  {group:<16} {_show(choice):<14} options: {', '.join(options)}")
    rows = list(_key_rows(schema, cfg, ""))
    width = min(32, max(len(r[0]) for r in rows))
    value_width = min(28, max(len(r[1]) for r in rows))
    lines += ["", "keys (current value, meaning):"]
    for key, value, meaning in rows:
        value = value if len(value) <= value_width else value[:value_width - 3] + "..."
        lines.append(f"  {key:<{width}} {value:<{value_width}} {meaning}")
    if stage == "merge":
        from lota_cli.merging import methods_help

        lines += ["", "methods:"] + [f"  {line}" for line in methods_help().splitlines()]
    lines += ["", "Hydra: --cfg job prints the composed config; -m sweeps; --hydra-help for Hydra's own flags."]
    return "\n".join(lines)


def _key_rows(schema: type, node, prefix: str):
    """(key, value, meaning) for every key of a schema dataclass, groups flattened as group.key."""
    from omegaconf import OmegaConf

    hints = typing.get_type_hints(schema)
    values = OmegaConf.to_container(node, resolve=False) if node is not None else {}
    for f in dataclasses.fields(schema):
        if f.metadata.get("unread"):
            continue
        kind = _dataclass_in(hints[f.name])
        value = node.get(f.name) if node is not None and kind is not None else None
        if kind is not None and typing.get_origin(hints[f.name]) is dict:  # named tasks: their keys once
            names = ", ".join(value.keys()) if value else "-"
            yield f"{prefix}{f.name}", names, f.metadata.get("help", "")
            yield from _key_rows(kind, None, f"{prefix}{f.name}.NAME.")
        elif kind is not None and value is not None:
            yield from _key_rows(kind, value, f"{prefix}{f.name}.")
        elif kind is not None:
            yield f"{prefix}{f.name}", "null", f.metadata.get("help", "")
        else:
            shown = "" if node is None else _show(values.get(f.name))
            yield f"{prefix}{f.name}", shown, f.metadata.get("help", "")


def _dataclass_in(hint) -> type | None:
    """The dataclass a field holds (directly, as Optional[...] or as Dict[str, ...]), else None."""
    if dataclasses.is_dataclass(hint):
        return hint
    for arg in typing.get_args(hint):
        if dataclasses.is_dataclass(arg):
            return arg
    return None


def _show(value) -> str:
    if value is None:
        return "null"
    if isinstance(value, bool):
        return str(value).lower()
    return str(value)


# --------------------------------------------------------------------------- entry point

def return_freed_memory() -> None:
    """Make glibc give large freed blocks (>= 1 MiB) back to the OS at once. Its default threshold grows to
    32 MiB after the first large free, after which weight-sized temporaries (a sparse layer's merged weight,
    a dense gradient) freed during a step stay in the heap: one LoTA step of a 226M-weight Llama peaked at
    3,076 MiB with the default and 2,300 with this. No-op where the C library has no mallopt."""
    import ctypes
    import ctypes.util

    try:
        ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6").mallopt(-3, 1 << 20)  # M_MMAP_THRESHOLD
    except (OSError, AttributeError):
        pass


def main(argv: list[str] | None = None) -> None:
    return_freed_memory()
    argv = list(sys.argv[1:] if argv is None else argv)
    if not argv or argv[0] in ("-h", "--help", "help"):
        print(usage())
        return
    if argv[0] in ("-V", "--version"):
        print(f"lota {__version__}")
        return
    stage, args = argv[0], argv[1:]
    if stage not in STAGES:
        print(f"lota: unknown stage {stage!r}\n\n{usage()}", file=sys.stderr)
        raise SystemExit(2)
    if stage == "info":
        from lota_cli.stages.info import main as info_main

        _Debug.value = "--debug" in args
        with reported(stage):
            raise SystemExit(info_main(args))
    run_stage(stage, args)
