"""lota merge A B ...: combine task vectors / sparse deltas of one base into one task vector (or model).

Streams tensor by tensor: for each tensor, read every input's dense delta, merge (lota_cli.merging), and
write it out (or add it into the base model's weight), so peak memory is a few tensors per input rather than
whole models. The pairwise mask overlap and sign conflicts of the inputs are counted in the same pass.
"""

from __future__ import annotations

import itertools
import logging
from pathlib import Path

import torch

from lota_cli import LotaError
from lota_cli.artifacts import Artifact, ArtifactWriter, open_artifact, same_layout, stage_meta
from lota_cli.config import MergeConfig, ModelConfig
from lota_cli.merging import METHODS, Overlap, delta_overlap, merge
from lota_cli.models import DTYPES, check_tensor, fingerprint, load_model, save_model

log = logging.getLogger(__name__)


def _base_model(inputs: list[Artifact], dtype: str):
    """The base model the inputs were made from, as recorded in their metadata, checked by fingerprint."""
    recorded = next((a.meta.config["model"] for a in inputs if isinstance(a.meta.config.get("model"), dict)), None)
    if recorded is None:
        raise LotaError(f"none of {[str(a.path) for a in inputs]} records the model it was made from (a merge's "
                        "own output does not); merge to a task vector instead and apply it with `lota eval`")
    # merge in the output dtype; gradient checkpointing would change the saved config's use_cache
    model_cfg = ModelConfig(**{**recorded, "dtype": dtype, "gradient_checkpointing": False})
    model, tokenizer = load_model(model_cfg)
    inputs[0].check_base(fingerprint(model), model_cfg.path)
    return model, tokenizer


def run(cfg: MergeConfig, out: Path) -> list[Path]:
    inputs = [open_artifact(p, kinds=("task_vector", "sparse_delta")) for p in cfg.inputs]
    same_layout(inputs)
    first = inputs[0]
    names = first.names
    params = {key: getattr(cfg, key) for key in METHODS[cfg.method].reads}  # what this method is given
    log.info("merging %d inputs (%s) over %d tensors with method=%s%s", len(inputs),
             ", ".join(a.path.name for a in inputs), len(names), cfg.method,
             "".join(f" {key}={value}" for key, value in params.items()))

    pairs = list(itertools.combinations(range(len(inputs)), 2))
    stats = {pair: Overlap() for pair in pairs}
    dtype = DTYPES[cfg.dtype]

    def merged_tensors():
        """(name, merged delta in float32) for each tensor, counting overlaps on the way."""
        for name in names:
            deltas = [a.dense(name) for a in inputs]
            for i, delta in enumerate(deltas):
                if not torch.isfinite(delta).all():
                    raise LotaError(f"{inputs[i].path}: tensor {name!r} holds NaN or Inf values; the run that "
                                    "made it diverged, so redo it (lower train.lr)")
            for i, j in pairs:
                stats[i, j] += delta_overlap(deltas[i], deltas[j])
            yield name, merge(cfg.method, deltas, name=name, scale=cfg.scale, **params)

    if cfg.output_model:
        model, tokenizer = _base_model(inputs, cfg.dtype)
        with torch.no_grad():
            for name, delta in merged_tensors():
                param = check_tensor(model, name, first.shape(name), str(first.path))
                param.copy_((param.float() + delta).to(param.dtype))  # add in float32, round once
        _log_overlaps(inputs, stats)
        return [save_model(model, tokenizer, Path(cfg.output_model))]

    meta = stage_meta("task_vector", "merge", cfg, first.meta.base_model, first.meta.base_fingerprint,
                      parents=[a.meta.fingerprint for a in inputs])
    meta.shapes = {n: list(first.shape(n)) for n in names}
    path = out / "merged.safetensors"
    with ArtifactWriter(path, meta, {n: (dtype, first.shape(n)) for n in names}) as writer:
        for name, delta in merged_tensors():
            writer.write(name, delta.to(dtype))
    _log_overlaps(inputs, stats)
    return [path]


def _log_overlaps(inputs: list[Artifact], stats: dict[tuple[int, int], Overlap]) -> None:
    for (i, j), s in stats.items():
        jaccard = "n/a" if s.jaccard is None else f"{s.jaccard:.4f}"
        conflicts = "n/a" if s.sign_conflicts is None else f"{s.sign_conflicts:.2%}"
        log.info("%s vs %s: Jaccard %s (%d shared of %d), sign conflicts on shared entries %s",
                 inputs[i].path.name, inputs[j].path.name, jaccard, s.shared, s.union, conflicts)
