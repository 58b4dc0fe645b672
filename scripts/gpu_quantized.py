"""gpu_check.sh, step 6: LoTA over an nf4 base of an 8B-shaped random Llama with the process capped at 24 GB,
next to QLoRA (PEFT LoRA r=16 over the same nf4 base) under the same cap: 3 AdamW steps of 512 tokens each
(8-bit AdamW state for LoTA, gradient checkpointing on), peak GPU memory and tokens/s of the steady steps.

The base is quantized layer by layer as it is built (a bf16 random weight per linear layer, quantized by
bitsandbytes on the GPU and freed), so that no bf16 copy of the whole model ever exists; the layers then
compute as lota's do over model.quantize=nf4 (models' frozen_linear). `python3 scripts/gpu_quantized.py 1`:
a tiny model on whatever device there is, to test the script anywhere.
"""

from __future__ import annotations

import sys
import time


def build(size: dict, device: str):
    import bitsandbytes as bnb
    import torch
    from torch import nn
    from transformers import AutoModelForCausalLM, LlamaConfig

    from lota_cli.models import prepare_quantized

    config = LlamaConfig(vocab_size=128256 if size["hidden_size"] > 64 else 512, tie_word_embeddings=False, **size)
    with torch.device("meta"):
        model = AutoModelForCausalLM.from_config(config, dtype=torch.bfloat16)
    gen = torch.Generator(device).manual_seed(0)
    for name, module in list(model.named_modules()):
        for child_name, child in list(module.named_children()):
            if not isinstance(child, nn.Linear) or f"{name}.{child_name}".lstrip(".") == "lm_head":
                continue
            layer = bnb.nn.Linear4bit(child.in_features, child.out_features, bias=False,
                                      compute_dtype=torch.bfloat16, quant_type="nf4", device="meta")
            weight = torch.randn(child.out_features, child.in_features, generator=gen, device=device,
                                 dtype=torch.bfloat16) * 0.02
            layer.weight = bnb.nn.Params4bit(weight.cpu() if device == "cpu" else weight, requires_grad=False,
                                             quant_type="nf4").to(device)
            setattr(module, child_name, layer)
    model.to_empty(device=device)  # the float tensors left (embeddings, norms, lm_head): initialized below
    with torch.no_grad():
        for name, param in model.named_parameters():
            if param.is_floating_point():
                param.normal_(0, 0.02, generator=gen) if param.dim() > 1 else param.fill_(1.0)
    with torch.device(device):  # its buffers, computed again (to_empty left them uninitialized)
        model.model.rotary_emb = type(model.model.rotary_emb)(config)
    prepare_quantized(model, torch.bfloat16)
    model.gradient_checkpointing_enable()
    model.config.use_cache = False
    return model


def main() -> None:
    import torch

    from lota_cli.config import LoraOptions, OptimConfig, ParamsConfig, TrainConfig
    from lota_cli.models import attach_lora, select_params, token_nll_sum, weight_shape
    from lota_cli.ops import k_for
    from lota_cli.training import attach_sparse, make_optimizer

    tiny, cap_gb, tokens = sys.argv[1:2] == ["1"], 24, 512
    device = "cuda" if torch.cuda.is_available() else "cpu"
    size = (dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4,
                 num_key_value_heads=2) if tiny else  # Llama-3.1-8B's shape
            dict(hidden_size=4096, intermediate_size=14336, num_hidden_layers=32, num_attention_heads=32,
                 num_key_value_heads=8))
    if device == "cuda":
        torch.cuda.set_per_process_memory_fraction(cap_gb * 2**30 / torch.cuda.get_device_properties(0).total_memory)
    for method in ("lota", "qlora"):
        started, model = time.time(), None
        try:
            model = build(size, device)
            names = select_params(model, ParamsConfig())
            for p in model.parameters():
                p.requires_grad_(False)
            if method == "lota":
                gen = torch.Generator(device).manual_seed(0)
                positions = {}
                for n in names:
                    numel = torch.Size(weight_shape(model.get_parameter(n))).numel()
                    positions[n] = torch.randperm(numel, generator=gen, device=device)[:k_for(0.9, numel)].sort() \
                        .values.int()
                trainable = attach_sparse(model, positions)
                optim = OptimConfig(name="adamw8bit")
            else:
                model, trainable = attach_lora(model, names, LoraOptions(r=16, alpha=32))
                optim = OptimConfig()
            optimizer = make_optimizer(list(trainable.values()), TrainConfig(lr=1e-5), optim)
            vocab = model.config.vocab_size
            ids = torch.randint(0, vocab, (1, tokens), device=device)
            batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
            model.train()
            times = []
            for _ in range(3):
                step = time.time()
                (token_nll_sum(model, batch) / ids.numel()).backward()
                optimizer.step()
                optimizer.zero_grad(set_to_none=True)
                if device == "cuda":
                    torch.cuda.synchronize()
                times.append(time.time() - step)
            peak = torch.cuda.max_memory_allocated() / 2**30 if device == "cuda" else float("nan")
            steady = sum(times[1:]) / len(times[1:])
            print(f"quantized {method}: nf4 base, {sum(p.numel() for p in trainable.values()) / 1e9:.3f}B trained, "
                  f"3 steps of {tokens} tokens under a {cap_gb} GB cap: ran, peak {peak:.1f} GB, "
                  f"{tokens / steady:.0f} tokens/s ({time.time() - started:.0f} s)", flush=True)
        except torch.OutOfMemoryError:
            print(f"quantized {method}: out of memory under the {cap_gb} GB cap ({time.time() - started:.0f} s)")
        finally:
            model = optimizer = trainable = None
            if device == "cuda":
                torch.cuda.empty_cache()
                torch.cuda.reset_peak_memory_stats()


if __name__ == "__main__":
    main()
