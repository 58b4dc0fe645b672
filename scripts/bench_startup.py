"""bench startup: whole-process wall time of the artifact stages on tiny inputs, where the work itself takes
milliseconds, so what is measured is start-up (Python, Hydra's composition, imports) up to the first work and
past it: an upper bound on the time to first work. `import torch` alone is timed beside them for scale."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import Figure, child_env, in_child, log, median

NAME = "model.layers.0.mlp.up_proj.weight"


def prepare(work: str) -> dict:
    """Child: a task vector, two more, and two sparse deltas of one 64 x 64 tensor."""
    import torch

    from lota_cli.artifacts import save_dense, save_sparse, stage_meta
    from lota_cli.masks import encode_positions, pack_bits

    gen = torch.Generator().manual_seed(0)
    paths = {}
    for tag in ("a", "b"):
        delta = torch.randn(64, 64, generator=gen)
        paths[tag] = str(save_dense(Path(work) / f"{tag}.safetensors",
                                    stage_meta("task_vector", "bench", {}, "base", "f" * 64), {NAME: delta}))
        held = delta.reshape(-1).abs() > 1.6
        paths[f"s{tag}"] = str(save_sparse(Path(work) / f"s{tag}.safetensors",
                                           stage_meta("sparse_delta", "bench", {}, "base", "f" * 64), {NAME: (64, 64)},
                                           {NAME: encode_positions(pack_bits(held), 64 * 64)},
                                           {NAME: delta.reshape(-1)[held]}))
    return paths


def run(cfg) -> list[Figure]:
    root = Path(tempfile.mkdtemp(prefix="lota-bench-startup-", dir=cfg.tmp))
    lota = [sys.executable, "-m", "lota_cli"]
    try:
        p = in_child("bench_startup", "prepare", work=str(root))
        commands = {
            "lota info FILE": [*lota, "info", p["a"]],
            "lota extract (task vector)": [*lota, "extract", f"extract.task_vector={p['a']}", f"out={root / 'e'}"],
            "lota merge (sparse deltas, sum)": [*lota, "merge", p["sa"], p["sb"], f"out={root / 'm'}"],
            "lota overlap A B": [*lota, "overlap", p["a"], p["b"], f"out={root / 'o'}"],
            "import torch (for scale)": [sys.executable, "-c", "import torch"],
        }
        times = {name: [] for name in commands}
        for _ in range(cfg.startup.rounds):  # alternated, so load on the machine falls on all alike
            for name, cmd in commands.items():
                start = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
                times[name].append(time.perf_counter() - start)
                if proc.returncode:
                    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-1500:]}")
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures = []
    for name, values in times.items():
        target = None if name.startswith("import") else 1.0
        log(f"startup: {name}: {median(values):.2f} s (runs {', '.join(f'{v:.2f}' for v in values)})")
        figures.append(Figure("startup", f"{name}, whole process", median(values), "s", target,
                              note=f"median of {len(values)}, tiny inputs"))
    return figures
