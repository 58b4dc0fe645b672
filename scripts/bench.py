"""`make bench`: lota's performance figures, each next to its target, measured side by side on this machine.

    .venv/bin/python scripts/bench.py [key=value ...]      e.g. parts=[extract,train] extract.layers=4

Parts (each measurement runs in a fresh child process, so peak RSS is that call's alone):
  extract    exact global top-k over a >= 0.5B-parameter task vector vs one plain pass and vs concat + topk,
             on uniform, layer-skewed (scales over 3.5 orders of magnitude) and heavy-tailed values
  train      sparse-train vs calibrate (FFT) step time and training-state bytes, same model/batch/length
  artifacts  bytes per parameter of masks and sparse deltas vs a dense bf16 task vector
  merge      lota merge (sum, ties) of two SmolLM2-135M deltas vs mergekit on the equivalent models
  eval       tokens/s of teacher-forced NLL and batched greedy generation vs one-at-a-time generate
  memory     one step of LoTA vs FFT on a weights-dominated Llama (226M selected): peak RSS in float32 and
             bfloat16, bytes saved for backward, and lota sparse-train vs a forward-only lota eval
  data       encoding 5,000 Alpaca rows batched (first run) and from the cache (second) vs one row at a time;
             packed vs unpacked real tokens/s of SmolLM2 forward + backward
  startup    whole-process time of lota info, extract, merge and overlap on tiny inputs (start-up to first work)
  quantized  (not in the default parts: ~20 min) LoTA over an nf4 base vs over the float32 one on SmolLM2-135M
             and GSM8K: held-out NLL gain, the cost of deploying into the fp base, peak RSS and time
  preference (not in the default parts: minutes) DPO sparse-train on SmolLM2-135M and GSM8K pairs: peak RSS
             and step time against SFT on the same sequences, and against DPO with a second reference model
  scale      (not in the default parts: ~45 GB of disk, minutes) merge into and extract from a random bf16
             Llama of 8B shape (scale.shape=3b|1b for smaller disks) vs cp of its shards and a plain pass

Figures are ratios of runs made in the same invocation (alternated where noise matters); absolute times
are context only. The table is printed and written as JSON to {out}/bench.json.
"""

from __future__ import annotations

import json
import os
import platform
import sys
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent
sys.path[:0] = [str(HERE.parent), str(HERE)]

from bench_common import THREADS, Figure, child_main, fmt, log, memory_bytes  # noqa: E402

DEFAULTS = {
    "out": "runs/bench",
    "parts": ["extract", "artifacts", "train", "merge", "eval", "memory", "data", "startup"],
    "tmp": None,  # where the large temporary files go (default: the system temp dir)
    # torch intra-op threads in every measured process (null: torch's default, one per core). 1 by default:
    # on a shared 2-core machine the second OpenMP thread waits on other jobs and makes torch ops 5-20x
    # slower and erratic; one thread measures the code rather than the neighbours
    "threads": 1,
    "extract": {"layers": 12, "hidden": 2048, "intermediate": 5632, "kv": 256, "sparsity": 0.9, "repeats": 2,
                "naive": True, "cases": ["uniform", "skewed", "heavy"]},
    "artifacts": {"sparsities": [0.9, 0.99]},
    "train": {"models": ["smollm2", "tiny"], "batch": 2, "seq": 64, "sparsity": 0.9, "steps": 3, "tiny_steps": 20,
              "rounds": 2},
    "merge": {"methods": ["sum", "ties"], "density": 0.2, "mergekit": True, "rounds": 1},
    "eval": {"prompts": 16, "new_tokens": 32, "batch": 16},
    "mergekit_bin": None,  # a directory holding mergekit-yaml (mergekit's own venv), if not beside python
    "scale": {"shape": "8b", "mergekit": True, "rounds": 2},
    "quantized": {"steps": 20, "batch": 2, "length": 192, "lr": 1e-4, "sparsity": 0.9, "eval_examples": 64},
    "preference": {"steps": 4, "batch": 2, "length": 512, "sparsity": 0.9},
    "data": {"encode_rounds": 3, "batch": 8, "rounds": 6},
    "startup": {"rounds": 5},
    "memory": {"dtypes": ["float32", "bfloat16"], "batch": 1, "seq": 32, "sparsity": 0.9, "cli": True,
               "cli_tokens": 160},
}
PARTS = {"extract": "bench_extract", "artifacts": "bench_artifacts", "train": "bench_train",
         "merge": "bench_merge", "eval": "bench_eval", "memory": "bench_memory", "scale": "bench_scale",
         "data": "bench_data", "startup": "bench_startup", "quantized": "bench_quantized",
         "preference": "bench_preference"}


def machine(threads) -> dict:
    import torch

    mem = memory_bytes()
    cpu = next((line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name")), "?")
    return {"cpus": os.cpu_count(), "cpu": cpu, "load_average_after": os.getloadavg(), "memory_gib": round(mem / 2**30, 1), "torch": torch.__version__,
            "torch_threads": threads or torch.get_num_threads(), "gpu": torch.cuda.is_available(), "python": platform.python_version()}


def table(figures: list[Figure]) -> str:
    rows = [("part", "figure", "measured", "target", "ok", "note")]
    for f in figures:
        target = "" if f.target is None else f"{f.op} {fmt(f.target, f.unit)}"
        ok = {True: "yes", False: "MISSED", None: ""}[f.ok]
        rows.append((f.part, f.name, fmt(f.value, f.unit), target, ok, f.note))
    widths = [max(len(r[i]) for r in rows) for i in range(5)]
    lines = []
    for i, r in enumerate(rows):
        lines.append("  ".join(c.ljust(w) for c, w in zip(r[:5], widths)) + ("  " + r[5] if r[5] else ""))
        if i == 0:
            lines.append("  ".join("-" * w for w in widths))
    return "\n".join(lines)


def main() -> None:
    if len(sys.argv) > 1 and sys.argv[1] == "_child":
        child_main(sys.argv[2:])
        return
    from omegaconf import OmegaConf

    defaults = OmegaConf.create(DEFAULTS)
    OmegaConf.set_struct(defaults, True)  # a misspelt key is refused, not silently ignored
    try:
        cfg = OmegaConf.merge(defaults, OmegaConf.from_cli(sys.argv[1:]))
    except Exception as err:  # omegaconf's ConfigKeyError and friends
        sys.exit(f"bench: {str(err).splitlines()[0]}; the keys are:\n{OmegaConf.to_yaml(defaults)}")
    unknown = set(cfg.parts) - set(PARTS)
    if unknown:
        sys.exit(f"unknown part(s) {sorted(unknown)}; choose from {list(PARTS)}")
    THREADS["n"] = cfg.threads
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)
    started, load_before = time.time(), os.getloadavg()
    figures: list[Figure] = []
    errors = {}
    for part in cfg.parts:
        import importlib

        t0 = time.time()
        log(f"--- {part}")
        try:
            figures += importlib.import_module(PARTS[part]).run(cfg)
        except Exception as err:  # report the other parts anyway
            errors[part] = f"{type(err).__name__}: {err}"
            figures.append(Figure(part, "FAILED", str(err).splitlines()[0][:120] if str(err) else type(err).__name__))
            log(f"{part} failed: {err}")
        log(f"{part}: {time.time() - t0:.0f} s")
    text = table(figures)
    print(text)
    missed = [f for f in figures if f.ok is False]
    wall = time.time() - started
    print(f"\n{len(missed)} target(s) missed; {wall:.0f} s in all")
    record = {"command": " ".join(["scripts/bench.py"] + sys.argv[1:]), "config": OmegaConf.to_container(cfg),
              "machine": {**machine(cfg.threads), "load_average_before": load_before}, "seconds": wall, "figures": [f.as_dict() for f in figures], "errors": errors,
              "when": time.strftime("%Y-%m-%d %H:%M:%S %Z")}
    (out / "bench.json").write_text(json.dumps(record, indent=2))
    (out / "bench.txt").write_text(text + "\n")
    print(f"written: {out / 'bench.json'}")


if __name__ == "__main__":
    main()
