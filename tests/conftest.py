"""Shared fixtures: a tiny Llama saved to disk and loaded back through the real loading path, and the
shared data sets (read in place from ../shared/data, never copied)."""

from __future__ import annotations

import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

SHARED = Path(__file__).resolve().parents[2] / "shared" / "data"
GSM8K_TRAIN = SHARED / "gsm8k" / "train.jsonl"
GSM8K_TEST = SHARED / "gsm8k" / "test.jsonl"
ALPACA = SHARED / "alpaca" / "alpaca_5000.json"


def make_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with a byte-level BPE tokenizer trained on GSM8K questions, saved as a HF directory."""
    import torch
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

    texts = []
    with open(GSM8K_TRAIN) as f:
        for _, line in zip(range(2000), f):
            texts.append(line)
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="session")
def tiny_model(tmp_path_factory) -> Path:
    if not GSM8K_TRAIN.is_file():
        pytest.skip(f"shared data not found at {SHARED}")
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


def tiny_overrides(model: Path, out: Path, **extra) -> list[str]:
    """Hydra overrides for a fast run of a training stage on the tiny model over the shared GSM8K files."""
    args = {
        "model.path": str(model), "task.data_files": str(GSM8K_TRAIN), "task.eval_data_files": str(GSM8K_TEST),
        "task.max_examples": 64, "task.max_length": 128, "train.max_steps": 6, "train.batch_size": 4,
        "train.lr": 3e-3, "train.log_every": 1, "train.warmup_steps": 0, "out": str(out),
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]
