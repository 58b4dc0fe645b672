"""Faults (issue 7): lota survives crashes and bad input without losing work or writing a wrong artifact.

Every bad input must end in exactly one line `lota <stage>: error: ...` on stderr that names the file, key
or value at fault and says what to do, exit status 1, no traceback, and nothing at the target path.

Most cases call `lota_cli.cli.main` in-process (the function the `lota` command runs: Hydra composition,
config validation and the error handling are all the same) because a fresh interpreter spends ~10 s
importing torch and transformers; crashes and signals need a real process and use subprocess.
"""

from __future__ import annotations

import ast
import hashlib
import builtins
import errno
import json
import math
import os
import re
import shutil
import signal
import struct
import subprocess
import sys
import tempfile
from pathlib import Path

import pytest
import torch

from conftest import DATA, refused, tiny_overrides
from lota_cli import LotaError, testing
from lota_cli.artifacts import Artifact, library_versions, save_sparse
from lota_cli.tensors import encode_positions, pack_bits

ROOT = Path(__file__).resolve().parents[1]
# One thread everywhere: the tiny model gains nothing from more, a busy machine makes OpenMP threads spin (10x
# slower), and bitwise comparisons between this process and the subprocesses need the same thread count.
ENV = {**testing.OFFLINE_ENV, "OMP_NUM_THREADS": "1", "MKL_NUM_THREADS": "1"}
STEPS = 12  # long enough to be killed between checkpoints (train.save_every=2), short enough to be cheap


# --------------------------------------------------------------------------- driving the CLI

def lota(*args) -> subprocess.CompletedProcess:
    """Run `lota ARGS` in this process, as the console script would."""
    return testing.in_process(*args, check=False)


# Sends a signal to PID as soon as a non-empty file matches PATTERN; exits 1 if PID ends first. A process of
# its own, so that its timing does not depend on what the test process holds the GIL for.
WATCHER = """
import glob, os, sys, time
pid, sig, pattern = int(sys.argv[1]), int(sys.argv[2]), sys.argv[3]
while True:
    if any(os.path.getsize(p) for p in glob.glob(pattern)):
        os.kill(pid, sig)
        sys.exit(0)
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        sys.exit(1)
    time.sleep(0.01)
"""


class Interrupted:
    """`lota STAGE ARGS` as a real process, sent `sig` as soon as a non-empty file matches `trigger`.

    Left to run while the test that waits for it does other work: a new interpreter spends most of its time
    importing torch and transformers, and three of them import side by side.
    """

    def __init__(self, stage: str, args: list[str], sig: int, trigger: str, log: Path):
        self.args, self.log = args, log
        with open(log, "w") as f:
            self.proc = subprocess.Popen(testing.command(stage, *args), stdout=subprocess.DEVNULL, stderr=f,
                                         env=ENV, cwd=ROOT)
        self.watcher = subprocess.Popen([sys.executable, "-c", WATCHER, str(self.proc.pid), str(int(sig)), trigger])

    def result(self) -> subprocess.CompletedProcess:
        self.proc.wait(timeout=300)
        signalled = self.watcher.wait(timeout=60) == 0 and self.proc.returncode != 0
        stderr = self.log.read_text()
        assert signalled, f"it ended ({self.proc.returncode}) before it was due a signal:\n{stderr[-3000:]}"
        return subprocess.CompletedProcess(self.proc.args, self.proc.returncode, "", stderr)

    def stop(self) -> None:
        for proc in (self.proc, self.watcher):
            proc.kill()
            proc.wait()


def out_dir(args: list[str]) -> Path:
    return Path(next(a for a in args if a.startswith("out=")).removeprefix("out="))


def fast(model: Path, out: Path, **extra) -> list[str]:
    """Overrides for a quick training run on the tiny model (a few steps, short sequences)."""
    return tiny_overrides(model, out, **{"task.max_examples": 16, "train.batch_size": 2, "train.max_steps": STEPS,
                                         "train.save_every": 2, **extra})


def tensors(path: Path) -> dict[str, torch.Tensor]:
    from safetensors.torch import load_file

    return load_file(path)


def assert_bitwise_equal(a: Path, b: Path) -> None:
    ta, tb = tensors(a), tensors(b)
    assert ta.keys() == tb.keys()
    for key in ta:
        assert ta[key].dtype == tb[key].dtype and torch.equal(ta[key], tb[key]), key
    assert Artifact(a).meta.fingerprint == Artifact(b).meta.fingerprint


def resumed_from(stderr: str) -> int:
    match = re.search(r"resumed from \S+ at step (\d+) of (\d+)", stderr)
    assert match, stderr[-2000:]
    print(match.group(0))
    return int(match.group(1))


# --------------------------------------------------------------------------- shared runs

@pytest.fixture(scope="module", autouse=True)
def one_thread():
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)


@pytest.fixture(scope="module")
def runs(tiny_model, tmp_path_factory):
    """calibrate -> extract -> sparse-train in this process, calibrate and sparse-train twice each (same
    config and seed)."""
    root = tmp_path_factory.mktemp("faults")

    def ok(*args) -> None:
        result = lota(*args)
        assert result.returncode == 0, result.stderr[-3000:]

    ok("calibrate", *fast(tiny_model, root / "cal_a"))
    ok("extract", f"extract.task_vector={root / 'cal_a' / 'task_vector.safetensors'}", f"out={root / 'ext'}")
    mask = root / "ext" / "mask.safetensors"
    ok("calibrate", *fast(tiny_model, root / "cal_b"))
    for run in ("a", "b"):
        ok("sparse-train", *fast(tiny_model, root / f"st_{run}", **{"sparse_train.mask": mask}))
    return {"root": root, "mask": mask,
            **{f"cal_{r}": root / f"cal_{r}" / "task_vector.safetensors" for r in "ab"},
            **{f"st_{r}": root / f"st_{r}" / "sparse_delta.safetensors" for r in "ab"}}


@pytest.fixture(scope="module")
def interrupted(runs, tiny_model):
    """As real processes, the runs of `runs` interrupted by SIGKILL (after their first checkpoint) or SIGTERM
    (after their first step), all three started at once."""
    root, checkpoint, first_step = runs["root"], "checkpoints/step-*/state.pt", "metrics.jsonl"
    started = {
        "calibrate_kill": Interrupted("calibrate", fast(tiny_model, root / "cal_kill"), signal.SIGKILL,
                                      str(root / "cal_kill" / checkpoint), root / "cal_kill.log"),
        "sparse_train_kill": Interrupted("sparse-train",
                                         fast(tiny_model, root / "st_kill", **{"sparse_train.mask": runs["mask"]}),
                                         signal.SIGKILL, str(root / "st_kill" / checkpoint), root / "st_kill.log"),
        "calibrate_term": Interrupted("calibrate", fast(tiny_model, root / "cal_term", **{"train.save_every": 0}),
                                      signal.SIGTERM, str(root / "cal_term" / first_step), root / "cal_term.log"),
    }
    yield started
    for run in started.values():  # still running when a test failed before waiting for it
        run.stop()


def restamped(source: Artifact, path: Path, **meta_changes) -> Path:
    """A copy of a mask with some of its metadata changed, written the proper way (so it passes the checksum)."""
    meta = source.meta
    for key, value in meta_changes.items():
        setattr(meta, key, value)
    shapes = {n: source.shape(n) for n in source.names}
    positions = {n: encode_positions(source.bits(n), source.numel(n)) for n in source.names}
    return save_sparse(path, meta, shapes, positions)


# --------------------------------------------------------------------------- missing and unreadable inputs

def test_missing_artifact(tiny_model, tmp_path):
    refused(lota("extract", "extract.task_vector=/no/such/tv.safetensors", f"out={tmp_path / 'e'}"), "extract",
            "artifact not found: /no/such/tv.safetensors", "give the path of a task_vector",
            target=tmp_path / "e" / "mask.safetensors")
    refused(lota("sparse-train", *fast(tiny_model, tmp_path / "s", **{"sparse_train.mask": tmp_path / "none.st"})),
            "sparse-train", f"artifact not found: {tmp_path / 'none.st'}", "give the path of a mask",
            target=tmp_path / "s" / "sparse_delta.safetensors")


def test_missing_data_file_and_model(tiny_model, tmp_path):
    refused(lota("calibrate", *fast(tiny_model, tmp_path / "c", **{"task.data_files": tmp_path / "none.jsonl"})),
            "calibrate", f"data file not found: {tmp_path / 'none.jsonl'} (task.data_files)", "check the path",
            target=tmp_path / "c" / "task_vector.safetensors")
    refused(lota("calibrate", *fast(tmp_path / "no_model", tmp_path / "c")), "calibrate",
            f"model.path={tmp_path / 'no_model'}: no such directory", "give a local model directory",
            target=tmp_path / "c" / "task_vector.safetensors")


@pytest.fixture
def make_unreadable(monkeypatch):
    """chmod 000; as root (which reads such files anyway) also make open() of that path fail as it would."""
    def apply(path: Path) -> None:
        path.chmod(0)
        if os.geteuid() == 0:
            real_open = builtins.open

            def denying_open(file, *args, **kwargs):
                if isinstance(file, (str, os.PathLike)) and Path(file) == path:
                    raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), str(file))
                return real_open(file, *args, **kwargs)

            monkeypatch.setattr(builtins, "open", denying_open)

    return apply


def test_unreadable_artifact_and_data_file(runs, tiny_model, tmp_path, make_unreadable):
    tv = tmp_path / "tv.safetensors"
    shutil.copy(runs["cal_a"], tv)
    data = tmp_path / "train.jsonl"
    shutil.copy(DATA["arith_train"], data)
    make_unreadable(tv)
    make_unreadable(data)
    refused(lota("extract", f"extract.task_vector={tv}", f"out={tmp_path / 'e'}"), "extract",
            f"cannot read {tv}: Permission denied", "check that the file is readable",
            target=tmp_path / "e" / "mask.safetensors")
    refused(lota("calibrate", *fast(tiny_model, tmp_path / "c", **{"task.data_files": data})), "calibrate",
            f"cannot read data file {data} (task.data_files): Permission denied", "check its permissions",
            target=tmp_path / "c" / "task_vector.safetensors")


# --------------------------------------------------------------------------- damaged artifacts

def _flip(data: bytes, pos: int, bit: int = 0x01) -> bytes:
    damaged = bytearray(data)
    damaged[pos] ^= bit
    return bytes(damaged)


def test_truncated_and_corrupt_artifacts_through_the_cli(runs, tiny_model, tmp_path):
    data = runs["cal_a"].read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    header = data[8:8 + n].decode()
    cases = {
        "cut_data": (data[:-100], "is truncated: header promises"),
        "cut_header": (data[:200], "exceeds the file's 200 bytes"),
        "flip_length": (_flip(data, 7), "exceeds the file's"),  # the top byte of the header length
        "flip_json": (_flip(data, 8), "header is not valid JSON"),  # the opening brace
        "flip_base": (_flip(data, 8 + header.index('base_fingerprint') + 25), "does not match its checksum"),
        "flip_offsets": (_flip(data, 8 + header.index('data_offsets":[') + 15), "does not match its checksum"),
    }
    for name, (content, message) in cases.items():
        path = tmp_path / f"{name}.safetensors"
        path.write_bytes(content)
        out = tmp_path / f"out_{name}"
        line = refused(lota("extract", f"extract.task_vector={path}", f"out={out}"), "extract", str(path), message,
                       target=out / "mask.safetensors")
        assert "re-create it or copy it again" in line
    mask = tmp_path / "cut_mask.safetensors"
    mask.write_bytes(runs["mask"].read_bytes()[:-7])
    refused(lota("sparse-train", *fast(tiny_model, tmp_path / "s", **{"sparse_train.mask": mask})), "sparse-train",
            f"{mask} is truncated", target=tmp_path / "s" / "sparse_delta.safetensors")


def test_every_single_bit_flip_in_a_header_is_refused(tmp_path):
    """Exhaustive over the header of a small artifact: a flip is caught on open, never a wrong read."""
    from lota_cli.artifacts import Meta

    meta = Meta(kind="sparse_delta", base_model="tiny", base_fingerprint="b" * 64, stage="test", seed=0,
                config={"train": {"lr": 0.001}}, sparsity=0.5)
    bits = pack_bits(torch.arange(24) % 3 == 0)
    path = save_sparse(tmp_path / "sd.safetensors", meta, {"a.weight": (4, 6)},
                       {"a.weight": encode_positions(bits, 24)}, {"a.weight": torch.arange(8, dtype=torch.float32)})
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    accepted = []
    for pos in range(8 + n):
        for bit in (0x01, 0x40):
            path.write_bytes(_flip(data, pos, bit))
            try:
                artifact = Artifact(path)
                for name in artifact.names:
                    artifact.dense(name)
                accepted.append((pos, bit))
            except LotaError:
                pass
    assert accepted == []


def test_info_refuses_damaged_files_in_one_line(runs, tmp_path):
    path = tmp_path / "tv.safetensors"
    path.write_bytes(runs["cal_a"].read_bytes()[:-1])
    result = lota("info", path)
    err = result.stderr.strip()
    assert result.returncode == 1 and result.stdout == ""
    assert err.startswith("lota info: error: ") and "\n" not in err and "truncated" in err
    with pytest.raises(LotaError, match="truncated"):  # --debug: the exception itself, for its traceback
        lota("info", path, "--debug")


# --------------------------------------------------------------------------- artifacts that do not fit

@pytest.mark.parametrize("stage, key, given", [
    ("extract", "extract.task_vector", "mask"),
    ("extract", "extract.task_vector", "st_a"),
    ("sparse-train", "sparse_train.mask", "cal_a"),
    ("sparse-train", "sparse_train.mask", "st_a"),
    ("lotto", "lotto.previous", "mask"),
])
def test_wrong_kind_of_artifact(runs, tiny_model, tmp_path, stage, key, given):
    value = f"[{runs[given]}]" if key == "lotto.previous" else runs[given]
    args = [f"{key}={value}", f"out={tmp_path}"]
    if stage != "extract":
        args = fast(tiny_model, tmp_path, **{key: value})
    kind = Artifact(runs[given]).kind
    target = {"extract": "mask", "sparse-train": "sparse_delta", "lotto": "sparse_delta"}[stage]
    refused(lota(stage, *args), stage, f"{runs[given]} is a {kind}; this stage needs a",
            target=tmp_path / f"{target}.safetensors")


def test_mask_from_another_base_model(runs, tiny_model, tmp_path):
    """The other model: same architecture and tokenizer, weights initialised with another seed."""
    from transformers import AutoConfig, LlamaForCausalLM

    from lota_cli.models import fingerprint

    torch.manual_seed(1)
    other = LlamaForCausalLM(AutoConfig.from_pretrained(tiny_model))
    mask = restamped(Artifact(runs["mask"]), tmp_path / "other.safetensors", base_model="other-tiny",
                     base_fingerprint=fingerprint(other))
    out = tmp_path / "st"
    line = refused(lota("sparse-train", *fast(tiny_model, out, **{"sparse_train.mask": mask})), "sparse-train",
                   f"{mask} was made from base 'other-tiny'", "use artifacts made from this base model",
                   target=out / "sparse_delta.safetensors")
    assert str(tiny_model) in line


@pytest.mark.parametrize("change", ["name", "shape"])
def test_mask_tensors_that_do_not_match_the_model(runs, tiny_model, tmp_path, change):
    source = Artifact(runs["mask"])
    name = source.names[0]
    bits, true_shape = source.bits(name), source.shape(name)
    if change == "name":
        bad_name, shape = name.replace("layers.0", "layers.7"), true_shape
    else:
        bad_name, shape = name, (true_shape[0], true_shape[1] + 1)
        bits = pack_bits(torch.arange(math.prod(shape)) % 10 == 0)
    mask = save_sparse(tmp_path / "bad.safetensors", source.meta, {bad_name: shape},
                       {bad_name: encode_positions(bits, math.prod(shape))})
    out = tmp_path / "st"
    needle = (f"has tensor {bad_name!r}, which this model does not have" if change == "name"
              else f"tensor {name!r} is {list(shape)} but the model's is {list(true_shape)}")
    refused(lota("sparse-train", *fast(tiny_model, out, **{"sparse_train.mask": mask})), "sparse-train",
            str(mask), needle, "use artifacts made from this base model", target=out / "sparse_delta.safetensors")


# --------------------------------------------------------------------------- bad values

@pytest.mark.parametrize("value", ["0", "1", "1.5", "-0.1", "nan"])
def test_sparsity_outside_zero_one(runs, tmp_path, value):
    refused(lota("extract", f"extract.task_vector={runs['cal_a']}", f"extract.sparsity={value}", f"out={tmp_path}"),
            "extract", f"extract.sparsity={float(value)} must be strictly between 0 and 1",
            target=tmp_path / "mask.safetensors")


def test_sparsity_that_keeps_nothing_and_lotto_sparsity(runs, tiny_model, tmp_path):
    refused(lota("extract", f"extract.task_vector={runs['cal_a']}", "extract.sparsity=0.999999", f"out={tmp_path}"),
            "extract", "extract.sparsity=0.999999 keeps none of the", "lower it", target=tmp_path / "mask.safetensors")
    refused(lota("lotto", *fast(tiny_model, tmp_path, **{"lotto.previous": f"[{runs['st_a']}]",
                                                         "lotto.sparsity": 1.0})),
            "lotto", "lotto.sparsity=1.0 must be strictly between 0 and 1",
            target=tmp_path / "sparse_delta.safetensors")


def poke(path: Path, key: str, index: int, value: float) -> None:
    """Overwrite one float32 entry of a stored tensor in place, as a diverged run of an older lota (whose
    writer did not refuse NaN) or another tool could have left it."""
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    entry = json.loads(data[8:8 + n])[key]
    assert entry["dtype"] == "F32"
    at = 8 + n + entry["data_offsets"][0] + 4 * index
    path.write_bytes(data[:at] + struct.pack("<f", value) + data[at + 4:])


@pytest.mark.parametrize("bad, scope", [(math.nan, "global"), (math.inf, "global"), (-math.inf, "per_tensor")])
def test_non_finite_task_vector(runs, tmp_path, bad, scope):
    path = tmp_path / "tv.safetensors"
    shutil.copy(runs["cal_a"], path)
    name = Artifact(path).names[3]
    poke(path, name, 17, bad)
    refused(lota("extract", f"extract.task_vector={path}", f"extract.scope={scope}", f"out={tmp_path / 'e'}"),
            "extract", f"{path}: tensor {name!r} holds NaN or Inf values", "redo it",
            target=tmp_path / "e" / "mask.safetensors")


@pytest.mark.parametrize("content, needle", [
    ("", "is empty; give a file with at least one example"),
    ("[]", "has no examples; give data with at least one example"),
])
def test_empty_data(tiny_model, tmp_path, content, needle):
    data = tmp_path / ("train.jsonl" if not content else "train.json")
    data.write_text(content)
    refused(lota("calibrate", *fast(tiny_model, tmp_path / "c", **{"task.data_files": data})), "calibrate",
            str(data), needle, target=tmp_path / "c" / "task_vector.safetensors")


def test_missing_fields_in_data(tiny_model, tmp_path):
    data = tmp_path / "renamed.jsonl"
    data.write_text('{"q": "What is 2 + 2?", "a": "#### 4"}\n')
    refused(lota("calibrate", *fast(tiny_model, tmp_path / "c", **{"task.data_files": data})), "calibrate",
            "has no field(s) ['answer', 'question']", "its fields are ['a', 'q']", "set task.prompt / task.target",
            target=tmp_path / "c" / "task_vector.safetensors")
    data = tmp_path / "partial.jsonl"
    data.write_text('{"question": "What is 2 + 2?", "answer": "#### 4"}\n{"question": "And 3 + 3?"}\n')
    refused(lota("calibrate", *fast(tiny_model, tmp_path / "c", **{"task.data_files": data})), "calibrate",
            "1 row(s) of", "lack field 'answer' used by task.target", "fix or drop those rows",
            target=tmp_path / "c" / "task_vector.safetensors")


@pytest.mark.parametrize("override, needle", [
    ("train.no_such_key=1", "no_such_key"),
    ("no_such_key=1", "no_such_key"),
    ("train.max_stepz=5", "max_stepz"),
    ("train.max_steps=abc", "abc"),
])
def test_unknown_config_keys_are_one_line(tiny_model, tmp_path, override, needle):
    refused(lota("calibrate", *fast(tiny_model, tmp_path), override), "calibrate", needle,
            target=tmp_path / "task_vector.safetensors")


# --------------------------------------------------------------------------- unwritable output, full disk

def test_out_under_a_regular_file(runs, tmp_path):
    blocker = tmp_path / "file"
    blocker.write_text("not a directory")
    refused(lota("extract", f"extract.task_vector={runs['cal_a']}", f"out={blocker / 'out'}"), "extract",
            str(blocker / "out"))


def test_target_path_that_cannot_be_replaced(runs, tmp_path):
    """The artifact's path is taken by a directory: the write fails cleanly and leaves the directory alone."""
    (tmp_path / "mask.safetensors").mkdir()
    refused(lota("extract", f"extract.task_vector={runs['cal_a']}", f"out={tmp_path}"), "extract",
            f"could not write {tmp_path / 'mask.safetensors'}", "writable directory with free space")
    assert (tmp_path / "mask.safetensors").is_dir() and not list((tmp_path / "mask.safetensors").iterdir())
    assert not list(tmp_path.glob(".mask.safetensors.*"))


@pytest.mark.parametrize("fault, message", [
    ("read_only", "Permission denied"),
    ("full", "No space left on device"),
])
def test_unwritable_or_full_output_directory(runs, tmp_path, monkeypatch, fault, message):
    """As root a directory cannot be made read-only, so the temporary file's creation is refused as it would
    be; a full disk is real: every write to the temporary artifact goes to /dev/full (ENOSPC)."""
    real_mkstemp = tempfile.mkstemp

    def faulty_mkstemp(*args, **kwargs):
        if fault == "read_only":
            raise PermissionError(errno.EACCES, os.strerror(errno.EACCES), kwargs.get("dir"))
        fd, name = real_mkstemp(*args, **kwargs)
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(tempfile, "mkstemp", faulty_mkstemp)
    refused(lota("extract", f"extract.task_vector={runs['cal_a']}", f"out={tmp_path}"), "extract",
            f"could not write {tmp_path / 'mask.safetensors'}: {message}", "writable directory with free space",
            target=tmp_path / "mask.safetensors")


def test_full_disk_at_fsync_keeps_the_previous_artifact(runs, tmp_path, monkeypatch):
    previous = b"an artifact from an earlier run"
    (tmp_path / "mask.safetensors").write_bytes(previous)

    def fsync(fd):
        raise OSError(errno.ENOSPC, os.strerror(errno.ENOSPC))

    monkeypatch.setattr(os, "fsync", fsync)
    refused(lota("extract", f"extract.task_vector={runs['cal_a']}", f"out={tmp_path}"), "extract",
            f"could not write {tmp_path / 'mask.safetensors'}: No space left on device")
    assert (tmp_path / "mask.safetensors").read_bytes() == previous
    assert not list(tmp_path.glob(".mask.safetensors.*"))


@pytest.mark.parametrize("where", ["the lock", "Hydra's files", "overlap.json", "metrics.jsonl"])
def test_a_full_disk_anywhere_names_the_file_it_could_not_write(where, runs, tiny_model, tmp_path, monkeypatch):
    """ENOSPC from a write names no file; every write lota makes (or has Hydra make) says which one failed,
    in one line, and leaves nothing half-written at the result's path."""
    real_open, real_mkstemp = builtins.open, tempfile.mkstemp
    out = tmp_path / "out"

    def full(path) -> bool:
        path = str(path)
        return {"the lock": path.endswith(".lota.lock"), "Hydra's files": "/.hydra/" in path,
                "overlap.json": ".overlap.json." in path, "metrics.jsonl": path.endswith("metrics.jsonl")}[where]

    def open_on_full_disk(file, mode="r", *args, **kwargs):
        if isinstance(file, (str, os.PathLike)) and full(file) and mode[0] in "wa":
            return real_open("/dev/full", mode, *args, **kwargs)  # every write: ENOSPC
        return real_open(file, mode, *args, **kwargs)

    def mkstemp_on_full_disk(*args, **kwargs):
        fd, name = real_mkstemp(*args, **kwargs)
        if not full(name):
            return fd, name
        os.close(fd)
        return os.open("/dev/full", os.O_WRONLY), name

    monkeypatch.setattr(builtins, "open", open_on_full_disk)
    monkeypatch.setattr(tempfile, "mkstemp", mkstemp_on_full_disk)
    if where == "metrics.jsonl":
        result, stage = lota("calibrate", *fast(tiny_model, out, **{"train.max_steps": 1})), "calibrate"
        file, target = out / "metrics.jsonl", out / "task_vector.safetensors"
    else:
        result, stage = lota("overlap", runs["st_a"], runs["st_b"], f"out={out}"), "overlap"
        file = {"the lock": out / ".lota.lock", "Hydra's files": out, "overlap.json": out / "overlap.json"}[where]
        target = out / "overlap.json"
    says = "could not write the run's files (.hydra/, lota.log) in" if where == "Hydra's files" else "could not write"
    # (the lock, opened on /dev/full, fails at its truncate rather than at its write)
    refused(result, stage, f"{says} {file}: ", "writable directory with free space",
            *(["No space left on device"] if where != "the lock" else []), target=target)


def test_full_disk_while_checkpointing(tiny_model, tmp_path, monkeypatch):
    def torch_save_on_full_disk(obj, f, *args, **kwargs):
        """What torch.save raises when the disk fills: its C++ writer's RuntimeError, after a partial file."""
        Path(f).write_bytes(b"partial")
        raise RuntimeError("[enforce fail at inline_container.cc:783] . PytorchStreamWriter failed writing file "
                           "data/0: file write failed")

    monkeypatch.setattr(torch, "save", torch_save_on_full_disk)
    out = tmp_path / "c"
    refused(lota("calibrate", *fast(tiny_model, out, **{"train.save_every": 1})), "calibrate",
            "checkpoint", "file write failed", target=out / "task_vector.safetensors")
    assert not list((out / "checkpoints").glob(".tmp-*"))


# --------------------------------------------------------------------------- diverging training

def test_loss_turning_nan_stops_and_keeps_the_last_good_checkpoint(tiny_model, tmp_path):
    out = tmp_path / "c"
    line = refused(lota("calibrate", *fast(tiny_model, out, **{"train.lr": 1e30, "train.save_every": 1})),
                   "calibrate", "the loss became", "at step 2", "Last good checkpoint: ", "Lower train.lr",
                   target=out / "task_vector.safetensors")
    checkpoint = Path(re.search(r"Last good checkpoint: (\S+?)\.? ", line).group(1))
    assert checkpoint == out / "checkpoints" / "step-00000001"
    state = torch.load(checkpoint / "state.pt", weights_only=True)
    assert all(torch.isfinite(t).all() for t in state["trainable"].values())


def test_artifact_holding_inf_is_not_written(tiny_model, tmp_path):
    """One step at lr 1e5 moves weights by ~1e5, finite in training but Inf once stored as float16."""
    out = tmp_path / "c"
    refused(lota("calibrate", *fast(tiny_model, out, **{"train.lr": 1e5, "train.max_steps": 1,
                                                        "artifact_dtype": "float16"})),
            "calibrate", f"refusing to write {out / 'task_vector.safetensors'}", "holds NaN or Inf values",
            "float16 cannot hold them", target=out / "task_vector.safetensors")


@pytest.mark.parametrize("lr", ["1e39", "inf"])
def test_learning_rate_float32_cannot_hold(tiny_model, tmp_path, lr):
    refused(lota("calibrate", *fast(tiny_model, tmp_path, **{"train.lr": lr})), "calibrate", "train.lr=",
            target=tmp_path / "task_vector.safetensors")


def test_poisoned_model_is_refused_on_load(tiny_model, tmp_path):
    from safetensors.torch import load_file, save_file

    poisoned = tmp_path / "poisoned"
    shutil.copytree(tiny_model, poisoned)
    weights = load_file(poisoned / "model.safetensors")
    weights["model.norm.weight"][5] = float("nan")
    save_file(weights, poisoned / "model.safetensors", metadata={"format": "pt"})
    refused(lota("calibrate", *fast(poisoned, tmp_path / "c")), "calibrate",
            "weight 'model.norm.weight' holds NaN or Inf values", "use an intact copy",
            target=tmp_path / "c" / "task_vector.safetensors")


# --------------------------------------------------------------------------- safety

def test_every_torch_load_is_weights_only_and_nothing_unpickles():
    offenders = []
    for path in sorted((ROOT / "lota_cli").rglob("*.py")):
        tree = ast.parse(path.read_text(), filename=str(path))
        for node in ast.walk(tree):
            if isinstance(node, (ast.Import, ast.ImportFrom)):
                names = [a.name for a in node.names] + ([node.module] if isinstance(node, ast.ImportFrom) else [])
                if any(n and n.split(".")[0] in ("pickle", "dill", "joblib", "cloudpickle") for n in names):
                    offenders.append(f"{path.name}:{node.lineno} imports a pickle library")
            if isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "load":
                owner = ast.unparse(node.func.value)
                if owner == "torch" and not any(k.arg == "weights_only" and isinstance(k.value, ast.Constant)
                                                and k.value.value is True for k in node.keywords):
                    offenders.append(f"{path.name}:{node.lineno} torch.load without weights_only=True")
                if owner in ("np", "numpy") and any(k.arg == "allow_pickle" for k in node.keywords):
                    offenders.append(f"{path.name}:{node.lineno} numpy load with allow_pickle")
    assert offenders == []


@pytest.fixture(scope="module")
def pickled_checkpoint_run(tiny_model, tmp_path_factory):
    """Resume from a checkpoint whose pickle would create a file if it were ever unpickled."""
    root = tmp_path_factory.mktemp("pickle")
    marker = root / "pwned"

    class Payload:
        def __reduce__(self):
            return (open, (str(marker), "w"))

    checkpoint = root / "c" / "checkpoints" / "step-00000002"
    checkpoint.mkdir(parents=True)
    torch.save({"step": 2, "payload": Payload()}, checkpoint / "state.pt")
    result = lota("calibrate", *fast(tiny_model, root / "c", resume=checkpoint))
    return result, checkpoint, marker


def test_pickled_checkpoint_is_not_executed(pickled_checkpoint_run):
    result, checkpoint, marker = pickled_checkpoint_run
    assert result.returncode == 1 and f"lota calibrate: error: cannot read checkpoint {checkpoint}" in result.stderr
    assert "Traceback" not in result.stderr
    assert not marker.exists()
    assert not (checkpoint.parents[1] / "task_vector.safetensors").exists()


def test_pickled_checkpoint_refusal_is_one_line(pickled_checkpoint_run):
    result, checkpoint, _ = pickled_checkpoint_run
    refused(result, "calibrate", f"cannot read checkpoint {checkpoint}", "delete it")


def test_trust_remote_code_is_off_by_default():
    from hydra import compose, initialize_config_dir
    from hydra.core.global_hydra import GlobalHydra

    from lota_cli.config import CONF_DIR, register_resolvers, register_schemas

    GlobalHydra.instance().clear()  # left initialised by the in-process runs
    register_schemas()
    register_resolvers()
    with initialize_config_dir(config_dir=str(CONF_DIR), version_base="1.3"):
        for name in ("calibrate", "sparse_train", "lotto", "eval"):
            for conf in ([], ["conf=gsm8k"] if name != "eval" else []):
                cfg = compose(config_name=name, overrides=["out=x", *conf])
                assert cfg.model.trust_remote_code is False, (name, conf)


def test_model_that_needs_its_own_code_is_refused(tmp_path):
    model = tmp_path / "custom"
    model.mkdir()
    marker = tmp_path / "executed"
    (model / "config.json").write_text(json.dumps({
        "model_type": "lota_custom_test", "architectures": ["CustomModel"],
        "auto_map": {"AutoConfig": "configuration_custom.CustomConfig",
                     "AutoModelForCausalLM": "modeling_custom.CustomModel"}}))
    for module in ("configuration_custom.py", "modeling_custom.py"):
        (model / module).write_text(f"open({str(marker)!r}, 'w').close()\n")
    refused(lota("calibrate", *fast(model, tmp_path / "c")), "calibrate",
            f"model {str(model)!r} runs its own Python code", "set model.trust_remote_code=true",
            target=tmp_path / "c" / "task_vector.safetensors")
    assert not marker.exists()


# --------------------------------------------------------------------------- determinism and provenance

def test_same_config_and_seed_give_bitwise_identical_artifacts(runs):
    assert_bitwise_equal(runs["cal_a"], runs["cal_b"])
    assert_bitwise_equal(runs["st_a"], runs["st_b"])


def test_artifacts_record_config_seed_versions_and_parents(runs, tiny_model):
    from lota_cli.config import ModelConfig
    from lota_cli.models import fingerprint, load_model

    base = fingerprint(load_model(ModelConfig(path=str(tiny_model)))[0])
    tv, mask, delta = Artifact(runs["cal_a"]), Artifact(runs["mask"]), Artifact(runs["st_a"])
    for artifact in (tv, mask, delta):
        meta = artifact.meta
        assert meta.versions == library_versions()
        assert meta.base_fingerprint == base
        assert "${" not in json.dumps(meta.config), "the config must be resolved"
        assert meta.config["out"] == str(artifact.path.parent)
    for artifact in (tv, delta):
        assert artifact.meta.seed == 0 and artifact.meta.config["train"]["seed"] == 0
        assert artifact.meta.config["train"]["max_steps"] == STEPS
        assert artifact.meta.config["model"]["path"] == str(tiny_model)
    assert mask.meta.config["extract"]["task_vector"] == str(runs["cal_a"])
    assert mask.meta.seed is None  # extract draws nothing at random: the mask is a function of its parent
    assert mask.meta.parents == [tv.meta.fingerprint]
    assert delta.meta.parents == [mask.meta.fingerprint]
    assert delta.meta.config["sparse_train"]["mask"] == str(runs["mask"])


# --------------------------------------------------------------------------- crashes and resume

@pytest.mark.parametrize("name, artifact, reference", [
    ("calibrate_kill", "task_vector", "cal_a"),
    ("sparse_train_kill", "sparse_delta", "st_a"),
])
@pytest.mark.slow  # three real processes, signalled
def test_killed_then_resumed_equals_uninterrupted(runs, interrupted, name, artifact, reference):
    """SIGKILL right after the first checkpoint; `resume=true` then continues to the same bits."""
    run = interrupted[name]
    assert run.result().returncode == -signal.SIGKILL
    stage = "calibrate" if name.startswith("calibrate") else "sparse-train"
    out = out_dir(run.args)
    assert not (out / f"{artifact}.safetensors").exists()
    resumed = lota(stage, *run.args, "resume=true")
    assert resumed.returncode == 0, resumed.stderr[-3000:]
    assert 0 < resumed_from(resumed.stderr) < STEPS
    assert_bitwise_equal(out / f"{artifact}.safetensors", runs[reference])


@pytest.mark.slow  # three real processes, signalled
def test_sigterm_saves_a_checkpoint_and_says_how_to_resume(runs, interrupted):
    run = interrupted["calibrate_term"]
    out = out_dir(run.args)
    line = refused(run.result(), "calibrate", "stopped by signal 15 after step", "rerun the same command with "
                   "resume=true", target=out / "task_vector.safetensors")
    checkpoint = Path(re.search(r"checkpoint (\S+);", line).group(1))
    assert (checkpoint / "state.pt").is_file()
    resumed = lota("calibrate", *run.args, "resume=true")
    assert resumed.returncode == 0 and 0 < resumed_from(resumed.stderr) < STEPS, resumed.stderr[-3000:]
    assert_bitwise_equal(out / "task_vector.safetensors", runs["cal_a"])


# --------------------------------------------------------------------------- damaged tensor data

def _stored_entry(path: Path, key: str) -> tuple[int, dict]:
    data = path.read_bytes()
    n = struct.unpack("<Q", data[:8])[0]
    return 8 + n, json.loads(data[8:8 + n])[key]


def test_info_verify_names_the_tensor_whose_data_has_a_flipped_bit(runs, tmp_path):
    path = tmp_path / "tv.safetensors"
    shutil.copy(runs["cal_a"], path)
    result = lota("info", "--verify", path)
    assert result.returncode == 0 and "match their checksums" in result.stderr, result.stderr
    name = Artifact(path).names[5]
    start, entry = _stored_entry(path, name)
    middle = start + (entry["data_offsets"][0] + entry["data_offsets"][1]) // 2
    path.write_bytes(_flip(path.read_bytes(), middle, 0x10))  # one bit of one value: the header is intact
    assert lota("info", path).returncode == 0  # without --verify only the header is checked
    refused(lota("info", "--verify", path), "info", f"{path}: tensor {name!r} does not match its checksum")


def test_format_2_artifacts_are_still_checked_by_their_sha256(runs, tmp_path, monkeypatch):
    """Artifacts written before format 3 record SHA-256 checksums: still read, verified and refused when
    damaged, by the hash they were written with."""
    from lota_cli.artifacts import _writers, tensor_digest

    source = Artifact(runs["st_a"])
    monkeypatch.setattr(_writers, "FORMAT_VERSION", 2)
    monkeypatch.setattr(_writers, "tensor_digest", lambda fmt=2: tensor_digest(2))
    path = save_sparse(tmp_path / "old.safetensors", source.meta, {n: source.shape(n) for n in source.names},
                       {n: ("idx", source.indices(n)) for n in source.names},
                       {n: source.values(n) for n in source.names})
    monkeypatch.undo()
    old = Artifact(path)
    key = f"{old.names[2]}::values"
    assert old.meta.format == 2 and len(old.meta.checksums[key]) == 64  # hex SHA-256
    assert old.meta.checksums[key] == hashlib.sha256(old.array(key).tobytes()).hexdigest()
    assert lota("info", "--verify", path).returncode == 0
    assert all(torch.equal(old.dense(n), source.dense(n)) for n in source.names)
    poke(path, key, 3, 0.5)
    refused(lota("info", "--verify", path), "info", f"{path}: tensor {key!r} does not match its checksum")
    with pytest.raises(LotaError, match="does not match its checksum"):
        Artifact(path).values(old.names[2])


def _delta_readers(runs, tiny_model, tmp_path, path: Path) -> dict:
    """Every stage that reads a sparse delta, given `path`, and the file each must not write."""
    e, m, t, o = tmp_path / "e", tmp_path / "m", tmp_path / "t", tmp_path / "o"
    return {
        "overlap": (lota("overlap", path, runs["st_b"], f"out={o}"), o / "overlap.json"),
        "eval": (lota("eval", f"model.path={tiny_model}", f"tasks.gsm8k.eval_data_files={DATA['arith_test']}",
                      f"eval.deltas=[{path}]", "eval.max_examples=2", "eval.generate=false", f"out={e}"),
                 e / "results.json"),
        "merge": (lota("merge", path, runs["st_b"], f"out={m}"), m / "merged.safetensors"),
        "lotto": (lota("lotto", *fast(tiny_model, t, **{"lotto.previous": f"[{path}]"})), t / "mask.safetensors"),
    }


def test_sparse_delta_with_a_damaged_value_is_refused_by_every_reader(runs, tiny_model, tmp_path):
    path = tmp_path / "delta.safetensors"
    shutil.copy(runs["st_a"], path)
    key = f"{Artifact(path).names[2]}::values"
    poke(path, key, 3, math.nan)  # the data changed, its checksum did not
    for stage, (result, target) in _delta_readers(runs, tiny_model, tmp_path, path).items():
        refused(result, stage, f"{path}: tensor {key!r} does not match its checksum", target=target)


def _rewritten(source: Path, path: Path, edit) -> Path:
    """A copy of a sparse delta with edit(positions, values) applied to one tensor, written the proper way
    (valid checksums), as another tool or a bug could write it; returns the path."""
    artifact = Artifact(source)
    name = artifact.names[1]
    positions, values = {}, {}
    for n in artifact.names:
        idx, val = artifact.indices(n).clone(), artifact.values(n).clone()
        if n == name:
            edit(idx, val)
        positions[n], values[n] = ("idx", idx), val
    return save_sparse(path, artifact.meta, {n: artifact.shape(n) for n in artifact.names}, positions, values)


def test_sparse_delta_with_duplicate_positions_is_refused_by_every_reader(runs, tiny_model, tmp_path):
    def duplicate(idx, values):
        idx[1] = idx[0]

    path = _rewritten(runs["st_a"], tmp_path / "delta.safetensors", duplicate)
    name = Artifact(path).names[1]
    for stage, (result, target) in _delta_readers(runs, tiny_model, tmp_path, path).items():
        refused(result, stage, f"{path}: {name}::idx holds duplicate or unsorted positions", target=target)


def test_sparse_delta_holding_nan_is_refused_by_every_reader(runs, tiny_model, tmp_path, monkeypatch):
    from lota_cli import native

    def nan(idx, values):
        values[4] = math.nan

    # the writer refuses NaN; an older lota's or another tool's would not
    monkeypatch.setattr(native, "all_finite", lambda *args: True)
    path = _rewritten(runs["st_a"], tmp_path / "delta.safetensors", nan)
    monkeypatch.undo()
    name = Artifact(path).names[1]
    for stage, (result, target) in _delta_readers(runs, tiny_model, tmp_path, path).items():
        refused(result, stage, f"{path}: tensor {name!r} holds NaN or Inf values", target=target)
