"""bench artifacts: bytes per parameter of the selected tensors for masks and sparse deltas (bf16 values),
written by lota's own code (extract.run, save_sparse as sparse-train does), against a dense bf16 task vector."""

from __future__ import annotations

import math
import shutil
import tempfile
from pathlib import Path

from bench_common import Figure, in_child, log


def sizes(directory: str, sparsities: list[float]) -> dict:
    """Child: a random bf16 task vector with SmolLM2-135M's attention/MLP shapes, then per sparsity the mask
    (`lota extract`) and a sparse delta with bf16 values (written the way sparse-train writes it)."""
    import torch

    from bench_extract import shapes
    from lota_cli.artifacts import Artifact, ArtifactWriter, Meta, save_sparse
    from lota_cli.config import ExtractConfig, ExtractOptions
    from lota_cli.tensors import count_bits, encode_positions
    from lota_cli.stages import extract

    root = Path(directory)
    layout = shapes(layers=30, hidden=576, intermediate=1536, kv=192)  # SmolLM2-135M
    numel = sum(math.prod(s) for s in layout.values())
    meta = Meta(kind="task_vector", base_model="bench/smollm2-135m-shapes", base_fingerprint="0" * 64,
                stage="bench", shapes={n: list(s) for n, s in layout.items()})
    gen = torch.Generator().manual_seed(0)
    dense = root / "task_vector_bf16.safetensors"
    with ArtifactWriter(dense, meta, {n: (torch.bfloat16, s) for n, s in layout.items()}) as writer:
        for name, shape in layout.items():
            writer.write(name, (torch.randn(shape, generator=gen) * 1e-3).to(torch.bfloat16))
    out = {"numel": numel, "tensors": len(layout), "dense_bytes": dense.stat().st_size, "sparsities": {}}
    for sparsity in sparsities:
        mask_path = extract.run(ExtractConfig(out=str(root / f"extract-{sparsity}"),
                                              extract=ExtractOptions(task_vector=str(dense), sparsity=sparsity)),
                                root / f"extract-{sparsity}")[0]
        mask = Artifact(mask_path)
        positions = {n: encode_positions(mask.bits(n), mask.numel(n)) for n in mask.names}
        values = {n: (torch.randn(count_bits(mask.bits(n)), generator=gen) * 1e-3).to(torch.bfloat16)
                  for n in mask.names}
        delta_meta = Meta(kind="sparse_delta", base_model=meta.base_model, base_fingerprint=meta.base_fingerprint,
                          stage="bench", sparsity=sparsity)
        delta = save_sparse(root / f"sparse_delta-{sparsity}.safetensors", delta_meta,
                            {n: mask.shape(n) for n in mask.names}, positions, values)
        encodings = sorted({enc for enc, _ in positions.values()})
        out["sparsities"][str(sparsity)] = {"mask_bytes": mask_path.stat().st_size, "delta_bytes": delta.stat().st_size,
                                            "selected": sum(count_bits(mask.bits(n)) for n in mask.names),
                                            "encodings": encodings}
    return out


def run(cfg) -> list[Figure]:
    root = Path(tempfile.mkdtemp(prefix="lota-bench-artifacts-", dir=cfg.tmp))
    try:
        log("artifacts: writing a bf16 task vector, masks and sparse deltas with SmolLM2-135M's shapes")
        res = in_child("bench_artifacts", "sizes", directory=str(root), sparsities=list(cfg.artifacts.sparsities))
    finally:
        shutil.rmtree(root, ignore_errors=True)
    n = res["numel"]
    where = f"{n / 1e6:.1f}M parameters in {res['tensors']} tensors; file bytes (header included) / parameters"
    figures = [Figure("artifacts", "dense bf16 task vector", res["dense_bytes"] / n, "B/param", note=where)]
    for s, r in res["sparsities"].items():
        mask_target, delta_target = 0.126, (0.33 if float(s) == 0.9 else None)
        enc = "/".join(r["encodings"])
        figures += [
            Figure("artifacts", f"mask, sparsity {s}", r["mask_bytes"] / n, "B/param", mask_target, note=f"positions as {enc}"),
            Figure("artifacts", f"sparse delta (bf16 values), sparsity {s}", r["delta_bytes"] / n, "B/param",
                   delta_target, note=f"{res['dense_bytes'] / r['delta_bytes']:.1f}x smaller than the dense bf16 task vector"),
        ]
    return figures
