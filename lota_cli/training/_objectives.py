"""What a training step minimizes (train.objective), asked of by the loop without knowing which it is.

sft    the next-token loss of the targets, normalized by the target tokens of the global batch (_loop.py).
dpo    preference pairs (task.format=preference): -log sigmoid(beta * ((log p(chosen) - log ref(chosen)) -
       (log p(rejected) - log ref(rejected)))), each completion's log-probability summed over its tokens,
       normalized by the pairs of the global batch; with train.label_smoothing e, cDPO's (1 - e) times that plus
       e times the loss of the flipped pair. TRL's DPOTrainer (loss_type=sigmoid) is the oracle in the tests.
simpo  reference-free: -log sigmoid(beta * (mean log p(chosen) - mean log p(rejected)) - gamma), the means
       over each completion's tokens (TRL's CPOTrainer, loss_type=simpo, cpo_alpha=0).

The reference a DPO step compares with is the model before the stage trained it, held without a second copy:
  SparseOffReference    sparse-train and lotto's sparse phase: the same model with the stage's values left
                        out of one more forward, without gradients (training._sparse.sparse_off): the base,
                        or in LoTTO the base plus the earlier frozen deltas.
  PrecomputedReference  dense and LoRA calibrations, whose trained weights are the model itself: every pair
                        the run will use is scored once before the first step, on the model as loaded. A
                        resumed run scores them again from the model as loaded, before its checkpoint is
                        restored, so it compares with the very numbers the unbroken run had.
A pair is two rows of a batch, chosen then rejected (data.Fixed draws them as one item).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lota_cli.config import TrainConfig
from lota_cli.data import Item, MicroBatches, collate, targets
from lota_cli.models import completion_logps, token_nll_sum
from lota_cli.training._sparse import sparse_off


def pair_rows(items: list[Item]) -> list[Item]:
    """A batch's rows of preference items: each pair's chosen, then its rejected sequence, a row each."""
    return [[sequence] for item in items for sequence in item]


class NextToken:
    """train.objective=sft."""

    metrics = ("loss",)

    def units(self, item: Item) -> int:
        return targets(item)

    def rows(self, items: list[Item]) -> list[Item]:
        return items

    def start(self, model: nn.Module, data, steps: int, train: TrainConfig, pad_id: int, engine) -> None:
        pass

    def terms(self, model: nn.Module, batch: dict, indices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        """(what backward takes, before normalization; the sums of self.metrics over the batch)."""
        nll = token_nll_sum(model, batch)
        return nll, [nll.detach()]


class SparseOffReference:
    """The model with the stage's sparse values left out (no copy; one more forward, no gradients)."""

    def start(self, model: nn.Module, data, steps: int, train: TrainConfig, pad_id: int, engine) -> None:
        pass

    def logps(self, model: nn.Module, batch: dict, indices: list[int]) -> torch.Tensor:
        with torch.no_grad(), sparse_off():
            return completion_logps(model, batch)


class PrecomputedReference:
    """The model as loaded, scored once on every pair the run will use, before its first step."""

    def __init__(self):
        self.table: torch.Tensor | None = None  # [items, 2]: the chosen and rejected log-probabilities

    def start(self, model: nn.Module, data, steps: int, train: TrainConfig, pad_id: int, engine) -> None:
        """Score the run's micro-batches as its steps will see them (each process its share, in the same rows),
        so a pair's reference and its policy in its first step are the same forward: a micro-batch whose pairs
        were all scored already (a later epoch) is skipped, by every process alike."""
        acc = engine.accelerator
        world, rank = acc.num_processes, acc.process_index
        table = torch.zeros((data.n, 2), dtype=torch.float64, device=acc.device)
        scored: set[int] = set()
        model.eval()
        with torch.no_grad():
            for i in range(steps * train.grad_accum):
                indices = data.micro_indices(i)
                per = len(indices) // world
                # the pairs this micro-batch sees first, each scored by the process whose share first holds it
                first = {}
                for at, j in enumerate(indices):
                    if j not in scored:
                        first.setdefault(j, at // per)
                if not first:
                    continue
                scored.update(first)
                mine = MicroBatches.shard(indices, rank, world)
                batch = collate(pair_rows([data.item(j) for j in mine]), pad_id)
                logps = completion_logps(model, {k: v.to(acc.device) for k, v in batch.items()}).double()
                for j, pair in zip(mine, logps.view(-1, 2)):
                    if first.pop(j, None) == rank:
                        table[j] = pair
        model.train()
        self.table = acc.reduce(table, "sum")  # each pair written by one process, zeros elsewhere

    def logps(self, model: nn.Module, batch: dict, indices: list[int]) -> torch.Tensor:
        return self.table[indices].reshape(-1).to(torch.float32)


class Preference:
    """train.objective=dpo or simpo."""

    metrics = ("loss", "reward_accuracy", "chosen_reward", "rejected_reward", "margin")

    def __init__(self, train: TrainConfig, reference):
        self.kind, self.beta, self.gamma = train.objective, train.beta, train.gamma
        self.smoothing = train.label_smoothing
        self.reference = reference if self.kind == "dpo" else None

    def units(self, item: Item) -> int:
        return 1

    def rows(self, items: list[Item]) -> list[Item]:
        return pair_rows(items)

    def start(self, model: nn.Module, data, steps: int, train: TrainConfig, pad_id: int, engine) -> None:
        if self.reference is not None:
            self.reference.start(model, data, steps, train, pad_id, engine)

    def terms(self, model: nn.Module, batch: dict, indices: list[int]) -> tuple[torch.Tensor, list[torch.Tensor]]:
        logps = completion_logps(model, batch, average=self.kind == "simpo")
        if self.reference is not None:
            logps = logps - self.reference.logps(model, batch, indices).to(logps.device)
        chosen, rejected = self.beta * logps[0::2], self.beta * logps[1::2]
        z = chosen - rejected - (self.gamma if self.kind == "simpo" else 0.0)
        losses = -(1 - self.smoothing) * F.logsigmoid(z) - self.smoothing * F.logsigmoid(-z)
        c, r = chosen.detach(), rejected.detach()
        return losses.sum(), [losses.detach().sum(), (c > r).double().sum(), c.sum(), r.sum(), (c - r).sum()]


def make_objective(train: TrainConfig, reference):
    """The objective of train.objective; `reference`: how the stage holds its model before training."""
    return NextToken() if train.objective == "sft" else Preference(train, reference)
