"""Part `preference`: what DPO's reference costs in lota, on SmolLM2-135M and pairs made from GSM8K.

Pairs from the shared GSM8K rows: chosen the reference solution, rejected the same solution with its final
answer changed. One random mask (extract.source=random), then three sparse-train runs over the same steps,
mask and sequences, each a fresh process (wall time and peak RSS, bench_merge.timed):
  sft         train.objective=sft on the pairs' sequences as text rows (each pair two rows, batch doubled);
  dpo         train.objective=dpo: the reference is the same model with the sparse values switched off;
  dpo, two    the same DPO run with its reference held as a second copy of the model (TRL's default), the one
  models      line changed: the stage's reference strategy replaced by one that loads the model again.
Figures: peak RSS dpo / sft (target <= 1.15x), dpo / dpo-two-models, and the mean step time dpo / sft.
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

import synthetic_tasks
from bench_common import GSM8K, Figure, in_child, log, timed_lota
from bench_models import smollm2_dir



def write_pairs(directory: Path, n: int) -> tuple[Path, Path]:
    """n pairs (synthetic_tasks.preference_pair) and the same sequences as 2n text rows (prompt, completion)."""
    rows = [json.loads(line) for line in open(GSM8K / "train.jsonl")]
    pairs = synthetic_tasks.write_pairs(directory / "pairs.jsonl", rows, n=n)
    texts = directory / "sft.jsonl"
    with open(texts, "w") as f:
        for line in open(pairs):
            pair = json.loads(line)
            for completion in (pair["chosen"], pair["rejected"]):
                f.write(json.dumps({"prompt": pair["prompt"].rstrip("\n"), "completion": completion}) + "\n")
    return pairs, texts


def second_model(argv: list[str], model: str) -> None:
    """Run `lota sparse-train ARGV` with its DPO reference as a second copy of the model (loaded on start):
    what a trainer keeping a separate reference model holds."""
    import torch

    from lota_cli import cli
    from lota_cli.config import ModelConfig
    from lota_cli.models import completion_logps, load_model
    from lota_cli.stages import sparse_train

    class SecondModel:
        def start(self, *args) -> None:
            self.model, _ = load_model(ModelConfig(path=model))
            self.model.eval().requires_grad_(False)

        def logps(self, policy, batch, indices) -> torch.Tensor:
            with torch.no_grad():
                return completion_logps(self.model, batch)

    sparse_train.SparseOffReference = SecondModel
    cli.main(["sparse-train", *argv])


def _step_seconds(out: Path) -> float:
    """A run's mean optimizer step time: over the run the three see the same sequences, in other batches."""
    steps = [json.loads(line)["step_s"] for line in open(out / "metrics.jsonl")]
    return sum(steps) / len(steps)


def run(cfg) -> list[Figure]:
    c = cfg.preference
    if not (GSM8K / "train.jsonl").is_file():
        return [Figure("preference", "skipped", f"{GSM8K} not found (../shared/data)")]
    model = smollm2_dir(cfg)
    root = Path(cfg.out).resolve() / "preference"
    pairs, rows = write_pairs(root / "data", c.steps * c.batch)
    lota = timed_lota
    mask = root / "mask" / "mask.safetensors"
    lota("extract", "extract.source=random", f"extract.sparsity={c.sparsity}", f"model.path={model}",
         f"out={mask.parent}")
    common = [f"model.path={model}", f"task.max_length={c.length}", f"train.max_steps={c.steps}", "train.lr=1e-4",
              "train.warmup_steps=0", "train.log_every=1", f"sparse_train.mask={mask}"]
    dpo = [*common, "task.format=preference", f"task.data_files={pairs}", "train.objective=dpo",
           f"train.batch_size={c.batch}"]
    sft = [*common, f"task.data_files={rows}", "task.prompt='{prompt}'", "task.target='{completion}'",
           "task.use_chat_template=false", f"train.batch_size={2 * c.batch}"]
    runs = {}
    for name, args in (("sft", sft), ("dpo", dpo), ("dpo-two-models", dpo)):
        log(f"preference: sparse-train {name}, {c.steps} steps of {c.batch} pairs ({2 * c.batch} sequences)")
        out = root / name
        if name == "dpo-two-models":
            code = (f"import sys; sys.path[:0] = {[str(Path(__file__).parent.parent), str(Path(__file__).parent)]!r}; "
                    f"import bench_preference; bench_preference.second_model({[*args, f'out={out}']!r}, {model!r})")
            runs[name] = in_child("bench_merge", "timed", cmd=[sys.executable, "-c", code], timeout=3600)
        else:
            runs[name] = lota("sparse-train", *args, f"out={out}")
        runs[name]["step_s"] = _step_seconds(out)
        log(f"  {name}: {runs[name]['seconds']:.1f} s, peak RSS {runs[name]['rss_peak'] / 2**20:.0f} MiB, "
            f"step {runs[name]['step_s']:.2f} s")
    part = "preference"
    note = f"SmolLM2-135M, float32, {c.steps} steps of {c.batch} GSM8K pairs, max_length {c.length}"
    return [
        Figure(part, "sparse-train peak RSS: sft", runs["sft"]["rss_peak"], "B", note=note),
        Figure(part, "sparse-train peak RSS: dpo (values off)", runs["dpo"]["rss_peak"], "B"),
        Figure(part, "sparse-train peak RSS: dpo with a second reference model", runs["dpo-two-models"]["rss_peak"], "B"),
        Figure(part, "peak RSS dpo / sft", runs["dpo"]["rss_peak"] / runs["sft"]["rss_peak"], "x", 1.15),
        Figure(part, "peak RSS dpo / dpo with a second model",
               runs["dpo"]["rss_peak"] / runs["dpo-two-models"]["rss_peak"], "x"),
        Figure(part, "step time dpo / sft (mean)", runs["dpo"]["step_s"] / runs["sft"]["step_s"], "x",
               note=f"{runs['dpo']['step_s']:.2f} vs {runs['sft']['step_s']:.2f} s"),
        Figure(part, "step time dpo with a second model / dpo",
               runs["dpo-two-models"]["step_s"] / runs["dpo"]["step_s"], "x"),
    ]
