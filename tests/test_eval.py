"""lota eval: answer extraction, ROUGE, answer-token NLL, batched greedy generation, and the stage end to end."""

from __future__ import annotations

import json
import math
from pathlib import Path

import numpy as np
import pytest
import torch

from conftest import ALPACA, DATA, GSM8K_TEST, GSM8K_TRAIN, make_task_vector, needs_shared_data
from lota_cli import LotaError
from lota_cli.evaluation import extract_number, generate, nll, rouge, ROUGE_TYPES, same_answer
from lota_cli.testing import in_process, paths

GSM8K_PATTERN = r"####\s*([-\d,\.]+)"


def stderrs(*metrics: str) -> set[str]:
    return {f"{m}_stderr" for m in metrics}


# --------------------------------------------------------------------------- answer extraction

@pytest.mark.parametrize("reference, expected", [
    ("She makes 9 * 2 = $<<9*2=18>>18 every day.\n#### 18", "18"),
    ("The total is 1,200 + 34.\n#### 1,234", "1234"),
    ("It loses money.\n#### -5", "-5"),
    ("Half of it.\n#### 0.5.", "0.5"),
    ("no marker 42", None),
])
def test_reference_answer_is_the_number_after_the_marker(reference, expected):
    assert extract_number(reference, GSM8K_PATTERN) == expected


@pytest.mark.parametrize("prediction, expected", [
    ("3 + 4 = 7 apples, so she has 12 left.", "12"),
    ("The answer is $1,234.50.", "1234.50"),
    ("It costs $18.", "18"),
    ("Total: 2,000,000", "2000000"),
    ("She owes -$5 now", "-5"),
    ("#### 72", "72"),
    ("I do not know.", None),
    ("", None),
])
def test_prediction_answer_is_the_last_number(prediction, expected):
    assert extract_number(prediction) == expected


def test_answers_compare_numerically_when_both_parse():
    assert same_answer("18.0", "18")
    assert same_answer("1234.50", "1234.5")
    assert not same_answer("18", "180")
    assert same_answer("1.2.3", "1.2.3")  # not numbers: exact string equality
    assert not same_answer(None, "18")
    assert not same_answer("18", None)


# --------------------------------------------------------------------------- ROUGE

def test_rouge_is_rouge_score_f1_averaged_over_pairs():
    # unigrams: 5 of 6 shared on both sides (F 5/6); bigrams: the-cat, on-the, the-mat of 5 (F 3/5);
    # LCS "the cat on the mat" (F 5/6). The second pair shares nothing. Scores are means over the pairs.
    scores = rouge(["the cat sat on the mat", "nothing shared"], ["The cat is on the mat", "entirely different"])
    assert scores == pytest.approx({"rouge1": 5 / 12, "rouge2": 3 / 10, "rougeL": 5 / 12})


def test_rouge_tokenizes_and_stems_as_rouge_score_does():
    # punctuation and case are dropped; the Porter stemmer maps running/runs -> run and dogs -> dog
    assert rouge(["Running dogs!"], ["runs, dog."]) == {"rouge1": 1.0, "rouge2": 1.0, "rougeL": 1.0}
    assert rouge(["Running dogs!"], ["runs, dog."], use_stemmer=False) == {"rouge1": 0.0, "rouge2": 0.0,
                                                                           "rougeL": 0.0}
    assert rouge(["", "prediction"], ["reference", ""]) == {"rouge1": 0.0, "rouge2": 0.0, "rougeL": 0.0}


def test_rouge_l_is_read_as_the_older_name_of_rouge():
    from lota_cli.config import TaskConfig

    assert TaskConfig(metric="rouge_l", answer_pattern=None).metric == "rouge"


# --------------------------------------------------------------------------- model passes on the tiny model

@pytest.fixture(scope="module")
def tiny(tiny_model):
    from lota_cli.config import ModelConfig
    from lota_cli.models import load_model

    model, tokenizer = load_model(ModelConfig(path=str(tiny_model)))
    return model.eval(), tokenizer


def _examples(tokenizer, pairs):
    from lota_cli.data import Example

    return [Example(tokenizer(p)["input_ids"], tokenizer(t, add_special_tokens=False)["input_ids"])
            for p, t in pairs]


def _greedy(model, prompt_ids: list[int], n: int) -> list[int]:
    """n greedy tokens by full forward passes (no cache, no padding): the reference for generate()."""
    ids = list(prompt_ids)
    with torch.no_grad():
        for _ in range(n):
            ids.append(int(model(torch.tensor([ids])).logits[0, -1].argmax()))
    return ids[len(prompt_ids):]


def test_nll_scores_only_answer_tokens(tiny):
    """Batched, padded NLL equals a by-hand sum over answer positions of unpadded single-example logits."""
    model, tokenizer = tiny
    examples = _examples(tokenizer, [
        ("Natalia sold clips to 48 of her friends in April.", " She sold 24 in May."),
        ("How many?", " 72 clips altogether, since 48 + 24 = 72."),
        ("Weng earns $12 an hour for babysitting. Yesterday she did 50 minutes.", " $10"),
    ])
    total, count = 0.0, 0
    with torch.no_grad():
        for e in examples:
            logp = torch.log_softmax(model(torch.tensor([e.prompt_ids + e.target_ids])).logits[0].float(), -1)
            start = len(e.prompt_ids) - 1  # the logits at position i predict token i + 1
            total -= sum(logp[start + j, t].item() for j, t in enumerate(e.target_ids))
            count += len(e.target_ids)
    expected = total / count
    for batch_size, pad_id in [(1, 0), (2, 0), (3, 0), (3, 7)]:
        mean, ppl = nll(model, examples, batch_size, pad_id)
        assert mean == pytest.approx(expected, rel=1e-5), (batch_size, pad_id)
        assert ppl == pytest.approx(math.exp(expected), rel=1e-5)


PROMPTS = ["Janet has 3 ducks.", "A robe takes 2 bolts of blue fiber and half that much white fiber. How many?",
           "Josh", "James writes a 3-page letter to 2 different friends twice a week. How many pages a year?"]


def test_batched_generation_equals_one_at_a_time(tiny):
    model, tokenizer = tiny
    examples = _examples(tokenizer, [(p, "") for p in PROMPTS])
    batched = generate(model, tokenizer, examples, batch_size=4, max_new_tokens=12)
    alone = generate(model, tokenizer, examples, batch_size=1, max_new_tokens=12)
    assert batched == alone
    assert len(set(map(len, (e.prompt_ids for e in examples)))) == len(examples)  # different lengths: padding used

    # and one-at-a-time equals a plain argmax loop without cache: only the new tokens are decoded
    assert alone[1] == tokenizer.decode(_greedy(model, examples[1].prompt_ids, 12), skip_special_tokens=True)


def test_generation_stops_at_eos(tiny):
    """A token the model emits, declared an EOS id, ends each answer before it (the rows stop independently)."""
    model, tokenizer = tiny
    examples = _examples(tokenizer, [(p, "") for p in PROMPTS[:2]])
    first = _greedy(model, examples[0].prompt_ids, 8)
    stop = first[2]
    saved = model.generation_config.eos_token_id
    model.generation_config.eos_token_id = [tokenizer.eos_token_id, stop]
    try:
        stopped = generate(model, tokenizer, examples, batch_size=2, max_new_tokens=8)
    finally:
        model.generation_config.eos_token_id = saved
    second = _greedy(model, examples[1].prompt_ids, 8)
    for answer, ids in zip(stopped, (first, second)):
        assert answer == tokenizer.decode(ids[:ids.index(stop)] if stop in ids else ids, skip_special_tokens=True)


# --------------------------------------------------------------------------- the stage

def _eval_config(tiny_model: Path, out: Path, **options):
    from lota_cli.config import EvalConfig, EvalOptions, ModelConfig, TaskConfig

    gsm8k = TaskConfig(name="gsm8k", eval_data_files=str(DATA["arith_test"]), max_length=384)
    opts = dict(tasks=["gsm8k"], max_examples=8, max_new_tokens=16)
    opts.update(options)
    return EvalConfig(out=str(out), model=ModelConfig(path=str(tiny_model)), tasks={"gsm8k": gsm8k},
                      eval=EvalOptions(**opts))


def test_cli_eval_then_compare_with_a_delta(tiny_model, tmp_path, data):
    from lota_cli.stages.eval import run

    out = tmp_path / "base"
    proc = in_process("eval", f"model.path={tiny_model}", "eval.tasks=[gsm8k,alpaca]",
                      f"tasks.gsm8k.eval_data_files={data['arith_test']}",
                      f"tasks.alpaca.data_files={data['reverse_train']}", "eval.max_examples=8",
                      "eval.max_new_tokens=16", f"out={out}")
    assert proc.stdout == f"{out / 'results.json'}\n"
    before = json.loads((out / "results.json").read_text())
    gsm8k, alpaca = before["tasks"]["gsm8k"], before["tasks"]["alpaca"]
    assert gsm8k["n"] == alpaca["n"] == 8
    assert set(gsm8k) == {"nll", "ppl", "exact_match", "n"} | stderrs("nll", "ppl", "exact_match")
    assert set(alpaca) == {"nll", "ppl", "rouge1", "rouge2", "rougeL", "n"} | stderrs("nll", "ppl", *ROUGE_TYPES)
    assert 0.0 <= gsm8k["exact_match"] <= 1.0 and 0.0 <= alpaca["rougeL"] <= alpaca["rouge1"] <= 1.0
    assert gsm8k["ppl"] == pytest.approx(math.exp(gsm8k["nll"]))
    # which rule and which ROUGE variant each number is
    rules = before["metric_definitions"]
    assert "last number" in rules["gsm8k"]["exact_match"] and "flexible-extract" in rules["gsm8k"]["exact_match"]
    assert set(rules["alpaca"]) == {"rouge1", "rouge2", "rougeL"} | stderrs("nll", "ppl", *ROUGE_TYPES)
    assert "stemmer on" in rules["alpaca"]["rougeL"] and "delta method" in rules["alpaca"]["nll_stderr"]
    assert before["backend"] == "lota" and before["settings"]["rouge_stemmer"] is True

    # base + a delta, compared with the base run: the change is after - before, per metric (in process: fast)
    delta = make_task_vector(tiny_model, tmp_path / "tv.safetensors")
    cfg = _eval_config(tiny_model, tmp_path / "after", deltas=[str(delta)], scales=[2.0],
                       compare_to=str(out / "results.json"))
    [path] = run(cfg, tmp_path / "after")
    after = json.loads(path.read_text())
    assert after["deltas"] == [{"path": str(delta), "scale": 2.0}]
    change = after["compare"]["tasks"]["gsm8k"]
    assert after["tasks"]["gsm8k"]["nll"] != pytest.approx(gsm8k["nll"])  # the delta was added
    for metric, higher_is_better in (("nll", False), ("ppl", False), ("exact_match", True)):
        assert change[metric]["before"] == gsm8k[metric]
        assert change[metric]["after"] == after["tasks"]["gsm8k"][metric]
        assert change[metric]["change"] == pytest.approx(change[metric]["after"] - change[metric]["before"])
        assert change[metric]["higher_is_better"] is higher_is_better
    assert "alpaca" not in after["compare"]["tasks"]


def _ratio_stderr(sums, tokens) -> float:
    """The delta-method standard error of sum(sums) / sum(tokens), from the sample variances and covariance."""
    y, c = np.array(sums), np.array(tokens, dtype=float)
    r, cov = y.sum() / c.sum(), np.cov(y, c)  # (n - 1) in the denominator
    return math.sqrt((cov[0, 0] - 2 * r * cov[0, 1] + r * r * cov[1, 1]) / len(y)) / c.mean()


def test_summary_and_its_standard_errors_on_scores_that_vary():
    """summary() and paired_standard_error() against numpy: 0/1 scores with one unscored example (left out),
    NLL sums over answers of different lengths, and fewer than two scores (no standard error)."""
    from lota_cli.evaluation import linearized, paired_standard_error, summary

    em = [1.0, 0.0, 1.0, 1.0, None, 0.0, 1.0]
    sums, tokens = [12.0, 30.5, 7.25, 18.0, 9.0, 40.0, 3.5], [4, 10, 2, 6, 3, 11, 1]
    rows = [{"nll": y, "answer_tokens": c, "exact_match": e} for y, c, e in zip(sums, tokens, em)]
    scores = summary(rows, ["exact_match"])
    p = 4 / 6
    assert scores["exact_match"] == pytest.approx(p)
    assert scores["exact_match_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 5))
    assert scores["nll"] == pytest.approx(sum(sums) / sum(tokens))
    assert scores["nll_stderr"] == pytest.approx(_ratio_stderr(sums, tokens))
    assert scores["ppl_stderr"] == pytest.approx(math.exp(scores["nll"]) * scores["nll_stderr"])
    assert list(scores) == ["nll", "nll_stderr", "ppl", "ppl_stderr", "exact_match", "exact_match_stderr"]

    later = [0.0, 0.0, 1.0, 1.0, None, 1.0, 0.0]
    diffs = np.array([a - b for a, b in zip(later, em) if a is not None])
    assert paired_standard_error(later, em) == pytest.approx(diffs.std(ddof=1) / math.sqrt(6))
    assert paired_standard_error(linearized(rows, "nll"), linearized(rows, "nll")) == 0.0
    assert summary(rows[:1], [])["nll_stderr"] is None


def test_standard_errors_and_per_example_scores(tiny_model, tmp_path, data):
    """Each metric's stderr against a computation here; examples.jsonl holds one line per example per task,
    whose scores give results.json's means; a comparison over the same examples has the change's paired stderr."""
    from lota_cli.stages.eval import run

    args = [f"model.path={tiny_model}", "eval.tasks=[gsm8k,alpaca]", "eval.max_examples=12", "eval.max_new_tokens=16",
            f"tasks.gsm8k.eval_data_files={data['arith_test']}", f"tasks.alpaca.data_files={data['reverse_train']}"]
    (path,) = paths(in_process("eval", *args, f"out={tmp_path / 'base'}"))
    results = json.loads(path.read_text())
    lines = [json.loads(line) for line in (tmp_path / "base" / "examples.jsonl").read_text().splitlines()]
    examples = {t: [e for e in lines if e["task"] == t] for t in ("gsm8k", "alpaca")}
    assert len(lines) == 24 and all([e["index"] for e in rows] == list(range(12)) for rows in examples.values())
    for task, metrics in (("gsm8k", ["exact_match"]), ("alpaca", list(ROUGE_TYPES))):
        scores, rows = results["tasks"][task], examples[task]
        sums, tokens = [e["nll"] for e in rows], [e["answer_tokens"] for e in rows]
        assert scores["nll"] == pytest.approx(sum(sums) / sum(tokens), rel=1e-6)
        assert scores["nll_stderr"] == pytest.approx(_ratio_stderr(sums, tokens), rel=1e-6)
        assert scores["ppl_stderr"] == pytest.approx(scores["ppl"] * scores["nll_stderr"], rel=1e-9)
        for m in metrics:
            values = np.array([e[m] for e in rows])
            assert scores[m] == pytest.approx(values.mean(), rel=1e-9)
            assert scores[f"{m}_stderr"] == pytest.approx(values.std(ddof=1) / math.sqrt(12), rel=1e-9)
    p = results["tasks"]["gsm8k"]["exact_match"]
    assert results["tasks"]["gsm8k"]["exact_match_stderr"] == pytest.approx(math.sqrt(p * (1 - p) / 11), abs=1e-12)
    assert "lm-eval's mean_stderr" in results["metric_definitions"]["gsm8k"]["exact_match_stderr"]

    delta = make_task_vector(tiny_model, tmp_path / "tv.safetensors")
    [path] = run(_eval_config(tiny_model, tmp_path / "after", deltas=[str(delta)], max_examples=12,
                              compare_to=str(tmp_path / "base" / "results.json")), tmp_path / "after")
    after = json.loads(path.read_text())
    change = after["compare"]["tasks"]["gsm8k"]
    new = [json.loads(line) for line in (tmp_path / "after" / "examples.jsonl").read_text().splitlines()]
    old = examples["gsm8k"]
    assert [e["answer_tokens"] for e in new] == [e["answer_tokens"] for e in old]  # the same examples
    diffs = np.array([a["exact_match"] - b["exact_match"] for a, b in zip(new, old)])
    assert change["exact_match"]["change_stderr"] == pytest.approx(diffs.std(ddof=1) / math.sqrt(12), abs=1e-12)
    # nll: var(after) + var(before) - 2 cov, of the delta method's per-example residuals
    residuals = []
    for rows in (new, old):
        y, c = np.array([e["nll"] for e in rows]), np.array([e["answer_tokens"] for e in rows], dtype=float)
        residuals.append((y - y.sum() / c.sum() * c) / c.mean())
    cov = np.cov(residuals[0], residuals[1])
    paired = math.sqrt((cov[0, 0] + cov[1, 1] - 2 * cov[0, 1]) / 12)
    assert change["nll"]["change_stderr"] == pytest.approx(paired, rel=1e-6)
    assert math.sqrt(cov[0, 0] / 12) == pytest.approx(after["tasks"]["gsm8k"]["nll_stderr"], rel=1e-6)


def test_generation_on_the_first_examples_only(tiny_model, tmp_path):
    """eval.generate_examples=3 of 8: NLL over all 8, generation (and its score and stderr) over the first 3,
    the same answers as generating on those 3 alone."""
    from lota_cli.stages.eval import run

    [path] = run(_eval_config(tiny_model, tmp_path / "part", generate_examples=3), tmp_path / "part")
    part = json.loads(path.read_text())["tasks"]["gsm8k"]
    rows = [json.loads(line) for line in (tmp_path / "part" / "examples.jsonl").read_text().splitlines()]
    assert part["n"] == 8 and len(rows) == 8
    assert [e["exact_match"] is None for e in rows] == [False] * 3 + [True] * 5
    [path] = run(_eval_config(tiny_model, tmp_path / "three", max_examples=3), tmp_path / "three")
    three = json.loads(path.read_text())["tasks"]["gsm8k"]
    assert part["exact_match"] == three["exact_match"] and part["exact_match_stderr"] == three["exact_match_stderr"]
    [path] = run(_eval_config(tiny_model, tmp_path / "all"), tmp_path / "all")
    assert part["nll"] == json.loads(path.read_text())["tasks"]["gsm8k"]["nll"]


def test_delta_of_another_base_is_refused(tiny_model, tmp_path):
    from lota_cli.stages.eval import run

    delta = make_task_vector(tiny_model, tmp_path / "tv.safetensors", base_fingerprint="f" * 64)
    with pytest.raises(LotaError, match="was made from base"):
        run(_eval_config(tiny_model, tmp_path, deltas=[str(delta)]), tmp_path)


def test_compare_to_a_missing_file_fails_before_loading(tmp_path):
    from lota_cli.stages.eval import run

    cfg = _eval_config(tmp_path / "no-model", tmp_path, compare_to=str(tmp_path / "nope.json"))
    with pytest.raises(LotaError, match="compare_to.*no such file"):
        run(cfg, tmp_path)


def test_model_dir_replaces_the_model(tiny_model, tmp_path):
    from lota_cli.stages.eval import run

    cfg = _eval_config(tmp_path / "no-model", tmp_path, model_dir=str(tiny_model), generate=False, max_examples=2)
    [path] = run(cfg, tmp_path)
    results = json.loads(path.read_text())
    assert results["model"] == str(tiny_model)
    assert set(results["tasks"]["gsm8k"]) == {"nll", "ppl", "n"} | stderrs("nll", "ppl")  # no generation: NLL only


# --------------------------------------------------------------------------- the real data sets

def _stock_task(name: str, **files):
    """A task as conf/task/NAME.yaml ships it, reading local files instead of the hub."""
    from omegaconf import OmegaConf

    from lota_cli.config import CONF_DIR
    from lota_cli.config import TaskConfig

    return TaskConfig(**{**OmegaConf.to_container(OmegaConf.load(CONF_DIR / "task" / f"{name}.yaml")), **files})


@needs_shared_data
def test_stock_tasks_fit_the_real_gsm8k_and_alpaca_files(tiny_model, tmp_path):
    """The rest of the suite runs on generated look-alikes; this checks the shipped gsm8k and alpaca tasks
    against the real files: every GSM8K reference has the answer exact match scores, Alpaca's holdout splits
    it, the prompts render (Alpaca's `input` is often empty), and the eval stage scores both."""
    from lota_cli.config import EvalConfig, EvalOptions, ModelConfig
    from lota_cli.data import load_rows, render
    from lota_cli.stages.eval import run

    gsm8k = _stock_task("gsm8k", data_files=str(GSM8K_TRAIN), eval_data_files=str(GSM8K_TEST))
    for purpose, n in (("train", 7473), ("eval", 1319)):
        rows = load_rows(gsm8k, purpose)
        assert len(rows) == n
        assert all(extract_number(row["answer"], gsm8k.answer_pattern) is not None for row in rows), purpose
    alpaca = _stock_task("alpaca", data_files=str(ALPACA))
    train, held_out = load_rows(alpaca, "train"), load_rows(alpaca, "eval")
    assert (len(train), len(held_out)) == (5000 - alpaca.holdout, alpaca.holdout)
    assert any(not r["input"] for r in train) and all(render(alpaca.prompt, r) for r in train)

    cfg = EvalConfig(out=str(tmp_path), model=ModelConfig(path=str(tiny_model)),
                     tasks={"gsm8k": gsm8k, "alpaca": alpaca},
                     eval=EvalOptions(tasks=["gsm8k", "alpaca"], max_examples=4, max_new_tokens=8))
    [path] = run(cfg, tmp_path)
    scores = json.loads(path.read_text())["tasks"]
    assert scores["gsm8k"]["n"] == scores["alpaca"]["n"] == 4
    assert 0.0 <= scores["gsm8k"]["exact_match"] <= 1.0 and 0.0 <= scores["alpaca"]["rougeL"] <= 1.0
