"""Part `quantized`: LoTA over an nf4 base against LoTA over the full-precision one, on SmolLM2-135M and GSM8K.

One mask (calibrate FFT in float32 -> extract), then sparse-train twice from it with the same steps, data and
seed: over the float32 base and over the nf4-quantized base (model.quantize=nf4). Held-out NLL (GSM8K test,
teacher-forced, paired over the same examples) of: each base alone, each base + its own delta, and the
full-precision base + the delta trained over nf4 (how it is deployed: merged into the fp16/fp32 base).
Figures: the NLL improvement over its base of LoTA over nf4 as a share of LoTA over float32's (target >= 0.9),
what deploying the nf4-trained delta into the full-precision base costs, and sparse-train's peak RSS and time
over nf4 / over float32 (each stage a fresh process).
"""

from __future__ import annotations

import json
import math
from pathlib import Path

from bench_common import GSM8K, Figure, log, timed_lota
from bench_models import smollm2_dir



def run(cfg) -> list[Figure]:
    c = cfg.quantized
    if not (GSM8K / "train.jsonl").is_file():
        return [Figure("quantized", "skipped", f"{GSM8K} not found (../shared/data)")]
    model = smollm2_dir(cfg)
    root = Path(cfg.out).resolve() / "quantized"
    common = [f"model.path={model}", f"task.data_files={GSM8K / 'train.jsonl'}",
              f"task.max_examples={c.steps * c.batch}", f"task.max_length={c.length}", f"train.batch_size={c.batch}",
              f"train.max_steps={c.steps}", f"train.lr={c.lr}", "train.warmup_steps=0", "train.log_every=10"]
    # each stage a fresh process: its wall time and peak RSS (bench_merge.timed, as the memory part runs them)
    lota = timed_lota
    log(f"calibrate (FFT, float32, {c.steps} steps) -> extract (sparsity {c.sparsity})")
    lota("calibrate", *common, f"out={root / 'cal'}")
    mask = root / "ext" / "mask.safetensors"
    lota("extract", f"extract.task_vector={root / 'cal' / 'task_vector.safetensors'}",
         f"extract.sparsity={c.sparsity}", f"out={mask.parent}")
    trained = {}
    for quantize in ("none", "nf4"):
        log(f"sparse-train over the {quantize if quantize != 'none' else 'float32'} base")
        extra = [f"model.quantize={quantize}"] if quantize != "none" else []
        trained[quantize] = lota("sparse-train", *common, *extra, f"sparse_train.mask={mask}",
                                 f"out={root / f'st-{quantize}'}")
    delta = {q: root / f"st-{q}" / "sparse_delta.safetensors" for q in trained}

    evaluate = [f"model.path={model}", f"tasks.gsm8k.eval_data_files={GSM8K / 'test.jsonl'}",
                f"eval.max_examples={c.eval_examples}", f"tasks.gsm8k.max_length={c.length}", "eval.generate=false"]

    def nll(name: str, *args, compare: str | None = None) -> dict:
        extra = [f"eval.compare_to={root / compare / 'results.json'}"] if compare else []
        lota("eval", *evaluate, *args, *extra, f"out={root / name}")
        results = json.loads((root / name / "results.json").read_text())
        task = results["tasks"]["gsm8k"]
        change = results.get("compare", {}).get("tasks", {}).get("gsm8k", {}).get("nll", {})
        log(f"  {name}: nll {task['nll']:.4f} ± {task.get('nll_stderr', float('nan')):.4f}"
            + (f", change {change['change']:+.4f} ± {change.get('change_stderr', float('nan')):.4f}" if change else ""))
        return {"nll": task["nll"], "change": change.get("change"), "stderr": change.get("change_stderr")}

    log(f"held-out NLL over {c.eval_examples} GSM8K test examples")
    fp_base = nll("eval-fp")
    fp_tuned = nll("eval-fp+fp", f"eval.deltas=[{delta['none']}]", compare="eval-fp")
    q_base = nll("eval-nf4", "model.quantize=nf4")
    q_tuned = nll("eval-nf4+nf4", "model.quantize=nf4", f"eval.deltas=[{delta['nf4']}]", compare="eval-nf4")
    deployed = nll("eval-fp+nf4", f"eval.deltas=[{delta['nf4']}]", compare="eval-nf4+nf4")
    against_fp = nll("eval-fp+nf4-vs-fp", f"eval.deltas=[{delta['nf4']}]", compare="eval-fp+fp")

    gain_fp, gain_q = -fp_tuned["change"], -q_tuned["change"]
    share = gain_q / gain_fp if gain_fp > 0 else float("nan")
    share_se = abs(share) * math.sqrt((q_tuned["stderr"] / gain_q) ** 2 + (fp_tuned["stderr"] / gain_fp) ** 2) \
        if gain_fp > 0 and gain_q else float("nan")
    rss = {q: r["rss_peak"] for q, r in trained.items()}
    seconds = {q: r["seconds"] for q, r in trained.items()}
    return [
        Figure("quantized", "NLL gain over its base: LoTA over nf4 / over float32", share, "x", 0.9, ">=",
               note=f"{gain_q:.4f} ± {q_tuned['stderr']:.4f} vs {gain_fp:.4f} ± {fp_tuned['stderr']:.4f} nats "
                    f"(95%: {share - 1.96 * share_se:.2f}..{share + 1.96 * share_se:.2f}); {c.steps} steps, "
                    f"{c.eval_examples} test examples"),
        Figure("quantized", "nf4-trained delta deployed into the fp32 base: NLL change", deployed["change"],
               note=f"± {deployed['stderr']:.4f} (paired) against the nf4 base + it; "
                    f"{against_fp['change']:+.4f} ± {against_fp['stderr']:.4f} against fp32 base + fp32-trained"),
        Figure("quantized", "NLL of the bases: nf4 - float32", q_base["nll"] - fp_base["nll"],
               note=f"{q_base['nll']:.4f} vs {fp_base['nll']:.4f}"),
        Figure("quantized", "sparse-train peak RSS: over nf4 / over float32", rss["nf4"] / rss["none"], "x",
               note=f"{rss['nf4'] / 2**20:,.0f} vs {rss['none'] / 2**20:,.0f} MiB (whole process, SmolLM2-135M: "
                    "embeddings and lm_head stay float)"),
        Figure("quantized", "sparse-train time: over nf4 / over float32", seconds["nf4"] / seconds["none"], "x", 2.0,
               note=f"{seconds['nf4']:.0f} vs {seconds['none']:.0f} s, whole stage"),
    ]
