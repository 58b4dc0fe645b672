"""lota overlap A B ...: how much the masks of artifacts of one base overlap, and whether their signs agree.

For every pair: intersection, union, Jaccard index and, when both carry values, the fraction of shared
entries whose signs agree; over the whole model, per layer and per tensor (with its size, `numel`, so that a
reader can set each tensor's or group's Jaccard against that of independent random masks of its densities). Masks and sparse deltas hold their stored
positions, task vectors their nonzero entries. A tensor one artifact lacks counts as holding nothing there.
Streams tensor by tensor, reading each input's tensor once for all pairs. Writes out/overlap.json (the
tables go to stderr) and prints its path, like every stage.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from pathlib import Path

import numpy as np
from rich.table import Table

from lota_cli import LotaError
from lota_cli.artifacts import StoredFile
from lota_cli.config import OverlapConfig
from lota_cli.console import stderr
from lota_cli.inputs import open_stored
from lota_cli.io import write_text
from lota_cli.ops import Overlap, layer_of, overlap


def _natural(name: str) -> list:
    """Sort key putting 'layers.2' before 'layers.10' (artifact headers list tensors alphabetically)."""
    return [int(part) if part.isdigit() else part for part in re.split(r"(\d+)", name)]


def _names_and_shapes(inputs: list[StoredFile]) -> dict[str, tuple[int, ...]]:
    """Every tensor any input holds, layers in numeric order; shapes must agree where shared."""
    shapes: dict[str, tuple[int, ...]] = {}
    owner: dict[str, StoredFile] = {}
    for artifact in inputs:
        for name in artifact.names:
            if name in shapes and artifact.shape(name) != shapes[name]:
                raise LotaError(f"tensor {name!r} is {list(artifact.shape(name))} in {artifact.path} but "
                                f"{list(shapes[name])} in {owner[name].path}; compare artifacts of one model")
            shapes.setdefault(name, artifact.shape(name))
            owner.setdefault(name, artifact)
    return {name: shapes[name] for name in sorted(shapes, key=_natural)}


def run(cfg: OverlapConfig, out: Path) -> list[Path]:
    inputs = [open_stored(p) for p in cfg.inputs]
    if len(inputs) < 2:
        raise LotaError(f"overlap compares artifacts pairwise and got {len(inputs)}; give two or more")
    for other in inputs[1:]:
        other.check_base(inputs[0].meta.base_fingerprint, inputs[0].meta.base_model)
    shapes = _names_and_shapes(inputs)
    pairs = list(itertools.combinations(range(len(inputs)), 2))
    per_layer: dict[tuple[int, int], dict[str, Overlap]] = {pair: {} for pair in pairs}
    per_tensor: dict[tuple[int, int], dict[str, dict]] = {pair: {} for pair in pairs}
    held = [0] * len(inputs)

    for name, shape in shapes.items():
        entries = []
        for i, artifact in enumerate(inputs):
            if name in artifact.meta.shapes:
                support, sign = artifact.support(name)
            else:  # holds nothing here; zero signs keep a values-carrying artifact's agreement defined
                support = np.zeros(math.prod(shape), dtype=np.bool_)
                sign = None if artifact.kind == "mask" else np.zeros(support.shape, dtype=np.int8)
            held[i] += int(np.count_nonzero(support))
            entries.append((support, sign))
        layer = layer_of(name)
        for i, j in pairs:
            counts = overlap(entries[i][0], entries[j][0], entries[i][1], entries[j][1])
            layers = per_layer[i, j]
            layers[layer] = layers.get(layer, Overlap()) + counts
            per_tensor[i, j][name] = {**counts.as_dict(), "numel": math.prod(shape)}

    total = sum(math.prod(s) for s in shapes.values())
    result = {
        "inputs": [{"path": str(a.path), "kind": a.kind, "fingerprint": a.meta.fingerprint, "entries": held[i],
                    "density": held[i] / max(total, 1)} for i, a in enumerate(inputs)],
        "pairs": [],
    }
    for (i, j), layers in per_layer.items():
        overall = sum(layers.values(), Overlap())
        result["pairs"].append({"a": str(inputs[i].path), "b": str(inputs[j].path), **overall.as_dict(),
                                "per_layer": {layer: s.as_dict() for layer, s in layers.items()},
                                "per_tensor": per_tensor[i, j]})
    _print_tables(inputs, result)

    return [write_text(out / "overlap.json", json.dumps(result, indent=2) + "\n")]


def _fmt(value: float | None, percent: bool = False) -> str:
    if value is None:
        return "-"
    return f"{value:.2%}" if percent else f"{value:.4f}"


def _print_tables(inputs: list[StoredFile], result: dict) -> None:
    stems = [a.path.stem for a in inputs]
    label = {str(a.path): (a.path.stem if stems.count(a.path.stem) == 1 else str(a.path)) for a in inputs}

    def table(title: str, names: list[str], numbers: list[str]) -> Table:
        """Numbers are never cut: only the name columns fold when the terminal is narrow."""
        t = Table(title=title)
        for header in names:
            t.add_column(header, overflow="fold")
        for header in numbers:
            t.add_column(header, justify="right", no_wrap=True)
        return t

    overall = table("overlap", ["a", "b"], ["|a|", "|b|", "shared", "Jaccard", "sign agree"])
    for pair in result["pairs"]:
        overall.add_row(label[pair["a"]], label[pair["b"]], f"{pair['entries_a']:,}", f"{pair['entries_b']:,}",
                        f"{pair['intersection']:,}", _fmt(pair["jaccard"]), _fmt(pair["sign_agreement"], True))
    stderr.print(overall)
    for pair in result["pairs"]:
        layers = table(f"{label[pair['a']]} vs {label[pair['b']]} per layer", ["layer"],
                       ["shared", "union", "Jaccard", "sign agree"])
        for layer, s in pair["per_layer"].items():
            layers.add_row(layer, f"{s['intersection']:,}", f"{s['union']:,}", _fmt(s["jaccard"]),
                           _fmt(s["sign_agreement"], True))
        stderr.print(layers)
