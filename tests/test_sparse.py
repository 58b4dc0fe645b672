"""sparse.py's linear layer: the gradients of the values are those of the plain formulation (weight + values
added by index, then F.linear), it keeps no weight-sized copy for backward, and entries outside the mask never
move."""

from __future__ import annotations


import pytest
import torch
import torch.nn.functional as F
from transformers import LlamaConfig, LlamaForCausalLM

from conftest import random_positions
from lota_cli.training import _sparse as sparse
from lota_cli.testing import saved_bytes
from lota_cli.models import frozen_linear


def reference_forward(module, x):
    """The formulation sparse.py replaced: autograd through index_add saves the merged weight."""
    delta = module.lota_values.to(module.weight.dtype)
    weight = module.weight.reshape(-1).index_add(0, module.lota_index, delta).view_as(module.weight)
    return F.linear(x, weight, module.bias)


def tiny_llama(hidden=64, layers=2, intermediate=128, vocab=128, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    config = LlamaConfig(vocab_size=vocab, hidden_size=hidden, intermediate_size=intermediate,
                         num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=64, tie_word_embeddings=False)
    return LlamaForCausalLM(config).to(dtype).eval()  # eval: no dropout, so two runs are comparable


def attached(model, density=0.1, seed=0, reference=False):
    """model with random positions and random non-zero starting values attached (so the merged weight is
    not the base); reference=True swaps in the old forward."""
    # every linear weight of the decoder layers (not lm_head)
    positions = random_positions({n: p for n, p in model.named_parameters() if n.endswith("proj.weight")},
                                 density, seed)
    g = torch.Generator().manual_seed(seed + 1)
    values = {n: torch.randn(len(i), generator=g) * 0.02 for n, i in positions.items()}
    trainable = sparse.attach_sparse(model, positions, values)
    if reference:
        for name in positions:
            module = model.get_submodule(name.rpartition(".")[0])
            module.forward = reference_forward.__get__(module)
    return trainable


def loss_and_grads(model, trainable, ids):
    loss = model(input_ids=ids, labels=ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in trainable.items()}


def _sparse_linear(x, weight, bias, index, values):
    """models.frozen_linear over a linear layer holding `weight` and `bias` as they are (for gradcheck)."""
    layer = torch.nn.Linear(1, 1)
    layer._parameters.update(weight=weight, bias=bias)
    return frozen_linear(layer, x, index, values)


def test_gradcheck_float64():
    """Against finite differences, for the input, bias, values and (when it trains) the weight, with
    leading batch dimensions and without."""
    g = torch.Generator().manual_seed(0)
    weight = torch.randn(4, 5, dtype=torch.float64, generator=g)
    index = torch.randperm(20, generator=g)[:7].int()
    values = torch.randn(7, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(4, dtype=torch.float64, generator=g, requires_grad=True)
    for shape in ((2, 3, 5), (5,)):
        x = torch.randn(*shape, dtype=torch.float64, generator=g, requires_grad=True)
        assert torch.autograd.gradcheck(_sparse_linear, (x, weight, bias, index, values))
    x = torch.randn(3, 5, dtype=torch.float64, generator=g)  # an input that needs no gradient, no bias
    assert torch.autograd.gradcheck(_sparse_linear, (x, weight, None, index, values))
    assert torch.autograd.gradcheck(_sparse_linear, (x, weight.requires_grad_(), bias, index, values))


@pytest.mark.parametrize("mode", ["float32", "bfloat16 weights", "float32 under bf16 autocast"])
def test_loss_and_value_gradients_are_bitwise_the_index_add_formulations(mode):
    """The same matmuls in the same dtype as F.linear and its backward (bf16 for bf16 weights or under
    autocast), so the loss and the gradients are bitwise equal; the values and their gradients stay fp32."""
    dtype = torch.bfloat16 if mode == "bfloat16 weights" else torch.float32
    new, old = tiny_llama(dtype=dtype), tiny_llama(dtype=dtype)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled="autocast" in mode):
        loss, grads = loss_and_grads(new, attached(new), ids)
        ref_loss, ref_grads = loss_and_grads(old, attached(old, reference=True), ids)
    assert torch.equal(loss, ref_loss)
    for name, grad in grads.items():
        assert grad.dtype == torch.float32 and torch.equal(grad, ref_grads[name]), name


def test_backward_saves_no_weight_sized_copies():
    """A model whose weights dominate (hidden 512, 4 layers, 8 tokens, density 0.1): what backward keeps beyond
    the resident tensors is activations only, no more than full fine-tuning keeps (1.13 vs 1.30 MiB) and under
    5% of the 44.3 MiB of selected weights (the index_add formulation kept 43.4 MiB)."""
    ids = torch.randint(0, 256, (1, 8), generator=torch.Generator().manual_seed(0))
    full = tiny_llama(hidden=512, layers=4, intermediate=1376, vocab=256)
    full_bytes = saved_bytes(full, lambda: full(input_ids=ids, labels=ids).loss.backward())
    model = tiny_llama(hidden=512, layers=4, intermediate=1376, vocab=256)
    trainable = attached(model)
    selected = sum(model.get_parameter(n).nbytes for n in trainable)
    assert saved_bytes(model, lambda: model(input_ids=ids, labels=ids).loss.backward()) <= min(full_bytes,
                                                                                               0.05 * selected)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_entries_outside_the_mask_never_move(dtype):
    """A few AdamW steps with weight decay: every weight stays bitwise the base's, the values and their AdamW
    state are float32 whatever the weights' dtype (bf16: model.dtype=bfloat16), the values train, and fold
    writes base + values (rounded once to the weights' dtype) inside the mask only."""
    model = tiny_llama(dtype=dtype)
    base = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = attached(model)
    start = {n: p.detach().clone() for n, p in trainable.items()}
    optimizer = torch.optim.AdamW(trainable.values(), lr=1e-2, weight_decay=0.1)
    ids = torch.randint(0, 128, (2, 12), generator=torch.Generator().manual_seed(0))
    for _ in range(3):
        model(input_ids=ids, labels=ids).loss.backward()
        optimizer.step()
        optimizer.zero_grad()
    for name, p in model.named_parameters():
        if name in base:
            assert p.dtype == dtype and torch.equal(p, base[name]), name
    assert all(p.dtype == torch.float32 and not torch.equal(p, start[n]) for n, p in trainable.items())
    assert all(v.dtype == torch.float32 for state in optimizer.state.values() for v in state.values() if v.dim())
    positions = {n: model.get_submodule(n.rpartition(".")[0]).lota_index.long() for n in trainable}
    values = {n: p.detach().clone() for n, p in trainable.items()}
    sparse.fold_sparse(model, list(trainable))
    for name, index in positions.items():
        weight, expected = model.get_parameter(name).reshape(-1), base[name].reshape(-1).clone()
        expected.index_add_(0, index, values[name].to(dtype))
        assert torch.equal(weight, expected), name
