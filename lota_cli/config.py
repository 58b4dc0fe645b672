"""Typed configuration: the schema behind every YAML file in conf/, validated once when a stage starts.

Each stage's YAML lists `<stage>_schema` first in its defaults, so Hydra checks every key and type against
these dataclasses (unknown keys are refused with the key named) and the stage receives a dataclass instance.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, Dict, List, Optional

from hydra.core.config_store import ConfigStore
from omegaconf import MISSING

from lota_cli import LotaError

DTYPE_NAMES = ("float32", "bfloat16", "float16")
ATTN_MLP_WEIGHTS = r".*(attn|attention|mlp|ffn|feed_forward).*\.weight$"


def _one_of(key: str, value: Any, allowed: tuple) -> None:
    if value not in allowed:
        raise LotaError(f"{key}={value!r} is not valid; choose one of {', '.join(map(str, allowed))}")


def _positive(key: str, value: Any) -> None:
    if value is not None and value <= 0:
        raise LotaError(f"{key}={value} must be > 0")


def _sparsity(key: str, value: float) -> None:
    if not 0.0 < value < 1.0:
        raise LotaError(f"{key}={value} must be strictly between 0 and 1 (0.9 keeps the largest 10% of entries)")


@dataclass
class ModelConfig:
    path: str = "HuggingFaceTB/SmolLM2-135M-Instruct"  # hub id or local directory
    gguf_file: Optional[str] = None  # a .gguf file inside `path` (or an absolute path to one)
    dtype: str = "float32"
    revision: Optional[str] = None
    trust_remote_code: bool = False
    gradient_checkpointing: bool = False

    def __post_init__(self):
        _one_of("model.dtype", self.dtype, DTYPE_NAMES)


@dataclass
class TaskConfig:
    name: str = "gsm8k"
    dataset: Optional[str] = "openai/gsm8k"  # hub id, used when data_files is not set
    dataset_config: Optional[str] = "main"
    split: str = "train"
    eval_split: str = "test"
    data_files: Any = None  # local json/jsonl/parquet/csv file(s) for training, replacing the hub dataset
    eval_data_files: Any = None  # the same for evaluation
    prompt: str = "{question}"  # Python format string over the example's fields
    target: str = "{answer}"
    use_chat_template: bool = True  # wrap the prompt in the tokenizer's chat template when it has one
    max_length: int = 512
    max_examples: Optional[int] = None
    fraction: float = 1.0
    shuffle_seed: int = 0
    holdout: int = 0  # rows kept out of training and used for evaluation when both read the same data
    answer_pattern: Optional[str] = r"####\s*([-\d,\.]+)"  # regex whose group 1 in the reference is the checkable answer
    metric: str = "exact_match"  # exact_match (needs answer_pattern) or rouge_l

    def __post_init__(self):
        _one_of("task.metric", self.metric, ("exact_match", "rouge_l"))
        _positive("task.max_length", self.max_length)
        _positive("task.max_examples", self.max_examples)
        if not 0.0 < self.fraction <= 1.0:
            raise LotaError(f"task.fraction={self.fraction} must be in (0, 1]")
        if self.metric == "exact_match" and not self.answer_pattern:
            raise LotaError(f"task {self.name}: metric exact_match needs task.answer_pattern")


@dataclass
class ParamsConfig:
    """Which tensors a stage trains and selects from: 2-D weights whose names match include and not exclude."""

    include: List[str] = field(default_factory=lambda: [ATTN_MLP_WEIGHTS])
    exclude: List[str] = field(default_factory=lambda: [r".*(norm|embed|lm_head).*"])


@dataclass
class OptimConfig:
    name: str = "adamw"
    betas: List[float] = field(default_factory=lambda: [0.9, 0.999])
    eps: float = 1e-8
    momentum: float = 0.0  # sgd only

    def __post_init__(self):
        _one_of("optim.name", self.name, ("adamw", "sgd"))


@dataclass
class TrainConfig:
    max_steps: Optional[int] = 100  # optimizer steps; when null, `epochs` decides
    epochs: Optional[float] = None
    batch_size: int = 8  # sequences per micro-step, summed over all processes
    grad_accum: int = 1  # micro-steps per optimizer step: global batch = batch_size * grad_accum
    lr: float = 1e-5
    weight_decay: float = 0.0
    warmup_steps: int = 0
    schedule: str = "cosine"
    max_grad_norm: Optional[float] = 1.0  # null: no clipping (the norm is still logged)
    seed: int = 0
    mixed_precision: str = "auto"  # auto: bf16 on GPUs that support it, else full precision
    log_every: int = 10
    save_every: int = 0  # checkpoint every N optimizer steps; 0: only on SIGTERM / Ctrl-C
    keep_checkpoints: int = 2
    log_with: Optional[str] = None  # tensorboard or wandb, through accelerate's trackers

    def __post_init__(self):
        if self.max_steps is None and self.epochs is None:
            raise LotaError("set train.max_steps or train.epochs")
        _positive("train.max_steps", self.max_steps)
        _positive("train.epochs", self.epochs)
        _positive("train.batch_size", self.batch_size)
        _positive("train.grad_accum", self.grad_accum)
        _positive("train.lr", self.lr)
        if not math.isfinite(self.lr) or self.lr > 1e30:
            raise LotaError(f"train.lr={self.lr} is too large to train with (float32 overflows); "
                            "fine-tuning uses about 1e-5 to 1e-3")
        _positive("train.log_every", self.log_every)
        _positive("train.keep_checkpoints", self.keep_checkpoints)
        _one_of("train.schedule", self.schedule, ("cosine", "linear", "constant"))
        _one_of("train.mixed_precision", self.mixed_precision, ("auto", "no", "bf16", "fp16"))
        if self.log_with is not None:
            _one_of("train.log_with", self.log_with, ("tensorboard", "wandb"))


@dataclass
class DistConfig:
    """How training is spread over processes (see conf/dist/)."""

    engine: str = "single"  # single | ddp | fsdp | zero2 | zero3
    num_processes: int = 1  # > 1: lota re-launches itself through `accelerate launch`
    num_machines: int = 1
    offload_optimizer: bool = False
    offload_params: bool = False
    backend: Optional[str] = None  # process-group backend; default nccl on GPUs, gloo on CPUs

    def __post_init__(self):
        _one_of("dist.engine", self.engine, ("single", "ddp", "fsdp", "zero2", "zero3"))
        _positive("dist.num_processes", self.num_processes)


@dataclass
class StageConfig:
    out: str = MISSING  # output directory
    debug: bool = False  # full tracebacks on error


@dataclass
class TrainStageConfig(StageConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    task: TaskConfig = field(default_factory=TaskConfig)
    params: ParamsConfig = field(default_factory=ParamsConfig)
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    dist: DistConfig = field(default_factory=DistConfig)
    artifact_dtype: str = "float32"  # dtype of the written deltas
    save_model: bool = False  # also write the resulting model as a Hugging Face directory out/model
    resume: Any = False  # true: continue from the newest checkpoint in out; or a checkpoint path

    def __post_init__(self):
        _one_of("artifact_dtype", self.artifact_dtype, DTYPE_NAMES)


@dataclass
class LoraOptions:
    r: int = 16
    alpha: float = 32.0
    dropout: float = 0.0
    target_modules: Optional[List[str]] = None  # default: the modules owning the params.include weights

    def __post_init__(self):
        _positive("lora.r", self.r)


@dataclass
class CalibrateConfig(TrainStageConfig):
    method: str = "fft"  # fft: dense fine-tuning of the selected weights; lora: LoRA baseline (merged ΔW)
    lora: LoraOptions = field(default_factory=LoraOptions)

    def __post_init__(self):
        super().__post_init__()
        _one_of("method", self.method, ("fft", "lora"))


@dataclass
class ExtractOptions:
    task_vector: str = MISSING
    sparsity: float = 0.9
    scope: str = "global"  # global: one threshold over all selected tensors; per_tensor: each its own

    def __post_init__(self):
        _sparsity("extract.sparsity", self.sparsity)
        _one_of("extract.scope", self.scope, ("global", "per_tensor"))


@dataclass
class ExtractConfig(StageConfig):
    extract: ExtractOptions = field(default_factory=ExtractOptions)
    params: ParamsConfig = field(default_factory=ParamsConfig)


@dataclass
class SparseTrainOptions:
    mask: str = MISSING


@dataclass
class SparseTrainConfig(TrainStageConfig):
    sparse_train: SparseTrainOptions = field(default_factory=SparseTrainOptions)


@dataclass
class LottoOptions:
    previous: List[str] = field(default_factory=list)  # earlier sparse deltas of the same base, in order
    sparsity: float = 0.9  # the new mask keeps (1 - sparsity) of all selected entries
    calibrate_steps: Optional[int] = None  # steps of the calibration phase; default train.max_steps

    def __post_init__(self):
        _sparsity("lotto.sparsity", self.sparsity)
        _positive("lotto.calibrate_steps", self.calibrate_steps)


@dataclass
class LottoConfig(TrainStageConfig):
    lotto: LottoOptions = field(default_factory=LottoOptions)


@dataclass
class MergeConfig(StageConfig):
    inputs: List[str] = MISSING  # task vectors / sparse deltas of one base (positional on the command line)
    method: str = "sum"  # a method registered in lota_cli.merging (merging.methods_help() lists them)
    weights: Optional[List[float]] = None  # task_arithmetic: one per input (default 1)
    scale: float = 1.0  # applied to the merged delta, whatever the method
    density: float = 0.2  # ties / magnitude: fraction kept of each input; dare: keep probability
    seed: int = 0  # dare's random drop
    dtype: str = "float32"  # of the written task vector / model
    output_model: Optional[str] = None  # write base + merged delta as a HF model directory here instead

    def __post_init__(self):
        # imported here, not at the top: merging imports torch, and the CLI imports config for every stage
        from lota_cli.merging import METHODS, readers

        _one_of("method", self.method, tuple(METHODS))
        # a method-specific field changed for a method that would ignore it is a mistake, not a no-op
        for key, methods in readers().items():
            value = getattr(self, key)
            if self.method not in methods and value != self.__dataclass_fields__[key].default:
                which = methods[0] if len(methods) == 1 else f"{', '.join(methods[:-1])} or {methods[-1]}"
                instead = f"method={which}" if len(methods) == 1 else "one of those methods"
                raise LotaError(f"{key}={value} only applies to method={which}, not method={self.method}; "
                                f"drop {key} or use {instead}")
        _one_of("dtype", self.dtype, DTYPE_NAMES)
        if not 0.0 < self.density <= 1.0:
            raise LotaError(f"density={self.density} must be in (0, 1]")
        if not self.inputs:
            raise LotaError("merge needs at least one input: lota merge a.safetensors b.safetensors ...")
        if self.weights is not None and len(self.weights) != len(self.inputs):
            raise LotaError(f"weights has {len(self.weights)} values for {len(self.inputs)} inputs")


@dataclass
class OverlapConfig(StageConfig):
    inputs: List[str] = MISSING  # masks, sparse deltas or task vectors (nonzeros) of one base


@dataclass
class EvalOptions:
    tasks: List[str] = field(default_factory=lambda: ["gsm8k"])  # keys of `tasks` to evaluate
    deltas: List[str] = field(default_factory=list)  # task vectors / sparse deltas added to the base
    scales: List[float] = field(default_factory=list)  # one per delta (default 1)
    model_dir: Optional[str] = None  # evaluate a saved model directory instead of model + deltas
    max_examples: Optional[int] = 200
    batch_size: int = 8
    max_new_tokens: int = 256
    generate: bool = True  # false: teacher-forced NLL only
    compare_to: Optional[str] = None  # an earlier eval's results.json: report the change per task

    def __post_init__(self):
        _positive("eval.max_examples", self.max_examples)
        _positive("eval.batch_size", self.batch_size)
        _positive("eval.max_new_tokens", self.max_new_tokens)
        if self.scales and len(self.scales) != len(self.deltas):
            raise LotaError(f"eval.scales has {len(self.scales)} values for {len(self.deltas)} eval.deltas")


@dataclass
class EvalConfig(StageConfig):
    model: ModelConfig = field(default_factory=ModelConfig)
    tasks: Dict[str, TaskConfig] = field(default_factory=dict)
    eval: EvalOptions = field(default_factory=EvalOptions)

    def __post_init__(self):
        unknown = [t for t in self.eval.tasks if t not in self.tasks]
        if unknown:
            raise LotaError(f"eval.tasks names {unknown}, which are not configured; known: {sorted(self.tasks)}")


def register_schemas() -> None:
    store = ConfigStore.instance()
    for name, node in {
        "calibrate": CalibrateConfig,
        "extract": ExtractConfig,
        "sparse_train": SparseTrainConfig,
        "lotto": LottoConfig,
        "merge": MergeConfig,
        "overlap": OverlapConfig,
        "eval": EvalConfig,
    }.items():
        store.store(name=f"{name}_schema", node=node)
