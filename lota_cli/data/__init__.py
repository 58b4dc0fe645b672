"""Task data: rows loaded and rendered (_rows), encoded into flat arrays and cached (_encoding, _cache), and
what the training loop trains on: items in reproducible micro-batches, packed or not, one task or a
mixture (_batches)."""

from lota_cli.data._batches import Fixed, Item, MicroBatches, Streamed, collate, mixture_draw, pack, targets, train_data
from lota_cli.data._cache import cache_dir, max_bytes, prune
from lota_cli.data._encoding import (IGNORE, ROLES, Encoded, Example, chat_template, counts, encode, encode_stream,
                                     eval_examples, report)
from lota_cli.data._rows import load_rows, render

__all__ = ["IGNORE", "ROLES", "Encoded", "Example", "Fixed", "Item", "MicroBatches", "Streamed", "cache_dir",
           "chat_template", "collate", "counts", "encode", "encode_stream", "eval_examples", "load_rows", "max_bytes",
           "mixture_draw", "pack", "prune", "render", "report", "targets", "train_data"]
