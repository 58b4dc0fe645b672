"""eval.backend=lota: lota's own scores per task of eval.tasks (answer NLL always; with generation exact match
or ROUGE-1/2/L; for preference pairs, how often the chosen completion wins, and against the model before
eval.deltas DPO's reward accuracy and margin), each with its standard error over the examples, and each
example's scores."""

from __future__ import annotations

import logging
import time
from importlib.metadata import version

from lota_cli import LotaError
from lota_cli.config import EvalConfig, TaskConfig
from lota_cli.data import encode, eval_examples, load_rows
from lota_cli.evaluation._passes import generate, nll_per_example
from lota_cli.evaluation._scoring import (EXACT_MATCH_RULE, ROUGE_TYPES, Scores, extract_number, is_stderr,
                                              per_example, rouge_scores, same_answer, stderr_key, summary)

log = logging.getLogger(__package__)
# how results.json's <metric>_stderr are computed (metric_definitions): nll and ppl, and the means of scores
STDERR_RULES = {
    "nll": "delta method over examples for the ratio sum(NLL) / sum(answer tokens): sqrt(n / (n - 1) * "
           "sum((nll_i - nll * tokens_i)^2)) / sum(tokens)",
    "ppl": "delta method: ppl * nll_stderr",
}
MEAN_STDERR_RULE = "sample standard deviation (n - 1) of the per-example scores / sqrt(n), lm-eval's mean_stderr"
PAIR_RULES = {
    "nll": "answer-token NLL of the chosen completions (ppl: its exp)",
    "pair_accuracy": "share of pairs whose chosen completion has the higher log-probability (summed over its "
                     "tokens) under the evaluated model",
    "reward_accuracy": "share of pairs with log p(chosen) - log ref(chosen) > log p(rejected) - log ref(rejected), "
                       "ref: the model before eval.deltas (DPO's implicit rewards over beta)",
    "margin": "mean of (log p(chosen) - log ref(chosen)) - (log p(rejected) - log ref(rejected)), in nats",
}


class LotaBackend:
    """lota's own scores per task of eval.tasks: answer NLL and perplexity always; with generation exact match
    (tasks with a checkable answer, GSM8K's rule: evaluation.extract_number) or ROUGE-1/2/L (rouge-score)."""

    LOWER_IS_BETTER = {"nll", "ppl"}

    def __init__(self, cfg: EvalConfig):
        self.cfg, opts = cfg, cfg.eval
        self.reference: dict[str, list[float]] = {}  # per preference task: the pairs' log-probabilities before deltas
        self._pair_examples: dict[str, list] = {}  # per preference task: its pairs, encoded once for both passes
        self.settings = {"max_examples": opts.max_examples, "max_new_tokens": opts.max_new_tokens,
                         "generate": opts.generate, "generate_examples": opts.generate_examples,
                         "rouge_stemmer": opts.rouge_stemmer}

    def before_deltas(self, model, tokenizer) -> None:
        """Each preference task's completion log-probabilities under the model before eval.deltas are added: the
        reference of the rewards (no copy of the model is kept)."""
        for name in self.cfg.eval.tasks:
            task = self.cfg.tasks[name]
            if task.format == "preference":
                self.reference[name] = [-total for total, _ in self._completions(model, tokenizer, task, "reference")]

    def evaluate(self, model, tokenizer) -> Scores:
        examples = {name: self._task(model, tokenizer, self.cfg.tasks[name]) for name in self.cfg.eval.tasks}
        tasks = {name: {**summary(rows, self._metrics(self.cfg.tasks[name])), "n": len(rows)}
                 for name, rows in examples.items()}
        higher = {name: {m: m not in self.LOWER_IS_BETTER for m in t if m != "n" and not is_stderr(m)}
                  for name, t in tasks.items()}
        definitions = {name: self._definitions(self.cfg.tasks[name]) for name in tasks}
        return Scores(tasks, higher, {"metric_definitions": definitions}, examples)

    def _generated(self, task: TaskConfig) -> list[str]:
        """The metrics of generated answers a task is scored by."""
        if not self.cfg.eval.generate or task.format == "preference":
            return []
        return ["exact_match"] if task.metric == "exact_match" else list(ROUGE_TYPES)

    def _metrics(self, task: TaskConfig) -> list[str]:
        """The means a task reports beside nll and ppl."""
        if task.format == "preference":
            return ["pair_accuracy", *(["reward_accuracy", "margin"] if task.name in self.reference else [])]
        return self._generated(task)

    def _completions(self, model, tokenizer, task: TaskConfig, what: str) -> list[tuple[float, int]]:
        """(NLL sum, tokens) of each completion of a preference task's pairs: chosen, rejected, chosen, ..."""
        opts = self.cfg.eval
        if task.name not in self._pair_examples:
            encoded = encode(tokenizer, task, load_rows(task, "eval", opts.max_examples), "eval")
            self._pair_examples[task.name] = eval_examples(encoded)
        return nll_per_example(model, self._pair_examples[task.name], opts.batch_size, tokenizer.pad_token_id or 0,
                               what=f"{task.name} {what}")

    def _pairs(self, model, tokenizer, task: TaskConfig) -> list[dict]:
        """One preference task's per-pair scores: the chosen completion's NLL, whether it wins, and against
        the reference (before_deltas) the reward margin."""
        nlls = self._completions(model, tokenizer, task, "pairs")
        logps, reference = [-total for total, _ in nlls], self.reference.get(task.name)
        log.info("task %s: %d pairs", task.name, len(nlls) // 2)
        rows = []
        for k in range(len(nlls) // 2):
            chosen, rejected = logps[2 * k], logps[2 * k + 1]
            row = {"task": task.name, "index": k, "nll": nlls[2 * k][0], "answer_tokens": nlls[2 * k][1],
                   "pair_accuracy": float(chosen > rejected)}
            if reference is not None:
                margin = (chosen - reference[2 * k]) - (rejected - reference[2 * k + 1])
                row.update(reward_accuracy=float(margin > 0), margin=margin)
            rows.append(row)
        return rows

    def _task(self, model, tokenizer, task: TaskConfig) -> list[dict]:
        """One task's per-example scores (evaluation.per_example): answer NLL always; exact_match or
        rouge1/rouge2/rougeL when generating; a preference task's per pair (_pairs)."""
        if task.format == "preference":
            return self._pairs(model, tokenizer, task)
        opts = self.cfg.eval
        started = time.perf_counter()
        encoded = encode(tokenizer, task, load_rows(task, "eval", opts.max_examples), "eval")
        examples, references = eval_examples(encoded), encoded.references
        log.info("task %s: %d examples", task.name, len(examples))
        pad_id = tokenizer.pad_token_id or 0
        nlls = nll_per_example(model, examples, opts.batch_size, pad_id, what=f"{task.name} nll")
        scored = {}
        if opts.generate:
            n = min(len(examples), opts.generate_examples or len(examples))  # the rest: not scored (None)
            answers = generate(model, tokenizer, examples[:n], opts.batch_size, opts.max_new_tokens,
                               what=f"{task.name} generate")
            if task.metric == "exact_match":
                scored = {"exact_match": _exact_match(task, answers, references[:n])}
            else:
                scored = rouge_scores(answers, references[:n], opts.rouge_stemmer)
            scored = {m: values + [None] * (len(examples) - n) for m, values in scored.items()}
        log.info("task %s done in %.1f s", task.name, time.perf_counter() - started)
        return per_example(task.name, nlls, scored)

    def _definitions(self, task: TaskConfig) -> dict[str, str]:
        """How each score of generated answers and each standard error was computed, as results.json's
        metric_definitions.<task> has it."""
        metrics = ["nll", "ppl", *self._metrics(task)]
        stderrs = {stderr_key(m): STDERR_RULES.get(m, MEAN_STDERR_RULE) for m in metrics}
        if task.format == "preference":
            return {**{m: PAIR_RULES[m] for m in metrics if m in PAIR_RULES}, **stderrs}
        if not self.cfg.eval.generate:
            return stderrs
        if task.metric == "exact_match":
            return {"exact_match": f"{EXACT_MATCH_RULE} ({task.answer_pattern})", **stderrs}
        stemmer = "on" if self.cfg.eval.rouge_stemmer else "off"
        return {**{kind: f"{kind} F1 by rouge-score {version('rouge-score')}, Porter stemmer {stemmer}"
                   for kind in ROUGE_TYPES}, **stderrs}


def _exact_match(task: TaskConfig, answers: list[str], references: list[str]) -> list[float | None]:
    """Per answer 1.0 when its last number equals the reference's answer (task.answer_pattern), else 0.0.

    References without an answer score None (left out, with a warning): a malformed row says nothing about
    the model.
    """
    gold = [extract_number(r, task.answer_pattern) for r in references]
    missing = gold.count(None)
    if missing == len(gold):
        raise LotaError(f"task {task.name}: no reference matches task.answer_pattern={task.answer_pattern!r} "
                        f"(first reference: {references[0][:120]!r}); fix the pattern or task.target")
    if missing:
        log.warning("task %s: %d of %d references have no answer matching task.answer_pattern; left out of "
                    "exact_match", task.name, missing, len(answers))
    return [None if g is None else float(same_answer(extract_number(a), g)) for a, g in zip(answers, gold)]
