"""Models as modules: experts one at a time (`layer.experts[i]`), copies after a forward
(`copy.deepcopy`, `AveragedModel` EMA, pickle)."""

from __future__ import annotations

import copy
import pickle

import pytest
import torch
from torch.optim.swa_utils import AveragedModel, get_ema_multi_avg_fn

from conftest import bank_params
from moekit import (
    ExpertBank,
    LMConfig,
    MixtralBlock,
    MixtureOfExperts,
    MoE,
    SimpleMoELayer,
    SoftMoE,
    SparseMoE,
    SparseMoELanguageModel,
    SwitchTransformer,
    total_aux_loss,
)
from moekit.experts import BankExpert


@pytest.mark.parametrize("activation,bias", [("relu", True), ("gelu", False), ("swiglu", False)])
def test_bank_expert_is_expert_i_on_the_banks_storage(activation, bias):
    bank = ExpertBank(5, 7, 6, activation, bias=bias).double()
    x = torch.randn(4, 7, dtype=torch.float64)
    params = bank_params(bank)
    assert len(bank) == 5 and len(list(bank)) == 5
    for e, expert in enumerate(bank):
        assert isinstance(expert, BankExpert) and list(expert.parameters()) == []
        want = torch.stack([params.apply(e, x[t]) for t in range(4)])
        torch.testing.assert_close(expert(x), want)
    assert bank[-1].index == 4
    out = bank[2](x)
    (grad,) = torch.autograd.grad(out.sum(), bank.w1)
    assert grad[2].abs().sum() > 0 and grad[[0, 1, 3, 4]].abs().sum() == 0
    with torch.no_grad():
        bank[3].weight.data.fill_(0.5)  # shares the bank's storage: [h, d] is w1[3]^T
    assert torch.all(bank.w1[3] == 0.5)
    with pytest.raises(IndexError, match="expert index 5"):
        bank[5]
    with pytest.raises(TypeError, match="expert index must be an int"):
        bank["0"]


def test_seed_003_style_loop_over_experts_equals_the_layer():
    """makeMoE's forward: each expert on its tokens, weighted by the gate, summed."""
    layer = MoE(8, 4, 2, 16, "relu", bias=True).eval()
    x = torch.randn(11, 8)
    routing = layer.router.route(x)
    want = torch.zeros_like(x)
    for i, expert in enumerate(layer.experts):
        hit = (routing.indices == i).any(-1)
        if hit.any():
            gate = (routing.weights * (routing.indices == i)).sum(-1)[hit, None]
            want[hit] += gate * expert(x[hit])
    torch.testing.assert_close(layer(x).output, want)


def test_expert_weight_grads_after_backward_and_modes():
    layer = MoE(8, 4, 2, 16, "relu", dropout=0.2)
    layer(torch.randn(6, 8)).output.sum().backward()
    for e, expert in enumerate(layer.experts):
        assert expert.weight.grad is not None
        torch.testing.assert_close(expert.weight.grad, layer.experts.w1.grad[e].t())
    layer.eval()
    assert not layer.experts[0].training
    assert not any(m.training for m in layer.experts.to_modules())
    layer.train()
    assert layer.experts[0].training and layer.experts.to_modules()[1].training


MODELS = {
    "MoE shared + sigmoid": (
        lambda: MoE(8, 4, 2, router="sigmoid", num_shared_experts=1, shared_gate=True),
        (3, 8),
    ),
    "SimpleMoELayer": (lambda: SimpleMoELayer(8, 4, 2), (2, 3, 8)),
    "MixtureOfExperts": (lambda: MixtureOfExperts(8, 16, 4, 2), (2, 3, 8)),
    "SwitchTransformer": (lambda: SwitchTransformer(8, 4, 1.25), (2, 3, 8)),
    "MixtralBlock": (lambda: MixtralBlock(8, 2, 4, 2), (2, 3, 8)),
    "SparseMoE": (lambda: SparseMoE(8, 4, 2), (2, 3, 8)),
    "SoftMoE": (lambda: SoftMoE(8, 4, 2), (2, 3, 8)),
}


def _first(out):
    return out[0] if isinstance(out, tuple) else out


@pytest.mark.parametrize("name", sorted(MODELS))
def test_deepcopy_ema_and_pickle_after_a_forward(name):
    build, shape = MODELS[name]
    torch.manual_seed(0)
    model = build().eval()
    x = torch.randn(*shape)
    want = _first(model(x))  # leaves losses with autograd history on the layers
    aux = total_aux_loss(model)
    for clone in (copy.deepcopy(model), pickle.loads(pickle.dumps(model))):
        torch.testing.assert_close(_first(clone(x)), want)
        torch.testing.assert_close(total_aux_loss(clone), aux)
    assert total_aux_loss(model).requires_grad == aux.requires_grad  # the original keeps its graph
    ema = AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.9))
    ema.update_parameters(model)
    torch.testing.assert_close(_first(ema(x)), want)


def test_language_model_ema_after_training_steps():
    torch.manual_seed(0)
    config = LMConfig(vocab_size=11, block_size=8, n_embed=16, n_head=2, n_layer=2, num_experts=4)
    model = SparseMoELanguageModel.from_config(config)
    ema = None
    optimizer = torch.optim.AdamW(model.parameters(), lr=1e-2)
    idx = torch.randint(0, 11, (4, 8))
    for _ in range(3):
        logits, loss = model(idx, idx)
        loss.backward()
        optimizer.step()
        optimizer.zero_grad()
        ema = ema or AveragedModel(model, multi_avg_fn=get_ema_multi_avg_fn(0.5))
        ema.update_parameters(model)
    clone = copy.deepcopy(model).eval()
    model.eval()
    torch.testing.assert_close(clone(idx)[0], model(idx)[0])
    assert not torch.equal(ema.module.lm_head.weight, model.lm_head.weight)  # an average
