"""Merge methods, on one tensor at a time, and their registry.

Each method takes the inputs' dense deltas for one tensor (same shape) and returns the merged delta; the merge
stage streams a model through them tensor by tensor, so nothing here ever sees a whole model. Selections are
per tensor: "density 0.2" keeps the largest 20% of each input's entries of *this* tensor.

Methods register themselves with `@merge_method`, declaring the MergeConfig fields they read; `merge` dispatches
through that registry, MergeConfig refuses fields the chosen method would ignore, the merge logs the ones it
reads, and `methods_help` lists them, so a new method is one decorated function. `merge` applies the global
scale to every method's result. torch is imported by the methods when first run, not with the registry:
`lota merge` of sparse deltas under sum or task_arithmetic runs in the native kernels alone.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Callable, Optional, Sequence

from lota_cli.ops._overlap import Overlap, overlap

if TYPE_CHECKING:
    from torch import Tensor


# --------------------------------------------------------------------------- registry

@dataclass(frozen=True)
class MergeMethod:
    """A registered method, called as fn(deltas, **{field: value for field in reads}), plus name=<the tensor's
    name> when fn takes a `name` (dare, to draw each tensor's drop mask independently of the others), and
    numel=<the tensor's entries> when fn takes a `numel` (ties, magnitude: their per-tensor top-k counts every
    entry, also when it is given only the union of sparse inputs' positions)."""

    fn: Callable[..., Tensor]
    reads: tuple[str, ...]  # the MergeConfig fields fn takes as keywords
    help: str
    takes_name: bool
    takes_numel: bool
    elementwise: bool  # entry by entry, zeros to zero: sparse inputs merge at their union of positions alone
    # the fused kernel of lota_cli.native that computes this method bit for bit on sparse inputs: "sum"
    # (d_0 + d_1 + ...) or "weighted" (fma(d_i, weight_i, acc) from 0, as add_(d, alpha=weight)); None: none
    native: Optional[str] = None

    @property
    def at_union(self) -> bool:
        """Merges sparse inputs exactly from their values at the union of their positions (0 elsewhere),
        given the tensor's numel: elementwise methods, and those whose top-k counts the absent zeros."""
        return self.elementwise or self.takes_numel


METHODS: dict[str, MergeMethod] = {}  # name -> method, in registration order (the order help lists them)


def merge_method(name: str, *, reads: Sequence[str] = (), help: str, elementwise: bool = False,
                 native: Optional[str] = None):
    """Register the decorated function as merge method `name`.

    elementwise=True declares that each output entry depends only on the inputs' entries at that position
    and is 0 where they all are: sparse inputs are then merged at their union of positions, never densified.
    native= names the fused kernel that computes it exactly on sparse inputs (MergeMethod.native); a test
    checks the two agree bit for bit.

    `reads` must name exactly its parameters after the deltas (other than `name`): a parameter left out would
    silently keep the function's default instead of the configured value, so that is refused here.
    """
    def register(fn: Callable[..., Tensor]) -> Callable[..., Tensor]:
        if name in METHODS:
            raise ValueError(f"merge method {name!r} is already registered")
        params = list(inspect.signature(fn).parameters)[1:]
        if set(params) - {"name", "numel"} != set(reads):
            raise TypeError(f"merge method {name!r}: {fn.__name__} takes {params} after the deltas, "
                            f"but declares reads={tuple(reads)}")
        if native not in (None, "sum", "weighted"):
            raise ValueError(f"merge method {name!r}: native={native!r} is not a kernel (sum, weighted)")
        METHODS[name] = MergeMethod(fn, tuple(reads), help, "name" in params, "numel" in params, elementwise,
                                    native)
        return fn
    return register


def readers() -> dict[str, list[str]]:
    """field -> the registered methods that read it, for every field some method reads."""
    out: dict[str, list[str]] = {}
    for method, spec in METHODS.items():
        for field in spec.reads:
            out.setdefault(field, []).append(method)
    return out


def methods_help() -> str:
    """One line per registered method: its name, what it does, and the fields it reads (`scale` applies to
    every method, so it is not listed)."""
    width = max(map(len, METHODS))
    return "\n".join(f"{name:<{width}}  {spec.help}; reads {', '.join(spec.reads) or 'no fields'}"
                     for name, spec in METHODS.items())


def merge(method: str, deltas: Sequence[Tensor], *, name: str = "", numel: int | None = None, scale: float = 1.0,
          **fields: Any) -> Tensor:
    """Merge one tensor's deltas with registered `method`, then multiply by `scale`. numel: the tensor's
    entries when `deltas` hold only the union of the inputs' positions (MergeMethod.at_union).

    `fields` are MergeConfig fields (weights=, density=, seed=, ...); the method gets the ones it reads, so a
    caller can pass one set for any method. A field no method reads is refused, to catch typos; one the method
    reads but that is not given keeps the function's default.
    """
    spec = METHODS.get(method)
    if spec is None:
        raise ValueError(f"unknown merge method {method!r}; registered: {', '.join(METHODS)}")
    unknown = sorted(set(fields) - set(readers()))
    if unknown:
        raise TypeError(f"merge() got fields that no merge method reads: {', '.join(unknown)}")
    kwargs = {field: fields[field] for field in spec.reads if field in fields}
    if spec.takes_name:
        kwargs["name"] = name
    if spec.takes_numel:
        kwargs["numel"] = deltas[0].numel() if numel is None else numel
    out = spec.fn(deltas, **kwargs)
    return out.mul_(scale) if scale != 1.0 else out


# --------------------------------------------------------------------------- methods

def top_k(delta: Tensor, density: float, numel: int | None = None) -> Tensor:
    """`delta` with all but its round(density * numel) largest-|value| entries zeroed; numel: the whole
    tensor's entries when `delta` is only some of them, the others being 0 (default: delta's own).

    Exact per tensor; ties at the threshold go to the entries that come first (row-major), as top_k_mask's,
    so the result does not depend on how topk happens to order equal values. With more than k nonzeros the
    threshold is nonzero, so the absent zeros never matter; with at most k, all nonzeros are kept.
    """
    import torch

    flat = delta.reshape(-1)
    numel = flat.numel() if numel is None else numel
    k = round(density * numel)
    if k >= numel:
        return delta.clone()
    if k == 0:
        return torch.zeros_like(delta)
    zero = torch.zeros((), dtype=flat.dtype)
    # a sparse input with at most k nonzeros keeps them all: the same result without the k-th value search
    # (unless it holds -0.0, which the search keeps in some places and not in others)
    if int(flat.count_nonzero()) <= k:
        if not has_negative_zero(flat):
            return flat.clone().view_as(delta)
        if numel != flat.numel():
            raise ValueError("top_k of part of a tensor holding -0.0: which zeros it keeps depends on where "
                             "every zero lies, so give it the whole tensor")
    mag = flat.abs()
    threshold = mag.kthvalue(flat.numel() - k + 1).values
    keep = mag > threshold
    ties = (mag == threshold).nonzero().reshape(-1)
    keep[ties[:k - int(keep.count_nonzero())]] = True
    return torch.where(keep, flat, zero).view_as(delta)


def has_negative_zero(tensor: Tensor) -> bool:
    import torch

    return bool((torch.signbit(tensor) & (tensor == 0)).any())


@merge_method("sum", help="sum of the deltas (disjoint LoTA masks make this the same as applying them in turn)",
              elementwise=True, native="sum")
def sum_deltas(deltas: Sequence[Tensor]) -> Tensor:
    """Plain sum (method `sum`; named so as not to shadow the builtin)."""
    out = deltas[0].clone()
    for delta in deltas[1:]:
        out += delta
    return out


@merge_method("task_arithmetic", reads=("weights",), help="weighted sum (Ilharco et al. 2023)", elementwise=True,
              native="weighted")
def task_arithmetic(deltas: Sequence[Tensor], weights: Optional[Sequence[float]] = None) -> Tensor:
    """sum_i weights[i] * deltas[i]; the global scale (lambda) is applied by `merge`."""
    import torch

    weights = [1.0] * len(deltas) if weights is None else list(weights)
    out = torch.zeros_like(deltas[0])
    for weight, delta in zip(weights, deltas):
        out.add_(delta, alpha=weight)
    return out


@merge_method("ties", reads=("density",),
              help="trim to top-density, elect a sign per entry, average the agreeing entries (Yadav et al. 2023)")
def ties(deltas: Sequence[Tensor], density: float = 1.0, numel: int | None = None) -> Tensor:
    """TIES-merging: trim each input to its top-density entries, elect the sign of the summed trimmed values
    per entry, and average (over inputs, not counting zeros) the trimmed entries that carry that sign."""
    import torch

    trimmed = [top_k(d, density, numel) for d in deltas]
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


@merge_method("dare", reads=("density", "seed"),
              help="drop entries with probability 1 - density, rescale the rest by 1 / density, sum (Yu et al. 2024)")
def dare(deltas: Sequence[Tensor], density: float = 1.0, seed: int = 0, name: str = "") -> Tensor:
    """DARE: keep each entry with probability `density` (input i's mask drawn from dare_seed(seed, name, i)),
    rescale kept entries by 1 / density so the expected delta is unchanged, and sum."""
    import torch

    out = torch.zeros_like(deltas[0])
    for index, delta in enumerate(deltas):
        if density >= 1.0:
            out += delta
            continue
        generator = torch.Generator().manual_seed(dare_seed(seed, name, index))
        keep = torch.rand(delta.shape, generator=generator) < density
        out += torch.where(keep, delta, torch.zeros((), dtype=delta.dtype)) / density
    return out


@merge_method("magnitude", reads=("density",),
              help="top-density sparsification of each input after training, then sum (LoTA paper's baseline)")
def magnitude(deltas: Sequence[Tensor], density: float = 1.0, numel: int | None = None) -> Tensor:
    """Post-hoc magnitude pruning: keep each input's top-density entries, then sum."""
    return sum_deltas([top_k(d, density, numel) for d in deltas])


# --------------------------------------------------------------------------- overlap statistics

def delta_overlap(a: Tensor, b: Tensor) -> Overlap:
    """Overlap of two dense deltas by their nonzero entries, with signs."""
    import torch

    return overlap(a != 0, b != 0, torch.sign(a), torch.sign(b))
