"""The stages the command runs: what each does and writes, where its config lives, and the usage line."""

from __future__ import annotations

import dataclasses

from lota_cli import __version__


@dataclasses.dataclass(frozen=True)
class Stage:
    module: str  # lota_cli.stages.<module>, and the config conf/<module>.yaml
    does: str
    writes: str
    positional: bool = False  # takes artifact paths as positional arguments (`lota merge a b`): inputs=[...]


STAGES = {
    "calibrate": Stage("calibrate", "dense fine-tuning for a short while; the task vector is w_ft - w_base",
                       "out/task_vector.safetensors (and out/model with save_model=true), metrics.jsonl, lota.log"),
    "extract": Stage("extract", "mask of the largest entries of a task vector (or: of the weights, random, gradients)",
                     "out/mask.safetensors"),
    "sparse-train": Stage("sparse_train", "train only the masked entries from the base: the LoTA adapter",
                          "out/sparse_delta.safetensors (and out/model with save_model=true), metrics.jsonl"),
    "lotto": Stage("lotto", "LoTTO: a new task after earlier adapters, its mask disjoint from theirs",
                   "out/mask.safetensors, out/sparse_delta.safetensors (and out/model with save_model=true)"),
    "merge": Stage("merge", "combine task vectors / sparse deltas of one base with a merge method",
                   "out/merged.safetensors, or a model directory at output_model", positional=True),
    "overlap": Stage("overlap", "pairwise mask overlap, Jaccard index and sign agreement of artifacts",
                     "out/overlap.json (tables on stderr)", positional=True),
    "export": Stage("export", "sparse deltas as PEFT adapters (Super-Tuning), or base + deltas as a model",
                    "out/peft (adapter_config.json, adapter_model.safetensors; several inputs: out/peft/NAME/), "
                    "or out/model with format=model", positional=True),
    "data": Stage("data", "show and measure the training data a training stage would compose (same arguments)",
                  "out/stats.json, out/preview.jsonl (examples with their trained tokens; data.show=N on stderr)"),
    "eval": Stage("eval", "NLL, exact match, ROUGE or lm-eval tasks of a base, base + deltas, or a saved model",
                  "out/results.json, out/examples.jsonl (per-example scores; tables on stderr)"),
    "plan": Stage("plan", "memory a stage needs per device under each engine, from the model's config alone",
                  "out/plan.json (a table on stderr)"),
    "info": Stage("info", "describe an artifact: kind, base, density per layer, bytes per parameter",
                  "nothing (tables on stderr; --json prints JSON on stdout)"),
}


def usage() -> str:
    width = max(map(len, STAGES))
    lines = [f"lota {__version__}: Lottery Ticket Adaptation for Hugging Face causal LMs", "",
             "usage: lota <stage> [key=value ...] [--cfg job] [-m key=a,b ...] [--help]", "", "stages:"]
    lines += [f"  {name:<{width}}  {stage.does}" for name, stage in STAGES.items()]
    lines += ["", "`lota <stage> --help` lists what a stage reads and writes; see README.md for the pipeline."]
    return "\n".join(lines)
