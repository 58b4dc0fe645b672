"""bench train: sparse-train (LoTA) against calibrate (dense fine-tuning, FFT) on the same model, batch and
sequence length: step time, training-state bytes, peak RSS. Each (method, round) runs in a fresh child;
rounds alternate FFT, LoTA, FFT, LoTA so drifting machine load hits both alike."""

from __future__ import annotations

from bench_common import Figure, in_child, log, median


def _tensor_bytes(t) -> int:
    return t.numel() * t.element_size()


def state_bytes(trainable: dict, optimizer, model, method: str) -> dict:
    """Bytes of everything training adds beside the frozen weights, counted from the actual tensors:
    gradients, optimizer state, and for LoTA the trained values and their positions. (No master copies:
    the weights train in float32.)"""
    grads = sum(_tensor_bytes(p.grad) for p in trainable.values() if p.grad is not None)
    optim = sum(_tensor_bytes(v) for state in optimizer.state.values() for v in state.values()
                if hasattr(v, "numel"))
    values = index = 0
    if method == "lota":
        values = sum(_tensor_bytes(p) for p in trainable.values())
        index = sum(_tensor_bytes(m.lota_index) for m in model.modules() if hasattr(m, "lota_index"))
    return {"grads": grads, "optimizer": optim, "values": values, "index": index,
            "total": grads + optim + values + index}


def train_steps(model: str, method: str, batch: int, seq: int, steps: int, sparsity: float,
                smollm2: str | None, dtype: str = "float32") -> dict:
    """Child: `steps` timed optimizer steps (after one warm-up) of FFT or LoTA on one fixed batch; the warm-up
    step also counts the bytes saved for backward."""
    import time

    import torch

    from bench_common import PeakRSS, status
    from bench_models import load
    from lota_cli.models import token_nll_sum
    from lota_cli.training import attach_sparse, make_optimizer
    from lota_cli.cli import return_freed_memory
    from lota_cli.testing import saved_bytes
    from lota_cli.config import OptimConfig, ParamsConfig, TrainConfig
    from lota_cli.ops import k_for
    from lota_cli.models import select_params

    return_freed_memory()  # as every lota process does at start
    net, _ = load(model, smollm2, dtype)
    names = select_params(net, ParamsConfig())
    gen = torch.Generator().manual_seed(0)
    ids = torch.randint(0, net.config.vocab_size, (batch, seq), generator=gen)
    data = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    targets = batch * (seq - 1)
    tcfg, ocfg = TrainConfig(lr=1e-5, max_grad_norm=1.0), OptimConfig()
    rss_loaded = status()["VmRSS"]
    net.train()

    with PeakRSS() as rss:
        if method == "fft":  # what calibrate trains: the selected weights, densely
            for p in net.parameters():
                p.requires_grad_(False)
            trainable = {n: net.get_parameter(n).requires_grad_(True) for n in names}
        else:  # what sparse-train trains: (1 - sparsity) of the entries of the same weights
            positions = {}
            for n in names:
                numel = net.get_parameter(n).numel()
                positions[n] = torch.randperm(numel, generator=gen)[:k_for(sparsity, numel)].sort().values.int()
            trainable = attach_sparse(net, positions)
        params = list(trainable.values())
        optimizer = make_optimizer(params, tcfg, ocfg)
        times, state, saved = [], None, 0

        def forward_backward():
            (token_nll_sum(net, data) / targets).backward()

        for step in range(steps + 1):
            start = time.perf_counter()
            if step == 0:
                saved = saved_bytes(net, forward_backward)
            else:
                forward_backward()
            torch.nn.utils.clip_grad_norm_(params, tcfg.max_grad_norm)
            optimizer.step()
            elapsed = time.perf_counter() - start
            if step == steps:
                state = state_bytes(trainable, optimizer, net, method)  # gradients still held
            optimizer.zero_grad(set_to_none=True)
            if step:  # the first step allocates the optimizer state: warm-up
                times.append(elapsed)
    selected = [net.get_parameter(n) for n in names]
    return {"times": times, "state": state, "rss_peak": rss.peak, "rss_extra": rss.extra,
            "rss_loaded": rss_loaded, "trained": sum(p.numel() for p in params), "saved": saved,
            "selected": sum(p.numel() for p in selected),
            "selected_bytes": sum(p.numel() * p.element_size() for p in selected)}


def run(cfg) -> list[Figure]:
    from bench_models import smollm2_dir

    c = cfg.train
    figures = []
    for model in c.models:
        smollm2 = smollm2_dir(cfg) if model == "smollm2" else None
        runs = {"fft": [], "lota": []}
        for r in range(c.rounds):
            for method in ("fft", "lota"):
                res = in_child("bench_train", "train_steps", model=model, method=method, batch=c.batch, seq=c.seq,
                               steps=c.steps if model == "smollm2" else c.tiny_steps, sparsity=c.sparsity,
                               smollm2=smollm2)
                runs[method].append(res)
                log(f"train {model} round {r + 1} {method}: step {median(res['times']):.3f} s, "
                    f"state {res['state']['total'] / 2**20:.1f} MiB, peak RSS {res['rss_peak'] / 2**20:.0f} MiB")
        fft, lota = runs["fft"], runs["lota"]
        t_fft = median([t for r in fft for t in r["times"]])
        t_lota = median([t for r in lota for t in r["times"]])
        s_fft, s_lota = fft[-1]["state"], lota[-1]["state"]
        peak_fft, peak_lota = median([r["rss_peak"] for r in fft]), median([r["rss_peak"] for r in lota])
        extra_fft, extra_lota = median([r["rss_extra"] for r in fft]), median([r["rss_extra"] for r in lota])
        where = (f"{model}: {fft[-1]['selected'] / 1e6:.1f}M selected weights, batch {c.batch} x {c.seq} tokens, "
                 f"LoTA trains {lota[-1]['trained'] / 1e6:.2f}M (sparsity {c.sparsity})")
        part = f"train/{model}"
        figures += [
            Figure(part, "calibrate (FFT) step, median", t_fft, "s", note=where),
            Figure(part, "sparse-train (LoTA) step, median", t_lota, "s",
                   note=f"{len(fft[0]['times']) * c.rounds} steps each after a warm-up, fresh process per round, "
                        "rounds alternated"),
            Figure(part, "step time LoTA / FFT", t_lota / t_fft, "x", 1.0),
            Figure(part, "training state, FFT", s_fft["total"], "B",
                   note=f"grads {s_fft['grads'] / 2**20:.0f} MiB + AdamW {s_fft['optimizer'] / 2**20:.0f} MiB"),
            Figure(part, "training state, LoTA", s_lota["total"], "B",
                   note=f"grads {s_lota['grads'] / 2**20:.1f} + AdamW {s_lota['optimizer'] / 2**20:.1f} + values "
                        f"{s_lota['values'] / 2**20:.1f} + positions {s_lota['index'] / 2**20:.1f} MiB"),
            Figure(part, "training state LoTA / FFT", s_lota["total"] / s_fft["total"], "x", 0.2),
            Figure(part, "peak RSS LoTA / FFT (whole process)", peak_lota / peak_fft, "x",
                   note=f"{peak_lota / 2**20:.0f} vs {peak_fft / 2**20:.0f} MiB; added by training: "
                        f"{extra_lota / 2**20:.0f} vs {extra_fft / 2**20:.0f} MiB"),
        ]
    return figures
