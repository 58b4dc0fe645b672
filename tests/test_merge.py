"""lota merge: the merging methods on hand-worked tensors, the streaming stage, and its refusals."""

from __future__ import annotations

import copy

import pytest
import torch

from lota_cli.ops import _merge_methods as merging
from lota_cli.workflows import _merge as merge_module
from conftest import FP, disjoint_deltas, write_dense, write_sparse
from lota_cli.artifacts import Artifact, save_sparse, stage_meta
from lota_cli.config import MergeConfig
from lota_cli.stages import merge as merge_stage
from lota_cli.testing import in_process

def merged(path) -> dict[str, torch.Tensor]:
    artifact = Artifact(path)
    return {n: artifact.dense(n) for n in artifact.names}


# --------------------------------------------------------------------------- methods, worked by hand

A = torch.tensor([3.0, -1.0, 2.0, 0.5])
B = torch.tensor([-2.0, 4.0, -1.0, 1.0])
C = torch.tensor([1.0, 1.0, -5.0, 0.1])


def test_top_k_is_exact_and_breaks_ties_by_position():
    # |C| = [1, 1, 5, 0.1]: the top 2 are 5 and one of the tied 1s, the first one (position 0)
    assert merging.top_k(C, 0.5).tolist() == [1.0, 0.0, -5.0, 0.0]
    assert merging.top_k(C, 1.0).tolist() == C.tolist()
    assert merging.top_k(C, 0.1).tolist() == [0.0, 0.0, 0.0, 0.0]  # round(0.4) = 0 entries


@pytest.mark.parametrize("signed_zeros", [False, True])
@pytest.mark.parametrize("held", [0.05, 0.2, 0.3])  # fewer, exactly as many, more nonzeros than k = 0.2 n
def test_top_k_of_a_sparse_input_is_the_kth_value_selection(held, signed_zeros):
    """A sparse input with at most k nonzeros skips the k-th value search; the result is the same, bit for bit,
    also with -0.0 entries (which the search keeps in some places)."""
    gen = torch.Generator().manual_seed(7)
    delta = torch.randn(1000, generator=gen) * (torch.rand(1000, generator=gen) < held)
    delta[delta == 0] = 0.0
    if signed_zeros:
        delta[torch.arange(0, 1000, 13)] *= -0.0
    if held == 0.2:
        delta = torch.zeros(1000).index_put_((torch.randperm(1000, generator=gen)[:200],), torch.randn(200) + 5)
    k = 200
    mag = delta.abs()
    threshold = mag.kthvalue(1000 - k + 1).values
    keep = mag > threshold
    keep[(mag == threshold).nonzero().reshape(-1)[:k - int(keep.count_nonzero())]] = True
    expected = torch.where(keep, delta, torch.zeros(()))
    assert torch.equal(merging.top_k(delta, 0.2).view(torch.int32), expected.view(torch.int32))


def test_ties_by_hand():
    # density 0.5 keeps 2 of 4 per input: A -> [3, 0, 2, 0], B -> [-2, 4, 0, 0], C -> [1, 0, -5, 0]
    # summed [2, 4, -3, 0] elects signs [+, +, -, none]
    # entry 0: positives 3 (A), 1 (C) -> mean 2 (B's -2 disagrees); entry 1: 4 (B); entry 2: -5 (C; A's 2
    # disagrees); entry 3: nothing kept -> 0
    assert merging.ties([A, B, C], 0.5).tolist() == [2.0, 4.0, -5.0, 0.0]
    # scale 0.5 applies after merging
    assert merging.merge("ties", [A, B, C], density=0.5, scale=0.5).tolist() == [1.0, 2.0, -2.5, 0.0]


def test_ties_with_density_one_averages_agreeing_entries():
    # nothing trimmed: sums [2, 4, -4, 1.6] -> signs [+, +, -, +]
    # entry 0: mean(3, 1) = 2; entry 1: mean(4, 1) = 2.5; entry 2: mean(-1, -5) = -3; entry 3: mean(.5, 1, .1)
    out = merging.ties([A, B, C], 1.0)
    assert torch.allclose(out, torch.tensor([2.0, 2.5, -3.0, 1.6 / 3]))


def test_magnitude_by_hand():
    # the same trimmed inputs as for ties, summed: [3-2+1, 4, 2-5, 0] = [2, 4, -3, 0]
    assert merging.magnitude([A, B, C], 0.5).tolist() == [2.0, 4.0, -3.0, 0.0]


def test_task_arithmetic_by_hand():
    # 0.5 * [1, -2] + 2 * [3, 0.5] = [6.5, 0]; times scale 0.5 -> [3.25, 0]
    out = merging.merge("task_arithmetic", [torch.tensor([1.0, -2.0]), torch.tensor([3.0, 0.5])],
                        weights=[0.5, 2.0], scale=0.5)
    assert out.tolist() == [3.25, 0.0]
    assert merging.merge("sum", [A, B]).tolist() == [1.0, 3.0, 1.0, 1.5]


def test_dare_drops_and_rescales():
    ones = torch.ones(100_000)
    out = merging.merge("dare", [ones], density=0.25, name="w", seed=0)
    # each entry is dropped (0) or kept and rescaled by 1 / 0.25 = 4; the expected value stays 1
    assert set(out.unique().tolist()) <= {0.0, 4.0}
    assert abs(out.mean().item() - 1.0) < 0.03
    # deterministic per (seed, tensor name, input); another name or seed draws another mask
    assert torch.equal(out, merging.merge("dare", [ones], density=0.25, name="w", seed=0))
    assert not torch.equal(out, merging.merge("dare", [ones], density=0.25, name="v", seed=0))
    assert not torch.equal(out, merging.merge("dare", [ones], density=0.25, name="w", seed=1))
    # density 1 drops nothing: a plain sum
    assert merging.merge("dare", [A, B], density=1.0).tolist() == [1.0, 3.0, 1.0, 1.5]


def test_overlap_stats_by_hand():
    # supports: a at 0, 1, 2, 3; b at 0, 2, 3 -> 3 shared of 4, Jaccard 0.75
    # signs on shared: 0: (+, +) agree, 2: (+, -) conflict, 3: (+, +) agree -> agreement 2/3, conflicts 1/3
    stats = merging.delta_overlap(torch.tensor([3.0, -1.0, 2.0, 0.5]), torch.tensor([1.0, 0.0, -3.0, 2.0]))
    assert (stats.a, stats.b, stats.shared, stats.union) == (4, 3, 3, 4)
    assert stats.jaccard == 0.75
    assert stats.sign_agreement == pytest.approx(2 / 3)
    assert stats.sign_conflicts == pytest.approx(1 / 3)
    # masks carry no signs; nothing held at all has no Jaccard index
    mask = merging.overlap(torch.tensor([True, False]), torch.tensor([True, True]))
    assert (mask.jaccard, mask.sign_agreement) == (0.5, None)
    assert merging.overlap(torch.zeros(2, dtype=torch.bool), torch.zeros(2, dtype=torch.bool)).jaccard is None
    assert (stats + mask).agree is None and (stats + mask).shared == 4


# --------------------------------------------------------------------------- the stage, in process

def test_stage_writes_a_task_vector_and_dare_draws_per_tensor(tmp_path):
    # dare's drop mask of a tensor depends on its name only, not on which tensors come before it
    p = {"model.layers.0.mlp.up_proj.weight": torch.randn(4, 6), "model.layers.1.mlp.up_proj.weight": torch.randn(6, 4)}
    both = write_dense(tmp_path / "both.safetensors", p)
    second = dict(list(p.items())[1:])
    one = write_dense(tmp_path / "one.safetensors", second)
    merged_both = merged(merge_stage.run(MergeConfig(inputs=[str(both)], out=str(tmp_path), method="dare",
                                                     density=0.5), tmp_path / "a")[0])
    merged_one = merged(merge_stage.run(MergeConfig(inputs=[str(one)], out=str(tmp_path), method="dare",
                                                    density=0.5), tmp_path / "b")[0])
    for name in second:
        assert torch.equal(merged_both[name], merged_one[name])
        assert set(merged_both[name].reshape(-1).tolist()) <= {0.0} | set((p[name] * 2).reshape(-1).tolist())

    artifact = Artifact(tmp_path / "a" / "merged.safetensors")
    assert (artifact.kind, artifact.meta.stage, artifact.meta.base_fingerprint) == ("task_vector", "merge", FP)
    assert artifact.meta.parents == [Artifact(both).meta.fingerprint]


@pytest.mark.parametrize("method,dtype", [("sum", "float32"), ("sum", "bfloat16"), ("task_arithmetic", "float16")])
def test_native_merge_to_a_task_vector_equals_the_torch_path(tmp_path, monkeypatch, caplog, method, dtype):
    """sum and task_arithmetic of sparse deltas into a task vector run in the native kernel (adding to zeros,
    no torch) with the values and the overlap counts of the torch path, also across regions of a tensor."""
    import logging

    from lota_cli import native

    if native.kernels() is None:
        pytest.skip("no C compiler to build the kernels")
    monkeypatch.setattr(merge_module, "REGION_BYTES", 4096)  # several regions a tensor
    gen = torch.Generator().manual_seed(7)
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.1.self_attn.o_proj.weight"]
    inputs = []
    for i in range(3):
        deltas = {n: torch.where(torch.rand(50, 70, generator=gen) < 0.2, torch.randn(50, 70, generator=gen), 0.0)
                  for n in names}
        inputs.append(str(write_sparse(tmp_path / f"{i}.safetensors", deltas)))
    options = {"method": method, "dtype": dtype, "scale": 0.75}
    if method == "task_arithmetic":
        options["weights"] = [0.5, -1.25, 2.0]
    results, logs, used = [], [], []
    for kernels in (native.kernels, lambda: None):
        monkeypatch.setattr(native, "kernels", kernels)
        caplog.clear()
        with caplog.at_level(logging.INFO, "lota_cli.workflows"):
            out = merge_stage.run(MergeConfig(inputs=inputs, out=str(tmp_path), **options),
                                  tmp_path / kernels.__name__.strip("<>"))
        artifact = Artifact(out[0])
        results.append({n: artifact.raw(n)[:] for n in names})
        logs.append(sorted(r.getMessage() for r in caplog.records if "Jaccard" in r.getMessage()))
        used.append(native.kernels() is not None)
    ours, theirs = results
    assert used == [True, False]
    for name in names:
        assert ours[name].dtype == theirs[name].dtype == getattr(torch, dtype)
        assert torch.equal(ours[name], theirs[name]) and ours[name].count_nonzero() > 0, name
    assert logs[0] == logs[1] and len(logs[0]) == 3


def test_stage_ties_on_sparse_and_dense_inputs(tmp_path):
    name = "model.layers.0.self_attn.q_proj.weight"
    a = write_sparse(tmp_path / "a.safetensors", {name: A.view(2, 2)})
    b = write_dense(tmp_path / "b.safetensors", {name: B.view(2, 2)})
    c = write_sparse(tmp_path / "c.safetensors", {name: C.view(2, 2)})
    out = merge_stage.run(MergeConfig(inputs=[str(a), str(b), str(c)], out=str(tmp_path), method="ties",
                                      density=0.5, dtype="bfloat16"), tmp_path / "out")
    artifact = Artifact(out[0])
    assert artifact.raw(name)[:].dtype == torch.bfloat16
    assert artifact.dense(name).reshape(-1).tolist() == [2.0, 4.0, -5.0, 0.0]  # as in test_ties_by_hand



@pytest.mark.parametrize("method", ["ties", "magnitude"])
@pytest.mark.parametrize("density", [0.05, 0.15, 0.5])  # below, near and above the inputs' own 0.1-0.2
@pytest.mark.parametrize("negative_zero", [False, True])
def test_sparse_inputs_merge_at_their_union_as_the_dense_tensors(tmp_path, monkeypatch, method, density,
                                                                 negative_zero):
    """ties and magnitude over sparse deltas see only the union of their positions (never densified), with
    the same result bit for bit as on the dense deltas: also with ties at the trim's threshold, and with a
    -0.0 among the values (whose fate depends on every zero's position: that tensor is merged densely)."""
    gen = torch.Generator().manual_seed(5)
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in range(3)]
    deltas = []
    for seed in range(3):
        delta = {}
        for i, name in enumerate(names):
            keep = torch.rand(40, 50, generator=gen) < 0.1 + 0.05 * i
            values = torch.randint(-4, 5, (40, 50), generator=gen).float() / 8  # many ties at any threshold
            delta[name] = torch.where(keep, values, 0.0)
        deltas.append(delta)
    paths = [write_sparse(tmp_path / f"{i}.safetensors", d) for i, d in enumerate(deltas)]
    if negative_zero:  # a stored value of -0.0: a position held, but nothing added
        artifact = Artifact(paths[0])
        held = artifact.values(names[1]).clone()
        held[3] = -0.0
        mask = artifact.bits(names[1])
        paths[0] = save_sparse(tmp_path / "z.safetensors", stage_meta("sparse_delta", "test", {}, "base", FP),
                               {n: (40, 50) for n in names},
                               {n: ("bits", mask if n == names[1] else Artifact(paths[0]).bits(n)) for n in names},
                               {n: held if n == names[1] else Artifact(paths[0]).values(n) for n in names})
    dense_inputs = [merged(p) for p in paths]
    calls = []
    real = merging.merge
    monkeypatch.setattr(merge_module, "merge", lambda *args, **kw: calls.append(args[1][0].numel()) or real(*args, **kw))
    out = merge_stage.run(MergeConfig(inputs=[str(p) for p in paths], out=str(tmp_path), method=method,
                                      density=density), tmp_path / "out")
    got = merged(out[0])
    for name in names:
        expected = merging.merge(method, [d[name] for d in dense_inputs], density=density)
        assert torch.equal(got[name], expected) and torch.equal(torch.signbit(got[name]), torch.signbit(expected))
    dense_calls = [n for n in calls if n == 40 * 50]
    assert len(dense_calls) == (1 if negative_zero else 0), calls  # the others at the union alone
@pytest.fixture(scope="module")
def base(tiny_base):
    return tiny_base


def test_sum_of_disjoint_sparse_deltas_equals_applying_them_in_turn(tmp_path, base):
    from lota_cli.models import add_delta

    model_cfg, fp, shapes, model = base
    da, db = disjoint_deltas(shapes)
    a = write_sparse(tmp_path / "a.safetensors", da, fp, model_cfg)
    b = write_sparse(tmp_path / "b.safetensors", db, fp, model_cfg)
    [path] = merge_stage.run(MergeConfig(inputs=[str(a), str(b)], out=str(tmp_path)), tmp_path / "out")

    in_turn = copy.deepcopy(model)
    add_delta(in_turn, Artifact(a))
    add_delta(in_turn, Artifact(b))
    at_once = copy.deepcopy(model)
    add_delta(at_once, Artifact(path))
    for name in shapes:
        assert torch.equal(in_turn.get_parameter(name), at_once.get_parameter(name)), name


# --------------------------------------------------------------------------- the CLI

@pytest.mark.parametrize("case", ["base", "shape", "missing"])
def test_merge_refuses_mismatched_inputs(tmp_path, case):
    names = ["model.layers.0.mlp.up_proj.weight", "model.layers.0.mlp.down_proj.weight"]
    deltas = {n: torch.randn(3, 5) for n in names}
    a = write_dense(tmp_path / "a.safetensors", deltas)
    other, fp = dict(deltas), FP
    if case == "base":
        fp = "b" * 64
    elif case == "shape":
        other[names[1]] = torch.randn(5, 3)
    else:
        del other[names[1]]
    b = write_sparse(tmp_path / "b.safetensors", other, fp)

    out = tmp_path / "out"
    result = in_process("merge", a, b, f"out={out}", check=False)
    assert result.returncode != 0
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("lota merge: error:")
    assert ("fingerprint" if case == "base" else repr(names[1])) in lines[0]
    assert result.stdout == ""
    assert not list(out.glob("*.safetensors*")) and not list(out.glob(".*.tmp"))


def test_merge_to_a_model_equals_base_plus_both_deltas(tmp_path, base):
    from transformers import AutoModelForCausalLM

    model_cfg, fp, shapes, base_model = base
    da, db = disjoint_deltas(shapes, seed=1, density=0.3)
    db = {n: d + 0.001 for n, d in db.items()}  # dense, and overlapping a's entries
    a = write_sparse(tmp_path / "a.safetensors", da, fp, model_cfg)
    b = write_dense(tmp_path / "b.safetensors", db, fp, model_cfg)

    result = in_process("merge", a, b, "method=sum", f"output_model={tmp_path / 'merged'}", f"out={tmp_path / 'out'}")
    assert result.stdout.strip() == str(tmp_path / "merged")
    assert "Jaccard" in result.stderr and "sign conflicts" in result.stderr

    merged_model = AutoModelForCausalLM.from_pretrained(tmp_path / "merged")
    expected = dict(base_model.named_parameters())
    for name, param in merged_model.named_parameters():
        want = expected[name] + da[name] + db[name] if name in shapes else expected[name]
        assert torch.allclose(param, want, atol=1e-6), name
