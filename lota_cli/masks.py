"""Masks: exact streaming top-k selection over many tensors, and compact mask encodings.

The reference implementation concatenates every |delta| and calls topk, which needs about five times the
task vector in RAM. Here selection streams tensor by tensor: a row sample brackets the k-th largest value,
one full pass keeps what is surely above the bracket (as packed bits) and the few entries inside it, and
those are resolved exactly at the end. If the bracket misses, an exact three-pass histogram search over the
float bits takes over. Either way exactly k entries are chosen; ties at the threshold go to the entry that
comes first (tensor order, then row-major position), so the result is deterministic.

A source is a mapping from tensor name to something sliceable on its first dimension: a torch tensor, or a
safetensors slice (so a row sample reads only those rows from disk).
"""

from __future__ import annotations

import math
import re
from typing import Mapping

import numpy as np
import torch

from lota_cli import LotaError

EXCLUDED = -1.0  # |delta| is never negative, so excluded entries can never be selected
SAMPLE_ROWS_FRACTION = 1 / 64
BRACKET_MARGIN = 0.1  # relative slack in rank around the sampled k-th value
CANDIDATE_BUDGET = 0.03  # fall back to the exact search if more than this fraction lands in the bracket


# --------------------------------------------------------------------------- encodings

def pack_bits(mask: torch.Tensor) -> torch.Tensor:
    """Flat bool tensor -> uint8, 8 entries a byte (little bit order)."""
    return torch.from_numpy(np.packbits(mask.reshape(-1).numpy(), bitorder="little"))


def unpack_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """Inverse of pack_bits: flat bool tensor of numel entries."""
    return torch.from_numpy(np.unpackbits(bits.numpy(), count=numel, bitorder="little").view(np.bool_))


def index_dtype(numel: int) -> torch.dtype:
    return torch.int32 if numel < 2**31 else torch.int64


def indices_from_bits(bits: torch.Tensor, numel: int) -> torch.Tensor:
    """Sorted flat positions of the set entries, int32 where they fit."""
    return unpack_bits(bits, numel).nonzero().reshape(-1).to(index_dtype(numel))


def encode_positions(bits: torch.Tensor, numel: int) -> tuple[str, torch.Tensor]:
    """The smaller of packed bits and int32 positions: ('bits', uint8) or ('idx', int)."""
    count = int(unpack_bits(bits, numel).count_nonzero())
    if count * torch.tensor([], dtype=index_dtype(numel)).element_size() < bits.numel():
        return "idx", indices_from_bits(bits, numel)
    return "bits", bits


# --------------------------------------------------------------------------- selection

def _shape(x) -> tuple[int, ...]:
    return tuple(x.get_shape()) if hasattr(x, "get_shape") else tuple(x.shape)


def _magnitudes(source: Mapping, name: str, excluded: Mapping[str, torch.Tensor] | None) -> torch.Tensor:
    """|delta| of one tensor as flat float32, with excluded entries set to EXCLUDED."""
    mag = source[name][:].reshape(-1).abs().float()
    if not torch.isfinite(mag.sum()):
        raise LotaError(f"tensor {name!r} holds NaN or Inf values; the run that made it diverged, so redo it "
                        "(lower train.lr, or enable train.max_grad_norm)")
    if excluded is not None and name in excluded:
        mag[unpack_bits(excluded[name], mag.numel())] = EXCLUDED
    return mag


def _sampled_bracket(source: Mapping, names: list[str], k: int, total: int, seed: int = 0):
    """(lo, hi) values that likely bracket the k-th largest |delta|, from random row blocks."""
    gen = torch.Generator().manual_seed(seed)
    samples = []
    for name in names:
        shape = _shape(source[name])
        rows = shape[0] if shape else 1
        take = max(1, math.ceil(rows * SAMPLE_ROWS_FRACTION))
        block = max(1, take // 8)
        for _ in range(max(1, take // block)):
            start = int(torch.randint(0, max(1, rows - block + 1), (1,), generator=gen))
            samples.append(source[name][start:start + block].reshape(-1).abs().float())
    sample = torch.cat(samples)
    m = sample.numel()
    rank = k / total * m  # expected rank of the k-th largest value among the sampled ones
    slack = BRACKET_MARGIN * rank + 4 * math.sqrt(rank) + 1

    def kth_largest(r: float) -> float:
        return sample.kthvalue(m - min(m - 1, max(0, int(r)))).values.item()

    return kth_largest(rank + slack), kth_largest(rank - slack)


def _select_with_bracket(source, names, k, total, excluded, lo, hi):
    """One pass: entries > hi are selected, entries in [lo, hi] are candidates. None if the bracket misses."""
    above, cand_pos, cand_val, cand_name = {}, [], [], []
    n_above = n_cand = 0
    for i, name in enumerate(names):
        mag = _magnitudes(source, name, excluded)
        sure = mag > hi
        n_above += int(sure.count_nonzero())
        above[name] = pack_bits(sure)
        in_bracket = ((mag >= lo) & ~sure).nonzero().reshape(-1)
        n_cand += in_bracket.numel()
        if n_above > k or n_cand > CANDIDATE_BUDGET * total + k:
            return None
        cand_pos.append(in_bracket.to(index_dtype(mag.numel())))
        cand_val.append(mag[in_bracket])
        cand_name.append(torch.full((in_bracket.numel(),), i, dtype=torch.int32))
    need = k - n_above
    if need < 0 or need > n_cand:
        return None
    if need:
        values = torch.cat(cand_val)
        threshold = values.kthvalue(values.numel() - need + 1).values
        ties = values == threshold
        ties_taken = ties & (ties.cumsum(0) <= need - int((values > threshold).count_nonzero()))
        chosen = (values > threshold) | ties_taken
        tensor_of, pos = torch.cat(cand_name)[chosen], torch.cat(cand_pos)[chosen]
        for i, name in enumerate(names):
            chosen = pos[tensor_of == i]
            if chosen.numel():
                mask = unpack_bits(above[name], math.prod(_shape(source[name])))
                mask[chosen.long()] = True
                above[name] = pack_bits(mask)
    return above


def _exact_threshold(source, names, k, excluded) -> tuple[float, int]:
    """Exact k-th largest value t, and how many entries equal to t are to be taken (first in order)."""
    counts_hi = torch.zeros(1 << 15, dtype=torch.int64)
    for name in names:
        bits = _magnitudes(source, name, excluded).view(torch.int32)
        bits = bits[bits >= 0]  # drop excluded (negative) entries
        counts_hi += torch.bincount(bits >> 16, minlength=1 << 15)
    above = counts_hi.flip(0).cumsum(0).flip(0)  # above[b] = count of entries with top bits >= b
    b = int((above >= k).nonzero().max())
    n_gt = int(above[b + 1]) if b + 1 < above.numel() else 0
    counts_lo = torch.zeros(1 << 16, dtype=torch.int64)
    for name in names:
        bits = _magnitudes(source, name, excluded).view(torch.int32)
        bits = bits[(bits >> 16) == b]
        counts_lo += torch.bincount(bits & 0xFFFF, minlength=1 << 16)
    above_lo = counts_lo.flip(0).cumsum(0).flip(0)
    lo = int((above_lo >= k - n_gt).nonzero().max())
    n_gt += int(above_lo[lo + 1]) if lo + 1 < above_lo.numel() else 0
    threshold = torch.tensor([(b << 16) | lo], dtype=torch.int32).view(torch.float32).item()
    return threshold, k - n_gt


def _select_exact(source, names, k, excluded):
    threshold, ties_left = _exact_threshold(source, names, k, excluded)
    masks = {}
    for name in names:
        mag = _magnitudes(source, name, excluded)
        mask = mag > threshold
        ties = (mag == threshold).nonzero().reshape(-1)[:max(ties_left, 0)]
        mask[ties] = True
        ties_left -= ties.numel()
        masks[name] = pack_bits(mask)
    return masks


def top_k_mask(source: Mapping, k: int, excluded: Mapping[str, torch.Tensor] | None = None) -> dict[str, torch.Tensor]:
    """Exactly k entries of largest |value| across all tensors of `source`, as packed bits per tensor.

    `excluded` maps names to packed bits of entries that may not be chosen (earlier LoTTO masks).
    """
    names = list(source)
    total = sum(math.prod(_shape(source[n])) for n in names)
    free = total - sum(int(unpack_bits(b, math.prod(_shape(source[n]))).count_nonzero()) for n, b in (excluded or {}).items())
    if not 0 <= k <= free:
        raise LotaError(
            f"cannot select {k:,} entries: only {free:,} of {total:,} ({free / max(total, 1):.2%}) are free"
            + (" after the earlier masks; lower the density (raise the sparsity) or start a new chain" if excluded else "")
        )
    if k == 0:
        return {n: pack_bits(torch.zeros(math.prod(_shape(source[n])), dtype=torch.bool)) for n in names}
    lo, hi = _sampled_bracket(source, names, k, total)
    masks = _select_with_bracket(source, names, k, total, excluded, lo, hi)
    return masks if masks is not None else _select_exact(source, names, k, excluded)


def layer_of(name: str) -> str:
    """'model.layers.3.mlp.up_proj.weight' -> 'layer 3'; names without a layer number keep their own."""
    match = re.search(r"\.(\d+)\.", name)
    return f"layer {int(match.group(1))}" if match else name


def density_by_layer(counts: dict[str, tuple[int, int]]) -> dict[str, float]:
    """Per-layer density from per-tensor (selected, total) counts, layers in order of appearance."""
    layers: dict[str, list[int]] = {}
    for name, (held, total) in counts.items():
        acc = layers.setdefault(layer_of(name), [0, 0])
        acc[0] += held
        acc[1] += total
    return {layer: held / max(total, 1) for layer, (held, total) in layers.items()}


def k_for(sparsity: float, numel: int) -> int:
    """Number of entries kept at a sparsity: round((1 - sparsity) * numel)."""
    return round(numel - sparsity * numel)  # not (1 - s) * n: 1 - 0.9 is 0.0999..., which rounds 1.5 down
