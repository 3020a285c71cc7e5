"""Shared test setup: hypothesis profiles and float64 parameter copies for the oracles."""

from __future__ import annotations

import os

import pytest
import torch

if not torch.cuda.is_available():  # Triton kernels run on CPU tensors, interpreted (tests only)
    os.environ.setdefault("TRITON_INTERPRET", "1")
from hypothesis import HealthCheck, settings

from reference import ExpertParams, GateParams

settings.register_profile(
    "ci",
    max_examples=40,
    derandomize=True,
    deadline=None,
    print_blob=True,
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


def check_parity(run, x: torch.Tensor, params: list[torch.Tensor], oracle) -> None:
    """Output, auxiliary loss and every gradient of `run` against the float64 `oracle`.

    run(x) -> (out, aux); oracle(x64) -> (out, aux, leaves) where leaves mirror `params`.
    One random upstream gradient is shared; the aux loss joins the same backward.
    """
    x = x.requires_grad_(True)
    out, aux = run(x)
    upstream = torch.randn_like(out)
    got = torch.autograd.grad((out * upstream).sum() + aux, [x, *params])

    x64 = leaf64(x)
    ref_out, ref_aux, ref_leaves = oracle(x64)
    loss = (ref_out * upstream.double()).sum() + ref_aux
    want = torch.autograd.grad(loss, [x64, *ref_leaves])

    tol = {} if x.dtype == torch.float64 else {"atol": 1e-5, "rtol": 1e-4}  # float32 vs float64
    torch.testing.assert_close(out.double(), ref_out, **tol)
    torch.testing.assert_close(aux.double(), ref_aux, **tol)
    assert len(got) == len(want)
    for i, (g, w) in enumerate(zip(got, want, strict=True)):
        torch.testing.assert_close(
            g.double(), w, **tol, msg=lambda m, i=i: f"gradient {i} (0 = x): {m}"
        )
