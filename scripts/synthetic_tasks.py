"""Two small, dissimilar tasks that lota generates itself, so the demo needs no network and no data set:

  arith    two-step grade-school word problems, answered GSM8K-style: worked steps, then `#### <number>`
  reverse  reverse the order of a list of words (free-form text, scored by ROUGE-L)

`python scripts/synthetic_tasks.py OUT_DIR` writes {arith,reverse}_{train,test}.jsonl there;
`python scripts/synthetic_tasks.py --pairs GSM8K.jsonl OUT.jsonl [N]` writes preference pairs made from
GSM8K-shaped rows (preference_pair).
"""

from __future__ import annotations

import json
import random
import re
import sys
from pathlib import Path

NAMES = ["Ava", "Ben", "Chloe", "Dan", "Emma", "Finn", "Grace", "Hugo", "Isla", "Jack", "Lena", "Omar"]
ITEMS = ["apples", "pencils", "stickers", "marbles", "cookies", "books", "coins", "shells", "cards", "stamps"]
WORDS = ["red", "blue", "green", "cat", "dog", "sun", "moon", "tree", "river", "stone", "bird", "fish", "cloud",
         "road", "house", "lamp", "glass", "paper", "music", "bread", "salt", "wind", "snow", "fire"]


def arith(rng: random.Random) -> dict:
    name, item = rng.choice(NAMES), rng.choice(ITEMS)
    a, b = rng.randint(3, 60), rng.randint(2, 40)
    kind = rng.choice(["buy_give", "times", "share"])
    if kind == "buy_give":
        c = rng.randint(1, a + b)
        question = f"{name} has {a} {item}, buys {b} more, then gives away {c}. How many {item} does {name} have now?"
        steps = [f"{a} + {b} = {a + b}", f"{a + b} - {c} = {a + b - c}"]
        answer = a + b - c
    elif kind == "times":
        k = rng.randint(2, 6)
        question = (f"{name} has {a} {item}. A friend gives {name} {k} times as many. "
                    f"How many {item} does {name} have in total?")
        steps = [f"{a} * {k} = {a * k}", f"{a} + {a * k} = {a + a * k}"]
        answer = a + a * k
    else:
        k = rng.randint(2, 6)
        total = k * rng.randint(2, 15)
        question = (f"{name} shares {total} {item} equally among {k} friends and keeps none. "
                    f"Then each friend gets {b} more. How many {item} does each friend have?")
        steps = [f"{total} / {k} = {total // k}", f"{total // k} + {b} = {total // k + b}"]
        answer = total // k + b
    return {"question": question, "answer": "\n".join(steps) + f"\n#### {answer}"}


def reverse(rng: random.Random) -> dict:
    words = rng.sample(WORDS, rng.randint(3, 7))
    return {"instruction": "Reverse the order of these words.", "input": " ".join(words),
            "output": " ".join(reversed(words))}


def conversation(math: dict, instruction: dict, rng: random.Random, layout: str = "openai") -> dict:
    """A multi-turn chat built from a GSM8K-shaped row (question / answer) and an Alpaca-shaped one
    (instruction / input / output): maybe a system prompt, the math exchange, then a follow-up (the final
    number alone, or the instruction). layout: openai ({"messages": [{"role", "content"}]}) or sharegpt
    ({"conversations": [{"from", "value"}]})."""
    turns = [("system", "You are a careful tutor. Show your working.")] if rng.random() < 0.5 else []
    turns += [("user", math["question"]), ("assistant", math["answer"])]
    if rng.random() < 0.5:
        final = math["answer"].rsplit("####", 1)[-1].strip()
        turns += [("user", "State only the final number."), ("assistant", final)]
    else:
        ask = instruction["instruction"] + (f"\n\n{instruction['input']}" if instruction.get("input") else "")
        turns += [("user", f"Thanks. Another request: {ask}"), ("assistant", instruction["output"])]
    if layout == "sharegpt":
        names = {"system": "system", "user": "human", "assistant": "gpt"}
        return {"conversations": [{"from": names[r], "value": c} for r, c in turns]}
    return {"messages": [{"role": r, "content": c} for r, c in turns]}


def write_conversations(path: Path, math: list[dict], instructions: list[dict], n: int, layout: str,
                        seed: int = 0) -> Path:
    rng = random.Random(seed)
    with open(path, "w") as f:
        for i in range(n):
            row = conversation(math[i % len(math)], instructions[i % len(instructions)], rng, layout)
            f.write(json.dumps(row) + "\n")
    return path


def preference_pair(math: dict, layout: str = "standard") -> dict | None:
    """A preference pair from a GSM8K-shaped row (question / answer): chosen its solution, rejected the same
    solution with its final answer changed (real text, a known preference); None where the answer has no
    `#### <number>`. layout: standard (strings), conversational (turns) or implicit (two whole conversations,
    no prompt field)."""
    found = re.search(r"####\s*(-?[\d,]+)", math["answer"])
    if not found:
        return None
    chosen = math["answer"]
    rejected = chosen[:found.start(1)] + str(int(found.group(1).replace(",", "")) + 7)
    if layout == "standard":
        return {"prompt": math["question"] + "\n", "chosen": chosen, "rejected": rejected}
    user = {"role": "user", "content": math["question"]}
    if layout == "conversational":
        return {"prompt": [user], "chosen": [{"role": "assistant", "content": chosen}],
                "rejected": [{"role": "assistant", "content": rejected}]}
    return {"chosen": [user, {"role": "assistant", "content": chosen}],
            "rejected": [user, {"role": "assistant", "content": rejected}]}


def write_pairs(path: Path, math: list[dict], layout: str = "standard", n: int | None = None) -> Path:
    """Preference pairs (preference_pair) of the first n rows that have a final answer, one JSON line each."""
    path.parent.mkdir(parents=True, exist_ok=True)
    pairs = [pair for pair in map(lambda row: preference_pair(row, layout), math) if pair is not None][:n]
    path.write_text("".join(json.dumps(pair) + "\n" for pair in pairs))
    return path


def write(out: Path, n_train: int = 2000, n_test: int = 200, seed: int = 0) -> dict[str, Path]:
    """Write both tasks' train and test files; returns {'arith_train': path, ...}."""
    out.mkdir(parents=True, exist_ok=True)
    paths = {}
    for task, make in (("arith", arith), ("reverse", reverse)):
        rng = random.Random(f"{task}-{seed}")
        for split, n in (("train", n_train), ("test", n_test)):
            path = out / f"{task}_{split}.jsonl"
            with open(path, "w") as f:
                for _ in range(n):
                    f.write(json.dumps(make(rng)) + "\n")
            paths[f"{task}_{split}"] = path
    return paths


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--pairs":
        rows = [json.loads(line) for line in open(sys.argv[2])]
        print(write_pairs(Path(sys.argv[3]), rows, n=int(sys.argv[4]) if len(sys.argv) > 4 else None))
    else:
        for path in write(Path(sys.argv[1] if len(sys.argv) > 1 else "data")).values():
            print(path)
