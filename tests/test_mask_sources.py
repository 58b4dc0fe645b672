"""lota extract's mask sources (extract.source) on the tiny model: every source keeps exactly k entries under
either scope and records itself; weights and gradient masks are the top-k of |w| and of accumulated |grad|
computed here independently; random masks are reproducible by seed and uniform; bad combinations are refused
in one line."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F

from conftest import DATA, make_task_vector
from lota_cli.artifacts import Artifact
from lota_cli.config import ExtractConfig, ExtractOptions, ModelConfig, ParamsConfig, TaskConfig
from lota_cli.workflows import gradient_batches, random_scores
from lota_cli.ops import k_for
from lota_cli.models import fingerprint, load_model, select_params
from lota_cli.testing import in_process, paths

GRADIENT = {"extract.gradient_batches": 3, "extract.batch_size": 4, "task.max_length": 128, "task.max_examples": 64}


@pytest.fixture(scope="module")
def extract(tiny_model, tmp_path_factory):
    """extract(source, scope="global", **overrides) -> the mask Artifact, each distinct run made once."""
    made = {}

    def run(source: str, scope: str = "global", **overrides) -> Artifact:
        key = (source, scope, tuple(sorted(overrides.items())))
        if key not in made:
            args = {"extract.source": source, "extract.scope": scope, "model.path": tiny_model,
                    "task.data_files": DATA["arith_train"], **overrides}
            if source == "gradient":
                args = {**GRADIENT, **args}
            if source == "task_vector":
                args.pop("extract.source")  # the default
                path = tmp_path_factory.mktemp("tv") / "tv.safetensors"
                args["extract.task_vector"] = make_task_vector(tiny_model, path)
            out = tmp_path_factory.mktemp(source)
            (mask,) = paths(in_process("extract", *(f"{k}={v}" for k, v in args.items()), f"out={out}"))
            made[key] = Artifact(mask, kinds=("mask",))
        return made[key]

    return run


@pytest.fixture(scope="module")
def base(tiny_model):
    """The tiny model in eval mode, its selected tensors' names, and its tokenizer."""
    model, tokenizer = load_model(ModelConfig(path=str(tiny_model)))
    return model.eval(), select_params(model, ParamsConfig()), tokenizer


def chosen(mask: Artifact) -> dict[str, torch.Tensor]:
    return {n: mask.mask(n) for n in mask.names}


def assert_top_k(mask: Artifact, scores: dict[str, torch.Tensor], rtol: float = 0.0) -> None:
    """The mask holds the entries of largest score: each chosen score >= every other one (within rtol of the
    k-th largest, for scores summed in another order); with rtol=0 strictly greater, so no tie decides it."""
    bits = chosen(mask)
    assert list(bits) == list(scores)
    inside = torch.cat([scores[n].reshape(-1)[bits[n]] for n in bits])
    outside = torch.cat([scores[n].reshape(-1)[~bits[n]] for n in bits])
    assert inside.numel() == k_for(0.9, inside.numel() + outside.numel())
    if rtol:
        threshold = torch.cat([inside, outside]).topk(inside.numel()).values[-1]
        assert inside.min() >= threshold * (1 - rtol) and outside.max() <= threshold * (1 + rtol)
    else:
        assert inside.min() > outside.max()


@pytest.mark.parametrize("scope", ["global", "per_tensor"])
@pytest.mark.parametrize("source", ["task_vector", "weights", "random", "gradient"])
def test_every_source_keeps_exactly_k_and_records_itself(extract, base, source, scope):
    model, names, _ = base
    mask = extract(source, scope)
    counts = {n: int(b.sum()) for n, b in chosen(mask).items()}
    total = sum(mask.numel(n) for n in counts)
    if scope == "global":
        assert sum(counts.values()) == k_for(0.9, total)
    else:
        assert counts == {n: k_for(0.9, mask.numel(n)) for n in counts}
    expected = {"task_vector": {"name": "task_vector"}, "weights": {"name": "weights"},
                "random": {"name": "random", "seed": 0},
                "gradient": {"name": "gradient", "batches": 3, "batch_size": 4, "seed": 0, "task": "gsm8k"}}
    assert mask.meta.source == expected[source] and mask.meta.sparsity == 0.9
    assert mask.meta.base_fingerprint == fingerprint(model)
    if source == "task_vector":  # the task vector's base, and the task vector as parent
        assert len(mask.meta.parents) == 1 and list(counts) == ["model.layers.0.mlp.down_proj.weight"]
    else:  # the model's base, no parent, every selected tensor
        assert mask.meta.parents == [] and list(counts) == names and mask.meta.base_checkpoint


def test_weights_mask_is_the_top_k_of_the_base_weights(extract, base):
    model, names, _ = base
    weights = {n: model.get_parameter(n).detach().abs() for n in names}
    assert_top_k(extract("weights"), weights)
    per_tensor = extract("weights", "per_tensor")
    for n in names:  # each tensor its own top 10%
        inside, outside = weights[n].reshape(-1)[chosen(per_tensor)[n]], weights[n].reshape(-1)[~chosen(per_tensor)[n]]
        assert inside.min() > outside.max(), n


def test_gradient_mask_is_the_top_k_of_accumulated_absolute_gradients(extract, base, tiny_model):
    """|dL/dw| summed over the same batches, here by plain autograd on every parameter with the mean
    target-token cross-entropy of each batch."""
    model, names, tokenizer = base
    task = TaskConfig(data_files=str(DATA["arith_train"]), max_length=128, max_examples=64)
    cfg = ExtractConfig(extract=ExtractOptions(source="gradient", gradient_batches=3, batch_size=4),
                        model=ModelConfig(path=str(tiny_model)), task=task)
    batches = list(gradient_batches(cfg, tokenizer))
    assert len(batches) == 3 and all(b["input_ids"].shape[0] == 4 for b in batches)
    sums = {n: torch.zeros(model.get_parameter(n).shape) for n in names}
    for batch in batches:
        model.zero_grad()
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
        F.cross_entropy(logits[:, :-1].flatten(0, 1), batch["labels"][:, 1:].flatten(), ignore_index=-100).backward()
        for n in names:
            sums[n] += model.get_parameter(n).grad.abs()
    model.zero_grad()
    mask = extract("gradient")
    assert_top_k(mask, sums, rtol=1e-4)
    # and not by accident: the weights' mask is far from it
    overlap = sum(int((a & b).sum()) for a, b in zip(chosen(mask).values(), chosen(extract("weights")).values()))
    assert overlap < 0.5 * k_for(0.9, sum(s.numel() for s in sums.values()))


def test_random_mask_is_reproducible_by_seed_and_uniform(extract):
    a, b = chosen(extract("random")), chosen(extract("random", **{"extract.seed": 0}))  # two runs, one seed
    c = chosen(extract("random", **{"extract.seed": 1}))
    assert all(torch.equal(a[n], b[n]) for n in a)
    flat_a, flat_c = torch.cat(list(a.values())), torch.cat(list(c.values()))
    total, k = flat_a.numel(), int(flat_a.sum())
    # two independent uniform k-subsets share about k^2 / total entries
    shared = int((flat_a & flat_c).sum())
    assert abs(shared - k * k / total) < 6 * math.sqrt(k * k / total)
    for n, bits in a.items():  # every tensor at the global density (6 standard deviations of a uniform draw)
        assert abs(float(bits.float().mean()) - k / total) < 6 * math.sqrt(0.1 * 0.9 / bits.numel()), n
    # and no part of the concatenated entries favoured: 32 equal slices each hold about k / 32
    slices = flat_a[:total - total % 32].reshape(32, -1).sum(dim=1).float()
    expected = slices.sum() / 32
    assert ((slices - expected).abs() < 6 * math.sqrt(expected * (1 - 1 / 32))).all(), slices.tolist()


def test_random_scores_depend_on_seed_and_name_not_on_the_other_tensors():
    shapes = {"a.weight": (8, 16), "b.weight": (4, 4)}
    alone = random_scores({"b.weight": (4, 4)}, 3)["b.weight"][:]
    both = random_scores(shapes, 3)
    assert torch.equal(both["b.weight"][:], alone) and torch.equal(both["b.weight"][:], both["b.weight"][:])
    assert not torch.equal(random_scores(shapes, 4)["b.weight"][:], alone)
    assert both["a.weight"][:].shape == (8, 16) and both["a.weight"].get_shape() == [8, 16]


@pytest.mark.parametrize("args, says", [
    ([], "extract.source=task_vector needs extract.task_vector=PATH"),
    (["extract.source=weights", "extract.task_vector=tv.safetensors"],
     "extract.source=weights ranks the base model (model.*), not a task vector; drop extract.task_vector"),
    (["extract.source=gradient", "extract.gradient_batches=0"], "extract.gradient_batches=0 must be > 0"),
    (["extract.source=magnitude"], "extract.source='magnitude' is not valid; choose one of task_vector, weights, "
                                   "random, gradient"),
    (["extract.source=weights", "extract.seed=3"], "extract.seed only applies to extract.source=random or gradient"),
    (["extract.source=random", "extract.gradient_batches=2"],
     "extract.gradient_batches only applies to extract.source=gradient"),
])
def test_bad_combinations_are_refused_in_one_line(args, says, tmp_path):
    failed = in_process("extract", *args, f"out={tmp_path / 'out'}", check=False)
    last = failed.stderr.strip().splitlines()[-1]
    assert failed.returncode == 1 and last.startswith("lota extract: error: ") and says in last, failed.stderr
    assert not (tmp_path / "out" / "mask.safetensors").exists()
