"""lota as users install it: a wheel built from the tracked files of the repository (what a fresh clone
holds), installed with --no-deps into a directory of its own next to this environment's dependencies, and
run from outside the checkout. The wheel must carry the configs, and its `lota` must compose every stage and
run calibrate -> extract -> sparse-train."""

from __future__ import annotations

import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest

from conftest import ROOT, tiny_overrides
from lota_cli import ARTIFACT_FORMAT, __version__
from lota_cli.testing import OFFLINE_ENV

pytestmark = pytest.mark.slow  # a wheel built and installed, the pipeline run through it


def _tracked_files(root: Path) -> list[str]:
    try:
        listed = subprocess.run(["git", "ls-files", "-z"], cwd=root, capture_output=True, check=True).stdout
    except (OSError, subprocess.CalledProcessError):
        pytest.skip("not a git checkout: cannot tell which files a clone would hold")
    return [name for name in listed.decode().split("\0") if name]


@pytest.fixture(scope="module")
def installed(tmp_path_factory) -> dict:
    """{'bin': the installed console script, 'site': the install directory, 'wheel': the wheel}."""
    work = tmp_path_factory.mktemp("package")
    clone = work / "clone"
    for name in _tracked_files(ROOT):
        source = ROOT / name
        target = clone / name
        target.parent.mkdir(parents=True, exist_ok=True)
        if source.is_symlink():
            target.symlink_to(source.readlink())
        elif source.is_file():  # a tracked file deleted in the working tree is not there to copy
            shutil.copy2(source, target)
    pip = [sys.executable, "-m", "pip", "-q", "--disable-pip-version-check"]
    subprocess.run([*pip, "wheel", "--no-deps", "--no-build-isolation", "-w", str(work / "dist"), str(clone)],
                   check=True, capture_output=True)
    (wheel,) = (work / "dist").glob("lota_cli-*.whl")
    site = work / "site"
    subprocess.run([*pip, "install", "--no-deps", "--no-index", "--target", str(site), str(wheel)],
                   check=True, capture_output=True)
    return {"bin": site / "bin" / "lota", "site": site, "wheel": wheel, "cwd": work}


def run(installed: dict, *args, env: dict | None = None) -> subprocess.CompletedProcess:
    """The installed `lota`, with the install directory first on the path and the checkout nowhere on it."""
    env = {**OFFLINE_ENV, "PYTHONPATH": str(installed["site"]), **(env or {})}
    return subprocess.run([str(installed["bin"]), *map(str, args)], capture_output=True, text=True, env=env,
                          cwd=installed["cwd"])


def test_wheel_carries_the_configs(installed):
    names = zipfile.ZipFile(installed["wheel"]).namelist()
    yamls = [n for n in names if n.startswith("lota_cli/conf/") and n.endswith(".yaml")]
    expected = [p.relative_to(ROOT).as_posix() for p in (ROOT / "lota_cli" / "conf").rglob("*.yaml")]
    assert sorted(yamls) == sorted(expected) and len(yamls) > 20
    assert "lota_cli/native/merge.c" in names  # the merge kernels' source, compiled on first use
    assert installed["wheel"].name == f"lota_cli-{__version__}-py3-none-any.whl"


def test_installed_lota_is_the_wheel_and_composes_every_stage(installed):
    where = subprocess.run([sys.executable, "-c", "import lota_cli; print(lota_cli.__file__)"], text=True,
                           capture_output=True, env={**OFFLINE_ENV, "PYTHONPATH": str(installed["site"])},
                           cwd=installed["cwd"]).stdout.strip()
    assert Path(where).is_relative_to(installed["site"])
    assert run(installed, "--version").stdout.strip() == f"lota {__version__} (artifact format {ARTIFACT_FORMAT})"
    for stage in ("calibrate", "extract", "sparse-train", "lotto", "merge", "overlap", "export", "eval"):
        composed = run(installed, stage, "--cfg", "job")
        assert composed.returncode == 0 and "out:" in composed.stdout, composed.stderr
    helped = run(installed, "merge", "--help")  # every stage's help: test_cli.py, on the checkout
    assert helped.returncode == 0 and helped.stdout.startswith("lota merge: ") and "ties" in helped.stdout
    preset = run(installed, "eval", "conf=gsm8k", "--cfg", "job")
    assert preset.returncode == 0 and "name: gsm8k" in preset.stdout, preset.stderr


def test_installed_lota_runs_the_tiny_pipeline(installed, tiny_model, tmp_path):
    def stage(*args) -> list[Path]:
        result = run(installed, *args)
        assert result.returncode == 0, result.stderr[-3000:]
        return [Path(line) for line in result.stdout.splitlines()]

    (task_vector,) = stage("calibrate", *tiny_overrides(tiny_model, tmp_path / "cal", **{"train.max_steps": 2}))
    (mask,) = stage("extract", f"extract.task_vector={task_vector}", f"out={tmp_path / 'ext'}")
    (delta,) = stage("sparse-train", *tiny_overrides(tiny_model, tmp_path / "st", **{
        "train.max_steps": 2, "sparse_train.mask": mask}))
    assert delta == tmp_path / "st" / "sparse_delta.safetensors" and delta.is_file()
    # into a model: the installed wheel's merge kernels are built from its own merge.c (in a fresh cache)
    merged = run(installed, "merge", delta, f"output_model={tmp_path / 'merged'}", f"out={tmp_path / 'mg'}",
                 env={"LOTA_CACHE": str(tmp_path / "cache")})
    assert merged.returncode == 0, merged.stderr[-3000:]
    assert list((tmp_path / "cache" / "native").glob("merge-*.so")) and "numpy" not in merged.stderr
