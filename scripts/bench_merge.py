"""bench merge: `lota merge` of two sparse deltas of SmolLM2-135M into a model (methods sum and ties) against
mergekit doing the same merge of the equivalent models (base, base + delta a, base + delta b as HF
directories): wall time and whole-process peak RSS, both run as their command-line tools in a fresh process,
and how far apart the two merged models are."""

from __future__ import annotations

import shutil
import tempfile
from pathlib import Path

import json

from bench_common import Figure, find_mergekit, in_child, log, median


def prepare(base: str, work: str, sparsity: float) -> dict:
    """Child: two random LoTA-like sparse deltas of the base (as sparse-train writes them), and the models
    base + delta as HF directories for mergekit."""
    from dataclasses import asdict

    import torch

    from lota_cli.artifacts import Artifact, Meta, save_sparse
    from lota_cli.config import ModelConfig, ParamsConfig
    from lota_cli.tensors import encode_positions, pack_bits
    from lota_cli.ops import k_for
    from lota_cli.models import add_delta, fingerprint, load_model, model_saved_fingerprint, save_model, select_params

    model_cfg = ModelConfig(path=base)
    model, tokenizer = load_model(model_cfg)
    names = select_params(model, ParamsConfig())
    original = {n: model.get_parameter(n).detach().clone() for n in names}
    base_fp, saved_fp = fingerprint(model), model_saved_fingerprint(model)  # what training records
    gen = torch.Generator().manual_seed(0)
    out = {}
    for tag in ("a", "b"):
        positions, values, shapes = {}, {}, {}
        for n in names:
            param = model.get_parameter(n)
            k = k_for(sparsity, param.numel())
            mask = torch.zeros(param.numel(), dtype=torch.bool)
            mask[torch.randperm(param.numel(), generator=gen)[:k]] = True
            positions[n] = encode_positions(pack_bits(mask), param.numel())
            values[n] = torch.randn(k, generator=gen) * 2e-3
            shapes[n] = tuple(param.shape)
        meta = Meta(kind="sparse_delta", base_model=base, base_fingerprint=base_fp, base_checkpoint=saved_fp,
                    stage="bench", sparsity=sparsity, config={"model": asdict(model_cfg)})
        delta = save_sparse(Path(work) / f"delta_{tag}.safetensors", meta, shapes, positions, values)
        add_delta(model, Artifact(delta))
        save_model(model, tokenizer, Path(work) / f"model_{tag}")
        with torch.no_grad():
            for n in names:
                model.get_parameter(n).copy_(original[n])
        out[tag] = {"delta": str(delta), "model": str(Path(work) / f"model_{tag}")}
    return out


def timed(cmd: list[str]) -> dict:
    """Child: run a command; its wall time and peak RSS (the largest of its processes, from the kernel)."""
    import resource
    import signal
    import subprocess
    import time

    start = time.perf_counter()
    proc = subprocess.run(cmd, capture_output=True, text=True)
    seconds = time.perf_counter() - start
    if proc.returncode:
        how = f"killed by {signal.Signals(-proc.returncode).name}" if proc.returncode < 0 else proc.returncode
        raise RuntimeError(f"{' '.join(cmd)} failed ({how}):\n{(proc.stderr or proc.stdout)[-2000:]}")
    usage = resource.getrusage(resource.RUSAGE_CHILDREN)
    return {"seconds": seconds, "cpu_seconds": usage.ru_utime + usage.ru_stime, "rss_peak": usage.ru_maxrss * 1024}


def compare(a: str, b: str) -> dict:
    """Child: the largest absolute difference between two model directories' common tensors."""
    from safetensors import safe_open

    def tensors(directory):
        files = sorted(Path(directory).glob("*.safetensors"))
        return {k: f for f in files for k in safe_open(str(f), "pt").keys()}

    ta, tb = tensors(a), tensors(b)
    common = sorted(set(ta) & set(tb))
    worst, differ, total = 0.0, 0, 0
    for key in common:
        x = safe_open(str(ta[key]), "pt").get_tensor(key).float()
        y = safe_open(str(tb[key]), "pt").get_tensor(key).float()
        d = (x - y).abs()
        worst = max(worst, float(d.max()))
        differ += int((d > 1e-6).sum())
        total += d.numel()
    return {"max_abs_diff": worst, "entries_differing": differ, "entries": total, "tensors": len(common),
            "only_a": sorted(set(ta) - set(tb))[:3], "only_b": sorted(set(tb) - set(ta))[:3]}


def _mergekit_config(path: Path, method: str, base: str, models: list[str], density: float) -> None:
    lines = [f"merge_method: {'task_arithmetic' if method == 'sum' else method}", f"base_model: {base}",
             "dtype: float32", "models:"]
    for m in models:
        params = "weight: 1.0" + (f", density: {density}" if method == "ties" else "")
        lines += [f"  - model: {m}", f"    parameters: {{{params}}}"]
    lines += ["parameters:", f"  normalize: {'true' if method == 'ties' else 'false'}"]
    path.write_text("\n".join(lines) + "\n")


def run(cfg) -> list[Figure]:
    import sys

    from bench_models import smollm2_dir

    c = cfg.merge
    base = smollm2_dir(cfg)
    mergekit = find_mergekit(cfg) if c.mergekit else None
    root = Path(tempfile.mkdtemp(prefix="lota-bench-merge-", dir=cfg.tmp))
    figures = []
    try:
        log("merge: writing two sparse deltas of SmolLM2-135M and the equivalent HF models")
        prep = in_child("bench_merge", "prepare", base=base, work=str(root), sparsity=0.9)
        if mergekit is None:
            log(f"merge: {'mergekit-yaml not found beside ' + sys.executable if c.mergekit else 'mergekit off'}; "
                "comparing against loading every state_dict and merging in memory")
        for m, method in enumerate(c.methods):
            lota_out, theirs_out = root / f"lota-{method}", root / f"other-{method}"
            ours_cmd = [sys.executable, "-m", "lota_cli", "merge", prep["a"]["delta"], prep["b"]["delta"],
                        f"method={method}", f"density={c.density}", f"output_model={lota_out}",
                        f"out={root / 'lota-run'}"]
            if mergekit:
                config = root / f"mergekit-{method}.yml"
                _mergekit_config(config, method, base, [prep["a"]["model"], prep["b"]["model"]], c.density)
                theirs_cmd = [mergekit, str(config), str(theirs_out), "--lazy-unpickle", "--quiet", "--no-cuda"]
                label = "mergekit"
            else:
                spec = json.dumps({"method": method, "base": base, "models": [prep["a"]["model"], prep["b"]["model"]],
                                   "density": c.density, "out": str(theirs_out)})
                theirs_cmd = [sys.executable, str(Path(__file__).with_name("bench.py")), "_child", "bench_merge",
                              "in_memory", spec]
                label = ("load-all-in-memory baseline ("
                         + ("mergekit not installed" if c.mergekit else "merge.mergekit=false") + ")")
            runs = {"lota": [], "other": []}
            for r in range(c.rounds):  # alternated (also between methods), so drifting load hits both alike
                order = [("lota", ours_cmd, lota_out), ("other", theirs_cmd, theirs_out)]
                for who, cmd, target in (order if (r + m) % 2 == 0 else order[::-1]):
                    shutil.rmtree(target, ignore_errors=True)
                    runs[who].append(in_child("bench_merge", "timed", cmd=cmd))
            ours = {k: median(x[k] for x in runs["lota"]) for k in ("seconds", "cpu_seconds", "rss_peak")}
            theirs = {k: median(x[k] for x in runs["other"]) for k in ("seconds", "cpu_seconds", "rss_peak")}
            diff = in_child("bench_merge", "compare", a=str(lota_out), b=str(theirs_out))
            log(f"merge {method}: lota {ours['seconds']:.1f} s / {ours['rss_peak'] / 2**20:.0f} MiB, {label} "
                f"{theirs['seconds']:.1f} s / {theirs['rss_peak'] / 2**20:.0f} MiB; max |diff| {diff['max_abs_diff']:.3g}")
            part = f"merge/{method}"
            # issue 15's targets against mergekit; against the in-memory script, no slower and less memory
            time_target, rss_target = (0.5, 0.3) if label.startswith("mergekit") else (1.0, 1.0)
            figures += [
                Figure(part, "lota merge (CLI, whole process)", ours["seconds"], "s",
                       note="two sparse deltas (sparsity 0.9) of SmolLM2-135M -> merged HF model" +
                            (f", ties density {c.density}" if method == "ties" else "")),
                Figure(part, f"{label.split(' ')[0]} (CLI, whole process)", theirs["seconds"], "s", note=label),
                Figure(part, f"time lota / {label.split(' ')[0]}", ours["seconds"] / theirs["seconds"], "x", time_target,
                       note=f"median of {c.rounds} alternated run(s) each"),
                Figure(part, f"CPU time lota / {label.split(' ')[0]}", ours["cpu_seconds"] / theirs["cpu_seconds"], "x",
                       1.0, note=f"{ours['cpu_seconds']:.1f} vs {theirs['cpu_seconds']:.1f} s user+sys: less "
                                 "sensitive to other jobs than wall time"),
                Figure(part, "peak RSS lota", ours["rss_peak"], "B"),
                Figure(part, f"peak RSS {label.split(' ')[0]}", theirs["rss_peak"], "B"),
                Figure(part, f"peak RSS lota / {label.split(' ')[0]}", ours["rss_peak"] / theirs["rss_peak"], "x",
                       rss_target, op="<="),
                Figure(part, "max |lota - other| over the merged weights", diff["max_abs_diff"],
                       note=f"{diff['entries_differing']:,} of {diff['entries']:,} entries differ by > 1e-6 "
                            f"({diff['tensors']} tensors compared)"),
            ]
            shutil.rmtree(lota_out, ignore_errors=True)
            shutil.rmtree(theirs_out, ignore_errors=True)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return figures


def in_memory(method: str, base: str, models: list[str], density: float, out: str) -> dict:
    """Fallback baseline when mergekit is missing: load every state_dict whole and merge in memory."""
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    from lota_cli.ops import merge

    model = AutoModelForCausalLM.from_pretrained(base, dtype=torch.float32)
    state = model.state_dict()
    others = [AutoModelForCausalLM.from_pretrained(m, dtype=torch.float32).state_dict() for m in models]
    with torch.no_grad():
        for key, weight in state.items():
            deltas = [o[key] - weight for o in others]
            weight.add_(merge(method, deltas, density=density if method == "ties" else 1.0))
    model.save_pretrained(out)
    AutoTokenizer.from_pretrained(base).save_pretrained(out)
    return {}
