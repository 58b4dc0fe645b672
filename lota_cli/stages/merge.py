"""lota merge A B ...: combine task vectors / sparse deltas of one base into one task vector (or model).

The inputs are checked to share one base and layout, merged tensor by tensor by the chosen method
(lota_cli.workflows.Merger: streaming, sparse deltas at their union of positions, the native kernels for
sum and task_arithmetic), and written as out/merged.safetensors or, with output_model, as base + merged delta
in a Hugging Face model directory there. The inputs' pairwise overlap and sign conflicts are logged.
"""

from __future__ import annotations

from pathlib import Path

from lota_cli.artifacts import same_layout, stage_meta
from lota_cli.config import MergeConfig, parse_size
from lota_cli.inputs import open_artifact
from lota_cli.ops import METHODS
from lota_cli.workflows import Merger


def run(cfg: MergeConfig, out: Path) -> list[Path]:
    inputs = [open_artifact(p, kinds=("task_vector", "sparse_delta")) for p in cfg.inputs]
    same_layout(inputs)
    params = {key: getattr(cfg, key) for key in METHODS[cfg.method].reads}  # what this method is given
    merger = Merger(inputs, cfg.method, params, cfg.scale, cfg.dtype)
    if cfg.output_model:
        path = merger.into_model(Path(cfg.output_model), parse_size(cfg.shard_size))
    else:
        first = inputs[0]
        meta = stage_meta("task_vector", "merge", cfg, first.meta.base_model, first.meta.base_fingerprint,
                          parents=[a.meta.fingerprint for a in inputs], base_checkpoint=first.meta.base_checkpoint)
        path = merger.to_task_vector(out / "merged.safetensors", meta)
    merger.log_overlaps()
    return [path]
