"""Task data: load rows (hub or local files), build prompt/target token ids, and batch them reproducibly."""

from __future__ import annotations

import logging
import string
from dataclasses import dataclass
from pathlib import Path

import torch

from lota_cli import LotaError
from lota_cli.config import TaskConfig

log = logging.getLogger(__name__)
IGNORE = -100  # label of tokens that carry no loss (prompt, padding)
_LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


@dataclass
class Example:
    prompt_ids: list[int]
    target_ids: list[int]
    row: dict  # the source row, for metrics that need the reference


def _files(data_files, key: str) -> list[str]:
    """The local data files, each checked to exist, be readable and hold something (datasets' own errors
    for these are cryptic: an empty file raises a bare StopIteration)."""
    files = [data_files] if isinstance(data_files, str) else [str(f) for f in data_files]
    if not files:
        raise LotaError(f"{key} is an empty list; give one or more json/jsonl/parquet/csv files")
    for f in files:
        if not Path(f).is_file():
            raise LotaError(f"data file not found: {f} ({key}); check the path")
        try:
            with open(f, "rb") as fh:
                empty = not fh.read(1)
        except OSError as err:
            raise LotaError(f"cannot read data file {f} ({key}): {err.strerror or err}; check its permissions") from err
        if empty:
            raise LotaError(f"data file {f} ({key}) is empty; give a file with at least one example")
    return files


def _first_line(err: Exception) -> str:
    lines = [line for line in str(err).splitlines() if line.strip()]
    return lines[0][:300] if lines else type(err).__name__


def load_rows(task: TaskConfig, purpose: str = "train") -> list[dict]:
    """Rows for training or evaluation: from local files when given, else from the hub dataset.

    With `task.holdout` > 0 and no separate eval files, evaluation reads the training data too, and its
    last `task.holdout` rows (after the seeded shuffle) are evaluation's alone.
    """
    import datasets

    shared = task.holdout > 0 and not task.eval_data_files
    if purpose == "train" or shared:
        split, data_files, key = task.split, task.data_files, "task.data_files"
    else:
        split, data_files, key = task.eval_split, task.eval_data_files, "task.eval_data_files"
    try:
        if data_files:
            files = _files(data_files, key)
            kind = _LOADERS.get(Path(files[0]).suffix)
            if kind is None:
                raise LotaError(f"{files[0]}: unsupported data file type; use one of {', '.join(_LOADERS)}")
            ds = datasets.load_dataset(kind, data_files=files, split="train")
        elif task.dataset:
            ds = datasets.load_dataset(task.dataset, task.dataset_config, split=split)
        else:
            raise LotaError(f"task {task.name}: set task.dataset (a hub id) or task.data_files (local files)")
    except LotaError:
        raise
    except Exception as err:  # datasets raises many types for unreadable or unreachable data
        where = data_files or f"{task.dataset} ({task.dataset_config}, split {split})"
        if "corresponds to no data" in str(err):  # e.g. a JSON file holding []
            raise LotaError(f"task {task.name}: the data set {where} has no examples; give data with at least "
                            "one example") from None
        hint = "check that the file is valid " + Path(files[0]).suffix[1:] if data_files else "check the name"
        raise LotaError(f"cannot load task {task.name} data from {where}: {_first_line(err)}; {hint}") from err
    if len(ds) == 0:
        raise LotaError(f"task {task.name}: the data set {data_files or task.dataset} has no examples; give data "
                        "with at least one example")
    ds = ds.shuffle(seed=task.shuffle_seed)
    if shared:
        if task.holdout >= len(ds):
            raise LotaError(f"task {task.name}: task.holdout={task.holdout} leaves no training rows of {len(ds)}")
        keep = range(len(ds) - task.holdout) if purpose == "train" else range(len(ds) - task.holdout, len(ds))
        ds = ds.select(keep)
    n = len(ds)
    if purpose == "train" and task.fraction < 1.0:  # evaluation has its own limit, eval.max_examples
        n = max(1, int(n * task.fraction))
    if purpose == "train" and task.max_examples:
        n = min(n, task.max_examples)
    rows = ds.select(range(n)).to_list()
    _check_fields(task, rows, data_files or task.dataset)
    return rows


def _fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def _check_fields(task: TaskConfig, rows: list[dict], where) -> None:
    """Refuse data without the fields the templates use, and rows without a target (nothing to learn or
    score); a missing prompt field in some rows renders as empty, which optional fields rely on."""
    missing = sorted((_fields(task.prompt) | _fields(task.target)) - rows[0].keys())
    if missing:
        raise LotaError(f"task {task.name}: the data {where} has no field(s) {missing} used by task.prompt / "
                        f"task.target; its fields are {sorted(rows[0])}: set task.prompt / task.target to use them")
    for field in sorted(_fields(task.target)):
        empty = [i for i, row in enumerate(rows) if row.get(field) is None]
        if empty:
            raise LotaError(f"task {task.name}: {len(empty)} row(s) of {where} lack field {field!r} used by "
                            f"task.target, e.g. {str(rows[empty[0]])[:80]}; fix or drop those rows")


def render(template: str, row: dict) -> str:
    return template.format_map({k: "" if v is None else v for k, v in row.items()}).strip()


def prompt_ids(tokenizer, task: TaskConfig, row: dict) -> list[int]:
    """The prompt's token ids, in the chat template when the tokenizer has one and the task wants it."""
    text = render(task.prompt, row)
    if task.use_chat_template and getattr(tokenizer, "chat_template", None):
        ids = tokenizer.apply_chat_template([{"role": "user", "content": text}], add_generation_prompt=True,
                                            tokenize=True, return_dict=False)
        return list(ids)
    ids = tokenizer(text + "\n", add_special_tokens=True)["input_ids"]
    return list(ids)


def encode(tokenizer, task: TaskConfig, rows: list[dict]) -> list[Example]:
    """Token ids of each row: prompt, then target + EOS, cut to task.max_length (keeping some target)."""
    examples = []
    for row in rows:
        prompt = prompt_ids(tokenizer, task, row)
        target = tokenizer(render(task.target, row), add_special_tokens=False)["input_ids"]
        target = list(target) + ([tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else [])
        room = task.max_length - len(prompt)
        if room < 1:
            continue
        examples.append(Example(prompt, target[:room], row))
    if not examples:
        raise LotaError(f"task {task.name}: every prompt is longer than task.max_length={task.max_length}")
    if len(examples) < len(rows):
        log.warning("task %s: %d of %d examples dropped (prompt longer than task.max_length=%d)",
                    task.name, len(rows) - len(examples), len(rows), task.max_length)
    return examples


def collate(examples: list[Example], pad_id: int, with_targets: bool = True) -> dict[str, torch.Tensor]:
    """Right-padded input ids, attention mask, and labels that score only the target tokens."""
    seqs = [e.prompt_ids + (e.target_ids if with_targets else []) for e in examples]
    width = max(map(len, seqs))
    input_ids = torch.full((len(seqs), width), pad_id, dtype=torch.long)
    labels = torch.full((len(seqs), width), IGNORE, dtype=torch.long)
    attention = torch.zeros((len(seqs), width), dtype=torch.long)
    for i, (e, seq) in enumerate(zip(examples, seqs)):
        input_ids[i, :len(seq)] = torch.tensor(seq)
        attention[i, :len(seq)] = 1
        if with_targets:
            labels[i, len(e.prompt_ids):len(seq)] = torch.tensor(e.target_ids)
    return {"input_ids": input_ids, "attention_mask": attention, "labels": labels}


class MicroBatches:
    """An endless, reproducible stream of micro-batches: epoch e visits the data in randperm(seed + e).

    Micro-batch i is a pure function of i, so a resumed run continues exactly where it stopped, and each of
    N processes takes its own contiguous share of the same global micro-batch (sharded, not duplicated).
    """

    def __init__(self, n: int, batch_size: int, seed: int):
        self.n, self.batch_size, self.seed = n, batch_size, seed
        self._epoch, self._perm = -1, None

    def _order(self, epoch: int) -> torch.Tensor:
        if epoch != self._epoch:
            self._epoch = epoch
            self._perm = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed + epoch))
        return self._perm

    def indices(self, i: int) -> list[int]:
        start = i * self.batch_size
        out = []
        for pos in range(start, start + self.batch_size):
            out.append(int(self._order(pos // self.n)[pos % self.n]))
        return out

    @staticmethod
    def shard(indices: list[int], rank: int, world: int) -> list[int]:
        if len(indices) % world:
            raise LotaError(f"train.batch_size={len(indices)} must be divisible by the {world} processes")
        per = len(indices) // world
        return indices[rank * per:(rank + 1) * per]
