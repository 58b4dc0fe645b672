"""A loaded model's weights: fingerprinted, selected (params.*), checked to be trainable by lota, and changed
by an artifact's delta."""

from __future__ import annotations

import torch
from torch import nn

from lota_cli import LotaError
from lota_cli.config import ParamsConfig, param_matcher, selected
from lota_cli.models._frozen import add_to_quantized, is_quantized, weight_shape
from lota_cli.tensors import fingerprint_of

# in a quantized model's __dict__: (fingerprint, model_saved_fingerprint) of the checkpoint it was loaded from,
# read from the checkpoint's files (models.load_model): its own state_dict holds the quantized bytes
CHECKPOINT_FINGERPRINTS = "_lota_checkpoint_fingerprints"


def fingerprint(model: nn.Module) -> str:
    """A fast fingerprint of the weights (tensors.fingerprint_of over the state_dict, in its order): names,
    shapes and a fixed sample of values as bfloat16, the same loaded in float32 or bfloat16, or quantized
    (then it is the checkpoint's, read from its files)."""
    if CHECKPOINT_FINGERPRINTS in model.__dict__:
        return model.__dict__[CHECKPOINT_FINGERPRINTS][0]
    return fingerprint_of((name, t.shape, t.detach().reshape(-1)) for name, t in model.state_dict().items())


def model_saved_fingerprint(model: nn.Module) -> str:
    """fingerprint_of a loaded model as save_pretrained writes it, in name order: each tensor once (tied
    weights under their first name in state_dict order), so that it equals io.SavedModel's
    saved_fingerprint, which needs no model code (artifacts' base_checkpoint)."""
    if CHECKPOINT_FINGERPRINTS in model.__dict__:
        return model.__dict__[CHECKPOINT_FINGERPRINTS][1]
    tensors: dict[str, torch.Tensor] = {}
    seen = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue  # a tied weight: saved once, under its first name
        seen.add(key)
        tensors[name] = tensor
    return fingerprint_of((name, t.shape, t.detach().reshape(-1)) for name, t in sorted(tensors.items()))


def select_params(model: nn.Module, cfg: ParamsConfig) -> list[str]:
    """selected() over the model's parameters, refusing at once (before anything trains) a selection that
    matches a tensor lota cannot train: a buffer, an integer tensor, tied weights (check_trainable)."""
    matches = param_matcher(cfg)
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point() and buffer.dim() >= 2 and matches(name):
            raise LotaError(f"params.include matches {name!r}, a buffer of this model, not a parameter: it has no "
                            "gradient and is not saved as a weight, so lota cannot train it; add it to "
                            "params.exclude (or narrow params.include)")
    names = selected({n: weight_shape(p) for n, p in model.named_parameters()}, cfg)
    check_trainable(model, names)
    return names


def owner(model: nn.Module, name: str) -> tuple[nn.Module, str] | None:
    """(the module that holds parameter `name`, its attribute there), or None where the model has no such
    parameter (a missing name, a buffer)."""
    module_name, _, attr = name.rpartition(".")
    try:
        module = model.get_submodule(module_name)
    except AttributeError:
        return None
    return (module, attr) if module._parameters.get(attr) is not None else None


def check_trainable(model: nn.Module, names: list[str]) -> None:
    """Refuse, with one line naming the tensor and the fix, a tensor lota cannot train:
      - a buffer (no gradient, not a weight), or a name the model does not have;
      - a tensor that is not floating point (quantized weights);
      - a parameter shared by two modules (tied weights, e.g. embeddings tied to lm_head): a sparse delta
        reaches the merged tensor only inside its owning module's forward, so the other use would compute
        with the base (calibrate refuses it too: its task vector would pick entries sparse-train cannot train);
      - a parameter held by a container whose forward is never called (nn.ParameterList / ParameterDict):
        the owning module's forward is where sparse training merges the values in.
    """
    holders: dict[int, dict[int, str]] = {}  # id(parameter) -> id(module) -> one name for it there
    for module_name, module in model.named_modules(remove_duplicate=False):
        for attr, param in module._parameters.items():
            if param is not None:
                holders.setdefault(id(param), {}).setdefault(id(module), f"{module_name}.{attr}".lstrip("."))
    buffers = {n for n, _ in model.named_buffers()}
    for name in names:
        if name in buffers:
            raise LotaError(f"tensor {name!r} is a buffer of this model, not a parameter: lota trains parameters "
                            "only; leave it out (params.exclude, or a mask made without it)")
        held = owner(model, name)
        if held is None:
            raise LotaError(f"this model has no parameter {name!r}; use artifacts made from this base model")
        module, attr = held
        param = module._parameters[attr]
        if not param.is_floating_point() and not (is_quantized(param) and attr == "weight"):
            raise LotaError(f"tensor {name!r} is {str(param.dtype).removeprefix('torch.')}, not floating point "
                            "(a quantized weight?): lota trains float weights; load the model unquantized "
                            "(model.dtype=bfloat16) or add it to params.exclude")
        others = [other for holder, other in holders.get(id(param), {}).items() if holder != id(module)]
        if others:
            raise LotaError(f"tensor {name!r} is the same parameter as {others[0]!r} (tied weights): a sparse "
                            "delta would reach only one of its uses; add it to params.exclude, or untie the "
                            "weights (tie_word_embeddings=false in the model's config.json) and train both")
        if getattr(type(module), "forward", None) is nn.Module.forward:
            raise LotaError(f"tensor {name!r} is held by a {type(module).__name__}, a container that is never "
                            "called: lota trains a tensor inside the forward of the module that owns it; add "
                            "it to params.exclude")


def check_tensor(model: nn.Module, name: str, shape: tuple[int, ...], source: str) -> torch.Tensor:
    """The model's parameter `name`, refusing a name or shape the model does not have."""
    try:
        param = model.get_parameter(name)
    except AttributeError:
        if name in {n for n, _ in model.named_buffers()}:
            raise LotaError(f"{source} has tensor {name!r}, which is a buffer of this model, not a parameter: lota "
                            "trains and adds deltas to parameters only; use an artifact made without it") from None
        raise LotaError(f"{source} has tensor {name!r}, which this model does not have; it was made for another "
                        "architecture: use artifacts made from this base model") from None
    if weight_shape(param) != tuple(shape):
        raise LotaError(f"{source}: tensor {name!r} is {list(shape)} but the model's is "
                        f"{list(weight_shape(param))}; use "
                        "artifacts made from this base model")
    return param


@torch.no_grad()
def add_delta(model: nn.Module, artifact, scale: float = 1.0) -> None:
    """Add an artifact's delta into the model's weights in place: O(k) for a sparse delta. A quantized weight
    keeps a sparse delta beside it (models.add_to_quantized); a dense one cannot be added to it."""
    for name in artifact.names:
        param = check_tensor(model, name, artifact.shape(name), str(artifact.path))
        if is_quantized(param):
            if artifact.kind != "sparse_delta":
                raise LotaError(f"{artifact.path} is a dense {artifact.kind}: it cannot be added to the quantized "
                                f"weight {name!r}; apply it to the full-precision base (drop model.quantize), or "
                                "extract a mask and sparse-train")
            module = model.get_submodule(name.rpartition(".")[0])
            add_to_quantized(module, artifact.indices(name), artifact.values(name).float() * scale)
        elif artifact.kind == "sparse_delta":  # (on the parameter's device: eval adds to a model on the GPU)
            values = artifact.values(name).to(device=param.device, dtype=param.dtype)
            param.view(-1).index_add_(0, artifact.indices(name).long().to(param.device), values, alpha=scale)
        else:
            param.add_(artifact.dense(name, param.dtype).to(param.device), alpha=scale)
