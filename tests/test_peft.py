"""lota export to PEFT and back, on the tiny model: PEFT alone loads the adapters and gives base + delta's
logits, a LoTTO chain is two named adapters, reading an adapter back gives the exported sparse delta bitwise,
and bad input is one line with nothing written."""

from __future__ import annotations

import copy
import json
import math
import re
from dataclasses import asdict
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file

from conftest import DATA
from lota_cli import LotaError
from lota_cli.artifacts import Artifact, save_dense, save_sparse, stage_meta
from lota_cli.inputs import open_artifact
from lota_cli.config import (EvalConfig, EvalOptions, ExportConfig, LottoConfig, LottoOptions, MergeConfig, ModelConfig, TaskConfig)
from lota_cli.tensors import encode_positions, unpack_bits
from lota_cli.ops import k_for, top_k_mask
from lota_cli.models import add_delta
from lota_cli.interop import ADAPTER_CONFIG, ADAPTER_WEIGHTS, INDICES, PREFIX, VALUES
from lota_cli.stages import eval as eval_stage
from lota_cli.stages import export as export_stage
from lota_cli.stages import lotto as lotto_stage
from lota_cli.stages import merge as merge_stage
from lota_cli.testing import in_process, paths

IDS = torch.arange(2, 34).view(2, 16)  # token ids of two sequences for comparing logits

@pytest.fixture(scope="module")
def base(tiny_base):
    """(model config dict, fingerprint, the loaded model, {name: shape} of the selected weights)."""
    model_cfg, fp, shapes, model = tiny_base
    return model_cfg, fp, model, shapes


def make_delta(path: Path, base, task: str, seed: int, dtype: torch.dtype, excluded=None) -> Path:
    """A sparse delta as sparse-train writes one: the global top 10% of a random task vector whose tensors'
    scales differ, so that each tensor gets its own density (some stored as bits, some as positions), and
    the last tensor none; one entry's value is exactly 0."""
    model_cfg, fp, _, shapes = base
    gen = torch.Generator().manual_seed(seed)
    names = list(shapes)
    task_vector = {n: torch.randn(shapes[n], generator=gen) * 1.2 ** -(i % 5) for i, n in enumerate(names)}
    task_vector[names[-1]] *= 1e-6
    total = sum(math.prod(s) for s in shapes.values())
    chosen = top_k_mask(task_vector, k_for(0.9, total), excluded=excluded)
    positions, values = {}, {}
    for name in names:
        held = unpack_bits(chosen[name], math.prod(shapes[name]))
        positions[name] = encode_positions(chosen[name], held.size)
        values[name] = (task_vector[name].reshape(-1)[held] * 0.05).to(dtype)
    values[names[0]][0] = 0.0
    meta = stage_meta("sparse_delta", "sparse-train", {"model": model_cfg, "task": {"name": task}},
                      model_cfg["path"], fp, sparsity=0.9)
    save_sparse(path, meta, shapes, positions, values)
    return path


@pytest.fixture(scope="module")
def deltas(base, tmp_path_factory):
    """A LoTTO chain: `arith` (float32 values), then `reverse` (bfloat16) on the entries arith left free."""
    root = tmp_path_factory.mktemp("deltas")
    a = make_delta(root / "a.safetensors", base, "arith", 0, torch.float32)
    first = Artifact(a)
    b = make_delta(root / "b.safetensors", base, "reverse", 1, torch.bfloat16,
                   excluded={n: first.bits(n) for n in first.names})
    return a, b


def peft_logits(tiny_model, single: Path, chain: Path) -> dict[str, torch.Tensor]:
    """Logits of the adapters as PEFT and transformers alone load them (nothing of lota on this side)."""
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    def fresh():
        return AutoModelForCausalLM.from_pretrained(tiny_model)

    logits = {}
    with torch.no_grad():
        logits["single"] = PeftModel.from_pretrained(fresh(), single)(IDS).logits
        model = PeftModel.from_pretrained(fresh(), chain / "arith", adapter_name="arith")
        model.load_adapter(chain / "reverse", adapter_name="reverse")
        for name in ("arith", "reverse"):
            model.set_adapter(name)
            logits[name] = model(IDS).logits
        model.base_model.set_adapter(["arith", "reverse"])
        logits["both"] = model(IDS).logits
    return logits


@pytest.fixture(scope="module")
def exported(tiny_model, deltas, tmp_path_factory):
    """`a` exported in process, the chain through the CLI, and the logits PEFT computes from them."""
    root = tmp_path_factory.mktemp("exported")
    a, b = deltas
    [single] = export_stage.run(ExportConfig(inputs=[str(a)], out=str(root / "one")), root / "one")
    result = in_process("export", a, b, f"out={root / 'chain'}")
    [chain] = paths(result)
    return {"single": single, "chain": chain, "stdout": result.stdout, "logits": peft_logits(tiny_model, single, chain)}


def logits_of(model, *artifacts) -> torch.Tensor:
    model = copy.deepcopy(model)
    for artifact in artifacts:
        add_delta(model, artifact)
    with torch.no_grad():
        return model(IDS).logits


# --------------------------------------------------------------------------- lota -> PEFT

def test_peft_alone_loads_the_adapter_and_gives_base_plus_delta(base, deltas, exported):
    a, _ = deltas
    assert exported["single"].name == "peft"
    assert sorted(p.name for p in exported["single"].iterdir()) == [ADAPTER_CONFIG, ADAPTER_WEIGHTS]
    want = logits_of(base[2], Artifact(a))
    assert not torch.allclose(want, logits_of(base[2]), atol=1e-3)  # the delta changes the logits
    assert torch.allclose(exported["logits"]["single"], want, atol=1e-5, rtol=0)


def test_a_lotto_chain_is_two_named_adapters_to_switch_between(base, deltas, exported):
    a, b = map(Artifact, deltas)
    chain = exported["chain"]
    assert exported["stdout"] == f"{chain}\n" and chain.name == "peft"
    assert sorted(p.name for p in chain.iterdir()) == ["arith", "reverse"]  # named by their tasks
    logits = exported["logits"]
    assert torch.allclose(logits["arith"], logits_of(base[2], a), atol=1e-5, rtol=0)
    assert torch.allclose(logits["reverse"], logits_of(base[2], b), atol=1e-5, rtol=0)
    assert torch.allclose(logits["both"], logits_of(base[2], a, b), atol=1e-5, rtol=0)
    assert not torch.allclose(logits["arith"], logits["reverse"], atol=1e-3)


def test_padding_is_the_fewest_zero_entries_that_peft_accepts(deltas, exported):
    """PEFT gives every module int(numel * (1 - sparsity)) entries: the export's sparsity is the largest at which
    each tensor's entries fit, and the entries beyond a tensor's own are 0 at positions outside its mask."""
    a = Artifact(deltas[0])
    config = json.loads((exported["single"] / ADAPTER_CONFIG).read_text())
    assert config["peft_type"] == "SUPERTUNING" and config["base_model_name_or_path"] == a.meta.config["model"]["path"]
    sparsity = config["sparsity"]
    stored = load_file(exported["single"] / ADAPTER_WEIGHTS)
    held = {n: a.indices(n) for n in a.names if a.indices(n).numel()}
    assert len(held) == len(a.names) - 1  # the tensor without entries is not adapted
    assert sorted(config["target_modules"]) == sorted(n.removesuffix(".weight") for n in held)
    counts = {n: int(a.numel(n) * (1 - sparsity)) for n in held}
    assert len({p.numel() / a.numel(n) for n, p in held.items()}) > 1  # so some tensors are padded
    assert any(int(a.numel(n) * (1 - math.nextafter(sparsity, 1))) < p.numel() for n, p in held.items())
    for name, positions in held.items():
        module = PREFIX + name.removesuffix(".weight")
        index, values = stored[f"{module}.{INDICES}"], stored[f"{module}.{VALUES}"]
        k = positions.numel()
        assert (index.dtype, values.dtype, index.numel()) == (torch.int32, torch.float32, counts[name])
        assert torch.equal(index[:k], positions.int()) and torch.equal(values[:k], a.values(name).float())
        assert not bool(values[k:].any()) and not bool(torch.isin(index[k:], positions.int()).any())
        assert index.unique().numel() == index.numel()
    # the size cost: 8 bytes a stored entry against the sparse delta's bits or positions plus values
    data = sum(t.numel() * t.element_size() for t in stored.values())
    assert data == 8 * sum(counts.values())
    ratio = (exported["single"] / ADAPTER_WEIGHTS).stat().st_size / deltas[0].stat().st_size
    print(f"PEFT adapter / sparse delta bytes: {ratio:.2f}, stored entries / entries: "
          f"{sum(counts.values()) / sum(p.numel() for p in held.values()):.2f}")


# --------------------------------------------------------------------------- PEFT -> lota

def test_reading_an_exported_adapter_gives_the_sparse_delta_bitwise(deltas, exported):
    for original, adapters in ((deltas[0], [exported["single"], exported["single"] / ADAPTER_WEIGHTS]),
                               (deltas[0], [exported["chain"] / "arith"]), (deltas[1], [exported["chain"] / "reverse"])):
        want = Artifact(original)
        for path in adapters:
            got = open_artifact(path, kinds=("sparse_delta",))
            assert got.path == path and got.kind == "sparse_delta" and got.names == want.names
            assert got.keys == want.keys  # each tensor's positions stored as bits or as positions, as before
            for name in want.names:
                assert torch.equal(got.indices(name), want.indices(name))
                assert torch.equal(got.values(name), want.values(name)) and got.values(name).dtype == want.values(name).dtype
            assert asdict(got.meta) == asdict(want.meta)  # the fingerprint of the tensors' bytes included


def test_eval_and_merge_read_an_adapter_as_its_sparse_delta(tiny_model, deltas, exported, tmp_path):
    def nll(delta) -> float:
        cfg = EvalConfig(out=str(tmp_path), model=ModelConfig(path=str(tiny_model)),
                         task=TaskConfig(eval_data_files=str(DATA["arith_test"]), max_length=64),
                         eval=EvalOptions(deltas=[str(delta)], max_examples=4, generate=False))
        [path] = eval_stage.run(cfg, tmp_path / Path(delta).name)
        return json.loads(path.read_text())["tasks"]["gsm8k"]["nll"]

    assert nll(exported["single"]) == nll(deltas[0])
    chain = exported["chain"]
    [from_adapters] = merge_stage.run(MergeConfig(inputs=[str(chain / "arith"), str(chain / "reverse")],
                                                  out=str(tmp_path)), tmp_path / "m1")
    [from_deltas] = merge_stage.run(MergeConfig(inputs=[str(d) for d in deltas], out=str(tmp_path)), tmp_path / "m2")
    got, want = Artifact(from_adapters), Artifact(from_deltas)
    for name in want.names:
        assert torch.equal(got.dense(name), want.dense(name)), name


def test_padding_trained_further_in_peft_is_read_back(deltas, exported, tmp_path):
    """Training in PEFT moves the zero padding too: those entries are kept, the rest stays as exported."""
    adapter = tmp_path / "trained"
    adapter.mkdir()
    (adapter / ADAPTER_CONFIG).write_text((exported["single"] / ADAPTER_CONFIG).read_text())
    with safe_open(str(exported["single"] / ADAPTER_WEIGHTS), "pt") as f:
        metadata, stored = f.metadata(), {k: f.get_tensor(k) for k in f.keys()}
    a = Artifact(deltas[0])
    sparsity = json.loads((adapter / ADAPTER_CONFIG).read_text())["sparsity"]
    name = next(n for n in a.names if 0 < a.indices(n).numel() < int(a.numel(n) * (1 - sparsity)))  # padded
    k = a.indices(name).numel()
    module = PREFIX + name.removesuffix(".weight")
    stored[f"{module}.{VALUES}"][k] = 0.25  # the first padding entry
    save_file(stored, adapter / ADAPTER_WEIGHTS, metadata=metadata)

    got = open_artifact(adapter, kinds=("sparse_delta",))
    padded_at = int(stored[f"{module}.{INDICES}"][k])
    want = a.dense(name).reshape(-1)
    want[padded_at] = 0.25
    assert torch.equal(got.dense(name).reshape(-1), want)
    assert got.indices(name).numel() == k + 1
    assert got.meta.fingerprint != a.meta.fingerprint and got.meta.base_fingerprint == a.meta.base_fingerprint
    for other in a.names:
        if other != name:
            assert torch.equal(got.dense(other), a.dense(other)), other


def test_an_adapter_made_by_peft_reads_as_its_sparse_delta(tiny_model, base, tmp_path):
    from peft import SupertuningConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model),
                           SupertuningConfig(target_modules=["q_proj", "down_proj"], sparsity=0.95, init_weights=False))
    model.save_pretrained(tmp_path / "adapter")
    with torch.no_grad():
        want = model(IDS).logits
    delta = open_artifact(tmp_path / "adapter", kinds=("sparse_delta",))
    assert sorted(delta.names) == sorted(f"model.layers.{i}.{m}.weight" for i in range(2)
                                         for m in ("self_attn.q_proj", "mlp.down_proj"))
    for name in delta.names:
        layer = model.base_model.model.get_submodule(name.removesuffix(".weight"))
        assert torch.equal(delta.dense(name), layer.get_delta_weight("default")), name
    delta.check_base(base[1], str(tiny_model))  # it records no base fingerprint: names and shapes decide
    assert torch.allclose(logits_of(base[2], delta), want, atol=1e-5, rtol=0)


def test_format_model_is_base_plus_every_delta(tiny_model, base, deltas, tmp_path):
    from transformers import AutoModelForCausalLM

    [model_dir] = export_stage.run(ExportConfig(inputs=[str(d) for d in deltas], format="model",
                                                out=str(tmp_path)), tmp_path)
    assert model_dir == tmp_path / "model"
    with torch.no_grad():
        got = AutoModelForCausalLM.from_pretrained(model_dir)(IDS).logits
    assert torch.allclose(got, logits_of(base[2], *map(Artifact, deltas)), atol=1e-5, rtol=0)


# --------------------------------------------------------------------------- refusals

def test_export_refusals_in_process(base, deltas, exported, tmp_path):
    model_cfg, fp, _, shapes = base
    mask = tmp_path / "mask.safetensors"
    a = Artifact(deltas[0])
    save_sparse(mask, stage_meta("mask", "extract", {}, model_cfg["path"], fp), shapes,
                {n: encode_positions(a.bits(n), a.numel(n)) for n in a.names})
    embed = tmp_path / "embed.safetensors"
    save_sparse(embed, stage_meta("sparse_delta", "test", {"model": model_cfg}, model_cfg["path"], fp),
                {"model.embed_tokens.weight": (384, 64)},
                {"model.embed_tokens.weight": ("idx", torch.tensor([3], dtype=torch.int32))},
                {"model.embed_tokens.weight": torch.tensor([0.5])})
    cases = [([mask], {}, "is a mask; this stage needs a sparse_delta"),
             ([embed], {}, "is not the weight of an nn.Linear"),
             ([exported["chain"]], {}, "holds the adapters arith, reverse in subdirectories"),
             ([deltas[0]], {"names": ["a", "b"]}, "names has 2 values for 1 inputs"),
             ([deltas[0]], {"names": ["a/b"]}, "give distinct names"),
             ([deltas[0]], {"names": ["a"], "format": "model"}, "names only applies to format=peft")]
    for inputs, extra, says in cases:
        with pytest.raises(LotaError, match=re.escape(says)):
            cfg = ExportConfig(inputs=[str(p) for p in inputs], out=str(tmp_path / "out"), **extra)
            export_stage.run(cfg, tmp_path / "out")
    assert not (tmp_path / "out").exists() or not list((tmp_path / "out").iterdir())


def test_an_adapter_for_another_architecture_is_refused(tmp_path):
    from peft import SupertuningConfig, get_peft_model
    from transformers import LlamaConfig, LlamaForCausalLM

    def adapter(directory: Path, hidden: int) -> Path:
        config = LlamaConfig(vocab_size=64, hidden_size=hidden, intermediate_size=2 * hidden, num_hidden_layers=1,
                             num_attention_heads=2, num_key_value_heads=2)
        LlamaForCausalLM(config).save_pretrained(directory / "base")
        model = get_peft_model(LlamaForCausalLM.from_pretrained(directory / "base"),
                               SupertuningConfig(target_modules=["q_proj"], sparsity=0.5))
        model.save_pretrained(directory / "adapter")
        return directory / "adapter"

    wide, narrow = adapter(tmp_path / "wide", 32), adapter(tmp_path / "narrow", 16)
    config = json.loads((wide / ADAPTER_CONFIG).read_text())
    config["base_model_name_or_path"] = str(tmp_path / "narrow" / "base")  # positions past the narrow weight
    (wide / ADAPTER_CONFIG).write_text(json.dumps(config))
    with pytest.raises(LotaError, match="outside its weight's 256 entries; the adapter was made for another base"):
        open_artifact(wide)
    assert open_artifact(narrow).names == ["model.layers.0.self_attn.q_proj.weight"]


@pytest.fixture(scope="module")
def lora(tiny_model, tmp_path_factory) -> Path:
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    directory = tmp_path_factory.mktemp("lora") / "adapter"
    get_peft_model(AutoModelForCausalLM.from_pretrained(tiny_model), LoraConfig(r=2)).save_pretrained(directory)
    return directory


def test_lotto_refuses_a_lora_adapter_before_loading_anything(lora, tmp_path):
    cfg = LottoConfig(out=str(tmp_path), lotto=LottoOptions(previous=[str(lora)]))
    with pytest.raises(LotaError, match="is a PEFT LORA adapter, and lota reads sparse ones"):
        lotto_stage.run(cfg, tmp_path)
    assert not list(tmp_path.iterdir())


@pytest.mark.parametrize("case", ["lora in eval", "another base in merge", "task vector in export",
                                  "no adapter in overlap"])
def test_bad_input_is_one_line_and_writes_nothing(case, tiny_model, base, deltas, exported, lora, tmp_path):
    model_cfg, fp, _, shapes = base
    out = tmp_path / "out"
    if case == "lora in eval":
        args, says = ["eval", f"model.path={tiny_model}", f"eval.deltas=[{lora}]"], "is a PEFT LORA adapter"
    elif case == "another base in merge":
        other = make_delta(tmp_path / "other.safetensors", (model_cfg, "b" * 64, None, shapes), "arith", 2,
                           torch.float32)
        args, says = ["merge", exported["single"], other], "fingerprint"
    elif case == "task vector in export":
        tv = save_dense(tmp_path / "tv.safetensors", stage_meta("task_vector", "calibrate", {"model": model_cfg},
                                                                  model_cfg["path"], fp),
                        {n: torch.ones(s) for n, s in list(shapes.items())[:2]})
        args, says = ["export", tv], "is a task_vector; this stage needs a sparse_delta"
    else:
        (tmp_path / "empty").mkdir()
        args, says = ["overlap", tmp_path / "empty", deltas[0]], "is a directory without a PEFT adapter"
    result = in_process(*args, f"out={out}", check=False)
    lines = result.stderr.strip().splitlines()
    assert result.returncode == 1 and result.stdout == ""
    assert lines[-1].startswith(f"lota {args[0]}: error: ") and says in lines[-1], result.stderr
    assert not any(line.startswith(("Error executing job", "Traceback")) for line in lines), result.stderr
    assert {p.name for p in out.iterdir()} <= {".hydra", "lota.log", ".lota.lock"}  # Hydra's bookkeeping only
