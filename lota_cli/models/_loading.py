"""Hugging Face causal LMs loaded (hub ids, local directories, GGUF files), as skeletons of their config alone
(meta device: names and shapes in a second, before gigabytes of weights load), and saved."""

from __future__ import annotations

import contextlib
import logging
import os
from pathlib import Path

import torch
from torch import nn

from lota_cli import LotaError, first_line, native
from lota_cli.config import ModelConfig
from lota_cli.io import SavedModel, atomic_directory, local_directory
from lota_cli.models._frozen import prepare_quantized, quantization_config
from lota_cli.models._weights import CHECKPOINT_FINGERPRINTS
from lota_cli.tensors import fingerprint_of, nonfinite, torch_dtype

log = logging.getLogger(__package__)


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
        raise LotaError(f"cannot load model {cfg.path!r}{' / ' + cfg.gguf_file if cfg.gguf_file else ''}: "
                        f"{first_line(err)} (give a complete local model directory or a reachable hub id)") from err


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
    """(model, tokenizer) from a hub id or local directory (or GGUF file), in cfg.dtype, on the CPU; with
    cfg.quantize, its linear layers quantized as they load (bitsandbytes; the embeddings and lm_head stay in
    cfg.dtype, as transformers leaves them) and computing with their dequantized weights (models.frozen_linear)."""
    from transformers import AutoModelForCausalLM

    path, common = _checked_source(cfg)
    dtype = torch_dtype(cfg.dtype)
    if cfg.quantize:
        common["quantization_config"] = quantization_config(cfg.quantize, dtype)
        common["device_map"] = "cpu"  # quantized on the CPU as it loads; an engine moves it to its device
        fingerprints = _checkpoint_fingerprints(cfg)  # before the weights: a base lota cannot read is refused
    with _loading(cfg):
        model = AutoModelForCausalLM.from_pretrained(path, dtype=dtype, **common)
    tokenizer = load_tokenizer(cfg)
    _check_finite(model, cfg.path)
    if cfg.quantize:
        model.__dict__[CHECKPOINT_FINGERPRINTS] = fingerprints
        _own_float_tensors(model)
        log.info("model %s: %d linear layers held %s, computing in %s", cfg.path, prepare_quantized(model, dtype),
                 cfg.quantize, cfg.dtype)
    if cfg.gguf_file:  # dequantized on load: drop the quantizer so the model trains and saves as plain weights
        model.hf_quantizer = None
        if hasattr(model.config, "quantization_config"):
            del model.config.quantization_config
    if cfg.gradient_checkpointing:
        # transformers 5 renamed it (the old name warns that it is deprecated); older ones have only the old
        enable = getattr(model, "activation_checkpointing_enable", None) or model.gradient_checkpointing_enable
        enable()
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
def _own_float_tensors(model: nn.Module) -> None:
    """Copy the float tensors a quantized load left as views of the checkpoint's memory map (the embeddings,
    norms, lm_head): while one view lives, the whole file stays mapped, and every page the quantization read
    stays resident (SmolLM2-135M: 626 MiB of file pages, against 113 MiB for the copies)."""
    for param in model.parameters():  # each once, tied ones too
        if param.is_floating_point():
            param.data = param.data.clone()
    for module in model.modules():
        for key, buffer in module._buffers.items():
            if buffer is not None and buffer.is_floating_point():
                module._buffers[key] = buffer.clone()


def _checkpoint_fingerprints(cfg: ModelConfig) -> tuple[str, str]:
    """(fingerprint, model_saved_fingerprint) of the checkpoint a quantized model loads from, read from its
    files (a sample of each tensor): the same as the model's loaded unquantized, so that artifacts made over
    the quantized base match the full-precision one and the other way round."""
    directory, why_not = local_directory(cfg)
    checkpoint = SavedModel(directory) if directory is not None else None
    sources = state_dict_sources(cfg, checkpoint) if checkpoint is not None else None
    if sources is None:
        raise LotaError(f"model.quantize={cfg.quantize}: lota reads the base's checkpoint to fingerprint it, and "
                        f"cannot read {cfg.path}'s ({why_not or 'its tensor names are not the model parameters'}); "
                        "give a local model directory saved as safetensors, or drop model.quantize")
    return fingerprint_of(checkpoint.flat_tensors(sources)), checkpoint.saved_fingerprint()


@torch.no_grad()
def _check_finite(model: nn.Module, path: str) -> None:
    """Refuse weights holding NaN or Inf: training would stop at its first step with a NaN loss and blame the
    learning rate. One pass over the weights, small next to reading them from disk (of a quantized model, its
    float tensors: a non-finite weight makes its block's absmax non-finite)."""
    for name, tensor in model.state_dict().items():
        if tensor.is_floating_point() and not native.all_finite(tensor):
            raise nonfinite(f"model {path!r}: weight {name!r}",
                            "the model files are damaged or the model diverged: use an intact copy")


def _looks_local(path: str) -> bool:
    """A filesystem path rather than a hub id ('org/name')."""
    return path.startswith(("/", "./", "../", "~")) or os.path.isabs(path) or Path(path).exists()


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


def causal_lm_class(model_type: str) -> str | None:
    """transformers' causal-LM class for a config's `model_type` (what a checkpoint's `architectures` lists, and
    what mergekit and vLLM choose the model class by), or None for a type transformers does not know."""
    from transformers.models.auto.modeling_auto import MODEL_FOR_CAUSAL_LM_MAPPING_NAMES

    return MODEL_FOR_CAUSAL_LM_MAPPING_NAMES.get(model_type)


def save_model(model: nn.Module, tokenizer, directory: Path, shard_size: str | int = "2GB") -> Path:
    """Write a Hugging Face model directory (sharded safetensors + tokenizer) atomically."""
    with atomic_directory(directory) as tmp:
        model.save_pretrained(tmp, max_shard_size=shard_size)
        tokenizer.save_pretrained(tmp)
    return Path(directory)
