"""The one CLI path: --help per stage, --version, presets for every stage with a model and a task, debug in any
spelling Hydra reads as true, one-line errors from composition and from running, and the out= lock."""

from __future__ import annotations

import fcntl
import json

import pytest
import torch

from lota_cli import __version__
from conftest import imported_by, write_dense, write_sparse
from lota_cli.cli import LOCK_FILE, STAGES
from lota_cli.testing import in_process, lota, paths

HYDRA_STAGES = [name for name in STAGES if name != "info"]


def test_version_says_the_artifact_format():
    """One version: its minor number is the artifact format this lota writes, and --version says so."""
    from lota_cli.artifacts import FORMAT_VERSION

    assert int(__version__.split(".")[1]) == FORMAT_VERSION
    assert lota("--version").stdout.strip() == f"lota {__version__} (artifact format {FORMAT_VERSION})"


@pytest.mark.parametrize("stage", HYDRA_STAGES)
def test_help_names_the_stage_and_lists_only_its_keys(stage):
    text = in_process(stage, "--help").stdout
    first = text.splitlines()[0]
    assert first == f"lota {stage}: {STAGES[stage].does}" and "powered by Hydra" not in text
    assert f"writes: {STAGES[stage].writes}" in text
    keys = [line.split()[0] for line in text.split("keys (current value, meaning):\n")[1].splitlines()
            if line.startswith("  ")]
    assert "out" in keys and "debug" in keys
    trains = stage in ("calibrate", "sparse-train", "lotto")
    plans = stage == "plan"  # a training stage's settings, every engine: no dist.*
    assert ("train.lr" in keys) == (trains or plans) and ("dist.engine" in keys) == trains
    assert ("model.path" in keys) == (trains or plans or stage in ("eval", "data", "extract"))  # extract: sources
    assert not any(k.startswith("train.") for k in keys) or trains or plans  # a preset's: not for eval
    if stage == "extract":
        assert "extract.sparsity" in keys and "extract.source" in keys
    for line in text.split("keys (current value, meaning):\n")[1].splitlines():
        if line.startswith("  ") and not line.startswith("  tasks.NAME"):
            assert len(line.split(None, 2)) == 3, f"a key without a value or meaning: {line!r}"


def test_help_shows_overridden_values_and_merge_methods():
    text = in_process("calibrate", "train.lr=0.25", "--help").stdout
    assert any(line.split()[:2] == ["train.lr", "0.25"] for line in text.splitlines())
    merge = in_process("merge", "--help").stdout
    for method in ("sum", "task_arithmetic", "ties", "dare", "magnitude"):
        assert any(line.split()[:1] == [method] for line in merge.split("methods:\n")[1].splitlines())


@pytest.mark.parametrize("stage", ["calibrate", "extract", "sparse-train", "lotto", "eval"])
def test_preset_composes_for_every_stage_with_a_model_and_a_task(stage):
    job = in_process(stage, "conf=gsm8k", "--cfg", "job").stdout
    assert "name: gsm8k" in job and "HuggingFaceTB/SmolLM2-135M-Instruct" in job


def test_eval_evaluates_the_chosen_task(tiny_model, data, tmp_path):
    """task=NAME in eval takes the task.* overrides a training stage takes, and is what eval.tasks defaults to."""
    (results,) = paths(in_process("eval", f"model.path={tiny_model}", "task=alpaca",
                                  f"task.eval_data_files={data['reverse_test']}", "eval.max_examples=2",
                                  "eval.generate=false", f"out={tmp_path}"))
    tasks = json.loads(results.read_text())["tasks"]
    assert list(tasks) == ["alpaca"] and tasks["alpaca"]["n"] == 2


@pytest.mark.parametrize("spelling", ["true", "True", "yes", "1"])
def test_debug_in_any_spelling_shows_the_traceback(spelling, tmp_path):
    failed = lota("extract", "no_such_key=1", f"debug={spelling}", f"out={tmp_path}", check=False)
    assert failed.returncode == 1 and "Traceback" in failed.stderr


@pytest.mark.parametrize("args, says", [
    (["no_such_key=1"], "Key 'no_such_key' not in 'ExtractConfig'"),  # composition
    (["extract.sparsity=2", "extract.task_vector=x"], "extract.sparsity=2.0 must be strictly between 0 and 1"),  # schema
    (["extract.task_vector=/no/such/file"], "artifact not found: /no/such/file"),  # the stage itself
])
def test_every_failure_is_one_line(args, says, tmp_path):
    failed = in_process("extract", *args, f"out={tmp_path / 'out'}", check=False)
    lines = failed.stderr.strip().splitlines()
    assert failed.returncode == 1 and failed.stdout == ""
    assert lines[-1].startswith("lota extract: error: ") and says in lines[-1], failed.stderr
    assert not any(line.startswith(("Error executing job", "Traceback")) for line in lines), failed.stderr


def test_a_key_of_a_task_eval_has_not_chosen_is_one_line(tmp_path):
    """eval chooses no task by default (task: null): task.KEY=VALUE alone was OmegaConf's bare AssertionError
    'Unexpected type for root: NoneType'."""
    failed = in_process("eval", "task.format=preference", f"out={tmp_path / 'out'}", check=False)
    assert failed.returncode == 1 and "Traceback" not in failed.stderr
    assert failed.stderr.strip().splitlines()[-1] == (
        "lota eval: error: task.format=preference: lota eval has no task chosen (none by default), so task.* has "
        "nothing to set; choose one first, e.g. task=gsm8k task.format=preference")


@pytest.mark.parametrize("given", ["out=DIR", "out=${oc.env:...}"])
def test_a_second_command_on_the_same_out_refuses(given, tiny_model, tmp_path, monkeypatch):
    """While one run holds out/.lota.lock (an flock: this process holds it, as another run would), another given
    the same out refuses in one line naming the first: out= on the command line before anything is written
    there, an interpolated one once it is composed. Once the first ends (also when it is killed) the out is
    free."""
    out = tmp_path / "run"
    monkeypatch.setenv("LOTA_TEST_OUT", str(out))
    calibrate = ["calibrate", f"model.path={tiny_model}", "task.data_files=x",
                 f"out={out}" if given == "out=DIR" else "out=${oc.env:LOTA_TEST_OUT}"]
    out.mkdir()
    with open(out / LOCK_FILE, "w") as holder:
        holder.write("`lota calibrate` (pid 12345, started 2026-12-01 10:00:00)\n")
        holder.flush()
        fcntl.flock(holder, fcntl.LOCK_EX | fcntl.LOCK_NB)
        failed = in_process(*calibrate, check=False)
        assert failed.returncode == 1
        assert failed.stderr.strip().splitlines()[-1] == (
            f"lota calibrate: error: out={out} is in use by `lota calibrate` (pid 12345, started 2026-12-01 "
            "10:00:00); wait for it to finish or choose another out=")
    if given == "out=DIR":
        assert sorted(p.name for p in out.iterdir()) == [LOCK_FILE]  # the refused run wrote nothing there
    # released: the next command gets past the lock (and fails on its missing data file instead)
    again = in_process(*calibrate, check=False)
    assert again.returncode == 1 and "in use by" not in again.stderr and "task.data_files" in again.stderr


def test_the_default_out_is_locked_too(tiny_model, tmp_path, monkeypatch):
    """The default out (runs/<stage>/<start time>) is locked by the job once composed: its lock file is there."""
    from lota_cli.artifacts import Artifact

    monkeypatch.chdir(tmp_path)
    tv = write_dense(tmp_path / "tv.safetensors", {"model.layers.0.mlp.up_proj.weight": torch.randn(8, 4)})
    (mask,) = paths(in_process("extract", f"extract.task_vector={tv}"))
    assert mask.parent.parent == tmp_path / "runs" / "extract" and (mask.parent / LOCK_FILE).is_file()
    assert Artifact(mask).kind == "mask"


def test_extract_takes_a_preset(tmp_path):
    """conf=PRESET in extract: its model and params are what the stage reads, its training keys are ignored
    with one log line, and the mask records the config extract read (no train.*)."""
    from lota_cli.artifacts import Artifact

    tv = write_dense(tmp_path / "tv.safetensors", {"model.layers.0.mlp.up_proj.weight": torch.randn(8, 4)})
    result = in_process("extract", "conf=gsm8k", f"extract.task_vector={tv}", f"out={tmp_path / 'e'}")
    (mask,) = paths(result)
    assert result.stderr.count("the preset's train.* settings are ignored") == 1
    meta = Artifact(mask).meta
    assert "train" not in meta.config and meta.config["model"]["path"] == "HuggingFaceTB/SmolLM2-135M-Instruct"


@pytest.mark.parametrize("name, shape, says", [
    ("transformer.h.0.attn.c_attn.weight", (64, 192), "which this model does not have; it was made for another "
                                                      "architecture"),
    ("model.layers.0.self_attn.q_proj.weight", (32, 64), "is [32, 64] but the model's is [64, 64]"),
])
def test_a_mask_that_does_not_fit_is_refused_before_the_model_loads(tiny_model, name, shape, says, tmp_path):
    """Checked on the model's weightless skeleton: one line, before the weights load, nothing written."""

    from conftest import tiny_overrides
    from lota_cli.artifacts import save_sparse, stage_meta
    from lota_cli.tensors import encode_positions, pack_bits

    bits = torch.zeros(torch.Size(shape).numel(), dtype=torch.bool)
    bits[:10] = True
    mask = save_sparse(tmp_path / "mask.safetensors", stage_meta("mask", "test", {}, "other", "f" * 64),
                       {name: shape}, {name: encode_positions(pack_bits(bits), bits.numel())})
    failed = in_process("sparse-train", *tiny_overrides(tiny_model, tmp_path / "st", **{"sparse_train.mask": mask}),
                        check=False)
    last = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 1 and last.startswith("lota sparse-train: error: ") and says in last, failed.stderr
    assert "training examples" not in failed.stderr and "Loading weights" not in failed.stderr  # never loaded
    assert not (tmp_path / "st" / "sparse_delta.safetensors").exists()


def test_composing_any_stage_imports_no_torch(tmp_path):
    calls = "\n".join(f"run({stage!r}, '--cfg', 'job', 'out={tmp_path}')" for stage in HYDRA_STAGES)
    assert imported_by(calls, cwd=tmp_path) == [([], False)]


def test_the_launching_process_imports_no_torch(tiny_model, tmp_path):
    """`lota calibrate dist=ddp dist.num_processes=2` composes, checks the engine settings and starts `accelerate
    launch` without importing torch (3 s and ~300 MiB it held while its processes trained); here the launcher
    is a stand-in that records its command and exits 0."""
    import subprocess
    import sys

    from conftest import tiny_overrides
    from lota_cli.testing import OFFLINE_ENV

    args = tiny_overrides(tiny_model, tmp_path / "cal", **{"dist": "ddp", "dist.num_processes": 2})
    code = f"""
import subprocess, sys
class Launcher(subprocess.Popen):
    def __init__(self, cmd, **kwargs):
        if "accelerate.commands.launch" in cmd:
            print("launched", " ".join(cmd))
            cmd = [sys.executable, "-c", ""]
        super().__init__(cmd, **kwargs)
subprocess.Popen = Launcher
from lota_cli import cli
cli.main(["calibrate", *{args!r}])
print("torch", "torch" in sys.modules, "transformers" in sys.modules)
"""
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=OFFLINE_ENV, timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "launched " in result.stdout and "accelerate.commands.launch --num_processes 2" in result.stdout
    assert result.stdout.splitlines()[-1] == "torch False False", result.stdout


def test_artifact_stages_import_no_model_or_data_library(tmp_path):
    """extract from a task vector, overlap, merge of sparse deltas (sum, to a task vector) and info work with
    numpy and the native kernels alone: not even torch (two seconds here) before their first work. Merging
    dense task vectors computes in torch, but still imports no model or data library."""
    import torch

    name = "model.layers.0.mlp.up_proj.weight"
    for tag in "ab":
        delta = torch.randn(16, 8)
        write_dense(tmp_path / f"{tag}.safetensors", {name: delta})
        write_sparse(tmp_path / f"s{tag}.safetensors", {name: delta * (delta.abs() > 1)})
    a, b, sa, sb = (tmp_path / f"{tag}.safetensors" for tag in ("a", "b", "sa", "sb"))
    calls = "\n".join([
        f"run('extract', 'extract.task_vector={a}', 'out={tmp_path / 'e'}')",
        f"run('overlap', '{a}', '{b}', 'out={tmp_path / 'o'}')",
        f"run('merge', '{sa}', '{sb}', 'out={tmp_path / 'm'}')",
        f"run('info', '--verify', '{tmp_path / 'e' / 'mask.safetensors'}')",
    ])
    dense = f"run('merge', '{a}', '{b}', 'out={tmp_path / 'd'}')"  # then, in the same process
    artifact_stages, with_dense = imported_by(calls, dense, cwd=tmp_path)
    assert artifact_stages == ([], False)
    assert (tmp_path / "m" / "merged.safetensors").is_file() and (tmp_path / "e" / "mask.safetensors").is_file()
    assert with_dense[0] == []
