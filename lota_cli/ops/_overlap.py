"""Overlap statistics of two artifacts' supports: entry counts, Jaccard index, sign agreement, added up
over tensors, layers or a whole model, and the per-layer view of an artifact's density. Torch-free, for
`lota overlap` and `lota info`; `lota merge` counts the same."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Optional

import numpy as np


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


def overlap(a, b, a_sign=None, b_sign=None) -> Overlap:
    """Counts for two supports (bool arrays of held entries: numpy, or torch tensors on the CPU). Signs (-1, 0,
    1) are compared on the shared entries when both are given; otherwise `agree` is None."""
    shared = a & b
    agree = None
    if a_sign is not None and b_sign is not None:
        agree = int(np.count_nonzero(shared & (a_sign == b_sign)))
    return Overlap(int(np.count_nonzero(a)), int(np.count_nonzero(b)), int(np.count_nonzero(shared)), agree)


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
