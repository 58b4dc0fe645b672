"""A quantized frozen base (model.quantize=nf4|int8, bitsandbytes): the sparse layers over it are exact against
plain torch over the dequantized weight, keep no dequantized copy for backward, and every stage that allows a
quantized base runs on the tiny model; what cannot work is refused in one line before anything loads."""

from __future__ import annotations

import importlib.util
import json
import math

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from conftest import DATA, losses, random_positions, refused, saved_weights, tiny_overrides, write_dense
from lota_cli.artifacts import Artifact
from lota_cli.config import ModelConfig
from lota_cli.models import (add_delta, fingerprint, frozen_weight, load_model, model_saved_fingerprint,
                             quantized_layers, weight_shape)
from lota_cli.testing import in_process, paths
from lota_cli.training import attach_sparse

# skipped without bitsandbytes, found without importing it: its import (5 s, torch's compiler with it) would be
# paid at collection by every worker, including those that never run this file
pytestmark = pytest.mark.skipif(importlib.util.find_spec("bitsandbytes") is None,
                                reason="bitsandbytes is not installed (make install adds it)")
QUANTIZE = ("nf4", "int8")


@pytest.fixture(scope="module")
def loaded(tiny_model):
    """The tiny model loaded in full precision and each quantized way."""
    return {q: load_model(ModelConfig(path=str(tiny_model), quantize=q))[0] for q in (None, *QUANTIZE)}


def _dequantized(layer) -> torch.Tensor:
    """bitsandbytes' own dequantization of a layer's weight, as plain torch computes with it."""
    import bitsandbytes.functional as bnbf

    weight = layer.weight
    if type(weight).__name__ == "Params4bit":
        return bnbf.dequantize_4bit(weight.data, weight.quant_state).float()
    return bnbf.int8_vectorwise_dequant(weight.data, weight.SCB).float()


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_a_quantized_base_has_the_fingerprints_and_shapes_of_its_checkpoint(loaded, quantize):
    full, model = loaded[None], loaded[quantize]
    layers = quantized_layers(model)
    assert len(layers) == 14  # 7 linear layers in each of 2 blocks; the embeddings and lm_head stay float
    assert fingerprint(model) == fingerprint(full)
    assert model_saved_fingerprint(model) == model_saved_fingerprint(full)
    for name, layer in layers:
        assert weight_shape(layer.weight) == tuple(full.get_submodule(name).weight.shape)
        # the weight computed with is the dequantized one; close to the full-precision weight
        dense = frozen_weight(layer)
        assert torch.equal(dense, _dequantized(layer))
        reference = full.get_submodule(name).weight
        assert (dense - reference).abs().max() <= 0.2 * reference.abs().max()


def test_an_nf4_layer_computes_as_bitsandbytes_does(loaded):
    """lota's forward of a frozen nf4 layer is bitwise bitsandbytes' own on the CPU."""
    import bitsandbytes as bnb

    _, layer = quantized_layers(loaded["nf4"])[0]
    x = torch.randn(5, layer.in_features, generator=torch.Generator().manual_seed(0))
    own = bnb.matmul_4bit(x, layer.weight.t(), bias=layer.bias, quant_state=layer.weight.quant_state)
    assert torch.equal(layer(x), own)


@pytest.mark.parametrize("quantize", QUANTIZE)
def test_sparse_values_over_a_quantized_base_are_exact_against_plain_torch(loaded, quantize, tiny_model):
    """Outside the mask a layer computes with the dequantized weight bitwise; inside with it + the values;
    the values' gradient is the dense dequantized weight's gradient at the mask, and the input's gradient
    that of plain F.linear."""
    model = load_model(ModelConfig(path=str(tiny_model), quantize=quantize))[0]
    layers = dict(quantized_layers(model))
    names = [f"{n}.weight" for n in layers]
    shapes = {n: torch.empty(weight_shape(model.get_parameter(n))) for n in names}
    positions = random_positions(shapes, density=0.1)
    gen = torch.Generator().manual_seed(1)
    values = {n: torch.randn(p.numel(), generator=gen) * 0.01 for n, p in positions.items()}
    trainable = attach_sparse(model, positions, values)
    for name in names:
        layer = model.get_submodule(name.rpartition(".")[0])
        index = positions[name].long()
        base = _dequantized(layer)
        merged = base.reshape(-1).index_add(0, index, values[name]).view_as(base)
        # the identity's rows pick the weight's columns exactly: the merged weight the layer computes with
        seen = layer(torch.eye(layer.in_features)).t().detach()
        outside = torch.ones(base.numel(), dtype=torch.bool)
        outside[index] = False
        assert torch.equal(seen.reshape(-1)[outside], base.reshape(-1)[outside])
        assert torch.equal(seen, merged)

        x = torch.randn(3, 7, layer.in_features, generator=gen, requires_grad=True)
        probe = torch.randn(3, 7, layer.out_features, generator=gen)
        (layer(x) * probe).sum().backward()
        x_ref = x.detach().clone().requires_grad_(True)
        weight = merged.clone().requires_grad_(True)
        (F.linear(x_ref, weight) * probe).sum().backward()
        torch.testing.assert_close(trainable[name].grad, weight.grad.reshape(-1)[index], rtol=1e-6, atol=1e-7)
        torch.testing.assert_close(x.grad, x_ref.grad, rtol=1e-6, atol=1e-7)


def test_backward_keeps_no_dequantized_weight(tiny_model):
    """What a quantized layer saves for backward, with and without values on it: its input and resident
    tensors (the packed weight, index, values), never a weight-sized float tensor."""
    model = load_model(ModelConfig(path=str(tiny_model), quantize="nf4"))[0]
    (name, layer), *_ = quantized_layers(model)
    numel = layer.in_features * layer.out_features
    for attach in (False, True):
        if attach:
            attach_sparse(model, random_positions({f"{name}.weight": torch.empty(numel)}))
        saved = []

        def pack(tensor):
            saved.append(tensor)
            return tensor

        x = torch.randn(2, layer.in_features, requires_grad=True)
        with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
            layer(x).sum().backward()
        big = [t for t in saved if t.is_floating_point() and t.numel() >= numel]
        assert not big, [(t.dtype, tuple(t.shape)) for t in big]


def test_a_sparse_delta_adds_to_a_quantized_base_and_a_dense_one_is_refused(tiny_model, tmp_path):
    from lota_cli import LotaError
    from lota_cli.inputs import open_artifact
    from conftest import write_sparse

    model = load_model(ModelConfig(path=str(tiny_model), quantize="nf4"))[0]
    name = "model.layers.0.mlp.down_proj.weight"
    layer = model.get_submodule(name.rpartition(".")[0])
    before = frozen_weight(layer)
    delta = torch.zeros(weight_shape(layer.weight))
    delta[0, :5] = torch.arange(1, 6).float()
    sparse = open_artifact(write_sparse(tmp_path / "d.safetensors", {name: delta}, fingerprint(model)))
    add_delta(model, sparse)
    add_delta(model, sparse, scale=0.5)
    assert torch.equal(frozen_weight(layer), before + 1.5 * delta)
    dense = open_artifact(write_dense(tmp_path / "tv.safetensors", {name: delta}, fingerprint(model)))
    with pytest.raises(LotaError, match="cannot be added to the quantized weight"):
        add_delta(model, dense)


# --------------------------------------------------------------------------- the stages


@pytest.mark.slow
def test_qlora_calibration_extract_sparse_train_lotto_merge_and_eval(tiny_model, tmp_path):
    """The QLoRA pipeline on the tiny model: calibrate method=lora over nf4 -> extract -> sparse-train over nf4
    (its exported model is the full-precision base + delta, bitwise the base outside the mask) -> lotto over
    int8 (a disjoint mask, calibrated by LoRA) -> merge into the full-precision base -> eval over nf4 and fp."""
    run = lambda stage, out, **extra: paths(in_process(stage, *tiny_overrides(tiny_model, tmp_path / out, **extra)))
    (task_vector,) = run("calibrate", "cal", **{"model.quantize": "nf4", "method": "lora", "train.max_steps": 4})
    vector = Artifact(task_vector)
    assert vector.kind == "task_vector" and any(vector.dense(n).abs().max() > 0 for n in vector.names)
    assert losses(tmp_path / "cal")[-1] < losses(tmp_path / "cal")[0]
    (mask,) = paths(in_process("extract", f"extract.task_vector={task_vector}", f"out={tmp_path / 'ext'}"))
    delta, tuned = run("sparse-train", "st", **{"model.quantize": "nf4", "sparse_train.mask": mask,
                                                "save_model": "true", "train.max_steps": 4})
    assert losses(tmp_path / "st")[-1] < losses(tmp_path / "st")[0]
    base, written = saved_weights(tiny_model), saved_weights(tuned)
    sparse = Artifact(delta)
    for name, weight in base.items():  # fp base + delta: bitwise the base outside the mask, base + value inside
        if name in sparse.meta.shapes:
            expected = weight.reshape(-1).index_add(0, sparse.indices(name).long(), sparse.values(name)).view_as(weight)
            assert torch.equal(written[name], expected), name
        else:
            assert torch.equal(written[name], weight), name

    (delta_b,) = run("lotto", "lotto", **{"model.quantize": "int8", "lotto.previous": f"[{delta}]",
                                          "train.max_steps": 3, "lotto.calibrate_steps": 3})
    new, old = Artifact(tmp_path / "lotto" / "mask.safetensors"), Artifact(mask)
    assert new.meta.source["calibrate_method"] == "lora"
    for name in new.names:
        assert not (new.mask(name) & old.mask(name)).any(), name
        assert new.mask(name).sum() > 0

    # into the full-precision base, streamed: base + both deltas, saying they trained against quantized bases
    merging = in_process("merge", delta, delta_b, "method=sum", f"output_model={tmp_path / 'merged'}",
                         f"out={tmp_path / 'merge'}")
    assert "trained against the int8 and nf4-quantized base" in merging.stderr
    merged = saved_weights(tmp_path / "merged")
    for name, weight in base.items():
        expected = weight.clone()
        for artifact in (sparse, Artifact(delta_b)):
            if name in artifact.meta.shapes:
                expected.view(-1).index_add_(0, artifact.indices(name).long(), artifact.values(name))
        torch.testing.assert_close(merged[name], expected, rtol=0, atol=1e-7)
    scores = {}
    for quantize in ("nf4", None):  # the adapters over the quantized base, and over the full-precision one
        extra = [f"model.quantize={quantize}"] if quantize else []
        (results,) = paths(in_process("eval", f"model.path={tiny_model}", *extra,
                                      f"tasks.gsm8k.eval_data_files={DATA['arith_test']}",
                                      f"eval.deltas=[{delta},{delta_b}]", "eval.max_examples=4", "eval.generate=false",
                                      f"out={tmp_path / f'eval-{quantize}'}"))
        scores[quantize] = json.loads(results.read_text())["tasks"]["gsm8k"]["nll"]
    assert np.isfinite(list(scores.values())).all() and scores["nf4"] != scores[None]


@pytest.mark.parametrize("stage, extra, needles", [
    ("calibrate", {"model.quantize": "nf4"}, ("method=fft", "method=lora")),
    ("calibrate", {"model.quantize": "nf4", "method": "lora", "dist.engine": "fsdp"},
     ("dist.engine=fsdp", "single or ddp")),
    ("calibrate", {"model.quantize": "int8", "method": "lora", "dist.engine": "zero3"}, ("dist.engine=zero3",)),
    ("calibrate", {"model.quantize": "nf3"}, ("model.quantize", "nf4")),
    ("sparse-train", {"model.quantize": "nf4", "model.gguf_file": "m.gguf", "sparse_train.mask": "m"},
     ("GGUF",)),
    ("lotto", {"model.quantize": "nf4", "lotto.calibrate_method": "fft", "lotto.previous": "[a]"},
     ("lotto.calibrate_method=lora",)),
])
def test_what_cannot_work_over_a_quantized_base_is_refused_before_loading(tiny_model, tmp_path, stage, extra, needles):
    out = tmp_path / "out"
    refused(in_process(stage, *tiny_overrides(tiny_model, out, **extra), check=False), stage, *needles)
    assert _written(out) == []


def _written(out) -> list[str]:
    """What a run left in its out directory beyond its log, lock and Hydra's record of the config."""
    return sorted(p.name for p in out.iterdir() if p.name not in {".hydra", ".lota.lock", "lota.log"}) \
        if out.exists() else []


def test_extract_and_a_dense_delta_over_a_quantized_base_are_refused(tiny_model, tmp_path):
    from lota_cli.models import fingerprint as fp

    full = load_model(ModelConfig(path=str(tiny_model)))[0]
    out = tmp_path / "out"
    refused(in_process("extract", "extract.source=weights", f"model.path={tiny_model}", "model.quantize=nf4",
                       f"out={out}", check=False), "extract", "model.quantize=nf4")
    name = "model.layers.0.mlp.down_proj.weight"
    vector = write_dense(tmp_path / "tv.safetensors", {name: torch.ones(full.get_parameter(name).shape)}, fp(full))
    refused(in_process("eval", f"model.path={tiny_model}", "model.quantize=nf4", f"eval.deltas=[{vector}]",
                       f"tasks.gsm8k.eval_data_files={DATA['arith_test']}", f"out={out}", check=False),
            "eval", "dense", "quantized")
    assert _written(out) == []


@pytest.mark.dist
def test_ddp_over_an_nf4_base_trains_like_one_process(tiny_model, tmp_path):
    """QLoRA calibration and sparse-train over nf4 on 2 processes (lota's own launch, DDP over gloo) against 1,
    at the same global batch: the same task vector and sparse delta to float tolerance."""
    from lota_cli.testing import lota
    from safetensors.torch import load_file

    small = {"task.max_examples": 32, "train.max_steps": 3, "train.batch_size": 4, "train.grad_accum": 2,
             "model.quantize": "nf4"}
    (task_vector,) = paths(in_process("calibrate", *tiny_overrides(tiny_model, tmp_path / "cal", method="lora",
                                                                    **small)))
    (mask,) = paths(in_process("extract", f"extract.task_vector={task_vector}", f"out={tmp_path / 'ext'}"))
    one = {"sparse_train.mask": mask, **small}
    (delta,) = paths(in_process("sparse-train", *tiny_overrides(tiny_model, tmp_path / "st", **one)))
    two = {"dist": "ddp", "dist.num_processes": 2}
    (delta_two,) = paths(lota("sparse-train", *tiny_overrides(tiny_model, tmp_path / "st2", **one, **two),
                              env={"OMP_NUM_THREADS": "1"}))
    left, right = load_file(delta), load_file(delta_two)
    assert left.keys() == right.keys()
    diff = max(float((left[k].double() - right[k].double()).abs().max()) for k in left if left[k].is_floating_point())
    print(f"\nnf4 sparse-train, 2 vs 1 process: max abs difference {diff:.2e}")
    assert diff < 1e-6
    assert losses(tmp_path / "st2") == pytest.approx(losses(tmp_path / "st"), rel=1e-5)


# --------------------------------------------------------------------------- lota plan


def _peak_rss(*args) -> int:
    """Peak RSS in bytes of `lota ARGS` run in a fresh process (its own VmHWM, read as it ends)."""
    import subprocess
    import sys

    from lota_cli.testing import OFFLINE_ENV

    script = ("import sys\nfrom lota_cli import cli\ntry:\n    cli.main(sys.argv[1:])\nexcept SystemExit as e:\n"
              "    assert not e.code, e.code\nfor line in open('/proc/self/status'):\n"
              "    if line.startswith('VmHWM'):\n        print('@@', int(line.split()[1]) * 1024)\n")
    result = subprocess.run([sys.executable, "-c", script, *map(str, args)], capture_output=True, text=True,
                            env={**OFFLINE_ENV, "OMP_NUM_THREADS": "1"})
    assert result.returncode == 0, result.stderr[-3000:]
    return int(next(line for line in result.stdout.splitlines() if line.startswith("@@")).split()[1])


def test_plan_counts_the_base_and_the_trained_entries_as_loaded(tiny_model, loaded, tmp_path):
    """plan.json's base is the bytes of the weights as loaded (full precision and quantized), and its trained
    parts 20 B an entry at the density asked (AdamW)."""
    for quantize in (None, "nf4", "int8"):
        extra = [f"model.quantize={quantize}"] if quantize else []
        (path,) = paths(in_process("plan", f"model.path={tiny_model}", *extra, "plan.density=0.25",
                                   f"out={tmp_path / str(quantize)}"))
        plan = json.loads(path.read_text())
        single = plan["engines"]["single"]["devices"]["1"]
        model = loaded[quantize]
        held = sum(t.numel() * t.element_size() for t in model.state_dict().values())
        assert abs(single["base"] - held) <= 0.01 * held, (quantize, single["base"], held)
        k = math.ceil(0.25 * plan["selected_parameters"])
        assert single["values"] + single["gradients"] + single["optimizer"] == 20 * k
        assert ("zero3" in plan["engines"]) == (quantize is None)  # a quantized base trains replicated only
        # split over devices: zero2 the gradients and state, zero3 everything trained and the base
        zero3 = plan["engines"].get("zero3", {}).get("devices", {}).get("2")
        if zero3:
            assert zero3["base"] == single["base"] / 2 and zero3["optimizer"] == single["optimizer"] / 2


@pytest.mark.slow
@pytest.mark.parametrize("quantize", ["nf4"])  # float32: make bench's memory part, on a 226M-selected model
def test_plan_is_within_15_percent_of_a_measured_peak(tiny_model, tmp_path, quantize):
    extra = {"model.quantize": quantize} if quantize else {}
    (task_vector,) = paths(in_process("calibrate", *tiny_overrides(tiny_model, tmp_path / "cal", **{
        "train.max_steps": 1, "method": "lora", **extra})))
    (mask,) = paths(in_process("extract", f"extract.task_vector={task_vector}", f"out={tmp_path / 'ext'}"))
    settings = {"train.max_steps": 2, "train.batch_size": 4, "task.max_length": 128, **extra}
    measured = _peak_rss("sparse-train", *tiny_overrides(tiny_model, tmp_path / "st", **settings,
                                                         **{"sparse_train.mask": mask}))
    (path,) = paths(in_process("plan", *tiny_overrides(tiny_model, tmp_path / "plan", **settings),
                               "plan.density=0.1"))
    planned = json.loads(path.read_text())["engines"]["single"]["devices"]["1"]["total"]
    print(f"\nsparse-train over {quantize or 'float32'}: planned {planned / 2**20:.0f} MiB, "
          f"measured {measured / 2**20:.0f} MiB")
    assert 0.85 <= planned / measured <= 1.15


def test_adamw8bit_keeps_a_quarter_of_adamws_state_and_steps_like_it():
    """optim=adamw8bit: bitsandbytes' AdamW8bit on the CPU, 1-byte moments for a tensor of >= 4,096 entries,
    a step close to torch's AdamW (8-bit moments are not exact), decoupled weight decay passed through."""
    from lota_cli.config import OptimConfig, TrainConfig
    from lota_cli.training import make_optimizer

    gen = torch.Generator().manual_seed(0)
    values = {name: torch.nn.Parameter(torch.zeros(10_000)) for name in ("8bit", "fp32")}
    train = TrainConfig(lr=1e-3, weight_decay=0.1)
    eight = make_optimizer([values["8bit"]], train, OptimConfig(name="adamw8bit"))
    full = make_optimizer([values["fp32"]], train, OptimConfig(name="adamw"))
    for _ in range(10):
        grad = torch.randn(10_000, generator=gen)
        for p, optimizer in ((values["8bit"], eight), (values["fp32"], full)):
            p.grad = grad.clone()
            optimizer.step()
    state = eight.state[values["8bit"]]
    assert state["state1"].dtype == state["state2"].dtype == torch.uint8
    assert eight.param_groups[0]["weight_decay"] == 0.1
    # 8-bit moments round each step's update by a few percent of it: the run stays within 10% of AdamW's
    relative = float((values["8bit"] - values["fp32"]).detach().norm() / values["fp32"].detach().norm())
    print(f"\nadamw8bit vs adamw after 10 steps: relative difference {relative:.4f}")
    assert relative < 0.1


@pytest.mark.slow
def test_sparse_train_over_nf4_with_adamw8bit(tiny_model, tmp_path):
    out = tmp_path / "st"
    (task_vector,) = paths(in_process("calibrate", *tiny_overrides(tiny_model, tmp_path / "cal", **{
        "train.max_steps": 1})))
    (mask,) = paths(in_process("extract", f"extract.task_vector={task_vector}", f"out={tmp_path / 'ext'}"))
    (delta,) = paths(in_process("sparse-train", *tiny_overrides(tiny_model, out, **{
        "model.quantize": "nf4", "optim": "adamw8bit", "sparse_train.mask": mask})))
    assert losses(out)[-1] < losses(out)[0]
    refused(in_process("sparse-train", *tiny_overrides(tiny_model, tmp_path / "z", **{
        "optim.name": "adamw8bit", "dist.engine": "zero2", "sparse_train.mask": mask}), check=False),
        "sparse-train", "optim.name=adamw8bit", "dist.engine=zero2")
