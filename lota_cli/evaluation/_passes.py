"""Model passes of evaluation: teacher-forced answer NLL and batched greedy generation.

Batches are formed from length-sorted examples (less padding, so less wasted compute) and results are
returned in the caller's order.
"""

from __future__ import annotations

import logging
import math
import time

import torch
from torch import nn

from lota_cli import LotaError
from lota_cli.data import Example, collate
from lota_cli.models import token_nlls

log = logging.getLogger(__package__)


def _batches(lengths: list[int], batch_size: int) -> list[list[int]]:
    """Indices grouped into batches of similar length, longest first (an out-of-memory error shows at once)."""
    order = sorted(range(len(lengths)), key=lambda i: -lengths[i])
    return [order[i:i + batch_size] for i in range(0, len(order), batch_size)]


def _device(model: nn.Module) -> torch.device:
    return next(model.parameters()).device


class _Meter:
    """Examples/s and tokens/s on stderr every ~10% of the batches, and once at the end."""

    def __init__(self, what: str, n_batches: int):
        self.what, self.n_batches, self.every = what, n_batches, max(1, n_batches // 10)
        self.start, self.examples, self.tokens, self.done = time.perf_counter(), 0, 0, 0

    def update(self, examples: int, tokens: int) -> None:
        self.examples, self.tokens, self.done = self.examples + examples, self.tokens + tokens, self.done + 1
        if self.done % self.every == 0 or self.done == self.n_batches:
            seconds = time.perf_counter() - self.start
            log.info("%s: %d examples in %.1f s (%.1f examples/s, %.0f tokens/s)", self.what, self.examples,
                     seconds, self.examples / seconds, self.tokens / seconds)


@torch.inference_mode()
def nll_per_example(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int = 0,
                    what: str = "nll") -> list[tuple[float, int]]:
    """(NLL summed over its answer tokens, answer tokens) of each example, teacher-forced over prompt +
    answer, in the examples' order.

    Only answer tokens are scored (collate labels prompt and padding -100). Right padding: a pad id is never
    seen by a scored position under causal attention, so any `pad_id` gives the same result.
    """
    model.eval()
    device = _device(model)
    lengths = [len(e.prompt_ids) + len(e.target_ids) for e in examples]
    batches = _batches(lengths, batch_size)
    meter = _Meter(what, len(batches))
    out: list[tuple[float, int] | None] = [None] * len(examples)
    for ids in batches:
        items = [[(examples[i].prompt_ids + examples[i].target_ids,
                   [False] * len(examples[i].prompt_ids) + [True] * len(examples[i].target_ids))] for i in ids]
        batch = {k: v.to(device) for k, v in collate(items, pad_id).items()}
        for i, total in zip(ids, token_nlls(model, batch).tolist()):
            out[i] = (total, len(examples[i].target_ids))
        meter.update(len(ids), sum(lengths[i] for i in ids))
    if not sum(tokens for _, tokens in out):
        raise LotaError("no answer tokens to score: every example's target is empty; check task.target")
    return out


def nll(model: nn.Module, examples: list[Example], batch_size: int, pad_id: int = 0,
        what: str = "nll") -> tuple[float, float]:
    """(mean NLL per answer token, perplexity): the mean is over all answer tokens of all examples, so long
    answers weigh more (see nll_per_example)."""
    per = nll_per_example(model, examples, batch_size, pad_id, what)
    mean = sum(total for total, _ in per) / sum(tokens for _, tokens in per)
    return mean, math.exp(mean)


def stop_ids(model: nn.Module, tokenizer) -> list[int]:
    """Token ids that end an answer: the tokenizer's EOS (what training appends to every target) and the
    model's generation EOS ids (chat models often list an end-of-turn token there)."""
    ids = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
    configured = getattr(getattr(model, "generation_config", None), "eos_token_id", None)
    ids += configured if isinstance(configured, list) else [configured] if configured is not None else []
    ids = list(dict.fromkeys(ids))
    if not ids:
        raise LotaError("the tokenizer has no eos_token and the model no generation eos_token_id, so generation "
                        "could not stop; use a model with an EOS token or set eval.generate=false")
    return ids


@torch.inference_mode()
def generate(model: nn.Module, tokenizer, examples: list[Example], batch_size: int, max_new_tokens: int,
             what: str = "generate") -> list[str]:
    """Greedy answers to each example's prompt, decoded from the new tokens only, in the examples' order.

    Prompts are LEFT-padded so every row's next token sits in the last column, which lets a batch decode
    together with the KV cache; the attention mask keeps pads out of attention and positions.
    """
    model.eval()
    device = _device(model)
    stops = stop_ids(model, tokenizer)
    pad_id = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]
    batches = _batches([len(e.prompt_ids) for e in examples], batch_size)
    meter = _Meter(what, len(batches))
    answers: list[str | None] = [None] * len(examples)
    for ids in batches:
        prompts = [examples[i].prompt_ids for i in ids]
        width = max(map(len, prompts))
        input_ids = torch.full((len(ids), width), pad_id, dtype=torch.long)
        attention = torch.zeros((len(ids), width), dtype=torch.long)
        for row, prompt in enumerate(prompts):
            input_ids[row, width - len(prompt):] = torch.tensor(prompt)
            attention[row, width - len(prompt):] = 1
        out = model.generate(input_ids=input_ids.to(device), attention_mask=attention.to(device),
                             do_sample=False, num_beams=1, max_new_tokens=max_new_tokens, eos_token_id=stops,
                             pad_token_id=pad_id, use_cache=True)
        new_tokens = 0
        for i, tokens in zip(ids, out[:, width:].tolist()):
            end = next((k for k, t in enumerate(tokens) if t in stops), len(tokens))
            answers[i] = tokenizer.decode(tokens[:end], skip_special_tokens=True)
            new_tokens += min(end + 1, len(tokens))  # the stop token was generated too
        meter.update(len(ids), new_tokens)
    return answers
