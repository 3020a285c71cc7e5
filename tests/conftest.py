"""Shared test setup: hypothesis profiles and float64 parameter copies for the oracles."""

from __future__ import annotations

import os

import pytest
import torch
from hypothesis import HealthCheck, settings

from reference import ExpertParams, GateParams

settings.register_profile(
    "ci", max_examples=40, derandomize=True, deadline=None, print_blob=True,
    suppress_health_check=[HealthCheck.too_slow],
)
settings.register_profile("dev", max_examples=400, deadline=None)
settings.load_profile(os.environ.get("HYPOTHESIS_PROFILE", "ci"))


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)


def leaf64(t: torch.Tensor | None) -> torch.Tensor | None:
    """A float64 leaf copy that records gradients."""
    return None if t is None else t.detach().double().requires_grad_(True)


def gate_params(linear: torch.nn.Linear) -> GateParams:
    return GateParams(leaf64(linear.weight), leaf64(linear.bias))


def bank_params(bank) -> ExpertParams:
    """Float64 leaf copies of an ExpertBank's stacked weights."""
    return ExpertParams(
        leaf64(bank.w1), leaf64(bank.w2), leaf64(bank.b1), leaf64(bank.b2), bank.activation
    )


def list_params(experts) -> ExpertParams:
    """Float64 leaf copies of an ExpertList of MLPExperts, stacked as [E, d_in, d_out]."""
    w1 = torch.stack([e.fc1.weight.t() for e in experts])
    w2 = torch.stack([e.fc2.weight.t() for e in experts])
    has_bias = experts[0].fc1.bias is not None
    b1 = torch.stack([e.fc1.bias for e in experts]) if has_bias else None
    b2 = torch.stack([e.fc2.bias for e in experts]) if has_bias else None
    return ExpertParams(leaf64(w1), leaf64(w2), leaf64(b1), leaf64(b2), experts[0].activation)
