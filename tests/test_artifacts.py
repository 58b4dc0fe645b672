"""Artifact format: metadata round trip, atomic writes, refusal of damaged, foreign or wrong-kind files."""

import json

import pytest
import torch

from lota_cli import LotaError
from lota_cli.artifacts import Artifact, ArtifactWriter, Meta, save_dense, save_sparse
from lota_cli.tensors import encode_positions, pack_bits


def _meta(kind="task_vector", base="f" * 64):
    return Meta(kind=kind, base_model="tiny", base_fingerprint=base, stage="test", seed=3,
                config={"x": 1}, parents=["p" * 64])


def test_dense_round_trip_with_metadata(tmp_path):
    tensors = {"a.weight": torch.randn(3, 4), "b.weight": torch.randn(5, 2).to(torch.bfloat16)}
    path = save_dense(tmp_path / "tv.safetensors", _meta(), tensors)
    art = Artifact(path)
    assert art.kind == "task_vector" and art.meta.seed == 3 and art.meta.parents == ["p" * 64]
    assert art.meta.config == {"x": 1} and len(art.meta.fingerprint) == 64 and art.meta.fingerprint != "0" * 64
    assert art.names == ["a.weight", "b.weight"] and art.shape("b.weight") == (5, 2)
    assert torch.equal(art.dense("a.weight"), tensors["a.weight"])
    assert torch.equal(art.dense("b.weight", torch.bfloat16), tensors["b.weight"])


def test_sparse_delta_round_trip_both_encodings(tmp_path):
    dense = torch.zeros(2000, dtype=torch.bool)
    dense[::3] = True
    sparse = torch.zeros(2000, dtype=torch.bool)
    sparse[[5, 999]] = True
    positions = {"d.weight": encode_positions(pack_bits(dense), 2000),
                 "s.weight": encode_positions(pack_bits(sparse), 2000)}
    assert positions["d.weight"][0] == "bits" and positions["s.weight"][0] == "idx"
    values = {"d.weight": torch.arange(int(dense.sum()), dtype=torch.float32), "s.weight": torch.tensor([1.5, -2.0])}
    shapes = {"d.weight": (40, 50), "s.weight": (2000,)}
    art = Artifact(save_sparse(tmp_path / "sd.safetensors", _meta("sparse_delta"), shapes, positions, values))
    expected = torch.zeros(2000)
    expected[dense] = values["d.weight"]
    assert torch.equal(art.dense("d.weight").reshape(-1), expected)
    assert art.indices("s.weight").tolist() == [5, 999] and art.dense("s.weight")[999] == -2.0
    assert art.density("s.weight") == 2 / 2000


def test_base_mismatch_is_refused_naming_both(tmp_path):
    art = Artifact(save_dense(tmp_path / "tv.safetensors", _meta(base="a" * 64), {"w": torch.ones(2)}))
    art.check_base("a" * 64, "tiny")
    with pytest.raises(LotaError, match="made from base 'tiny'.*aaaaaaaaaaaa.*'other'.*bbbbbbbbbbbb"):
        art.check_base("b" * 64, "other")


def test_wrong_kind_is_refused(tmp_path):
    mask = save_sparse(tmp_path / "m.safetensors", _meta("mask"), {"w": (8,)},
                       {"w": encode_positions(pack_bits(torch.ones(8, dtype=torch.bool)), 8)})
    with pytest.raises(LotaError, match="is a mask; this stage needs a task_vector"):
        Artifact(mask, kinds=("task_vector",))


def test_failed_write_leaves_nothing(tmp_path):
    target = tmp_path / "tv.safetensors"
    with pytest.raises(RuntimeError):
        with ArtifactWriter(target, _meta(), {"a": (torch.float32, (2,)), "b": (torch.float32, (2,))}) as w:
            w.write("a", torch.ones(2))
            raise RuntimeError("killed mid-write")
    assert list(tmp_path.iterdir()) == []


def test_truncated_and_foreign_files_are_refused(tmp_path):
    path = save_dense(tmp_path / "tv.safetensors", _meta(), {"w": torch.randn(100)})
    data = path.read_bytes()
    (tmp_path / "cut.safetensors").write_bytes(data[:-10])
    with pytest.raises(LotaError, match="truncated"):
        Artifact(tmp_path / "cut.safetensors")
    (tmp_path / "junk.safetensors").write_bytes(b"not a safetensors file at all")
    with pytest.raises(LotaError, match="not a readable safetensors"):
        Artifact(tmp_path / "junk.safetensors")
    from safetensors.torch import save_file

    save_file({"w": torch.ones(2)}, tmp_path / "plain.safetensors")
    with pytest.raises(LotaError, match="not a lota artifact"):
        Artifact(tmp_path / "plain.safetensors")
    with pytest.raises(LotaError, match="not found"):
        Artifact(tmp_path / "missing.safetensors")


def test_header_is_plain_safetensors(tmp_path):
    """Any safetensors reader can open a lota artifact."""
    from safetensors.torch import load_file

    path = save_dense(tmp_path / "tv.safetensors", _meta(), {"w": torch.arange(4.0)})
    assert torch.equal(load_file(path)["w"], torch.arange(4.0))
    header_len = int.from_bytes(path.read_bytes()[:8], "little")
    header = json.loads(path.read_bytes()[8:8 + header_len])
    assert json.loads(header["__metadata__"]["lota"])["kind"] == "task_vector"


@pytest.mark.parametrize("dtype", ["float32", "float16"])
def test_numpy_bfloat16_rounding_and_fingerprint_are_torchs(dtype):
    """stored.bfloat16_bits rounds as torch's .to(bfloat16) does (to nearest, ties to even, overflow to Inf,
    subnormals, NaN), so a checkpoint fingerprinted from its numpy views matches the loaded model's."""
    import numpy as np

    from lota_cli.tensors import bfloat16_bits, fingerprint_of

    gen = torch.Generator().manual_seed(3)
    bits = torch.randint(0, 2**31, (200_000,), generator=gen, dtype=torch.int64).to(torch.int32)
    values = bits.view(torch.float32) if dtype == "float32" else torch.randn(200_000, generator=gen).half()
    special = torch.tensor([0.0, -0.0, 1.0 + 2**-8, 1.0 + 3 * 2**-8, 3.3895e38, -3.3895e38, float("inf"),
                            -float("inf"), 1e-40, -1e-45, 65504.0]).to(values.dtype)
    values = torch.cat([special, values])
    finite = torch.isfinite(values) | torch.isinf(values)  # torch writes NaN differently by path: not compared
    ours = torch.from_numpy(bfloat16_bits(values.numpy()).view(np.int16))
    theirs = values.to(torch.bfloat16).view(torch.int16)
    assert torch.equal(ours[finite], theirs[finite])
    assert (bfloat16_bits(np.array([np.nan], dtype=np.float32)) == 0x7FC0).all()
    values = values[finite]
    shape = (400, values.numel() // 400)
    flat = values[:shape[0] * shape[1]]
    assert fingerprint_of([("w", shape, flat.numpy())]) == fingerprint_of([("w", shape, flat)])
