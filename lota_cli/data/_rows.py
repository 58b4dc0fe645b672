"""Task rows: loaded from local files or the hub (or streamed), shuffled and split by the task's settings,
checked to hold the fields the task reads, and rendered by its templates."""

from __future__ import annotations

import string
from pathlib import Path

import numpy as np

from lota_cli import LotaError, first_line
from lota_cli.config import TaskConfig

_LOADERS = {".json": "json", ".jsonl": "json", ".parquet": "parquet", ".csv": "csv"}


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


def rows_source(task: TaskConfig, purpose: str):
    """(split, data_files, config key) the rows come from; with task.holdout and no eval files, evaluation
    reads the training data."""
    if purpose == "train" or (task.holdout > 0 and not task.eval_data_files):
        return task.split, task.data_files, "task.data_files"
    return task.eval_split, task.eval_data_files, "task.eval_data_files"


def _load(task: TaskConfig, purpose: str, streaming: bool):
    import datasets

    split, data_files, key = rows_source(task, purpose)
    try:
        if data_files:
            files = _files(data_files, key)
            kind = _LOADERS.get(Path(files[0]).suffix)
            if kind is None:
                raise LotaError(f"{files[0]}: unsupported data file type; use one of {', '.join(_LOADERS)}")
            return datasets.load_dataset(kind, data_files=files, split="train", streaming=streaming)
        if task.dataset:
            return datasets.load_dataset(task.dataset, task.dataset_config, split=split, streaming=streaming)
        raise LotaError(f"task {task.name}: set task.dataset (a hub id) or task.data_files (local files)")
    except LotaError:
        raise
    except Exception as err:  # datasets raises many types for unreadable or unreachable data
        where = data_files or f"{task.dataset} ({task.dataset_config}, split {split})"
        if "corresponds to no data" in str(err):  # e.g. a JSON file holding []
            raise LotaError(f"task {task.name}: the data set {where} has no examples; give data with at least "
                            "one example") from None
        hint = "check that the file is valid " + Path(files[0]).suffix[1:] if data_files else "check the name"
        raise LotaError(f"cannot load task {task.name} data from {where}: {first_line(err)}; {hint}") from err


def load_rows(task: TaskConfig, purpose: str = "train", limit: int | None = None):
    """Rows for training or evaluation (a datasets.Dataset, memory-mapped by datasets' cache): from local
    files when given, else from the hub data set, shuffled by task.shuffle_seed.

    With `task.holdout` > 0 and no separate eval files, evaluation reads the training data too, and its
    last `task.holdout` rows (after the seeded shuffle) are evaluation's alone. `limit`: at most that many.
    """
    ds = _load(task, purpose, streaming=False)
    where = rows_source(task, purpose)[1] or task.dataset
    if len(ds) == 0:
        raise LotaError(f"task {task.name}: the data set {where} has no examples; give data with at least "
                        "one example")
    ds = ds.shuffle(seed=task.shuffle_seed)
    if task.holdout > 0 and not task.eval_data_files:
        if task.holdout >= len(ds):
            raise LotaError(f"task {task.name}: task.holdout={task.holdout} leaves no training rows of {len(ds)}")
        keep = range(len(ds) - task.holdout) if purpose == "train" else range(len(ds) - task.holdout, len(ds))
        ds = ds.select(keep)
    n = len(ds)
    if purpose == "train" and task.fraction < 1.0:  # evaluation has its own limit, eval.max_examples
        n = max(1, int(n * task.fraction))
    for cap in (task.max_examples if purpose == "train" else None, limit):
        n = min(n, cap) if cap else n
    ds = ds.select(range(n)) if n < len(ds) else ds
    check_fields(task, ds.column_names, where)
    _check_targets(task, ds, where)
    return ds


def stream_rows(task: TaskConfig, epoch: int):
    """The training rows as a datasets.IterableDataset (task.streaming): read as they are used, shuffled in
    a buffer by task.shuffle_seed and the epoch."""
    ds = _load(task, "train", streaming=True)
    ds = ds.shuffle(seed=task.shuffle_seed, buffer_size=task.shuffle_buffer)
    ds.set_epoch(epoch)
    return ds


def original_indices(ds) -> np.ndarray | None:
    """Each row's place in the data set's files, for a shuffled or selected Dataset (None: in file order)."""
    indices = getattr(ds, "_indices", None)
    return None if indices is None else indices.column(0).to_numpy()


def template_fields(template: str) -> set[str]:
    return {f for _, f, _, _ in string.Formatter().parse(template) if f}


def check_fields(task: TaskConfig, columns, where) -> None:
    """Refuse data without the fields the task reads (what it would train on)."""
    if task.format == "preference":
        missing = [f for f in (task.chosen_field, task.rejected_field) if f not in columns]
        if missing:
            raise LotaError(f"task {task.name}: the data {where} has no field(s) {missing} (task.chosen_field / "
                            f"task.rejected_field); its fields are {sorted(columns)}")
        return
    if task.format == "messages":
        if task.messages_field not in columns:
            raise LotaError(f"task {task.name}: the data {where} has no field {task.messages_field!r} "
                            f"(task.messages_field); its fields are {sorted(columns)}: ShareGPT data needs "
                            "task.messages_field=conversations task.role_field=from task.content_field=value")
        return
    missing = sorted((template_fields(task.prompt) | template_fields(task.target)) - set(columns))
    if missing:
        raise LotaError(f"task {task.name}: the data {where} has no field(s) {missing} used by task.prompt / "
                        f"task.target; its fields are {sorted(columns)}: set task.prompt / task.target to use them")


def _check_targets(task: TaskConfig, ds, where) -> None:
    """Refuse rows without a target (nothing to learn or score), from the Arrow columns' null bitmaps; a
    missing prompt field renders as empty, which optional fields rely on."""
    if task.format != "text":
        return
    for name in sorted(template_fields(task.target)):
        nulls = ds.data.column(name).is_null().to_numpy(zero_copy_only=False)
        if (original := original_indices(ds)) is not None:  # shuffled / selected: the rows in use
            nulls = nulls[original]
        if nulls.any():
            example = ds[int(nulls.argmax())]
            raise LotaError(f"task {task.name}: {int(nulls.sum())} row(s) of {where} lack field {name!r} used by "
                            f"task.target, e.g. {str(example)[:80]}; fix or drop those rows")


def render(template: str, row: dict) -> str:
    return template.format_map({k: "" if v is None else v for k, v in row.items()}).strip()
