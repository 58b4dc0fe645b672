"""The paper's experiments at small scale, sized to decide: every number measured by `lota eval` on held-out
data with its 95% interval, every claim decided by the interval of a paired difference.

  sweep       LoTA's sparse-train on A with masks from each extract.source (task_vector = LoTA's calibrated
              mask, weights, random, gradient) at each sparsity, against dense FFT (one seed)
  sequential  A then B with FFT, LoTA and LoTTO: A after A, A after B (the signed change: forgetting), B (seeds)
  merge       A and B trained in parallel, merged: FFT task arithmetic, LoTA sum, LoTTO sum (seeds); plus the
              A/B mask overlap per layer and module type against independent random masks

python scripts/replicate.py [experiment=all|sweep|sequential|merge] [out=runs/replicate] [steps=...]
    [seeds=[0,1]] [sources=[task_vector,weights,random,gradient]] [sparsities=[0.9,0.99]]
    [nll_examples=300] [gen_examples=64] [max_new_tokens=...] [smoke=true] [gpu_report=PATH]

NLL (teacher-forced) is scored on nll_examples held-out examples per task, generation on the first
gen_examples of them (one `lota eval` per model, eval.generate_examples). A claim "X beats Y" is the per-example
difference X - Y over the same examples, averaged per example over the seeds; its 95% interval is the difference
± 1.96 · the standard error of those per-example differences (so it carries example noise and the seeds'
disagreement on each example, not run-to-run noise beyond that). Held: the interval lies on the claimed side
of 0; did not hold: on the other side; otherwise not resolved at this size. "X is close to Y": held when the
interval lies within ± close_margin, did not hold when it lies outside it.
smoke=true exercises every stage in minutes (1 step, a handful of examples). Every stage's output is kept in
`out`, so a rerun skips what is done. Writes report.md, results.json and PNG plots into `out`.
"""

from __future__ import annotations

import json
import math
import sys
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lota_runner import local_model, lota  # noqa: E402

from lota_cli.evaluation import linearized, standard_error  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULTS = {
    "experiment": "all", "out": "runs/replicate", "steps": 6, "model": "smollm2_local",
    "a": {"name": "gsm8k", "data_files": str(SHARED / "gsm8k" / "train.jsonl"),
          "eval_data_files": str(SHARED / "gsm8k" / "test.jsonl"), "holdout": None},
    # Alpaca has one file: its last `holdout` rows (after the seeded shuffle) are held out, in training too
    "b": {"name": "alpaca", "data_files": str(SHARED / "alpaca" / "alpaca_5000.json"), "eval_data_files": None,
          "holdout": 300},
    "train": ["train.batch_size=4", "train.lr=1e-4", "train.warmup_steps=1", "train.log_every=4",
              "task.max_length=256"],
    "sparse_lr": 1e-4, "nll_examples": 150, "gen_examples": 16, "max_new_tokens": 64, "eval_batch_size": 16,
    "seeds": [0, 1], "sources": ["task_vector", "weights", "random", "gradient"], "sparsities": [0.9, 0.99],
    "gradient_batches": 8, "close_margin": {"nll": 0.02, "score": 0.02}, "gpu_report": None, "smoke": False,
}
SMOKE = {"steps": 1, "nll_examples": 4, "gen_examples": 2, "max_new_tokens": 4, "eval_batch_size": 4,
         "gradient_batches": 1, "seeds": [0], "sources": ["task_vector", "random"], "sparsities": [0.9],
         "train": ["train.batch_size=2", "train.lr=1e-4", "train.warmup_steps=0", "task.max_length=128"]}
BUILT_IN_EVAL_TASKS = ("gsm8k", "alpaca")  # composed into conf/eval.yaml already
Z = 1.96  # two-sided 95%
SHOWN = {"exact_match": "exact match", "rougeL": "ROUGE-L", "nll": "NLL"}


def override(value) -> str:
    """A value as a Hydra command-line override (None -> null)."""
    return "null" if value is None else str(value)


def score_metric(task: str) -> str:
    """A task's generation metric as results.json names it."""
    return "exact_match" if task == "gsm8k" else "rougeL"


def direction(metric: str) -> str:
    return "lower = better" if metric == "nll" else "higher = better"


class Replication:
    def __init__(self, cfg):
        self.cfg, self.out = cfg, Path(cfg.out).resolve()
        self.model = [f"model={cfg.model}"]
        if cfg.model == "smollm2_local":  # dequantize the GGUF once, not in every stage
            self.model += [f"model.path={local_model()}", "model.gguf_file=null"]
        self.results: dict = {"claims": []}
        self.scored: dict = {}

    # ---------------------------------------------------------------- command pieces
    def data(self, key: str, prefix: str = "task") -> list[str]:
        """A task's data files (and held-out rows) as overrides of `prefix` (task, or tasks.<name> for eval)."""
        t = self.cfg[key]
        holdout = [] if t.holdout is None else [f"{prefix}.holdout={t.holdout}"]
        return [f"{prefix}.data_files={override(t.data_files)}",
                f"{prefix}.eval_data_files={override(t.eval_data_files)}", *holdout]

    def task(self, key: str) -> list[str]:
        """The training stages' task: its config group and data files."""
        return [f"task={self.cfg[key].name}", *self.data(key)]

    def train(self, seed: int, lr: float | None = None) -> list[str]:
        lr_arg = [] if lr is None else [f"train.lr={lr}"]
        return [f"train.max_steps={self.cfg.steps}", *self.cfg.train, f"train.seed={seed}", *lr_arg]

    def run(self, stage: str, name: str, *args: str) -> list[str]:
        """One stage into out/<name>; reuses finished outputs so an interrupted replication picks up."""
        done = self.out / name / "done.txt"
        if done.is_file():
            return done.read_text().splitlines()
        paths = lota(stage, *args, f"out={self.out / name}")
        done.write_text("\n".join(paths))
        return paths

    def evaluate(self, name: str, *model_args: str, keys: tuple[str, ...] = ("a", "b")) -> None:
        """Score on the tasks `keys` in one eval: NLL on nll_examples, generation on the first gen_examples of
        them (eval.generate_examples; NLL costs a fraction of generation, so it gets the larger sample).
        Per-example scores are kept for the paired comparisons."""
        names = [self.cfg[key].name for key in keys]
        args = [*self.model, f"eval.tasks=[{','.join(names)}]", f"eval.max_new_tokens={self.cfg.max_new_tokens}",
                f"eval.batch_size={self.cfg.eval_batch_size}", f"eval.max_examples={self.cfg.nll_examples}",
                f"eval.generate_examples={self.cfg.gen_examples}", *model_args]
        for key, task in zip(keys, names):
            if task not in BUILT_IN_EVAL_TASKS:
                args.append(f"+task@tasks.{task}={task}")
            args += self.data(key, prefix=f"tasks.{task}")
        (results,) = self.run("eval", f"eval/{name}", *args)
        tasks = json.loads(Path(results).read_text())["tasks"]
        examples = [json.loads(line) for line in (Path(results).parent / "examples.jsonl").read_text().splitlines()]
        for task in names:
            self.scored.setdefault(name, {})[task] = (tasks[task], [e for e in examples if e["task"] == task])

    # ---------------------------------------------------------------- numbers with intervals
    def estimate(self, terms: list[tuple[float, str]], key: str, metric: str, seeds) -> tuple[float, float | None]:
        """sum(coefficient * metric of run) with its 95% half-width, paired over the same examples: runs are
        eval names with {seed} filled from `seeds`; values and per-example linearized shares are averaged
        over the seeds first."""
        task = self.cfg[key].name
        values, shares = [], []
        for seed in seeds:
            runs = [(c, self.scored[name.format(seed=seed)][task]) for c, name in terms]
            values.append(sum(c * summary[metric] for c, (summary, _) in runs))
            per_run = [linearized(examples, metric) for _, (_, examples) in runs]
            shares.append([None if None in col else sum(c * v for (c, _), v in zip(runs, col))
                           for col in zip(*per_run, strict=True)])
        per_example = [None if None in col else sum(col) / len(col) for col in zip(*shares, strict=True)]
        se = standard_error(per_example)
        return sum(values) / len(values), None if se is None else Z * se

    def cell(self, terms, key: str, metric: str, seeds) -> dict:
        value, half = self.estimate(terms, key, metric, seeds)
        return {"value": value, "ci95": half}

    def claim(self, text: str, key: str, better: list[tuple[float, str]], than: list[tuple[float, str]], seeds,
              close: bool = False) -> None:
        """Decide "`better` beats `than`" (or, close=True, "is within close_margin of") on `key`'s task, by NLL
        and by its generation metric; recorded in results.json's claims and the report."""
        task = self.cfg[key].name
        terms = better + [(-c, name) for c, name in than]
        row = {"claim": text, "task": task, "seeds": list(seeds)}
        for metric in ("nll", score_metric(task)):
            diff, half = self.estimate(terms, key, metric, seeds)
            margin = self.cfg.close_margin["nll" if metric == "nll" else "score"] if close else None
            row[metric] = {"difference": diff, "ci95": half, "margin": margin,
                           "verdict": verdict(diff, half, metric != "nll", margin)}
        self.results["claims"].append(row)

    # ---------------------------------------------------------------- building blocks
    def calibrate(self, key: str, name: str, seed: int, *extra: str) -> tuple[str, ...]:
        return tuple(self.run("calibrate", name, *self.model, *self.task(key), *self.train(seed), *extra))

    def fft(self, key: str, seed: int) -> tuple[str, str]:
        """Dense fine-tuning on one task from the base: (task vector, model dir); trained once per seed."""
        return self.calibrate(key, f"s{seed}/fft_{key}", seed, "save_model=true")

    def mask(self, key: str, source: str, sparsity: float, seed: int, name: str, task_vector: str = "") -> str:
        """extract.source's mask; task_vector: LoTA's calibrated one, from `task_vector` (fft(key) by default)."""
        if source == "task_vector":
            how = [f"extract.task_vector={task_vector or self.fft(key, seed)[0]}"]
        else:
            how = [*self.model, f"extract.source={source}"]
            how += {"random": [f"extract.seed={seed}"], "weights": [],
                    "gradient": [*self.task(key), f"extract.seed={seed}",
                                 f"extract.gradient_batches={self.cfg.gradient_batches}"]}[source]
        (mask,) = self.run("extract", f"{name}/extract", *how, f"extract.sparsity={sparsity}")
        return mask

    def sparse(self, key: str, mask: str, seed: int, name: str, *extra: str) -> tuple[str, ...]:
        return tuple(self.run("sparse-train", f"{name}/sparse", *self.model, *self.task(key),
                              *self.train(seed, self.cfg.sparse_lr), f"sparse_train.mask={mask}", *extra))

    def lota_at(self, key: str, source: str, sparsity: float, seed: int) -> tuple[str, str]:
        """Sparse-train on one task from the base with extract.source's mask: (sparse delta, model dir)."""
        name = f"s{seed}/lota_{key}_{source}_{sparsity}"
        return self.sparse(key, self.mask(key, source, sparsity, seed, name), seed, name, "save_model=true")

    def lota(self, key: str, seed: int) -> tuple[str, str]:
        """LoTA proper: the calibrated mask at 90% sparsity."""
        return self.lota_at(key, "task_vector", 0.9, seed)

    def lotto_b(self, seed: int) -> str:
        """LoTTO on B with A's LoTA mask frozen (sparsity 0.9): B's sparse delta, disjoint from A's."""
        (delta,) = self.run("lotto", f"s{seed}/lotto_b", *self.model, *self.task("b"),
                            *self.train(seed, self.cfg.sparse_lr), f"lotto.previous=[{self.lota('a', seed)[0]}]",
                            "lotto.sparsity=0.9")
        return delta

    def eval_fft_a(self, seed: int) -> None:
        self.evaluate(f"s{seed}/fft_a", f"eval.deltas=[{self.fft('a', seed)[0]}]")

    def eval_lota_a(self, source: str, sparsity: float, seed: int) -> None:
        delta = self.lota_at("a", source, sparsity, seed)[0]
        self.evaluate(f"s{seed}/lota_a_{source}_{sparsity}", f"eval.deltas=[{delta}]", keys=("a",))

    # ---------------------------------------------------------------- experiments
    def base(self) -> None:
        self.evaluate("base")
        self.results["base"] = {self.cfg[k].name: {m: self.cell([(1, "base")], k, m, [0])
                                                   for m in ("nll", score_metric(self.cfg[k].name))}
                                for k in ("a", "b")}

    def sweep(self) -> None:
        cfg, seeds = self.cfg, self.cfg.seeds[:1]
        self.eval_fft_a(seeds[0])
        rows = {"dense FFT": {m: self.cell([(1, "s{seed}/fft_a")], "a", m, seeds)
                              for m in ("nll", score_metric(cfg.a.name))}}
        for s in cfg.sparsities:
            lota_name = f"s{{seed}}/lota_a_task_vector_{s}"
            for source in cfg.sources:
                self.eval_lota_a(source, s, seeds[0])
                name = f"s{{seed}}/lota_a_{source}_{s}"
                rows[f"{source} {s:.0%}"] = {m: self.cell([(1, name)], "a", m, seeds)
                                             for m in ("nll", score_metric(cfg.a.name))}
                if source != "task_vector":
                    self.claim(f"LoTA's calibrated mask beats the {source} mask at {s:.0%} sparsity", "a",
                               [(1, lota_name)], [(1, name)], seeds)
        self.results["sweep"] = rows

    def sequential(self) -> None:
        cfg, rows = self.cfg, {}
        for seed in cfg.seeds:
            self.eval_fft_a(seed)
            (_, fft_a_model) = self.fft("a", seed)
            (_, fft_ab) = self.calibrate("b", f"s{seed}/seq/fft_ab", seed, f"model.path={fft_a_model}",
                                         "model.gguf_file=null", "save_model=true")
            self.evaluate(f"s{seed}/seq/fft_ab", f"eval.model_dir={fft_ab}")
            # LoTA: B's own calibrate/extract/sparse-train from A's LoTA model: the masks may overlap
            (lota_a, lota_a_model) = self.lota("a", seed)
            self.eval_lota_a("task_vector", 0.9, seed)
            on_a = [f"model.path={lota_a_model}", "model.gguf_file=null"]
            (tv_b,) = self.calibrate("b", f"s{seed}/seq/lota_ab_cal", seed, *on_a)
            name = f"s{seed}/seq/lota_ab"
            (_, lota_ab) = self.sparse("b", self.mask("b", "task_vector", 0.9, seed, name, tv_b), seed, name, *on_a,
                                       "save_model=true")
            self.evaluate(name, f"eval.model_dir={lota_ab}")
            self.evaluate(f"s{seed}/seq/lotto_ab", f"eval.deltas=[{lota_a},{self.lotto_b(seed)}]")
        after_a = {"FFT": "s{seed}/fft_a", "LoTA": "s{seed}/lota_a_task_vector_0.9",
                   "LoTTO": "s{seed}/lota_a_task_vector_0.9"}
        after_b = {"FFT": "s{seed}/seq/fft_ab", "LoTA": "s{seed}/seq/lota_ab", "LoTTO": "s{seed}/seq/lotto_ab"}
        change = {m: [(1, after_b[m]), (-1, after_a[m])] for m in after_a}
        for method in after_a:
            rows[method] = {}
            for metric in ("nll", score_metric(cfg.a.name)):
                rows[method][f"A {metric} after A"] = self.cell([(1, after_a[method])], "a", metric, cfg.seeds)
                rows[method][f"A {metric} after B"] = self.cell([(1, after_b[method])], "a", metric, cfg.seeds)
                rows[method][f"change of A {metric}"] = self.cell(change[method], "a", metric, cfg.seeds)
            for metric in ("nll", score_metric(cfg.b.name)):
                rows[method][f"B {metric} after B"] = self.cell([(1, after_b[method])], "b", metric, cfg.seeds)
        self.results["sequential"] = rows
        for other in ("LoTA", "FFT"):
            self.claim(f"LoTTO forgets less of A than {other} after B", "a", change["LoTTO"], change[other],
                       cfg.seeds)
        self.claim("sparse-train at 90% is close to dense FFT (on A)", "a", [(1, after_a["LoTA"])],
                   [(1, after_a["FFT"])], cfg.seeds, close=True)

    def merge(self) -> None:
        cfg = self.cfg
        for seed in cfg.seeds:
            (fft_a, _), (fft_b, _) = self.fft("a", seed), self.fft("b", seed)
            (lota_a, _), (lota_b, _) = self.lota("a", seed), self.lota("b", seed)
            for i, (x, y, how) in enumerate(((fft_a, fft_b, "method=task_arithmetic"), (lota_a, lota_b, "method=sum"))):
                (merged,) = self.run("merge", f"s{seed}/merge/m{i}", x, y, how)
                self.evaluate(f"s{seed}/merge/m{i}", f"eval.deltas=[{merged}]")
            # LoTTO's sum is base + A's delta + B's disjoint one: sequential's LoTTO model, bit for bit (at each
            # entry one of the two is 0), so it is scored once
            self.evaluate(f"s{seed}/seq/lotto_ab", f"eval.deltas=[{lota_a},{self.lotto_b(seed)}]")
            self.run("overlap", f"s{seed}/merge/overlap", lota_a, lota_b)
        labels = {"FFT task arithmetic": "s{seed}/merge/m0", "LoTA sum (independent masks)": "s{seed}/merge/m1",
                  "LoTTO sum (disjoint masks)": "s{seed}/seq/lotto_ab"}
        self.results["merge"] = {
            label: {f"{cfg[k].name} {m}": self.cell([(1, name)], k, m, cfg.seeds)
                    for k in ("a", "b") for m in ("nll", score_metric(cfg[k].name))}
            for label, name in labels.items()}
        for k in ("a", "b"):
            for better, than in (("LoTA sum (independent masks)", "FFT task arithmetic"),
                                 ("LoTTO sum (disjoint masks)", "LoTA sum (independent masks)")):
                self.claim(f"{better} merges better than {than} (on {cfg[k].name})", k, [(1, labels[better])],
                           [(1, labels[than])], cfg.seeds)
        self.results["overlap"] = json.loads((self.out / f"s{cfg.seeds[0]}" / "merge" / "overlap" /
                                              "overlap.json").read_text())


def verdict(diff: float, half: float | None, higher_is_better: bool, margin: float | None) -> str:
    """held / did not hold / not resolved at this size, from the difference's 95% interval. A zero-width
    interval (every example scores the same in both, e.g. exact match 0 everywhere) decides nothing."""
    if not half:
        return "not resolved at this size"
    lo, hi = diff - half, diff + half
    if margin is not None:
        held, failed = -margin <= lo and hi <= margin, lo > margin or hi < -margin
    else:
        held, failed = (lo > 0, hi < 0) if higher_is_better else (hi < 0, lo > 0)
    return "held" if held else "did not hold" if failed else "not resolved at this size"


# -------------------------------------------------------------------- mask overlap against chance

def chance(tensors: list[dict]) -> dict:
    """Observed Jaccard of a group of tensors and that of two independent uniformly random masks holding the
    same number of entries per tensor: its mean and 95% band (the shared count is hypergeometric per tensor,
    independent across tensors; normal approximation)."""
    a, b = sum(t["entries_a"] for t in tensors), sum(t["entries_b"] for t in tensors)
    mean = sum(t["entries_a"] * t["entries_b"] / t["numel"] for t in tensors)
    var = sum(t["entries_a"] * t["entries_b"] * (t["numel"] - t["entries_a"]) * (t["numel"] - t["entries_b"])
              / (t["numel"] ** 2 * max(t["numel"] - 1, 1)) for t in tensors)

    def jaccard(shared: float) -> float:
        return shared / (a + b - shared) if a + b - shared else 0.0

    shared = sum(t["intersection"] for t in tensors)
    return {"jaccard": jaccard(shared), "chance": jaccard(mean), "chance_low": jaccard(mean - Z * math.sqrt(var)),
            "chance_high": jaccard(mean + Z * math.sqrt(var)), "shared": shared, "entries_a": a, "entries_b": b}


def overlap_groups(pair: dict) -> dict[str, dict[str, dict]]:
    """Per layer and per module type (q_proj, ..., down_proj: a tensor name's last module) against chance."""
    from lota_cli.ops import layer_of

    groups: dict[str, dict[str, list[dict]]] = {"layer": {}, "module": {}}
    for name, t in pair["per_tensor"].items():
        groups["layer"].setdefault(layer_of(name).replace("layer ", ""), []).append(t)
        groups["module"].setdefault(name.split(".")[-2], []).append(t)
    return {kind: {g: chance(ts) for g, ts in by.items()} for kind, by in groups.items()}


# -------------------------------------------------------------------- report

def fmt(cell: dict, value: str = "value", sign: str = "") -> str:
    """cell[value] ± its 95% half-width (cell["ci95"])."""
    half = "n/a" if cell["ci95"] is None else f"{cell['ci95']:.4f}"
    return f"{cell[value]:{sign}.4f} ± {half}"


def markdown_table(first: str, rows: dict[str, dict[str, dict]]) -> list[str]:
    """Rows keyed by label, each column a {value, ci95} cell shown as value ± 95% half-width."""
    cols = list(next(iter(rows.values())))
    lines = [f"| {first} | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    return lines + [f"| {label} | " + " | ".join(fmt(row[c]) for c in cols) + " |" for label, row in rows.items()]


def errorbar_panel(ax, labels: list[str], cells: list[dict], ylabel: str, title: str) -> None:
    """Points with 95% interval bars, one per label."""
    ax.errorbar(range(len(labels)), [c["value"] for c in cells], yerr=[c["ci95"] or 0 for c in cells],
                fmt="o", capsize=4)
    ax.set_xticks(range(len(labels)), labels, rotation=30, ha="right")
    ax.set(ylabel=ylabel, title=title)


def save(fig, path: Path) -> None:
    fig.tight_layout()
    fig.savefig(path, dpi=120)


def claims_table(claims: list[dict]) -> list[str]:
    lines = ["| claim | seeds | NLL difference (95% interval) | verdict | score difference (95% interval) | verdict |",
             "| --- | --- | --- | --- | --- | --- |"]
    for c in claims:
        nll, score = c["nll"], c[score_metric(c["task"])]
        cells = [fmt(d, "difference", "+") + ("" if d["margin"] is None else f" (margin ±{d['margin']})") + f" | **{d['verdict']}**"
                 for d in (nll, score)]
        lines.append(f"| {c['claim']} | {len(c['seeds'])} | {cells[0]} | {cells[1]} |")
    return lines


def write_report(rep: Replication) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, out, cfg = rep.results, rep.out, rep.cfg
    a, b = cfg.a.name, cfg.b.name
    sa, sb = SHOWN[score_metric(a)], SHOWN[score_metric(b)]
    gpu = f"see {cfg.gpu_report}" if cfg.gpu_report else "not run (no GPU machine was available)"
    lines = ["# lota small-scale replication", "",
             f"Model `{cfg.model}`, task A `{a}`, task B `{b}`, {cfg.steps} steps per training run "
             f"({' '.join(cfg.train)}, sparse lr {cfg.sparse_lr}), seeds {list(cfg.seeds)} (the sweep: the first). "
             f"Every number is measured by `lota eval` on held-out data: NLL (mean per answer token, teacher-forced, "
             f"lower is better) on {cfg.nll_examples} examples per task, {a} {sa} and {b} {sb} (higher is better) "
             f"of greedy generations of at most {cfg.max_new_tokens} tokens on the first {cfg.gen_examples}.", "",
             "Every cell is value ± the half-width of its 95% interval (1.96 · standard error over the examples; "
             "with several seeds, of the per-example means over the seeds). A claim's difference is paired over the "
             "same examples (per-example differences averaged over the seeds); it **held** when its interval lies "
             "on the claimed side of 0, **did not hold** when on the other side, else it is **not resolved at this "
             "size**; a 'close' claim held when the interval lies within its margin. The verdicts are the script's.",
             "", f"GPU replication: {gpu}.", ""]
    if "base" in r:
        lines += ["Base model before any training: " + ", ".join(
            f"{t} NLL {fmt(c['nll'])}, {SHOWN[score_metric(t)]} {fmt(c[score_metric(t)])}"
            for t, c in r["base"].items()), ""]
    lines += ["## Claims", "", *claims_table(r["claims"]), ""]
    if "sweep" in r:
        rows = {label: {f"{a} NLL": row["nll"], f"{a} {sa}": row[score_metric(a)]} for label, row in r["sweep"].items()}
        lines += ["## (a) Mask sources and sparsity on task A", "", *markdown_table("mask, sparsity", rows)]
        fig, ax = plt.subplots(1, 2, figsize=(11, 4))
        labels = list(r["sweep"])
        for i, (metric, shown) in enumerate((("nll", "NLL"), (score_metric(a), sa))):
            errorbar_panel(ax[i], labels, [r["sweep"][k][metric] for k in labels],
                           f"{a} {shown} ({direction(metric)})", f"{a}: sparse-train by mask source")
        save(fig, out / "sweep.png")
        lines += ["", "![sweep](sweep.png)", ""]
    if "sequential" in r:
        seq = r["sequential"]
        lines += ["## (b) Sequential A → B", "", *markdown_table("method", seq)]
        fig, ax = plt.subplots(1, 2, figsize=(9, 4))
        methods = list(seq)
        errorbar_panel(ax[0], methods, [seq[m]["change of A nll"] for m in methods],
                       f"change in {a}'s NLL after B\n(higher = forgot more)", "A after B: NLL")
        errorbar_panel(ax[1], methods, [seq[m][f"change of A {score_metric(a)}"] for m in methods],
                       f"change in {a}'s {sa} after B\n(lower = forgot more)", f"A after B: {sa}")
        for x in ax:
            x.axhline(0, color="grey", linewidth=0.8)
        save(fig, out / "sequential.png")
        lines += ["", "![sequential](sequential.png)", ""]
    if "merge" in r:
        lines += ["## (c) Merging A and B trained in parallel", "", *markdown_table("merge", r["merge"])]
        fig, ax = plt.subplots(1, 4, figsize=(16, 4))
        labels = list(r["merge"])
        for i, (task, metric, shown) in enumerate(((a, "nll", "NLL"), (b, "nll", "NLL"),
                                                   (a, score_metric(a), sa), (b, score_metric(b), sb))):
            errorbar_panel(ax[i], labels, [r["merge"][m][f"{task} {metric}"] for m in labels],
                           f"{task} {shown} ({direction(metric)})", f"merged: {task}")
        save(fig, out / "merge.png")
        lines += ["", "![merge](merge.png)", ""]
    if "overlap" in r:
        lines += overlap_section(r, out, plt)
    (out / "results.json").write_text(json.dumps(r, indent=2))
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def overlap_section(r: dict, out: Path, plt) -> list[str]:
    """The A/B LoTA masks' overlap, overall, per layer and per module type, against independent random masks."""
    (pair,) = r["overlap"]["pairs"]
    overall = chance(list(pair["per_tensor"].values()))
    groups = overlap_groups(pair)
    r["overlap_vs_chance"] = {"overall": overall, **groups}
    fig, ax = plt.subplots(1, 2, figsize=(12, 4))
    for x, (kind, by) in zip(ax, groups.items()):
        names = list(by)
        pos = range(len(names))
        x.plot(pos, [by[g]["jaccard"] for g in names], "o", label="A vs B")
        x.errorbar(pos, [by[g]["chance"] for g in names],
                   yerr=[[by[g]["chance"] - by[g]["chance_low"] for g in names],
                         [by[g]["chance_high"] - by[g]["chance"] for g in names]],
                   fmt="_", color="grey", capsize=4, label="independent random masks (95% band)")
        x.set_xticks(pos, names, rotation=45 if kind == "module" else 0, fontsize=8)
        x.set(xlabel=kind, ylabel="Jaccard of the A and B masks\n(higher = more shared)",
              title=f"mask overlap per {kind}")
        x.legend(fontsize=8)
    save(fig, out / "overlap.png")
    sign = "-" if pair["sign_agreement"] is None else f"{pair['sign_agreement']:.4f}"
    above = [f"{kind} {g}" for kind, by in groups.items() for g, c in by.items() if c["jaccard"] > c["chance_high"]]
    below = [f"{kind} {g}" for kind, by in groups.items() for g, c in by.items() if c["jaccard"] < c["chance_low"]]
    return ["## Mask overlap of the independent LoTA masks of A and B (sparsity 0.9, first seed)", "",
            "| entries A | entries B | shared | Jaccard | chance (95% band) | sign agreement |",
            "| --- | --- | --- | --- | --- | --- |",
            f"| {overall['entries_a']:,} | {overall['entries_b']:,} | {overall['shared']:,} | "
            f"{overall['jaccard']:.4f} | {overall['chance']:.4f} [{overall['chance_low']:.4f}, "
            f"{overall['chance_high']:.4f}] | {sign} |", "",
            "Chance: two independent uniformly random masks with the same number of entries in each tensor. Above "
            f"the 95% band: {', '.join(above) or 'none'}; below it: {', '.join(below) or 'none'}.", "",
            "![overlap](overlap.png)", ""]


def main() -> None:
    cli = OmegaConf.from_cli()
    smoke = OmegaConf.create(SMOKE) if cli.get("smoke") else {}
    cfg = OmegaConf.merge(OmegaConf.create(DEFAULTS), smoke, cli)
    experiments = ["sweep", "sequential", "merge"] if cfg.experiment == "all" else [cfg.experiment]
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    rep = Replication(cfg)
    rep.base()
    for name in experiments:
        getattr(rep, name)()
    print(write_report(rep))


if __name__ == "__main__":
    main()
