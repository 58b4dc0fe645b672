"""lota lotto: Lottery Ticket Transfer (LoTTO), a new task after earlier LoTA adapters.

The model being adapted is base + the earlier sparse deltas. Calibration on the new task keeps every entry
of an earlier mask frozen (restored after each optimizer step, so it stays bitwise unchanged), or, with
lotto.calibrate_method=lora (the default over a quantized base, whose weights cannot train), trains LoRA
adapters whose scale·BA is the delta; the new mask is drawn from the remaining entries only, so it is
disjoint from every earlier mask; then the masked entries are sparse-trained from base + earlier deltas.
Output: the new sparse delta (and, with save_model, the model of the whole chain).

Phases write into out/calibrate and out/sparse-train (metrics, checkpoints); the new mask is saved as
out/mask.safetensors, so a resumed run that finds it skips the calibration.
"""

from __future__ import annotations

import dataclasses
import logging
from pathlib import Path

import numpy as np
import torch

from lota_cli import LotaError
from lota_cli.artifacts import Artifact, save_sparse, stage_meta
from lota_cli.config import LottoConfig
from lota_cli.inputs import open_artifact
from lota_cli.models import add_delta, attach_lora, select_params, weight_shape
from lota_cli.ops import k_for, top_k_mask
from lota_cli.tensors import count_bits, encode_positions, pack_bits, torch_dtype, unpack_bits
from lota_cli.training import (PrecomputedReference, SparseOffReference, attach_sparse, export_model, load_base,
                               lora_task_vector, setup, train)

log = logging.getLogger(__name__)


def _frozen_union(previous: list[Artifact], names: list[str]) -> dict[str, np.ndarray]:
    """Packed bits of every entry an earlier adapter owns, refusing earlier masks that overlap."""
    union = {}
    for name in names:
        owned = None
        for prev in previous:
            if name not in prev.meta.shapes:
                continue
            mask = unpack_bits(prev.packed_bits(name), prev.numel(name))
            if owned is not None and bool((owned & mask).any()):
                raise LotaError(f"earlier adapters overlap in {name!r} ({prev.path}); a LoTTO chain needs "
                                "disjoint masks: build each with lota lotto after the ones before it")
            owned = mask if owned is None else owned | mask
        if owned is not None:
            union[name] = pack_bits(owned)
    return union


def _dense_calibration(run, model, names: list[str], numel: dict[str, int], frozen: dict[str, np.ndarray],
                       cfg: LottoConfig, out: Path, depends: dict) -> dict[str, torch.Tensor]:
    """Fine-tune the selected weights densely, every entry of an earlier mask restored after each optimizer
    step; the delta from base + earlier deltas (on the main process; {} on the others)."""
    engine, main = run.engine, run.is_main
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = {n: model.get_parameter(n).requires_grad_(True) for n in names}
    start = run.start_values(trainable)  # base + earlier deltas, for the delta that picks the mask
    frozen_index = {n: torch.from_numpy(np.flatnonzero(unpack_bits(b, numel[n]))) for n, b in frozen.items()}
    frozen_values = {n: trainable[n].detach().reshape(-1)[i].clone() for n, i in frozen_index.items()}

    def restore_frozen() -> None:
        for n, index in frozen_index.items():
            engine.write_entries(trainable[n], index, frozen_values[n])

    train(model, trainable, run.data, run.tokenizer.pad_token_id, cfg, out, engine,
          depends={"phase": "calibrate", **depends}, after_step=restore_frozen, reference=PrecomputedReference())
    trained = engine.trained_values(trainable)
    return {n: trained[n] - start[n].float() for n in names} if main else {}


def _lora_calibration(run, model, names: list[str], cfg: LottoConfig, out: Path,
                      depends: dict) -> dict[str, torch.Tensor]:
    """Train LoRA adapters (lora.*) over base + earlier deltas, which stay as they are; the delta is scale·BA
    (on the main process; {} on the others): merged into the weights and taken against them as calibrate
    does, or, over a quantized base, computed from the adapters. The earlier masks' entries are left out when
    the mask is drawn."""
    for p in model.parameters():
        p.requires_grad_(False)
    selected = {n: model.get_parameter(n) for n in names}
    start = None if cfg.model.quantize else run.start_values(selected)
    peft_model, fitted = attach_lora(model, names, cfg.lora)
    train(peft_model, fitted, run.data, run.tokenizer.pad_token_id, cfg, out, run.engine,
          depends={"phase": "calibrate", "method": "lora", **depends}, reference=PrecomputedReference())
    return lora_task_vector(run, peft_model, fitted, selected, start)[0]


def run(cfg: LottoConfig, out: Path) -> list[Path]:
    if not cfg.lotto.previous:
        raise LotaError("lotto.previous is empty: give the earlier adapters, e.g. lotto.previous=[a.safetensors]; "
                        "for a first task use calibrate, extract and sparse-train")
    previous = [open_artifact(p, kinds=("sparse_delta",)) for p in cfg.lotto.previous]
    run = setup(cfg, out, check=lambda model: select_params(model, cfg.params))
    engine, main = run.engine, run.is_main
    model = run.model
    for prev in previous:
        prev.check_base(run.base_fingerprint, cfg.model.path)
        add_delta(model, prev)
    names = select_params(model, cfg.params)
    shapes = {n: weight_shape(model.get_parameter(n)) for n in names}
    numel = {n: torch.Size(s).numel() for n, s in shapes.items()}
    frozen = _frozen_union(previous, names)
    depends = {"base": run.base_fingerprint, "previous": [p.meta.fingerprint for p in previous]}

    total = sum(numel.values())
    free = total - sum(count_bits(b) for b in frozen.values())
    k = k_for(cfg.lotto.sparsity, total)
    if k > free:
        raise LotaError(f"lotto.sparsity={cfg.lotto.sparsity} asks for {k:,} entries but only {free:,} of "
                        f"{total:,} ({free / total:.2%}) are left after {len(previous)} earlier adapters; "
                        "raise lotto.sparsity or start a new chain")

    # Phase 1: calibrate with the earlier masks frozen, unless a resumed run already has the new mask.
    mask_path = out / "mask.safetensors"
    if cfg.resume and mask_path.is_file():
        log.info("resuming: found the new mask %s, skipping calibration", mask_path)
    else:
        steps = cfg.lotto.calibrate_steps or cfg.train.max_steps
        phase1 = dataclasses.replace(cfg, train=dataclasses.replace(cfg.train, max_steps=steps))
        if cfg.calibration() == "lora":
            delta = _lora_calibration(run, model, names, phase1, out / "calibrate", depends)
        else:
            delta = _dense_calibration(run, model, names, numel, frozen, phase1, out / "calibrate", depends)
        if main:
            chosen = top_k_mask(delta, k, excluded=frozen)
            source = {"name": "task_vector", "stage": "lotto", "calibrate_steps": steps,
                      "calibrate_method": cfg.calibration(),
                      "excluded": depends["previous"]}  # the earlier adapters' entries, left out
            meta = stage_meta("mask", "lotto", cfg, cfg.model.path, run.base_fingerprint,
                              parents=depends["previous"], sparsity=cfg.lotto.sparsity,
                              base_checkpoint=run.base_checkpoint, source=source)
            save_sparse(mask_path, meta, shapes, {n: encode_positions(chosen[n], numel[n]) for n in names})
        del delta, model
        engine.accelerator.wait_for_everyone()  # every process reads the mask the main one chose
        # back to base + earlier deltas for the sparse phase, in a fresh model: an engine takes a model once
        engine.accelerator.free_memory()
        model = load_base(cfg, engine, previous)
    chosen_mask = Artifact(mask_path, kinds=("mask",))
    new_mask = {n: chosen_mask.packed_bits(n) for n in names}

    for prev in previous:  # verified, not assumed
        shared = sum(int(np.count_nonzero(unpack_bits(new_mask[n], numel[n]) & unpack_bits(prev.packed_bits(n),
                                                                                            prev.numel(n))))
                     for n in names if n in prev.meta.shapes)
        if shared:
            raise LotaError(f"internal error: the new mask shares {shared} entries with {prev.path}")
        log.info("overlap with %s: 0 entries", prev.path)

    # Phase 2: sparse-train the new mask from base + earlier deltas.
    positions = {n: torch.from_numpy(np.flatnonzero(unpack_bits(new_mask[n], numel[n]))).int() for n in names}
    trainable = attach_sparse(model, positions)
    result = train(model, trainable, run.data, run.tokenizer.pad_token_id, cfg, out / "sparse-train",
                   engine, depends={"phase": "sparse-train", **depends}, reference=SparseOffReference())
    trained = engine.trained_values(trainable)

    written = []
    if main:
        dtype = torch_dtype(cfg.artifact_dtype)
        values = {n: v.to(dtype) for n, v in trained.items()}
        meta = stage_meta("sparse_delta", "lotto", cfg, cfg.model.path, run.base_fingerprint,
                          parents=depends["previous"], sparsity=cfg.lotto.sparsity,
                          base_checkpoint=run.base_checkpoint)
        encoded = {n: encode_positions(new_mask[n], numel[n]) for n in names}
        written.append(save_sparse(out / "sparse_delta.safetensors", meta, shapes, encoded, values))
        log.info("loss %.4f -> %.4f over %d steps", result.losses[0], result.losses[-1], result.steps)
        if cfg.save_model:
            written.append(export_model(run, cfg, model, out / "model", trained, positions, previous))
    return written
