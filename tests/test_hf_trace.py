"""transformers' MoE families on moekit under `torch.export` and `torch.compile(fullgraph=True)`,
with PEFT's forward arguments, and switching the experts implementation after `patch_model`.

Oracle: the same module run eagerly on the same inputs (forward and every gradient under one
upstream gradient); for the switch, transformers' own "eager" code.

- Every family on transformers' ExpertsInterface: its experts module on the backend, and
  every family `patch_model` covers: each module it patched (router, experts, block), export (non-strict and strict; the
  exported program equals eager) and compile as one graph (`fullgraph=True`; dynamo and AOT
  autograd trace the forward and the backward with the `aot_eager` backend, which runs no
  inductor code generation, so the suite stays minutes long).
- Two whole models, Qwen3-MoE (moekit's fused path) and gpt-oss (the general path: a class
  gate, biases), on the backend and patched: no graph break (`torch._dynamo.explain`), and
  inductor's compiled loss and gradients equal eager's within float32 rounding; the export of
  the whole model equals eager.
- PEFT: mixed adapter batches (`adapter_names=`) work, or fail with PEFT's own error, exactly
  as without the patch; moekit's expert LoRA compiles as one graph.
- `set_experts_implementation` after `patch_model`: the config and the code agree.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn
from torch.utils._pytree import tree_leaves, tree_map

transformers = pytest.importorskip("transformers")

from moekit.hf import is_patched, patch_model, unpatch_model  # noqa: E402
from moekit.hf.catalog import TinyModelError, dummy_inputs, moe_families, tiny_model  # noqa: E402
from moekit.hf.forward import PatchedForward  # noqa: E402
from moekit.hf.patch import holds_experts  # noqa: E402

FAMILIES = moe_families()
INTERFACE = sorted(f.name for f in FAMILIES if f.on_interface)
# Switch Transformers' experts are modules of their own, each run on its own data-dependent
# number of tokens: neither transformers' code nor moekit's traces as one graph
DATA_DEPENDENT = {"switch_transformers": "each expert a module run on a data-dependent row count"}


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()


def _model(family: str) -> nn.Module:
    try:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            return tiny_model(family)
    except TinyModelError as error:
        pytest.skip(f"no tiny model: {error}")


def _inputs(model: nn.Module) -> dict:
    return {**dummy_inputs(model, 2, 8, seed=1), "use_cache": False}


def _logits(out) -> torch.Tensor:
    """The model's output: logits, or the last hidden state of a base model."""
    logits = getattr(out, "logits", None)
    return logits if logits is not None else out.last_hidden_state


def _is_experts(module: nn.Module) -> bool:
    """An experts module of transformers' interface (the decorator sets these attributes)."""
    return hasattr(module, "has_gate") and hasattr(module, "_is_expert_parallel")


def _patched(module: nn.Module) -> bool:
    """A module whose forward `patch_model` replaced: a router, experts, or a whole block."""
    return isinstance(module.__dict__.get("forward"), PatchedForward)


def _calls(model: nn.Module, pick) -> list[tuple[nn.Module, tuple, dict]]:
    """(module, args, kwargs) of the first call of each picked module class in one forward."""
    calls, hooks = {}, []

    def record(module, args, kwargs):
        calls.setdefault(type(module), (module, args, kwargs))

    for module in model.modules():
        if pick(module):
            hooks.append(module.register_forward_pre_hook(record, with_kwargs=True))
    with torch.no_grad(), warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model(**_inputs(model))
    for hook in hooks:
        hook.remove()
    return list(calls.values())


def _traceable(value):
    """A call's argument as export takes it: tensors, numbers and None; a cache object -> None."""
    plain = (torch.Tensor, int, float, bool, str, type(None))
    return value if all(isinstance(v, plain) for v in tree_leaves(value)) else None


def _leaves(out) -> list[torch.Tensor]:
    return [t for t in tree_leaves(out) if isinstance(t, torch.Tensor) and t.is_floating_point()]


def _run(module: nn.Module, run, args: tuple, kwargs: dict):
    """Outputs and the gradients of every float input and parameter, one upstream gradient."""
    args = tree_map(lambda t: t.detach().clone() if isinstance(t, torch.Tensor) else t, args)
    inputs = [t for t in tree_leaves(args) if isinstance(t, torch.Tensor) and t.is_floating_point()]
    for t in inputs:
        t.requires_grad_(True)
    params = [p for p in module.parameters() if p.requires_grad]
    outs = _leaves(run(*args, **kwargs))
    generator = torch.Generator().manual_seed(3)
    loss = sum((o * torch.randn(o.shape, generator=generator)).sum() for o in outs)
    grads = torch.autograd.grad(loss, inputs + params, allow_unused=True)
    return [o.detach() for o in outs], [g for g in grads if g is not None]


def _assert_traces(module: nn.Module, args: tuple, kwargs: dict) -> None:
    """Export (non-strict, strict) equals eager; fullgraph compile equals eager, forward and
    backward."""
    kwargs = {k: _traceable(v) for k, v in kwargs.items()}
    with torch.no_grad():
        want = _leaves(module(*args, **kwargs))
    for strict in (False, True):
        program = torch.export.export(module, args, kwargs, strict=strict)
        with torch.no_grad():
            got = _leaves(program.module()(*args, **kwargs))
        assert len(got) == len(want)
        for g, w in zip(got, want, strict=True):
            torch.testing.assert_close(g, w)
    torch._dynamo.reset()
    compiled = torch.compile(module, fullgraph=True, backend="aot_eager")
    got_outs, got_grads = _run(module, compiled, args, kwargs)
    want_outs, want_grads = _run(module, module, args, kwargs)
    assert len(got_grads) == len(want_grads) > 0
    for g, w in zip(got_outs + got_grads, want_outs + want_grads, strict=True):
        torch.testing.assert_close(g, w)


def test_fake_functional_and_meta_tensors_are_not_taken_for_quantised_ones():
    """What export and compile trace with reads as plain weights; a quantised dtype or a
    tensor subclass of another kind does not, fake or not."""
    from torch._subclasses.fake_tensor import FakeTensorMode

    from moekit.hf.experts import quantised_reason

    with FakeTensorMode():
        fake = torch.empty(4, 3)
        fake8 = torch.empty(4, 3, dtype=torch.float8_e4m3fn)
    meta = nn.Parameter(torch.empty(4, 3, device="meta"))
    assert quantised_reason(fake) is None and quantised_reason(meta) is None
    assert quantised_reason(fake8) == "is torch.float8_e4m3fn"
    assert quantised_reason(torch.zeros(4, dtype=torch.int8)) == "is torch.int8"

    class Packed(torch.Tensor):  # a stand-in for a quantised tensor subclass
        pass

    assert quantised_reason(torch.zeros(4).as_subclass(Packed)) == "is a Packed"


@pytest.mark.parametrize("family", INTERFACE)
def test_backend_exports_and_compiles_as_one_graph(family):
    """The experts module of every family on the interface, on moekit's backend: fake tensors
    are not taken for quantised weights, no module is built per call, no host read."""
    model = _model(family)
    model.set_experts_implementation("moekit")
    calls = _calls(model, _is_experts)
    assert calls
    for module, args, kwargs in calls:
        _assert_traces(module, args, kwargs)


PATCHED = sorted(f.name for f in FAMILIES if f.name not in DATA_DEPENDENT)


@pytest.mark.parametrize("family", PATCHED)
def test_patched_block_exports_and_compiles_as_one_graph(family):
    """Every module whose forward `patch_model` replaced (routers, experts, Llama 4's and
    DBRX's blocks) in every family it covers."""
    model = _model(family)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not patch_model(model):
            pytest.skip("patch_model covers no block of this family")
    calls = _calls(model, _patched)
    assert calls
    for module, args, kwargs in calls:
        _assert_traces(module, args, kwargs)


def test_switch_transformers_block_is_data_dependent_as_transformers_own():
    """The one family that does not trace whole: per-expert modules on data-dependent row
    counts. Compiled without fullgraph it still equals eager (with graph breaks, as
    transformers' own block has)."""
    model = _model("switch_transformers")
    inputs = _inputs(model)
    want = model(**inputs).logits
    patch_model(model)
    torch._dynamo.reset()
    got = torch.compile(model, backend="aot_eager")(**inputs).logits
    torch.testing.assert_close(got, want)


def _step(model: nn.Module, run, inputs: dict):
    model.zero_grad(set_to_none=True)
    loss = run(**inputs, labels=inputs["input_ids"]).loss
    loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return loss.detach(), grads


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
@pytest.mark.parametrize("patched", [False, True], ids=["backend", "patched"])
def test_whole_model_compiles_without_graph_breaks_and_exports(family, patched):
    """torch.compile(model, fullgraph=True) with inductor: no graph break, loss and every
    gradient equal eager's (float32, 1e-5 relative); torch.export of the model equals eager."""
    model = _model(family).train()
    model.set_experts_implementation("moekit")
    if patched:
        patch_model(model, strict=True)
    inputs = _inputs(model)
    torch._dynamo.reset()
    explained = torch._dynamo.explain(model)(**inputs)
    assert explained.graph_break_count == 0, explained.break_reasons
    torch._dynamo.reset()
    got, got_grads = _step(model, torch.compile(model, fullgraph=True), inputs)
    want, want_grads = _step(model, model, inputs)
    assert _rel(got, want) <= 1e-5
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert _rel(got_grads[name], grad) <= 1e-5, name
    model.eval()
    with torch.no_grad():
        want = model(**inputs).logits
        for strict in (False, True):
            program = torch.export.export(model, (), inputs, strict=strict)
            torch.testing.assert_close(program.module()(**inputs).logits, want)


def _lora(model: nn.Module, **config):
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peft.get_peft_model(model, peft.LoraConfig(r=4, init_lora_weights=False, **config))
    torch.manual_seed(1)
    model.add_adapter("other", peft.LoraConfig(r=4, init_lora_weights=False, **config))
    return model


def _outcome(model: nn.Module, inputs: dict):
    """The logits, or the error PEFT raised (type and message)."""
    try:
        with torch.no_grad():
            return model(**inputs).logits
    except (ValueError, TypeError) as error:
        return type(error), str(error)


@pytest.mark.parametrize(
    "config",
    [
        dict(target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]),
        dict(target_modules=["q_proj", "v_proj"]),
    ],
    ids=["experts", "attention"],
)
def test_peft_mixed_adapter_batches_behave_as_without_the_patch(config):
    """`adapter_names=` (one adapter per sequence): with LoRA on the attention PEFT runs the
    mixed batch, and the patched model gives the same logits; with LoRA on the experts PEFT
    refuses with its own error, and so does the patched model (never a TypeError of ours)."""
    base = _model("qwen3_moe")
    base.set_experts_implementation("eager")
    want_model = _lora(copy.deepcopy(base), **config)
    got_model = _lora(copy.deepcopy(base), **config)
    assert patch_model(got_model, strict=True) == 2
    inputs = {**dummy_inputs(base, 2, 8, seed=1), "adapter_names": ["default", "other"]}
    want, got = _outcome(want_model, inputs), _outcome(got_model, inputs)
    if isinstance(want, tuple):
        assert want[0] is ValueError and got == want
    else:
        torch.testing.assert_close(got, want)
    plain = dict(inputs, adapter_names=None)  # PEFT's default: the active adapter everywhere
    torch.testing.assert_close(_outcome(got_model, plain), _outcome(want_model, plain))


def test_patched_lora_experts_take_peft_s_arguments_by_keyword():
    """PEFT's wrapper forwards (x, *args, **kwargs) to the experts: keywords work too."""
    model = _lora(
        _model("qwen3_moe"), target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"]
    )
    patch_model(model, strict=True)
    wrapper = model.base_model.model.model.layers[0].mlp.experts
    x = torch.randn(5, model.config.hidden_size)
    index = torch.tensor([[0, 1], [2, 3], [1, 2], [3, 0], [0, 2]]) % model.config.num_experts
    weights = torch.rand(5, 2)
    want = wrapper(x, index, weights)
    got = wrapper(hidden_states=x, top_k_index=index, top_k_weights=weights, adapter_names=None)
    torch.testing.assert_close(got, want)


def test_patched_expert_lora_compiles_as_one_graph():
    """moekit's expert LoRA (PEFT `target_parameters`, after `patch_model`) inside
    `torch.compile(fullgraph=True)`: no graph break; loss and every LoRA gradient equal eager."""
    model = _lora(
        _model("qwen3_moe").train(),
        target_parameters=["mlp.experts.gate_up_proj", "mlp.experts.down_proj"],
    )
    model.set_adapter("default")
    patch_model(model, strict=True)
    inputs = _inputs(model.base_model.model)
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    got, got_grads = _step(model, compiled, inputs)
    want, want_grads = _step(model, model, inputs)
    lora = [n for n in want_grads if "lora" in n]
    assert lora and got_grads.keys() == want_grads.keys()
    torch.testing.assert_close(got, want)
    for name in lora:
        torch.testing.assert_close(got_grads[name], want_grads[name], msg=name)


SWITCHABLE = sorted(f.name for f in FAMILIES if f.on_interface and f.name not in DATA_DEPENDENT)


@pytest.mark.parametrize("family", SWITCHABLE)
def test_set_experts_implementation_after_the_patch_switches_for_real(family):
    """After `patch_model` the config says "moekit"; `set_experts_implementation("eager")`
    undoes the patch (with a warning) so the model runs transformers' eager code, as the
    config says; "moekit" keeps the patch; `unpatch_model` restores the implementation."""
    model = _model(family)
    model.set_experts_implementation("eager")
    inputs = _inputs(model)
    with torch.no_grad():
        want = _logits(model(**inputs))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        if not patch_model(model):
            pytest.skip("patch_model covers no block of this family")
    blocks = [m for m in model.modules() if holds_experts(m)]
    assert model.config._experts_implementation == "moekit"
    with pytest.warns(UserWarning, match="undid moekit.hf.patch_model"):
        model.set_experts_implementation("eager")
    assert model.config._experts_implementation == "eager"
    assert not any(is_patched(b) for b in blocks)
    with torch.no_grad():
        torch.testing.assert_close(_logits(model(**inputs)), want, rtol=0, atol=0)

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        assert patch_model(model) >= 1
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # no warning: the patch runs moekit already
        model.set_experts_implementation("moekit")
    assert any(is_patched(b) for b in blocks)
    assert unpatch_model(model) >= 1
    assert model.config._experts_implementation == "eager"
    assert "set_experts_implementation" not in model.__dict__
