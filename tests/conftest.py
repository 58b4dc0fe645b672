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
import shutil
import sys
import tempfile
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
# one thread per process: the suite runs two workers on two cores (and the multi-process tests two ranks beside
# them), where torch's OpenMP threads, one per core in each process, spin waiting for a core the other process
# holds; the tiny models gain nothing from a second thread. Subprocesses inherit it.
os.environ.setdefault("OMP_NUM_THREADS", "1")
# encoded data sets and the compiled kernels are cached between runs (lota_cli.cache_root): the suite's go to a
# directory of its own, one per test run, shared by pytest-xdist's workers (its writes are atomic)
_RUN = os.environ.get("PYTEST_XDIST_TESTRUNUID")
if _RUN:
    os.environ.setdefault("LOTA_CACHE", str(Path(tempfile.gettempdir()) / f"lota-test-cache-{_RUN}"))
else:
    os.environ.setdefault("LOTA_CACHE", tempfile.mkdtemp(prefix="lota-test-cache-"))
# datasets' cache of the rows it read (Arrow files, locks) and wandb's debug logs beside it, not in the user's
# ~/.cache (a suite left 200 lock files in ~/.cache/huggingface/datasets)
os.environ.setdefault("HF_DATASETS_CACHE", str(Path(os.environ["LOTA_CACHE"]) / "hf-datasets"))
os.environ.setdefault("WANDB_CACHE_DIR", str(Path(os.environ["LOTA_CACHE"]) / "wandb"))

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


def shared_once(tmp_path_factory, name: str, make) -> Path:
    """The directory `name`, made by make(directory) once per test run: under pytest-xdist its workers share
    one (the first to take the lock makes it, the others wait and find it)."""
    from filelock import FileLock

    root = tmp_path_factory.getbasetemp()
    if os.environ.get("PYTEST_XDIST_WORKER"):
        root = root.parent  # the run's base, above the workers' own
    directory = root / name
    with FileLock(str(root / f"{name}.lock")):
        if not (directory / ".done").is_file():
            if directory.exists():
                shutil.rmtree(directory)  # a worker that died making it
            directory.mkdir()
            make(directory)
            (directory / ".done").touch()
    return directory


def kernels():
    """native.kernels(), compiled once per test run: the first of pytest-xdist's workers to ask builds them
    (into the run's shared cache), the others wait for it and load them."""
    from filelock import FileLock

    from lota_cli import cache_root, native

    cache_root().mkdir(parents=True, exist_ok=True)
    with FileLock(str(cache_root() / "kernels.lock")):
        return native.kernels()


def pytest_collection_modifyitems(items):
    """The files that launch processes first: the multi-process ones (`dist`), then those with `slow` tests,
    then the rest, each file's tests in their own order. pytest-xdist hands whole files to whichever worker is
    free (--dist loadfile --no-loadscope-reorder, the Makefile), so the heavy files start at once and the many
    short ones fill in behind them; in its default order (files with many tests first) one worker was left
    running test_dist.py's six minutes alone (8:29 on a fresh clone)."""
    marks: dict = {}
    for item in items:
        marks.setdefault(item.path, set()).update(mark.name for mark in item.iter_markers())
    weight = {path: 0 if "dist" in names else 1 if "slow" in names else 2 for path, names in marks.items()}
    items.sort(key=lambda item: weight[item.path])  # stable: the files' order and their tests' order kept


@pytest.fixture(scope="session", autouse=True)
def data(tmp_path_factory) -> dict[str, Path]:
    """Generated task files: 2000 train and 200 test rows each of `arith` and `reverse` (a fraction of a second),
    written once per test run."""
    made = shared_once(tmp_path_factory, "data", lambda d: synthetic_tasks.write(d, n_train=2000, n_test=200))
    DATA.update({name: made / f"{name}.jsonl" for name in ("arith_train", "arith_test", "reverse_train",
                                                            "reverse_test")})
    assert all(path.is_file() for path in DATA.values()), DATA
    return DATA


_TOKENIZER: list[str] = []  # the trained tokenizer, serialized: trained once per process


def make_tokenizer():
    """A byte-level BPE tokenizer (384 tokens, <pad> <s> </s>) trained on the generated tasks' text (once per
    process; each call returns a tokenizer of its own)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import PreTrainedTokenizerFast

    if _TOKENIZER:
        return PreTrainedTokenizerFast(tokenizer_object=Tokenizer.from_str(_TOKENIZER[0]), bos_token="<s>",
                                       eos_token="</s>", pad_token="<pad>")
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
    _TOKENIZER.append(tok.to_str())
    return make_tokenizer()


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
    """make_tiny_model's model, built once per test run."""
    return shared_once(tmp_path_factory, "tiny", lambda d: make_tiny_model(d / "model")) / "model"


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


# --------------------------------------------------------------------------- helpers shared by the test files

FP = "a" * 64  # the base fingerprint of artifacts written by hand for a made-up base


def saved_weights(directory: Path) -> dict:
    """Every tensor of the safetensors files in a model directory, by the name it is saved under."""
    from safetensors.torch import load_file

    weights = {}
    for shard in sorted(Path(directory).glob("*.safetensors")):
        weights.update(load_file(shard))
    return weights


def changed_inside(base: dict, tuned: dict, artifact) -> dict[str, float]:
    """Assert that `tuned` is bitwise `base` outside the entries `artifact` (a mask or sparse delta) holds, and
    in every tensor it does not cover; returns, per tensor it covers, the fraction of its entries that changed."""
    fractions = {}
    for name, weight in base.items():
        changed = (tuned[name] != weight).reshape(-1)
        if name in artifact.meta.shapes:
            inside = artifact.mask(name)
            assert not changed[~inside].any(), name
            fractions[name] = float(changed[inside].float().mean()) if inside.any() else 0.0
        else:
            assert not changed.any(), name
    return fractions


def losses(out: Path) -> list[float]:
    """The loss of each step a training run logged (out/metrics.jsonl)."""
    return [json.loads(line)["loss"] for line in open(Path(out) / "metrics.jsonl")]


def random_positions(params: dict, density: float = 0.1, seed: int = 0) -> dict:
    """Unsorted random flat positions (int32) in each named tensor, density of its entries (at least one)."""
    import torch

    g = torch.Generator().manual_seed(seed)
    return {n: torch.randperm(p.numel(), generator=g)[:max(1, int(density * p.numel()))].int()
            for n, p in params.items()}


def write_dense(path: Path, deltas: dict, fingerprint: str = FP, model: dict | None = None,
                kind: str = "task_vector") -> Path:
    """A task vector of dense deltas (model: the config recorded as the base's, for stages that read it)."""
    from lota_cli.artifacts import save_dense, stage_meta

    return save_dense(path, stage_meta(kind, "test", {"model": model} if model else {}, "base", fingerprint), deltas)


def write_sparse(path: Path, deltas: dict, fingerprint: str = FP, model: dict | None = None,
                 kind: str = "sparse_delta") -> Path:
    """A sparse delta (or, kind="mask", a mask) holding the nonzero entries of each dense delta."""
    from lota_cli.artifacts import save_sparse, stage_meta
    from lota_cli.tensors import encode_positions, pack_bits

    positions, values = {}, {}
    for name, delta in deltas.items():
        held = delta.reshape(-1) != 0
        positions[name] = encode_positions(pack_bits(held), delta.numel())
        values[name] = delta.reshape(-1)[held]
    meta = stage_meta(kind, "test", {"model": model} if model else {}, "base", fingerprint)
    return save_sparse(path, meta, {n: tuple(d.shape) for n, d in deltas.items()}, positions,
                       values if kind == "sparse_delta" else None)


def disjoint_deltas(shapes: dict, seed: int = 0, density: float = 0.1) -> tuple[dict, dict]:
    """Two dense deltas per tensor whose nonzero entries never overlap."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    a, b = {}, {}
    for name, shape in shapes.items():
        numel = torch.Size(shape).numel()
        order = torch.randperm(numel, generator=gen)
        k = max(1, int(density * numel))
        values = torch.randn(numel, generator=gen) * 0.01
        a[name] = torch.zeros(numel).index_put_((order[:k],), values[order[:k]]).view(shape)
        b[name] = torch.zeros(numel).index_put_((order[k:2 * k],), values[order[k:2 * k]]).view(shape)
    return a, b


def refused(result, stage: str, *needles: str, target: Path | None = None) -> str:
    """Assert the one-line refusal contract on a finished `lota` run (a CompletedProcess, from lota() or
    in_process()): exit 1, exactly one line `lota STAGE: error: ...`, the last of stderr, holding each needle,
    no traceback, and nothing (not even a temporary) at `target`; returns the line (printed, for the record)."""
    lines = [line for line in result.stderr.splitlines() if line.startswith(f"lota {stage}")]
    assert result.returncode == 1, f"exit {result.returncode}:\n{result.stderr[-3000:]}"
    assert "Traceback" not in result.stderr, result.stderr[-3000:]
    assert len(lines) == 1 and lines[0].startswith(f"lota {stage}: error: "), result.stderr[-3000:]
    assert result.stderr.strip().splitlines()[-1] == lines[0], f"the message spans lines:\n{result.stderr[-3000:]}"
    for needle in needles:
        assert needle in lines[0], f"{needle!r} not in {lines[0]!r}"
    if target is not None:
        assert not target.exists(), f"{target} was written"
        assert not list(target.parent.glob(f".{target.name}.*")), "a temporary file was left behind"
    print(lines[0])
    return lines[0]


HEAVY = ("transformers", "datasets", "accelerate", "peft", "deepspeed")
_IMPORTS = """
import sys
from lota_cli import cli

def run(*args):
    try:
        cli.main(list(args))
    except SystemExit as exit_:
        assert not exit_.code, (args, exit_.code)

def imported():
    print(sorted(m for m in {heavy!r} if m in sys.modules), "torch" in sys.modules)

{calls}
"""


def imported_by(*groups: str, cwd) -> list[tuple[list[str], bool]]:
    """For each group of lines calling run(stage, *args) (the CLI's main, all in one fresh interpreter, one group
    after another): which of HEAVY, and whether torch, that interpreter has imported after the group ran."""
    import subprocess

    from lota_cli.testing import OFFLINE_ENV

    code = _IMPORTS.format(calls="\n".join(f"{group}\nimported()" for group in groups), heavy=HEAVY)
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, env=OFFLINE_ENV, cwd=cwd,
                            timeout=120)
    assert result.returncode == 0, result.stderr[-3000:]
    lines = [line for line in result.stdout.splitlines() if line.startswith("[")][-len(groups):]
    return [(eval(heavy), torch == "True") for heavy, torch in (line.rsplit(" ", 1) for line in lines)]
