"""eval.backend=lm_eval: lm-evaluation-harness tasks from local YAMLs on the tiny model (base, base + a delta,
a saved model), their numbers in results.json and the forgetting table, and the bad-input cases."""

from __future__ import annotations

import importlib.util
import json
import re
import sys
from importlib.metadata import version
from pathlib import Path

import pytest
import torch

from conftest import DATA, make_task_vector
from lota_cli import LotaError
from lota_cli.testing import in_process, paths

pytestmark = pytest.mark.slow  # lm-evaluation-harness end to end (its task index alone: seconds)
needs_lm_eval = pytest.mark.skipif(importlib.util.find_spec("lm_eval") is None,
                                   reason="lm-evaluation-harness is not installed (pip install 'lota-cli[lm-eval]')")

LIMIT = 6
# multiple choice: the question, three choices, the index of the right one. One token per choice, so that the
# tiny model's log-likelihoods are close and the Brier score moves with the weights (it saturates otherwise).
MC_ROWS = [{"question": f"Which follows {w}?", "choices": ["1", "2", "3"] if i % 2 else ["a", "b", "c"],
            "label": i % 3} for i, w in enumerate(["one", "two", "three", "four", "five", "six", "seven", "eight"])]
# the GSM8K-shaped task: lm-eval's stock gsm8k set-up (prompt, stop strings and both filters) over local files
ARITH_TASK = """
task: arith_gen
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: generate_until
test_split: test
doc_to_text: "Question: {{{{question}}}}\\nAnswer:"
doc_to_target: "{{{{answer}}}}"
metric_list:
  - metric: exact_match
    aggregation: mean
    higher_is_better: true
    ignore_case: true
    regexes_to_ignore: [",", "\\\\$", "(?s).*#### ", "\\\\.$"]
generation_kwargs:
  until: ["Question:", "</s>"]
  do_sample: false
  max_gen_toks: 8
filter_list:
  - name: strict-match
    filter:
      - function: regex
        regex_pattern: "#### (\\\\-?[0-9\\\\.\\\\,]+)"
      - function: take_first
  - name: flexible-extract
    filter:
      - function: regex
        group_select: -1
        regex_pattern: "(-?[$0-9.,]{{2,}})|(-?[0-9]+)"
      - function: take_first
metadata:
  version: 1.0
"""
MC_TASK = """
task: words_mc
dataset_path: json
dataset_kwargs:
  data_files:
    test: {data}
output_type: multiple_choice
test_split: test
doc_to_text: "{{{{question}}}}"
doc_to_choice: "{{{{choices}}}}"
doc_to_target: label
metric_list:
  - metric: acc
  - metric: brier_score
metadata:
  version: 2.0
"""
# a group over it, as lm_eval's benchmark suites are (mmlu, ...): lm_eval aggregates its tasks' accuracy
GROUP = """
group: words
task: [words_mc]
aggregate_metric_list:
  - metric: acc
    weight_by_size: true
metadata:
  version: 1.0
"""


@pytest.fixture(scope="module")
def task_dir(tmp_path_factory) -> Path:
    directory = tmp_path_factory.mktemp("lm_eval_tasks")
    (directory / "words.jsonl").write_text("".join(json.dumps(row) + "\n" for row in MC_ROWS))
    (directory / "arith.yaml").write_text(ARITH_TASK.format(data=DATA["arith_test"]))
    (directory / "words.yaml").write_text(MC_TASK.format(data=directory / "words.jsonl"))
    (directory / "group.yaml").write_text(GROUP)
    return directory


def _args(task_dir: Path) -> list[str]:
    return ["eval.backend=lm_eval", "eval.lm_eval.tasks=[arith_gen,words]", f"eval.lm_eval.include_path={task_dir}",
            "eval.lm_eval.builtin_tasks=false", f"eval.lm_eval.limit={LIMIT}"]


def _config(model: Path, out: Path, task_dir: Path, **options):
    """The EvalConfig of `lota eval model.path=MODEL _args(task_dir) eval.OPTION=...`, for in-process runs."""
    from lota_cli.config import EvalConfig, EvalOptions, LmEvalOptions, ModelConfig

    lm_eval = dict(tasks=["arith_gen", "words"], include_path=str(task_dir), builtin_tasks=False, limit=LIMIT)
    lm_eval.update(options.pop("lm_eval", {}))
    return EvalConfig(out=str(out), model=ModelConfig(path=str(model)),
                      eval=EvalOptions(backend="lm_eval", lm_eval=LmEvalOptions(**lm_eval), **options))


def _multiple_choice_by_hand(model, tokenizer) -> tuple[float, float]:
    """(accuracy, Brier score) of the first LIMIT rows, from each choice's summed log-likelihood after the
    question and lm_eval's target delimiter ' ' (the choice's tokens: those of question + ' ' + choice past the
    question's), without lm_eval."""
    correct, brier = 0, 0.0
    with torch.no_grad():
        for row in MC_ROWS[:LIMIT]:
            context = tokenizer(row["question"])["input_ids"]
            lls = []
            for choice in row["choices"]:
                ids = tokenizer(f"{row['question']} {choice}")["input_ids"]
                logp = torch.log_softmax(model(torch.tensor([ids])).logits[0].double(), -1)
                lls.append(sum(logp[i - 1, ids[i]].item() for i in range(len(context), len(ids))))
            lls = torch.tensor(lls, dtype=torch.float64)
            correct += int(lls.argmax()) == row["label"]
            brier += ((lls.softmax(0) - torch.eye(len(lls), dtype=torch.float64)[row["label"]]) ** 2).sum().item()
    return correct / LIMIT, brier / LIMIT


def _loaded(model_dir: Path, delta: Path | None = None):
    from lota_cli.artifacts import Artifact
    from lota_cli.config import ModelConfig
    from lota_cli.models import add_delta, load_model

    model, tokenizer = load_model(ModelConfig(path=str(model_dir)))
    if delta is not None:
        add_delta(model, Artifact(delta, kinds=("task_vector",)))
    return model.eval(), tokenizer


@pytest.fixture(scope="module")
def base_results(tiny_model, task_dir, tmp_path_factory):
    """The base model's lm_eval run by the CLI: (the finished process, the path of its results.json)."""
    out = tmp_path_factory.mktemp("lm_eval_base")
    return in_process("eval", f"model.path={tiny_model}", *_args(task_dir), f"out={out}"), out / "results.json"


@needs_lm_eval
def test_cli_writes_lm_eval_metrics_by_filter_beside_lotas_fields(base_results, tiny_model):
    result, path = base_results
    results = json.loads(path.read_text())
    assert paths(result) == [path]
    assert results["backend"] == "lm_eval" and results["model"] == str(tiny_model) and results["deltas"] == []
    assert results["settings"]["limit"] == LIMIT and results["settings"]["batch_size"] == 8
    assert results["lm_eval"]["version"] == version("lm_eval")
    arith, words = results["tasks"]["arith_gen"], results["tasks"]["words_mc"]
    # the metric's filter is in its name, and each filter's steps are recorded
    assert set(arith) == {"exact_match,strict-match", "exact_match,flexible-extract", "n"}
    assert all(0.0 <= v <= 1.0 for k, v in arith.items() if k != "n")
    about = results["lm_eval"]["tasks"]
    assert about["arith_gen"]["filters"]["strict-match"][0]["regex_pattern"] == "#### (\\-?[0-9\\.\\,]+)"
    assert about["arith_gen"]["examples_in_task"] == 200 and about["words_mc"]["version"] == 2.0
    assert set(words) == {"acc,none", "brier_score,none", "n"}
    assert arith["n"] == words["n"] == LIMIT
    assert results["tasks"]["words"] == {"acc,none": words["acc,none"], "n": LIMIT}  # the group: its one task
    assert about["words_mc"]["higher_is_better"] == {"acc": True, "brier_score": False}
    assert "acc,none" in about["words_mc"]["stderr"]

    accuracy, brier = _multiple_choice_by_hand(*_loaded(tiny_model))
    assert words["acc,none"] == pytest.approx(accuracy)
    assert words["brier_score,none"] == pytest.approx(brier, rel=1e-5)


@needs_lm_eval
def test_deltas_are_added_in_memory_and_compared_in_lm_evals_direction(base_results, tiny_model, task_dir,
                                                                      tmp_path):
    """A saved model (eval.model_dir) plus a delta, compared with the base run: lm_eval scores the model with
    the delta added, and the forgetting table takes each metric's direction from lm_eval."""
    from lota_cli.stages.eval import run

    before = json.loads(base_results[1].read_text())
    delta = make_task_vector(tiny_model, tmp_path / "tv.safetensors")
    cfg = _config(tmp_path / "no-model", tmp_path / "out", task_dir, model_dir=str(tiny_model),
                  deltas=[str(delta)], compare_to=str(base_results[1]))
    [path] = run(cfg, tmp_path / "out")
    after = json.loads(path.read_text())
    assert after["model"] == str(tiny_model) and after["deltas"] == [{"path": str(delta), "scale": 1.0}]

    words = after["tasks"]["words_mc"]
    accuracy, brier = _multiple_choice_by_hand(*_loaded(tiny_model, delta))
    assert words["acc,none"] == pytest.approx(accuracy)
    assert words["brier_score,none"] == pytest.approx(brier, rel=1e-5)
    assert words["brier_score,none"] != pytest.approx(before["tasks"]["words_mc"]["brier_score,none"])

    change = after["compare"]["tasks"]["words_mc"]
    assert change["brier_score,none"]["higher_is_better"] is False and change["acc,none"]["higher_is_better"] is True
    for metric, c in change.items():
        assert c["before"] == before["tasks"]["words_mc"][metric] and c["after"] == words[metric]
        assert c["change"] == pytest.approx(c["after"] - c["before"])
    assert set(after["compare"]["tasks"]["arith_gen"]) == {"exact_match,strict-match", "exact_match,flexible-extract"}


@needs_lm_eval
def test_unknown_task_names_are_named_with_the_include_path_before_the_model_loads(task_dir, tmp_path):
    from lota_cli.stages.eval import run

    cfg = _config(tmp_path / "no-model", tmp_path / "out", task_dir,
                  lm_eval={"tasks": ["words_mc", "no_such_task", "gsm8k_typo"]})
    with pytest.raises(LotaError) as failure:
        run(cfg, tmp_path / "out")
    message = str(failure.value)
    assert "['no_such_task', 'gsm8k_typo']" in message and f"include_path={task_dir}" in message
    assert "\n" not in message and not (tmp_path / "out").exists()


@needs_lm_eval
def test_a_task_whose_data_is_missing_fails_before_the_model_loads(tmp_path):
    from lota_cli.stages.eval import run

    (tmp_path / "tasks").mkdir()
    (tmp_path / "tasks" / "gone.yaml").write_text(MC_TASK.replace("words_mc", "gone").format(data=tmp_path / "x.jsonl"))
    cfg = _config(tmp_path / "no-model", tmp_path / "out", tmp_path / "tasks", lm_eval={"tasks": ["gone"]})
    with pytest.raises(LotaError, match=r"lm_eval could not load eval.lm_eval.tasks=\['gone'\]: .*include_path"):
        run(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_without_lm_eval_installed_the_error_names_the_extra(monkeypatch, tmp_path):
    from lota_cli.stages.eval import run

    monkeypatch.setitem(sys.modules, "lm_eval.tasks", None)  # `import lm_eval.tasks` now raises ImportError
    with pytest.raises(LotaError, match=r"lm-evaluation-harness .*install lota-cli\[lm-eval\]"):
        run(_config(tmp_path / "no-model", tmp_path / "out", tmp_path), tmp_path / "out")
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("backend, lm_eval, says", [
    ("lm_eval", {}, "eval.backend=lm_eval needs eval.lm_eval.tasks"),
    ("lota", {"tasks": ["hellaswag"]}, "eval.lm_eval.* only applies to eval.backend=lm_eval"),
    ("lm_eval", {"tasks": ["x"], "limit": 2.5}, "eval.lm_eval.limit=2.5: give a whole number"),
    ("lm_eval", {"tasks": ["x"], "batch_size": "big"}, "eval.lm_eval.batch_size='big'"),
    ("lm_eval", {"tasks": ["x"], "num_fewshot": -1}, "eval.lm_eval.num_fewshot=-1"),
    ("lm_eval", {"tasks": ["x"], "builtin_tasks": False}, "builtin_tasks=false leaves only eval.lm_eval.include_path"),
    ("harness", {}, "eval.backend='harness' is not valid"),
])
def test_bad_lm_eval_settings_are_refused_by_the_schema(backend, lm_eval, says):
    from lota_cli.config import EvalOptions, LmEvalOptions

    with pytest.raises(LotaError, match=re.escape(says)):
        EvalOptions(backend=backend, lm_eval=LmEvalOptions(**lm_eval))


def test_lotas_own_task_names_are_refused_with_the_lm_eval_backend():
    from lota_cli.config import EvalOptions, LmEvalOptions

    with pytest.raises(LotaError, match=re.escape("eval.tasks=['hellaswag'] names lota's own tasks")):
        EvalOptions(backend="lm_eval", tasks=["hellaswag"], lm_eval=LmEvalOptions(tasks=["hellaswag"]))


def test_limit_and_batch_size_take_what_lm_eval_takes():
    from lota_cli.config import LmEvalOptions

    assert LmEvalOptions(limit=6.0).limit == 6 and isinstance(LmEvalOptions(limit=6.0).limit, int)
    assert LmEvalOptions(limit=0.25).limit == 0.25  # a fraction of each task's examples
    assert [LmEvalOptions(batch_size=b).batch_size for b in (4, "auto", "auto:2")] == [4, "auto", "auto:2"]
