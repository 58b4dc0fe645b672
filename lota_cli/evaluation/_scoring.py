"""Scores: answer extraction and exact match, ROUGE, per-example records, standard errors and their paired
changes, and what a backend answers the eval stage (Scores)."""

from __future__ import annotations

import math
import re
import sys
from dataclasses import dataclass, field


# a number as written in text: sign, dollar sign, thousands commas and decimals allowed ("-$1,234.50")
_NUMBER = re.compile(r"-?\$?\d[\d,]*(?:\.\d+)?")


# --------------------------------------------------------------------------- metrics

def normalize_number(text: str) -> str | None:
    """'$1,234.' -> '1234': drop dollar signs, thousands commas and a sentence-ending period."""
    text = text.strip().replace("$", "").replace(",", "").rstrip(".")
    return text or None


def extract_number(text: str, pattern: str | None = None) -> str | None:
    """The checkable answer in `text`, normalized; None when there is none.

    With `pattern` (task.answer_pattern, for references: GSM8K's '#### 18') its group 1; without, the last
    number in the text, since a model states its final answer after the working.

    GSM8K's rule, against lm-evaluation-harness's gsm8k task (its two filters, both compared as strings after
    dropping ',', '$' and a final '.'): lm-eval's `strict-match` takes the first '#### N' in the generation,
    so it scores only answers in the training format; its `flexible-extract` takes the last match of
    `(-?[$0-9.,]{2,})|(-?[0-9]+)`. lota's exact_match is flexible-extract's rule with a stricter number (one
    with a digit: '...' is none) compared numerically ('18.0' == '18', see same_answer).
    """
    if pattern:
        match = re.search(pattern, text)
        return normalize_number(match.group(1)) if match else None
    numbers = _NUMBER.findall(text)
    return normalize_number(numbers[-1]) if numbers else None


# how results.json names the rule exact_match used (see extract_number)
EXACT_MATCH_RULE = ("last number in the generation (like lm-eval's flexible-extract), compared numerically with "
                    "group 1 of task.answer_pattern in the reference")


def same_answer(prediction: str | None, reference: str | None) -> bool:
    """Numeric equality when both parse ('18.0' == '18'), else exact string equality."""
    if prediction is None or reference is None:
        return False
    try:
        return float(prediction) == float(reference)
    except ValueError:
        return prediction == reference


ROUGE_TYPES = ("rouge1", "rouge2", "rougeL")


def _absl_keeps_the_real_stderr() -> None:
    """rouge-score imports absl, whose log handler keeps the sys.stderr of the moment it was imported and, when
    logging is reconfigured later (Hydra does, for every run), closes that stream unless it is the current
    one. Where stderr is redirected (a notebook, pytest's capture, contextlib.redirect_stderr) that closes the
    redirect's file under its owner. The process's own stderr is never closed."""
    from absl import logging as absl_logging

    absl_logging.get_absl_handler().python_handler.stream = sys.__stderr__


def rouge_scores(predictions: list[str], references: list[str], use_stemmer: bool = True) -> dict[str, list[float]]:
    """ROUGE-1, ROUGE-2 and ROUGE-L F1 of each pair ({"rouge1": [...], "rouge2": [...], "rougeL": [...]}) by
    Google's rouge-score, the package published ROUGE numbers come from: it lowercases, splits on anything but
    ASCII letters and digits (so text in other scripts scores 0), and with `use_stemmer` Porter-stems words
    longer than 3 letters. rougeL is the sentence-level LCS (not rougeLsum, which splits on newlines)."""
    from rouge_score import rouge_scorer  # imports nltk, ~2 s: only when a task is scored by ROUGE

    _absl_keeps_the_real_stderr()
    scorer = rouge_scorer.RougeScorer(list(ROUGE_TYPES), use_stemmer=use_stemmer)
    scores: dict[str, list[float]] = {kind: [] for kind in ROUGE_TYPES}
    for prediction, reference in zip(predictions, references, strict=True):
        for kind, score in scorer.score(reference, prediction).items():  # (target, prediction)
            scores[kind].append(score.fmeasure)
    return scores


def rouge(predictions: list[str], references: list[str], use_stemmer: bool = True) -> dict[str, float]:
    """Mean ROUGE-1, ROUGE-2 and ROUGE-L F1 over the pairs (see rouge_scores)."""
    return {kind: sum(values) / len(values) for kind, values in rouge_scores(predictions, references,
                                                                              use_stemmer).items()}


# --------------------------------------------------------------------------- standard errors

def stderr_key(metric: str) -> str:
    """results.json's name of a metric's standard error, lm-eval's: nll -> nll_stderr,
    exact_match,strict-match -> exact_match_stderr,strict-match."""
    name, comma, filter_name = metric.partition(",")
    return f"{name}_stderr{comma}{filter_name}"


def is_stderr(key: str) -> bool:
    return key.partition(",")[0].endswith("_stderr")


def linearized(examples: list[dict], metric: str) -> list[float | None]:
    """Each example's first-order share of `metric`, so that the metric's standard error is
    standard_error(linearized(...)), and a paired change's that of the differences over the same examples.
    A mean of per-example scores (exact_match, ROUGE): the scores (None: not scored). nll, a ratio of sums
    (answer-token NLL / answer tokens): the delta method's (nll_i - nll * tokens_i) / mean tokens. ppl = exp(nll):
    ppl times nll's."""
    if metric not in ("nll", "ppl"):
        return [e[metric] for e in examples]
    tokens = sum(e["answer_tokens"] for e in examples)
    mean, per_example = sum(e["nll"] for e in examples) / tokens, tokens / len(examples)
    shares = [(e["nll"] - mean * e["answer_tokens"]) / per_example for e in examples]
    return shares if metric == "nll" else [math.exp(mean) * share for share in shares]


def standard_error(values: list[float | None]) -> float | None:
    """Sample standard deviation (n - 1) / sqrt(n) of the values that are not None, as lm-eval's mean_stderr
    (for 0/1 scores: sqrt(p (1 - p) / (n - 1))); None for fewer than 2 values."""
    xs = [v for v in values if v is not None]
    if len(xs) < 2:
        return None
    mean = sum(xs) / len(xs)
    return math.sqrt(sum((x - mean) ** 2 for x in xs) / (len(xs) - 1) / len(xs))


def paired_standard_error(after: list[float | None], before: list[float | None]) -> float | None:
    """Standard error of a change measured on the same examples: of the per-example differences."""
    return standard_error([a - b if a is not None and b is not None else None for a, b in zip(after, before,
                                                                                          strict=True)])


def per_example(task: str, nlls: list[tuple[float, int]], scored: dict[str, list[float | None]]) -> list[dict]:
    """examples.jsonl's lines of a task: per example its index, answer-token NLL sum, answer tokens and its
    score by each generation metric (None: not scored)."""
    return [{"task": task, "index": i, "nll": total, "answer_tokens": tokens,
             **{metric: values[i] for metric, values in scored.items()}} for i, (total, tokens) in enumerate(nlls)]


def summary(examples: list[dict], metrics: list[str]) -> dict[str, float | None]:
    """nll, ppl and `metrics` (means of the scores not None) over a task's examples, each followed by its
    standard error (<metric>_stderr)."""
    tokens = sum(e["answer_tokens"] for e in examples)
    mean_nll = sum(e["nll"] for e in examples) / tokens
    values = {"nll": mean_nll, "ppl": math.exp(mean_nll)}
    for metric in metrics:
        scores = [e[metric] for e in examples if e[metric] is not None]
        values[metric] = sum(scores) / len(scores)
    out = {}
    for metric, value in values.items():
        out[metric] = value
        out[stderr_key(metric)] = standard_error(linearized(examples, metric))
    return out


@dataclass
class Scores:
    """An evaluation backend's answer to the eval stage: per task its numbers and "n" (examples scored), per
    task and number whether higher is better (what the forgetting table colours by), and what results.json
    records at its top level about how the numbers were made."""

    tasks: dict[str, dict[str, float]]
    higher_is_better: dict[str, dict[str, bool]]
    about: dict
    examples: dict[str, list[dict]] = field(default_factory=dict)  # per task, examples.jsonl's lines
