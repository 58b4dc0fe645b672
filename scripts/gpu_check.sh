#!/usr/bin/env bash
# GPU check: bf16 calibrate -> extract -> sparse-train on a ~1B Llama (random weights, built from a config,
# with a tokenizer and training text made here) under dist=single, dist=zero2 and (with 2 or more GPUs)
# dist=fsdp, printing per stage the step time, tokens/s and peak GPU memory: full fine-tuning (calibrate)
# against LoTA (sparse-train), and the bytes per parameter those peaks imply for 8B and 70B models. Then the
# moonshot: 3 LoTA steps of an 8B-shaped random Llama in bf16 (gradient checkpointing on) with the process
# capped at 40 GB (torch.cuda.set_per_process_memory_fraction), next to FFT of the same model under the same
# cap (expected to run out of memory). About 7 minutes on one H200 (LOTA_GPU_CHECK_MOONSHOT=0 skips it).
# Last, LoTA over an nf4 base of the same shape (8-bit AdamW) under a 24 GB cap next to QLoRA (PEFT LoRA r=16,
# same base, same cap), tokens/s of each (scripts/gpu_quantized.py; LOTA_GPU_CHECK_QUANTIZED=0 skips it).
#
# Runs from a plain checkout (no `make install`, no network) on the machine's python3, which must have
# PyTorch, transformers, accelerate, safetensors, rich and peft; whatever else it lacks comes from the wheels
# of scripts/gpu_wheels.sh in .whl/, installed into a temporary directory put on PYTHONPATH.
#
# LOTA_GPU_CHECK_TINY=1: a tiny model and a few steps, on the CPU too, to test this script anywhere.
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python3}
TINY=${LOTA_GPU_CHECK_TINY:-0}
WORK=$(mktemp -d -t lota-gpu-check.XXXXXX)
trap 'rm -rf "$WORK"' EXIT
export HF_HUB_OFFLINE=1 HF_DATASETS_OFFLINE=1 TOKENIZERS_PARALLELISM=false

# 1. The wheels this python lacks (a wheel's distribution is the first part of its file name).
if compgen -G ".whl/*.whl" > /dev/null; then
  missing=$("$PY" - .whl/*.whl <<'EOF'
import importlib.metadata as md, os, sys
for wheel in sys.argv[1:]:
    try:
        md.version(os.path.basename(wheel).split("-")[0])
    except md.PackageNotFoundError:
        print(wheel)
EOF
)
  if [ -n "$missing" ]; then
    echo "installing into $WORK/site: $(echo $missing | xargs -n1 basename | tr '\n' ' ')" >&2
    # shellcheck disable=SC2086
    "$PY" -m pip install -q --no-index --no-deps --target "$WORK/site" $missing
  fi
fi
export PYTHONPATH="$PWD:$WORK/site${PYTHONPATH:+:$PYTHONPATH}"

# 2. Model, tokenizer and training data.
"$PY" - "$WORK" "$TINY" >&2 <<'EOF'
import json, random, sys, time
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
from transformers import LlamaConfig, LlamaForCausalLM, PreTrainedTokenizerFast

work, tiny = Path(sys.argv[1]), sys.argv[2] == "1"
t0 = time.time()
random.seed(0)
names = ["Ava", "Ben", "Chen", "Dara", "Eli", "Fay", "Gus", "Hana", "Ivan", "Jo"]
things = ["apples", "books", "coins", "marbles", "pencils", "stamps", "tickets", "shells"]
rows = []
for _ in range(400 if tiny else 4000):  # synthetic GSM8K-style word problems
    who, what = random.choice(names), random.choice(things)
    a, b, c = random.randint(2, 90), random.randint(2, 90), random.randint(2, 9)
    question = (f"{who} has {a} {what} and buys {b} more. Then {who} gives away a {c}th of them, rounded "
                f"down. How many {what} does {who} have left?")
    total, gone = a + b, (a + b) // c
    answer = (f"{who} has {a} + {b} = {total} {what}. A {c}th of {total} rounded down is {gone}. "
              f"{total} - {gone} = {total - gone}.\n#### {total - gone}")
    rows.append({"question": question, "answer": answer})
with open(work / "train.jsonl", "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in rows)

tok = Tokenizer(models.BPE())
tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
tok.decoder = decoders.ByteLevel()
tok.train_from_iterator([r["question"] + " " + r["answer"] for r in rows], trainers.BpeTrainer(
    vocab_size=384 if tiny else 4096, special_tokens=["<pad>", "<s>", "</s>"],
    initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
tokenizer = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", pad_token="<pad>")
size = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        if tiny else  # Llama-3.2-1B's body: 0.97B parameters in attention + MLP
        dict(hidden_size=2048, intermediate_size=8192, num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8))
config = LlamaConfig(vocab_size=len(tokenizer), max_position_embeddings=1024, tie_word_embeddings=False,
                     bos_token_id=tokenizer.bos_token_id, eos_token_id=tokenizer.eos_token_id,
                     pad_token_id=tokenizer.pad_token_id, **size)
torch.manual_seed(0)
with torch.device("cuda" if torch.cuda.is_available() else "cpu"):
    model = LlamaForCausalLM(config)
model.to(torch.bfloat16).save_pretrained(work / "model")  # bf16 on disk; lota loads it as float32
tokenizer.save_pretrained(work / "model")
n = sum(p.numel() for p in model.parameters())
print(f"model: {n / 1e9:.2f}B parameters, vocab {len(tokenizer)}, {len(rows)} examples ({time.time() - t0:.0f} s)",
      file=sys.stderr)
EOF

# 3. calibrate -> extract -> sparse-train under each engine.
if [ "$TINY" = 1 ]; then STEPS=4; BATCH=4; MP=auto; else STEPS=20; BATCH=8; MP=bf16; fi
COMMON=(model.path="$WORK/model" task.data_files="$WORK/train.jsonl" task.max_length=512 train.max_steps=$STEPS
        train.batch_size=$BATCH train.lr=1e-4 train.warmup_steps=0 train.log_every=1 train.mixed_precision=$MP)
lota() { "$PY" -m lota_cli "$@"; }
GPUS=$("$PY" -c "import torch; print(torch.cuda.device_count())")
ENGINES=(single zero2)
if [ "$GPUS" -ge 2 ]; then ENGINES+=(fsdp); else echo "fsdp: needs 2 or more GPUs (this machine has $GPUS); skipped" >&2; fi
for engine in "${ENGINES[@]}"; do
  out="$WORK/$engine"
  procs=1; if [ "$engine" = fsdp ]; then procs=$GPUS; fi
  dist=(dist=$engine dist.num_processes=$procs)
  t=$SECONDS; lota calibrate "${COMMON[@]}" "${dist[@]}" out="$out/calibrate" > /dev/null
  echo "$((SECONDS - t))" > "$out/calibrate/wall_s"
  lota extract extract.task_vector="$out/calibrate/task_vector.safetensors" extract.sparsity=0.9 \
    out="$out/extract" > /dev/null
  t=$SECONDS; lota sparse-train "${COMMON[@]}" "${dist[@]}" sparse_train.mask="$out/extract/mask.safetensors" \
    out="$out/sparse-train" > /dev/null
  echo "$((SECONDS - t))" > "$out/sparse-train/wall_s"
done

# 4. The table.
"$PY" - "$WORK" "${ENGINES[@]}" <<'EOF'
import json, math, statistics, sys
from pathlib import Path

from safetensors import safe_open

work, engines = Path(sys.argv[1]), sys.argv[2:]
params = 0
for shard in (work / "model").glob("*.safetensors"):
    with safe_open(str(shard), "pt") as f:
        params += sum(math.prod(f.get_slice(k).get_shape()) for k in f.keys())
print(f"\n{'engine':<7} {'stage':<13} {'method':<9} {'step s':>8} {'tokens/s':>10} {'peak GPU GB':>12} {'wall s':>7}"
      f" {'B/param':>8} {'8B GB':>7} {'70B GB':>7}")
for engine in engines:
    for stage, method in (("calibrate", "fft"), ("sparse-train", "lota")):
        out = work / engine / stage
        records = [json.loads(line) for line in open(out / "metrics.jsonl")]
        steady = records[1:] or records  # the first step warms up kernels and the allocator
        step_s = statistics.median(r["step_s"] for r in steady)
        tok_s = statistics.median(r["tokens_per_s"] for r in steady)
        mem = max(r.get("gpu_mem_gb", float("nan")) for r in records)
        wall = (out / "wall_s").read_text().strip()
        per_param = mem * 2**30 / params  # peak bytes per parameter of this weights-dominated model
        print(f"{engine:<7} {stage:<13} {method:<9} {step_s:>8.3f} {tok_s:>10.0f} {mem:>12.2f} {wall:>7}"
              f" {per_param:>8.2f} {per_param * 8:>7.0f} {per_param * 70:>7.0f}")
        print(f"  {stage} ({engine}): step {step_s:.3f} s, {tok_s:.0f} tokens/s, peak GPU memory {mem:.2f} GB",
              file=sys.stderr)
EOF

# 5. The moonshot: LoTA of an 8B-shaped Llama within 40 GB, and FFT of it under the same cap.
if [ "${LOTA_GPU_CHECK_MOONSHOT:-1}" = 1 ]; then
"$PY" - "$TINY" <<'EOF'
import sys, time

import torch
from transformers import AutoModelForCausalLM, LlamaConfig

from lota_cli.models import token_nll_sum
from lota_cli.training import attach_sparse, make_optimizer
from lota_cli.config import OptimConfig, ParamsConfig, TrainConfig
from lota_cli.ops import k_for
from lota_cli.models import select_params

tiny, cap_gb = sys.argv[1] == "1", 40
device = "cuda" if torch.cuda.is_available() else "cpu"
size = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2)
        if tiny else  # Llama-3.1-8B's shape
        dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8))
if device == "cuda":
    torch.cuda.set_per_process_memory_fraction(cap_gb * 2**30 / torch.cuda.get_device_properties(0).total_memory)

for method in ("lota", "fft"):
    torch.manual_seed(0)
    started = time.time()
    model = optimizer = trainable = None
    try:
        with torch.device(device):
            model = AutoModelForCausalLM.from_config(LlamaConfig(vocab_size=128256, tie_word_embeddings=False,
                                                                 **size), dtype=torch.bfloat16)
        model.gradient_checkpointing_enable()
        model.config.use_cache = False
        names = select_params(model, ParamsConfig())
        for p in model.parameters():
            p.requires_grad_(False)
        if method == "lota":
            gen = torch.Generator(device).manual_seed(0)
            positions = {n: torch.randperm(model.get_parameter(n).numel(), generator=gen, device=device)
                         [:k_for(0.9, model.get_parameter(n).numel())].sort().values.int() for n in names}
            trainable = attach_sparse(model, positions)
        else:
            trainable = {n: model.get_parameter(n).requires_grad_(True) for n in names}
        optimizer = make_optimizer(list(trainable.values()), TrainConfig(lr=1e-5), OptimConfig())
        ids = torch.randint(0, 128256, (1, 512), device=device)
        batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
        model.train()
        for step in range(3):
            (token_nll_sum(model, batch) / ids.numel()).backward()
            optimizer.step()
            optimizer.zero_grad(set_to_none=True)
        peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
        print(f"moonshot {method}: {sum(p.numel() for p in model.parameters()) / 1e9:.2f}B parameters (bf16), "
              f"{sum(p.numel() for p in trainable.values()) / 1e9:.2f}B trained, 3 steps of 512 tokens under a "
              f"{cap_gb} GB cap: ran, peak {peak:.1f} GB ({time.time() - started:.0f} s)")
    except torch.OutOfMemoryError:
        print(f"moonshot {method}: out of memory under the {cap_gb} GB cap ({time.time() - started:.0f} s)")
    finally:
        model = optimizer = trainable = positions = None
        if device == "cuda":
            torch.cuda.empty_cache()
            torch.cuda.reset_peak_memory_stats()
EOF
fi

# 6. LoTA over an nf4 base of the 8B shape under a 24 GB cap, next to QLoRA under the same cap (bitsandbytes).
if [ "${LOTA_GPU_CHECK_QUANTIZED:-1}" = 1 ]; then
  if "$PY" -c "import bitsandbytes" 2>/dev/null; then
    "$PY" scripts/gpu_quantized.py "$TINY"
  else
    echo "quantized: skipped, bitsandbytes is not installed (scripts/gpu_wheels.sh fetches its wheel)"
  fi
fi
