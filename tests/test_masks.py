"""Exact streaming top-k selection and the mask encodings."""

import math

import numpy as np
import pytest
import torch

from lota_cli import LotaError, native
from lota_cli.ops._top_k import _select_exact
from lota_cli.tensors import encode_positions, pack_bits, positions_from_bits, unpack_bits
from lota_cli.ops import k_for, top_k_mask


@pytest.fixture(params=["native", "numpy"])
def scan_path(request, monkeypatch):
    """Each pass through the native scan (where the kernels build) and through numpy's, which must agree."""
    if request.param == "numpy":
        monkeypatch.setattr(native, "kernels", lambda: None)
    elif native.kernels() is None:
        pytest.skip("no C compiler to build the kernels")
    return request.param


def _tied_tensors(seed=0):
    gen = torch.Generator().manual_seed(seed)
    return {f"w{i}": torch.randint(-15, 16, (40 + 7 * i, 24), generator=gen).float() for i in range(5)}


def _selected(source, masks):
    return torch.cat([source[n].reshape(-1).abs()[unpack_bits(masks[n], source[n].numel())] for n in source])


@pytest.mark.parametrize("fraction", [0.0005, 0.01, 0.1, 0.5, 0.9, 1.0])
def test_top_k_matches_torch_topk_with_many_ties(fraction):
    source = _tied_tensors()
    total = sum(t.numel() for t in source.values())
    k = max(1, round(fraction * total))
    masks = top_k_mask(source, k)
    chosen = _selected(source, masks)
    reference = torch.cat([t.reshape(-1).abs() for t in source.values()]).topk(k).values
    assert chosen.numel() == k
    assert torch.equal(chosen.sort().values, reference.sort().values)


def test_ties_at_threshold_go_to_the_first_entries(scan_path):
    source = {"a": torch.tensor([[1.0, 2.0], [2.0, 2.0]]), "b": torch.tensor([2.0, 3.0, 2.0])}
    # 3.0 is largest; the 2.0s tie, and the first in (tensor, row-major) order win
    masks = top_k_mask(source, 3)
    assert unpack_bits(masks["a"], 4).tolist() == [False, True, True, False]
    assert unpack_bits(masks["b"], 3).tolist() == [False, True, False]
    masks = top_k_mask(source, 5)
    assert unpack_bits(masks["a"], 4).tolist() == [False, True, True, True]
    assert unpack_bits(masks["b"], 3).tolist() == [True, True, False]


def test_fast_path_and_exact_fallback_agree():
    gen = torch.Generator().manual_seed(1)
    source = {f"t{i}": torch.randn(300, 200, generator=gen) * (i + 1) for i in range(4)}
    total = sum(t.numel() for t in source.values())
    for k in (1, 17, total // 10, total // 2):
        fast = top_k_mask(source, k)
        exact = _select_exact(source, list(source), k, None)
        assert all(np.array_equal(fast[n], exact[n]) for n in source)


def test_excluded_entries_are_never_selected_and_capacity_is_checked(scan_path):
    source = _tied_tensors(2)
    excluded = {n: pack_bits(t.reshape(-1).abs() >= 10) for n, t in source.items()}
    total = sum(t.numel() for t in source.values())
    free = total - sum(int(unpack_bits(b, source[n].numel()).sum()) for n, b in excluded.items())
    masks = top_k_mask(source, free // 2, excluded=excluded)
    for n in source:
        assert not (unpack_bits(masks[n], source[n].numel()) & unpack_bits(excluded[n], source[n].numel())).any()
    assert sum(int(unpack_bits(masks[n], source[n].numel()).sum()) for n in source) == free // 2
    with pytest.raises(LotaError, match="only .* are free"):
        top_k_mask(source, free + 1, excluded=excluded)


def test_nan_in_task_vector_is_refused_with_the_tensor_named():
    with pytest.raises(LotaError, match="'bad'.*NaN"):
        top_k_mask({"ok": torch.ones(4), "bad": torch.tensor([1.0, float("nan")])}, 2)


@pytest.mark.parametrize("numel", [1, 7, 8, 9, 1000])
def test_bit_pack_round_trip(numel):
    mask = torch.rand(numel, generator=torch.Generator().manual_seed(numel)) > 0.5
    bits = pack_bits(mask)
    assert bits.dtype == np.uint8 and bits.size == math.ceil(numel / 8)
    assert np.array_equal(unpack_bits(bits, numel), mask.numpy())
    assert np.array_equal(positions_from_bits(bits, numel), mask.nonzero().reshape(-1).numpy())


def test_encoding_picks_the_smaller_form():
    dense = torch.zeros(8000, dtype=torch.bool)
    dense[::10] = True  # density 0.1: bits (1000 B) beat int32 positions (3200 B)
    assert encode_positions(pack_bits(dense), 8000)[0] == "bits"
    dense[:] = False
    dense[::200] = True  # density 0.005: positions (160 B) beat bits
    kind, idx = encode_positions(pack_bits(dense), 8000)
    assert kind == "idx" and idx.dtype == np.int32 and idx.tolist() == list(range(0, 8000, 200))


def test_k_is_rounded_exactly():
    assert k_for(0.9, 1000) == 100 and k_for(0.9, 15) == 2 and k_for(0.5, 3) == 2 and k_for(0.99, 10) == 0


def _reference(source, k):
    """Exact top-k by a stable sort of every |value| in (tensor, row-major) order: ties go to the first."""
    values = torch.cat([t.reshape(-1).abs() for t in source.values()])
    order = torch.sort(values, descending=True, stable=True).indices[:k]
    chosen = torch.zeros(values.numel(), dtype=torch.bool)
    chosen[order] = True
    return dict(zip(source, chosen.split([t.numel() for t in source.values()])))


def _skewed(seed=0, layers=8, integer=False):
    """Tensors large enough to be sampled, whose scales fall by 3.5 orders of magnitude from the first to
    the last and whose rows differ in scale, as after a step or two of calibration; `integer`: few distinct
    values, so the threshold is a tie shared by many entries."""
    gen = torch.Generator().manual_seed(seed)
    out = {}
    for i in range(layers):
        t = torch.randn(256, 1024, generator=gen) * 10 ** (-3.5 * i / (layers - 1))
        t *= torch.empty(256, 1, dtype=torch.float32).exponential_(1.0, generator=gen)
        out[f"layers.{i}.w"] = (t * 1e4).round() if integer else t
    return out


@pytest.mark.parametrize("threads", [1, 2])
@pytest.mark.parametrize("integer", [False, True])
def test_sampled_selection_on_layer_skewed_tensors_is_exact(monkeypatch, threads, integer, scan_path):
    source = _skewed(integer=integer)
    if integer:  # and in bfloat16, as calibrate writes task vectors
        source = {n: t.to(torch.bfloat16) for n, t in source.items()}
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    total = sum(t.numel() for t in source.values())
    for k in (total // 10, total // 100):
        masks = top_k_mask(source, k)
        for name, want in _reference(source, k).items():
            assert torch.equal(torch.from_numpy(unpack_bits(masks[name], want.numel())), want), name


@pytest.mark.parametrize("threads", [1, 2])
def test_a_band_too_wide_for_the_budget_narrows_and_stays_exact(monkeypatch, threads, scan_path):
    """With a tiny candidate budget every selection goes through the histogram narrowing, and with integer
    values through the one-value tie pass as well: still exactly the reference."""
    from lota_cli.ops import _top_k as masks_module

    passes = []
    original = masks_module._pass

    def counted(*args, **kwargs):
        result = original(*args, **kwargs)
        passes.append(result[0])
        return result

    monkeypatch.setattr(masks_module, "_pass", counted)
    monkeypatch.setattr(masks_module, "candidate_budget", lambda total: 100)
    monkeypatch.setattr(torch, "get_num_threads", lambda: threads)
    source = _skewed(seed=1, layers=8, integer=True)
    k = sum(t.numel() for t in source.values()) // 10
    masks = top_k_mask(source, k)
    assert "narrow" in passes and passes[-1] == "done"
    for name, want in _reference(source, k).items():
        assert torch.equal(torch.from_numpy(unpack_bits(masks[name], want.numel())), want), name
