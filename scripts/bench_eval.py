"""bench eval: tokens/s of lota's teacher-forced NLL and batched greedy generation (KV cache, left-padded
batches; lota_cli.evaluation) against a plain one-example-at-a-time `generate` loop, on SmolLM2-135M."""

from __future__ import annotations

import json

from bench_common import ROOT, Figure, in_child, log

SHARED = ROOT.parent / "shared" / "data"


def _rows(n: int) -> list[dict]:
    """GSM8K test questions from the shared data when present, else fixed synthetic ones."""
    path = SHARED / "gsm8k" / "test.jsonl"
    if path.is_file():
        with open(path) as f:
            return [json.loads(line) for _, line in zip(range(n), f)]
    return [{"question": f"Tom has {i + 3} apples and buys {2 * i + 5} more. How many apples does he have now?",
             "answer": f"He has {i + 3} + {2 * i + 5} = {3 * i + 8} apples.\n#### {3 * i + 8}"} for i in range(n)]


def speeds(smollm2: str, prompts: int, new_tokens: int, batch: int) -> dict:
    """Child: NLL, batched generation, then the one-at-a-time loop."""
    import time

    import torch

    from lota_cli.config import ModelConfig, TaskConfig
    from datasets import Dataset

    from lota_cli.data import encode, eval_examples
    from lota_cli.evaluation import generate, nll, stop_ids
    from lota_cli.models import load_model

    model, tokenizer = load_model(ModelConfig(path=smollm2))
    model.eval()
    task = TaskConfig(name="gsm8k", dataset=None, prompt="{question}", target="{answer}", cache=False)
    examples = eval_examples(encode(tokenizer, task, Dataset.from_list(_rows(prompts)), "eval"))
    stops = stop_ids(model, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else stops[0]

    def new_count(rows: torch.Tensor) -> int:
        """Tokens generated per row up to and including the first stop token."""
        total = 0
        for row in rows.tolist():
            end = next((i for i, t in enumerate(row) if t in stops), len(row) - 1)
            total += end + 1
        return total

    produced = {"tokens": 0, "ids": []}
    original = model.generate

    def counting(*args, **kwargs):
        out = original(*args, **kwargs)
        width = kwargs["input_ids"].shape[1]
        produced["tokens"] += new_count(out[:, width:])
        return out

    model.generate = counting
    with torch.inference_mode():  # warm-up: first calls allocate
        original(input_ids=torch.tensor([examples[0].prompt_ids]), max_new_tokens=2, do_sample=False,
                 pad_token_id=pad)

    t = time.perf_counter()
    nll(model, examples, batch, pad)
    nll_seconds = time.perf_counter() - t
    nll_tokens = sum(len(e.prompt_ids) + len(e.target_ids) for e in examples)

    def batched():
        produced["tokens"] = 0
        start = time.perf_counter()
        answers = generate(model, tokenizer, examples, batch, new_tokens)
        return answers, produced["tokens"], time.perf_counter() - start

    first, tokens_a, seconds_a = batched()
    produced["tokens"] = 0
    start = time.perf_counter()
    loop_answers = []
    with torch.inference_mode():
        for e in examples:  # the plain loop: one example at a time, KV cache (generate's default)
            out = model.generate(input_ids=torch.tensor([e.prompt_ids]), attention_mask=torch.ones(1, len(e.prompt_ids), dtype=torch.long),
                                 do_sample=False, max_new_tokens=new_tokens, eos_token_id=stops, pad_token_id=pad)
            row = out[0, len(e.prompt_ids):].tolist()
            end = next((i for i, t in enumerate(row) if t in stops), len(row))
            loop_answers.append(tokenizer.decode(row[:end], skip_special_tokens=True))
    loop_seconds, loop_tokens = time.perf_counter() - start, produced["tokens"]
    return {"nll_tokens": nll_tokens, "nll_seconds": nll_seconds,
            "batched_tokens": tokens_a, "batched_seconds": seconds_a,
            "loop_tokens": loop_tokens, "loop_seconds": loop_seconds,
            "same_answers": sum(a == b for a, b in zip(first, loop_answers)), "examples": len(examples),
            "prompt_tokens": sum(len(e.prompt_ids) for e in examples)}


def run(cfg) -> list[Figure]:
    from bench_models import smollm2_dir

    c = cfg.eval
    log(f"eval: {c.prompts} prompts, {c.new_tokens} new tokens, batch {c.batch}")
    r = in_child("bench_eval", "speeds", smollm2=smollm2_dir(cfg), prompts=c.prompts, new_tokens=c.new_tokens,
                 batch=c.batch)
    nll_rate = r["nll_tokens"] / r["nll_seconds"]
    batched_rate = r["batched_tokens"] / r["batched_seconds"]
    loop_rate = r["loop_tokens"] / r["loop_seconds"]
    where = (f"SmolLM2-135M, {r['examples']} GSM8K prompts ({r['prompt_tokens'] / r['examples']:.0f} tokens on "
             f"average), greedy, up to {c.new_tokens} new tokens")
    return [
        Figure("eval", "teacher-forced NLL (batched)", nll_rate, "tokens/s",
               note=f"batch {c.batch}; prompt + answer tokens scored per second"),
        Figure("eval", "batched greedy generation, KV cache", batched_rate, "tokens/s",
               note=f"batch {c.batch}, left-padded; new tokens per second"),
        Figure("eval", "one-at-a-time generate loop", loop_rate, "tokens/s", note=where),
        Figure("eval", "batched / one-at-a-time generation", batched_rate / loop_rate, "x", 1.0, op=">=",
               note=f"same answers in {r['same_answers']} of {r['examples']}"),
        Figure("eval", "NLL / one-at-a-time generation", nll_rate / loop_rate, "x", note="tokens/s ratio"),
    ]
