"""lota extract: a mask of the k entries of largest score, the scores chosen by extract.source.

Default: |delta| of a task vector (LoTA); or |w| of the base (weights), seeded uniform scores (random), or
accumulated |gradient| of the task's loss (gradient): lota_cli.workflows' mask sources. One global threshold over the
selected tensors (attention and MLP weight matrices, fused MoE experts) keeps exactly
k = round((1 - sparsity) * N) entries; extract.scope=per_tensor keeps that fraction of each tensor instead.
Selection streams tensor by tensor (ops.top_k_mask), from the memory-mapped artifact for a task vector. A
preset (conf=...) gives its model and params; its training settings are ignored, with a line in the log.
"""

from __future__ import annotations

import logging
import math
from pathlib import Path

from lota_cli import LotaError
from lota_cli.artifacts import save_sparse, stage_meta
from lota_cli.config import ExtractConfig
from lota_cli.ops import density_by_layer, k_for, top_k_mask
from lota_cli.tensors import count_bits, encode_positions
from lota_cli.workflows import SOURCES

log = logging.getLogger(__name__)


def run(cfg: ExtractConfig, out: Path) -> list[Path]:
    opts = cfg.extract
    if cfg.train is not None:
        log.info("the preset's train.* settings are ignored: extract trains nothing (it reads model.*, params.* "
                 "and, for extract.source=gradient, task.*)")
    ranking = SOURCES[opts.source](cfg)
    names, numel = list(ranking.shapes), {n: math.prod(s) for n, s in ranking.shapes.items()}

    total = sum(numel.values())
    if k_for(opts.sparsity, total) == 0:
        raise LotaError(f"extract.sparsity={opts.sparsity} keeps none of the {total:,} selected entries; lower it")
    try:
        if opts.scope == "global":
            bits = top_k_mask(ranking.scores, k_for(opts.sparsity, total))
        else:
            bits = {}
            for n in names:
                bits.update(top_k_mask({n: ranking.scores[n]}, k_for(opts.sparsity, numel[n])))
    except LotaError as err:  # e.g. NaN in a tensor: say where the scores came from
        raise LotaError(f"{ranking.where}: {err}") from err

    counts = {n: (count_bits(bits[n]), numel[n]) for n in names}
    kept = sum(c[0] for c in counts.values())
    log.info("mask by %s: %d of %d entries (density %.4f) over %d tensors", opts.source, kept, total, kept / total,
             len(names))
    for layer, density in density_by_layer(counts).items():
        log.info("  %-24s density %.4f", layer, density)

    positions = {n: encode_positions(bits[n], numel[n]) for n in names}
    meta = stage_meta("mask", "extract", cfg, ranking.base_model, ranking.base_fingerprint, parents=ranking.parents,
                      sparsity=opts.sparsity, base_checkpoint=ranking.base_checkpoint, source=ranking.source)
    return [save_sparse(out / "mask.safetensors", meta, ranking.shapes, positions)]
