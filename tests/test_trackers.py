"""train.log_with: a short calibrate run's numbers in TensorBoard's event files and in an offline W&B run
directory, read back with each tool's own reader, equal to out/metrics.jsonl; lotto's phases apart."""

from __future__ import annotations

import importlib.util
import json
import struct
from pathlib import Path

import pytest

from conftest import tiny_overrides
from lota_cli.training import Metrics
from lota_cli.testing import lota, paths

pytestmark = pytest.mark.slow  # real runs with TensorBoard and W&B writing as they train
SCALARS = {"loss", "lr", "grad_norm", "tokens_per_s", "step_s"}  # what metrics.py logs per step (on CPUs)
STEPS = 2


def _calibrate(tiny_model: Path, out: Path, tracker: str, env: dict | None = None) -> list[dict]:
    """A 2-step calibrate run logging to `tracker`; returns its metrics.jsonl records."""
    written = paths(lota("calibrate", *tiny_overrides(tiny_model, out, **{"train.max_steps": STEPS,
                                                                          "train.log_with": tracker}), env=env))
    assert written == [out / "task_vector.safetensors"]  # stdout: only the path, nothing from the tracker
    records = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [r["step"] for r in records] == list(range(1, STEPS + 1)) and set(records[0]) == SCALARS | {"step"}
    return records


@pytest.mark.skipif(importlib.util.find_spec("tensorboard") is None, reason="tensorboard is not installed")
def test_tensorboard_event_files_hold_every_logged_scalar(tiny_model, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    records = _calibrate(tiny_model, tmp_path, "tensorboard")
    events = EventAccumulator(str(tmp_path / "lota"))
    events.Reload()
    assert set(events.Tags()["scalars"]) == SCALARS  # no "step": it is the x axis
    for name in SCALARS:
        logged = events.Scalars(name)
        assert [e.step for e in logged] == [r["step"] for r in records]
        assert [e.value for e in logged] == pytest.approx([r[name] for r in records], rel=1e-6)  # float32
    [hparams] = (tmp_path / "lota").glob("*/hparams.yml")  # the run's settings
    assert "train.max_steps: 2" in hparams.read_text() and f"model.path: {tiny_model}" in hparams.read_text()


def _wandb_records(path: Path) -> list:
    """The protobuf records of a .wandb file: LevelDB's log format (a 7-byte file header, then 32 KiB blocks of
    chunks, each a 7-byte header: crc32, length, type 1 whole / 2 first / 3 middle / 4 last)."""
    from wandb.proto import wandb_internal_pb2

    data, pos, chunks, records = path.read_bytes(), 7, b"", []
    assert data[:4] == b":W&B"
    while pos + 7 <= len(data):
        if 32768 - pos % 32768 < 7:  # a block's tail too short for a header is padding
            pos += 32768 - pos % 32768
            continue
        _, length, kind = struct.unpack("<IHB", data[pos:pos + 7])
        chunks, pos = chunks + data[pos + 7:pos + 7 + length], pos + 7 + length
        if kind in (1, 4):
            records.append(wandb_internal_pb2.Record.FromString(chunks))
            chunks = b""
    return records


@pytest.mark.skipif(importlib.util.find_spec("wandb") is None, reason="wandb is not installed")
def test_wandb_offline_run_directory_lands_in_out_with_every_logged_scalar(tiny_model, tmp_path):
    out = tmp_path / "out"
    records = _calibrate(tiny_model, out, "wandb", env={"WANDB_MODE": "offline"})
    [run_file] = (out / "wandb").glob("offline-run-*/run-*.wandb")
    logged = _wandb_records(run_file)
    history = [{"/".join(i.nested_key) or i.key: json.loads(i.value_json) for i in r.history.item}
               for r in logged if r.WhichOneof("record_type") == "history"]
    assert [h["_step"] for h in history] == [r["step"] for r in records]
    for h, r in zip(history, records):
        assert {k: h[k] for k in SCALARS} == pytest.approx({k: r[k] for k in SCALARS})
    config = {i.key: json.loads(i.value_json) for r in logged if r.WhichOneof("record_type") == "config"
              for i in r.config.update}
    assert config["train.max_steps"] == STEPS and config["model.path"] == str(tiny_model)
    assert any(r.WhichOneof("record_type") == "exit" for r in logged)  # finished, not cut off


class Accelerator:
    """What Metrics asks of accelerate's: whether this is the main process, and the trackers' log."""

    is_main_process = True

    def __init__(self):
        self.logged = []

    def log(self, values, step):
        self.logged.append(values)


def test_a_phase_names_its_scalars_apart(tmp_path):
    """lotto trains twice in one run (calibrate, then sparse-train): the trackers keep the phases apart."""
    acc = Accelerator()
    for phase in (None, "calibrate"):
        Metrics(tmp_path, acc, every=1, steps=1, phase=phase).record(1, loss=2.0, lr=0.1, grad_norm=1.0,
                                                                     tokens_per_s=9.0, step_s=0.5)
    plain, phased = acc.logged
    assert SCALARS <= set(plain) and set(phased) == {f"calibrate/{name}" for name in plain}


def test_a_fresh_run_replaces_the_metrics_of_an_earlier_run_and_a_resumed_one_appends(tmp_path):
    acc = Accelerator()
    step = {"loss": 2.0, "lr": 0.1, "grad_norm": 1.0, "tokens_per_s": 9.0, "step_s": 0.5}
    Metrics(tmp_path, acc, every=1, steps=2).record(1, **step)
    Metrics(tmp_path, acc, every=1, steps=2, fresh=False).record(2, **step)
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1, 2]
    Metrics(tmp_path, acc, every=1, steps=2).record(1, **step)
    assert [json.loads(line)["step"] for line in open(tmp_path / "metrics.jsonl")] == [1]


def test_a_tracker_that_is_not_installed_is_refused_at_start(monkeypatch):
    """accelerate would leave it out without a word, and the run would log nothing."""
    from lota_cli import LotaError
    from lota_cli.config import TrainConfig

    monkeypatch.setattr(importlib.util, "find_spec", lambda name, *args: None)
    with pytest.raises(LotaError, match=r"train.log_with=wandb: the wandb package is not installed; pip install wandb"):
        TrainConfig(log_with="wandb")
