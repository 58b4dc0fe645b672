"""Digests of everything the tiny pipeline writes, to tell whether a change of the code changed behaviour.

Runs on the tests' tiny Llama (built the same way, seeded) over the generated tasks: calibrate (single and
ddp), extract, sparse-train (single, zero2, zero3, fsdp), lotto, merge (sum, ties, into a model), export
(peft, model) and eval; then prints, as JSON, per artifact a SHA-256 of each stored tensor's bytes and of its
metadata less what names the code that wrote it (`versions`); per model directory a SHA-256 of each file;
eval's results.json as it is. Run it twice into the same `out` (its paths are recorded in the artifacts)
on two checkouts and compare the two outputs:

    python scripts/pipeline_digests.py out=/tmp/digests to=before.json   # on one checkout
    python scripts/pipeline_digests.py out=/tmp/digests to=after.json    # on the other
    diff before.json after.json

Minutes on a 2-core CPU (four two-process runs).
"""

from __future__ import annotations

import hashlib
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "scripts"))
sys.path.insert(0, str(ROOT / "tests"))
import synthetic_tasks  # noqa: E402

ENV = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}


def lota(*args) -> list[str]:
    done = subprocess.run([sys.executable, "-m", "lota_cli", *map(str, args)], stdout=subprocess.PIPE,
                          stderr=subprocess.PIPE, text=True, env=ENV)
    if done.returncode:
        raise SystemExit(f"lota {args[0]} failed:\n{done.stderr[-3000:]}")
    return done.stdout.split()


def safetensors_digest(path: Path) -> dict:
    import struct

    raw = path.read_bytes()
    (n,) = struct.unpack("<Q", raw[:8])
    header = json.loads(raw[8:8 + n])
    meta = header.pop("__metadata__", {})
    out = {"tensors": {}}
    for key, info in header.items():
        begin, end = info["data_offsets"]
        out["tensors"][key] = [info["dtype"], info["shape"],
                               hashlib.sha256(raw[8 + n + begin:8 + n + end]).hexdigest()[:16]]
    for key in ("lota", "lota_source"):  # an artifact's metadata; a PEFT adapter's copy of its delta's
        if key in meta:
            lota_meta = json.loads(meta.pop(key))
            for field in ("versions", "header_sha256"):  # the code that wrote it, and a digest over those
                lota_meta.pop(field, None)
            out[key] = lota_meta
    out["metadata"] = meta
    return out


def directory_digest(path: Path) -> dict:
    out = {}
    for file in sorted(p for p in path.rglob("*") if p.is_file()):
        name = str(file.relative_to(path))
        out[name] = (safetensors_digest(file) if file.suffix == ".safetensors"
                     else hashlib.sha256(file.read_bytes()).hexdigest()[:16])
    return out


def main(argv: list[str]) -> None:
    opts = dict(a.split("=", 1) for a in argv)
    out = Path(opts.get("out", "/tmp/lota-digests")).resolve()
    shutil.rmtree(out, ignore_errors=True)
    data = synthetic_tasks.write(out / "data", n_train=2000, n_test=200)
    import conftest  # the tests' tiny model, built the same way

    conftest.DATA.update(data)
    model = conftest.make_tiny_model(out / "model")
    common = [f"model.path={model}", "task.max_examples=64", "task.max_length=128", "train.max_steps=6",
              "train.batch_size=4", "train.lr=3e-3", "train.log_every=1", "train.warmup_steps=0"]
    arith = [f"task.data_files={data['arith_train']}", f"task.eval_data_files={data['arith_test']}"]
    reverse = ["task=reverse", f"task.data_files={data['reverse_train']}",
               f"task.eval_data_files={data['reverse_test']}"]
    two = ["dist.num_processes=2"]
    written: dict[str, list[str]] = {}
    written["calibrate"] = lota("calibrate", *common, *arith, f"out={out}/cal")
    written["calibrate_ddp"] = lota("calibrate", *common, *arith, "dist=ddp", *two, f"out={out}/cal_ddp")
    written["extract"] = lota("extract", f"extract.task_vector={written['calibrate'][0]}", f"out={out}/ext")
    mask = written["extract"][0]
    for engine in ("single", "zero2", "zero3", "fsdp"):
        extra = [] if engine == "single" else [f"dist={engine}", *two]
        written[f"sparse_train_{engine}"] = lota("sparse-train", *common, *arith, f"sparse_train.mask={mask}",
                                                 *extra, f"out={out}/st_{engine}")
    delta = written["sparse_train_single"][0]
    written["lotto"] = lota("lotto", *common, *reverse, f"lotto.previous=[{delta}]", f"out={out}/lotto")
    written["lotto_mask"] = [str(out / "lotto" / "mask.safetensors")]  # lotto prints only its delta
    delta_b = written["lotto"][0]
    written["merge_sum"] = lota("merge", delta, delta_b, f"out={out}/merge_sum")
    written["merge_ties"] = lota("merge", delta, delta_b, "method=ties", f"out={out}/merge_ties")
    written["merge_model"] = lota("merge", delta, delta_b, f"output_model={out}/merged_model", f"out={out}/mm")
    written["export_peft"] = lota("export", delta, delta_b, f"out={out}/export_peft")
    written["export_model"] = lota("export", delta, delta_b, "format=model", f"out={out}/export_model")
    written["eval"] = lota("eval", f"model.path={model}", *[a.replace("task.", "tasks.gsm8k.") for a in arith],
                           f"eval.deltas=[{delta},{delta_b}]", "eval.max_examples=16", "eval.max_new_tokens=16",
                           f"out={out}/eval")
    digests = {}
    for stage, paths in written.items():
        for path in map(Path, paths):
            key = f"{stage}:{path.relative_to(out)}"
            if path.is_dir():
                digests[key] = directory_digest(path)
            elif path.suffix == ".safetensors":
                digests[key] = safetensors_digest(path)
            else:
                digests[key] = json.loads(path.read_text())
    # to a file: libraries imported here (DeepSpeed's accelerator probe) print on stdout
    Path(opts.get("to", "digests.json")).write_text(json.dumps(digests, indent=1, sort_keys=True) + "\n")


if __name__ == "__main__":
    main(sys.argv[1:])
