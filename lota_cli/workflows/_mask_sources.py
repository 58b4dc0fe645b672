"""What `lota extract` ranks entries by (extract.source): the mask keeps the k entries of largest |score|.

  task_vector  |w_ft - w_base| of a calibrated task vector: LoTA's choice (read from the memory-mapped file)
  weights      |w_base|, the base model's own weights: PEFT Super-Tuning's choice, no calibration
  random       seeded uniform scores: the baseline any informed mask must beat
  gradient     |dL/dw| of the task's NLL, summed over extract.gradient_batches batches: a first-order
               estimate of which entries matter, for one forward + backward per batch and no optimizer state

Each source is a small function from the stage's config to a Ranking, registered under its name in
config.MASK_SOURCES (the one list of them); ops.top_k_mask then selects from every source alike, so all keep
exactly k entries under either extract.scope. Models and data are imported inside the model-based sources
only: extract from a task vector imports neither torch, transformers nor datasets.
"""

from __future__ import annotations

import hashlib
import logging
import math
import time
from dataclasses import dataclass, field
from typing import Callable, Iterator, Mapping

from lota_cli import LotaError
from lota_cli.config import MASK_SOURCES, ExtractConfig, selected
from lota_cli.artifacts import Artifact

log = logging.getLogger(__package__)


@dataclass
class Ranking:
    """Scores per selected tensor (torch tensors, or anything ops.top_k_mask reads), and what the mask
    records about where they came from."""

    scores: Mapping[str, object]
    shapes: dict[str, tuple[int, ...]]
    base_model: str
    base_fingerprint: str
    base_checkpoint: str
    where: str  # names the scores' origin in errors (a NaN among them)
    parents: list[str] = field(default_factory=list)  # fingerprints of the artifacts the scores came from
    source: dict = field(default_factory=dict)  # Meta.source: the source's name and what reproduces it


_FUNCTIONS: dict[str, Callable[[ExtractConfig], Ranking]] = {}


def mask_source(name: str):
    """Register the decorated function as extract.source `name`, one of config.MASK_SOURCES."""
    def register(fn: Callable[[ExtractConfig], Ranking]) -> Callable[[ExtractConfig], Ranking]:
        if name not in MASK_SOURCES or name in _FUNCTIONS:
            raise ValueError(f"mask source {name!r} is not in config.MASK_SOURCES, or is registered twice")
        _FUNCTIONS[name] = fn
        return fn
    return register


@mask_source("task_vector")
def from_task_vector(cfg: ExtractConfig) -> Ranking:
    """|delta| of extract.task_vector, streamed from its file; the mask's base is the task vector's."""
    task_vector = Artifact(cfg.extract.task_vector, kinds=("task_vector",))
    meta = task_vector.meta
    names = selected({n: task_vector.shape(n) for n in task_vector.names}, cfg.params)
    return Ranking({n: task_vector.raw(n) for n in names}, {n: task_vector.shape(n) for n in names},
                   meta.base_model, meta.base_fingerprint, meta.base_checkpoint, str(task_vector.path),
                   parents=[meta.fingerprint], source={"name": "task_vector"})


def _base(cfg: ExtractConfig, scores: Callable, source: dict) -> Ranking:
    """A Ranking of the base model (model.*): `scores(model, tokenizer, names)` -> {name: scores}."""
    from lota_cli.models import fingerprint, load_model, model_saved_fingerprint, select_params  # torch: here only

    model, tokenizer = load_model(cfg.model)
    names = select_params(model, cfg.params)
    shapes = {n: tuple(model.get_parameter(n).shape) for n in names}
    return Ranking(scores(model, tokenizer, names), shapes, cfg.model.path, fingerprint(model),
                   model_saved_fingerprint(model), f"model {cfg.model.path}", source=source)


@mask_source("weights")
def from_weights(cfg: ExtractConfig) -> Ranking:
    return _base(cfg, lambda model, _tokenizer, names: {n: model.get_parameter(n).detach() for n in names},
                 {"name": "weights"})


class SeededScores:
    """Uniform [0, 1) scores of one tensor, drawn from a generator seeded by (seed, tensor name) each time
    they are read: they depend on neither the other tensors nor their order, and never occupy more than one
    tensor's memory (ops.top_k_mask reads each tensor a few times, as it reads a safetensors slice)."""

    def __init__(self, shape: tuple[int, ...], seed: int, name: str):
        self.shape = tuple(shape)
        self.seed = int.from_bytes(hashlib.sha256(f"{seed}:{name}".encode()).digest()[:8], "little") >> 1

    def get_shape(self) -> list[int]:
        return list(self.shape)

    def __getitem__(self, index):
        import torch

        return torch.rand(self.shape, generator=torch.Generator().manual_seed(self.seed))[index]


def random_scores(shapes: Mapping[str, tuple[int, ...]], seed: int) -> dict[str, SeededScores]:
    return {n: SeededScores(shape, seed, n) for n, shape in shapes.items()}


@mask_source("random")
def from_random(cfg: ExtractConfig) -> Ranking:
    """Top-k of seeded uniform scores: a uniformly random set of exactly k entries (ties between equal
    float32 scores, about one entry in 2^24, go to the first in order)."""
    seed = cfg.extract.seed
    return _base(cfg, lambda model, _tokenizer, names: random_scores(
        {n: tuple(model.get_parameter(n).shape) for n in names}, seed), {"name": "random", "seed": seed})


def gradient_batches(cfg: ExtractConfig, tokenizer) -> Iterator[dict]:
    """The first extract.gradient_batches batches of task.*'s training rows, in the seeded order training
    uses (data.MicroBatches with extract.seed), collated as the training loop collates them."""
    from lota_cli.data import MicroBatches, collate, encode, load_rows

    opts = cfg.extract
    encoded = encode(tokenizer, cfg.task, load_rows(cfg.task, "train"))
    order = MicroBatches(len(encoded), opts.batch_size, opts.seed)
    for i in range(opts.gradient_batches):
        items = [[encoded.example(j)] for j in order.indices(i)]
        yield collate(items, tokenizer.pad_token_id or 0)


def accumulated_gradients(model, names: list[str], batches: Iterator[dict]) -> dict:
    """Sum over batches of |d(mean target-token NLL of the batch)/dw|, per tensor of `names`, in float32 on
    the CPU. The model is in eval mode (no dropout) with gradients on `names` only; nothing else is kept: one
    float32 accumulator per tensor next to the model's gradients."""
    import torch

    from lota_cli.data import IGNORE
    from lota_cli.models import token_nll_sum

    device = torch.device("cuda" if torch.cuda.is_available() else "cpu")
    model.to(device).eval()
    params = {n: model.get_parameter(n) for n in names}
    for p in model.parameters():
        p.requires_grad_(False)
    for p in params.values():
        p.requires_grad_(True)
    sums = {n: torch.zeros(p.shape, dtype=torch.float32, device=device) for n, p in params.items()}
    started, done = time.perf_counter(), 0
    for batch in batches:
        batch = {k: v.to(device) for k, v in batch.items()}
        loss = token_nll_sum(model, batch) / int((batch["labels"][:, 1:] != IGNORE).sum())
        done += 1
        if not math.isfinite(loss.item()):
            raise LotaError(f"the loss on gradient batch {done} is {loss.item()}; the model or the data is "
                            "broken: check model.path and task.*")
        loss.backward()
        for n, p in params.items():
            sums[n].add_(p.grad.abs())
            p.grad = None
    log.info("gradient: %d batches in %.1f s", done, time.perf_counter() - started)
    return {n: s.cpu() for n, s in sums.items()}


@mask_source("gradient")
def from_gradient(cfg: ExtractConfig) -> Ranking:
    opts = cfg.extract
    source = {"name": "gradient", "batches": opts.gradient_batches, "batch_size": opts.batch_size,
              "seed": opts.seed, "task": cfg.task.name}
    return _base(cfg, lambda model, tokenizer, names: accumulated_gradients(
        model, names, gradient_batches(cfg, tokenizer)), source)


_missing = [name for name in MASK_SOURCES if name not in _FUNCTIONS]
if _missing:
    raise ImportError(f"config.MASK_SOURCES names {_missing}, which no function here scores")
SOURCES: dict[str, Callable[[ExtractConfig], Ranking]] = {name: _FUNCTIONS[name] for name in MASK_SOURCES}
