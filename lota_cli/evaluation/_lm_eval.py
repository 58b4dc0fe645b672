"""eval.backend=lm_eval: lm-evaluation-harness tasks on the model lota loaded (a base, base + deltas added in
memory, or a saved model), wrapped in lm_eval's HFLM: no model is written for it.

results.json: tasks.<task>."<metric>,<filter>" as lm_eval names them ("acc,none", "exact_match,strict-match";
`none`: the raw output, unfiltered) and tasks.<task>.n, the examples scored; lm_eval.version, and
lm_eval.tasks.<task>: the task's version, num_fewshot, the examples it has, higher_is_better, the stderrs and
the filters' definitions. A group's entry holds lm_eval's aggregate (if the group defines one) and n summed
over its tasks.
"""

from __future__ import annotations

import json
import logging
import numbers
from importlib.metadata import version
from pathlib import Path

from lota_cli import LotaError, first_line
from lota_cli.config import EvalOptions
from lota_cli.evaluation._scoring import Scores

log = logging.getLogger(__package__)
INSTALL = "install lota-cli[lm-eval] (pip install 'lota-cli[lm-eval]')"


class LmEvalBackend:
    """Indexes and loads the tasks when made, so an unknown name or unreadable data fails before the model
    loads (and nothing is written); evaluate() runs them."""

    def __init__(self, opts: EvalOptions):
        self.opts, o = opts, opts.lm_eval
        try:
            from lm_eval.tasks import TaskManager
        except ImportError as err:
            raise LotaError(f"eval.backend=lm_eval needs lm-evaluation-harness ({err}); {INSTALL}") from None
        if o.include_path and not Path(o.include_path).is_dir():
            raise LotaError(f"eval.lm_eval.include_path={o.include_path}: no such directory; give the directory "
                            "holding your task YAMLs")
        self.manager = TaskManager(include_path=o.include_path, include_defaults=o.builtin_tasks)
        unknown = [t for t in o.tasks if t not in self.manager.all_tasks and not _is_yaml(t)]
        if unknown:
            searched = [f"lm_eval {version('lm_eval')}'s tasks"] if o.builtin_tasks else []
            searched += [f"eval.lm_eval.include_path={o.include_path}"] if o.include_path else []
            raise LotaError(f"eval.lm_eval.tasks names {unknown}, not found in {' or '.join(searched)}; check "
                            "the names (`lm-eval ls tasks` lists lm_eval's), or add their YAMLs to include_path")
        try:
            loaded = self.manager.load(list(o.tasks))
        except Exception as err:  # lm_eval raises what its loaders raise: data sets, YAML, templates
            raise LotaError(f"lm_eval could not load eval.lm_eval.tasks={list(o.tasks)}: {type(err).__name__}: "
                            f"{first_line(err)}; offline, give a task YAML over local files (dataset_path: json, "
                            "dataset_kwargs.data_files) in include_path") from err
        self.tasks = _top_level(loaded)
        self.settings = {"tasks": list(o.tasks), "include_path": o.include_path, "num_fewshot": o.num_fewshot,
                         "limit": o.limit, "batch_size": o.batch_size or opts.batch_size}

    def before_deltas(self, model, tokenizer) -> None:
        """lm_eval's tasks score the model as it is: nothing is measured against the model before the deltas."""

    def evaluate(self, model, tokenizer) -> Scores:
        from lm_eval import simple_evaluate
        from lm_eval.models.huggingface import HFLM

        lm = HFLM(pretrained=model, tokenizer=tokenizer, batch_size=self.settings["batch_size"])
        results = simple_evaluate(model=lm, tasks=self.tasks, task_manager=self.manager,
                                  num_fewshot=self.opts.lm_eval.num_fewshot, limit=self.opts.lm_eval.limit,
                                  log_samples=False)
        return scores(results)


def scores(results: dict) -> Scores:
    """lota's view of simple_evaluate's results: the metrics per task, their direction, and lm_eval's details."""
    tasks, higher, details = {}, {}, {}
    for name, values in results["results"].items():
        numeric = {k: float(v) for k, v in values.items()
                   if "," in k and isinstance(v, numbers.Real) and not isinstance(v, bool)}
        metrics = {k: v for k, v in numeric.items() if "_stderr," not in k}
        directions = results.get("higher_is_better", {}).get(name, {})
        tasks[name] = {**metrics, "n": _examples(results, name)}
        higher[name] = {k: directions[k.split(",")[0]] for k in metrics if k.split(",")[0] in directions}
        config = results.get("configs", {}).get(name, {})
        details[name] = {
            "version": results.get("versions", {}).get(name),
            "num_fewshot": results.get("n-shot", {}).get(name),
            "examples_in_task": results.get("n-samples", {}).get(name, {}).get("original"),
            "higher_is_better": directions,
            "stderr": {k.replace("_stderr,", ","): v for k, v in numeric.items() if "_stderr," in k},
            "filters": {f["name"]: f["filter"] for f in config.get("filter_list", [])},
        }
    about = {"version": version("lm_eval"), "tasks": details}
    return Scores(tasks, higher, {"lm_eval": json.loads(json.dumps(about, default=str))})


def _examples(results: dict, name: str) -> int:
    """Examples scored for a task, or summed over a group's tasks."""
    if name in results.get("n-samples", {}):
        return results["n-samples"][name]["effective"]
    return sum(_examples(results, child) for child in results.get("group_subtasks", {}).get(name, []))


def _top_level(loaded: dict) -> list:
    """The requested tasks and groups as lm_eval objects (groups whole, so lm_eval aggregates them), for
    simple_evaluate to run without loading their data a second time."""
    children = {child for kids in loaded.get("group_map", {}).values() for child in kids}
    items = {**loaded.get("groups", {}), **loaded["tasks"]}
    return [item for name, item in items.items() if name not in children]


def _is_yaml(spec: str) -> bool:
    return spec.endswith((".yaml", ".yml")) and Path(spec).is_file()
