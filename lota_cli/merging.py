"""Merging methods and overlap statistics, on one tensor at a time.

Each method takes the inputs' dense deltas for one tensor (same shape) and returns the merged delta; the merge
stage streams a model through them tensor by tensor, so nothing here ever sees a whole model. Selections are
per tensor: "density 0.2" keeps the largest 20% of each input's entries of *this* tensor.

  sum              sum of the deltas (disjoint LoTA masks make this the same as applying them in turn)
  task_arithmetic  weighted sum (Ilharco et al. 2023)
  ties             trim to top-density, elect a sign per entry, average the agreeing entries (Yadav et al. 2023)
  dare             drop entries with probability 1 - density, rescale the rest by 1 / density, sum (Yu et al. 2024)
  magnitude        top-density sparsification of each input after training, then sum (LoTA paper's baseline)

`merge` applies the global scale to every method's result.
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass
from typing import Optional, Sequence

import torch
from torch import Tensor


# --------------------------------------------------------------------------- methods

def top_k(delta: Tensor, density: float) -> Tensor:
    """`delta` with all but its round(density * numel) largest-|value| entries zeroed.

    Exact per tensor; ties at the threshold go to the entries that come first (row-major), as in masks.py,
    so the result does not depend on how topk happens to order equal values.
    """
    flat = delta.reshape(-1)
    k = round(density * flat.numel())
    if k >= flat.numel():
        return delta.clone()
    if k == 0:
        return torch.zeros_like(delta)
    mag = flat.abs()
    threshold = mag.kthvalue(flat.numel() - k + 1).values
    keep = mag > threshold
    ties = (mag == threshold).nonzero().reshape(-1)
    keep[ties[:k - int(keep.count_nonzero())]] = True
    return torch.where(keep, flat, torch.zeros((), dtype=flat.dtype)).view_as(delta)


def sum_deltas(deltas: Sequence[Tensor]) -> Tensor:
    """Plain sum (method `sum`; named so as not to shadow the builtin)."""
    out = deltas[0].clone()
    for delta in deltas[1:]:
        out += delta
    return out


def task_arithmetic(deltas: Sequence[Tensor], weights: Optional[Sequence[float]] = None) -> Tensor:
    """sum_i weights[i] * deltas[i]; the global scale (lambda) is applied by `merge`."""
    weights = [1.0] * len(deltas) if weights is None else list(weights)
    out = torch.zeros_like(deltas[0])
    for weight, delta in zip(weights, deltas):
        out.add_(delta, alpha=weight)
    return out


def ties(deltas: Sequence[Tensor], density: float) -> Tensor:
    """TIES-merging: trim each input to its top-density entries, elect the sign of the summed trimmed values
    per entry, and average (over inputs, not counting zeros) the trimmed entries that carry that sign."""
    trimmed = [top_k(d, density) for d in deltas]
    elected = torch.sign(sum_deltas(trimmed))
    total = torch.zeros_like(deltas[0])
    count = torch.zeros_like(deltas[0])
    for t in trimmed:
        agrees = (torch.sign(t) == elected) & (t != 0)
        total += torch.where(agrees, t, torch.zeros((), dtype=t.dtype))
        count += agrees
    return total / count.clamp(min=1)


def dare_seed(seed: int, name: str, index: int) -> int:
    """Seed for input `index`'s drop mask of tensor `name`: depends on nothing else, so the result does not
    depend on tensor order or on which other tensors are merged."""
    digest = hashlib.sha256(f"{seed}:{name}:{index}".encode()).digest()
    return int.from_bytes(digest[:8], "little") & (2**63 - 1)


def dare(deltas: Sequence[Tensor], density: float, seeds: Sequence[int]) -> Tensor:
    """DARE: keep each entry with probability `density` (one seed per input), rescale kept entries by
    1 / density so the expected delta is unchanged, and sum."""
    out = torch.zeros_like(deltas[0])
    for delta, seed in zip(deltas, seeds):
        if density >= 1.0:
            out += delta
            continue
        keep = torch.rand(delta.shape, generator=torch.Generator().manual_seed(seed)) < density
        out += torch.where(keep, delta, torch.zeros((), dtype=delta.dtype)) / density
    return out


def magnitude(deltas: Sequence[Tensor], density: float) -> Tensor:
    """Post-hoc magnitude pruning: keep each input's top-density entries, then sum."""
    return sum_deltas([top_k(d, density) for d in deltas])


def merge(method: str, deltas: Sequence[Tensor], *, name: str = "", weights: Optional[Sequence[float]] = None,
          scale: float = 1.0, density: float = 1.0, seed: int = 0) -> Tensor:
    """Merge one tensor's deltas with `method` (config.MERGE_METHODS), then multiply by `scale`."""
    if method == "sum":
        out = sum_deltas(deltas)
    elif method == "task_arithmetic":
        out = task_arithmetic(deltas, weights)
    elif method == "ties":
        out = ties(deltas, density)
    elif method == "dare":
        out = dare(deltas, density, [dare_seed(seed, name, i) for i in range(len(deltas))])
    elif method == "magnitude":
        out = magnitude(deltas, density)
    else:
        raise ValueError(f"unknown merge method {method!r}")
    return out.mul_(scale) if scale != 1.0 else out


# --------------------------------------------------------------------------- overlap statistics

@dataclass
class Overlap:
    """Entry counts for one pair of artifacts; add them up over tensors, layers or a whole model.

    `agree` counts shared entries of equal sign, and is None when either side carries no values (a mask).
    """

    a: int = 0  # entries held by the first
    b: int = 0  # entries held by the second
    shared: int = 0  # held by both (the intersection)
    agree: Optional[int] = 0

    def __add__(self, other: "Overlap") -> "Overlap":
        agree = None if self.agree is None or other.agree is None else self.agree + other.agree
        return Overlap(self.a + other.a, self.b + other.b, self.shared + other.shared, agree)

    @property
    def union(self) -> int:
        return self.a + self.b - self.shared

    @property
    def jaccard(self) -> Optional[float]:
        """|A ∩ B| / |A ∪ B|; None when both are empty (undefined)."""
        return self.shared / self.union if self.union else None

    @property
    def sign_agreement(self) -> Optional[float]:
        """Fraction of shared entries whose signs agree; None without values or shared entries."""
        return self.agree / self.shared if self.agree is not None and self.shared else None

    @property
    def sign_conflicts(self) -> Optional[float]:
        """Fraction of shared entries whose signs differ: what TIES' sign election resolves."""
        agreement = self.sign_agreement
        return None if agreement is None else 1.0 - agreement

    def as_dict(self) -> dict:
        return {"entries_a": self.a, "entries_b": self.b, "intersection": self.shared, "union": self.union,
                "jaccard": self.jaccard, "sign_agreement": self.sign_agreement}


def overlap(a: Tensor, b: Tensor, a_sign: Optional[Tensor] = None, b_sign: Optional[Tensor] = None) -> Overlap:
    """Counts for two supports (bool tensors of held entries). Signs (from torch.sign) are compared on the
    shared entries when both are given; otherwise `agree` is None."""
    shared = a & b
    agree = None
    if a_sign is not None and b_sign is not None:
        agree = int((shared & (a_sign == b_sign)).count_nonzero())
    return Overlap(int(a.count_nonzero()), int(b.count_nonzero()), int(shared.count_nonzero()), agree)


def delta_overlap(a: Tensor, b: Tensor) -> Overlap:
    """Overlap of two dense deltas by their nonzero entries, with signs."""
    return overlap(a != 0, b != 0, torch.sign(a), torch.sign(b))
