"""The merge-method registry: outputs bitwise equal to the pre-registry formulas, MergeConfig's refusals of
fields the chosen method ignores, and a method registered at run time working end to end."""

from __future__ import annotations

import hashlib
import itertools
import logging
from pathlib import Path

import pytest
import torch

from lota_cli import LotaError
from lota_cli.ops import _merge_methods as merging
from lota_cli.artifacts import Artifact, save_dense, stage_meta
from lota_cli.config import MergeConfig
from lota_cli.stages import merge as merge_stage
from lota_cli.testing import lota

ROOT = Path(__file__).resolve().parents[1]


# --------------------------------------------------------------------------- the formulas before the registry
# A frozen copy of lota_cli/merging.py's methods as they were before dispatch went through the registry
# (top_k rewritten on a stable sort, so it is checked independently too): the same float operations in the
# same order, so equality below is bitwise.

def ref_top_k(delta, density):
    flat = delta.reshape(-1)
    k = round(density * flat.numel())
    order = torch.sort(flat.abs(), descending=True, stable=True).indices  # equal magnitudes: first position first
    keep = torch.zeros(flat.numel(), dtype=torch.bool)
    keep[order[:k]] = True
    return torch.where(keep, flat, torch.zeros((), dtype=flat.dtype)).view_as(delta)


def ref_sum(deltas):
    out = deltas[0].clone()
    for delta in deltas[1:]:
        out += delta
    return out


def ref_merge(method, deltas, *, name="", weights=None, scale=1.0, density=1.0, seed=0):
    if method == "sum":
        out = ref_sum(deltas)
    elif method == "task_arithmetic":
        out = torch.zeros_like(deltas[0])
        for weight, delta in zip([1.0] * len(deltas) if weights is None else weights, deltas):
            out.add_(delta, alpha=weight)
    elif method == "ties":
        trimmed = [ref_top_k(d, density) for d in deltas]
        elected = torch.sign(ref_sum(trimmed))
        total, count = torch.zeros_like(deltas[0]), torch.zeros_like(deltas[0])
        for t in trimmed:
            agrees = (torch.sign(t) == elected) & (t != 0)
            total += torch.where(agrees, t, torch.zeros((), dtype=t.dtype))
            count += agrees
        out = total / count.clamp(min=1)
    elif method == "dare":
        out = torch.zeros_like(deltas[0])
        for i, delta in enumerate(deltas):
            if density >= 1.0:
                out += delta
                continue
            digest = hashlib.sha256(f"{seed}:{name}:{i}".encode()).digest()
            gen = torch.Generator().manual_seed(int.from_bytes(digest[:8], "little") & (2**63 - 1))
            keep = torch.rand(delta.shape, generator=gen) < density
            out += torch.where(keep, delta, torch.zeros((), dtype=delta.dtype)) / density
    elif method == "magnitude":
        out = ref_sum([ref_top_k(d, density) for d in deltas])
    else:
        raise AssertionError(method)
    return out.mul_(scale) if scale != 1.0 else out


def random_deltas(n, shape, dtype, seed):
    """n random deltas; half their entries rounded to one decimal so that equal magnitudes (top_k's ties) and
    exact zeros occur."""
    gen = torch.Generator().manual_seed(seed)
    out = []
    for _ in range(n):
        d = torch.randn(shape, generator=gen, dtype=torch.float64)
        coarse = torch.rand(shape, generator=gen) < 0.5
        out.append(torch.where(coarse, (d * 10).round() / 10, d).to(dtype))
    return out


def bitwise_equal(a, b):
    """Same dtype, shape and bits (torch.equal alone would take -0.0 for 0.0)."""
    as_int = {torch.float32: torch.int32, torch.float64: torch.int64}[a.dtype]
    return a.dtype == b.dtype and a.shape == b.shape and torch.equal(a.view(as_int), b.view(as_int))


BUILTIN = ("sum", "task_arithmetic", "ties", "dare", "magnitude")


def test_the_builtin_methods_are_registered_in_order():
    assert tuple(merging.METHODS) == BUILTIN
    assert {m: s.reads for m, s in merging.METHODS.items()} == {
        "sum": (), "task_arithmetic": ("weights",), "ties": ("density",), "dare": ("density", "seed"),
        "magnitude": ("density",)}
    assert merging.readers() == {"weights": ["task_arithmetic"], "density": ["ties", "dare", "magnitude"],
                                 "seed": ["dare"]}


@pytest.mark.parametrize("method", BUILTIN)
def test_merge_is_bitwise_the_pre_registry_formula(method):
    cases = itertools.product([1, 2, 3], [(7,), (6, 5)], [torch.float32, torch.float64], [0.1, 0.5, 1.0],
                              [1.0, 0.7])
    for case, (n, shape, dtype, density, scale) in enumerate(cases):
        deltas = random_deltas(n, shape, dtype, seed=case)
        originals = [d.clone() for d in deltas]
        weights = [0.5, -1.25, 2.0][:n]
        fields = {"weights": weights, "density": density, "seed": case % 3}
        got = merging.merge(method, deltas, name=f"t{case}", scale=scale, **fields)
        want = ref_merge(method, [d.clone() for d in deltas], name=f"t{case}", scale=scale,
                         **{k: v for k, v in fields.items() if k in merging.METHODS[method].reads})
        assert bitwise_equal(got, want), (method, n, shape, dtype, density, scale)
        assert all(torch.equal(d, o) for d, o in zip(deltas, originals))  # the inputs are left alone


@pytest.mark.parametrize("method", BUILTIN)
def test_merge_defaults_are_unchanged(method):
    """Fields a caller leaves out keep the old merge()'s defaults: weights 1, density 1, seed 0."""
    deltas = random_deltas(3, (4, 4), torch.float32, seed=1)
    assert bitwise_equal(merging.merge(method, deltas, name="w"), ref_merge(method, deltas, name="w"))


@pytest.mark.parametrize("method", BUILTIN)
def test_stage_output_is_bitwise_the_pre_registry_formula(tmp_path, method, caplog):
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.q_proj.weight"]
    per_input = [dict(zip(names, random_deltas(2, (5, 3), torch.float32, seed=10 * i))) for i in range(3)]
    paths = []
    for i, deltas in enumerate(per_input):
        meta = stage_meta("task_vector", "test", {}, "base", "a" * 64)
        paths.append(str(save_dense(tmp_path / f"in{i}.safetensors", meta, deltas)))
    fields = {"weights": [0.5, 2.0, -1.0], "density": 0.5, "seed": 3}
    fields = {k: v for k, v in fields.items() if k in merging.METHODS[method].reads}
    with caplog.at_level(logging.INFO, logger="lota_cli.workflows"):
        [path] = merge_stage.run(MergeConfig(inputs=paths, out=str(tmp_path), method=method, scale=0.5, **fields),
                                 tmp_path / "out")
    artifact = Artifact(path)
    for name in names:
        want = ref_merge(method, [d[name] for d in per_input], name=name, scale=0.5, **fields)
        assert bitwise_equal(artifact.dense(name), want), name
    # the log line shows exactly the fields this method reads
    [line] = [r.getMessage() for r in caplog.records if r.getMessage().startswith("merging ")]
    assert line.endswith(f"with method={method}" + "".join(f" {k}={v}" for k, v in fields.items()))


# --------------------------------------------------------------------------- MergeConfig's checks

def config(**kw):
    return MergeConfig(inputs=["a.safetensors", "b.safetensors"], out="out", **kw)


@pytest.mark.parametrize("method", BUILTIN)
def test_every_method_accepts_the_defaults(method):
    assert config(method=method).method == method


@pytest.mark.parametrize("method, key, value, readers", [
    ("sum", "density", 0.5, "method=ties, dare or magnitude"),
    ("task_arithmetic", "seed", 3, "method=dare"),
    ("ties", "weights", [1.0, 2.0], "method=task_arithmetic"),
    ("magnitude", "seed", 1, "method=dare"),
    ("dare", "weights", [1.0, 2.0], "method=task_arithmetic"),
])
def test_a_field_the_method_ignores_is_refused(method, key, value, readers):
    with pytest.raises(LotaError) as err:
        config(method=method, **{key: value})
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith(f"{key}={value} only applies to {readers}, not method={method}; drop {key}")


def test_fields_the_method_reads_are_accepted():
    assert config(method="task_arithmetic", weights=[1.0, 0.5]).weights == [1.0, 0.5]
    assert (config(method="dare", density=0.5, seed=7).seed) == 7
    assert config(method="ties", density=0.3).density == 0.3
    assert config(method="sum", scale=2.0).scale == 2.0  # scale applies to every method


def test_the_other_checks_remain():
    with pytest.raises(LotaError, match=r"method='mean' is not valid; choose one of sum, task_arithmetic, ties, "
                                        r"dare, magnitude$"):
        config(method="mean")
    with pytest.raises(LotaError, match=r"density=0.0 must be in \(0, 1\]"):
        config(method="ties", density=0.0)
    with pytest.raises(LotaError, match="weights has 1 values for 2 inputs"):
        config(method="task_arithmetic", weights=[1.0])
    with pytest.raises(LotaError, match="at least one input"):
        MergeConfig(inputs=[], out="out")


def test_the_cli_prints_the_refusal_on_one_line(tmp_path):
    result = lota("merge", "a.safetensors", "method=sum", "density=0.5", f"out={tmp_path / 'out'}", check=False,
                  cwd=ROOT, timeout=120)
    assert result.returncode == 1
    assert result.stderr.strip() == ("lota merge: error: density=0.5 only applies to method=ties, dare or magnitude, "
                                     "not method=sum; drop density or use one of those methods")


# --------------------------------------------------------------------------- registering a method

@pytest.fixture
def negate():
    """A method `negate` (minus the sum, scaled by density), registered for one test and removed after."""
    @merging.merge_method("negate", reads=("density",), help="minus density times the sum (a test method)")
    def negate_fn(deltas, density=1.0):
        return merging.sum_deltas(deltas).mul_(-density)

    try:
        yield negate_fn
    finally:
        del merging.METHODS["negate"]


def test_a_registered_method_is_usable_and_configurable(negate):
    deltas = [torch.tensor([1.0, -2.0]), torch.tensor([0.5, 0.5])]
    assert merging.merge("negate", deltas, density=0.5, weights=None, seed=0, scale=2.0).tolist() == [-1.5, 1.5]
    assert config(method="negate", density=0.5).density == 0.5
    with pytest.raises(LotaError, match=r"^seed=1 only applies to method=dare, not method=negate"):
        config(method="negate", seed=1)
    with pytest.raises(LotaError, match=r"only applies to method=ties, dare, magnitude or negate, not method=sum"):
        config(method="sum", density=0.5)
    assert merging.methods_help().splitlines()[-1] == (
        "negate           minus density times the sum (a test method); reads density")


def test_a_removed_method_is_gone():
    assert "negate" not in merging.METHODS
    with pytest.raises(LotaError, match="method='negate' is not valid"):
        config(method="negate")
    with pytest.raises(ValueError, match="unknown merge method 'negate'"):
        merging.merge("negate", [torch.zeros(1)])


def test_registration_refuses_a_mismatch_and_a_duplicate():
    with pytest.raises(TypeError, match=r"'bad'.*\['density', 'seed'\].*reads=\('density',\)"):
        merging.merge_method("bad", reads=("density",), help="")(lambda deltas, density=1.0, seed=0: deltas[0])
    with pytest.raises(ValueError, match="'ties' is already registered"):
        merging.merge_method("ties", reads=("density",), help="")(merging.ties)
    assert tuple(merging.METHODS) == BUILTIN


def test_merge_refuses_a_field_no_method_reads():
    with pytest.raises(TypeError, match="no merge method reads: desnity"):
        merging.merge("ties", [torch.ones(2)], desnity=0.5)


def test_methods_help_has_one_line_per_method():
    lines = merging.methods_help().splitlines()
    assert [line.split()[0] for line in lines] == list(BUILTIN)
    assert lines[3].endswith("(Yu et al. 2024); reads density, seed")
    assert lines[0].endswith("; reads no fields")
