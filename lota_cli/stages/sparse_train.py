"""lota sparse-train: start again from w_base and train only the entries of a mask.

The result is the LoTA adapter: a sparse delta (positions + values). Outside the mask every weight stays
bitwise equal to the base (lota_cli.training's sparse layers say how).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lota_cli.artifacts import Artifact, save_sparse, stage_meta
from lota_cli.config import SparseTrainConfig
from lota_cli.models import check_tensor, check_trainable
from lota_cli.tensors import encode_positions, torch_dtype
from lota_cli.training import SparseOffReference, attach_sparse, export_model, setup, train

log = logging.getLogger(__name__)


def run(cfg: SparseTrainConfig, out: Path) -> list[Path]:
    mask = Artifact(cfg.sparse_train.mask, kinds=("mask",))

    def fits(model) -> None:  # a mask of another architecture, or of tensors lota cannot train
        for name in mask.names:
            check_tensor(model, name, mask.shape(name), str(mask.path))
        check_trainable(model, list(mask.names))

    run = setup(cfg, out, check=fits)
    mask.check_base(run.base_fingerprint, cfg.model.path)
    fits(run.model)
    positions = {n: mask.indices(n) for n in mask.names}
    trainable = attach_sparse(run.model, positions)
    log.info("sparse training %d entries in %d tensors (density %.4f)",
             sum(p.numel() for p in trainable.values()), len(trainable), mask.density())

    result = train(run.model, trainable, run.data, run.tokenizer.pad_token_id, cfg, out, run.engine,
                   depends={"stage": "sparse_train", "base": run.base_fingerprint, "mask": mask.meta.fingerprint},
                   reference=SparseOffReference())
    trained = run.engine.trained_values(trainable)

    written = []
    if run.is_main:
        dtype = torch_dtype(cfg.artifact_dtype)
        values = {n: v.to(dtype) for n, v in trained.items()}
        encoded = {n: encode_positions(mask.packed_bits(n), mask.numel(n)) for n in mask.names}
        meta = stage_meta("sparse_delta", "sparse-train", cfg, cfg.model.path, run.base_fingerprint,
                          parents=[mask.meta.fingerprint], sparsity=mask.meta.sparsity,
                          base_checkpoint=run.base_checkpoint)
        shapes = {n: mask.shape(n) for n in mask.names}
        written.append(save_sparse(out / "sparse_delta.safetensors", meta, shapes, encoded, values))
        log.info("loss %.4f -> %.4f over %d steps", result.losses[0], result.losses[-1], result.steps)
        if cfg.save_model:
            written.append(export_model(run, cfg, run.model, out / "model", trained, positions))
    return written
