"""bench extract: exact global top-k over a large task vector (lota extract) against one plain pass over the
same data and against concatenating every |delta| and calling torch.topk. Functions here run in child
processes (see bench_common.in_child); `run` orchestrates them."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

from bench_common import Figure, GiB, in_child, log, measure, median


def shapes(layers: int, hidden: int, intermediate: int, kv: int) -> dict[str, tuple[int, int]]:
    """A Llama-like stack of attention and MLP weights (what extract selects by default)."""
    out = {}
    for i in range(layers):
        p = f"model.layers.{i}."
        out[p + "self_attn.q_proj.weight"] = (hidden, hidden)
        out[p + "self_attn.k_proj.weight"] = (kv, hidden)
        out[p + "self_attn.v_proj.weight"] = (kv, hidden)
        out[p + "self_attn.o_proj.weight"] = (hidden, hidden)
        out[p + "mlp.gate_proj.weight"] = (intermediate, hidden)
        out[p + "mlp.up_proj.weight"] = (intermediate, hidden)
        out[p + "mlp.down_proj.weight"] = (hidden, intermediate)
    return out


# --------------------------------------------------------------------------- child functions

def generate(path: str, layers: int, hidden: int, intermediate: int, kv: int, seed: int = 0,
             case: str = "uniform") -> dict:
    """Write a random float32 task vector artifact tensor by tensor (never more than one tensor in RAM).

    case: uniform (N(0, 1e-3) everywhere); heavy (N(0, 1e-3) / U(0, 1): a ratio distribution, very heavy
    tails); skewed (each layer's scale 10^(-3.5 * layer / (layers - 1)), so scales span 3.5 orders of
    magnitude, and each row's scale Exp(1): as after a step or two of calibration, where the global top-10%
    is most of the first layers and almost none of the last)."""
    import torch

    from lota_cli.artifacts import ArtifactWriter, Meta

    layout = shapes(layers, hidden, intermediate, kv)
    meta = Meta(kind="task_vector", base_model="bench/synthetic", base_fingerprint="0" * 64, stage="bench",
                shapes={n: list(s) for n, s in layout.items()})
    gen = torch.Generator().manual_seed(seed)
    with ArtifactWriter(path, meta, {n: (torch.float32, s) for n, s in layout.items()}) as writer:
        for name, shape in layout.items():
            values = torch.empty(shape).normal_(0.0, 1e-3, generator=gen)
            if case == "heavy":
                values /= torch.empty(shape).uniform_(0.0, 1.0, generator=gen).clamp_min_(1e-6)
            elif case == "skewed":
                values *= 10 ** (-3.5 * int(name.split(".")[2]) / max(layers - 1, 1))
                values *= torch.empty(shape[0], 1).exponential_(1.0, generator=gen)
            writer.write(name, values)
    numel = sum(math.prod(s) for s in layout.values())
    return {"numel": numel, "bytes": Path(path).stat().st_size,
            "largest_bytes": max(math.prod(s) for s in layout.values()) * 4, "tensors": len(layout)}


def plain_pass(path: str) -> dict:
    """Read every tensor (safe_open get_tensor), abs, max: the least any pass over the data does."""
    from safetensors import safe_open

    def run():
        top = 0.0
        with safe_open(path, framework="pt") as f:
            for name in f.keys():
                top = max(top, float(f.get_tensor(name).abs().max()))
        return top

    top, stats = measure(run)
    return {**stats, "max": top}


def lota_extract(path: str, out: str, sparsity: float) -> dict:
    """`lota extract` in-process: lota_cli.stages.extract.run with an ExtractConfig."""
    import importlib

    importlib.import_module("transformers")  # the stage imports it to stamp versions: not what is timed

    from lota_cli.ops import _top_k as masks  # its passes counted
    from lota_cli.tensors import count_bits
    from lota_cli.artifacts import Artifact
    from lota_cli.config import ExtractConfig, ExtractOptions
    from lota_cli.stages import extract

    passes = []
    original = masks._pass

    def counting(*args, **kwargs):  # how many full passes the selection made (1 when the sample's bracket held)
        result = original(*args, **kwargs)
        passes.append(result[0])
        return result

    masks._pass = counting
    cfg = ExtractConfig(out=out, extract=ExtractOptions(task_vector=path, sparsity=sparsity))
    written, stats = measure(extract.run, cfg, Path(out))
    mask = Artifact(written[0])
    selected = sum(count_bits(mask.packed_bits(n)) for n in mask.names)
    return {**stats, "mask": str(written[0]), "selected": selected, "passes": passes,
            "mask_bytes": Path(written[0]).stat().st_size}


def naive(path: str, sparsity: float, mask: str) -> dict:
    """Concatenate every |delta| and torch.topk; then compare its selection with lota's mask."""
    import torch
    from safetensors import safe_open

    from lota_cli.artifacts import Artifact
    from lota_cli.config import ParamsConfig
    from lota_cli.ops import k_for
    from lota_cli.tensors import unpack_bits
    from lota_cli.config import selected

    ours = Artifact(mask)
    with safe_open(path, framework="pt") as f:
        names = selected({n: tuple(f.get_slice(n).get_shape()) for n in f.keys()}, ParamsConfig())

    def run():
        with safe_open(path, framework="pt") as f:
            values = torch.cat([f.get_tensor(n).reshape(-1).abs() for n in names])
        return values, values.topk(k_for(sparsity, values.numel()))

    (values, (top, index)), stats = measure(run)
    theirs = torch.zeros(values.numel(), dtype=torch.bool)
    theirs[index] = True
    del index
    threshold = float(top.min())
    offset, ours_count, differ, differ_not_tied = 0, 0, 0, 0
    min_selected, max_unselected = math.inf, -math.inf
    for name in names:
        n = ours.numel(name)
        mine = unpack_bits(ours.packed_bits(name), n)
        vals, other = values[offset:offset + n], theirs[offset:offset + n]
        ours_count += int(mine.count_nonzero())
        if mine.any():
            min_selected = min(min_selected, float(vals[mine].min()))
        if (~mine).any():
            max_unselected = max(max_unselected, float(torch.where(mine, -1.0, vals).max()))
        diff = mine ^ other
        differ += int(diff.count_nonzero())
        differ_not_tied += int((diff & (vals != threshold)).count_nonzero())
        offset += n
    return {**stats, "k": int(top.numel()), "selected": ours_count, "differ": differ,
            "differ_not_tied": differ_not_tied, "threshold": threshold, "min_selected": min_selected,
            "max_unselected": max_unselected}


# --------------------------------------------------------------------------- orchestration

def run(cfg) -> list[Figure]:
    figures = []
    for case in cfg.extract.cases:
        figures += _case(cfg, case)
    return figures


def _case(cfg, case: str) -> list[Figure]:
    c = cfg.extract
    part = "extract" if case == "uniform" else f"extract/{case}"
    root = Path(tempfile.mkdtemp(prefix="lota-bench-extract-", dir=cfg.tmp))
    figures = []
    try:
        path = str(root / "task_vector.safetensors")
        log(f"{part}: writing a random float32 task vector ({case}; {c.layers} layers, hidden {c.hidden}, "
            f"intermediate {c.intermediate}) to {path}")
        info = in_child("bench_extract", "generate", path=path, layers=c.layers, hidden=c.hidden,
                        intermediate=c.intermediate, kv=c.kv, case=case)
        log(f"extract: {info['numel'] / 1e9:.3f}B parameters, {info['bytes'] / GiB:.2f} GiB; warming the page cache "
            "with one unmeasured plain pass")
        in_child("bench_extract", "plain_pass", path=path)
        plain, lota = [], []
        for i in range(c.repeats):  # alternate the two so drifting machine load hits both alike
            plain.append(in_child("bench_extract", "plain_pass", path=path))
            out = root / f"extract-{i}"
            lota.append(in_child("bench_extract", "lota_extract", path=path, out=str(out), sparsity=c.sparsity))
            log(f"extract: round {i + 1}: plain pass {plain[-1]['seconds']:.2f} s, lota extract "
                f"{lota[-1]['seconds']:.2f} s (passes: {lota[-1]['passes']})")
            if i + 1 < c.repeats:
                shutil.rmtree(out)
        t_plain, t_lota = median(p["seconds"] for p in plain), median(r["seconds"] for r in lota)
        rss_lota = max(r["rss_extra"] for r in lota)
        rss_plain = max(p["rss_extra"] for p in plain)
        allowed = info["largest_bytes"] + 0.1 * info["numel"] * 4
        scale = f"{info['numel'] / 1e9:.3f}B fp32 values, {info['tensors']} tensors, sparsity {c.sparsity}"
        figures += [
            Figure(part, "plain pass (read+abs+max), median", t_plain, "s", note=scale),
            Figure(part, "lota extract (top-k + write mask), median", t_lota, "s",
                   note=f"full passes over the data: {lota[-1]['passes']}"),
            Figure(part, "time lota / plain pass", t_lota / t_plain, "x", 2.0),
            Figure(part, "extra peak RSS, lota extract", rss_lota, "B", allowed,
                   note=f"target = largest tensor ({info['largest_bytes'] / 2**20:.0f} MiB) + 10% of the task vector"),
            Figure(part, "extra peak RSS, plain pass", rss_plain, "B",
                   note="context: includes the file pages safetensors maps in"),
        ]
        if c.naive and case == "uniform":
            log("extract: naive concatenate + torch.topk (needs ~5x the task vector in RAM)")
            nv = in_child("bench_extract", "naive", path=path, sparsity=c.sparsity, mask=lota[-1]["mask"])
            same_count = nv["selected"] == nv["k"] == lota[-1]["selected"]
            valid = nv["min_selected"] >= nv["max_unselected"]
            figures += [
                Figure(part, "naive concat + topk", nv["seconds"], "s"),
                Figure(part, "extra peak RSS, naive", nv["rss_extra"], "B"),
                Figure(part, "time lota / naive", t_lota / nv["seconds"], "x"),
                Figure(part, "selected count lota == topk k", "yes" if same_count else "NO", check=same_count,
                       note=f"{lota[-1]['selected']:,} vs {nv['k']:,}"),
                Figure(part, "min selected >= max unselected", "yes" if valid else "NO", check=valid,
                       note=f"{nv['min_selected']:.9g} >= {nv['max_unselected']:.9g}"),
                Figure(part, "entries differing from topk's set", nv["differ"], check=nv["differ_not_tied"] == 0,
                       note=f"{nv['differ_not_tied']} of them not tied at the threshold {nv['threshold']:.9g} "
                            "(ties: topk's order among equal values is unspecified; lota takes the first)"),
            ]
    finally:
        shutil.rmtree(root, ignore_errors=True)
    return figures
