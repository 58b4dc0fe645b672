"""Sparse training of any weight, not only nn.Linear: the fused 3-D experts of MoE models (transformers 5
layout), GPT-2's Conv1D, and 1-D / N-D parameters read by arbitrary module code (sparse.py's general path).

In process: default selection (Llama unchanged, MoE experts in, routers out), value gradients against a
dense reference, no merged copy kept for backward, exact freezing and fold, refusals of what cannot train.
Then the CLI pipeline calibrate -> extract -> sparse-train -> lotto -> merge -> eval on a tiny random
Qwen3-MoE, Mixtral and GPT-2."""

from __future__ import annotations

import json
import math
import re
from pathlib import Path

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from conftest import DATA, changed_inside, losses, make_tokenizer, random_positions, tiny_overrides
from lota_cli import LotaError
from lota_cli.training import _sparse as sparse
from lota_cli.artifacts import Artifact
from lota_cli.config import ParamsConfig
from lota_cli.models import select_params
from lota_cli.config import selected
from lota_cli.testing import in_process, paths

MODELS = ("qwen3_moe", "mixtral", "gpt2")
EXPERTS = re.compile(r".*\.mlp\.experts\.(gate_up_proj|down_proj)")
ROUTER = re.compile(r".*\.mlp\.gate\.weight")


def build(kind: str, vocab: int = 128, seed: int = 0, experts_implementation: str | None = None, **special):
    """A tiny random model: 2 layers, hidden 64; MoE with 4 experts, top-2 (eval mode: no dropout)."""
    from transformers import (GPT2Config, GPT2LMHeadModel, LlamaConfig, LlamaForCausalLM, MixtralConfig,
                              MixtralForCausalLM, Qwen3MoeConfig, Qwen3MoeForCausalLM)

    common = dict(vocab_size=vocab, hidden_size=64, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=512, tie_word_embeddings=False, **special)
    if kind == "qwen3_moe":
        cls, config = Qwen3MoeForCausalLM, Qwen3MoeConfig(intermediate_size=128, moe_intermediate_size=32,
                                                          num_experts=4, num_experts_per_tok=2, **common)
    elif kind == "mixtral":
        cls, config = MixtralForCausalLM, MixtralConfig(intermediate_size=64, num_local_experts=4,
                                                        num_experts_per_tok=2, **common)
    elif kind == "llama":
        cls, config = LlamaForCausalLM, LlamaConfig(intermediate_size=128, **common)
    else:  # GPT-2: Conv1D layers, lm_head tied to the token embedding
        cls, config = GPT2LMHeadModel, GPT2Config(vocab_size=vocab, n_embd=64, n_layer=2, n_head=4, n_positions=512,
                                                  **special)
    if experts_implementation:
        config._experts_implementation = experts_implementation
    torch.manual_seed(seed)
    return cls(config).eval()


def random_values(positions, seed=1):
    g = torch.Generator().manual_seed(seed)
    return {n: torch.randn(len(i), generator=g) * 0.02 for n, i in positions.items()}


# --------------------------------------------------------------------------- selection

def test_default_selection_on_llama_is_unchanged():
    """Same names in the same order as the old rule: 2-D, attention/MLP weights, no norm/embed/lm_head."""
    model = build("llama")
    old = [n for n, p in model.named_parameters() if p.dim() == 2
           and re.fullmatch(r".*(attn|attention|mlp|ffn|feed_forward).*\.weight$", n)
           and not re.fullmatch(r".*(norm|embed|lm_head).*", n)]
    assert select_params(model, ParamsConfig()) == old
    assert len(old) == 14 and old[0] == "model.layers.0.self_attn.q_proj.weight"


@pytest.mark.parametrize("kind", ["qwen3_moe", "mixtral"])
def test_default_selection_takes_the_fused_experts_and_leaves_the_routers(kind):
    model = build(kind)
    names = select_params(model, ParamsConfig())
    experts = [n for n in names if EXPERTS.fullmatch(n)]
    assert len(experts) == 4 and all(model.get_parameter(n).dim() == 3 for n in experts)
    assert not any(ROUTER.fullmatch(n) for n in names)
    assert [n for n in names if n not in experts] == [n for n in names if n.endswith("proj.weight")]  # attention


def test_selection_rules_by_name():
    shapes = {
        "model.layers.0.mlp.experts.gate_up_proj": (8, 64, 32), "model.layers.0.mlp.experts.down_proj": (8, 32, 32),
        "model.layers.0.mlp.experts.gate_up_proj_bias": (8, 64), "model.layers.0.mlp.gate.weight": (8, 32),
        "model.layers.0.mlp.router.weight": (8, 32), "model.layers.0.feed_forward.router.weight": (8, 32),
        "model.layers.0.feed_forward.experts.gate_up_proj": (8, 32, 64),  # Llama 4: [experts, hidden, 2 I]
        "model.layers.0.mlp.shared_expert.gate_proj.weight": (16, 32), "model.layers.0.mlp.shared_expert_gate.weight": (1, 32),
        "model.layers.0.mlp.gate_proj.weight": (16, 32), "model.layers.0.self_attn.q_proj.bias": (32,),
        "transformer.h.0.attn.c_attn.weight": (32, 96),
    }
    assert selected(shapes, ParamsConfig()) == [
        "model.layers.0.mlp.experts.gate_up_proj", "model.layers.0.mlp.experts.down_proj",
        "model.layers.0.feed_forward.experts.gate_up_proj", "model.layers.0.mlp.shared_expert.gate_proj.weight",
        "model.layers.0.mlp.gate_proj.weight", "transformer.h.0.attn.c_attn.weight"]


# --------------------------------------------------------------------------- the general path

class Odd(nn.Module):
    """Parameters used by arbitrary module code: a 4-D kernel through conv2d, a 1-D scale, a 0-D offset, and a
    matrix read twice."""

    def __init__(self):
        super().__init__()
        self.kernel = nn.Parameter(torch.randn(3, 2, 2, 2))
        self.scale = nn.Parameter(torch.randn(3))
        self.offset = nn.Parameter(torch.randn(()))
        self.mix = nn.Parameter(torch.randn(12, 12))

    def forward(self, x):  # x: [batch, 2, 3, 3]
        y = F.conv2d(x, self.kernel) * self.scale[:, None, None] + self.offset  # [batch, 3, 2, 2]
        y = y.flatten(1)
        return (y @ self.mix).tanh() @ self.mix.t()


class Child(nn.Module):
    def __init__(self):
        super().__init__()
        self.gain = nn.Parameter(torch.randn(8))

    def forward(self, x, weight):  # a tensor of its parent's, used (and saved) inside this module's forward
        return (x @ weight) * self.gain


class Parent(nn.Module):
    def __init__(self):
        super().__init__()
        self.weight = nn.Parameter(torch.randn(8, 8))
        self.child = Child()

    def forward(self, x):
        return self.child(x, self.weight)


class Toy(nn.Module):
    def __init__(self):
        super().__init__()
        from transformers.pytorch_utils import Conv1D

        torch.manual_seed(0)
        self.odd = Odd()
        self.parent = Parent()
        self.linear = nn.Linear(12, 8)  # weight: the fast path; bias: the general path, on the same module
        self.conv1d = Conv1D(6, 8)
        self.embed = nn.Embedding(5, 6)

    def forward(self, x, ids):
        return (self.conv1d(self.parent(self.linear(self.odd(x)))) * self.embed(ids)).square().sum()


TOY_NAMES = ["odd.kernel", "odd.scale", "odd.offset", "odd.mix", "linear.weight", "linear.bias", "conv1d.weight",
             "embed.weight", "parent.weight", "parent.child.gain"]


def toy_loss(model):
    g = torch.Generator().manual_seed(2)
    return model(torch.randn(4, 2, 3, 3, generator=g), torch.randint(0, 5, (4,), generator=g))


def dense_reference(model, positions, values):
    """The same model with the values added into its weights, trained densely: its weights' gradients at the
    positions are what the values' gradients must be."""
    with torch.no_grad():
        for name, index in positions.items():
            model.get_parameter(name).view(-1).index_add_(0, index.long(), values[name])
    for p in model.parameters():
        p.requires_grad_(False)
    for name in positions:
        model.get_parameter(name).requires_grad_(True)
    return model


def model_loss(model, ids):
    return model(input_ids=ids, labels=ids).loss


@pytest.mark.parametrize("case", ["toy", "qwen3_moe grouped_mm", "qwen3_moe eager", "mixtral", "gpt2",
                                  "qwen3_moe checkpointed", "mixtral routers"])
def test_value_gradients_are_the_dense_gradients_at_the_mask(case):
    """Bitwise: the merged tensor is built by the same index_add and the module runs the same ops on it."""
    kind, _, variant = case.partition(" ")
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))

    def make():
        if kind == "toy":
            return Toy()
        model = build(kind, experts_implementation=variant if variant in ("eager", "grouped_mm") else None)
        if variant == "checkpointed":
            getattr(model, "activation_checkpointing_enable", model.gradient_checkpointing_enable)()
            model.train()  # checkpointing only acts in training mode (the models have no dropout)
        return model

    model = make()
    if kind == "toy":
        names = TOY_NAMES
    else:  # routers: trained when asked for (params.exclude without them)
        params = ParamsConfig(exclude=[r".*(norm|embed|lm_head).*"]) if variant == "routers" else ParamsConfig()
        names = select_params(model, params)
        assert any(ROUTER.fullmatch(n) for n in names) == (variant == "routers")
    positions = random_positions({n: model.get_parameter(n) for n in names}, density=0.3)
    values = random_values(positions)
    reference = dense_reference(make(), positions, values)
    trainable = sparse.attach_sparse(model, positions, values)
    run = toy_loss if kind == "toy" else lambda m: model_loss(m, ids)
    loss, ref_loss = run(model), run(reference)
    loss.backward()
    ref_loss.backward()
    assert torch.equal(loss, ref_loss)
    for name, values_param in trainable.items():
        expected = reference.get_parameter(name).grad.reshape(-1)[positions[name].long()]
        assert values_param.grad.dtype == torch.float32 and torch.equal(values_param.grad, expected), name
        assert values_param.grad.abs().sum() > 0, name


def test_values_live_on_the_owning_module_and_fold_restores_it():
    model = build("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    cls, keys = type(experts), list(model.state_dict())
    names = select_params(model, ParamsConfig())
    trainable = sparse.attach_sparse(model, random_positions({n: model.get_parameter(n) for n in names}))
    assert trainable["model.layers.0.mlp.experts.gate_up_proj"] is experts.lota_values_gate_up_proj
    assert dict(experts.named_parameters(recurse=False)).keys() == {"gate_up_proj", "down_proj",
                                                                    "lota_values_gate_up_proj", "lota_values_down_proj"}
    assert isinstance(experts, cls) and type(experts).__name__ == cls.__name__
    assert experts.gate_up_proj is model.get_parameter("model.layers.0.mlp.experts.gate_up_proj")  # outside forward
    sparse.fold_sparse(model, names)
    assert type(experts) is cls and list(model.state_dict()) == keys
    assert not any("lota" in n for n in [*experts.__dict__, *dict(model.named_buffers())])


@pytest.mark.parametrize("kind", ["qwen3_moe", "gpt2"])
def test_entries_outside_the_mask_never_move(kind):
    """A few AdamW steps with weight decay: every weight stays bitwise the base's, the values train, and fold
    writes base + values inside the mask only."""
    model = build(kind)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    names = select_params(model, ParamsConfig())
    positions = random_positions({n: model.get_parameter(n) for n in names})
    trainable = sparse.attach_sparse(model, positions, random_values(positions))
    start = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model_loss(model, ids).backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if name in base:
            assert torch.equal(p, base[name]), name
    assert all(not torch.equal(p, start[n]) for n, p in trainable.items())
    values = {n: p.detach().clone() for n, p in trainable.items()}
    sparse.fold_sparse(model, names)
    for name, p in model.named_parameters():
        expected = base[name].reshape(-1).clone()
        if name in positions:
            expected[positions[name].long()] += values[name]
        assert torch.equal(p.reshape(-1), expected), name


def saved_bytes(model, ids) -> int:
    """Bytes of the storages autograd keeps for backward that are not the model's parameters or buffers, each
    storage counted once: what the saved-tensors hooks see, and inside a general-path module's forward, what
    its own hook keeps as a tensor (not a recipe)."""
    resident = {t.untyped_storage().data_ptr() for t in [*model.parameters(), *model.buffers()]}
    saved = {}

    def record(t):
        if isinstance(t, torch.Tensor) and t.untyped_storage().data_ptr() not in resident:
            saved[t.untyped_storage().data_ptr()] = t.untyped_storage().nbytes()
        return t

    inner = sparse._Merging._pack
    sparse._Merging._pack = lambda self, t: record(inner(self, t))
    try:
        with torch.autograd.graph.saved_tensors_hooks(record, lambda t: t):
            model_loss(model, ids).backward()
    finally:
        sparse._Merging._pack = inner
    return sum(saved.values())


@pytest.mark.parametrize("case", ["qwen3_moe grouped_mm", "qwen3_moe eager", "gpt2"])
def test_backward_keeps_no_merged_copy(case):
    """Experts (hidden 256, 8 experts of 256) and Conv1D (hidden 512) dominate; 8 tokens. What backward keeps is
    what full fine-tuning keeps (activations: 0.32 / 0.35 / 0.95 MiB), not the 12.3 / 12.3 / 22 MiB of merged
    tensors that saving them would keep (13.5 / 13.5 / 24 MiB of selected weights)."""
    kind, _, impl = case.partition(" ")

    def make():
        if kind == "gpt2":
            from transformers import GPT2Config, GPT2LMHeadModel

            torch.manual_seed(0)
            return GPT2LMHeadModel(GPT2Config(vocab_size=256, n_embd=512, n_layer=2, n_head=4, n_positions=64)).eval()
        from transformers import Qwen3MoeConfig, Qwen3MoeForCausalLM

        config = Qwen3MoeConfig(hidden_size=256, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                                num_experts_per_tok=2, vocab_size=256, intermediate_size=512,
                                moe_intermediate_size=256, num_experts=8)
        config._experts_implementation = impl
        torch.manual_seed(0)
        return Qwen3MoeForCausalLM(config).eval()

    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    full = make()
    names = select_params(full, ParamsConfig())
    general = [n for n in names if not isinstance(full.get_submodule(n.rpartition(".")[0]), nn.Linear)]
    for p in full.parameters():
        p.requires_grad_(False)
    for n in names:
        full.get_parameter(n).requires_grad_(True)
    full_bytes = saved_bytes(full, ids)
    model = make()
    sparse.attach_sparse(model, random_positions({n: model.get_parameter(n) for n in names}))
    merged = sum(model.get_parameter(n).nbytes for n in general)
    assert saved_bytes(model, ids) <= min(full_bytes, 0.05 * merged)


# --------------------------------------------------------------------------- what cannot train

class WithList(nn.Module):
    def __init__(self):
        super().__init__()
        self.blocks = nn.ParameterList([nn.Parameter(torch.randn(4, 4))])
        self.register_buffer("table", torch.randn(4, 4))
        self.codes = nn.Parameter(torch.zeros(4, 4, dtype=torch.int8), requires_grad=False)

    def forward(self, x):
        return x @ self.blocks[0] @ self.table


@pytest.mark.parametrize("name, says", [
    ("blocks.0", "ParameterList, a container that is never called"),
    ("table", "is a buffer of this model"),
    ("codes", "is int8, not floating point"),
    ("nothing.here", "has no parameter 'nothing.here'"),
])
def test_attach_refuses_what_it_cannot_train(name, says):
    model = WithList()
    with pytest.raises(LotaError, match=re.escape(says)) as err:
        sparse.attach_sparse(model, {name: torch.tensor([0], dtype=torch.int32)})
    assert "\n" not in str(err.value) and name in str(err.value)


def test_tied_weights_and_buffers_are_refused_at_selection():
    gpt2 = build("gpt2")
    with pytest.raises(LotaError, match=r"'transformer\.wte\.weight' is the same parameter as 'lm_head\.weight' "
                                        r"\(tied weights\).*params\.exclude.*tie_word_embeddings=false"):
        select_params(gpt2, ParamsConfig(include=[r".*\.weight"], exclude=[r".*(ln_|wpe).*"]))
    with pytest.raises(LotaError, match="tied weights"):
        sparse.attach_sparse(gpt2, {"transformer.wte.weight": torch.tensor([0], dtype=torch.int32)})
    with pytest.raises(LotaError, match=r"params\.include matches 'table', a buffer"):
        select_params(WithList(), ParamsConfig(include=[".*"], exclude=[]))


# --------------------------------------------------------------------------- the CLI pipeline

def save_tiny(kind: str, directory: Path) -> Path:
    tokenizer = make_tokenizer()
    ids = dict(bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
               pad_token_id=tokenizer.pad_token_id)
    model = build(kind, vocab=len(tokenizer), **ids)
    model.save_pretrained(directory)
    tokenizer.save_pretrained(directory)
    return directory


def weights(directory: Path) -> dict[str, torch.Tensor]:
    """A saved model's tensors under the in-memory names (transformers 5 saves MoE experts per expert, in the
    hub's layout, and fuses them again on load)."""
    from transformers import AutoModelForCausalLM

    return {n: t.clone() for n, t in AutoModelForCausalLM.from_pretrained(directory).state_dict().items()}


@pytest.fixture(scope="module", params=MODELS)
def pipeline(request, data, tmp_path_factory):
    kind = request.param
    root = tmp_path_factory.mktemp(kind)
    model = save_tiny(kind, root / "base")
    run = lambda stage, out, **extra: paths(in_process(stage, *tiny_overrides(model, root / out, **extra)))
    (task_vector,) = run("calibrate", "cal", **{"train.max_steps": 8})
    (mask,) = paths(in_process("extract", f"extract.task_vector={task_vector}", f"out={root / 'ext'}"))
    delta, tuned = run("sparse-train", "st", **{"sparse_train.mask": mask, "save_model": "true",
                                                "train.weight_decay": 0.1, "train.max_steps": 8})
    (delta_b,) = run("lotto", "lotto", **{"lotto.previous": f"[{delta}]", "train.max_steps": 3,
                                          "lotto.calibrate_steps": 3})
    (merged,) = paths(in_process("merge", delta, delta_b, "method=sum", f"out={root / 'merge'}"))
    (results,) = paths(in_process("eval", f"model.path={model}", f"tasks.gsm8k.eval_data_files={DATA['arith_test']}",
                            f"eval.deltas=[{merged}]", "eval.max_examples=4", "eval.max_new_tokens=8",
                            f"out={root / 'eval'}"))
    return dict(kind=kind, root=root, model=model, mask=mask, delta=delta, tuned=tuned, delta_b=delta_b,
                merged=merged, results=results)


@pytest.mark.slow
def test_pipeline_mask_covers_the_experts_and_no_router(pipeline):
    mask = Artifact(pipeline["mask"])
    names = list(mask.meta.shapes)
    assert not any(ROUTER.fullmatch(n) or "wte" in n or "lm_head" in n for n in names)
    experts = [n for n in names if EXPERTS.fullmatch(n)]
    if pipeline["kind"] == "gpt2":
        assert len(names) == 8 and all(".c_" in n for n in names)  # every Conv1D weight
    else:
        assert len(experts) == 4 and all(len(mask.shape(n)) == 3 for n in experts)
        assert all(mask.bits(n) is not None and mask.mask(n).any() for n in experts)
    total = sum(mask.numel(n) for n in names)
    held = sum(int(mask.mask(n).sum()) for n in names)
    assert held == round(total - 0.9 * total)


@pytest.mark.slow
def test_pipeline_losses_fall(pipeline):
    for stage in ("cal", "st"):
        curve = losses(pipeline["root"] / stage)
        assert len(curve) == 8 and curve[-1] < curve[0], (stage, curve)


@pytest.mark.slow
def test_pipeline_saved_model_differs_from_the_base_only_inside_the_mask(pipeline):
    """Bitwise, with weight decay on; the masked entries did train."""
    base, tuned = weights(pipeline["model"]), weights(pipeline["tuned"])
    mask = Artifact(pipeline["mask"])
    assert base.keys() == tuned.keys()
    fractions = changed_inside(base, tuned, mask)
    trained = sum(fractions[n] * mask.held_count(n) for n in fractions)
    assert trained > 0.9 * mask.density() * sum(mask.numel(n) for n in mask.meta.shapes)


@pytest.mark.slow
def test_pipeline_lotto_merge_and_eval(pipeline):
    first, second = Artifact(pipeline["delta"]), Artifact(pipeline["delta_b"])
    for name in first.names:
        assert not (first.mask(name)
                    & second.mask(name)).any(), name
    merged = Artifact(pipeline["merged"])
    for name in first.names:  # disjoint: the sum holds each delta's values at its own entries
        assert torch.equal(merged.dense(name), first.dense(name) + second.dense(name)), name
    scores = json.loads(Path(pipeline["results"]).read_text())["tasks"]["gsm8k"]
    assert scores["n"] == 4 and math.isfinite(scores["nll"]) and 0 <= scores["exact_match"] <= 1


def test_cli_refuses_tied_weights_before_training(data, tmp_path):
    model = save_tiny("gpt2", tmp_path / "gpt2")  # lm_head tied to the token embedding
    bad = in_process("calibrate", *tiny_overrides(model, tmp_path / "cal", **{
        "params.include": "[.*wte.*]", "params.exclude": "[]"}), check=False)
    lines = [line for line in bad.stderr.splitlines() if "tied weights" in line]
    assert bad.returncode == 1 and len(lines) == 1 and "Traceback" not in bad.stderr, bad.stderr[-2000:]
    assert "'transformer.wte.weight'" in lines[0] and "params.exclude" in lines[0]
    assert not (tmp_path / "cal" / "metrics.jsonl").exists()
    assert not (tmp_path / "cal" / "task_vector.safetensors").exists()


@pytest.mark.slow
def test_lora_calibration_of_fused_experts_trains_them_and_lotto_calibrates_by_lora(tmp_path):
    """method=lora on a fused-experts MoE (Qwen3-MoE): the 3-D expert stacks train through PEFT's
    target_parameters, so the task vector holds them; lotto.calibrate_method=lora draws its mask from such a
    calibration, disjoint from the earlier one."""
    model = save_tiny("qwen3_moe", tmp_path / "base")
    run = lambda stage, out, **extra: paths(in_process(stage, *tiny_overrides(model, tmp_path / out, **extra)))
    (task_vector,) = run("calibrate", "cal", **{"method": "lora", "train.max_steps": 3})
    vector = Artifact(task_vector)
    experts = [n for n in vector.names if EXPERTS.match(n)]
    assert experts and all(vector.dense(n).abs().max() > 0 for n in experts)
    assert all(vector.dense(n).dim() == 3 for n in experts)
    (mask,) = paths(in_process("extract", f"extract.task_vector={task_vector}", f"out={tmp_path / 'ext'}"))
    (delta,) = run("sparse-train", "st", **{"sparse_train.mask": mask, "train.max_steps": 2})
    (_,) = run("lotto", "lotto", **{"lotto.previous": f"[{delta}]", "lotto.calibrate_method": "lora",
                                    "train.max_steps": 2})
    new, old = Artifact(tmp_path / "lotto" / "mask.safetensors"), Artifact(mask)
    assert new.meta.source["calibrate_method"] == "lora"
    assert all(not (new.mask(n) & old.mask(n)).any() for n in new.names)
    assert any(new.mask(n).any() for n in experts)
