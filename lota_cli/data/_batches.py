"""What the training loop trains on: items (one example, or several packed into one sequence), grouped into
reproducible global micro-batches, from encoded data (Fixed) or from data read as it is used (Streamed).

Micro-batch i is a pure function of i, so a resumed run continues exactly where it stopped, and each of N
processes takes its own contiguous share of the same global micro-batch (sharded, not duplicated).

Packing (task.packing): examples are packed into sequences of at most task.max_length tokens, best fit
decreasing (so about one sequence's worth of padding per batch is all that is wasted); each example keeps its
own positions 0, 1, ..., and transformers' masks keep attention within an example when position ids restart
and no attention mask is given. Its first token is never scored (it has no predecessor of its own), so the
loss and its normalization equal the unpacked batch's.

Mixtures (task and tasks.*, by their `weight`): a fixed epoch of as many examples as all the tasks hold, each
task's share in proportion to its weight (down- or up-sampled without replacement within a pass over the
task), or for streamed tasks a seeded draw of the task of each next example. A task alone is the mixture of
one: all of its examples, in order.
"""

from __future__ import annotations

import logging
from typing import Iterator

import numpy as np
import torch

from lota_cli import LotaError
from lota_cli.config import TrainStageConfig
from lota_cli.data._encoding import IGNORE, Encoded, encode, encode_stream
from lota_cli.data._rows import load_rows

log = logging.getLogger(__package__)

Item = list  # of (token ids, trained mask) numpy pairs: one example, a pack of them, or a preference pair


def targets(item: Item) -> int:
    """Tokens of the item that carry loss (an example's first token never does: it has no predecessor)."""
    return sum(int(trained[1:].sum()) for _, trained in item)


def collate(items: list[Item], pad_id: int, packed: bool = False) -> dict[str, torch.Tensor]:
    """Right-padded input ids and labels (IGNORE where no loss), and either an attention mask (one example
    per row) or, for packed rows, position ids that restart at each example."""
    width = max(sum(len(ids) for ids, _ in item) for item in items)
    input_ids = torch.full((len(items), width), pad_id, dtype=torch.long)
    labels = torch.full((len(items), width), IGNORE, dtype=torch.long)
    extra = torch.zeros((len(items), width), dtype=torch.long)  # attention mask, or position ids
    for row, item in enumerate(items):
        at = 0
        for ids, trained in item:
            n = len(ids)
            tokens = torch.from_numpy(np.asarray(ids, dtype=np.int64))
            input_ids[row, at:at + n] = tokens
            labels[row, at:at + n] = torch.where(torch.from_numpy(np.asarray(trained, dtype=bool)), tokens, IGNORE)
            labels[row, at] = IGNORE
            if packed:
                extra[row, at:at + n] = torch.arange(n)
            else:
                extra[row, at:at + n] = 1
            at += n
        if packed and at < width:  # padding: a sequence of its own, after every real token
            extra[row, at:] = torch.arange(width - at)
    return {"input_ids": input_ids, "labels": labels, ("position_ids" if packed else "attention_mask"): extra}


class MicroBatches:
    """An endless, reproducible stream of micro-batches of item indices: epoch e visits the items in
    randperm(seed + e)."""

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
        return [int(self._order(pos // self.n)[pos % self.n]) for pos in range(start, start + self.batch_size)]

    @staticmethod
    def shard(indices: list, rank: int, world: int) -> list:
        if len(indices) % world:
            raise LotaError(f"train.batch_size={len(indices)} must be divisible by the {world} processes")
        per = len(indices) // world
        return indices[rank * per:(rank + 1) * per]


def pack(lengths: np.ndarray, max_length: int) -> tuple[np.ndarray, np.ndarray]:
    """Groups of example indices whose lengths sum to at most max_length, as (indices, bounds): group g is
    indices[bounds[g]:bounds[g + 1]]. Best fit decreasing, with open sequences kept by their room left so
    each example finds the fullest one it fits in quickly."""
    if len(lengths) and int(lengths.max()) > max_length:
        raise LotaError(f"an example of {int(lengths.max())} tokens does not fit the packed sequences of "
                        f"task.max_length={max_length}; give every tasks.NAME.max_length at most that")
    order = sorted(range(len(lengths)), key=lambda i: (-int(lengths[i]), i))
    by_room: list[list[int]] = [[] for _ in range(max_length + 1)]  # room left -> open groups
    groups: list[list[int]] = []
    for i in order:
        need = int(lengths[i])
        room = next((r for r in range(need, max_length + 1) if by_room[r]), None)
        if room is None:
            groups.append([])
            g, room = len(groups) - 1, max_length
        else:
            g = by_room[room].pop()
        groups[g].append(i)
        by_room[room - need].append(g)
    bounds = np.concatenate([[0], np.cumsum([len(g) for g in groups])]).astype(np.int64)
    return np.asarray([i for g in groups for i in g], dtype=np.int64), bounds


def mixture_draw(sizes: list[int], weights: list[float], seed: int) -> list[np.ndarray]:
    """Per task, the indices of its examples in one mixed epoch of sum(sizes) examples, the task's share in
    proportion to its weight (largest remainder rounding), drawn without replacement within each pass; a
    share of exactly the task's size is all of it, in order."""
    total, weight_sum = sum(sizes), sum(weights)
    exact = [total * w / weight_sum for w in weights]
    counts = [int(x) for x in exact]
    for k in sorted(range(len(sizes)), key=lambda k: counts[k] - exact[k])[:total - sum(counts)]:
        counts[k] += 1
    draws = []
    for task, (size, count) in enumerate(zip(sizes, counts)):
        if count == size:
            draws.append(np.arange(size))
            continue
        passes = -(-count // size) if count else 0
        rng = [torch.randperm(size, generator=torch.Generator().manual_seed(seed * 1000 + task * 100 + p)).numpy()
               for p in range(passes)]
        draws.append(np.concatenate(rng)[:count] if rng else np.zeros(0, np.int64))
    return draws


class Fixed:
    """Encoded examples (one task's, or a mixture's), as items, in micro-batches."""

    def __init__(self, encoded: Encoded, drawn: np.ndarray, cfg: TrainStageConfig, stats: dict[str, dict],
                 proportions: dict[str, float]):
        """stats: per task in order, what encoding it did (data.counts); proportions: its share of the items."""
        self.encoded, self.packed, self.stats, self.proportions = encoded, cfg.task.packing, stats, proportions
        # a preference task's row is two examples, its chosen and its rejected sequence, drawn as one item
        self.per_row = 2 if cfg.task.format == "preference" else 1
        self.names = list(stats)  # which task an example is of: the one whose range holds it
        self.starts = np.cumsum([0] + [s["examples"] * self.per_row for s in stats.values()])
        if self.packed:  # item j holds examples order[bounds[j]:bounds[j + 1]]
            order, self.bounds = pack(encoded.lengths[drawn], cfg.task.max_length)
            self.order = drawn[order]
        elif self.per_row == 2:
            self.order = np.stack([2 * drawn, 2 * drawn + 1], axis=1).reshape(-1)
            self.bounds = np.arange(0, len(self.order) + 1, 2)
        else:
            self.order, self.bounds = drawn, np.arange(len(drawn) + 1)
        self.n = len(self.bounds) - 1
        self._batches = MicroBatches(self.n, cfg.train.batch_size, cfg.train.seed)

    def task_of(self, example: int) -> str:
        return self.names[int(np.searchsorted(self.starts, example, side="right")) - 1]

    def group(self, j: int) -> np.ndarray:
        return self.order[self.bounds[j]:self.bounds[j + 1]]

    def item(self, j: int) -> Item:
        return [self.encoded.example(i) for i in self.group(j)]

    def micro_indices(self, i: int) -> list[int]:
        """The items of micro-batch i."""
        return self._batches.indices(i)

    def micro_batch(self, i: int) -> list[Item]:
        return [self.item(j) for j in self._batches.indices(i)]

    def first_examples(self, n: int) -> list[tuple[int, int]]:
        """(item, example) of the first n examples in training order (at most one epoch's)."""
        out, i = [], 0
        while len(out) < min(n, len(self.encoded)):
            out += [(j, int(x)) for j in self._batches.indices(i) for x in self.group(j)]
            i += 1
        return out[:n]

    def real_tokens(self) -> tuple[int, int]:
        """(tokens of the examples, tokens of the padded batches they are trained in) over one epoch of
        micro-batches of train.batch_size: what packing saves (a pair's two sequences are two rows)."""
        lengths = self.encoded.lengths[self.order]
        if self.per_row == 2:
            per_item = lengths.reshape(-1, 2)
        else:
            per_item = np.add.reduceat(lengths, self.bounds[:-1])[:, None]
        real = padded = 0
        for i in range(-(-self.n // self._batches.batch_size)):
            chunk = per_item[self._batches.indices(i)]
            real, padded = real + int(chunk.sum()), padded + int(chunk.max()) * chunk.size
        return real, padded


class Streamed:
    """Items of tasks read as they are used (task.streaming), in order: micro-batch i is items
    [i*batch_size, (i+1)*batch_size) of the stream, so resuming replays the stream up to there (exact: the
    stream is a function of the seeds)."""

    def __init__(self, tokenizer, cfg: TrainStageConfig):
        self.tokenizer, self.cfg, self.packed = tokenizer, cfg, cfg.task.packing
        self.tasks = cfg.mixture_tasks()
        self.n, self.proportions = None, None
        self._items, self._position = None, 0

    def _stream(self) -> Iterator[Item]:
        sources = [encode_stream(self.tokenizer, task) for task, _ in self.tasks]
        weights = np.array([w for _, w in self.tasks], dtype=np.float64)
        rng = np.random.default_rng(self.cfg.train.seed)
        draw = (lambda: 0) if len(sources) == 1 else (lambda: int(rng.choice(len(sources), p=weights / weights.sum())))
        if not self.packed:
            while True:
                yield [next(sources[draw()])]
        pack_, used = [], 0
        while True:
            ids, trained = next(sources[draw()])
            if used + len(ids) > self.cfg.task.max_length and pack_:
                yield pack_
                pack_, used = [], 0
            pack_.append((ids, trained))
            used += len(ids)

    def micro_indices(self, i: int) -> list[int]:
        """The items of micro-batch i: their places in the stream."""
        bs = self.cfg.train.batch_size
        return list(range(i * bs, (i + 1) * bs))

    def micro_batch(self, i: int) -> list[Item]:
        bs = self.cfg.train.batch_size
        start = i * bs
        if self._items is None or start < self._position:
            self._items, self._position = self._stream(), 0
        while self._position < start:
            next(self._items)
            self._position += 1
        batch = [next(self._items) for _ in range(bs)]
        self._position += bs
        return batch


def train_data(tokenizer, cfg: TrainStageConfig):
    """The training data of a stage: its task, or its mixture, encoded or streamed."""
    tasks = cfg.mixture_tasks()
    if any(task.streaming for task, _ in tasks):
        return Streamed(tokenizer, cfg)
    parts = [encode(tokenizer, task, load_rows(task, "train")) for task, _ in tasks]
    rows = [p.stats["examples"] for p in parts]  # what is drawn: an example, or a pair (two examples)
    draws = mixture_draw(rows, [w for _, w in tasks], cfg.train.seed)
    starts = np.cumsum([0] + rows)
    drawn = np.concatenate([d + s for d, s in zip(draws, starts)])
    proportions = {task.name: len(d) / len(drawn) for (task, _), d in zip(tasks, draws)}
    if len(tasks) > 1:
        log.info("mixture: %s", ", ".join(f"{name} {share:.3f}" for name, share in proportions.items()))
    stats = {task.name: p.stats for (task, _), p in zip(tasks, parts)}
    return Fixed(Encoded.join(parts), drawn, cfg, stats, proportions)
