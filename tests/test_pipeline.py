"""The CLI end to end on the tiny model over generated GSM8K- and Alpaca-shaped files:
calibrate -> extract -> sparse-train, then a LoTTO chain, with the invariants the method rests on."""

from __future__ import annotations

import json

import pytest
import torch

from conftest import changed_inside, saved_weights, tiny_overrides
from lota_cli.artifacts import Artifact
from lota_cli.testing import in_process, paths


@pytest.fixture(scope="module")
def pipeline(tiny_model, tmp_path_factory):
    root = tmp_path_factory.mktemp("pipeline")
    cal = in_process("calibrate", *tiny_overrides(tiny_model, root / "cal", **{"train.max_steps": 8}))
    (task_vector,) = paths(cal)
    ext = in_process("extract", f"extract.task_vector={task_vector}", f"out={root / 'ext'}")
    (mask,) = paths(ext)
    st = in_process("sparse-train", *tiny_overrides(tiny_model, root / "st", **{
        "sparse_train.mask": mask, "save_model": "true", "train.weight_decay": 0.1, "train.max_steps": 8}))
    delta, model_dir = paths(st)
    return {"root": root, "task_vector": task_vector, "mask": mask, "delta": delta, "model": model_dir,
            "cal_stdout": cal.stdout}


def test_every_stage_prints_only_its_paths_and_artifacts_pass_info(pipeline):
    assert pipeline["cal_stdout"] == f"{pipeline['task_vector']}\n"
    for key, kind in (("task_vector", "task_vector"), ("mask", "mask"), ("delta", "sparse_delta")):
        info = json.loads(in_process("info", "--json", pipeline[key]).stdout)
        assert info["kind"] == kind and info["parameters"] > 0
    info = json.loads(in_process("info", "--json", pipeline["mask"]).stdout)
    assert info["bytes_per_param"] < 0.3 and abs(info["density"] - 0.1) < 1e-3


def test_loss_falls_in_calibrate_and_sparse_train(pipeline):
    for stage in ("cal", "st"):
        losses = [json.loads(line)["loss"] for line in open(pipeline["root"] / stage / "metrics.jsonl")]
        assert len(losses) == 8 and losses[-1] < losses[0], losses


def test_mask_holds_exactly_k_of_the_largest_entries(pipeline):
    tv, mask = Artifact(pipeline["task_vector"]), Artifact(pipeline["mask"])
    total = sum(mask.numel(n) for n in mask.names)
    k = round(total - 0.9 * total)
    chosen = [tv.dense(n).reshape(-1).abs()[mask.mask(n)] for n in mask.names]
    rest = [tv.dense(n).reshape(-1).abs()[~mask.mask(n)] for n in mask.names]
    assert sum(c.numel() for c in chosen) == k
    assert torch.cat(chosen).min() >= torch.cat(rest).max()
    assert all("norm" not in n and "embed" not in n and "lm_head" not in n for n in mask.names)


def test_sparse_trained_model_differs_from_base_only_inside_the_mask(pipeline, tiny_model):
    """Bitwise, with weight decay on: frozen entries never move."""
    fractions = changed_inside(saved_weights(tiny_model), saved_weights(pipeline["model"]), Artifact(pipeline["mask"]))
    assert fractions and all(f > 0.9 for f in fractions.values()), fractions  # the masked entries did train


def test_lotto_chain_of_three_tasks_has_disjoint_masks(pipeline, tiny_model, data):
    root = pipeline["root"]
    b = in_process("lotto", *tiny_overrides(tiny_model, root / "lotto_b", **{
        "task": "alpaca", "task.data_files": data["reverse_train"], "task.eval_data_files": "null",
        "lotto.previous": f"[{pipeline['delta']}]", "save_model": "true"}))
    delta_b, model_b = paths(b)
    assert "overlap with" in b.stderr and ": 0 entries" in b.stderr
    c = in_process("lotto", *tiny_overrides(tiny_model, root / "lotto_c", **{
        "lotto.previous": f"[{pipeline['delta']},{delta_b}]", "lotto.sparsity": 0.8}))
    (delta_c,) = paths(c)
    chain = [Artifact(p) for p in (pipeline["delta"], delta_b, delta_c)]
    # the new mask says what ranked its entries, as extract's do: calibration with the earlier adapters left out
    assert Artifact(root / "lotto_c" / "mask.safetensors").meta.source == {
        "name": "task_vector", "stage": "lotto", "calibrate_steps": 6, "calibrate_method": "fft",
        "excluded": [chain[0].meta.fingerprint, chain[1].meta.fingerprint]}
    for name in chain[0].names:
        masks = [a.mask(name) for a in chain]
        assert not (masks[0] & masks[1]).any() and not (masks[0] & masks[2]).any() and not (masks[1] & masks[2]).any()
    assert abs(chain[2].density() - 0.2) < 1e-3
    # the chain's model differs from the first task's model only inside the new mask
    changed_inside(saved_weights(pipeline["model"]), saved_weights(model_b), chain[1])
    # capacity: 30% of the entries are taken, so 80% more cannot fit
    full = in_process("lotto", *tiny_overrides(tiny_model, root / "lotto_d", **{
        "lotto.previous": f"[{pipeline['delta']},{delta_b},{delta_c}]", "lotto.sparsity": 0.2}), check=False)
    assert full.returncode == 1 and "are left after 3 earlier adapters" in full.stderr
    assert not (root / "lotto_d" / "sparse_delta.safetensors").exists()


def test_hydra_behaviour(pipeline, tmp_path):
    cfg = in_process("calibrate", "conf=gsm8k", "--cfg", "job")
    assert "SmolLM2-135M" in cfg.stdout and "max_steps: 200" in cfg.stdout
    bad = in_process("calibrate", "train.no_such_key=1", check=False)
    assert bad.returncode != 0 and "no_such_key" in bad.stderr
    sweep = in_process("extract", "-m", f"extract.task_vector={pipeline['task_vector']}", "extract.sparsity=0.5,0.99",
                 f"out={tmp_path}")
    masks = paths(sweep)
    assert len(masks) == 2 and [round(Artifact(m).density(), 2) for m in masks] == [0.5, 0.01]
    assert "calibrate" in in_process("--help").stdout


def test_bad_sparsity_is_one_line_and_writes_nothing(pipeline, tmp_path):
    bad = in_process("extract", f"extract.task_vector={pipeline['task_vector']}", "extract.sparsity=1.5",
               f"out={tmp_path}", check=False)
    assert bad.returncode == 1 and "extract.sparsity=1.5" in bad.stderr and "Traceback" not in bad.stderr
    assert not (tmp_path / "mask.safetensors").exists()
    wrong = in_process("extract", f"extract.task_vector={pipeline['mask']}", f"out={tmp_path}", check=False)
    assert wrong.returncode == 1 and "is a mask; this stage needs a task_vector" in wrong.stderr


def test_lora_baseline_writes_its_merged_low_rank_delta(tiny_model, tmp_path):
    result = in_process("calibrate", *tiny_overrides(tiny_model, tmp_path, **{
        "method": "lora", "lora.r": 2, "train.max_steps": 3}))
    (task_vector,) = paths(result)
    tv = Artifact(task_vector)
    assert tv.kind == "task_vector" and tv.meta.config["method"] == "lora"
    for name in tv.names:
        delta = tv.dense(name)
        assert delta.abs().sum() > 0, name  # the adapters trained
        assert torch.linalg.matrix_rank(delta.double(), atol=1e-6) <= 2, name  # rank r, beside fp32 rounding (~1e-8)


def test_a_normal_run_warns_of_nothing_deprecated(pipeline, tiny_model, tmp_path):
    """Calibrate (dense with gradient checkpointing, and LoRA) and sparse-train call no library API that is
    deprecated: transformers 5 renamed gradient_checkpointing_enable, and PEFT's own deprecated call is lota's
    to keep quiet."""
    import warnings

    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        in_process("calibrate", *tiny_overrides(tiny_model, tmp_path / "fft", **{
            "train.max_steps": 1, "model.gradient_checkpointing": "true"}))
        in_process("calibrate", *tiny_overrides(tiny_model, tmp_path / "lora", **{
            "train.max_steps": 1, "method": "lora", "lora.r": 2}))
        in_process("sparse-train", *tiny_overrides(tiny_model, tmp_path / "st", **{
            "train.max_steps": 1, "sparse_train.mask": pipeline["mask"]}))
    deprecated = [f"{w.filename}:{w.lineno}: {w.message}" for w in caught
                  if issubclass(w.category, (DeprecationWarning, FutureWarning))]
    assert deprecated == []
