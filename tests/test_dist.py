"""Training stages on 2 processes (DDP, FSDP2, DeepSpeed ZeRO-2 and ZeRO-3, over gloo on CPUs) against 1 process
at the same global batch: the same artifacts to float tolerance, frozen entries bitwise the base's, and only
the main process prints. The 1-process reference runs are shared by the engines; calibrate goes through
lota's own launch (dist=...), sparse-train through `accelerate launch -m lota_cli` (a user's launcher), each
engine's two runs made once (`launched`) and shared by the tests that read them: DDP's calibrate runs with
its stderr on a terminal, where the main process's progress bar must show; FSDP2's sparse-train keeps its
checkpoints, which a resumed run must continue bitwise. FSDP2 also: lotto; and two "machines" (two lota
commands on this one) for ddp and fsdp."""

from __future__ import annotations

import importlib.util
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from conftest import changed_inside, losses, saved_weights, tiny_overrides
from lota_cli import LotaError, runs
from lota_cli.artifacts import Artifact
from lota_cli.config import ExtractConfig, ExtractOptions
from lota_cli import testing
from lota_cli.stages import extract
from lota_cli.testing import OFFLINE_ENV, in_process, lota, paths

pytestmark = pytest.mark.dist
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed (make install adds it)")
ENGINES = ["ddp", "fsdp", pytest.param("zero2", marks=needs_deepspeed), pytest.param("zero3", marks=needs_deepspeed)]
# global batch 4 x 2: two micro-batches per step, each split 2 + 2 over the processes
SMALL = {"task.max_examples": 32, "train.max_steps": 3, "train.batch_size": 4, "train.grad_accum": 2}
# Adam divides by sqrt(v): entries with tiny gradients amplify the float rounding of a different reduction order
TOLERANCE = {"task_vector": 1e-5, "sparse_delta": 1e-6}


def overrides(model, out, **extra) -> list[str]:
    return tiny_overrides(model, out, **{**SMALL, **extra})


def max_abs_diff(a, b) -> float:
    left, right = load_file(a), load_file(b)
    assert left.keys() == right.keys()
    return max(float((left[k].double() - right[k].double()).abs().max()) for k in left
               if left[k].is_floating_point())


@pytest.fixture(scope="module")
def reference(tiny_model, tmp_path_factory):
    """calibrate -> extract -> sparse-train on one process (this one)."""
    root = tmp_path_factory.mktemp("one")
    (task_vector,) = paths(in_process("calibrate", *overrides(tiny_model, root / "cal")))
    (mask,) = extract.run(ExtractConfig(extract=ExtractOptions(task_vector=str(task_vector))), root / "ext")
    delta, _ = paths(in_process("sparse-train", *overrides(tiny_model, root / "st", **{
        "sparse_train.mask": mask, "save_model": "true", "train.weight_decay": 0.1})))
    return {"root": root, "task_vector": task_vector, "mask": mask, "delta": delta}


def free_port() -> str:
    return str(runs.free_port())


def on_terminal(*lota_args) -> tuple[subprocess.CompletedProcess, str]:
    """`lota ARGS` with its stderr on a terminal (a pseudo-terminal this process reads): the process, with
    stdout captured, and what the terminal showed."""
    import os
    import pty
    import select

    main, child = pty.openpty()
    proc = subprocess.Popen(testing.command(*lota_args), stdout=subprocess.PIPE, stderr=child, text=True,
                            env={**OFFLINE_ENV, "OMP_NUM_THREADS": "1", "COLUMNS": "120"})
    os.close(child)
    shown = bytearray()
    while True:
        ready, _, _ = select.select([main], [], [], 1.0)
        if ready:
            try:
                chunk = os.read(main, 1 << 16)
            except OSError:  # the other end closed: the process and its children are done writing
                chunk = b""
            if not chunk:
                break
            shown += chunk
        elif proc.poll() is not None:
            break
    os.close(main)
    stdout, _ = proc.communicate(timeout=600)
    return subprocess.CompletedProcess(proc.args, proc.returncode, stdout, ""), shown.decode(errors="replace")


@pytest.fixture(scope="module")
def launched(reference, tiny_model, tmp_path_factory):
    """engine -> its 2-process calibrate (lota's launch) and sparse-train (a user's launcher), each run once."""
    made = {}

    def runs(engine: str) -> dict:
        if engine not in made:
            root = tmp_path_factory.mktemp(f"two-{engine}")
            dist = {"dist": engine, "dist.num_processes": 2}
            if engine == "ddp":  # on a terminal: the main process's progress bar reaches it through the launcher
                cal, shown = on_terminal("calibrate", *overrides(tiny_model, root / "cal", **dist))
                assert cal.returncode == 0, shown[-3000:]
            else:
                cal, shown = lota("calibrate", *overrides(tiny_model, root / "cal", **dist)), None
            # zero2: lota's engine under the user's launcher; ddp, fsdp, zero3: the engine the launcher set up
            # (dist=single); fsdp keeps a checkpoint after every step, for the resume test
            st_args = {"sparse_train.mask": reference["mask"], "save_model": "true", "train.weight_decay": 0.1,
                       **({"dist": "zero2"} if engine == "zero2" else {}),
                       **({"train.save_every": 1, "train.keep_checkpoints": 5} if engine == "fsdp" else {})}
            delta, model_dir = launch(engine, "sparse-train", *overrides(tiny_model, root / "st", **st_args))
            made[engine] = {"root": root, "cal": cal, "shown": shown, "delta": Path(delta), "st_args": st_args}
        return made[engine]

    return runs


def launch(engine: str, *lota_args) -> list[str]:
    """`accelerate launch <engine flags> -m lota_cli ...`, as a user with their own launcher runs lota."""
    port = free_port()
    env = {**OFFLINE_ENV, "OMP_NUM_THREADS": "1"}
    if engine == "ddp":
        flags, env["ACCELERATE_USE_CPU"] = ["--multi_gpu"], "true"
    elif engine == "fsdp":
        flags, env["ACCELERATE_USE_CPU"] = ["--use_fsdp", "--fsdp_version", "2"], "true"
    else:
        flags = ["--use_deepspeed", "--zero_stage", engine[-1]]
    cmd = [sys.executable, "-m", "accelerate.commands.launch", "--num_processes", "2", "--num_machines", "1",
           "--mixed_precision", "no", "--dynamo_backend", "no", "--main_process_port", port, *flags,
           "-m", "lota_cli", *map(str, lota_args)]
    result = subprocess.run(cmd, capture_output=True, text=True, env=env)
    assert result.returncode == 0, result.stderr[-3000:]
    return [line for line in result.stdout.splitlines() if line and Path(line).exists()]  # DeepSpeed logs there


@pytest.mark.parametrize("engine", ENGINES)
def test_two_processes_train_like_one(engine, reference, launched, tiny_model):
    run = launched(engine)
    tmp_path, delta = run["root"], run["delta"]
    assert run["cal"].stdout == f"{tmp_path / 'cal' / 'task_vector.safetensors'}\n"  # the main process alone prints

    tv_diff = max_abs_diff(reference["task_vector"], tmp_path / "cal" / "task_vector.safetensors")
    delta_diff = max_abs_diff(reference["delta"], delta)
    print(f"\n{engine}: 2 vs 1 process, max abs difference: task vector {tv_diff:.2e}, sparse delta {delta_diff:.2e}")
    assert tv_diff < TOLERANCE["task_vector"] and delta_diff < TOLERANCE["sparse_delta"]
    for stage in ("cal", "st"):
        assert losses(tmp_path / stage) == pytest.approx(losses(reference["root"] / stage), rel=1e-5)
    assert Artifact(delta).meta.shapes == Artifact(reference["delta"]).meta.shapes

    changed_inside(saved_weights(tiny_model), saved_weights(tmp_path / "st" / "model"), Artifact(reference["mask"]))


def test_the_main_process_draws_its_progress_bar_on_the_launchers_terminal(launched):
    """stderr of launched processes is piped (to tell which rank failed), yet on a terminal the main process's
    bar shows there as it redraws (its steps up to the last), and no other process draws one."""
    run = launched("ddp")
    shown = run["shown"]
    bar = [part for part in shown.split("\r") if "tok/s" in part and "loss" in part]
    assert bar and "3/3" in bar[-1], shown[-3000:]
    assert shown.count("\x1b[?25l") == 1, shown[-3000:]  # one bar started (it hides the cursor): rank 0's
    assert run["cal"].stdout == f"{run['root'] / 'cal' / 'task_vector.safetensors'}\n"


def test_fsdp_lotto_trains_like_one_process(reference, tiny_model, tmp_path):
    """LoTTO under FSDP2: calibration restores the earlier adapter's entries after every step, each process in
    its own shard (Engine.write_entries), so the new mask drawn from it is the 1-process one, bitwise; the new
    delta agrees to tolerance, and the saved chain model is the 1-process one outside the new mask, bitwise."""
    args = {"lotto.previous": f"[{reference['delta']}]", "save_model": "true"}
    one, two = tmp_path / "one", tmp_path / "two"
    in_process("lotto", *overrides(tiny_model, one, **args))
    result = lota("lotto", *overrides(tiny_model, two, **args, **{"dist": "fsdp", "dist.num_processes": 2}))
    assert paths(result) == [two / "sparse_delta.safetensors", two / "model"]  # the main process alone prints

    mask_one, mask_two = load_file(one / "mask.safetensors"), load_file(two / "mask.safetensors")
    assert mask_one.keys() == mask_two.keys() and all(mask_one[k].equal(mask_two[k]) for k in mask_one)
    delta_diff = max_abs_diff(one / "sparse_delta.safetensors", two / "sparse_delta.safetensors")
    print(f"\nfsdp lotto: 2 vs 1 process, max abs difference: sparse delta {delta_diff:.2e}")
    assert delta_diff < TOLERANCE["sparse_delta"]
    for phase in ("calibrate", "sparse-train"):
        assert losses(two / phase) == pytest.approx(losses(one / phase), rel=1e-5)

    base, chain_one, chain_two = (saved_weights(d) for d in (tiny_model, one / "model", two / "model"))
    earlier, new = Artifact(reference["delta"]), Artifact(two / "sparse_delta.safetensors")
    for name, weight in base.items():
        outside = ~new.mask(name) if name in new.meta.shapes else torch.ones(weight.numel(), dtype=torch.bool)
        assert chain_two[name].reshape(-1)[outside].equal(chain_one[name].reshape(-1)[outside]), name
        if name in earlier.meta.shapes:
            outside &= ~earlier.mask(name)
        assert chain_two[name].reshape(-1)[outside].equal(weight.reshape(-1)[outside]), name


def test_fsdp_resumes_bitwise_from_its_shards(launched, tiny_model, tmp_path):
    """A 2-process FSDP2 sparse-train resumed from its step-1 checkpoint (each process's shard of the values and
    of AdamW's state, beside state.pt) writes the uninterrupted run's delta, bitwise: lota's own launch
    continuing what a user's launcher started."""
    run = launched("fsdp")
    whole, step1 = run["delta"], run["root"] / "st" / "checkpoints" / "step-00000001"
    assert sorted(p.name for p in step1.iterdir()) == [
        "fsdp-shard-00000-of-00002.pt", "fsdp-shard-00001-of-00002.pt", "state.pt"]
    args = {**run["st_args"], "dist": "fsdp", "dist.num_processes": 2, "train.save_every": 0}
    result = lota("sparse-train", *overrides(tiny_model, tmp_path / "resumed", **args, resume=step1))
    (resumed, _) = paths(result)
    assert f"resumed from {step1} at step 1 of 3" in result.stderr
    assert max_abs_diff(whole, resumed) == 0.0
    assert losses(tmp_path / "resumed") == losses(run["root"] / "st")[1:]


def test_a_checkpoint_resumes_only_under_its_engine():
    from types import SimpleNamespace

    from lota_cli.training import FullyShardedV2, Replicated

    fsdp = FullyShardedV2(SimpleNamespace(num_processes=4), "no")
    with pytest.raises(LotaError, match=r"holds the FSDP shards of 2 processes, this run has 4: resume it with "
                                        r"dist=fsdp dist.num_processes=2"):
        fsdp.restore(Path("ck"), {"fsdp_processes": 2}, {}, None)
    with pytest.raises(LotaError, match="was not written by dist=fsdp"):
        fsdp.restore(Path("ck"), {"trainable": {}, "optimizer": {}}, {}, None)
    with pytest.raises(LotaError, match="holds the shards of a partitioning engine"):
        Replicated(None).restore(Path("ck"), {"fsdp_processes": 2}, {}, None)


@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_two_machines_train_like_one(engine, reference, tiny_model, tmp_path):
    """Two lota commands on this machine as two machines of one process each (MACHINE_RANK 0 and 1, MASTER_ADDR,
    MASTER_PORT; dist.num_processes=2 counts both machines' processes), sharing out: both exit 0, machine 0 alone
    prints, and the task vector is the 1-process one."""
    out, port = tmp_path / "cal", free_port()
    args = overrides(tiny_model, out, **{"dist": engine, "dist.num_processes": 2, "dist.num_machines": 2})
    procs, logs = [], []
    for rank in (0, 1):
        stdout, stderr = open(tmp_path / f"stdout{rank}", "w+"), open(tmp_path / f"stderr{rank}", "w+")
        logs.append((stdout, stderr))
        procs.append(subprocess.Popen(testing.command("calibrate", *args), stdout=stdout, stderr=stderr, text=True,
                                      env={**OFFLINE_ENV, "OMP_NUM_THREADS": "1", "MACHINE_RANK": str(rank),
                                           "MASTER_ADDR": "127.0.0.1", "MASTER_PORT": port}))
    try:
        for proc in procs:
            proc.wait(timeout=600)
    finally:
        for proc in procs:
            if proc.poll() is None:
                proc.kill()
    printed = []
    for proc, (stdout, stderr) in zip(procs, logs):
        stdout.seek(0), stderr.seek(0)
        printed.append(stdout.read())
        assert proc.returncode == 0, stderr.read()[-3000:]
    assert printed == [f"{out / 'task_vector.safetensors'}\n", ""]  # machine 0's main process alone
    tv_diff = max_abs_diff(reference["task_vector"], out / "task_vector.safetensors")
    print(f"\n{engine}: 2 machines vs 1 process, max abs difference: task vector {tv_diff:.2e}")
    assert tv_diff < TOLERANCE["task_vector"]
    assert losses(out) == pytest.approx(losses(reference["root"] / "cal"), rel=1e-5)

def test_engine_errors_are_one_line(monkeypatch):
    from lota_cli import runs as dist
    from lota_cli.runs import _launch
    from lota_cli.config import DistConfig, TrainConfig, TrainStageConfig

    def cfg(**kw):
        return TrainStageConfig(out="x", dist=DistConfig(**kw))

    monkeypatch.delenv("LOCAL_RANK", raising=False)
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_OFFLOAD_PARAMS"):
        monkeypatch.delenv(name, raising=False)
    dist.check(cfg(engine="fsdp", num_processes=2))
    for offload in ("offload_params", "offload_optimizer"):
        with pytest.raises(LotaError, match=rf"^dist.{offload}=true is not supported with FSDP .*: use dist=zero3"):
            dist.check(cfg(engine="fsdp", **{offload: True}))
    with pytest.raises(LotaError, match="fp16 is not supported with dist=fsdp"):
        dist.check(TrainStageConfig(out="x", dist=DistConfig(engine="fsdp"), train=TrainConfig(mixed_precision="fp16")))
    # a user's `accelerate launch --use_fsdp`: its FSDP version 2 is lota's FSDP2 engine, version 1 is refused
    monkeypatch.setenv("ACCELERATE_USE_FSDP", "true")
    monkeypatch.setenv("FSDP_VERSION", "2")
    assert dist.uses_fsdp(cfg()) and not dist.uses_fsdp(cfg(engine="ddp"))
    dist.check(cfg())
    monkeypatch.setenv("FSDP_OFFLOAD_PARAMS", "true")
    with pytest.raises(LotaError, match="^fsdp_offload_params in your accelerate config is not supported"):
        dist.check(cfg())
    monkeypatch.setenv("FSDP_VERSION", "1")
    with pytest.raises(LotaError, match="chose FSDP version 1, .*: set fsdp_version: 2"):
        dist.check(cfg())
    dist.check(cfg(engine="ddp"))  # an engine named in dist= wins over the accelerate config
    for name in ("ACCELERATE_USE_FSDP", "FSDP_VERSION", "FSDP_OFFLOAD_PARAMS"):
        monkeypatch.delenv(name)
    with pytest.raises(LotaError, match="needs an engine"):
        dist.check(cfg(num_processes=2))
    monkeypatch.setattr(_launch.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(LotaError, match=r"needs DeepSpeed, which is not installed: .*pip install"):
        dist.check(cfg(engine="zero2"))
    assert dist.needs_launch(cfg(engine="ddp", num_processes=2)) and not dist.needs_launch(cfg())


def test_deepspeed_batch_follows_train_config():
    from lota_cli.config import DistConfig, TrainConfig, TrainStageConfig
    from lota_cli.training import deepspeed_config

    cfg = TrainStageConfig(out="x", train=TrainConfig(batch_size=8, grad_accum=3, max_grad_norm=None),
                           dist=DistConfig(engine="zero3", offload_optimizer=True))
    ds = deepspeed_config(cfg, world=4)
    assert (ds["train_micro_batch_size_per_gpu"], ds["gradient_accumulation_steps"], ds["train_batch_size"]) == (2, 3, 24)
    assert ds["gradient_clipping"] == 0.0 and ds["zero_optimization"]["stage"] == 3
    assert ds["zero_optimization"]["offload_optimizer"]["device"] == "cpu"


# the failure path is the launcher's, the same for every engine (zero2 and zero3 passed it too, by hand)
@pytest.mark.parametrize("engine", ["ddp", "fsdp"])
def test_a_killed_rank_ends_the_run_with_how_to_resume(engine, tiny_model, tmp_path):
    """SIGKILL to rank 1 mid-run: the command exits non-zero within 60 s, and its last stderr line names the rank,
    the signal, the newest checkpoint and the command that resumes."""
    import os
    import signal
    import time

    import psutil

    out = tmp_path / "run"
    args = overrides(tiny_model, out, **{"dist": engine, "dist.num_processes": 2, "train.max_steps": 100000,
                                          "train.save_every": 1, "train.log_every": 1000})
    proc = subprocess.Popen(testing.command("calibrate", *args), stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                            text=True, env={**testing.OFFLINE_ENV, "OMP_NUM_THREADS": "1"})
    try:
        deadline = time.monotonic() + 300
        while not list(out.glob("checkpoints/step-*/state.pt")):
            assert proc.poll() is None and time.monotonic() < deadline, "no checkpoint was written"
            time.sleep(0.5)
        rank1 = [p for p in psutil.Process(proc.pid).children(recursive=True)
                 if "lota_cli" in " ".join(p.cmdline()) and p.environ().get("RANK") == "1"]
        assert len(rank1) == 1
        killed_at = time.monotonic()
        os.kill(rank1[0].pid, signal.SIGKILL)
        _, err = proc.communicate(timeout=60)
    finally:
        if proc.poll() is None:
            for child in psutil.Process(proc.pid).children(recursive=True):
                child.kill()
            proc.kill()
    assert proc.returncode != 0 and time.monotonic() - killed_at < 60
    last = err.strip().splitlines()[-1]
    newest = sorted(out.glob("checkpoints/step-*"))[-1]
    assert last.startswith("lota calibrate: error: process rank 1 was killed by SIGKILL; "), last
    assert f"newest checkpoint: {newest}; resume with: lota calibrate " in last and last.endswith(" resume=true")
