"""bench startup: how long the artifact stages take to reach their first work, on tiny inputs: from the
process's start (the kernel's record of it, so the interpreter's own start-up counts) to the stage's `run`
being entered (a wrapper installed by an import hook when the stage module loads, so nothing is imported
earlier than it would be), and the whole process's wall time, which adds the (tiny) work, the writes and the
exit. `--cfg job` (compose and print the config: the issue's measure) and `import torch` alone beside them."""

from __future__ import annotations

import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from bench_common import Figure, child_env, in_child, log, median

NAME = "model.layers.0.mlp.up_proj.weight"

# run as `python -c HOOK REPORT lota-args...`: lota's CLI, with the moment a stage's run() is entered written
# to REPORT as seconds since this process started
HOOK = """
import importlib.abc, importlib.util, os, sys, time

def since_start():
    fields = open('/proc/self/stat').read().rsplit(')', 1)[1].split()
    uptime = float(open('/proc/uptime').read().split()[0])
    return uptime - int(fields[19]) / os.sysconf('SC_CLK_TCK')

report = sys.argv[1]

class Hook(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path, target=None):
        if not name.startswith('lota_cli.stages.') or name == 'lota_cli.stages.info':
            return None
        sys.meta_path.remove(self)
        spec = importlib.util.find_spec(name)
        sys.meta_path.insert(0, self)
        exec_module = spec.loader.exec_module
        def wrapped(module):
            exec_module(module)
            run = module.run
            def timed(*args, **kwargs):
                open(report, 'w').write(str(since_start()))
                return run(*args, **kwargs)
            module.run = timed
        spec.loader.exec_module = wrapped
        return spec

sys.meta_path.insert(0, Hook())
from lota_cli import cli
cli.main(sys.argv[2:])
"""


def prepare(work: str) -> dict:
    """Child: a task vector, two more, and two sparse deltas of one 64 x 64 tensor."""
    import torch

    from lota_cli.artifacts import save_dense, save_sparse, stage_meta
    from lota_cli.tensors import encode_positions, pack_bits

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
        stages = {
            "lota info FILE": ["info", p["a"]],
            "lota extract (task vector)": ["extract", f"extract.task_vector={p['a']}", f"out={root / 'e'}"],
            "lota merge (sparse deltas, sum)": ["merge", p["sa"], p["sb"], f"out={root / 'm'}"],
            "lota overlap A B": ["overlap", p["a"], p["b"], f"out={root / 'o'}"],
        }
        report = root / "first-work"
        commands = {**{f"{name}: to first work": [sys.executable, "-c", HOOK, str(report), *args]
                       for name, args in stages.items() if args[0] != "info"},
                    **{f"{name}: whole process": [*lota, *args] for name, args in stages.items()},
                    "lota extract --cfg job": [*lota, *stages["lota extract (task vector)"], "--cfg", "job"],
                    "import torch (for scale)": [sys.executable, "-c", "import torch"]}
        times = {name: [] for name in commands}
        for _ in range(cfg.startup.rounds):  # alternated, so load on the machine falls on all alike
            for name, cmd in commands.items():
                report.unlink(missing_ok=True)
                start = time.perf_counter()
                proc = subprocess.run(cmd, capture_output=True, text=True, env=child_env())
                wall = time.perf_counter() - start
                if proc.returncode:
                    raise RuntimeError(f"{' '.join(cmd)} failed ({proc.returncode}): {proc.stderr[-1500:]}")
                times[name].append(float(report.read_text()) if name.endswith("first work") else wall)
    finally:
        shutil.rmtree(root, ignore_errors=True)
    figures = []
    for name, values in times.items():
        target = 1.0 if name.endswith(("first work", "--cfg job")) or name.startswith("lota info") else None
        log(f"startup: {name}: {median(values):.2f} s (runs {', '.join(f'{v:.2f}' for v in values)})")
        figures.append(Figure("startup", name, median(values), "s", target, note=f"median of {len(values)}, tiny inputs"))
    return figures
