"""Which tensors a stage trains and selects from (params.*): the schema and the selection it makes."""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import List

from lota_cli import LotaError
from lota_cli.config._options import opt

ATTN_MLP_WEIGHTS = r".*(attn|attention|mlp|ffn|feed_forward).*\.weight$"


@dataclass
class ParamsConfig:
    """Which tensors a stage trains and selects from: the tensors of 2 or more dimensions (weight matrices,
    fused MoE expert stacks) whose names match include and not exclude."""

    # Default: the attention and MLP weight matrices, and the fused experts of MoE blocks, which transformers 5
    # stores as 3-D tensors on one module, not as modules with a .weight: `mlp.experts.gate_up_proj`
    # [experts, 2 x intermediate, hidden] and `mlp.experts.down_proj` [experts, hidden, intermediate]
    # (Qwen3-MoE, Mixtral, ...; their `_bias` stacks stay out). Masks cover every entry of such a tensor,
    # as flat row-major positions. The shared/dense parts of an MoE model are selected as in a dense one.
    # Routers stay out (the MoE block's `mlp.gate.weight`, any `router`, Qwen2-MoE's `shared_expert_gate`):
    # they are tiny, and moving them reroutes tokens, which changes which experts' entries matter (the mask
    # was drawn under calibration's routing); they are also often kept in fp32.
    include: List[str] = opt(factory=lambda: [ATTN_MLP_WEIGHTS, r".*\.experts\.\w*proj"],
                             help="regexes of tensor names to train and select (default: attention and MLP "
                                  "weights, and fused MoE experts)")
    exclude: List[str] = opt(factory=lambda: [r".*(norm|embed|lm_head).*",
                                              r".*(\.gate\.|router|shared_expert_gate).*"],
                             help="regexes of tensor names never trained or selected (default: norms, "
                                  "embeddings, lm_head and MoE routers)")


def param_matcher(cfg: ParamsConfig):
    """name -> whether params.include matches it and params.exclude does not."""
    include = [re.compile(p) for p in cfg.include]
    exclude = [re.compile(p) for p in cfg.exclude]
    return lambda name: any(r.fullmatch(name) for r in include) and not any(r.fullmatch(name) for r in exclude)


def selected(shapes: dict[str, tuple[int, ...]], cfg: ParamsConfig) -> list[str]:
    """Names of the tensors of 2 or more dimensions (weight matrices, 3-D stacks of fused MoE experts)
    matching params.include and not params.exclude, in the given order. Vectors and scalars (biases, norm
    scales, router biases) are never selected; a hand-made mask over one still trains (sparse.attach takes
    any parameter)."""
    matches = param_matcher(cfg)
    names = [name for name, shape in shapes.items() if len(shape) >= 2 and matches(name)]
    if not names:
        sample = ", ".join(list(shapes)[:6])
        raise LotaError(f"no parameters match params.include={list(cfg.include)} (excluding {list(cfg.exclude)}); "
                        f"the tensor names look like: {sample}")
    return names
