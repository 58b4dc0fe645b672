"""What sparse training keeps for backward, and how the values' gradient is best computed.

  saved      bytes autograd saves beyond the model's parameters and buffers, one forward + backward of a
             Llama (default hidden 512, 4 layers, 16 tokens, density 0.1), full fine-tuning against sparse
  grad       the values' gradient of one layer (default 2048x2048 weight, density 0.1, 512 tokens), two ways:
             dense  (grad_out^T @ x).view(-1)[index], what the sparse layers do (one weight-sized temporary)
             gather sum over tokens of grad_out[:, row] * x[:, col] for each masked entry, in chunks of
                    `--chunk` entries (no weight-sized temporary; k*tokens products instead of out*in*tokens;
                    on one CPU thread 1024 was the fastest chunk, a GPU wants far larger ones)

    OMP_NUM_THREADS=1 python scripts/bench_saved.py [--device cuda --dtype bfloat16]
"""

from __future__ import annotations

import argparse
import time

import torch
from transformers import LlamaConfig, LlamaForCausalLM

from lota_cli.training import attach_sparse
from lota_cli.testing import saved_bytes

MiB = 1 << 20


def bench_saved(args) -> None:
    config = LlamaConfig(vocab_size=256, hidden_size=args.hidden, intermediate_size=args.hidden * 11 // 4,
                         num_hidden_layers=args.layers, num_attention_heads=8, num_key_value_heads=4,
                         tie_word_embeddings=False)
    ids = torch.randint(0, 256, (1, args.tokens), device=args.device)
    for method in ("full", "sparse"):
        torch.manual_seed(0)
        model = LlamaForCausalLM(config).to(args.device, getattr(torch, args.dtype))
        selected = 0
        if method == "sparse":
            positions = {n: torch.randperm(p.numel())[:int(args.density * p.numel())].int()
                         for n, p in model.named_parameters() if n.endswith("proj.weight")}
            selected = sum(model.get_parameter(n).nbytes for n in positions)
            attach_sparse(model, positions)
        extra = saved_bytes(model, lambda: model(input_ids=ids, labels=ids).loss.backward())
        share = f" = {extra / selected:.1%} of {selected / MiB:.1f} MiB selected weights" if selected else ""
        print(f"saved  {method:6s} {extra / MiB:8.2f} MiB{share}")


def dense_grad(grad_2d, x_2d, index, in_features, chunk):
    return (grad_2d.t() @ x_2d).view(-1).index_select(0, index).float()


def gather_grad(grad_2d, x_2d, index, in_features, chunk):
    g_rows, x_rows = grad_2d.t().contiguous(), x_2d.t().contiguous()  # one token row per output / input
    rows, cols = index.long() // in_features, index.long() % in_features
    out = torch.empty(index.numel(), dtype=torch.float32, device=grad_2d.device)
    for start in range(0, index.numel(), chunk):
        r, c = rows[start:start + chunk], cols[start:start + chunk]
        out[start:start + chunk] = (g_rows[r].float() * x_rows[c].float()).sum(1)
    return out


def bench_grad(args) -> None:
    dtype, device, (out_f, in_f) = getattr(torch, args.dtype), args.device, args.shape
    k = int(args.density * out_f * in_f)
    index = torch.randperm(out_f * in_f, device=device)[:k].int()
    grad_2d = torch.randn(args.grad_tokens, out_f, device=device, dtype=dtype)
    x_2d = torch.randn(args.grad_tokens, in_f, device=device, dtype=dtype)
    sync = torch.cuda.synchronize if device.startswith("cuda") else (lambda: None)
    results = {}
    for name, fn in (("dense", dense_grad), ("gather", gather_grad)):
        fn(grad_2d, x_2d, index, in_f, args.chunk)  # warm-up
        sync()
        if device.startswith("cuda"):
            torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated() if device.startswith("cuda") else 0
        times = []
        for _ in range(args.repeats):
            start = time.perf_counter()
            results[name] = fn(grad_2d, x_2d, index, in_f, args.chunk)
            sync()
            times.append(time.perf_counter() - start)
        peak = f", peak +{(torch.cuda.max_memory_allocated() - base) / MiB:.0f} MiB" if base else ""
        print(f"grad   {name:6s} {min(times) * 1e3:8.1f} ms (best of {args.repeats}){peak}")
    diff = (results["dense"] - results["gather"]).abs().max() / results["dense"].abs().max()
    print(f"grad   max |dense - gather| / max |dense| = {diff:.1e}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--dtype", default="float32")
    parser.add_argument("--density", type=float, default=0.1)
    parser.add_argument("--hidden", type=int, default=512)
    parser.add_argument("--layers", type=int, default=4)
    parser.add_argument("--tokens", type=int, default=16)
    parser.add_argument("--shape", type=int, nargs=2, default=(2048, 2048))
    parser.add_argument("--grad-tokens", type=int, default=512)
    parser.add_argument("--chunk", type=int, default=1024)
    parser.add_argument("--repeats", type=int, default=3)
    args = parser.parse_args()
    torch.manual_seed(0)
    bench_saved(args)
    bench_grad(args)


if __name__ == "__main__":
    main()
