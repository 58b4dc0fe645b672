"""LoRA as a baseline in the same trainer, through peft: its merged ΔW is a task vector like any other."""

from __future__ import annotations

import warnings

import torch
from torch import nn

from lota_cli import LotaError
from lota_cli.config import LoraOptions
from lota_cli.models._frozen import is_quantized, weight_shape


def attach_lora(model: nn.Module, names: list[str], cfg: LoraOptions):
    """Wrap the modules owning `names` (or cfg.target_modules) with LoRA adapters; returns (model, trainable)."""
    from peft import LoraConfig, get_peft_model

    # a weight of a layer PEFT wraps (Linear, Conv1D, ...) by its module; any other parameter (an MoE block's
    # fused 3-D experts) by its name, PEFT's target_parameters
    layered = [n for n in names if _wrappable(model, n)]
    parameters = [] if cfg.target_modules else [n for n in names if n not in layered]
    targets = list(cfg.target_modules) if cfg.target_modules else [n.rpartition(".")[0] for n in layered]
    if parameters and any(is_quantized(p) for p in model.parameters()):
        raise LotaError(f"LoRA over a quantized base trains linear layers only; {parameters[0]!r} is not one: add "
                        "it to params.exclude, or drop model.quantize")
    config = LoraConfig(r=cfg.r, lora_alpha=cfg.alpha, lora_dropout=cfg.dropout, target_modules=targets or None,
                        target_parameters=parameters or None, bias="none", task_type="CAUSAL_LM")
    try:
        with warnings.catch_warnings():
            # PEFT 0.21 asks transformers 5's models is_gradient_checkpointing, a name 5 deprecated: a warning
            # about PEFT's own call, on every LoRA run, that a user of lota can do nothing about
            warnings.filterwarnings("ignore", "`is_gradient_checkpointing` is deprecated", FutureWarning)
            peft_model = get_peft_model(model, config)
    except ValueError as err:
        raise LotaError(f"LoRA could not wrap lora.target_modules={targets}: {err}") from err
    trainable = {n: p for n, p in peft_model.named_parameters() if p.requires_grad}
    return peft_model, trainable


def _wrappable(model: nn.Module, name: str) -> bool:
    """Whether parameter `name` is the weight of a layer PEFT's LoRA wraps as a module."""
    from transformers.pytorch_utils import Conv1D

    module = model.get_submodule(name.rpartition(".")[0])
    return name.endswith(".weight") and isinstance(module, (nn.Linear, nn.Embedding, nn.Conv1d, nn.Conv2d, Conv1D))


def lora_delta(peft_model, trained: dict[str, torch.Tensor], names: list[str]) -> dict[str, torch.Tensor]:
    """name -> the dense delta scale·B·A of each base weight in `names`, from the trained adapter values
    (`trained`: attach_lora's trainable names -> full tensors, as an engine gathers them), in float32 and
    without touching the base: what merge_lora would add, where the base cannot take it (a quantized base)."""
    deltas = {}
    for name in names:
        prefix = f"base_model.model.{name.rpartition('.')[0]}"
        layer = peft_model.get_submodule(prefix)
        if f"{prefix}.lora_A.default.weight" not in trained:  # not a target (lora.target_modules): unchanged
            if any(key.startswith(f"{prefix}.") for key in trained):
                raise LotaError(f"internal error: {name!r} trains through LoRA's target_parameters, which "
                                "lora_delta does not read")
            deltas[name] = torch.zeros(weight_shape(layer.weight))
            continue
        a, b = (trained[f"{prefix}.lora_{x}.default.weight"].float() for x in "AB")
        delta = (b @ a) * layer.scaling["default"]
        deltas[name] = delta.t() if getattr(layer, "fan_in_fan_out", False) else delta
    return deltas


def merge_lora(peft_model) -> nn.Module:
    """Fold the adapters into the base weights in place (the original Parameter objects get w + BA·scale)."""
    return peft_model.merge_and_unload()
