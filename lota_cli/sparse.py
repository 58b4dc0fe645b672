"""Training only the masked entries of frozen weights.

Each masked nn.Linear keeps its weight frozen and gains one trainable 1-D tensor `lota_values` (one value per
masked entry) plus an int32 buffer `lota_index` of their flat positions; its forward adds the values into
the weight by index. Why this design:
  - optimizer state and persistent gradients exist only for the k masked entries, so optimizer memory
    scales with density, with stock optimizers;
  - entries outside the mask are never written, so they stay bitwise equal to the base, also with weight
    decay (which here decays the delta, not the weight);
  - the values are ordinary parameters of the module that uses them, so DDP and DeepSpeed ZeRO (which
    gathers a module's own parameters around its forward) work unchanged.
The cost is one weight-sized temporary per layer in forward, which gradient checkpointing also bounds.
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from lota_cli import LotaError


def _sparse_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    delta = self.lota_values.to(self.weight.dtype)
    weight = self.weight.reshape(-1).index_add(0, self.lota_index, delta).view_as(self.weight)
    return F.linear(x, weight, self.bias)


def _linear(model: nn.Module, name: str) -> nn.Linear:
    module_name, _, attr = name.rpartition(".")
    module = model.get_submodule(module_name)
    if attr != "weight" or not isinstance(module, nn.Linear):
        raise LotaError(f"sparse training supports the weights of nn.Linear layers; {name!r} is a "
                        f"{type(module).__name__}.{attr}: exclude it with params.exclude")
    return module


def attach(model: nn.Module, positions: dict[str, torch.Tensor],
           values: dict[str, torch.Tensor] | None = None) -> dict[str, nn.Parameter]:
    """Freeze the model and make the masked entries trainable; returns name -> lota_values parameter."""
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = {}
    for name, index in positions.items():
        module = _linear(model, name)
        device = module.weight.device
        module.register_buffer("lota_index", index.to(device), persistent=False)
        init = values[name] if values is not None else torch.zeros(index.numel())
        module.lota_values = nn.Parameter(init.to(device=device, dtype=torch.float32).clone())
        module.forward = types.MethodType(_sparse_linear_forward, module)
        trainable[name] = module.lota_values
    return trainable


@torch.no_grad()
def fold(model: nn.Module, names: list[str]) -> None:
    """Add the trained values into the weights and restore plain nn.Linear layers."""
    for name in names:
        module = _linear(model, name)
        module.weight.view(-1).index_add_(0, module.lota_index.long(), module.lota_values.to(module.weight.dtype))
        del module.lota_values, module.lota_index, module.forward
