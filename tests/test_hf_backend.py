"""moekit as a transformers experts backend, on every MoE family of the installed transformers.

The families are read from transformers itself (`moekit.hf.moe_families`: modeling files whose
experts class carries `@use_experts_implementation`), so a release that adds one is tested
with no change here. For each: a tiny random model (`tiny_model`), float32, eval mode, one
forward and backward under a fixed upstream gradient with `experts_implementation="eager"`
and `"moekit"`: the output and every parameter's gradient within 1e-5 relative (max |diff| /
max |eager|), or within twice transformers' own `grouped_mm`-vs-eager difference where float32
rounding alone is larger than that (ill-conditioned parameters of some families: their
entries are listed in docs/hf.md); where `grouped_mm` rounds exactly as eager does, a gradient
outside that is held to the float64 eager gradient: no further from it than twice eager's
own float32 error (jamba's Mamba projections). A counter proves moekit's function ran for each experts
module. A family that cannot be built small is skipped with its reason (`pytest -rs`).
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from moekit.hf import backend  # noqa: E402
from moekit.hf.catalog import TinyModelError, dummy_inputs, moe_families, tiny_model  # noqa: E402

INTERFACE = sorted(f.name for f in moe_families() if f.on_interface)


def _experts_modules(model: nn.Module) -> list[nn.Module]:
    """The modules the interface decorator built (it sets these attributes on each)."""
    return [
        m for m in model.modules() if hasattr(m, "_is_expert_parallel") and hasattr(m, "has_gate")
    ]


def _model(family: str) -> nn.Module:
    try:
        model = tiny_model(family)
    except TinyModelError as error:
        pytest.skip(f"no tiny model: {error}")
    with torch.no_grad():  # experts weights of unit scale: their outputs matter in the sum
        for module in _experts_modules(model):
            for param in module.parameters(recurse=False):
                param.normal_(0.0, 0.2, generator=torch.Generator().manual_seed(1))
    return model


def _step(model: nn.Module, implementation: str, inputs: dict):
    model.set_experts_implementation(implementation)
    model.zero_grad(set_to_none=True)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(**inputs)
    y = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    (y * upstream).sum().backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), grads


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def test_the_families_are_enumerated_from_transformers():
    names = {f.name for f in moe_families()}
    assert {"qwen3_moe", "gpt_oss", "deepseek_v3", "mixtral"} <= set(INTERFACE)
    assert {"llama4", "switch_transformers"} <= names - set(INTERFACE)  # MoE, not on it


def test_the_backend_is_a_transformers_backend_name():
    from transformers.integrations.moe import ALL_EXPERTS_FUNCTIONS

    assert ALL_EXPERTS_FUNCTIONS["moekit"] is backend.experts_forward
    config = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
    )
    model = transformers.AutoModelForCausalLM.from_config(config, experts_implementation="moekit")
    assert model.config._experts_implementation == "moekit"
    model.set_experts_implementation("eager")
    assert model.config._experts_implementation == "eager"


@pytest.mark.parametrize("family", INTERFACE)
def test_backend_equals_eager(family, monkeypatch):
    model = _model(family)
    inputs = dummy_inputs(model, 2, 8, seed=1)
    want, want_grads = _step(model, "eager", inputs)
    peer, peer_grads = _step(model, "grouped_mm", inputs)  # transformers' own float32 spread

    calls: list[int] = []
    run = backend._run

    def counted(module, *args):
        calls.append(id(module))
        return run(module, *args)

    monkeypatch.setattr(backend, "_run", counted)
    got, got_grads = _step(model, "moekit", inputs)
    assert {id(m) for m in _experts_modules(model)} == set(calls)

    assert _rel(got, want) <= max(1e-5, 2 * _rel(peer, want))
    assert got_grads.keys() == want_grads.keys()
    truth = None  # float64 eager, where float32 rounding alone exceeds the tolerance
    for name, grad in want_grads.items():
        tolerance = max(1e-5, 2 * _rel(peer_grads[name], grad))
        if _rel(got_grads[name], grad) <= tolerance:
            continue
        if truth is None:
            truth = _step(copy.deepcopy(model).double(), "eager", inputs)[1]
        exact = truth[name]  # moekit no further from it than twice eager's own float32 error
        error = _rel(got_grads[name].double(), exact)
        assert error <= max(1e-5, 2 * _rel(grad.double(), exact)), name


@pytest.mark.parametrize("family", INTERFACE)
def test_a_decode_step_equals_eager(family, monkeypatch):
    """A few tokens with no gradient (a `generate` step: T k <= 32 pairs) take the decode
    path (`backend._decode`: no plan; a matmul per chosen expert, or torch's grouped GEMM
    past 8 pairs): each experts module's output equals transformers' eager experts, for one
    token, a few, and every pair on one expert."""
    model = _model(family)
    model.set_experts_implementation("moekit")
    decoded: list[int] = []
    decode = backend._decode
    monkeypatch.setattr(backend, "_decode", lambda m, *a: decoded.append(1) or decode(m, *a))
    for experts in _experts_modules(model):
        num_experts = backend.stored_weight(experts, "down_proj").shape[0]
        d = backend.stored_weight(experts, "down_proj").shape[1 if experts.is_transposed else 2]
        top_k = min(2, num_experts)
        g = torch.Generator().manual_seed(5)
        for tokens in (1, 3, 32 // top_k):
            x = torch.randn(tokens, d, generator=g)
            ids = torch.stack(
                [torch.randperm(num_experts, generator=g)[:top_k] for _ in range(tokens)]
            )
            cases = [ids, torch.zeros_like(ids) + torch.arange(top_k)]  # any; experts 0..k-1
            for index in cases:
                weights = torch.rand(tokens, top_k, generator=g)
                with torch.no_grad():
                    got = experts(x, index, weights)  # the implementation "moekit"
                    model.set_experts_implementation("eager")
                    want = experts(x, index, weights)
                    model.set_experts_implementation("moekit")
                assert _rel(got, want) <= 1e-5, (family, tokens)
    assert decoded


def test_a_decode_step_of_quantised_experts_equals_the_grouped_pass():
    """nf4 experts: the decode path dequantises each chosen expert and equals the grouped
    pass (`run_experts` with a plan) on the same tokens."""
    from moekit.dispatch import make_plan
    from moekit.hf.experts import layout_of
    from moekit.hf.quantize import quantize_experts

    experts = _qwen3_experts()
    holder = nn.ModuleDict({"experts": experts})
    quantize_experts(holder, "nf4")
    x = torch.randn(3, 32)
    index, weights = torch.tensor([[0, 1], [2, 3], [1, 1]]), torch.rand(3, 2)
    with torch.no_grad():
        got = backend.experts_forward(experts, x, index, weights)
        plan = make_plan(index, weights, 4)
        want = backend.run_experts(experts, layout_of(experts), x, plan)
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)


def _qwen3_experts() -> nn.Module:
    """The experts module of a one-layer tiny Qwen3-MoE (4 experts, d=32)."""
    config = transformers.Qwen3MoeConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=32,
        moe_intermediate_size=16,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=2,
        head_dim=8,
        num_experts=4,
        num_experts_per_tok=2,
    )
    return transformers.Qwen3MoeForCausalLM(config).model.layers[0].mlp.experts


def test_backend_refuses_quantised_weights():
    experts = _qwen3_experts()
    experts.down_proj = nn.Parameter(
        experts.down_proj.detach().to(torch.float8_e4m3fn), requires_grad=False
    )
    x, index = torch.randn(3, 32), torch.tensor([[0, 1], [2, 3], [1, 2]])
    with pytest.raises(TypeError, match="quantised"):
        backend.experts_forward(experts, x, index, torch.full((3, 2), 0.5))


def test_backend_takes_expert_parallel_sentinels_and_empty_batches():
    experts = _qwen3_experts()
    x = torch.randn(3, 32)
    index, weights = torch.tensor([[0, 4], [2, 3], [4, 4]]), torch.rand(3, 2)
    experts._is_expert_parallel = True  # ids >= E belong to other ranks: they add nothing
    got = backend.experts_forward(experts, x, index, weights)
    kept = torch.tensor([[0, 0], [2, 3], [0, 0]])
    want = backend.experts_forward(experts, x, kept, weights * (index < 4))
    torch.testing.assert_close(got, want)
    empty = backend.experts_forward(experts, x[:0], index[:0], weights[:0])
    assert empty.shape == (0, 32)
    with pytest.raises(ValueError, match=r"\[T, k\]"):
        backend.experts_forward(experts, x, index[:2], weights[:2])
