"""bench part `data`: encoding speed (batched + cached vs one row at a time) and packing's real tokens/s.

Encoding: the shared Alpaca rows (all 5,000) with SmolLM2's tokenizer and chat template, three ways,
alternated over rounds in one process: one row at a time (lota's encoding before it was batched: a chat
template call and two tokenizer calls per row, kept here as the baseline), batched with an empty cache (a
first run: render, tokenize in batches, write the cache), and a second run (read from the cache). Each time
includes load_rows. The token ids of the three are checked equal.

Packing: forward + backward of SmolLM2 on micro-batches of train.batch_size Alpaca examples (max_length
384), one example per row vs packed, alternated; real (non-pad) tokens per second.
"""

from __future__ import annotations

import time
from pathlib import Path

from bench_common import Figure, in_child, log

ALPACA = Path(__file__).resolve().parents[2] / "shared" / "data" / "alpaca" / "alpaca_5000.json"


def _task(**extra):
    from lota_cli.config import TaskConfig

    return TaskConfig(name="alpaca", dataset=None, data_files=str(ALPACA), prompt="{instruction}\n\n{input}",
                      target="{output}", metric="rouge", answer_pattern=None, max_length=384, **extra)


def _one_row_at_a_time(tokenizer, task, rows) -> list[list[int]]:
    """The encoding lota had before batching (data.encode, one row at a time)."""
    from lota_cli.data import render

    out = []
    for row in rows:
        prompt = tokenizer.apply_chat_template([{"role": "user", "content": render(task.prompt, row)}],
                                               add_generation_prompt=True, tokenize=True, return_dict=False)
        target = tokenizer(render(task.target, row), add_special_tokens=False)["input_ids"]
        target = list(target) + [tokenizer.eos_token_id]
        room = task.max_length - len(prompt)
        if room >= 1:
            out.append(list(prompt) + target[:room])
    return out


def encoding(smollm2: str, rounds: int, cache: str) -> dict:
    import os
    import shutil

    from transformers import AutoTokenizer

    from lota_cli.data import encode, load_rows

    tokenizer = AutoTokenizer.from_pretrained(smollm2)
    os.environ["LOTA_CACHE"] = cache
    task = _task()
    times = {"row": [], "first": [], "second": []}
    for _ in range(rounds):
        t0 = time.perf_counter()
        before = _one_row_at_a_time(tokenizer, task, load_rows(task, "train"))
        times["row"].append(time.perf_counter() - t0)
        shutil.rmtree(cache, ignore_errors=True)
        for run in ("first", "second"):
            t0 = time.perf_counter()
            encoded = encode(tokenizer, task, load_rows(task, "train"))
            times[run].append(time.perf_counter() - t0)
            same = [encoded.tokens(i).tolist() for i in range(len(encoded))] == before
    return {"rows": len(before), "times": times, "same_ids": same}


def packing(smollm2: str, batch: int, rounds: int) -> dict:
    from lota_cli.data import collate, train_data
    from lota_cli.config import CalibrateConfig, ModelConfig, TrainConfig
    from lota_cli.models import token_nll_sum
    from lota_cli.models import load_model

    model, tokenizer = load_model(ModelConfig(path=smollm2))
    model.train()
    data = {}
    for packed in (False, True):
        cfg = CalibrateConfig(out="-", model=ModelConfig(path=smollm2), task=_task(packing=packed, cache=False),
                              train=TrainConfig(batch_size=batch))
        data[packed] = train_data(tokenizer, cfg)
    seconds, real, padded = {False: 0.0, True: 0.0}, {False: 0, True: 0}, {False: 0, True: 0}
    for i in range(rounds):
        for packed in (False, True):
            items = data[packed].micro_batch(i)
            inputs = collate(items, tokenizer.pad_token_id, packed)
            t0 = time.perf_counter()
            token_nll_sum(model, inputs).backward()
            seconds[packed] += time.perf_counter() - t0
            model.zero_grad(set_to_none=True)
            real[packed] += sum(len(ids) for item in items for ids, _ in item)
            padded[packed] += inputs["input_ids"].numel()
    return {"seconds": seconds, "real": real, "padded": padded}


def run(cfg) -> list[Figure]:
    from bench_models import smollm2_dir

    if not ALPACA.is_file():
        return [Figure("data", "skipped", f"{ALPACA} not found (../shared/data)")]
    c, smollm2 = cfg.data, smollm2_dir(cfg)
    log(f"data: encoding {c.encode_rounds} rounds")
    e = in_child("bench_data", "encoding", smollm2=smollm2, rounds=c.encode_rounds,
                 cache=str(Path(cfg.out).resolve() / "cache" / "lota-data"))
    row, first, second = (min(e["times"][k]) for k in ("row", "first", "second"))
    log(f"data: packing, {c.rounds} micro-batches of {c.batch} each way")
    p = in_child("bench_data", "packing", smollm2=smollm2, batch=c.batch, rounds=c.rounds, timeout=3600)
    rate = {k: p["real"][k] / p["seconds"][k] for k in ("false", "true")}
    fraction = {k: p["real"][k] / p["padded"][k] for k in ("false", "true")}
    where = f"{e['rows']} Alpaca rows, SmolLM2 tokenizer + chat template, incl. load_rows; best of {c.encode_rounds}"
    return [
        Figure("data", "encode: one row at a time", row, "s", note=where),
        Figure("data", "encode, first run / one row at a time", row / first, "x", 2.0, op=">=",
               note=f"batched, cache written: {first:.2f} s; same token ids: {e['same_ids']}"),
        Figure("data", "encode, second run (cache) / one row at a time", row / second, "x", 5.0, op=">=",
               note=f"{second:.2f} s"),
        Figure("data", "real tokens per batch, unpacked", fraction["false"], "",
               note=f"batch {c.batch}, max_length 384, {c.rounds} micro-batches"),
        Figure("data", "real tokens per batch, packed", fraction["true"], ""),
        Figure("data", "packed / unpacked real tokens/s", rate["true"] / rate["false"], "x", 1.5, op=">=",
               note=f"SmolLM2 forward+backward: {rate['true']:.0f} vs {rate['false']:.0f} real tokens/s"),
    ]
