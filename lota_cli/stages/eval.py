"""lota eval: scores of a base, base + deltas or a saved model, by lota's own metrics or lm-evaluation-harness.

The model is a base (model.*) or a saved model directory (eval.model_dir), with eval.deltas added in place
(each checked against the base's fingerprint first). A backend scores it: lota's own (eval.backend=lota,
below) or lm-evaluation-harness's tasks (eval.backend=lm_eval, lota_cli/lm_eval_backend.py); both give
results.json's tasks.<task>.<metric>. lota's also give each metric's standard error over the examples,
tasks.<task>.<metric>_stderr (lm-eval's name; lm_eval's own stay under lm_eval.tasks.<task>.stderr), and write
each example's scores to out/examples.jsonl. eval.compare_to=<earlier results.json> reports the change per
task and metric (with its paired standard error when both runs scored the same examples): evaluating the base,
then base + adapter on an earlier task, shows forgetting.
"""

from __future__ import annotations

import json
import logging
import time
from dataclasses import replace
from importlib.metadata import version
from pathlib import Path

import torch
from rich.table import Table

from lota_cli import LotaError
from lota_cli.artifacts import open_artifact
from lota_cli.config import EvalConfig, TaskConfig
from lota_cli.data import encode, eval_examples, load_rows
from lota_cli.evaluation import (EXACT_MATCH_RULE, ROUGE_TYPES, Scores, extract_number, generate, is_stderr,
                                 linearized, nll_per_example, paired_standard_error, per_example, rouge_scores,
                                 same_answer, stderr_key, summary)
from lota_cli.models import add_delta, fingerprint, load_model
from lota_cli.progress import stderr

log = logging.getLogger(__name__)
EXAMPLES = "examples.jsonl"  # per example per task, beside results.json: for paired comparisons
# how results.json's <metric>_stderr are computed (metric_definitions): nll and ppl, and the means of scores
STDERR_RULES = {
    "nll": "delta method over examples for the ratio sum(NLL) / sum(answer tokens): sqrt(n / (n - 1) * "
           "sum((nll_i - nll * tokens_i)^2)) / sum(tokens)",
    "ppl": "delta method: ppl * nll_stderr",
}
MEAN_STDERR_RULE = "sample standard deviation (n - 1) of the per-example scores / sqrt(n), lm-eval's mean_stderr"


def run(cfg: EvalConfig, out: Path) -> list[Path]:
    opts = cfg.eval
    baseline = _read_results(opts.compare_to) if opts.compare_to else None
    baseline_examples = _read_examples(opts.compare_to) if opts.compare_to else {}
    backend = _backend(cfg)  # checks its own inputs (lm_eval's task names and data) before the model loads
    deltas = [open_artifact(p, kinds=("task_vector", "sparse_delta")) for p in opts.deltas]
    scales = list(opts.scales) or [1.0] * len(deltas)

    # a saved directory keeps the dtype and trust settings of model.*, not its hub revision or GGUF file
    model_cfg = replace(cfg.model, path=opts.model_dir, gguf_file=None, revision=None) if opts.model_dir else cfg.model
    model, tokenizer = load_model(model_cfg)
    if deltas:
        base = fingerprint(model)
        for artifact, scale in zip(deltas, scales):
            artifact.check_base(base, model_cfg.path)
            add_delta(model, artifact, scale)
            log.info("added %s (%s, %d tensors) x %g", artifact.path, artifact.kind, len(artifact.names), scale)
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    log.info("evaluating %s%s on %s", model_cfg.path, f" + {len(deltas)} delta(s)" if deltas else "", device)

    scores = backend.evaluate(model, tokenizer)
    stderr.print(_results_table(scores.tasks))
    results = {
        "model": model_cfg.path,
        "deltas": [{"path": str(a.path), "scale": s} for a, s in zip(deltas, scales)],
        "backend": opts.backend,
        "settings": backend.settings,
        **scores.about,
        "tasks": scores.tasks,
    }
    if baseline is not None:
        results["compare"] = {"to": opts.compare_to,
                              "tasks": _compare(baseline, scores, opts.backend, baseline_examples)}
        stderr.print(_compare_table(results["compare"]["tasks"], opts.compare_to))

    out.mkdir(parents=True, exist_ok=True)
    path = out / "results.json"
    path.write_text(json.dumps(results, indent=2) + "\n")
    if scores.examples:  # beside results.json, like a training stage's metrics.jsonl: not printed
        (out / EXAMPLES).write_text("".join(json.dumps(e) + "\n" for rows in scores.examples.values() for e in rows))
    return [path]


def _backend(cfg: EvalConfig):
    """The object that scores the model: .settings (for results.json) and .evaluate(model, tokenizer) -> Scores."""
    if cfg.eval.backend == "lm_eval":
        from lota_cli.lm_eval_backend import LmEvalBackend  # lm_eval is imported only when chosen

        return LmEvalBackend(cfg.eval)
    return LotaBackend(cfg)


class LotaBackend:
    """lota's own scores per task of eval.tasks: answer NLL and perplexity always; with generation exact match
    (tasks with a checkable answer, GSM8K's rule: evaluation.extract_number) or ROUGE-1/2/L (rouge-score)."""

    LOWER_IS_BETTER = {"nll", "ppl"}

    def __init__(self, cfg: EvalConfig):
        self.cfg, opts = cfg, cfg.eval
        self.settings = {"max_examples": opts.max_examples, "max_new_tokens": opts.max_new_tokens,
                         "generate": opts.generate, "generate_examples": opts.generate_examples,
                         "rouge_stemmer": opts.rouge_stemmer}

    def evaluate(self, model, tokenizer) -> Scores:
        examples = {name: self._task(model, tokenizer, self.cfg.tasks[name]) for name in self.cfg.eval.tasks}
        tasks = {name: {**summary(rows, self._generated(self.cfg.tasks[name])), "n": len(rows)}
                 for name, rows in examples.items()}
        higher = {name: {m: m not in self.LOWER_IS_BETTER for m in t if m != "n" and not is_stderr(m)}
                  for name, t in tasks.items()}
        definitions = {name: self._definitions(self.cfg.tasks[name]) for name in tasks}
        return Scores(tasks, higher, {"metric_definitions": definitions}, examples)

    def _generated(self, task: TaskConfig) -> list[str]:
        """The metrics of generated answers a task is scored by."""
        if not self.cfg.eval.generate:
            return []
        return ["exact_match"] if task.metric == "exact_match" else list(ROUGE_TYPES)

    def _task(self, model, tokenizer, task: TaskConfig) -> list[dict]:
        """One task's per-example scores (evaluation.per_example): answer NLL always; exact_match or
        rouge1/rouge2/rougeL when generating."""
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
        metrics = ["nll", "ppl", *self._generated(task)]
        stderrs = {stderr_key(m): STDERR_RULES.get(m, MEAN_STDERR_RULE) for m in metrics}
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


# --------------------------------------------------------------------------- comparison

def _read_results(path: str) -> dict:
    """An earlier eval's results.json, read before the model loads so a wrong path fails at once."""
    try:
        results = json.loads(Path(path).read_text())
    except FileNotFoundError:
        raise LotaError(f"eval.compare_to={path}: no such file; give an earlier lota eval's results.json") from None
    except (OSError, ValueError) as err:
        raise LotaError(f"eval.compare_to={path}: not readable as JSON ({err}); give an earlier results.json") from err
    if not isinstance(results, dict) or not isinstance(results.get("tasks"), dict):
        raise LotaError(f"eval.compare_to={path} has no 'tasks'; is it the results.json of a lota eval?")
    return results


def _read_examples(results_path: str) -> dict[str, list[dict]]:
    """The per-example scores beside an earlier results.json (its examples.jsonl), by task; {} where there are
    none (runs of older lota, lm_eval's)."""
    path = Path(results_path).parent / EXAMPLES
    if not path.is_file():
        return {}
    by_task: dict[str, list[dict]] = {}
    try:
        for line in path.read_text().splitlines():
            example = json.loads(line)
            by_task.setdefault(example["task"], []).append(example)
    except (OSError, ValueError, KeyError, TypeError) as err:
        raise LotaError(f"{path}: not an eval's per-example scores ({err}); remove it or re-run that eval") from err
    return by_task


def _paired(before: list[dict] | None, after: list[dict] | None) -> bool:
    """Whether two runs scored the same examples: as many, with the same answer tokens each."""
    return bool(before) and bool(after) and ([e["answer_tokens"] for e in before]
                                             == [e["answer_tokens"] for e in after])


def _compare(baseline: dict, scores: Scores, backend: str, baseline_examples: dict[str, list[dict]]) -> dict:
    """Per task and metric both runs have: before, after, change (after - before) and whether higher is better;
    with both runs' per-example scores of the same examples, the change's paired standard error
    (change_stderr: of the per-example differences of the metric's linearized shares)."""
    if baseline.get("backend", "lota") != backend:
        log.warning("comparing eval.backend=%s scores with an earlier run of backend %s: only the metrics both "
                    "have are compared", backend, baseline.get("backend", "lota"))
    compared = {}
    for name, after in scores.tasks.items():
        before = baseline["tasks"].get(name)
        if before is None:
            log.warning("task %s is not in the compared results (it has %s); no change reported", name,
                        sorted(baseline["tasks"]))
            continue
        if before.get("n") != after["n"]:
            log.warning("task %s: compared over %s examples before and %d now; the change mixes in sampling",
                        name, before.get("n"), after["n"])
        compared[name] = {m: {"before": before[m], "after": v, "change": v - before[m],
                              "higher_is_better": scores.higher_is_better[name].get(m)}
                          for m, v in after.items()
                          if m != "n" and not is_stderr(m) and isinstance(before.get(m), (int, float))}
        old, new = baseline_examples.get(name), scores.examples.get(name)
        if _paired(old, new):
            for m, change in compared[name].items():
                change["change_stderr"] = paired_standard_error(linearized(new, m), linearized(old, m))
    return compared


# --------------------------------------------------------------------------- tables

def _results_table(tasks: dict) -> Table:
    """One row per task and metric: lm_eval's tasks have many, with long names ("exact_match,strict-match")."""
    table = Table(title="eval")
    for column in ("task", "metric", "value", "n"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for name, metrics in tasks.items():
        for m, value in metrics.items():
            if m != "n" and not is_stderr(m):
                table.add_row(name, m, _plus_minus(value, metrics.get(stderr_key(m))), str(metrics["n"]))
    return table


def _plus_minus(value: float, stderr: float | None, sign: str = "") -> str:
    return f"{value:{sign}.4f}" + (f" ± {stderr:.4f}" if stderr is not None else "")


def _compare_table(compared: dict, against: str) -> Table:
    """Before / after / change per metric, the change green when better and red when worse."""
    table = Table(title=f"change against {against}")
    for column in ("task", "metric", "before", "after", "change"):
        table.add_column(column, justify="left" if column in ("task", "metric") else "right")
    for name, metrics in compared.items():
        for m, c in metrics.items():
            better = c["change"] > 0 if c["higher_is_better"] else c["change"] < 0
            style = "" if c["change"] == 0 or c["higher_is_better"] is None else "green" if better else "red"
            change = _plus_minus(c["change"], c.get("change_stderr"), "+")
            table.add_row(name, m, f"{c['before']:.4f}", f"{c['after']:.4f}",
                          f"[{style}]{change}[/]" if style else change)
    return table
