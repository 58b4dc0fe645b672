"""The token losses training and evaluation share: each row's summed NLL of its target tokens, and a
completion's log-probability (preference training)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from lota_cli.data import IGNORE


def token_nlls(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """Per row, the sum over its target tokens of -log p(token | prefix), in float32 (eval scores examples
    one by one with it). A packed batch has position ids and no attention mask (transformers then keeps
    attention within each example)."""
    inputs = {k: v for k, v in batch.items() if k != "labels"}
    logits = model(**inputs, use_cache=False).logits
    labels = batch["labels"][:, 1:]
    losses = F.cross_entropy(logits[:, :-1].flatten(0, 1).float(), labels.flatten(), ignore_index=IGNORE,
                             reduction="none")
    return losses.view(labels.shape).sum(dim=1)


def token_nll_sum(model: nn.Module, batch: dict[str, torch.Tensor]) -> torch.Tensor:
    """The training loss before normalization: every target token's NLL of the batch, summed."""
    return token_nlls(model, batch).sum()


def completion_logps(model: nn.Module, batch: dict[str, torch.Tensor], average: bool = False) -> torch.Tensor:
    """Per row, the log-probability of its target tokens (a completion) given what precedes them: summed, or
    with `average` their mean (SimPO's length-normalized score)."""
    logps = -token_nlls(model, batch)
    if average:
        logps = logps / (batch["labels"][:, 1:] != IGNORE).sum(dim=1).clamp(min=1)
    return logps
