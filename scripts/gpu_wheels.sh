#!/usr/bin/env bash
# Wheels that scripts/gpu_check.sh needs on a GPU machine without network, whose python3 (CPython 3.12,
# x86_64) already has PyTorch, transformers, accelerate, safetensors, rich, peft, pandas and pyarrow (and what
# those pull in: numpy, packaging, psutil, pyyaml, tqdm, filelock, huggingface-hub, fsspec, typing-extensions,
# python-dateutil, six, tzdata). What it carries stays far below the 60 MiB a device call may take along.
# Run here (with network); the wheels land in .whl/ (git-ignored), which goes along with the check.
#
#   lota's own:  hydra-core, omegaconf, antlr4-python3-runtime (the 4.9 that omegaconf 2.3 pins)
#   datasets:    datasets, dill, multiprocess, xxhash, fsspec
#   quantized:   bitsandbytes (its CUDA wheel is large: over a device call's carry limit, it travels in parts
#                to a warm machine, or the step that needs it says it was skipped)
#   deepspeed:   deepspeed (built here: PyPI has only its source; pure Python with DS_BUILD_OPS=0),
#                hjson, ninja, msgpack, einops, py-cpuinfo, pydantic, pydantic-core, annotated-types,
#                typing-inspection
# gpu_check.sh installs only those the machine lacks.
set -euo pipefail
cd "$(dirname "$0")/.."
PIP=${PIP:-.venv/bin/pip}
DEST=.whl
mkdir -p "$DEST"

BINARY=(
  hydra-core==1.3.8 omegaconf==2.3.1
  datasets==5.2.0 dill==0.4.1 multiprocess==0.70.19
  xxhash==4.1.0 fsspec==2026.9.0
  hjson ninja msgpack einops py-cpuinfo pydantic==2.14.4 pydantic-core==2.50.5 annotated-types typing-inspection
  bitsandbytes==0.50.2
)
"$PIP" download -q --no-deps --only-binary=:all: --python-version 3.12 --implementation cp \
  --platform manylinux_2_17_x86_64 --platform manylinux2014_x86_64 --platform manylinux_2_28_x86_64 \
  -d "$DEST" "${BINARY[@]}"

# Source-only on PyPI: build pure-Python wheels here.
"$PIP" wheel -q --no-deps -w "$DEST" "antlr4-python3-runtime==4.9.3"
DS_BUILD_OPS=0 "$PIP" wheel -q --no-deps -w "$DEST" "deepspeed==0.19.8"

ls -1 "$DEST"
du -sh "$DEST"
