"""lota info [--json] [--verify] FILE...: what an artifact is, what it came from, and how dense it is.

--verify also reads every tensor's data and checks it against the checksums recorded when it was written
(after a copy between machines, say): one line naming the first damaged tensor, exit status 1."""

from __future__ import annotations

import argparse
import json

from rich.table import Table

from lota_cli.artifacts import StoredFile
from lota_cli.console import stderr
from lota_cli.ops import density_by_layer


def describe(artifact: StoredFile) -> dict:
    counts = {n: (artifact.held_count(n), artifact.numel(n)) for n in artifact.names}
    held, total = sum(c[0] for c in counts.values()), sum(c[1] for c in counts.values())
    meta = artifact.meta
    return {
        "path": str(artifact.path), "kind": meta.kind, "format": meta.format, "stage": meta.stage,
        "base_model": meta.base_model, "base_fingerprint": meta.base_fingerprint,
        "fingerprint": meta.fingerprint, "parents": meta.parents, "seed": meta.seed, "sparsity": meta.sparsity,
        "source": meta.source,
        "tensors": len(counts), "parameters": total, "entries": held, "density": held / max(total, 1),
        "bytes": artifact.path.stat().st_size, "bytes_per_param": artifact.path.stat().st_size / max(total, 1),
        "density_per_layer": density_by_layer(counts), "versions": meta.versions,
    }


def _print(info: dict) -> None:
    head = Table(title=info["path"], show_header=False)
    for key in ("kind", "stage", "base_model", "base_fingerprint", "fingerprint", "sparsity", "source", "tensors",
                "parameters", "entries", "density", "bytes", "bytes_per_param"):
        value = info[key]
        if key == "source" and not value:
            continue
        head.add_row(key, f"{value:.4f}" if isinstance(value, float) else str(value))
    stderr.print(head)
    layers = Table("layer", "density")
    for layer, density in info["density_per_layer"].items():
        layers.add_row(layer, f"{density:.4f}")
    stderr.print(layers)


def main(argv: list[str]) -> int:
    parser = argparse.ArgumentParser(prog="lota info", description=__doc__)
    parser.add_argument("files", nargs="+", help="artifact files (.safetensors)")
    parser.add_argument("--json", action="store_true", help="print JSON on stdout instead of tables on stderr")
    parser.add_argument("--verify", action="store_true",
                        help="check every tensor's data against its checksum (reads the whole file)")
    parser.add_argument("--debug", action="store_true", help="show the traceback of a failure")
    args = parser.parse_args(argv)
    artifacts = [StoredFile(f) for f in args.files]  # errors: one line, from the CLI; no torch needed
    for artifact in artifacts if args.verify else ():
        checked = artifact.verify()
        stderr.print(f"{artifact.path}: {len(artifact.keys)} tensors, {checked:,} bytes match their "
                     f"{'checksums' if artifact.meta.checksums else 'fingerprint'}")
    infos = [describe(a) for a in artifacts]
    if args.json:
        print(json.dumps(infos if len(infos) > 1 else infos[0], indent=2))
    else:
        for info in infos:
            _print(info)
    return 0
