"""Frozen weights and the linear layers that compute with them: a base held quantized (model.quantize, through
bitsandbytes, as QLoRA holds it), sparse deltas added to such a base, and F.linear over a frozen weight plus
sparse values that keeps no weight-sized tensor for backward.

A quantized layer computes with its weight dequantized (nf4: bitsandbytes' dequantize_4bit; int8: its
int8_vectorwise_dequant, each row times its absmax / 127), plus any sparse deltas added to it (an earlier
LoTA adapter of a LoTTO chain, a delta evaluated over the base), as F.linear does: the same computation wherever the layer is used, with or
without trainable values on it. For nf4 on the CPU it is bitwise bitsandbytes' own forward; for int8 it is
weight-only int8 (LLM.int8's own forward quantizes the activations too, which a sparse delta could not be
added to). The dequantized weight is a transient of each forward and each backward: what backward keeps is
the layer's input and references to the resident quantized weight (tests/test_quantized.py counts it).
"""

from __future__ import annotations

import types

import torch
import torch.nn.functional as F
from torch import nn


# in a quantized layer's __dict__ (not parameters, buffers or state): the dtype it computes in
_DTYPE = "_lota_compute_dtype"
# buffers of sparse deltas added to a quantized layer's weight (added_delta)
_ADDED_INDEX, _ADDED_VALUES = "lota_added_index", "lota_added_values"


def quantization_config(kind: str, dtype: torch.dtype):
    """transformers' BitsAndBytesConfig for model.quantize=`kind`, computing in `dtype`."""
    from transformers import BitsAndBytesConfig

    if kind == "nf4":
        return BitsAndBytesConfig(load_in_4bit=True, bnb_4bit_quant_type="nf4", bnb_4bit_compute_dtype=dtype)
    return BitsAndBytesConfig(load_in_8bit=True)


def is_quantized(param) -> bool:
    """Whether a parameter is a bitsandbytes-quantized weight (by class name: bitsandbytes is imported only
    where a base is quantized)."""
    return type(param).__name__ in ("Params4bit", "Int8Params")


def weight_shape(param) -> tuple[int, ...]:
    """The shape of the weight a parameter stands for: a 4-bit weight is stored packed, two entries a byte."""
    if type(param).__name__ == "Params4bit":
        return tuple(param.quant_state.shape)
    return tuple(param.shape)


def quantized_layers(model: nn.Module):
    """(name, module) of each linear layer whose weight is quantized."""
    return [(n, m) for n, m in model.named_modules() if is_quantized(m._parameters.get("weight"))]


def prepare_quantized(model: nn.Module, dtype: torch.dtype) -> int:
    """Make every quantized linear layer of a freshly loaded model compute with its dequantized weight in
    `dtype` (frozen_linear); returns how many there are."""
    layers = quantized_layers(model)
    for _, module in layers:
        module.__dict__[_DTYPE] = dtype
        module.forward = types.MethodType(_frozen_forward, module)
    return len(layers)


def _frozen_forward(self: nn.Module, x: torch.Tensor) -> torch.Tensor:
    return frozen_linear(self, x)


def frozen_weight(module: nn.Module) -> torch.Tensor:
    """The weight a linear layer computes with while frozen: its own weight; for a quantized layer the weight
    dequantized plus the sparse deltas added to it, a new tensor."""
    weight = module._parameters["weight"]
    if not is_quantized(weight):
        return weight
    dtype = module.__dict__[_DTYPE]
    from bitsandbytes import functional

    if type(weight).__name__ == "Params4bit":
        dense = functional.dequantize_4bit(weight.data, weight.quant_state).to(dtype)
    else:
        dense = functional.int8_vectorwise_dequant(weight.data, weight.SCB).to(dtype)
    added = module._buffers.get(_ADDED_INDEX)
    if added is not None:
        dense.view(-1).index_add_(0, added, module._buffers[_ADDED_VALUES].to(dtype))
    return dense


def add_to_quantized(module: nn.Module, index: torch.Tensor, values: torch.Tensor) -> None:
    """Add a sparse delta (values at flat positions) to a quantized layer's weight: kept beside it at full
    precision and added to the dequantized weight each time it is computed (the quantized bytes stay as
    loaded); several deltas accumulate."""
    device = module._parameters["weight"].device
    index, values = index.to(device=device, dtype=torch.long), values.to(device=device, dtype=torch.float32)
    if _ADDED_INDEX in module._buffers:
        index = torch.cat([module._buffers[_ADDED_INDEX], index])
        values = torch.cat([module._buffers[_ADDED_VALUES], values])
    module.register_buffer(_ADDED_INDEX, index, persistent=False)
    module.register_buffer(_ADDED_VALUES, values, persistent=False)


def with_values(base: torch.Tensor, index: torch.Tensor, values: torch.Tensor, fresh: bool = False) -> torch.Tensor:
    """base + values at their flat positions, in base's dtype: a new tensor, base untouched, unless `fresh`
    (base is a transient of the caller's: added in place)."""
    if fresh:
        return base.view(-1).index_add_(0, index, values.to(base.dtype)).view_as(base)
    return base.reshape(-1).index_add(0, index, values.to(base.dtype)).view_as(base)


def _merged(module: nn.Module, weight: torch.Tensor, index, values) -> torch.Tensor:
    base = frozen_weight(module)
    if index is None:
        return base
    return with_values(base, index, values, fresh=base is not weight)


class _FrozenLinear(torch.autograd.Function):
    """F.linear(x, frozen weight + values at index, bias) without keeping the merged weight for backward."""

    @staticmethod
    def forward(ctx, x, weight, bias, index, values, module):
        ctx.save_for_backward(x, weight, index, values)  # all but x are resident: saving them costs nothing
        ctx.module = module
        ctx.bias_dtype = None if bias is None else bias.dtype
        # under autocast F.linear computes in autocast's dtype, otherwise in the weight's: the output's
        # dtype, which grad_out has too, so backward computes in the same dtype as forward did
        return F.linear(x, _merged(module, weight, index, values), bias)

    @staticmethod
    def backward(ctx, grad_out):
        x, weight, index, values = ctx.saved_tensors
        need_x, need_weight, need_bias, _, need_values, _ = ctx.needs_input_grad
        dtype = grad_out.dtype
        grad_2d = grad_out.reshape(-1, grad_out.shape[-1])
        grad_x = grad_weight = grad_bias = grad_values = None
        if need_x:
            grad_x = (grad_out @ _merged(ctx.module, weight, index, values).to(dtype)).to(x.dtype)
        if need_weight or need_values:  # the same products, in the same order, as F.linear's backward
            dense = grad_2d.t() @ x.reshape(-1, x.shape[-1]).to(dtype)
            if need_values:
                grad_values = dense.view(-1).index_select(0, index).to(values.dtype)
            if need_weight:
                grad_weight = dense.to(weight.dtype)
        if need_bias:
            grad_bias = grad_2d.sum(0).to(ctx.bias_dtype)
        return grad_x, grad_weight, grad_bias, None, grad_values, None


def frozen_linear(module: nn.Module, x: torch.Tensor, index: torch.Tensor | None = None,
                  values: torch.Tensor | None = None) -> torch.Tensor:
    """A linear layer's output over its frozen weight (frozen_weight) plus `values` at flat positions `index`
    (if given), keeping for backward only x and references to what is resident: backward rebuilds the merged
    weight for the input's gradient (one more index_add per layer), then gathers the values' gradient from the
    dense weight gradient, a transient too: that one matmul beat gathering k products per token by 14x
    (scripts/bench_saved.py: 2048x2048, density 0.1, 512 tokens, one CPU thread: 33 against 470 ms)."""
    return _FrozenLinear.apply(x, module.weight, module.bias, index, values, module)
