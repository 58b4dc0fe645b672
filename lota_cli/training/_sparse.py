"""Training only the masked entries of frozen weights.

Every masked tensor stays frozen and gains one trainable fp32 1-D tensor of values (one per masked entry)
plus an int32 buffer of their flat row-major positions over the whole tensor, both registered on the module
that owns the tensor: `lota_values` / `lota_index` for its `weight`, `lota_values_<name>` /
`lota_index_<name>` for any other parameter (an MoE block's fused 3-D `experts.gate_up_proj`, a bias, ...).
The module computes with the merged tensor, weight + values added at index. Why this design:
  - optimizer state and persistent gradients exist only for the k masked entries, so optimizer memory
    scales with density, with stock optimizers;
  - entries outside the mask are never written, so they stay bitwise equal to the base, also with weight
    decay (which here decays the delta, not the weight);
  - the values are ordinary parameters of the module that uses them, read inside its forward, so DDP and
    DeepSpeed ZeRO (which gathers a module's own parameters around its forward, and again around its
    backward) work unchanged.

Two ways of computing with the merged tensor, neither keeping a weight-sized copy for backward:

nn.Linear's weight, and a quantized linear layer's (models.frozen_linear, an autograd function): forward
builds the merged weight (over the dequantized base, for a quantized layer) for its matmul and frees it; only
the layer's input and references to the resident weight, index and values are saved, so what backward keeps
is what full fine-tuning keeps. Backward rebuilds the merged weight for the input's gradient, then gathers
the values' gradient from the dense weight gradient, a transient too. A quantized layer's values train
relative to its dequantized weight: outside the mask it computes with exactly that weight.

Any other parameter (the general path: Conv1D's weight, 3-D expert stacks, a router, an embedding, any 1-D or
N-D parameter read by arbitrary module code): the module's class is swapped for a subclass (as
torch.nn.utils.parametrize does) in which, while the module's own forward runs, the attribute reads as the
merged tensor, built once per forward on first use (the eager experts loop reads it once per expert). The
parameter keeps its name, its owner and its place in the state dict; outside the forward the attribute is the
frozen parameter itself, as for nn.Linear. The consuming ops (F.linear, addmm, grouped_mm, ...) save the merged
tensor for backward; inside the forward a saved-tensors hook stores a recipe instead of any tensor that
shares the merged tensor's storage (the tensor itself, an expert's slice, a transposed view), and backward
rebuilds it once per module from the resident weight, index and values, then frees it when the last op that
saved it has run (the same transient as frozen_linear's). The values' gradient is index_add's: the dense
gradient of the merged tensor gathered at the index, a transient. So backward keeps what full fine-tuning
keeps (tests/test_any_weight.py, 8 tokens: a Qwen3-MoE with 8 experts of 256 keeps 0.32 MiB, as full
fine-tuning does, against 12.3 MiB when its merged experts are saved; GPT-2's Conv1D 0.95 against 22 MiB).
What the hook cannot avoid: an op that saves a *copy* made from the merged tensor (autocast's bf16 cast of
an fp32 weight, a .contiguous() of a transposed view) keeps that copy, as full fine-tuning keeps its own;
there the general path is the fallback that keeps a merged copy for backward. Code outside the owning
module's forward that reads the parameter directly sees the frozen base and trains nothing through that use
(models.check_trainable refuses the common case, a parameter tied between modules).
"""

from __future__ import annotations

import contextlib
import threading
import types

import torch
from torch import nn

from lota_cli import LotaError
from lota_cli.models import check_trainable, frozen_linear, is_quantized, owner, with_values


_SWITCH = threading.local()  # .off: the attached values are left out of every forward (sparse_off)


@contextlib.contextmanager
def sparse_off():
    """While inside, every module with attached values computes with its frozen tensors alone: the model as it
    was before attach_sparse (preference training's reference, with no second copy of the model). For this
    thread's forwards; under an engine, inside the engine's forward too (the values are gathered, then unused)."""
    was = _off()
    _SWITCH.off = True
    try:
        yield
    finally:
        _SWITCH.off = was


def _off() -> bool:
    return getattr(_SWITCH, "off", False)


def _sparse_linear_forward(self: nn.Linear, x: torch.Tensor) -> torch.Tensor:
    if _off():
        return frozen_linear(self, x)
    if _ATTRS in self.__dict__:  # other masked tensors too (its bias): they read merged inside _Merging
        with _Merging(self):
            return frozen_linear(self, x, self.lota_index, self.lota_values)
    return frozen_linear(self, x, self.lota_index, self.lota_values)


# --------------------------------------------------------------------------- the general path

# bookkeeping kept in a module's __dict__ (not nn.Module attributes: never parameters, buffers or state)
_BASE = "_lota_base_class"  # the class before the swap
_ATTRS = "_lota_attrs"  # names of the parameters on the general path
_CACHE = "_lota_merged"  # attr -> merged tensor, present only while the module's forward runs


def _names(attr: str) -> tuple[str, str]:
    """(index buffer, values parameter) names for the masked parameter `attr` of a module."""
    return ("lota_index", "lota_values") if attr == "weight" else (f"lota_index_{attr}", f"lota_values_{attr}")


class _Recipe:
    """How to rebuild one merged tensor in backward, shared by every saved tensor that views it; the rebuilt
    tensor lives as long as the last of them (the module's backward), not from forward to backward."""

    __slots__ = ("weight", "index", "values", "version", "merged")

    def __init__(self, module: nn.Module, attr: str):
        index_name, values_name = _names(attr)
        self.weight, self.index = module._parameters[attr], module._buffers[index_name]
        self.values = module._parameters[values_name]
        self.version = self.values._version
        self.merged = None

    def rebuild(self) -> torch.Tensor:
        if self.merged is None:
            # (under DeepSpeed the partitioned values' version moves when it gathers them)
            if self.values._version != self.version and not hasattr(self.values, "ds_id"):
                raise RuntimeError("lota_values were modified in place between a forward and its backward")
            with torch.no_grad():
                self.merged = with_values(self.weight, self.index, self.values)
        return self.merged


class _Saved:
    """What a saved-tensors hook keeps instead of a view of a merged tensor."""

    __slots__ = ("recipe", "size", "stride", "offset")

    def __init__(self, recipe: _Recipe, tensor: torch.Tensor):
        self.recipe, self.size, self.stride, self.offset = recipe, tensor.size(), tensor.stride(), tensor.storage_offset()


def _storage(tensor: torch.Tensor) -> int | None:
    try:
        return tensor.untyped_storage().data_ptr()
    except (RuntimeError, NotImplementedError):  # no storage: sparse, nested, fake tensors
        return None


class _Merging:
    """While a module's forward runs: its general-path parameters read as merged tensors (built on first use,
    once), and ops saving a view of one save a recipe instead (saved_tensors_hooks). The hook knows the merged
    tensors of every module whose forward is running (a parent's merged tensor saved inside a child's forward
    is found too)."""

    _active = threading.local()  # .stack: the running _Merging contexts of this thread, outermost first

    def __init__(self, module: nn.Module):
        self.module = module

    def __enter__(self):
        self.nested = _CACHE in self.module.__dict__  # re-entered (a module calling itself): share the outer
        if self.nested:
            return self
        self.module.__dict__[_CACHE] = {}
        self.recipes: dict[str, _Recipe] = {}
        self.stack = self._active.__dict__.setdefault("stack", [])
        self.stack.append(self)
        self.hooks = None
        if torch.is_grad_enabled():
            self.hooks = torch.autograd.graph.saved_tensors_hooks(self._pack, _unpack)
            self.hooks.__enter__()
        return self

    def __exit__(self, *exc):
        if not self.nested:
            if self.hooks is not None:
                self.hooks.__exit__(*exc)
            self.stack.remove(self)
            del self.module.__dict__[_CACHE]
        return False

    def _pack(self, tensor: torch.Tensor):
        if tensor.numel() == 0:
            return tensor
        where = _storage(tensor)
        for context in reversed(self.stack):
            for attr, merged in context.module.__dict__.get(_CACHE, {}).items():
                if where == _storage(merged) and tensor.dtype == merged.dtype and tensor.device == merged.device:
                    if attr not in context.recipes:
                        context.recipes[attr] = _Recipe(context.module, attr)
                    return _Saved(context.recipes[attr], tensor)
        return tensor


def _unpack(saved):
    if isinstance(saved, _Saved):
        return saved.recipe.rebuild().as_strided(saved.size, saved.stride, saved.offset)
    return saved


def _reader(attr: str):
    """The property getter of a general-path parameter: merged inside its module's forward, else itself."""
    index_name, values_name = _names(attr)

    def read(self):
        param = self._parameters[attr]
        cache = self.__dict__.get(_CACHE)
        if cache is None:
            return param
        if attr not in cache:
            cache[attr] = with_values(param, self._buffers[index_name], self._parameters[values_name])
        return cache[attr]

    return property(read)


def _merging_forward(self, *args, **kwargs):
    if _off():  # outside _Merging every attribute reads as the frozen parameter itself
        return self.__dict__[_BASE].forward(self, *args, **kwargs)
    with _Merging(self):
        return self.__dict__[_BASE].forward(self, *args, **kwargs)


_CLASSES: dict[tuple[type, frozenset], type] = {}


def _swapped_class(base: type, attrs: frozenset) -> type:
    """base with the general-path parameters `attrs` as properties and its forward run inside _Merging; named
    like base, so that code matching class names (e.g. DeepSpeed's leaf modules) still finds it."""
    key = (base, attrs)
    if key not in _CLASSES:
        namespace = {attr: _reader(attr) for attr in attrs}
        namespace.update(forward=_merging_forward, __module__=base.__module__, __qualname__=base.__qualname__)
        _CLASSES[key] = type(base.__name__, (base,), namespace)
    return _CLASSES[key]


def _set_attrs(module: nn.Module, attrs: set[str]) -> None:
    """Swap module's class for the one with `attrs` on the general path (none: restore its own class)."""
    base = module.__dict__.setdefault(_BASE, type(module))
    if attrs:
        module.__dict__[_ATTRS] = attrs
        module.__class__ = _swapped_class(base, frozenset(attrs))
    else:
        module.__class__ = base
        del module.__dict__[_BASE], module.__dict__[_ATTRS]


def _owner(model: nn.Module, name: str) -> tuple[nn.Module, str]:
    held = owner(model, name)
    if held is None:
        raise LotaError(f"sparse training: the model has no parameter {name!r}; use a mask made from this model")
    return held


def _fast(module: nn.Module, attr: str) -> bool:
    """Whether `attr` of `module` takes the nn.Linear path (a plain nn.Linear's weight, or a quantized one's)."""
    if attr != "weight":
        return False
    return (is_quantized(module._parameters["weight"])
            or getattr(module.__dict__.get(_BASE, type(module)), "forward", None) is nn.Linear.forward)


def attach_sparse(model: nn.Module, positions: dict[str, torch.Tensor],
           values: dict[str, torch.Tensor] | None = None) -> dict[str, nn.Parameter]:
    """Freeze the model and make the masked entries trainable; returns name -> values parameter.

    Attaching a tensor again replaces its positions and values. Tensors lota cannot train (a buffer, an
    integer tensor, a parameter tied between modules, one held by a container that is never called) are
    refused first, naming the tensor and the fix (models.check_trainable)."""
    check_trainable(model, list(positions))
    for p in model.parameters():
        p.requires_grad_(False)
    trainable = {}
    for name, index in positions.items():
        module, attr = _owner(model, name)
        param = module._parameters[attr]
        index_name, values_name = _names(attr)
        module.register_buffer(index_name, index.to(param.device), persistent=False)
        init = values[name] if values is not None else torch.zeros(index.numel())
        module.register_parameter(values_name,
                                  nn.Parameter(init.to(device=param.device, dtype=torch.float32).clone()))
        if _fast(module, attr):
            module.forward = types.MethodType(_sparse_linear_forward, module)
        else:
            _set_attrs(module, module.__dict__.get(_ATTRS, set()) | {attr})
        trainable[name] = module._parameters[values_name]
    return trainable


@torch.no_grad()
def fold_sparse(model: nn.Module, names: list[str]) -> None:
    """Add the trained values into their tensors and restore the modules as they were before attach."""
    for name in names:
        module, attr = _owner(model, name)
        index_name, values_name = _names(attr)
        if values_name not in module._parameters:
            raise LotaError(f"sparse training: {name!r} has no values attached to fold")
        param, index, vals = module._parameters[attr], module._buffers[index_name], module._parameters[values_name]
        if is_quantized(param):
            raise LotaError(f"sparse training: {name!r} is quantized; its values are added to the full-precision "
                            "base instead (models.add_delta on a model loaded without model.quantize)")
        param.view(-1).index_add_(0, index.long(), vals.to(param.dtype))
        delattr(module, values_name)
        delattr(module, index_name)
        if _fast(module, attr):
            del module.forward  # back to its class's forward
        else:
            _set_attrs(module, module.__dict__[_ATTRS] - {attr})
