"""lota export DELTA ...: sparse deltas in a form other tools load.

format=peft (default): each sparse delta as a PEFT Super-Tuning adapter, exact (lota_cli.interop says how and
what it costs). One delta: out/peft is the adapter (`PeftModel.from_pretrained(base, "out/peft")`). Several, a
LoTTO chain say: out/peft/NAME/ for each, named by `names=` or by the tasks the deltas were trained on.
format=model: base + every delta as a Hugging Face model directory out/model: the streaming merge's sum
(lota_cli.workflows.Merger, as `lota merge ... output_model=`), which reads the base the deltas record and
checks it by fingerprint.
"""

from __future__ import annotations

import re
from pathlib import Path

from lota_cli import interop
from lota_cli.artifacts import Artifact, same_layout
from lota_cli.config import ADAPTER_NAME, ExportConfig, parse_size
from lota_cli.inputs import open_artifact
from lota_cli.io import DEFAULT_SHARD_SIZE
from lota_cli.workflows import Merger


def _default_names(deltas: list[Artifact]) -> list[str]:
    """The tasks the deltas were trained on, when those tell them apart; else adapter0, adapter1, ..."""
    tasks = [str((d.meta.config.get("task") or {}).get("name") or "") for d in deltas]
    if len(set(tasks)) == len(tasks) and all(re.fullmatch(ADAPTER_NAME, t) for t in tasks):
        return tasks
    return [f"adapter{i}" for i in range(len(deltas))]


def run(cfg: ExportConfig, out: Path) -> list[Path]:
    deltas = [open_artifact(p, kinds=("sparse_delta",)) for p in cfg.inputs]
    for other in deltas[1:]:
        other.check_base(deltas[0].meta.base_fingerprint, deltas[0].meta.base_model)
    if cfg.format == "model":
        same_layout(deltas)
        merger = Merger(deltas, "sum", dtype=cfg.dtype)
        path = merger.into_model(out / "model", parse_size(DEFAULT_SHARD_SIZE))
        merger.log_overlaps()
        return [path]
    names = list(cfg.names) if cfg.names else _default_names(deltas) if len(deltas) > 1 else None
    return [interop.write_adapters(deltas, out / "peft", names)]
