"""lota extract: a mask of the largest-magnitude entries of a task vector.

Default: one global threshold over the selected tensors (attention and MLP weight matrices, fused MoE
experts) keeping exactly k = round((1 - sparsity) * N) entries; extract.scope=per_tensor keeps that fraction of each tensor instead.
Streams tensor by tensor from the memory-mapped artifact (see masks.top_k_mask).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lota_cli import LotaError
from lota_cli.artifacts import Artifact, save_sparse, stage_meta
from lota_cli.config import ExtractConfig
from lota_cli.masks import count_bits, density_by_layer, encode_positions, k_for, top_k_mask
from lota_cli.models import selected

log = logging.getLogger(__name__)


def run(cfg: ExtractConfig, out: Path) -> list[Path]:
    opts = cfg.extract
    task_vector = Artifact(opts.task_vector, kinds=("task_vector",))
    names = selected({n: task_vector.shape(n) for n in task_vector.names}, cfg.params)
    source = {n: task_vector.raw(n) for n in names}

    total = sum(task_vector.numel(n) for n in names)
    if k_for(opts.sparsity, total) == 0:
        raise LotaError(f"extract.sparsity={opts.sparsity} keeps none of the {total:,} selected entries; lower it")
    try:
        if opts.scope == "global":
            bits = top_k_mask(source, k_for(opts.sparsity, total))
        else:
            bits = {}
            for n in names:
                bits.update(top_k_mask({n: source[n]}, k_for(opts.sparsity, task_vector.numel(n))))
    except LotaError as err:  # e.g. NaN in a tensor: say which file
        raise LotaError(f"{task_vector.path}: {err}") from err

    counts = {n: (count_bits(bits[n]), task_vector.numel(n)) for n in names}
    kept, total = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    log.info("mask: %d of %d entries (density %.4f) over %d tensors", kept, total, kept / total, len(names))
    for layer, density in density_by_layer(counts).items():
        log.info("  %-24s density %.4f", layer, density)

    positions = {n: encode_positions(bits[n], task_vector.numel(n)) for n in names}
    meta = stage_meta("mask", "extract", cfg, task_vector.meta.base_model, task_vector.meta.base_fingerprint,
                      parents=[task_vector.meta.fingerprint], sparsity=opts.sparsity,
                      base_checkpoint=task_vector.meta.base_checkpoint)
    shapes = {n: task_vector.shape(n) for n in names}
    return [save_sparse(out / "mask.safetensors", meta, shapes, positions)]
