"""lota merge ... output_model=: the base's safetensors shards streamed tensor by tensor (no model object),
checked against the loaded-model path it replaces, on sharded, single-file and tied-embedding bases, and
its refusals of damaged checkpoints."""

from __future__ import annotations

import json
import logging
import shutil
from dataclasses import asdict
from pathlib import Path

import pytest
import torch

from lota_cli.workflows import _merge as merge_module
from lota_cli import native
from lota_cli.config import MergeConfig, ModelConfig, ParamsConfig
from lota_cli.stages import merge as merge_stage
from lota_cli.testing import in_process
from conftest import disjoint_deltas, imported_by, saved_weights, write_dense, write_sparse



def make_base(directory: Path, tied: bool, shard_size: str | None) -> Path:
    """A 2-layer Llama (the conftest tokenizer), saved sharded (shard_size) or as one file."""
    from conftest import make_tokenizer
    from transformers import LlamaConfig, LlamaForCausalLM

    tokenizer = make_tokenizer()
    config = LlamaConfig(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=2, tie_word_embeddings=tied,
                         pad_token_id=tokenizer.pad_token_id)
    torch.manual_seed(3)
    model = LlamaForCausalLM(config).to(torch.bfloat16)
    model.save_pretrained(directory, **({"max_shard_size": shard_size} if shard_size else {}))
    tokenizer.save_pretrained(directory)
    return directory


@pytest.fixture(scope="module", params=["sharded", "single", "tied"])
def base(request, tmp_path_factory):
    """(model directory, model config dict, fingerprint, selected shapes) of a bf16 base."""
    from lota_cli.models import fingerprint, load_model, select_params

    directory = make_base(tmp_path_factory.mktemp("base") / request.param, tied=request.param == "tied",
                          shard_size="60KB" if request.param == "sharded" else None)
    if request.param == "sharded":
        assert (directory / "model.safetensors.index.json").is_file()
    model_cfg = ModelConfig(path=str(directory), dtype="bfloat16")
    model, _ = load_model(model_cfg)
    shapes = {n: tuple(model.get_parameter(n).shape) for n in select_params(model, ParamsConfig())}
    return directory, asdict(model_cfg), fingerprint(model), shapes


def _merge(tmp_path, inputs, streamed: bool, monkeypatch, **options) -> Path:
    target = tmp_path / ("streamed" if streamed else "loaded")
    with monkeypatch.context() as patch:
        if not streamed:  # today's path: the base loaded as a model, deltas added, saved
            patch.setattr(merge_module, "local_directory", lambda cfg: (None, "test"))
        else:  # and never that path when streaming
            patch.setattr(merge_module, "_through_model", lambda *args: pytest.fail("the base was loaded"))
        merge_stage.run(MergeConfig(inputs=[str(p) for p in inputs], out=str(tmp_path), output_model=str(target),
                                    **options), tmp_path / "run")
    return target


@pytest.mark.parametrize("base,method,dense_b,dtype", [
    ("sharded", "sum", False, "float32"), ("single", "sum", False, "float32"), ("tied", "sum", False, "float32"),
    # the other methods on one base: the bases differ only in how shards are read, which sum covers
    ("sharded", "task_arithmetic", False, "bfloat16"), ("sharded", "ties", True, "bfloat16")], indirect=["base"])
def test_streamed_merge_equals_the_loaded_model_path(tmp_path, base, monkeypatch, method, dense_b, dtype):
    directory, model_cfg, fp, shapes = base
    da, db = disjoint_deltas(shapes, seed=2, density=0.2)
    db = {n: d + 1e-3 * (torch.arange(d.numel()).view(d.shape) % 3 == 0) for n, d in db.items()}  # overlaps a
    a = write_sparse(tmp_path / "a.safetensors", da, fp, model_cfg)
    b = (write_dense if dense_b else write_sparse)(tmp_path / "b.safetensors", db, fp, model_cfg)
    options = {"method": method, "dtype": dtype, "shard_size": "50KB"}
    if method == "task_arithmetic":
        options["weights"] = [0.7, 1.3]
    streamed = _merge(tmp_path, [a, b], True, monkeypatch, **options)
    loaded = _merge(tmp_path, [a, b], False, monkeypatch, **options)

    ours, theirs = saved_weights(streamed), saved_weights(loaded)
    assert set(ours) == set(theirs)
    for name, tensor in theirs.items():
        assert ours[name].dtype == tensor.dtype == getattr(torch, dtype), name
        assert torch.equal(ours[name], tensor), name
    changed = [n for n in shapes if not torch.equal(ours[n].float(), saved_weights(directory)[n].float())]
    assert changed == list(shapes)  # every selected tensor got its delta
    index = json.loads((streamed / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"]) == set(ours) and len(set(index["weight_map"].values())) > 1
    assert json.loads((streamed / "config.json").read_text())["dtype"] == dtype
    assert (streamed / "tokenizer.json").is_file()


def test_streamed_model_loads_and_runs(tmp_path, base, monkeypatch):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    directory, model_cfg, fp, shapes = base
    da, _ = disjoint_deltas(shapes, seed=4)
    a = write_sparse(tmp_path / "a.safetensors", da, fp, model_cfg)
    streamed = _merge(tmp_path, [a], True, monkeypatch, dtype="bfloat16")
    model = AutoModelForCausalLM.from_pretrained(streamed)
    tokenizer = AutoTokenizer.from_pretrained(streamed)
    assert model.dtype == torch.bfloat16
    logits = model(**tokenizer("1 + 2 =", return_tensors="pt")).logits
    assert torch.isfinite(logits).all()
    if base[0].name == "tied":
        assert model.lm_head.weight.data_ptr() == model.model.embed_tokens.weight.data_ptr()


@pytest.mark.parametrize("base", ["single"], indirect=True)
def test_a_base_config_without_architectures_gives_an_output_that_names_its_class(tmp_path, base, monkeypatch, caplog):
    """mergekit and vLLM choose the model class from config.json's `architectures`; a base written from a bare
    config class has none, and the merged model gets its model_type's class (one log line), not a copy of the gap."""
    directory, model_cfg, fp, shapes = base
    bare = tmp_path / "bare"
    shutil.copytree(directory, bare)
    config = json.loads((bare / "config.json").read_text())
    assert config.pop("architectures") == ["LlamaForCausalLM"]
    (bare / "config.json").write_text(json.dumps(config))
    da, _ = disjoint_deltas(shapes, seed=5)
    a = write_sparse(tmp_path / "a.safetensors", da, fp, {**model_cfg, "path": str(bare)})
    caplog.set_level("INFO", logger="lota_cli.workflows")
    streamed = _merge(tmp_path, [a], True, monkeypatch)
    assert json.loads((streamed / "config.json").read_text())["architectures"] == ["LlamaForCausalLM"]
    assert [r.getMessage() for r in caplog.records if "architectures" in r.getMessage()] == [
        "the base's config.json lists no architectures; the output's says LlamaForCausalLM (from model_type llama)"]
    assert "architectures" not in json.loads((bare / "config.json").read_text())  # the base is left as it was


def _damage(directory: Path, how: str) -> None:
    index = directory / "model.safetensors.index.json"
    weight_map = json.loads(index.read_text())["weight_map"]
    shard = directory / sorted(set(weight_map.values()))[-1]
    if how == "missing shard":
        shard.unlink()
    elif how == "index names a missing tensor":
        weight_map["model.layers.9.mlp.up_proj.weight"] = shard.name
        index.write_text(json.dumps({"metadata": {}, "weight_map": weight_map}))
    else:  # truncated
        with open(shard, "r+b") as f:
            f.truncate(shard.stat().st_size - 100)


@pytest.mark.parametrize("how", ["missing shard", "index names a missing tensor", "truncated shard"])
def test_damaged_base_checkpoint_is_one_line_and_writes_nothing(tmp_path, tmp_path_factory, how):
    directory = make_base(tmp_path / "base", tied=False, shard_size="60KB")
    model_cfg = asdict(ModelConfig(path=str(directory)))
    from lota_cli.models import fingerprint, load_model

    fp = fingerprint(load_model(ModelConfig(path=str(directory)))[0])
    name = "model.layers.0.mlp.up_proj.weight"
    a = write_sparse(tmp_path / "a.safetensors", {name: torch.eye(128, 64)[:, :64] * 0.01}, fp, model_cfg)
    _damage(directory, how)
    target = tmp_path / "merged"
    result = in_process("merge", a, f"output_model={target}", f"out={tmp_path / 'run'}", check=False)
    assert result.returncode == 1
    errors = [line for line in result.stderr.splitlines() if "error" in line.lower() or "Traceback" in line]
    assert len(errors) == 1 and errors[0].startswith("lota merge: error:"), result.stderr
    assert {"missing shard": "missing", "index names a missing tensor": "does not hold it",
            "truncated shard": "truncated"}[how] in errors[0]
    assert result.stdout == "" and not target.exists()
    assert not [p for p in tmp_path.iterdir() if p.name.startswith(".merged")]


def test_nan_in_the_base_is_refused_naming_the_weight(tmp_path):
    from safetensors.torch import load_file, save_file

    directory = make_base(tmp_path / "base", tied=False, shard_size=None)
    tensors = load_file(directory / "model.safetensors")
    from lota_cli.models import fingerprint, load_model

    fp = fingerprint(load_model(ModelConfig(path=str(directory)))[0])
    name = "model.embed_tokens.weight"
    tensors[name].view(-1)[1] = float("nan")  # an entry the base fingerprint does not sample
    save_file(tensors, directory / "model.safetensors", metadata={"format": "pt"})
    a = write_sparse(tmp_path / "a.safetensors", {"model.layers.0.mlp.up_proj.weight": torch.ones(128, 64) * 0.01},
                     fp, asdict(ModelConfig(path=str(directory))))
    target = tmp_path / "merged"
    result = in_process("merge", a, f"output_model={target}", f"out={tmp_path / 'run'}", check=False)
    assert result.returncode == 1 and not target.exists()
    assert result.stderr.strip().splitlines()[-1:] == [
        f"lota merge: error: model {str(directory)!r}: weight {name!r} holds NaN or Inf values; the model files are "
        "damaged or the model diverged: use an intact copy"]


def test_saved_fingerprint_of_the_loaded_model_equals_the_checkpoints(base):
    """What training records (base_checkpoint) is what the streaming merge computes from the shards alone."""
    from lota_cli.io import SavedModel
    from lota_cli.models import load_model, model_saved_fingerprint

    directory, model_cfg, _, _ = base
    checkpoint = SavedModel(directory)
    model, _ = load_model(ModelConfig(**model_cfg))
    assert model_saved_fingerprint(model) == checkpoint.saved_fingerprint()


@pytest.mark.parametrize("recorded", ["right", "wrong"])
def test_a_recorded_base_checkpoint_spares_the_model_skeleton(tmp_path, base, monkeypatch, recorded):
    """With the base_checkpoint training records, the base is checked from its shards and no model code is
    imported; a base_checkpoint that does not match falls back to the skeleton and base_fingerprint."""
    from lota_cli.models import _loading  # state_dict_sources asks it for the skeleton
    from lota_cli.models import load_model, model_saved_fingerprint
    from lota_cli.artifacts import Artifact, save_sparse
    from lota_cli.tensors import encode_positions

    directory, model_cfg, fp, shapes = base
    da, _ = disjoint_deltas(shapes, seed=5)
    a = Artifact(write_sparse(tmp_path / "a0.safetensors", da, fp, model_cfg))
    meta = a.meta
    meta.base_checkpoint = model_saved_fingerprint(load_model(ModelConfig(**model_cfg))[0])
    if recorded == "wrong":
        meta.base_checkpoint = "f" * 64
    path = save_sparse(tmp_path / "a.safetensors", meta, {n: a.shape(n) for n in a.names},
                       {n: encode_positions(a.bits(n), a.numel(n)) for n in a.names}, {n: a.values(n) for n in a.names})
    skeletons = []
    monkeypatch.setattr(_loading, "skeleton", lambda cfg, real=_loading.skeleton: skeletons.append(cfg) or real(cfg))
    streamed = _merge(tmp_path, [path], True, monkeypatch, dtype="bfloat16")
    assert len(skeletons) == (0 if recorded == "right" else 1)
    if recorded == "right" and native.kernels() is not None:  # from the command line: numpy and the kernels only

        call = f"run('merge', '{path}', 'output_model={tmp_path / 'cli'}', 'dtype=bfloat16', 'out={tmp_path / 'run'}')"
        assert imported_by(call, cwd=tmp_path) == [([], False)]
        from_cli = saved_weights(tmp_path / "cli")
        assert all(torch.equal(from_cli[n], t) for n, t in saved_weights(streamed).items())
    loaded = _merge(tmp_path, [path], False, monkeypatch, dtype="bfloat16")
    ours, theirs = saved_weights(streamed), saved_weights(loaded)
    assert all(torch.equal(ours[n], t) for n, t in theirs.items())


@pytest.mark.parametrize("base,method,dtype", [
    ("sharded", "sum", "bfloat16"), ("tied", "task_arithmetic", "bfloat16"), ("single", "sum", "float16")],
    indirect=["base"])
def test_the_native_kernel_merges_as_the_numpy_path(tmp_path, base, monkeypatch, caplog, method, dtype):
    """The fused kernel against the numpy path it replaces: the same bits, the same overlap counts. bfloat16
    (the base's dtype): its bytes read as they are, then changed in place; float16: converted piece by piece."""
    from lota_cli import native

    if native.kernels() is None:
        pytest.skip("no C compiler to build the kernels")
    directory, model_cfg, fp, shapes = base
    da, db = disjoint_deltas(shapes, seed=5, density=0.3)
    db = {n: d + 1e-3 * (torch.arange(d.numel()).view(d.shape) % 4 == 0) for n, d in db.items()}  # overlaps a
    inputs = [write_sparse(tmp_path / "a.safetensors", da, fp, model_cfg),
              write_sparse(tmp_path / "b.safetensors", db, fp, model_cfg)]
    options = {"method": method, "dtype": dtype, "scale": 0.9}
    if method == "task_arithmetic":
        options["weights"] = [0.7, -1.3]
    outputs, logs = [], []
    for kernels in (native.kernels, lambda: None):
        monkeypatch.setattr(native, "kernels", kernels)
        caplog.clear()
        with caplog.at_level(logging.INFO, "lota_cli.workflows"):
            outputs.append(saved_weights(_merge(tmp_path / kernels.__name__.strip("<>"), inputs, True, monkeypatch,
                                                **options)))
        logs.append([r.getMessage() for r in caplog.records if "Jaccard" in r.getMessage()])
    ours, theirs = outputs
    assert set(ours) == set(theirs)
    for name in theirs:
        assert torch.equal(ours[name].view(torch.uint8), theirs[name].view(torch.uint8)), name
    assert logs[0] == logs[1] and len(logs[0]) == 1 and "sign conflicts" in logs[0][0]


@pytest.mark.parametrize("base", ["sharded"], indirect=True)
def test_direct_io_and_small_buffers_write_the_same_files(tmp_path, base, monkeypatch):
    """The output shards written with direct I/O through buffers a fraction of a tensor, regions of a few pages
    (many flushes, tensors split across buffers, tails of partial blocks) are byte for byte the default
    write's; so is an artifact (its header rewritten at the end)."""
    from lota_cli.io import _sequential as sequential

    directory, model_cfg, fp, shapes = base
    da, db = disjoint_deltas(shapes, seed=2, density=0.2)
    inputs = [write_sparse(tmp_path / "a.safetensors", da, fp, model_cfg),
              write_sparse(tmp_path / "b.safetensors", db, fp, model_cfg)]
    outputs = []
    for small in (False, True):
        with monkeypatch.context() as patch:
            if small:
                patch.setattr(sequential, "DIRECT_MIN", 0)
                patch.setattr(sequential, "BUFFER", 5 * sequential.ALIGN)
                patch.setattr(merge_module, "REGION_BYTES", 3 * sequential.ALIGN)
            target = _merge(tmp_path / f"small_{small}", inputs, True, monkeypatch, method="sum")
            # the same out= both times: the artifact records its config
            task_vector = merge_stage.run(MergeConfig(inputs=[str(p) for p in inputs], out=str(tmp_path / "tv")),
                                          tmp_path / "tv")[0]
        outputs.append({p.name: p.read_bytes() for p in [*target.iterdir(), task_vector]})
    assert outputs[0].keys() == outputs[1].keys() and any(name.endswith(".safetensors") for name in outputs[0])
    for name in outputs[0]:
        assert outputs[0][name] == outputs[1][name], name
