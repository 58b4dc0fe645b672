"""Training only the masked entries of frozen weights.

Each masked nn.Linear keeps its weight frozen and gains one trainable 1-D tensor `lota_values` (one value per
masked entry) plus an int32 buffer `lota_index` of their flat positions; its forward computes
F.linear(x, weight + values added at index, bias). Why this design:
  - optimizer state and persistent gradients exist only for the k masked entries, so optimizer memory
    scales with density, with stock optimizers;
  - entries outside the mask are never written, so they stay bitwise equal to the base, also with weight
    decay (which here decays the delta, not the weight);
  - the values are ordinary parameters of the module that uses them, and its forward hands them to the
    autograd function, so DDP and DeepSpeed ZeRO (which gathers a module's own parameters around its
    forward, and again around its backward) work unchanged.
The cost: no weight-sized tensor outlives its layer's forward or backward. Forward builds the merged weight
for its matmul and frees it; only the layer's input and references to the resident weight, index and values
are saved, so what backward keeps is what full fine-tuning keeps. Backward rebuilds the merged weight for
the input's gradient (one more index_add per layer), then gathers the values' gradient from the dense
weight gradient, a transient too: that one matmul beat gathering k products per token by 14x
(scripts/bench_saved.py: 2048x2048, density 0.1, 512 tokens, one CPU thread: 33 against 470 ms).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn

from lota_cli import LotaError


def _merged(weight: torch.Tensor, index: torch.Tensor, values: torch.Tensor) -> torch.Tensor:
    """weight + values at their flat positions, in the weight's dtype; a new tensor, weight untouched."""
    return weight.reshape(-1).index_add(0, index, values.to(weight.dtype)).view_as(weight)


class _SparseLinear(torch.autograd.Function):
    """F.linear(x, _merged(weight, index, values), bias) without keeping the merged weight for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, values):
        ctx.save_for_backward(x, weight, index, values)  # all but x are resident: saving them costs nothing
        ctx.bias_dtype = None if bias is None else bias.dtype
        # under autocast F.linear computes in autocast's dtype, otherwise in the weight's: the output's
        # dtype, which grad_out has too, so backward computes in the same dtype as forward did
        return F.linear(x, _merged(weight, index, values), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, index, values = ctx.saved_tensors
        need_x, need_weight, need_bias, _, need_values = ctx.needs_input_grad
        dtype = grad_out.dtype
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_weight = grad_bias = grad_values = None
        if need_x:
            grad_x = (grad_out @ _merged(weight, index, values).to(dtype)).to(x.dtype)
        if need_weight or need_values:  # the same products, in the same order, as F.linear's backward
            dense = grad_2d.t() @ x.reshape(-1, x.shape[-1]).to(dtype)
            if need_values:
                grad_values = dense.view(-1).index_select(0, index).to(values.dtype)
            if need_weight:
                grad_weight = dense.to(weight.dtype)
        if need_bias:
            grad_bias = grad_2d.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None, grad_values


def _sparse_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    return _SparseLinear.apply(x, self.weight, self.bias, self.lota_index, self.lota_values)


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
