"""bench scale (optional part: `make bench BENCH="parts=[scale]"`): lota merge and lota extract at the size of
a real model, on a random bf16 Llama saved as a sharded HF directory (no model object is ever built).

  merge    two random sparse deltas (sparsity 0.9, every attention and MLP matrix) merged with method=sum into
           the base: `lota merge ... output_model=`, against `cp -r` of the base's directory (then `sync`:
           lota fsyncs what it writes) as the floor, and mergekit's task_arithmetic (--lazy-unpickle) on the
           equivalent models when scale.mergekit is on and the disk holds them (two more copies of the model)
  extract  a random bf16 task vector of the attention and MLP matrices: `lota extract` against one plain pass
           over the same file (every tensor read, abs, max)

Every command runs as a fresh process; time is wall clock, memory the process's peak RSS. The inputs are
read before every timed run, so each starts from the same page cache (they are written with direct I/O, so
are not cached at first; and a run that fills the cache, as cp does, would otherwise slow the next). The shapes are
Llama 3's (8b: 8.0B parameters, 16 GB in bf16); scale.shape=3b or 1b for smaller disks.
"""

from __future__ import annotations

import json
import math
import shutil
import statistics
import subprocess
import sys
import tempfile
from pathlib import Path

import bench_merge
from bench_common import GiB, Figure, find_mergekit, in_child, log, memory_bytes

SHAPES = {  # Llama 3.1 8B, Llama 3.2 3B and 1B
    "8b": dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=False),
    "3b": dict(hidden_size=3072, intermediate_size=8192, num_hidden_layers=28, num_attention_heads=24,
               num_key_value_heads=8, tie_word_embeddings=True),
    "1b": dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32,
               num_key_value_heads=8, tie_word_embeddings=True),
    "mini": dict(hidden_size=512, intermediate_size=1024, num_hidden_layers=2, num_attention_heads=8,
                 num_key_value_heads=2, tie_word_embeddings=True),  # a smoke test of the part itself
}
PIECE = 1 << 24


# --------------------------------------------------------------------------- child functions

def _config(shape: str):
    from transformers import LlamaConfig

    # architectures as a real checkpoint's config lists it (save_pretrained writes it; a bare config has none)
    return LlamaConfig(vocab_size=128256, max_position_embeddings=8192, rope_theta=500000.0,
                       architectures=["LlamaForCausalLM"], **SHAPES[shape])


def _layout(shape: str) -> dict:
    import torch

    with torch.device("meta"):
        from transformers import AutoModelForCausalLM

        model = AutoModelForCausalLM.from_config(_config(shape))
    sd = model.state_dict()
    saved = dict(model.named_parameters())  # tied weights once, as save_pretrained writes them
    return {name: tuple(sd[name].shape) for name in saved}


def make_base(directory: str, shape: str, shard_size: str = "5GB") -> dict:
    """A random bf16 model written shard by shard (the same 16M random values, scaled per tensor)."""
    import torch

    from lota_cli.io import ShardedWriter
    from lota_cli.config import parse_size

    layout = _layout(shape)
    noise = torch.randn(PIECE, generator=torch.Generator().manual_seed(0)).mul_(0.02).to(torch.bfloat16)

    def pieces(i: int, n: int):
        scale = torch.tensor(1.0 + 0.01 * i, dtype=torch.bfloat16)
        for start in range(0, n, PIECE):
            yield (noise[:min(PIECE, n - start)] * scale)

    with ShardedWriter(directory, {n: (torch.bfloat16, s) for n, s in layout.items()}, parse_size(shard_size)) as w:
        for i, (name, shape_) in enumerate(layout.items()):
            w.write_pieces(name, pieces(i, math.prod(shape_)))
        _config(shape).to_json_file(str(w.tmp / "config.json"))
    return {"parameters": sum(math.prod(s) for s in layout.values()),
            "bytes": sum(p.stat().st_size for p in Path(directory).iterdir())}


def make_delta(path: str, base: str, seed: int, sparsity: float) -> dict:
    """A sparse delta of every attention and MLP matrix of the base: one random position in every
    1 / (1 - sparsity) consecutive entries (exactly that density, disjoint draws overlapping at chance)."""
    from dataclasses import asdict

    import torch

    from lota_cli.artifacts import ArtifactWriter, Meta
    from lota_cli.io import SavedModel
    from lota_cli.config import ModelConfig, ParamsConfig, selected
    from lota_cli.tensors import pack_bits
    from lota_cli.models import state_dict_sources
    from lota_cli.tensors import fingerprint_of

    model_cfg = ModelConfig(path=base, dtype="bfloat16")
    checkpoint = SavedModel(base)
    sources = state_dict_sources(model_cfg, checkpoint)

    names = selected({n: checkpoint.shape(n) for n in checkpoint.names}, ParamsConfig())
    stride = round(1 / (1 - sparsity))
    counts = {n: checkpoint.numel(n) // stride for n in names}
    layout = {}
    for n in names:
        layout[f"{n}::bits"] = (torch.uint8, ((checkpoint.numel(n) + 7) // 8,))
        layout[f"{n}::values"] = (torch.float32, (counts[n],))
    meta = Meta(kind="sparse_delta", base_model=base, base_fingerprint=fingerprint_of(checkpoint.flat_tensors(sources)), stage="bench",
                base_checkpoint=checkpoint.saved_fingerprint(),
                sparsity=sparsity, config={"model": asdict(model_cfg)},
                shapes={n: list(checkpoint.shape(n)) for n in names})
    gen = torch.Generator().manual_seed(seed)
    with ArtifactWriter(path, meta, layout) as writer:
        for n in names:
            numel = checkpoint.numel(n)
            offsets = torch.randint(0, stride, (counts[n],), generator=gen)
            mask = torch.zeros(numel, dtype=torch.bool)
            mask[torch.arange(counts[n]) * stride + offsets] = True
            writer.write(f"{n}::bits", pack_bits(mask))
            writer.write(f"{n}::values", torch.randn(counts[n], generator=gen).mul_(1e-3))
    return {"bytes": Path(path).stat().st_size}


def make_task_vector(path: str, shape: str) -> dict:
    """A random bf16 task vector of the attention and MLP matrices (what calibrate writes), piece by piece."""
    import torch

    from lota_cli.artifacts import ArtifactWriter, Meta
    from lota_cli.config import ParamsConfig
    from lota_cli.config import selected

    layout = _layout(shape)
    names = selected(layout, ParamsConfig())
    meta = Meta(kind="task_vector", base_model="bench/synthetic", base_fingerprint="0" * 64, stage="bench",
                shapes={n: list(layout[n]) for n in names})
    gen = torch.Generator().manual_seed(1)
    noise = torch.randn(PIECE + 4096, generator=gen).mul_(1e-3).to(torch.bfloat16)
    with ArtifactWriter(path, meta, {n: (torch.bfloat16, layout[n]) for n in names}) as writer:
        for i, n in enumerate(names):
            numel = math.prod(layout[n])
            scale = torch.tensor(10 ** (-2 * (i % 7) / 6), dtype=torch.bfloat16)  # scales over 2 orders
            writer.write_pieces(n, (noise[i % 4096:][:min(PIECE, numel - s)] * scale for s in range(0, numel, PIECE)))
    return {"bytes": Path(path).stat().st_size, "parameters": sum(math.prod(layout[n]) for n in names)}


def models_for_mergekit(base: str, deltas: list[str], work: str) -> list[str]:
    """base + each delta as a model directory (streamed by lota merge itself), for mergekit's inputs."""
    out = []
    for i, delta in enumerate(deltas):
        target = str(Path(work) / f"model_{i}")
        bench_merge.timed([sys.executable, "-m", "lota_cli", "merge", delta, "dtype=bfloat16", f"output_model={target}",
               f"out={Path(work) / 'prep'}"])
        out.append(target)
    return out


# --------------------------------------------------------------------------- orchestration

def _warm(paths: list[Path]) -> None:
    """Read the files once, as a first run would: lota writes large files with direct I/O, which leaves them
    out of the page cache, so without this the first timed run alone would read them from disk."""
    for path in paths:
        with open(path, "rb", buffering=0) as f:
            while f.read(1 << 24):
                pass


def _free(path: Path) -> int:
    return shutil.disk_usage(path).free


def run(cfg) -> list[Figure]:
    c = cfg.scale
    root = Path(tempfile.mkdtemp(prefix="lota-bench-scale-", dir=cfg.tmp))
    figures, part = [], f"scale/{c.shape}"
    try:
        base = root / "base"
        log(f"scale: writing a random bf16 Llama of shape {c.shape} to {base}")
        info = in_child("bench_scale", "make_base", timeout=3600, directory=str(base), shape=c.shape)
        log(f"scale: {info['parameters'] / 1e9:.2f}B parameters, {info['bytes'] / GiB:.1f} GiB; two sparse deltas")
        deltas = [str(root / f"delta_{i}.safetensors") for i in range(2)]
        for i, path in enumerate(deltas):
            in_child("bench_scale", "make_delta", timeout=3600, path=path, base=str(base), seed=i, sparsity=0.9)
        delta_bytes = Path(deltas[0]).stat().st_size

        runs = {"cp": [], "lota": []}
        for who in ("cp", "lota", "lota", "cp")[:2 * c.rounds]:  # alternated
            _warm([*sorted(base.iterdir()), *map(Path, deltas)])  # each run starts from the same page cache
            target = root / f"out_{who}"
            cmd = (["bash", "-c", f"cp -r {base} {target} && sync"] if who == "cp" else
                   [sys.executable, "-m", "lota_cli", "merge", *deltas, "method=sum", "dtype=bfloat16",
                    f"output_model={target}", f"out={root / 'run'}"])
            runs[who].append(in_child("bench_merge", "timed", timeout=3600, cmd=cmd))
            subprocess.run(["sync"], check=True)  # lota fsyncs its output; cp's `sync` did the same
            shutil.rmtree(target)
            subprocess.run(["sync"], check=True)  # the deletion settled before the next run starts
            log(f"scale merge {who}: {runs[who][-1]['seconds']:.1f} s, peak RSS {runs[who][-1]['rss_peak'] / GiB:.2f} GiB")
        runs = {who: {k: statistics.median(r[k] for r in rs) for k in ("seconds", "rss_peak")} for who, rs in runs.items()}
        note = (f"{info['parameters'] / 1e9:.2f}B-parameter bf16 base ({info['bytes'] / GiB:.1f} GiB, shards of 5GB), "
                f"two sparse deltas of {delta_bytes / GiB:.2f} GiB each")
        figures += [
            Figure(part, "merge sum into a model: lota", runs["lota"]["seconds"], "s", note=note),
            Figure(part, "merge: cp -r of the base + sync (floor)", runs["cp"]["seconds"], "s"),
            Figure(part, "merge time lota / cp", runs["lota"]["seconds"] / runs["cp"]["seconds"], "x", 1.5),
            Figure(part, "merge peak RSS lota", runs["lota"]["rss_peak"], "B", 2 * GiB),
        ]
        mergekit = find_mergekit(cfg)
        # mergekit's two input models and its output, and lota's output to compare with: four more copies
        needed, free = 4.3 * info["bytes"], _free(root)
        peaks = Path(cfg.out) / "mergekit_peaks.json"  # what mergekit needed where it finished, by shape
        if c.mergekit and mergekit and free > needed:
            try:
                figures += _mergekit(root, base, deltas, mergekit, runs["lota"], part)
                peak = next(f.value for f in figures if f.name == "merge peak RSS mergekit")
                _record_peak(peaks, c.shape, info, peak)
            except RuntimeError as err:  # report lota's figures anyway
                figures.append(Figure(part, "mergekit", "failed", note=f"{_why(str(err))}; {_scaled(peaks, info)}"))
            shutil.rmtree(root / "mergekit", ignore_errors=True)
        elif c.mergekit:
            figures.append(Figure(part, "mergekit", "skipped", note="mergekit-yaml not found" if not mergekit else
                                  f"the disk is too small: it needs {needed / GiB:.0f} GiB free for its input models "
                                  f"and output, {free / GiB:.0f} GiB here; {_scaled(peaks, info)}"))
        for path in deltas:
            Path(path).unlink()
        shutil.rmtree(base)

        tv = root / "task_vector.safetensors"
        log("scale: writing a random bf16 task vector of the attention and MLP matrices")
        tv_info = in_child("bench_scale", "make_task_vector", timeout=3600, path=str(tv), shape=c.shape)
        plain, extracts = [], []
        for _ in range(c.rounds):  # alternated, each run from the same page cache
            _warm([tv])
            plain.append(in_child("bench_extract", "plain_pass", timeout=3600, path=str(tv)))
            _warm([tv])
            extracts.append(in_child("bench_merge", "timed", timeout=3600,
                                     cmd=[sys.executable, "-m", "lota_cli", "extract", f"extract.task_vector={tv}",
                                          f"out={root / 'extract'}"]))
        extract = {k: statistics.median(e[k] for e in extracts) for k in ("seconds", "rss_peak")}
        floor = statistics.median(p["seconds"] for p in plain)
        # extract imports numpy, not torch: what it adds over a bare python + numpy
        baseline_rss = in_child("bench_merge", "timed", timeout=600, cmd=[sys.executable, "-c", "import numpy"])
        log(f"scale extract: {extract['seconds']:.1f} s vs plain pass {floor:.1f} s; peak RSS "
            f"{extract['rss_peak'] / GiB:.2f} GiB")
        figures += [
            Figure(part, "extract: lota extract (CLI, whole process)", extract["seconds"], "s",
                   note=f"bf16 task vector, {tv_info['parameters'] / 1e9:.2f}B entries, {tv_info['bytes'] / GiB:.1f} GiB"),
            Figure(part, "extract: plain pass (read, abs, max)", floor, "s"),
            Figure(part, "extract time lota / plain pass", extract["seconds"] / floor, "x", 2.0),
            Figure(part, "extract peak RSS (whole process)", extract["rss_peak"], "B"),
            Figure(part, "extract extra peak RSS (over python + numpy)", extract["rss_peak"] - baseline_rss["rss_peak"],
                   "B", 2 * GiB),
        ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return figures


def _mergekit(root: Path, base: Path, deltas: list[str], mergekit: str, ours: dict, part: str) -> list[Figure]:
    """mergekit's task_arithmetic over base + each delta as a model (weights 1: the same sum), timed, and its
    output compared with lota's merge of the same deltas."""
    work = root / "mergekit"
    models = in_child("bench_scale", "models_for_mergekit", timeout=3600, base=str(base), deltas=deltas, work=str(work))
    config = work / "config.yml"
    config.write_text(json.dumps({"merge_method": "task_arithmetic", "base_model": str(base), "dtype": "bfloat16",
                                  "models": [{"model": m, "parameters": {"weight": 1.0}} for m in models]}))
    theirs = in_child("bench_merge", "timed", timeout=3600,
                      cmd=[mergekit, str(config), str(work / "out"), "--lazy-unpickle", "--quiet", "--no-cuda"])
    log(f"scale merge mergekit: {theirs['seconds']:.1f} s, peak RSS {theirs['rss_peak'] / GiB:.2f} GiB")
    in_child("bench_merge", "timed", timeout=3600, cmd=[
        sys.executable, "-m", "lota_cli", "merge", *deltas, "method=sum", "dtype=bfloat16",
        f"output_model={work / 'lota'}", f"out={work / 'run'}"])
    diff = in_child("bench_merge", "compare", timeout=3600, a=str(work / "lota"), b=str(work / "out"))
    log(f"scale merge lota vs mergekit: max |diff| {diff['max_abs_diff']:.3g}, "
        f"{diff['entries_differing']:,} entries differ by > 1e-6")
    return [Figure(part, "merge: mergekit task_arithmetic (lazy)", theirs["seconds"], "s"),
            Figure(part, "merge peak RSS mergekit", theirs["rss_peak"], "B"),
            Figure(part, "merge time lota / mergekit", ours["seconds"] / theirs["seconds"], "x", 0.1),
            Figure(part, "merge peak RSS lota / mergekit", ours["rss_peak"] / theirs["rss_peak"], "x", 0.1),
            Figure(part, "max |lota - mergekit| over the merged weights", diff["max_abs_diff"],
                   note=f"{diff['entries_differing']:,} of {diff['entries']:,} entries differ by > 1e-6 "
                        f"({diff['tensors']} tensors compared)")]


def _record_peak(path: Path, shape: str, info: dict, rss_peak: float) -> None:
    """Keep mergekit's peak RSS at this shape (runs/bench/mergekit_peaks.json), to scale from where it cannot run."""
    record = json.loads(path.read_text()) if path.is_file() else {}
    record[shape] = {"parameters": info["parameters"], "bytes": info["bytes"], "rss_peak": rss_peak}
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(record, indent=2))


def _scaled(path: Path, info: dict) -> str:
    """The memory mergekit would need at this shape: its peak at the largest shape it finished here, scaled by
    the model's size, against this machine's memory."""
    record = json.loads(path.read_text()) if path.is_file() else {}
    done = {shape: r for shape, r in record.items() if r["parameters"] < info["parameters"]}
    if not done:
        return "its memory is unmeasured: run scale.shape=3b (or 1b) first"
    shape, largest = max(done.items(), key=lambda item: item[1]["parameters"])
    ratio = largest["rss_peak"] / largest["bytes"]
    return (f"at {shape} it peaked at {largest['rss_peak'] / GiB:.1f} GiB RSS ({ratio:.2f}x the model), so about "
            f"{ratio * info['bytes'] / GiB:.0f} GiB here, against this machine's {memory_bytes() / GiB:.0f} GiB")


def _why(error: str) -> str:
    """mergekit's failure in one line: killed (the kernel's out-of-memory killer sends SIGKILL), with the memory
    this machine has, else the last line it printed."""
    if "killed by SIGKILL" in error:
        return f"killed (SIGKILL: out of memory on this machine's {memory_bytes() / GiB:.0f} GiB)"
    return error.strip().splitlines()[-1][:150]
