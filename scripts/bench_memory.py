"""bench memory: what one training step of LoTA costs against FFT where weights dominate memory (a random
8-layer Llama with 226M selected weights, short sequences), each in a fresh process: peak RSS in float32 and
bfloat16, bytes autograd saves for backward, and `lota sparse-train` against a forward-only `lota eval` of the
same model through the CLI."""

from __future__ import annotations

import json
import sys
from pathlib import Path

from bench_common import Figure, in_child, log


def _word_tokenizer(texts: list[str]):
    """A word-level tokenizer of `texts` (a few hundred ids, within the LARGE model's vocabulary)."""
    from tokenizers import Tokenizer, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    words = sorted({w for t in texts for w, _ in pre_tokenizers.Whitespace().pre_tokenize_str(t)})
    vocab = {w: i for i, w in enumerate(["<pad>", "<unk>", "</s>", *words])}
    tok = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    return PreTrainedTokenizerFast(tokenizer_object=tok, pad_token="<pad>", unk_token="<unk>", eos_token="</s>")


def save_large(directory: str) -> dict:
    """Child: the LARGE Llama (float32) as a HF directory with a word-level tokenizer of the rows it trains on,
    a random mask of it at sparsity 0.9 (the artifact lota extract would write), and those rows."""
    import torch

    from bench_models import load
    from lota_cli.artifacts import save_sparse, stage_meta
    from lota_cli.config import ParamsConfig
    from lota_cli.tensors import encode_positions, pack_bits
    from lota_cli.ops import k_for
    from lota_cli.models import fingerprint, save_model, select_params

    rows = Path(directory) / "rows.jsonl"
    rows.parent.mkdir(parents=True, exist_ok=True)
    words = "the train leaves the station at noon and arrives after three hours of travel".split()
    with open(rows, "w") as f:
        for i in range(8):  # 110 words of question, 6 of answer: about 120 tokens
            question = " ".join(words[(i + j) % len(words)] for j in range(110))
            f.write(json.dumps({"question": question, "answer": f"It takes {i + 3} hours . #### {i + 3}"}) + "\n")
    model, _ = load("large", None, "float32")
    texts = [" ".join(json.loads(line).values()) for line in open(rows)]
    save_model(model, _word_tokenizer(texts), Path(directory) / "model")
    gen = torch.Generator().manual_seed(0)
    names = select_params(model, ParamsConfig())
    positions, shapes = {}, {}
    for name in names:
        numel = model.get_parameter(name).numel()
        bits = torch.zeros(numel, dtype=torch.bool)
        bits[torch.randperm(numel, generator=gen)[:k_for(0.9, numel)]] = True
        positions[name], shapes[name] = encode_positions(pack_bits(bits), numel), tuple(model.get_parameter(name).shape)
    meta = stage_meta("mask", "bench", {}, str(Path(directory) / "model"), fingerprint(model), sparsity=0.9)
    mask = save_sparse(Path(directory) / "mask.safetensors", meta, shapes, positions)
    return {"model": str(Path(directory) / "model"), "mask": str(mask), "rows": str(rows)}


def run(cfg) -> list[Figure]:
    c, figures = cfg.memory, []
    steps = {}
    for dtype in c.dtypes:
        for method in ("fft", "lota"):
            res = in_child("bench_train", "train_steps", model="large", method=method, batch=c.batch, seq=c.seq,
                           steps=1, sparsity=c.sparsity, smollm2=None, dtype=dtype, timeout=1800)
            steps[dtype, method] = res
            log(f"memory {dtype} {method}: peak RSS {res['rss_peak'] / 2**20:.0f} MiB, saved for backward "
                f"{res['saved'] / 2**20:.1f} MiB")
        fft, lota = steps[dtype, "fft"], steps[dtype, "lota"]
        where = (f"{fft['selected'] / 1e6:.0f}M selected weights ({dtype}), batch {c.batch} x {c.seq} tokens, "
                 f"LoTA trains {lota['trained'] / 1e6:.1f}M")
        part = f"memory/{dtype}"
        figures += [
            Figure(part, "peak RSS of one AdamW step, FFT", fft["rss_peak"], "B", note=where),
            Figure(part, "peak RSS of one AdamW step, LoTA", lota["rss_peak"], "B"),
            Figure(part, "peak RSS LoTA / FFT", lota["rss_peak"] / fft["rss_peak"], "x",
                   0.5 if dtype == "float32" else None),
            Figure(part, "saved for backward, FFT", fft["saved"], "B"),
            Figure(part, "saved for backward, LoTA", lota["saved"], "B"),
            Figure(part, "extra saved / selected weights", (lota["saved"] - fft["saved"]) / lota["selected_bytes"],
                   "x", 0.05, note=f"selected weights {lota['selected_bytes'] / 2**20:.0f} MiB"),
        ]
    if c.cli:
        made = in_child("bench_memory", "save_large", directory=str(Path(cfg.tmp or cfg.out) / "large"),
                        timeout=1800)
        common = [f"model.path={made['model']}", "task=gsm8k"]
        lota = [sys.executable, "-m", "lota_cli"]
        train = in_child("bench_merge", "timed", cmd=[
            *lota, "sparse-train", *common, f"task.data_files={made['rows']}", f"task.max_length={c.cli_tokens}",
            "train.max_steps=1", "train.batch_size=1", f"sparse_train.mask={made['mask']}",
            f"out={Path(cfg.out) / 'memory-st'}"], timeout=1800)
        evaluate = in_child("bench_merge", "timed", cmd=[
            *lota, "eval", *common, f"task.eval_data_files={made['rows']}", f"task.max_length={c.cli_tokens}",
            "eval.generate=false", "eval.max_examples=1", "eval.batch_size=1", f"out={Path(cfg.out) / 'memory-eval'}"],
            timeout=1800)
        log(f"memory cli: sparse-train peak {train['rss_peak'] / 2**20:.0f} MiB, eval {evaluate['rss_peak'] / 2**20:.0f} MiB")
        planned = {}
        for stage in ("sparse-train", "eval"):
            in_child("bench_merge", "timed", cmd=[
                *lota, "plan", *common, f"task.max_length={c.cli_tokens}", "train.batch_size=1",
                f"plan.stage={stage}", f"plan.density={1 - c.sparsity}", f"out={Path(cfg.out) / 'memory-plan'}"])
            plan = json.loads((Path(cfg.out) / "memory-plan" / "plan.json").read_text())
            planned[stage] = plan["engines"]["single"]["devices"]["1"]["total"]
        figures += [
            Figure("memory/cli", "lota sparse-train peak RSS", train["rss_peak"], "B",
                   note=f"float32, 1 step of batch 1 x <= {c.cli_tokens} tokens, sparsity {c.sparsity}"),
            Figure("memory/cli", "lota eval (forward only) peak RSS", evaluate["rss_peak"], "B"),
            Figure("memory/cli", "sparse-train / eval peak RSS", train["rss_peak"] / evaluate["rss_peak"], "x", 1.4),
        ]
        for stage, measured in (("sparse-train", train), ("eval", evaluate)):
            ratio = planned[stage] / measured["rss_peak"]
            figures.append(Figure("memory/cli", f"lota plan / measured peak, {stage}", ratio, "x",
                                  check=0.85 <= ratio <= 1.15, note=f"planned {planned[stage] / 2**20:,.0f} MiB "
                                                                   "(target 0.85..1.15)"))
    return figures
