"""The memory a training stage needs per device, from a model's config alone (its weightless skeleton) and the
stage's settings: what `lota plan` prints.

Each part is counted as lota holds it (bytes of one device, of one process on a CPU):
  - base: the weights, by model.dtype; model.quantize's linear weights at bitsandbytes' size (nf4: half a byte
    an entry plus a float32 absmax per 64; int8: a byte plus a float32 scale per row), the embeddings and
    lm_head at model.dtype, as transformers leaves them;
  - trained: LoTA's values, their gradients and index (4 + 4 + 4 B an entry, int32 positions) and the
    optimizer's state (AdamW 8 B, adamw8bit 2 B, SGD with momentum 4 B), at density k / selected entries; FFT's gradients
    and state of every selected weight at model.dtype (and calibrate's copy of them, to subtract); LoRA's
    r·(in + out) values per target at float32;
  - activations: what backward keeps per token of a micro-batch (batch_size / N sequences of task.max_length):
    per layer about 10·hidden + 4·kv + 5·intermediate values (norms, projections, SDPA's inputs and output,
    SwiGLU's halves), the logits three times (logits, log-softmax, their gradient); with gradient
    checkpointing one hidden state per layer plus one layer's worth;
  - temporaries: a merged (or dequantized) weight and its dense gradient, the largest linear layer's, twice;
  - overhead: the process itself (torch and transformers on a CPU, the CUDA context on a GPU), plan.overhead.
Engines: ddp keeps a second copy of the gradients (its buckets); zero2 splits gradients and optimizer state
over N devices; zero3 and fsdp split the base and the trained values too.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from torch import nn

from lota_cli.models import select_params

_BYTES = {"float32": 4, "bfloat16": 2, "float16": 2}


@dataclass
class Shape:
    """What the estimate reads from a model: parameter counts and the dimensions activations scale with."""

    base: float  # bytes of the weights as held
    selected: int  # entries of the selected weights
    lora: int  # LoRA values over the selected weights' modules
    largest: int  # entries of the largest selected weight
    layers: int
    hidden: int
    intermediate: int
    kv: int
    vocab: int


def model_shape(model: nn.Module, cfg) -> Shape:
    """The Shape of a (meta-device) model under stage config `cfg` (model.dtype, model.quantize, params, lora)."""
    config = model.config
    dtype_bytes = _BYTES[cfg.model.dtype]
    names = select_params(model, cfg.params)
    linears = {name for name, module in model.named_modules() if isinstance(module, nn.Linear)}
    output = model.get_output_embeddings()
    base, seen = 0.0, set()
    for name, param in model.named_parameters(remove_duplicate=False):
        if id(param) in seen:
            continue
        seen.add(id(param))
        owner = name.rpartition(".")[0]
        quantized = (cfg.model.quantize and owner in linears and name.endswith(".weight")
                     and model.get_submodule(owner) is not output)
        n = param.numel()
        if quantized and cfg.model.quantize == "nf4":
            base += n / 2 + n / 64 * 4 + 16 * 4  # packed entries, an absmax per block, the 16-value code
        elif quantized:
            base += n + param.shape[0] * 4
        else:
            base += n * dtype_bytes
    params = dict(model.named_parameters())
    lora = 0
    for name in names:
        shape = params[name].shape
        if len(shape) == 2:
            lora += cfg.lora.r * (shape[0] + shape[1])
    hidden = config.hidden_size
    heads = getattr(config, "num_attention_heads", 1)
    head_dim = getattr(config, "head_dim", None) or hidden // heads
    kv = getattr(config, "num_key_value_heads", heads) * head_dim
    return Shape(base=base, selected=sum(params[n].numel() for n in names), lora=lora,
                 largest=max((params[n].numel() for n in names), default=0),
                 layers=config.num_hidden_layers, hidden=hidden,
                 intermediate=getattr(config, "intermediate_size", 4 * hidden), kv=kv, vocab=config.vocab_size)


def _optimizer_bytes(cfg) -> int:
    """Optimizer state per trained float32 value."""
    if cfg.optim.name == "adamw":
        return 8
    if cfg.optim.name == "adamw8bit":
        return 2
    return 4 if cfg.optim.momentum else 0


def _trained(shape: Shape, cfg, stage: str, density: float, method: str) -> dict[str, float]:
    """{values, gradients, optimizer}: the bytes of what trains, over all devices."""
    state = _optimizer_bytes(cfg)
    if stage == "eval":
        return {"values": 0.0, "gradients": 0.0, "optimizer": 0.0}
    if method == "lora":
        return {"values": 4.0 * shape.lora, "gradients": 4.0 * shape.lora, "optimizer": state * shape.lora}
    if method == "fft":
        n, b = shape.selected, _BYTES[cfg.model.dtype]
        # the optimizer's state is in the weights' dtype; calibrate keeps the selected weights once more
        return {"values": n * b, "gradients": n * b, "optimizer": n * b * state / 4}
    k = math.ceil(density * shape.selected)
    return {"values": 8.0 * k, "gradients": 4.0 * k, "optimizer": state * k}  # values + int32 index


def _activations(shape: Shape, tokens: int, checkpointing: bool, train: bool, dtype_bytes: int) -> float:
    per_layer = 10 * shape.hidden + 4 * shape.kv + 5 * shape.intermediate
    logits = 3 * shape.vocab * 4 if train else 2 * shape.vocab * 4
    if not train:  # a forward keeps one layer's values at a time
        return tokens * (per_layer * dtype_bytes + logits)
    layers = (shape.layers * shape.hidden + per_layer) if checkpointing else shape.layers * per_layer
    return tokens * (layers * dtype_bytes + logits)


def plan(shape: Shape, cfg, stage: str, density: float, method: str, engine: str, devices: int,
         overhead: float) -> dict[str, float]:
    """Bytes per device, by part, for `stage` on `devices` devices under `engine`."""
    dtype_bytes = _BYTES[cfg.model.dtype]
    trained = _trained(shape, cfg, stage, density, method)
    if stage == "calibrate" and method == "fft":
        trained["values"] += shape.selected * 4  # the copy of the base the task vector is taken against
    split_state = devices if engine in ("zero2", "zero3", "fsdp") else 1
    split_all = devices if engine in ("zero3", "fsdp") else 1
    tokens = math.ceil(cfg.train.batch_size / devices) * cfg.task.max_length
    parts = {
        "base": shape.base / split_all,
        "values": trained["values"] / split_all,
        "gradients": trained["gradients"] * (2 if engine == "ddp" else 1) / split_state,
        "optimizer": trained["optimizer"] / split_state,
        "activations": _activations(shape, tokens, cfg.model.gradient_checkpointing, stage != "eval", dtype_bytes),
        "temporaries": 0.0 if stage == "eval" and not cfg.model.quantize else 2.0 * shape.largest * 4,
        "overhead": overhead,
    }
    parts["total"] = sum(parts.values())
    return parts


def smallest_fit(shape: Shape, cfg, stage: str, density: float, method: str, engine: str, memory: float,
                 overhead: float, most: int = 1024) -> int | None:
    """The fewest devices on which each holds at most `memory` bytes (None: more than `most`)."""
    counts = [1] if engine == "single" else range(1, most + 1)  # (ddp: more devices split only the batch)
    for n in counts:
        if plan(shape, cfg, stage, density, method, engine, n, overhead)["total"] <= memory:
            return n
    return None
