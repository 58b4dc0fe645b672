"""lota data: the training data exactly as a training stage composes it (same arguments), shown and measured.

Writes out/stats.json (per task: rows, examples dropped or truncated, token lengths, the fraction of tokens
trained; the mixture's realized proportions; real-token fractions of batches with and without packing) and
out/preview.jsonl (examples in training order: the rendered text, the trained tokens decoded in order, and
both counts); data.show=N prints N examples on stderr with the trained tokens marked.
"""

from __future__ import annotations

import dataclasses
import json
import logging
import sys
from pathlib import Path

import numpy as np
from rich.table import Table
from rich.text import Text

from lota_cli.config import DataConfig
from lota_cli.console import stderr
from lota_cli.data import Encoded, Fixed, train_data
from lota_cli.io import write_text
from lota_cli.models import load_tokenizer

log = logging.getLogger(__name__)


def run(cfg: DataConfig, out: Path) -> list[Path]:
    tokenizer = load_tokenizer(cfg.model)
    data = train_data(tokenizer, cfg)
    if isinstance(data, Fixed):
        examples = _in_training_order(data, cfg.data.preview)
        stats = _fixed_stats(data, cfg, tokenizer)
    else:  # a stream: measured on its first data.stream_examples examples
        examples, i, bs = [], 0, cfg.train.batch_size
        while len(examples) < cfg.data.stream_examples:
            examples += [(cfg.task.name, i * bs + j, ex) for j, item in enumerate(data.micro_batch(i)) for ex in item]
            i += 1
        examples = examples[:cfg.data.stream_examples]
        stats = {"streamed": True, "examples_read": len(examples),
                 "tasks": {cfg.task.name: _token_stats([ids for _, _, (ids, _) in examples],
                                                       [tr for _, _, (_, tr) in examples])}}
        examples = examples[:cfg.data.preview]

    records = [{"task": task, "sequence": item, "text": tokenizer.decode(ids),
                "trained_text": tokenizer.decode(ids[trained]), "tokens": int(len(ids)),
                "trained_tokens": int(trained.sum())} for task, item, (ids, trained) in examples]
    preview = write_text(out / "preview.jsonl", "".join(json.dumps(record) + "\n" for record in records))
    path = write_text(out / "stats.json", json.dumps(stats, indent=2) + "\n")
    stderr.print(_table(stats))
    for task, item, (ids, trained) in examples[:cfg.data.show]:
        stderr.print(Text(f"--- {task}, sequence {item}: {len(ids)} tokens, {int(trained.sum())} trained", style="bold"))
        stderr.print(_marked(tokenizer, ids, trained))
    return [path, preview]


def _in_training_order(data: Fixed, n: int) -> list[tuple[str, int, tuple]]:
    """(task, sequence number, (ids, trained)) of the first n examples the loop would see."""
    return [(data.task_of(i), j, data.encoded.example(i)) for j, i in data.first_examples(n)]


def _token_stats(ids: list[np.ndarray], trained: list[np.ndarray]) -> dict:
    lengths = np.array([len(x) for x in ids])
    return {"examples": len(ids),
            "tokens": {"min": int(lengths.min()), "mean": float(lengths.mean()), "median": float(np.median(lengths)),
                       "p95": float(np.percentile(lengths, 95)), "max": int(lengths.max())},
            "trained_fraction": float(sum(int(t.sum()) for t in trained) / lengths.sum())}


def _fixed_stats(data: Fixed, cfg: DataConfig, tokenizer) -> dict:
    e: Encoded = data.encoded
    tasks = {}
    for k, (name, counts) in enumerate(data.stats.items()):
        rows = range(int(data.starts[k]), int(data.starts[k + 1]))
        tasks[name] = {**_token_stats([e.tokens(i) for i in rows], [e.trained_mask(i) for i in rows]), **counts}
    real = {cfg.task.packing: data.real_tokens()}
    if cfg.task.format != "preference":  # pairs are not packed
        other = dataclasses.replace(cfg, task=dataclasses.replace(cfg.task, packing=not cfg.task.packing))
        real[other.task.packing] = Fixed(e, data.order, other, data.stats, data.proportions).real_tokens()
    return {"tasks": tasks, "mixture": data.proportions if len(tasks) > 1 else None,
            "sequences": data.n, "packing": cfg.task.packing, "batch_size": cfg.train.batch_size,
            "real_token_fraction": {("packed" if packed else "unpacked"): r / p for packed, (r, p) in real.items()}}


def _table(stats: dict) -> Table:
    table = Table(title="lota data")
    for column in ("task", "examples", "dropped", "truncated", "turns cut", "tokens mean/p95/max", "trained"):
        table.add_column(column, justify="left" if column == "task" else "right")
    for name, t in stats["tasks"].items():
        tok = t["tokens"]
        table.add_row(name, str(t["examples"]), str(t.get("dropped", "-")), str(t.get("truncated", "-")),
                      str(t.get("turns_dropped", "-")), f"{tok['mean']:.0f}/{tok['p95']:.0f}/{tok['max']}",
                      f"{t['trained_fraction']:.1%}")
    if stats.get("real_token_fraction"):
        f = stats["real_token_fraction"]
        table.caption = (f"real tokens per batch of {stats['batch_size']}: {f['unpacked']:.1%} unpacked"
                         + (f", {f['packed']:.1%} packed (task.packing={str(stats['packing']).lower()})"
                            if "packed" in f else " (preference pairs: not packed)"))
        if stats.get("mixture"):
            table.caption += "; mixture " + ", ".join(f"{k} {v:.3f}" for k, v in stats["mixture"].items())
    return table


def _marked(tokenizer, ids: np.ndarray, trained: np.ndarray) -> Text:
    """The example's text, trained spans in green on a terminal and between [[ ]] otherwise."""
    text, plain = Text(), not sys.stderr.isatty()
    edges = np.flatnonzero(np.diff(trained.astype(np.int8))) + 1
    for span in np.split(np.arange(len(ids)), edges):
        if not len(span):
            continue
        piece = tokenizer.decode(ids[span])
        if trained[span[0]]:
            text.append(f"[[{piece}]]" if plain else piece, style=None if plain else "bold green")
        else:
            text.append(piece)
    return text
