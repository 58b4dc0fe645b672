"""lota overlap: pairwise intersection, Jaccard index and sign agreement, worked out by hand."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from conftest import FP, write_dense, write_sparse
from lota_cli import LotaError
from lota_cli.config import OverlapConfig
from lota_cli.stages import overlap as overlap_stage
from lota_cli.testing import in_process, paths

ROOT = Path(__file__).resolve().parents[1]
L0, L1 = "model.layers.0.mlp.up_proj.weight", "model.layers.1.mlp.up_proj.weight"


def dense(positions: dict[int, float]) -> torch.Tensor:
    """A 2x4 tensor holding `positions` (flat index -> value), zero elsewhere."""
    out = torch.zeros(8)
    for i, v in positions.items():
        out[i] = v
    return out.view(2, 4)


def write(path, kind, deltas, fingerprint=FP):
    if kind == "task_vector":
        return write_dense(path, deltas, fingerprint)
    return write_sparse(path, deltas, fingerprint, kind=kind)


@pytest.fixture
def trio(tmp_path):
    """A mask M, a sparse delta S and a task vector T over two layers (flat positions of a 2x4 tensor):

    layer 0   M {0, 1, 2, 3}   S {2: +1, 3: -1, 4: +2, 5: -2}   T {2: -1, 3: -1, 4: +3}
    layer 1   M {0}            S {0: -1, 1: +1}                 T {0: -.5, 1: -.5}
    """
    m = write(tmp_path / "m.safetensors", "mask", {L0: dense({0: 1, 1: 1, 2: 1, 3: 1}), L1: dense({0: 1})})
    s = write(tmp_path / "s.safetensors", "sparse_delta",
              {L0: dense({2: 1, 3: -1, 4: 2, 5: -2}), L1: dense({0: -1, 1: 1})})
    t = write(tmp_path / "t.safetensors", "task_vector", {L0: dense({2: -1, 3: -1, 4: 3}), L1: dense({0: -.5, 1: -.5})})
    return m, s, t


def check_trio(result: dict, m, s, t) -> None:
    pairs = {(Path(p["a"]).stem, Path(p["b"]).stem): p for p in result["pairs"]}
    assert list(pairs) == [("m", "s"), ("m", "t"), ("s", "t")]

    # M-S: layer 0 shares {2, 3} of {0..5}: 2/6; layer 1 shares {0} of {0, 1}: 1/2; overall 3/8; no signs (mask)
    ms = pairs["m", "s"]
    assert (ms["entries_a"], ms["entries_b"], ms["intersection"], ms["union"]) == (5, 6, 3, 8)
    assert ms["jaccard"] == pytest.approx(3 / 8) and ms["sign_agreement"] is None
    assert ms["per_layer"]["layer 0"]["jaccard"] == pytest.approx(1 / 3)
    assert ms["per_layer"]["layer 1"]["jaccard"] == 0.5

    # M-T: layer 0 shares {2, 3} of {0..4}: 2/5; layer 1 {0} of {0, 1}: 1/2; overall 3/7
    mt = pairs["m", "t"]
    assert (mt["intersection"], mt["union"]) == (3, 7) and mt["sign_agreement"] is None
    assert mt["per_layer"]["layer 0"]["jaccard"] == pytest.approx(2 / 5)

    # S-T: layer 0 shares {2, 3, 4} of {2..5}: 3/4, signs agree at 3 (-,-) and 4 (+,+), not at 2: 2/3
    #      layer 1 shares {0, 1} of {0, 1}: 1, signs agree at 0 (-,-), not at 1: 1/2
    #      overall 5 of 6 shared, signs agree on 3 of 5
    st = pairs["s", "t"]
    assert (st["intersection"], st["union"]) == (5, 6)
    assert st["jaccard"] == pytest.approx(5 / 6) and st["sign_agreement"] == pytest.approx(3 / 5)
    assert st["per_layer"]["layer 0"]["sign_agreement"] == pytest.approx(2 / 3)
    assert st["per_layer"]["layer 1"] == {"entries_a": 2, "entries_b": 2, "intersection": 2, "union": 2,
                                          "jaccard": 1.0, "sign_agreement": 0.5}
    assert [i["entries"] for i in result["inputs"]] == [5, 6, 5]


def run_overlap(inputs, out: Path) -> dict:
    """The stage in-process: it returns the one file it wrote; its JSON is the result."""
    assert overlap_stage.run(OverlapConfig(inputs=list(map(str, inputs)), out=str(out)), out) == [out / "overlap.json"]
    return json.loads((out / "overlap.json").read_text())


def test_overlap_by_hand(tmp_path, trio, capfd):
    result = run_overlap(trio, tmp_path / "out")
    captured = capfd.readouterr()
    assert captured.out == ""  # the stage itself prints nothing on stdout (the CLI prints the path)
    assert "Jaccard" in captured.err  # the table
    check_trio(result, *trio)


def test_a_missing_tensor_holds_nothing(tmp_path):
    a = write(tmp_path / "a.safetensors", "task_vector", {L0: dense({0: 1, 1: 2}), L1: dense({0: 1})})
    b = write(tmp_path / "b.safetensors", "sparse_delta", {L0: dense({1: 3})})
    [pair] = run_overlap([a, b], tmp_path / "out")["pairs"]
    # layer 0: {1} shared of {0, 1}; layer 1: b holds nothing, a holds {0} -> Jaccard 0, agreement undefined
    assert pair["per_layer"]["layer 1"] == {"entries_a": 1, "entries_b": 0, "intersection": 0, "union": 1,
                                            "jaccard": 0.0, "sign_agreement": None}
    assert (pair["intersection"], pair["union"], pair["sign_agreement"]) == (1, 3, 1.0)


def test_per_tensor_counts_with_sizes(tmp_path, trio):
    """Per tensor the pair's counts and the tensor's size: what a chance level per tensor or module needs."""
    pairs = {(Path(p["a"]).stem, Path(p["b"]).stem): p for p in run_overlap(trio, tmp_path / "out")["pairs"]}
    # M-S: L0 shares {2, 3} of {0..5}; L1 shares {0} of {0, 1}; both tensors 2x4
    assert pairs["m", "s"]["per_tensor"] == {
        L0: {"entries_a": 4, "entries_b": 4, "intersection": 2, "union": 6, "jaccard": pytest.approx(1 / 3),
             "sign_agreement": None, "numel": 8},
        L1: {"entries_a": 1, "entries_b": 2, "intersection": 1, "union": 2, "jaccard": 0.5,
             "sign_agreement": None, "numel": 8}}


def test_overlap_refuses_another_base_or_shape(tmp_path):
    a = write(tmp_path / "a.safetensors", "mask", {L0: dense({0: 1})})
    b = write(tmp_path / "b.safetensors", "mask", {L0: dense({0: 1})}, fingerprint="b" * 64)
    c = write(tmp_path / "c.safetensors", "mask", {L0: torch.ones(4, 2)})
    with pytest.raises(LotaError, match="fingerprint"):
        overlap_stage.run(OverlapConfig(inputs=[str(a), str(b)], out=str(tmp_path)), tmp_path / "out")
    with pytest.raises(LotaError, match=L0):
        overlap_stage.run(OverlapConfig(inputs=[str(a), str(c)], out=str(tmp_path)), tmp_path / "out")
    with pytest.raises(LotaError, match="two or more"):
        overlap_stage.run(OverlapConfig(inputs=[str(a)], out=str(tmp_path)), tmp_path / "out")


def test_cli_prints_only_the_path_on_stdout(tmp_path, trio):
    result = in_process("overlap", *trio, f"out={tmp_path / 'out'}")
    assert paths(result) == [tmp_path / "out" / "overlap.json"]
    check_trio(json.loads((tmp_path / "out" / "overlap.json").read_text()), *trio)
    assert "per layer" in result.stderr


def test_layers_in_numeric_order(tmp_path):
    names = [f"model.layers.{i}.mlp.up_proj.weight" for i in (10, 2, 1)]
    a = write(tmp_path / "a.safetensors", "mask", {n: dense({0: 1}) for n in names})
    b = write(tmp_path / "b.safetensors", "mask", {n: dense({1: 1}) for n in names})
    [pair] = run_overlap([a, b], tmp_path / "out")["pairs"]
    assert list(pair["per_layer"]) == ["layer 1", "layer 2", "layer 10"]
    assert pair["jaccard"] == 0.0


def test_overlap_and_info_run_without_torch(trio, tmp_path):
    """The inspecting commands read with numpy alone: torch, transformers and datasets never load, so they start
    in a fraction of a second. The numbers are the hand-worked ones (check_trio)."""
    import os
    import subprocess
    import sys

    out = tmp_path / "out"
    code = ("import sys\nfrom lota_cli import cli\nfor args in (['overlap', *sys.argv[1:4], 'out=' + sys.argv[4]], "
            "['info', '--verify', *sys.argv[1:4]]):\n    try:\n        cli.main(args)\n    except SystemExit as end:\n"
            "        assert not end.code, end.code\n"
            "print([m for m in ('torch', 'transformers', 'datasets', 'safetensors.torch') if m in sys.modules])")
    result = subprocess.run([sys.executable, "-c", code, *map(str, trio), str(out)], capture_output=True, text=True,
                            env={**os.environ, "PYTHONPATH": str(ROOT)}, cwd=tmp_path)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.strip().splitlines()[-1] == "[]"
    check_trio(json.loads((out / "overlap.json").read_text()), *trio)
