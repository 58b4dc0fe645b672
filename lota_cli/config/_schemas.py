"""The stage schemas: the dataclasses behind every YAML file in conf/, validated once when a stage starts.

Each stage's YAML lists `<stage>_schema` first in its defaults, so Hydra checks every key and type against
these dataclasses (unknown keys are refused with the key named) and the stage receives a dataclass instance.
Every key carries a one-line meaning (`opt(..., help)`), which `lota <stage> --help` lists.
"""

from __future__ import annotations

import importlib.util
import math
import re
from dataclasses import dataclass, field, replace
from typing import Any, Dict, List, Optional

from omegaconf import MISSING

from lota_cli import LotaError
from lota_cli.config._options import one_of, opt, parse_size, positive, sparsity_fraction
from lota_cli.config._params import ParamsConfig
from lota_cli.io import DEFAULT_SHARD_SIZE
from lota_cli.tensors import WEIGHT_DTYPES

QUANTIZE = ("nf4", "int8")  # model.quantize: bitsandbytes' 4-bit NormalFloat, its 8-bit rows
ENGINES = ("single", "ddp", "zero2", "zero3", "fsdp")  # dist.engine
# the engines that keep whole tensors on every process: what bitsandbytes' quantized weights and 8-bit
# optimizer need (tested: single, ddp)
REPLICATED_ENGINES = ("single", "ddp")


def _needs_bitsandbytes(setting: str) -> None:
    if importlib.util.find_spec("bitsandbytes") is None:
        raise LotaError(f"{setting} needs bitsandbytes, which is not installed: pip install 'lota-cli[quantize]'")


def _frozen_base(model: "ModelConfig", key: str, method: str) -> None:
    """Refuse dense (fft) training over a quantized base, which is frozen."""
    if model.quantize and method == "fft":
        raise LotaError(f"model.quantize={model.quantize} with {key}=fft: a quantized base is frozen, so "
                        f"calibrate over it with {key}=lora (QLoRA), or drop model.quantize")


@dataclass
class ModelConfig:
    path: str = opt("HuggingFaceTB/SmolLM2-135M-Instruct", "hub id or local directory")
    gguf_file: Optional[str] = opt(None, "a .gguf file inside `path` (or an absolute path to one)")
    dtype: str = opt("float32", "dtype of the weights: float32, bfloat16 or float16")
    revision: Optional[str] = opt(None, "hub revision (branch, tag or commit)")
    trust_remote_code: bool = opt(False, "run code shipped in the model's repository")
    gradient_checkpointing: bool = opt(False, "recompute activations in backward, to save memory")
    quantize: Optional[str] = opt(None, "nf4 | int8: hold the frozen base quantized (bitsandbytes, as QLoRA "
                                        "does) for sparse-train, lotto, eval and calibrate method=lora")

    def __post_init__(self):
        one_of("model.dtype", self.dtype, WEIGHT_DTYPES)
        if self.quantize is not None:
            one_of("model.quantize", self.quantize, QUANTIZE)
            _needs_bitsandbytes(f"model.quantize={self.quantize}")
            if self.gguf_file:
                raise LotaError(f"model.quantize={self.quantize} with model.gguf_file: a GGUF file is dequantized "
                                "on load, then it would be quantized again; give the model's safetensors "
                                "directory, or drop model.quantize")

    def calibration(self) -> str:
        """How a calibration trains unless told: lora over a quantized base (frozen), fft otherwise."""
        return "lora" if self.quantize else "fft"


@dataclass
class TaskConfig:
    name: str = opt("gsm8k", "the task's name in artifacts, logs and eval results")
    dataset: Optional[str] = opt("openai/gsm8k", "hub id, used when data_files is not set")
    dataset_config: Optional[str] = opt("main", "the hub data set's configuration")
    split: str = opt("train", "hub split to train on")
    eval_split: str = opt("test", "hub split to evaluate on")
    data_files: Any = opt(None, "local json/jsonl/parquet/csv file(s) for training, replacing the hub dataset")
    eval_data_files: Any = opt(None, "the same for evaluation")
    prompt: str = opt("{question}", "Python format string over the example's fields")
    target: str = opt("{answer}", "Python format string of the answer; the loss covers its tokens only")
    use_chat_template: bool = opt(True, "wrap the prompt in the tokenizer's chat template when it has one")
    max_length: int = opt(512, "tokens per example (prompt + answer); longer answers are cut, longer prompts dropped")
    max_examples: Optional[int] = opt(None, "train on at most this many rows (after the seeded shuffle)")
    fraction: float = opt(1.0, "train on this fraction of the rows")
    shuffle_seed: int = opt(0, "seed of the row shuffle")
    holdout: int = opt(0, "rows kept out of training and used for evaluation when both read the same data")
    answer_pattern: Optional[str] = opt(r"####\s*([-\d,\.]+)",
                                        "regex whose group 1 in the reference is the checkable answer")
    metric: str = opt("exact_match", "exact_match (needs answer_pattern) or rouge (ROUGE-1/2/L; rouge_l: "
                                     "its older name)")
    format: str = opt("text", "text: task.prompt / task.target templates per row; messages: a conversation "
                              "per row (task.messages_field), rendered by the chat template; preference: a "
                              "prompt with a chosen and a rejected completion per row (train.objective=dpo|simpo)")
    messages_field: str = opt("messages", "format=messages: the field holding the turns (ShareGPT: conversations)")
    role_field: str = opt("role", "format=messages: a turn's role key (ShareGPT: from); human/gpt map to "
                                  "user/assistant")
    content_field: str = opt("content", "format=messages: a turn's text key (ShareGPT: value)")
    system_prompt: Optional[str] = opt(None, "format=messages: a system turn put first where a conversation has none")
    prompt_field: str = opt("prompt", "format=preference: the prompt (a string, or a list of turns; absent: the turns "
                                      "chosen and rejected share)")
    chosen_field: str = opt("chosen", "format=preference: the preferred completion (a string, or assistant turns)")
    rejected_field: str = opt("rejected", "format=preference: the dispreferred completion")
    chat_template: Optional[str] = opt(None, "a Jinja chat template (or a file holding one) replacing the tokenizer's")
    train_on: str = opt("assistant", "tokens with loss: assistant (every assistant turn, default), last (the last "
                                     "one), all (every token); format=text: the target (or all)")
    truncation: str = opt("turns", "longer than max_length: turns (keep the whole turns that fit; a first answer "
                                   "too long is cut), drop (drop the example)")
    packing: bool = opt(False, "pack examples into sequences of max_length (no attention across examples)")
    streaming: bool = opt(False, "read the training data as it is used (data sets larger than memory); needs "
                                 "train.max_steps")
    shuffle_buffer: int = opt(10_000, "streaming: rows in the shuffle buffer")
    num_proc: Optional[int] = opt(None, "processes that tokenize (default: one per 50,000 rows, up to the CPUs)")
    weight: float = opt(1.0, "sampling weight when training on several tasks (task and tasks.*)")
    cache: bool = opt(True, "keep encoded data between runs ($LOTA_CACHE or ~/.cache/lota/data), keyed by "
                            "tokenizer, task settings and data")

    def __post_init__(self):
        one_of("task.metric", self.metric, ("exact_match", "rouge", "rouge_l"))
        one_of("task.format", self.format, ("text", "messages", "preference"))
        one_of("task.train_on", self.train_on, ("assistant", "last", "all"))
        one_of("task.truncation", self.truncation, ("turns", "drop"))
        positive("task.num_proc", self.num_proc)
        positive("task.shuffle_buffer", self.shuffle_buffer)
        if self.metric == "rouge_l":  # the name before ROUGE-1 and -2 were reported too
            self.metric = "rouge"
        positive("task.max_length", self.max_length)
        positive("task.max_examples", self.max_examples)
        if not 0.0 < self.fraction <= 1.0:
            raise LotaError(f"task.fraction={self.fraction} must be in (0, 1]")
        if self.metric == "exact_match" and not self.answer_pattern:
            raise LotaError(f"task {self.name}: metric exact_match needs task.answer_pattern")


@dataclass
class OptimConfig:
    name: str = opt("adamw", "adamw, adamw8bit (bitsandbytes: 8-bit moments, 2 B a trained entry instead of 8; "
                             "tensors under 4,096 trained entries keep 32-bit ones) or sgd")
    betas: List[float] = opt(factory=lambda: [0.9, 0.999], help="AdamW's betas")
    eps: float = opt(1e-8, "AdamW's epsilon")
    momentum: float = opt(0.0, "sgd only")

    def __post_init__(self):
        one_of("optim.name", self.name, ("adamw", "adamw8bit", "sgd"))
        if self.name == "adamw8bit":
            _needs_bitsandbytes("optim.name=adamw8bit")


@dataclass
class TrainConfig:
    max_steps: Optional[int] = opt(100, "optimizer steps; when null, `epochs` decides")
    epochs: Optional[float] = opt(None, "passes over the data, when max_steps is null")
    batch_size: int = opt(8, "sequences per micro-step, summed over all processes")
    grad_accum: int = opt(1, "micro-steps per optimizer step: global batch = batch_size * grad_accum")
    lr: float = opt(1e-5, "peak learning rate")
    weight_decay: float = opt(0.0, "decoupled weight decay (on the delta, for sparse training)")
    warmup_steps: int = opt(0, "linear warm-up steps")
    schedule: str = opt("cosine", "learning-rate schedule after warm-up: cosine, linear or constant")
    max_grad_norm: Optional[float] = opt(1.0, "null: no clipping (the norm is still logged)")
    seed: int = opt(0, "seed of the data order and of initialization")
    mixed_precision: str = opt("auto", "auto: bf16 on GPUs that support it, else full precision")
    log_every: int = opt(10, "write metrics every N optimizer steps (and at the last)")
    save_every: int = opt(0, "checkpoint every N optimizer steps; 0: only on SIGTERM / Ctrl-C")
    keep_checkpoints: int = opt(2, "newest checkpoints kept")
    log_with: Optional[str] = opt(None, "tensorboard or wandb, through accelerate's trackers")
    objective: str = opt("sft", "sft: next-token loss on the targets; dpo: preference pairs (task.format="
                                "preference) against the reference, the model before training; simpo: "
                                "preference pairs, reference-free, completions' mean log-probabilities")
    beta: float = opt(0.1, "dpo / simpo: the scale of the log-probability differences in the loss")
    gamma: float = opt(0.5, "simpo: the target margin, subtracted after the beta scaling")
    label_smoothing: float = opt(0.0, "dpo / simpo: the assumed chance a pair's preference is flipped (cDPO), "
                                      "in [0, 0.5)")

    def __post_init__(self):
        if self.max_steps is None and self.epochs is None:
            raise LotaError("set train.max_steps or train.epochs")
        positive("train.max_steps", self.max_steps)
        positive("train.epochs", self.epochs)
        positive("train.batch_size", self.batch_size)
        positive("train.grad_accum", self.grad_accum)
        positive("train.lr", self.lr)
        if not math.isfinite(self.lr) or self.lr > 1e30:
            raise LotaError(f"train.lr={self.lr} is too large to train with (float32 overflows); "
                            "fine-tuning uses about 1e-5 to 1e-3")
        positive("train.log_every", self.log_every)
        positive("train.keep_checkpoints", self.keep_checkpoints)
        one_of("train.schedule", self.schedule, ("cosine", "linear", "constant"))
        one_of("train.mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "fp16"))
        one_of("train.objective", self.objective, ("sft", "dpo", "simpo"))
        positive("train.beta", self.beta)
        if not 0.0 <= self.label_smoothing < 0.5:
            raise LotaError(f"train.label_smoothing={self.label_smoothing} must be in [0, 0.5)")
        if not math.isfinite(self.gamma):
            raise LotaError(f"train.gamma={self.gamma} must be a finite number")
        if self.log_with is not None:
            one_of("train.log_with", self.log_with, ("tensorboard", "wandb"))
            # accelerate leaves out a tracker whose package is missing, with no word: the run would log nothing
            packages = {"tensorboard": ("tensorboard", "tensorboardX"), "wandb": ("wandb",)}[self.log_with]
            if all(importlib.util.find_spec(p) is None for p in packages):
                raise LotaError(f"train.log_with={self.log_with}: the {packages[0]} package is not installed; "
                                f"pip install {packages[0]}, or drop train.log_with")


@dataclass
class DistConfig:
    """How training is spread over processes (see conf/dist/)."""

    engine: str = opt("single", "single | ddp | fsdp | zero2 | zero3")
    num_processes: int = opt(1, "> 1: lota re-launches itself through `accelerate launch`")
    num_machines: int = opt(1, "machines (set MACHINE_RANK and MASTER_ADDR on each)")
    offload_optimizer: bool = opt(False, "zero2/zero3: optimizer state and its step on the CPU")
    offload_params: bool = opt(False, "zero3: parameters live on the CPU between uses")
    backend: Optional[str] = opt(None, "process-group backend; default nccl on GPUs, gloo on CPUs")

    def __post_init__(self):
        one_of("dist.engine", self.engine, ENGINES)
        positive("dist.num_processes", self.num_processes)


@dataclass
class StageConfig:
    out: str = opt(MISSING, "output directory")
    debug: bool = opt(False, "full tracebacks on error")


@dataclass
class TrainingSettings(StageConfig):
    """What a training stage trains and how (lota plan reads these too)."""

    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    params: ParamsConfig = field(default_factory=ParamsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)

    def replicated_setting(self) -> str | None:
        """The setting that keeps whole tensors on every process (bitsandbytes' packed weights, its 8-bit
        optimizer), which only REPLICATED_ENGINES run; None when neither is set."""
        if self.model.quantize:
            return f"model.quantize={self.model.quantize}"
        return "optim.name=adamw8bit" if self.optim.name == "adamw8bit" else None


@dataclass
class TrainStageConfig(TrainingSettings):
    dist: DistConfig = field(default_factory=DistConfig)
    artifact_dtype: str = opt("float32", "dtype of the written deltas")
    save_model: bool = opt(False, "also write the resulting model as a Hugging Face directory out/model")
    resume: Any = opt(False, "true: continue from the newest checkpoint in out; or a checkpoint path")
    tasks: Dict[str, TaskConfig] = opt(factory=dict, help="more tasks to train on with task, a mixture by their "
                                                          "weights (add one with +task@tasks.NAME=PRESET)")

    def __post_init__(self):
        one_of("artifact_dtype", self.artifact_dtype, WEIGHT_DTYPES)
        whole = self.replicated_setting()
        if whole and self.dist.engine not in REPLICATED_ENGINES:
            raise LotaError(f"{whole} with dist.engine={self.dist.engine}: bitsandbytes' packed weights and "
                            f"8-bit optimizer keep whole tensors, under dist.engine={' or '.join(REPLICATED_ENGINES)}"
                            "; they are not sharded under FSDP or ZeRO here")
        if self.task.name in self.tasks:
            raise LotaError(f"tasks.{self.task.name} has the name of task.name; give one of them another name")
        for key, task in [("task", self.task), *((f"tasks.{k}", t) for k, t in self.tasks.items())]:
            if not (math.isfinite(task.weight) and task.weight >= 0):
                raise LotaError(f"{key}.weight={task.weight}: a mixture weight must be a number >= 0")
        mixed = self.mixture_tasks()
        if sum(w for _, w in mixed) <= 0:
            raise LotaError("the mixture is empty: the weights of task and tasks.* sum to 0; give one a weight > 0")
        if any(t.streaming for t, _ in mixed) and not self.train.max_steps:
            raise LotaError("task.streaming=true reads data of unknown length: set train.max_steps")
        self._check_objective(mixed)

    def _check_objective(self, mixed: list) -> None:
        """Preference data and a preference objective go together; what pairs are not trained with."""
        paired = [t.format == "preference" for t, _ in mixed]
        objective = self.train.objective
        if objective == "sft" and any(paired):
            raise LotaError("task.format=preference holds pairs, not targets: set train.objective=dpo (or simpo)")
        if objective != "sft" and not all(paired):
            raise LotaError(f"train.objective={objective} trains on preference pairs: set task.format=preference "
                            "(rows with prompt, chosen and rejected fields)")
        if objective == "sft":
            return
        if len(mixed) > 1:
            raise LotaError(f"train.objective={objective} trains on one task's pairs; tasks.* mixtures are not "
                            "supported with it")
        task = self.task
        if task.packing:
            raise LotaError("task.packing=true with task.format=preference: a pair's completions are scored as "
                            "separate sequences, not packed; drop task.packing")
        if task.streaming:
            raise LotaError("task.streaming=true with task.format=preference is not supported; read the pairs "
                            "whole (drop task.streaming)")

    def mixture_tasks(self) -> list[tuple[TaskConfig, float]]:
        """(task, weight) of each task trained on, those of weight 0 left out: task alone, or with tasks.*
        (each named by its key)."""
        mixed = [(self.task, self.task.weight)] + [(replace(t, name=k), t.weight) for k, t in self.tasks.items()]
        return [(t, w) for t, w in mixed if w != 0 or len(mixed) == 1]


@dataclass
class LoraOptions:
    r: int = opt(16, "LoRA rank")
    alpha: float = opt(32.0, "LoRA scale numerator (scale = alpha / r)")
    dropout: float = opt(0.0, "dropout on LoRA's input")
    target_modules: Optional[List[str]] = opt(None, "default: the modules owning the params.include weights")

    def __post_init__(self):
        positive("lora.r", self.r)


@dataclass
class CalibrateConfig(TrainStageConfig):
    method: str = opt("fft", "fft: dense fine-tuning of the selected weights; lora: LoRA baseline (merged ΔW)")
    lora: LoraOptions = field(default_factory=LoraOptions)

    def __post_init__(self):
        super().__post_init__()
        one_of("method", self.method, ("fft", "lora"))
        _frozen_base(self.model, "method", self.method)


# What `lota extract` can rank entries by (extract.source): the one list of them, each scored by the function
# lota_cli.workflows registers under its name (importing it refuses a name missing on either side).
MASK_SOURCES = {
    "task_vector": "largest |delta| of extract.task_vector",
    "weights": "largest |w| of model.*",
    "random": "uniform, extract.seed",
    "gradient": "largest |dL/dw| summed over extract.gradient_batches batches of task.*",
}


@dataclass
class ExtractOptions:
    source: str = opt("task_vector", "what ranks the entries: " + ", ".join(f"{name} ({meaning})" for name, meaning
                                                                         in MASK_SOURCES.items()))
    task_vector: Optional[str] = opt(None, "source=task_vector: the task vector to select from (calibrate's "
                                           "task_vector.safetensors)")
    sparsity: float = opt(0.9, "fraction of entries left out: 0.9 keeps the largest 10%")
    scope: str = opt("global", "global: one threshold over all selected tensors; per_tensor: each its own")
    seed: int = opt(0, "source=random: seed of the scores; source=gradient: seed of the batch order")
    gradient_batches: int = opt(8, "source=gradient: batches of task.* whose |gradient| is summed (each one "
                                   "forward + backward pass)")
    batch_size: int = opt(8, "source=gradient: sequences per batch")

    def __post_init__(self):
        one_of("extract.source", self.source, tuple(MASK_SOURCES))
        sparsity_fraction("extract.sparsity", self.sparsity)
        one_of("extract.scope", self.scope, ("global", "per_tensor"))
        positive("extract.gradient_batches", self.gradient_batches)
        positive("extract.batch_size", self.batch_size)
        # a key changed for a source that ignores it is a mistake, not a no-op (as merge's method keys)
        for key, sources in (("seed", ("random", "gradient")), ("gradient_batches", ("gradient",)),
                             ("batch_size", ("gradient",))):
            if self.source not in sources and getattr(self, key) != self.__dataclass_fields__[key].default:
                raise LotaError(f"extract.{key} only applies to extract.source={' or '.join(sources)}, not "
                                f"{self.source}; drop extract.{key} or change extract.source")


@dataclass
class ExtractConfig(StageConfig):
    extract: ExtractOptions = field(default_factory=ExtractOptions)
    params: ParamsConfig = field(default_factory=ParamsConfig)
    model: ModelConfig = field(default_factory=ModelConfig)  # the base of source=weights, random and gradient
    task: TaskConfig = field(default_factory=TaskConfig)  # the data of source=gradient
    train: Any = opt(None, "training settings a preset (conf=...) brings along; extract trains nothing",
                     read=False)

    def __post_init__(self):  # here, not in ExtractOptions: its default (source=task_vector, no file) is valid
        opts = self.extract
        if self.model.quantize:
            raise LotaError(f"model.quantize={self.model.quantize}: extract ranks the entries of the full-precision "
                            "base (or of a task vector); drop model.quantize")
        if opts.source == "task_vector" and opts.task_vector is None:
            raise LotaError("extract.source=task_vector needs extract.task_vector=PATH (calibrate's "
                            "task_vector.safetensors); or choose another extract.source")
        if opts.source != "task_vector" and opts.task_vector is not None:
            raise LotaError(f"extract.source={opts.source} ranks the base model (model.*), not a task vector; drop "
                            "extract.task_vector, or use extract.source=task_vector")


@dataclass
class SparseTrainOptions:
    mask: str = opt(MISSING, "the mask whose entries train (extract's mask.safetensors)")


@dataclass
class SparseTrainConfig(TrainStageConfig):
    sparse_train: SparseTrainOptions = field(default_factory=SparseTrainOptions)


@dataclass
class LottoOptions:
    previous: List[str] = opt(factory=list, help="earlier sparse deltas of the same base, in order")
    sparsity: float = opt(0.9, "the new mask keeps (1 - sparsity) of all selected entries")
    calibrate_steps: Optional[int] = opt(None, "steps of the calibration phase; default train.max_steps")
    calibrate_method: Optional[str] = opt(None, "fft: dense calibration with the earlier masks frozen; lora: "
                                                "LoRA's merged BA picks the mask (lora.*); default fft, lora "
                                                "over a quantized base")

    def __post_init__(self):
        sparsity_fraction("lotto.sparsity", self.sparsity)
        positive("lotto.calibrate_steps", self.calibrate_steps)
        if self.calibrate_method is not None:
            one_of("lotto.calibrate_method", self.calibrate_method, ("fft", "lora"))


@dataclass
class LottoConfig(TrainStageConfig):
    lotto: LottoOptions = field(default_factory=LottoOptions)
    lora: LoraOptions = field(default_factory=LoraOptions)

    def __post_init__(self):
        super().__post_init__()
        _frozen_base(self.model, "lotto.calibrate_method", self.calibration())

    def calibration(self) -> str:
        """How the calibration phase trains: lotto.calibrate_method, by default model.calibration()'s."""
        return self.lotto.calibrate_method or self.model.calibration()


@dataclass
class MergeConfig(StageConfig):
    inputs: List[str] = opt(MISSING, "task vectors / sparse deltas of one base (positional on the command line)")
    method: str = opt("sum", "a method registered in lota_cli.ops (listed below, by ops.methods_help())")
    weights: Optional[List[float]] = opt(None, "task_arithmetic: one per input (default 1)")
    scale: float = opt(1.0, "applied to the merged delta, whatever the method")
    density: float = opt(0.2, "ties / magnitude: fraction kept of each input; dare: keep probability")
    seed: int = opt(0, "dare's random drop")
    dtype: str = opt("float32", "of the written task vector / model")
    output_model: Optional[str] = opt(None, "write base + merged delta as a HF model directory here instead")
    shard_size: str = opt(DEFAULT_SHARD_SIZE, "output_model: largest safetensors shard (5GB, 500MB, 2GiB), as HF's max_shard_size")

    def __post_init__(self):
        from lota_cli.ops import METHODS, readers  # (the registry: the methods import torch when they run)

        one_of("method", self.method, tuple(METHODS))
        # a method-specific field changed for a method that would ignore it is a mistake, not a no-op
        for key, methods in readers().items():
            value = getattr(self, key)
            if self.method not in methods and value != self.__dataclass_fields__[key].default:
                which = methods[0] if len(methods) == 1 else f"{', '.join(methods[:-1])} or {methods[-1]}"
                instead = f"method={which}" if len(methods) == 1 else "one of those methods"
                raise LotaError(f"{key}={value} only applies to method={which}, not method={self.method}; "
                                f"drop {key} or use {instead}")
        one_of("dtype", self.dtype, WEIGHT_DTYPES)
        if parse_size(self.shard_size) <= 0:
            raise LotaError(f"shard_size={self.shard_size} must be > 0")
        if not 0.0 < self.density <= 1.0:
            raise LotaError(f"density={self.density} must be in (0, 1]")
        if not self.inputs:
            raise LotaError("merge needs at least one input: lota merge a.safetensors b.safetensors ...")
        if self.weights is not None and len(self.weights) != len(self.inputs):
            raise LotaError(f"weights has {len(self.weights)} values for {len(self.inputs)} inputs")


@dataclass
class OverlapConfig(StageConfig):
    inputs: List[str] = opt(MISSING, "masks, sparse deltas or task vectors (nonzeros) of one base")


ADAPTER_NAME = r"[A-Za-z0-9_][A-Za-z0-9_.-]*"  # an adapter's name: its directory under out/peft


@dataclass
class ExportConfig(StageConfig):
    inputs: List[str] = opt(MISSING, "sparse deltas of one base, a LoTTO chain in its order (positional on the "
                                     "command line)")
    format: str = opt("peft", "peft: PEFT Super-Tuning adapters in out/peft; model: base + the deltas as a HF "
                              "model directory out/model")
    names: Optional[List[str]] = opt(None, "format=peft: one adapter name per input, each written to "
                                           "out/peft/NAME (default, for several inputs: their tasks' names)")
    dtype: str = opt("float32", "format=model: dtype of the written model")

    def __post_init__(self):
        one_of("format", self.format, ("peft", "model"))
        one_of("dtype", self.dtype, WEIGHT_DTYPES)
        if not self.inputs:
            raise LotaError("export needs at least one input: lota export sparse_delta.safetensors ... out=DIR")
        if self.format == "model" and self.names is not None:
            raise LotaError("names only applies to format=peft (the adapters' names); drop names")
        if self.format == "peft" and self.dtype != "float32":
            raise LotaError("dtype only applies to format=model (PEFT stores float32 values); drop dtype")
        if self.names is not None:
            if len(self.names) != len(self.inputs):
                raise LotaError(f"names has {len(self.names)} values for {len(self.inputs)} inputs")
            bad = [n for n in self.names if not re.fullmatch(ADAPTER_NAME, str(n))]
            if bad or len(set(self.names)) != len(self.names):
                raise LotaError(f"names={list(self.names)}: give distinct names of letters, digits, '_', '.' and "
                                "'-' (each is a directory)")


@dataclass
class LmEvalOptions:
    """lm-evaluation-harness settings (eval.backend=lm_eval); lota_cli.evaluation runs them."""

    tasks: List[str] = opt(factory=list, help="lm_eval task, group or tag names, or task YAML paths")
    include_path: Optional[str] = opt(None, "a directory of your own lm_eval task YAMLs (searched recursively)")
    builtin_tasks: bool = opt(True, "index lm_eval's own ~14,000 tasks too (about 10 s); false: only "
                                    "include_path's")
    num_fewshot: Optional[int] = opt(None, "few-shot examples per prompt; null: each task's own default")
    limit: Optional[float] = opt(None, "examples per task (below 1: a fraction); null: all, as published "
                                       "numbers are")
    batch_size: Any = opt(None, "sequences per forward pass, or auto (the largest that fits); null: "
                                "eval.batch_size")

    def __post_init__(self):
        if not self.builtin_tasks and not self.include_path:
            raise LotaError("eval.lm_eval.builtin_tasks=false leaves only eval.lm_eval.include_path's tasks; set "
                            "include_path=DIR, or drop builtin_tasks=false")
        if self.num_fewshot is not None and self.num_fewshot < 0:
            raise LotaError(f"eval.lm_eval.num_fewshot={self.num_fewshot} must be >= 0")
        positive("eval.lm_eval.limit", self.limit)
        if self.limit is not None and self.limit >= 1:
            if self.limit != int(self.limit):
                raise LotaError(f"eval.lm_eval.limit={self.limit}: give a whole number of examples, or a "
                                "fraction below 1")
            self.limit = int(self.limit)
        size = self.batch_size
        number = isinstance(size, int) and not isinstance(size, bool) and size > 0
        if size is not None and not number and not (isinstance(size, str) and re.fullmatch(r"auto(:\d+)?", size)):
            raise LotaError(f"eval.lm_eval.batch_size={size!r}: give a number > 0, auto, or auto:N")


@dataclass
class EvalOptions:
    backend: str = opt("lota", "lota: lota's own metrics on eval.tasks; lm_eval: lm-evaluation-harness on "
                               "eval.lm_eval.tasks")
    tasks: Optional[List[str]] = opt(None, "names of the tasks to evaluate; default: the chosen task= (or a "
                                           "preset's), else gsm8k")
    deltas: List[str] = opt(factory=list, help="task vectors / sparse deltas added to the base")
    scales: List[float] = opt(factory=list, help="one per delta (default 1)")
    model_dir: Optional[str] = opt(None, "evaluate a saved model directory instead of model + deltas")
    max_examples: Optional[int] = opt(200, "examples per task (lm_eval: eval.lm_eval.limit)")
    batch_size: int = opt(8, "sequences per forward pass")
    max_new_tokens: int = opt(256, "longest generated answer")
    generate: bool = opt(True, "false: teacher-forced NLL only")
    generate_examples: Optional[int] = opt(None, "generate for the first N of the examples only (NLL scores all: "
                                                 "it costs a fraction of generation); null: all")
    rouge_stemmer: bool = opt(True, "ROUGE with the Porter stemmer (rouge-score's use_stemmer), as most "
                                    "published ROUGE numbers")
    compare_to: Optional[str] = opt(None, "an earlier eval's results.json: report the change per task")
    lm_eval: LmEvalOptions = field(default_factory=LmEvalOptions)

    def __post_init__(self):
        one_of("eval.backend", self.backend, ("lota", "lm_eval"))
        if self.backend == "lm_eval" and not self.lm_eval.tasks:
            raise LotaError("eval.backend=lm_eval needs eval.lm_eval.tasks=[NAME,...] (`lm-eval ls tasks` lists "
                            "lm_eval's own)")
        if self.backend == "lm_eval" and self.tasks is not None:
            raise LotaError(f"eval.tasks={self.tasks} names lota's own tasks, which eval.backend=lm_eval does not "
                            "run; give lm_eval's as eval.lm_eval.tasks")
        if self.backend != "lm_eval" and self.lm_eval != LmEvalOptions():
            raise LotaError("eval.lm_eval.* only applies to eval.backend=lm_eval; add eval.backend=lm_eval or "
                            "drop them")
        positive("eval.max_examples", self.max_examples)
        positive("eval.generate_examples", self.generate_examples)
        positive("eval.batch_size", self.batch_size)
        positive("eval.max_new_tokens", self.max_new_tokens)
        if self.scales and len(self.scales) != len(self.deltas):
            raise LotaError(f"eval.scales has {len(self.scales)} values for {len(self.deltas)} eval.deltas")


@dataclass
class EvalConfig(StageConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    task: Optional[TaskConfig] = opt(None, "a task chosen as in the training stages (task=NAME, or a preset's); "
                                           "it replaces tasks.<its name>")
    tasks: Dict[str, TaskConfig] = opt(factory=dict, help="the tasks eval.tasks picks from, by name "
                                                          "(add one with +task@tasks.NAME=NAME)")
    eval: EvalOptions = field(default_factory=EvalOptions)
    train: Any = opt(None, "training settings a preset (conf=...) brings along", read=False)

    def __post_init__(self):
        if self.task is not None:
            self.tasks[self.task.name] = self.task
        if self.eval.backend != "lota":  # eval.tasks are lota's own; lm_eval's are eval.lm_eval.tasks
            return
        if self.eval.tasks is None:
            self.eval.tasks = [self.task.name if self.task is not None else "gsm8k"]
        unknown = [t for t in self.eval.tasks if t not in self.tasks]
        if unknown:
            raise LotaError(f"eval.tasks names {unknown}, which are not configured; known: {sorted(self.tasks)}")


@dataclass
class DataOptions:
    show: int = opt(2, "rendered examples printed on stderr, the trained tokens marked")
    preview: int = opt(200, "examples written to out/preview.jsonl, in training order")
    stream_examples: int = opt(10_000, "task.streaming: examples read from the stream for the statistics")

    def __post_init__(self):
        if self.show < 0 or self.preview < 0:
            raise LotaError("data.show and data.preview must be >= 0")
        positive("data.stream_examples", self.stream_examples)


@dataclass
class DataConfig(TrainStageConfig):
    """The training stages' keys, so `lota data` takes a training command's arguments as they are; of those it
    reads model.*, task.*, tasks.* and train.batch_size / train.seed (the batches whose padding it measures)."""

    params: ParamsConfig = opt(factory=ParamsConfig, read=False)
    optim: OptimConfig = opt(factory=OptimConfig, read=False)
    train: TrainConfig = opt(factory=TrainConfig, read=False)
    dist: DistConfig = opt(factory=DistConfig, read=False)
    artifact_dtype: str = opt("float32", read=False)
    save_model: bool = opt(False, read=False)
    resume: Any = opt(False, read=False)
    data: DataOptions = field(default_factory=DataOptions)


@dataclass
class PlanOptions:
    stage: str = opt("sparse-train", "the stage to plan: calibrate, sparse-train, lotto or eval")
    density: float = opt(0.1, "sparse-train, lotto: the share of the selected entries that train")
    method: Optional[str] = opt(None, "calibrate, lotto's calibration: fft or lora; default method / "
                                      "lotto.calibrate_method's")
    device_memory: str = opt("24GB", "memory of one device (80GB, 24GiB, ...): the smallest count that fits it")
    devices: List[int] = opt(factory=lambda: [1, 2, 4, 8], help="device counts the table shows")
    overhead: str = opt("0.5GiB", "the process itself: torch and transformers on a CPU, the CUDA context on a GPU")

    def __post_init__(self):
        one_of("plan.stage", self.stage, ("calibrate", "sparse-train", "lotto", "eval"))
        if not 0.0 < self.density <= 1.0:
            raise LotaError(f"plan.density={self.density} must be in (0, 1]")
        if self.method is not None:
            one_of("plan.method", self.method, ("fft", "lora"))
        for key in ("device_memory", "overhead"):
            try:
                parse_size(getattr(self, key))
            except ValueError as err:
                raise LotaError(f"plan.{key}: {err}") from None
        for n in self.devices:
            positive("plan.devices", n)


@dataclass
class PlanConfig(TrainingSettings):
    """A training stage's settings as far as memory goes (the same overrides as the planned stage's), every
    engine planned (no dist.*)."""

    lora: LoraOptions = field(default_factory=LoraOptions)
    plan: PlanOptions = field(default_factory=PlanOptions)

    def __post_init__(self):
        if self.plan.stage in ("calibrate", "lotto"):
            _frozen_base(self.model, "plan.method", self.method())

    def method(self) -> str:
        """How the planned stage trains: sparse (sparse-train), fft or lora (calibrate, lotto's calibration),
        none (eval)."""
        if self.plan.stage == "sparse-train":
            return "sparse"
        if self.plan.stage == "eval":
            return "none"
        return self.plan.method or self.model.calibration()

