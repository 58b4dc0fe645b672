"""lota eval: scores of a base, base + deltas or a saved model, by lota's own metrics or lm-evaluation-harness.

The model is a base (model.*) or a saved model directory (eval.model_dir), with eval.deltas added in place
(each checked against the base's fingerprint first). A backend of lota_cli.evaluation scores it: lota's own
(eval.backend=lota) or lm-evaluation-harness's tasks (eval.backend=lm_eval); both give
results.json's tasks.<task>.<metric>. lota's also give each metric's standard error over the examples,
tasks.<task>.<metric>_stderr (lm-eval's name; lm_eval's own stay under lm_eval.tasks.<task>.stderr), and write
each example's scores to out/examples.jsonl. eval.compare_to=<earlier results.json> reports the change per
task and metric (with its paired standard error when both runs scored the same examples): evaluating the base,
then base + adapter on an earlier task, shows forgetting.
"""

from __future__ import annotations

import json
import logging
from dataclasses import replace
from pathlib import Path

import torch
from rich.table import Table

from lota_cli import LotaError
from lota_cli.config import EvalConfig
from lota_cli.console import stderr
from lota_cli.evaluation import Scores, is_stderr, linearized, make_backend, paired_standard_error, stderr_key
from lota_cli.inputs import open_artifact
from lota_cli.io import write_text
from lota_cli.models import add_delta, fingerprint, load_model

log = logging.getLogger(__name__)
EXAMPLES = "examples.jsonl"  # per example per task, beside results.json: for paired comparisons


def run(cfg: EvalConfig, out: Path) -> list[Path]:
    opts = cfg.eval
    baseline = _read_results(opts.compare_to) if opts.compare_to else None
    baseline_examples = _read_examples(opts.compare_to) if opts.compare_to else {}
    backend = make_backend(cfg)  # checks its own inputs (lm_eval's task names and data) before the model loads
    deltas = [open_artifact(p, kinds=("task_vector", "sparse_delta")) for p in opts.deltas]
    scales = list(opts.scales) or [1.0] * len(deltas)

    # a saved directory keeps the dtype and trust settings of model.*, not its hub revision or GGUF file
    model_cfg = replace(cfg.model, path=opts.model_dir, gguf_file=None, revision=None) if opts.model_dir else cfg.model
    model, tokenizer = load_model(model_cfg)
    base = fingerprint(model) if deltas else None
    device = "cuda" if torch.cuda.is_available() else "cpu"
    model.to(device).eval()
    if deltas:
        for artifact in deltas:
            artifact.check_base(base, model_cfg.path)
        backend.before_deltas(model, tokenizer)  # what the deltas are measured against (preference rewards)
        for artifact, scale in zip(deltas, scales):
            add_delta(model, artifact, scale)
            log.info("added %s (%s, %d tensors) x %g", artifact.path, artifact.kind, len(artifact.names), scale)
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

    path = write_text(out / "results.json", json.dumps(results, indent=2) + "\n")
    if scores.examples:  # beside results.json, like a training stage's metrics.jsonl: not printed
        write_text(out / EXAMPLES, "".join(json.dumps(e) + "\n" for rows in scores.examples.values() for e in rows))
    return [path]


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
