"""lota sparse-train: start again from w_base and train only the entries of a mask.

The result is the LoTA adapter: a sparse delta (positions + values). Outside the mask every weight stays
bitwise equal to the base (see sparse.py for how).
"""

from __future__ import annotations

import logging
from pathlib import Path

from lota_cli.artifacts import Artifact, save_sparse, stage_meta
from lota_cli.config import SparseTrainConfig
from lota_cli.masks import encode_positions
from lota_cli.dist import uses_deepspeed
from lota_cli.models import DTYPES, check_tensor, save_model
from lota_cli import sparse
from lota_cli.training import load_base, setup, train, trained_values

log = logging.getLogger(__name__)


def run(cfg: SparseTrainConfig, out: Path) -> list[Path]:
    mask = Artifact(cfg.sparse_train.mask, kinds=("mask",))
    run = setup(cfg, out)
    mask.check_base(run.base_fingerprint, cfg.model.path)
    for name in mask.names:
        check_tensor(run.model, name, mask.shape(name), str(mask.path))
    trainable = sparse.attach(run.model, {n: mask.indices(n) for n in mask.names})
    log.info("sparse training %d entries in %d tensors (density %.4f)",
             sum(p.numel() for p in trainable.values()), len(trainable), mask.density())

    result = train(run.model, trainable, run.examples, run.tokenizer.pad_token_id, cfg, out, run.accelerator,
                   depends={"stage": "sparse_train", "base": run.base_fingerprint, "mask": mask.meta.fingerprint})

    trained = trained_values(run.accelerator, trainable)

    written = []
    if run.accelerator.is_main_process:
        dtype = DTYPES[cfg.artifact_dtype]
        values = {n: v.to(dtype) for n, v in trained.items()}
        positions = {n: encode_positions(mask.bits(n), mask.numel(n)) for n in mask.names}
        meta = stage_meta("sparse_delta", "sparse-train", cfg, cfg.model.path, run.base_fingerprint,
                          parents=[mask.meta.fingerprint], sparsity=mask.meta.sparsity)
        shapes = {n: mask.shape(n) for n in mask.names}
        written.append(save_sparse(out / "sparse_delta.safetensors", meta, shapes, positions, values))
        log.info("loss %.4f -> %.4f over %d steps", result.losses[0], result.losses[-1], result.steps)
        if cfg.save_model:
            if uses_deepspeed(run.accelerator):  # see load_base
                model = load_base(cfg, run.accelerator)
                sparse.attach(model, {n: mask.indices(n) for n in mask.names}, trained)
            else:
                model = run.accelerator.unwrap_model(run.model)
            sparse.fold(model, list(trainable))
            written.append(save_model(model, run.tokenizer, out / "model"))
    return written
