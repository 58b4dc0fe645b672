"""Loading, fingerprinting, selecting from, patching and saving Hugging Face causal LMs."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from lota_cli import LotaError
from lota_cli.config import ModelConfig, ParamsConfig, param_matcher, selected  # noqa: F401 (selected: re-exported)
from lota_cli.checkpoint import atomic_directory
from lota_cli.stored import fingerprint_of

log = logging.getLogger(__name__)

DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16, "float16": torch.float16}


def _source(cfg: ModelConfig) -> tuple[str, dict]:
    """Where from_pretrained looks, and the GGUF keyword if any."""
    if not cfg.gguf_file:
        return cfg.path, {}
    gguf = Path(cfg.gguf_file)
    if gguf.is_absolute():
        return str(gguf.parent), {"gguf_file": gguf.name}
    return cfg.path, {"gguf_file": cfg.gguf_file}


def _checked_source(cfg: ModelConfig) -> tuple[str, dict]:
    """Where from_pretrained looks and its keywords, a local path checked to be a directory."""
    path, gguf = _source(cfg)
    if _looks_local(path) and not Path(path).is_dir():
        what = "not a directory" if Path(path).exists() else "no such directory"
        raise LotaError(f"model.path={path}: {what}; give a local model directory or a hub id")
    return path, dict(revision=cfg.revision, trust_remote_code=cfg.trust_remote_code, **gguf)


@contextlib.contextmanager
def _loading(cfg: ModelConfig):
    """transformers' loading errors (OSError, ValueError, safetensors' and tokenizers' own for damaged files)
    as one line naming the model."""
    try:
        yield
    except Exception as err:
        text = str(err)
        if "trust_remote_code" in text:
            raise LotaError(f"model {cfg.path!r} runs its own Python code (auto_map in its config.json), which lota "
                            "does not run by default; read that code, and only if you trust it set "
                            "model.trust_remote_code=true") from err
        first = next((line for line in text.splitlines() if line.strip()), type(err).__name__)
        raise LotaError(f"cannot load model {cfg.path!r}{' / ' + cfg.gguf_file if cfg.gguf_file else ''}: "
                        f"{first[:300]} (give a complete local model directory or a reachable hub id)") from err


def load_tokenizer(cfg: ModelConfig):
    """The model's tokenizer alone (what `lota data` needs), with a pad token (its EOS where it has none)."""
    from transformers import AutoTokenizer

    path, common = _checked_source(cfg)
    with _loading(cfg):
        tokenizer = AutoTokenizer.from_pretrained(path, **common)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token
    return tokenizer


def load_model(cfg: ModelConfig):
    """(model, tokenizer) from a hub id or local directory (or GGUF file), in cfg.dtype, on the CPU."""
    from transformers import AutoModelForCausalLM

    path, common = _checked_source(cfg)
    with _loading(cfg):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=DTYPES[cfg.dtype], **common)
    tokenizer = load_tokenizer(cfg)
    _check_finite(model, cfg.path)
    if cfg.gguf_file:  # dequantized on load: drop the quantizer so the model trains and saves as plain weights
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if cfg.gradient_checkpointing:
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
    return model, tokenizer


def skeleton(cfg: ModelConfig) -> nn.Module | None:
    """The model's modules and parameter shapes without its weights (on the meta device, from its config
    alone), so that names, shapes and what can train are checked in a second, before gigabytes of weights
    load. None where the config cannot be built that way; the same checks then run on the loaded model."""
    from transformers import AutoConfig, AutoModelForCausalLM

    path, gguf = _source(cfg)
    try:
        config = AutoConfig.from_pretrained(path, revision=cfg.revision, trust_remote_code=cfg.trust_remote_code,
                                            **gguf)
        with torch.device("meta"):
            return AutoModelForCausalLM.from_config(config, trust_remote_code=cfg.trust_remote_code)
    except Exception:  # a missing or unusual model: load_model says what is wrong
        log.debug("no skeleton of %s", cfg.path, exc_info=True)
        return None


@torch.no_grad()
def _check_finite(model: nn.Module, path: str) -> None:
    """Refuse weights holding NaN or Inf: training would stop at its first step with a NaN loss and blame the
    learning rate. One pass over the weights, small next to reading them from disk."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not bool(torch.isfinite(tensor).all()):
            raise LotaError(f"model {path!r}: weight {name!r} holds NaN or Inf values; the model files are "
                            "damaged or the model diverged: use an intact copy")


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id ('org/name')."""
    return path.startswith(("/", "./", "../", "~")) or os.path.isabs(path) or Path(path).exists()


def fingerprint(model: nn.Module) -> str:
    """A fast fingerprint of the weights: names, shapes and a fixed sample of values (as bf16).

    Hashing every byte of a 70B model would take minutes; a strided sample of every tensor tells bases apart
    (another fine-tune of the same architecture differs in the sampled values) at no noticeable cost.
    Values are hashed in bf16 so the same weights loaded in float32 or bfloat16 match.
    """
    return fingerprint_of((name, t.shape, t.detach().reshape(-1)) for name, t in model.state_dict().items())


def model_saved_fingerprint(model: nn.Module) -> str:
    """fingerprint_of a loaded model as save_pretrained writes it, in name order: each tensor once (tied
    weights under their first name in state_dict order), so that it equals checkpoint.Checkpoint's
    saved_fingerprint, which needs no model code (artifacts' base_checkpoint)."""
    tensors: dict[str, torch.Tensor] = {}
    seen = set()
    for name, tensor in model.state_dict().items():
        key = (tensor.untyped_storage().data_ptr(), tensor.storage_offset(), tuple(tensor.shape))
        if tensor.numel() and key in seen:
            continue  # a tied weight: saved once, under its first name
        seen.add(key)
        tensors[name] = tensor
    return fingerprint_of((name, t.shape, t.detach().reshape(-1)) for name, t in sorted(tensors.items()))


def state_dict_sources(cfg: ModelConfig, checkpoint) -> dict[str, str] | None:
    """For each key of the model's state_dict, in its order, the checkpoint tensor that holds it (a tied
    weight saved once is found under the name it is saved as), from the weightless skeleton; None when the
    checkpoint's names are not the model's (an architecture whose weights are renamed or fused on load)."""
    model = skeleton(cfg)
    if model is None:
        return None
    owner: dict[int, str] = {}  # id(parameter) -> the name the checkpoint holds it under
    for name, param in model.named_parameters(remove_duplicate=False):
        if name in checkpoint:
            owner.setdefault(id(param), name)
    sources = {}
    params = dict(model.named_parameters(remove_duplicate=False))
    for name, tensor in model.state_dict().items():
        source = name if name in checkpoint else owner.get(id(params[name])) if name in params else None
        if source is None or tuple(checkpoint.shape(source)) != tuple(tensor.shape):
            log.info("the checkpoint has no tensor %r as the model names it", name)
            return None
        sources[name] = source
    return sources


def select_params(model: nn.Module, cfg: ParamsConfig) -> list[str]:
    """selected() over the model's parameters, refusing at once (before anything trains) a selection that
    matches a tensor lota cannot train: a buffer, an integer tensor, tied weights (check_trainable)."""
    matches = param_matcher(cfg)
    for name, buffer in model.named_buffers():
        if buffer.is_floating_point() and buffer.dim() >= 2 and matches(name):
            raise LotaError(f"params.include matches {name!r}, a buffer of this model, not a parameter: it has no "
                            "gradient and is not saved as a weight, so lota cannot train it; add it to "
                            "params.exclude (or narrow params.include)")
    names = selected({n: tuple(p.shape) for n, p in model.named_parameters()}, cfg)
    check_trainable(model, names)
    return names


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
        module_name, _, attr = name.rpartition(".")
        try:
            module = model.get_submodule(module_name)
        except AttributeError:
            module = None
        param = None if module is None else module._parameters.get(attr)
        if param is None:
            raise LotaError(f"this model has no parameter {name!r}; use artifacts made from this base model")
        if not param.is_floating_point():
            raise LotaError(f"tensor {name!r} is {str(param.dtype).removeprefix('torch.')}, not floating point "
                            "(a quantized weight?): lota trains float weights; load the model unquantized "
                            "(model.dtype=bfloat16) or add it to params.exclude")
        others = [other for owner, other in holders.get(id(param), {}).items() if owner != id(module)]
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
    if tuple(param.shape) != tuple(shape):
        raise LotaError(f"{source}: tensor {name!r} is {list(shape)} but the model's is {list(param.shape)}; use "
                        "artifacts made from this base model")
    return param


@torch.no_grad()
def add_delta(model: nn.Module, artifact, scale: float = 1.0) -> None:
    """Add an artifact's delta into the model's weights in place: O(k) for a sparse delta."""
    for name in artifact.names:
        param = check_tensor(model, name, artifact.shape(name), str(artifact.path))
        if artifact.kind == "sparse_delta":
            values = artifact.values(name).to(param.dtype)
            param.view(-1).index_add_(0, artifact.indices(name).long(), values, alpha=scale)
        else:
            param.add_(artifact.dense(name, param.dtype), alpha=scale)


def save_model(model: nn.Module, tokenizer, directory: Path, shard_size: str | int = "2GB") -> Path:
    """Write a Hugging Face model directory (sharded safetensors + tokenizer) atomically."""
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp, max_shard_size=shard_size)
        tokenizer.save_pretrained(tmp)
    return Path(directory)
