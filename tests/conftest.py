"""Shared fixtures: a tiny Llama saved to disk and loaded back through the real loading path, and the data
the tests train and evaluate on.

Most tests only need rows of the right shape, so the suite generates them (scripts/synthetic_tasks.py, the
demo's tasks) into a session tmp dir: `arith` is GSM8K-shaped (question / answer ending in `#### N`),
`reverse` is Alpaca-shaped (instruction / input / output). Only tests of the real GSM8K and Alpaca files read
the shared data sets (in place from ../shared/data, never copied; LOTA_SHARED_DATA points elsewhere, e.g. at
a missing directory to check that the suite runs without them); they skip when those files are absent."""

from __future__ import annotations

import json
import os
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# encoded data sets are cached between runs (data.cache_dir): the suite's go to a directory of its own
os.environ.setdefault("LOTA_CACHE", tempfile.mkdtemp(prefix="lota-test-cache-"))

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
import synthetic_tasks  # noqa: E402

SHARED = Path(os.environ.get("LOTA_SHARED_DATA") or ROOT.parent / "shared" / "data")
GSM8K_TRAIN = SHARED / "gsm8k" / "train.jsonl"
GSM8K_TEST = SHARED / "gsm8k" / "test.jsonl"
ALPACA = SHARED / "alpaca" / "alpaca_5000.json"
needs_shared_data = pytest.mark.skipif(
    not (GSM8K_TRAIN.is_file() and GSM8K_TEST.is_file() and ALPACA.is_file()),
    reason=f"the real GSM8K / Alpaca files are not in {SHARED} (../shared/data, or $LOTA_SHARED_DATA)")

# The generated files, {"arith_train": path, "arith_test", "reverse_train", "reverse_test"}; filled in by the
# session fixture `data` before any test runs, so that plain helpers such as tiny_overrides can use them.
DATA: dict[str, Path] = {}


@pytest.fixture(scope="session", autouse=True)
def data(tmp_path_factory) -> dict[str, Path]:
    """Generated task files: 2000 train and 200 test rows each of `arith` and `reverse` (a fraction of a second)."""
    DATA.update(synthetic_tasks.write(tmp_path_factory.mktemp("data"), n_train=2000, n_test=200))
    return DATA


def make_tokenizer():
    """A byte-level BPE tokenizer (384 tokens, <pad> <s> </s>) trained on the generated tasks' text."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    texts = []
    for name in ("arith_train", "reverse_train"):
        with open(DATA[name]) as f:
            texts += [" ".join(json.loads(line).values()) for line in f]
    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(vocab_size=384, special_tokens=["<pad>", "<s>", "</s>"],
                                  initial_alphabet=pre_tokenizers.ByteLevel.alphabet())
    tok.train_from_iterator(texts, trainer)
    return PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")


def make_tiny_model(directory: Path, seed: int = 0) -> Path:
    """A 2-layer Llama with make_tokenizer()'s tokenizer, saved as a HF directory."""
    import torch
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512,
                         bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                         pad_token_id=tokenizer.pad_token_id, tie_word_embeddings=False)
    torch.manual_seed(seed)
    model = LlamaForCausalLM(config)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def make_task_vector(model_dir: Path, path: Path, base_fingerprint: str | None = None) -> Path:
    """A small dense delta on one MLP tensor of the model in `model_dir`, recorded against its base fingerprint
    (or `base_fingerprint`, to make one of another base)."""
    import torch

    from lota_cli.artifacts import save_dense, stage_meta
    from lota_cli.config import ModelConfig
    from lota_cli.models import fingerprint, load_model

    model, _ = load_model(ModelConfig(path=str(model_dir)))
    name = "model.layers.0.mlp.down_proj.weight"
    delta = 0.5 * torch.randn(model.get_parameter(name).shape, generator=torch.Generator().manual_seed(0))
    meta = stage_meta("task_vector", "calibrate", {}, str(model_dir), base_fingerprint or fingerprint(model))
    return save_dense(path, meta, {name: delta})


@pytest.fixture(scope="session")
def tiny_model(data, tmp_path_factory) -> Path:
    return make_tiny_model(tmp_path_factory.mktemp("tiny") / "model")


@pytest.fixture(scope="module")
def tiny_base(tiny_model):
    """(model config dict, fingerprint, {name: shape} of the selected weights, the loaded model) of the tiny
    model, for tests that write artifacts of it by hand."""
    from dataclasses import asdict

    from lota_cli.config import ModelConfig, ParamsConfig
    from lota_cli.models import fingerprint, load_model, select_params

    model_cfg = ModelConfig(path=str(tiny_model))
    model, _ = load_model(model_cfg)
    shapes = {n: tuple(model.get_parameter(n).shape) for n in select_params(model, ParamsConfig())}
    return asdict(model_cfg), fingerprint(model), shapes, model


def tiny_overrides(model: Path, out: Path, **extra) -> list[str]:
    """Hydra overrides for a fast run of a training stage (task gsm8k, the default) on the tiny model over the
    generated GSM8K-shaped files."""
    args = {
        "model.path": str(model), "task.data_files": str(DATA["arith_train"]),
        "task.eval_data_files": str(DATA["arith_test"]),
        "task.max_examples": 64, "task.max_length": 128, "train.max_steps": 6, "train.batch_size": 4,
        "train.lr": 3e-3, "train.log_every": 1, "train.warmup_steps": 0, "out": str(out),
    }
    args.update(extra)
    return [f"{k}={v}" for k, v in args.items()]
