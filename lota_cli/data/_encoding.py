"""Encoding: rows rendered (prompt/target templates, or chat conversations through the tokenizer's chat
template) and tokenized in batches, into flat arrays (Encoded), from the cache when they were encoded before.

Encoded examples are never per-row Python objects: example i is ids[offsets[i]:offsets[i+1]], `trained`
marks the tokens that carry loss, and `answer[i]` is where its final answer starts (what evaluation scores
and generates).
"""

from __future__ import annotations

import json
import logging
import os
from dataclasses import dataclass, field
from pathlib import Path
from typing import Iterator

import numpy as np

from lota_cli import LotaError
from lota_cli.config import TaskConfig
from lota_cli.data._cache import cache_path, load, store
from lota_cli.data._rows import check_fields, original_indices, render, rows_source, stream_rows, template_fields

log = logging.getLogger(__package__)
IGNORE = -100  # label of tokens that carry no loss (prompt, padding)
ROLES = {"user": "user", "human": "user", "assistant": "assistant", "gpt": "assistant", "bot": "assistant",
         "model": "assistant", "system": "system", "tool": "tool"}
_CHUNK = 1000  # rows rendered and tokenized together


@dataclass
class Encoded:
    """Token ids of n examples in flat arrays; `references` (evaluation only): each final answer's text."""

    ids: np.ndarray  # int32, all examples' tokens one after another
    trained: np.ndarray  # bool, per token: it carries loss
    offsets: np.ndarray  # int64 [n + 1]
    answer: np.ndarray  # int32 [n], where each example's final answer starts (relative)
    references: list[str] | None = None
    stats: dict = field(default_factory=dict)

    def __len__(self) -> int:
        return len(self.offsets) - 1

    def tokens(self, i: int) -> np.ndarray:
        return self.ids[self.offsets[i]:self.offsets[i + 1]]

    def trained_mask(self, i: int) -> np.ndarray:
        return self.trained[self.offsets[i]:self.offsets[i + 1]]

    def example(self, i: int) -> tuple[np.ndarray, np.ndarray]:
        """(token ids, trained mask) of example i: what collate (data._batches) takes."""
        return self.tokens(i), self.trained_mask(i)

    @property
    def lengths(self) -> np.ndarray:
        return np.diff(self.offsets)

    @staticmethod
    def join(parts: list["Encoded"]) -> "Encoded":
        """One Encoded of several (chunks of one task, or a mixture's tasks), examples in order, their
        encoding counts summed."""
        if len(parts) == 1:
            return parts[0]
        offsets, total = [np.zeros(1, np.int64)], 0
        for part in parts:
            offsets.append(part.offsets[1:] + total)
            total += int(part.offsets[-1])
        keep = all(p.references is not None for p in parts)
        references = [r for p in parts for r in p.references] if keep else None
        return Encoded(np.concatenate([p.ids for p in parts]), np.concatenate([p.trained for p in parts]),
                       np.concatenate(offsets), np.concatenate([p.answer for p in parts]), references,
                       _sum_counts([p.stats for p in parts]))


@dataclass
class Example:
    """One evaluation example: the prompt (with any earlier turns) and the final answer's tokens."""

    prompt_ids: list[int]
    target_ids: list[int]


def eval_examples(encoded: Encoded) -> list[Example]:
    out = []
    for i in range(len(encoded)):
        tokens, answer = encoded.tokens(i), int(encoded.answer[i])
        out.append(Example(tokens[:answer].tolist(), tokens[answer:].tolist()))
    return out


def chat_template(tokenizer, task: TaskConfig) -> str | None:
    """The template conversations are rendered with: task.chat_template (the template or a file holding it),
    else the tokenizer's."""
    given = task.chat_template
    if given and "{" not in given:
        path = Path(given).expanduser()
        if not path.is_file():
            raise LotaError(f"task.chat_template={given}: no such file; give a Jinja template or a file holding one")
        return path.read_text()
    return given or getattr(tokenizer, "chat_template", None)


class _Encoder:
    """Renders and tokenizes chunks of rows for one task; counts what truncation did."""

    def __init__(self, tokenizer, task: TaskConfig, purpose: str, rows=None):
        self.tok, self.task, self.purpose = tokenizer, task, purpose
        # to name a bad row by its place in the data, not in the shuffled order
        self.where = rows_source(task, purpose)[1] or task.dataset
        self.original = original_indices(rows)
        self.target_fields = template_fields(task.target)
        self.template = (chat_template(tokenizer, task)
                         if task.format in ("messages", "preference") or task.use_chat_template else None)
        if task.format == "messages" and not self.template:
            raise LotaError(f"task {task.name}: task.format=messages renders conversations with a chat template, "
                            "and the tokenizer has none; set task.chat_template=FILE.jinja (or the template text)")
        if task.format == "messages" and not getattr(tokenizer, "is_fast", False):
            raise LotaError(f"task {task.name}: task.format=messages needs a fast tokenizer (token offsets); "
                            f"{type(tokenizer).__name__} is not")
        self.eos = [tokenizer.eos_token_id] if tokenizer.eos_token_id is not None else []
        self.special = set(tokenizer.all_special_ids)
        self.row = 0  # the chunk's first row, to name a bad one

    def _row(self, i: int) -> str:
        position = self.row + i
        index = int(self.original[position]) if self.original is not None else position
        return f"task {self.task.name}: row {index} of {self.where}"

    def _chat(self, conversations: list[list[dict]], generation_prompt: bool) -> list[str]:
        return self.tok.apply_chat_template(conversations, chat_template=self.template, tokenize=False,
                                            add_generation_prompt=generation_prompt)

    def encode(self, rows: dict[str, list]) -> list[tuple | None]:
        """Per row: (ids, trained, answer start, reference, what truncation did: "" | "truncated" |
        "turns_dropped"), or None when it is dropped."""
        n = len(next(iter(rows.values()))) if rows else 0
        if self.row == 0:  # streamed rows are first seen here
            check_fields(self.task, rows.keys(), self.where)
        encode_rows = {"messages": self._messages, "preference": self._pairs}.get(self.task.format, self._text)
        out = encode_rows(rows, n)
        self.row += n
        return out

    def _text(self, rows: dict[str, list], n: int):
        task, tok = self.task, self.tok
        records = [{k: v[i] for k, v in rows.items()} for i in range(n)]
        targets = [render(task.target, r) for r in records]
        for i, r in enumerate(records):  # (load_rows checked its rows; streamed ones are checked here)
            if any(r.get(f) is None for f in self.target_fields):
                raise LotaError(f"{self._row(i)} lacks a field used by task.target ({task.target!r}): "
                                f"{str(r)[:80]}; fix or drop that row")
        prompts = [render(task.prompt, r) for r in records]
        if self.template:
            texts = self._chat([[{"role": "user", "content": p}] for p in prompts], True)
            prompt_ids = tok(texts, add_special_tokens=False)["input_ids"]
        else:
            prompt_ids = tok([p + "\n" for p in prompts], add_special_tokens=True)["input_ids"]
        target_ids = tok(targets, add_special_tokens=False)["input_ids"]
        out = []
        for prompt, target, reference in zip(prompt_ids, target_ids, targets):
            target = list(target) + self.eos
            room = task.max_length - len(prompt)
            if room < 1 or (task.truncation == "drop" and len(target) > room):
                out.append(None)
                continue
            ids = list(prompt) + target[:room]
            trained = [task.train_on == "all"] * len(prompt) + [True] * min(room, len(target))
            out.append((ids, trained, len(prompt), reference, "truncated" if len(target) > room else ""))
        return out

    def _turns(self, value, i: int, field: str | None = None, need_assistant: bool = True) -> list[dict]:
        """A row's turns (its conversation, or a preference pair's prompt or completion; `field` names it) as
        [{"role", "content"}] with roles mapped."""
        task = self.task
        field = field or task.messages_field
        if not isinstance(value, list) or not value:
            raise LotaError(f"{self._row(i)}: {field!r} is {type(value).__name__} {str(value)[:60]!r}, not "
                            "a list of turns; fix that row")
        turns = []
        for turn in value:
            if not isinstance(turn, dict) or task.role_field not in turn or task.content_field not in turn:
                raise LotaError(f"{self._row(i)}: turn {str(turn)[:80]!r} lacks {task.role_field!r} / "
                                f"{task.content_field!r} (task.role_field / task.content_field)")
            role = ROLES.get(str(turn[task.role_field]).lower())
            if role is None:
                raise LotaError(f"{self._row(i)}: unknown role {turn[task.role_field]!r}; known: {', '.join(ROLES)}")
            turns.append({"role": role, "content": "" if turn[task.content_field] is None
                          else str(turn[task.content_field])})
        if need_assistant and not any(t["role"] == "assistant" for t in turns):
            raise LotaError(f"{self._row(i)}: the conversation has no assistant turn, so nothing to train on; drop it")
        return turns

    def _with_system(self, turns: list[dict]) -> list[dict]:
        """The turns with task.system_prompt first, where it is set and they start with no system turn."""
        if self.task.system_prompt and turns[0]["role"] != "system":
            return [{"role": "system", "content": self.task.system_prompt}, *turns]
        return turns

    def _pairs(self, rows: dict[str, list], n: int):
        """Preference rows in TRL's layouts, tokenized as TRL tokenizes them: standard (strings: the prompt, and
        the prompt followed by each completion and the end-of-sequence text) or conversational (lists of turns
        through the chat template: the prompt with the generation prompt, and the prompt followed by each
        completion's turns; no prompt field: the turns chosen and rejected share). Each completion starts where
        the tokenized prompt and the tokenized whole first differ. A pair longer than task.max_length loses the
        start of its prompt (both completions the same tokens), never a completion token; one that does not fit
        even so is refused, or with task.truncation=drop left out (counted)."""
        task, tok = self.task, self.tok
        eos = tok.eos_token or ""
        texts, special = [], []
        for i in range(n):
            prompt = rows[task.prompt_field][i] if task.prompt_field in rows else None
            chosen, rejected = rows[task.chosen_field][i], rows[task.rejected_field][i]
            for key, value in ((task.chosen_field, chosen), (task.rejected_field, rejected)):
                if value is None or value == "" or (isinstance(value, list) and not any(
                        isinstance(turn, dict) and turn.get(task.content_field) for turn in value)):
                    raise LotaError(f"{self._row(i)}: {key!r} is empty; a pair needs two completions, drop that row")
            if isinstance(chosen, str) and isinstance(rejected, str) and isinstance(prompt, (str, type(None))):
                prompt = prompt or ""
                texts.append([prompt] + [prompt + c + ("" if c.endswith(eos) else eos) for c in (chosen, rejected)])
                special.append(True)
                continue
            if not (isinstance(chosen, list) and isinstance(rejected, list)):
                raise LotaError(f"{self._row(i)}: {task.chosen_field!r} and {task.rejected_field!r} are "
                                f"{type(chosen).__name__} and {type(rejected).__name__}: give both as strings "
                                "(with a string prompt) or both as lists of turns")
            if not self.template:
                raise LotaError(f"task {task.name}: conversational pairs are rendered with a chat template, and the "
                                "tokenizer has none; set task.chat_template=FILE.jinja (or the template text)")
            chosen_turns = self._turns(chosen, i, task.chosen_field, need_assistant=False)
            rejected_turns = self._turns(rejected, i, task.rejected_field, need_assistant=False)
            if prompt is None:  # the implicit prompt: the turns both completions start with
                shared = 0
                while (shared < min(len(chosen_turns), len(rejected_turns)) - 1
                       and chosen_turns[shared] == rejected_turns[shared]):
                    shared += 1
                prompt_turns = chosen_turns[:shared]
                chosen_turns, rejected_turns = chosen_turns[shared:], rejected_turns[shared:]
                if not prompt_turns:
                    raise LotaError(f"{self._row(i)}: no {task.prompt_field!r} field and the two conversations share "
                                    "no turn to take as the prompt; give the prompt (task.prompt_field)")
            elif isinstance(prompt, list):
                prompt_turns = self._turns(prompt, i, task.prompt_field, need_assistant=False)
            else:
                raise LotaError(f"{self._row(i)}: {task.prompt_field!r} is {type(prompt).__name__}, while the "
                                "completions are lists of turns; give the prompt as a list of turns too")
            prompt_turns = self._with_system(prompt_turns)
            texts.append(self._chat([prompt_turns], True)
                         + self._chat([prompt_turns + chosen_turns, prompt_turns + rejected_turns], False))
            special.append(False)
        # tokenized in two batches: strings with the tokenizer's special tokens, rendered conversations without
        by_kind = {kind: [text for row, k in zip(texts, special) if k == kind for text in row] for kind in set(special)}
        tokenized = {kind: iter(tok(batch, add_special_tokens=kind)["input_ids"]) for kind, batch in by_kind.items()}
        out = []
        for i, (row_texts, kind) in enumerate(zip(texts, special)):
            prompt_ids, *whole = (next(tokenized[kind]) for _ in range(3))
            start = min(_shared_prefix(prompt_ids, ids) for ids in whole)
            if any(len(ids) == start for ids in whole):
                raise LotaError(f"{self._row(i)}: a completion tokenizes to nothing after the prompt; drop that row")
            over = max(len(ids) for ids in whole) - task.max_length
            if over >= start:  # the completion's first token needs one before it
                if task.truncation == "drop":
                    out.append(None)
                    continue
                raise LotaError(f"{self._row(i)}: the pair needs {max(len(ids) for ids in whole) - start + 1} "
                                f"tokens with one of its prompt, more than task.max_length={task.max_length}; "
                                "raise task.max_length, or set task.truncation=drop to leave such pairs out")
            cut = max(over, 0)
            pair = [list(ids[cut:]) for ids in whole]
            trained = [[False] * (start - cut) + [True] * (len(ids) - start) for ids in whole]
            out.append((pair, trained, start - cut, row_texts[1][len(row_texts[0]):], "truncated" if cut else ""))
        return out

    def _messages(self, rows: dict[str, list], n: int):
        """Render each whole conversation once, find each assistant turn's content in the text (each turn
        starts where the conversation before it, with the generation prompt, renders to), and train the tokens
        of those contents and the end-of-turn token after each."""
        task = self.task
        conversations = [self._with_system(self._turns(v, i)) for i, v in enumerate(rows[task.messages_field])]
        texts = self._chat(conversations, False)
        spans_per_row = []
        for i, (turns, text) in enumerate(zip(conversations, texts)):
            assistant = [k for k, t in enumerate(turns) if t["role"] == "assistant"]
            prefixes = self._chat([turns[:k] for k in assistant], True)
            spans = []
            for k, prefix in zip(assistant, prefixes):
                if not text.startswith(prefix):
                    raise LotaError(f"{self._row(i)}: the chat template renders the conversation differently "
                                    "from its beginning (it rewrites earlier turns), so assistant turns cannot be "
                                    "located; give another task.chat_template")
                content = turns[k]["content"]
                start = text.find(content, len(prefix)) if content else len(prefix)
                if start < 0:
                    raise LotaError(f"{self._row(i)}: the chat template changes an assistant turn's text (it "
                                    "is not in the rendered conversation); give another task.chat_template")
                spans.append((len(prefix), start, start + len(content)))
            spans_per_row.append(spans)
        encoded = self.tok(texts, add_special_tokens=False, return_offsets_mapping=True)
        return [self._fit(ids, offsets, spans, turns)
                for ids, offsets, spans, turns in zip(encoded["input_ids"], encoded["offset_mapping"],
                                                      spans_per_row, conversations)]

    def _fit(self, ids, offsets, spans, turns):
        """Trained tokens of one conversation and the whole turns of it that fit task.max_length."""
        task = self.task
        starts = np.array([s for s, _ in offsets])
        ends = np.array([e for _, e in offsets])
        turns_tokens = []  # per assistant turn: (first content token, end (exclusive) incl. the end-of-turn token)
        for _, c0, c1 in spans:
            first = int(np.searchsorted(ends, c0, side="right"))  # first token ending after the content starts
            last = int(np.searchsorted(starts, c1, side="left"))  # first token starting at or after its end
            if last < len(ids) and ids[last] in self.special:
                last += 1
            turns_tokens.append((first, last))
        contents = [t["content"] for t in turns if t["role"] == "assistant"]
        fits = [k for k, (_, end) in enumerate(turns_tokens) if end <= task.max_length]
        if fits:
            keep, length = fits[-1], turns_tokens[fits[-1]][1]
            note = "turns_dropped" if keep < len(turns_tokens) - 1 else ""
            if task.truncation == "drop" and note:
                return None
        elif task.truncation == "turns" and turns_tokens[0][0] < task.max_length:
            keep, length, note = 0, task.max_length, "truncated"  # the first answer alone is too long: cut it
        else:
            return None
        trained = [task.train_on == "all"] * length
        chosen = range(keep + 1) if task.train_on == "assistant" else [keep] if task.train_on == "last" else []
        for k in chosen:
            first, end = turns_tokens[k]
            trained[first:min(end, length)] = [True] * (min(end, length) - first)
        return list(ids[:length]), trained, turns_tokens[keep][0], contents[keep], note


def _shared_prefix(a: list[int], b: list[int]) -> int:
    """How many leading tokens a and b have in common."""
    n = 0
    while n < min(len(a), len(b)) and a[n] == b[n]:
        n += 1
    return n


def _num_proc(task: TaskConfig, n: int) -> int:
    """task.num_proc, or one process per 50,000 rows up to the CPU count."""
    if task.num_proc:
        return task.num_proc
    return max(1, min(os.cpu_count() or 1, n // 50_000))


def counts(results: list) -> dict[str, int]:
    """What truncation did to encoded rows (an _Encoder's results)."""
    notes = [r[4] if r is not None else "dropped" for r in results]
    return {"rows": len(results), "examples": sum(r is not None for r in results), "dropped": notes.count("dropped"),
            "truncated": notes.count("truncated"), "turns_dropped": notes.count("turns_dropped")}


def _sum_counts(many: list[dict[str, int]]) -> dict[str, int]:
    return {k: sum(c.get(k, 0) for c in many) for k in many[0]} if many and many[0] else {}


def _arrays(results: list, keep_references: bool, paired: bool = False) -> Encoded:
    """One chunk's results as an Encoded (so no per-row Python objects outlive their chunk); a pair's two
    sequences (chosen, rejected) are two examples, one after the other."""
    kept = [r for r in results if r is not None]
    if paired:
        kept = [(ids, trained, r[2], r[3]) for r in kept for ids, trained in zip(r[0], r[1])]
    lengths = [len(r[0]) for r in kept]
    offsets = np.concatenate([[0], np.cumsum(lengths, dtype=np.int64)]).astype(np.int64)
    flat = [t for r in kept for t in r[0]]
    mask = [m for r in kept for m in r[1]]
    return Encoded(np.asarray(flat, np.int32), np.asarray(mask, bool), offsets,
                   np.asarray([r[2] for r in kept], np.int32), [r[3] for r in kept] if keep_references else None,
                   counts(results))


def _chunks(encoder: _Encoder, rows, procs: int):
    """The rows' results chunk by chunk: here, or in datasets' worker processes (each encoding contiguous
    chunks into an Arrow column, read back a chunk at a time)."""
    if procs <= 1:
        for start in range(0, len(rows), _CHUNK):
            yield encoder.encode(rows[start:start + _CHUNK])
        return

    def columns(batch, indices):
        encoder.row = indices[0]
        return {"_item": [json.dumps(g) if g is not None else "" for g in encoder.encode(batch)]}

    mapped = rows.map(columns, batched=True, with_indices=True, batch_size=_CHUNK, num_proc=procs,
                      remove_columns=rows.column_names, load_from_cache_file=False,
                      desc=f"encoding {encoder.task.name}")
    for start in range(0, len(mapped), _CHUNK):
        yield [json.loads(s) if s else None for s in mapped[start:start + _CHUNK]["_item"]]


def _encode_rows(tokenizer, task: TaskConfig, rows, purpose: str) -> Encoded:
    encoder = _Encoder(tokenizer, task, purpose, rows)
    keep, paired = purpose == "eval", task.format == "preference"  # evaluation scores against the references
    encoded = Encoded.join([_arrays(results, keep, paired)
                            for results in _chunks(encoder, rows, _num_proc(task, len(rows)))])
    if not len(encoded):
        raise LotaError(f"task {task.name}: no example fits task.max_length={task.max_length} "
                        "(every prompt is longer); raise it")
    return encoded


def encode(tokenizer, task: TaskConfig, rows, purpose: str = "train") -> Encoded:
    """Token ids of the rows (load_rows's), from the cache when the same tokenizer, task settings and rows
    were encoded before (task.cache); drops and truncations are logged."""
    path = cache_path(tokenizer, task, purpose, rows) if task.cache else None
    arrays = load(path) if path is not None else None
    if arrays is not None:
        extra = json.loads(str(arrays["extra"]))
        encoded = Encoded(arrays["ids"], arrays["trained"], arrays["offsets"], arrays["answer"], extra["references"],
                          extra["stats"])
        log.info("task %s: %d examples from the cache %s", task.name, len(encoded), path)
    else:
        encoded = _encode_rows(tokenizer, task, rows, purpose)
        if path is not None:
            store(path, ids=encoded.ids, trained=encoded.trained, offsets=encoded.offsets, answer=encoded.answer,
                  extra=np.array(json.dumps({"references": encoded.references, "stats": encoded.stats})))
    report(task, encoded.stats)
    return encoded


def encode_stream(tokenizer, task: TaskConfig) -> Iterator[tuple[np.ndarray, np.ndarray]]:
    """The task's training examples (token ids, trained mask) as the rows are read (task.streaming), pass after
    pass, each pass reshuffled; what truncation did is reported after the first."""
    epoch = 0
    while True:
        encoder, seen = _Encoder(tokenizer, task, "train"), []
        for rows in stream_rows(task, epoch).iter(batch_size=256):
            results = encoder.encode(rows)
            seen.append(counts(results))
            for got in results:
                if got is not None:
                    yield np.asarray(got[0], np.int32), np.asarray(got[1], bool)
        total = _sum_counts(seen)
        if not total.get("examples"):
            raise LotaError(f"task {task.name}: the stream holds no example that fits task.max_length")
        if epoch == 0:
            report(task, total)
        epoch += 1


def report(task: TaskConfig, stats: dict) -> None:
    """Say what truncation did (a warning: it changes what trains)."""
    pairs = task.format == "preference"
    if stats.get("dropped"):
        log.warning("task %s: %d of %d %s dropped (longer than task.max_length=%d with task.truncation=%s)",
                    task.name, stats["dropped"], stats["rows"], "pairs" if pairs else "examples", task.max_length,
                    task.truncation)
    if stats.get("truncated"):
        log.warning("task %s: %d %s to fit task.max_length=%d", task.name, stats["truncated"],
                    "pairs' prompts cut at their start" if pairs else "examples' answers cut", task.max_length)
    if stats.get("turns_dropped"):
        log.warning("task %s: %d conversations lost their last turns to fit task.max_length=%d (whole turns "
                    "kept)", task.name, stats["turns_dropped"], task.max_length)
