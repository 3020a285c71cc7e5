"""SoftMoE against the float64 slot-by-slot oracle (reference.soft_moe)."""

from __future__ import annotations

import pytest
import torch

import reference as ref
from conftest import bank_params, check_parity, leaf64
from moekit import ExpertBank, SoftMoE


@pytest.mark.parametrize(
    "b,n,d,e,s",
    [(1, n, d, e, s) for n in (1, 7, 33) for d in (3, 17) for e in (1, 3, 8) for s in (1, 2)]
    + [(2, 7, 17, 3, 2), (3, 5, 3, 8, 1)],
)
@pytest.mark.parametrize("activation", ["relu", "swiglu"])
def test_soft_moe_matches_oracle(b, n, d, e, s, activation):
    layer = SoftMoE(d, e, s, d_hidden=6, activation=activation).double()
    params = [layer.phi, layer.experts.w1, layer.experts.w2, layer.experts.b1, layer.experts.b2]

    def run(x):
        return layer(x), x.new_zeros(())

    def oracle(x64):
        phi, ex = leaf64(layer.phi), bank_params(layer.experts)
        out = ref.soft_moe(x64, phi, ex)
        return out, x64.new_zeros(()), [phi, ex.w1, ex.w2, ex.b1, ex.b2]

    check_parity(run, torch.randn(b, n, d, dtype=torch.float64), params, oracle)


def test_soft_moe_any_sequence_length_and_leading_shape():
    layer = SoftMoE(16, 4, 2)
    assert tuple(layer.phi.shape) == (16, 4, 2)
    for shape in [(1, 7, 16), (3, 1, 16), (2, 3, 5, 16), (9, 16), (2, 0, 16)]:
        out = layer(torch.randn(*shape))
        assert out.shape == shape and torch.isfinite(out).all()


def test_soft_moe_batch_rows_are_independent():
    layer = SoftMoE(8, 3, 2)
    x = torch.randn(4, 6, 8)
    torch.testing.assert_close(layer(x)[1:2], layer(x[1:2]))


def test_soft_moe_accepts_a_custom_bank():
    bank = ExpertBank(4, 8, 16, "swiglu", backend="grouped")
    layer = SoftMoE(8, 4, 2, experts=bank)
    layer(torch.randn(2, 5, 8)).square().mean().backward()
    assert layer.phi.grad is not None and bank.w1.grad is not None
    with pytest.raises(ValueError, match="num_experts"):
        SoftMoE(8, 3, 2, experts=bank)
