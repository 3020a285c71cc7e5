"""transformers' MoE families on moekit's engine (`moekit.hf`), against the real package.

Tiny random configs, no downloads. For each family: logits, loss (with the router auxiliary
loss where the family has one) and every gradient equal before and after `patch_model` (fp32,
<= 1e-5 relative); `state_dict` keys unchanged; `save_pretrained` -> `from_pretrained` of a
patched model round-trips; `moe_from_hf` computes what the block computes and `moe_to_hf`
copies back exactly.
"""

from __future__ import annotations

import copy
import warnings

import pytest
import torch
from torch import nn

transformers = pytest.importorskip("transformers")

from moekit import MoE  # noqa: E402
from moekit.hf import is_patched, moe_from_hf, moe_to_hf, patch_model, unpatch_model  # noqa: E402
from moekit.hf.experts import bank_weights, layout_of  # noqa: E402

COMMON = dict(
    vocab_size=64,
    hidden_size=32,
    num_hidden_layers=2,
    num_attention_heads=4,
    num_key_value_heads=2,
    max_position_embeddings=64,
    output_router_logits=True,
    router_aux_loss_coef=0.02,
)


def _mixtral():
    config = transformers.MixtralConfig(
        intermediate_size=48, num_local_experts=4, num_experts_per_tok=2, **COMMON
    )
    return transformers.MixtralForCausalLM(config)


def _qwen2_moe(norm_topk_prob=False):
    config = transformers.Qwen2MoeConfig(
        intermediate_size=48,
        moe_intermediate_size=24,
        shared_expert_intermediate_size=40,
        num_experts=4,
        num_experts_per_tok=2,
        norm_topk_prob=norm_topk_prob,
        mlp_only_layers=[0],  # one dense layer: left alone
        **{**COMMON, "num_hidden_layers": 3},
    )
    return transformers.Qwen2MoeForCausalLM(config)


def _qwen3_moe():
    config = transformers.Qwen3MoeConfig(
        intermediate_size=48,
        moe_intermediate_size=24,
        num_experts=6,
        num_experts_per_tok=3,
        norm_topk_prob=True,
        head_dim=8,
        **COMMON,
    )
    return transformers.Qwen3MoeForCausalLM(config)


def _olmoe():
    config = transformers.OlmoeConfig(
        intermediate_size=24, num_experts=4, num_experts_per_tok=2, eos_token_id=1, **COMMON
    )
    return transformers.OlmoeForCausalLM(config)


def _deepseek_v3(norm_topk_prob=True):
    config = transformers.DeepseekV3Config(
        intermediate_size=64,
        moe_intermediate_size=16,
        n_routed_experts=8,
        n_shared_experts=2,
        num_experts_per_tok=3,
        n_group=4,
        topk_group=2,
        norm_topk_prob=norm_topk_prob,
        first_k_dense_replace=1,
        routed_scaling_factor=2.5,
        kv_lora_rank=16,
        q_lora_rank=16,
        qk_rope_head_dim=8,
        qk_nope_head_dim=8,
        v_head_dim=8,
        **{**COMMON, "num_hidden_layers": 3, "num_key_value_heads": 4},
    )
    return transformers.DeepseekV3ForCausalLM(config)


FAMILIES = {
    "mixtral": _mixtral,
    "qwen2_moe": _qwen2_moe,
    "qwen2_moe_norm": lambda: _qwen2_moe(True),
    "qwen3_moe": _qwen3_moe,
    "olmoe": _olmoe,
    "deepseek_v3": _deepseek_v3,
    "deepseek_v3_unnormalised": lambda: _deepseek_v3(False),
}


def _model(family: str) -> nn.Module:
    """A tiny random model whose routers make clear choices (router weights ~N(0, 1), a random
    DeepSeek correction bias), so both sides pick the same experts without near-ties."""
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = FAMILIES[family]()
    with torch.no_grad():
        for name, param in model.named_parameters():
            if name.endswith("mlp.gate.weight"):
                param.normal_(0.0, 1.0)
        for name, buffer in model.named_buffers():
            if name.endswith("e_score_correction_bias"):
                buffer.normal_(0.0, 0.3)
    return model


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return ((got - want).abs().max() / want.abs().max().clamp_min(1e-12)).item()


def _run(model: nn.Module, ids: torch.Tensor):
    model.zero_grad(set_to_none=True)
    out = model(ids, labels=ids)
    out.loss.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return out, grads


BLOCKS = {"mixtral": 2, "qwen2_moe": 2, "qwen2_moe_norm": 2, "qwen3_moe": 2, "olmoe": 2}


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_patched_model_equals_transformers(family):
    model = _model(family).train()
    patched = copy.deepcopy(model)
    assert patch_model(patched) == BLOCKS.get(family, 2)
    assert patch_model(patched) == 0  # a second call is a no-op
    ids = torch.randint(0, 64, (3, 12), generator=torch.Generator().manual_seed(1))
    want, want_grads = _run(model, ids)
    got, got_grads = _run(patched, ids)
    assert _rel(got.logits, want.logits) <= 1e-5
    assert _rel(got.loss, want.loss) <= 1e-5
    if want.aux_loss is not None:  # the router logits still reach transformers' aux loss
        assert _rel(got.aux_loss, want.aux_loss) <= 1e-5
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert _rel(got_grads[name], grad) <= 1e-5, name
    assert patched.state_dict().keys() == model.state_dict().keys()
    assert [n for n, _ in patched.named_modules()] == [n for n, _ in model.named_modules()]


@pytest.mark.parametrize("family", ["qwen2_moe", "deepseek_v3"])
def test_save_pretrained_round_trip_of_a_patched_model(family, tmp_path):
    model = _model(family).eval()
    patch_model(model)
    model.save_pretrained(tmp_path)
    loaded = type(model).from_pretrained(tmp_path).eval()
    for name, tensor in model.state_dict().items():
        assert torch.equal(loaded.state_dict()[name], tensor), name
    ids = torch.randint(0, 64, (2, 9))
    want = model(ids).logits
    assert patch_model(loaded) > 0
    torch.testing.assert_close(loaded(ids).logits, want)


@pytest.mark.parametrize("family", sorted(FAMILIES))
def test_moe_from_hf_computes_the_block(family):
    model = _model(family)
    block = next(m for m in model.modules() if hasattr(m, "experts") and hasattr(m, "gate"))
    layer = moe_from_hf(block)
    assert isinstance(layer, MoE)
    x = torch.randn(2, 5, 32, requires_grad=True)
    want = block(x)
    (gx_want,) = torch.autograd.grad(want.square().sum(), x)
    got = layer(x).output
    (gx_got,) = torch.autograd.grad(got.square().sum(), x)
    assert _rel(got, want) <= 1e-5 and _rel(gx_got, gx_want) <= 1e-5

    other = _model(family)  # different random weights of the same sizes
    target = next(m for m in other.modules() if hasattr(m, "experts") and hasattr(m, "gate"))
    moe_to_hf(layer, target)
    mine = block.state_dict()
    assert target.state_dict().keys() == mine.keys()
    for name, theirs in target.state_dict().items():
        assert torch.equal(theirs, mine[name]), name  # the round trip is exact


def test_patched_blocks_follow_the_model():
    """The engine reads the model's tensors at each call: loaded weights, dtype moves, modes."""
    model = _model("mixtral").eval()
    patch_model(model)
    ids = torch.randint(0, 64, (2, 7))
    fresh = _model("mixtral").eval()
    with torch.no_grad():
        for param in fresh.parameters():
            param.add_(0.1 * torch.randn_like(param))
    model.load_state_dict(fresh.state_dict())
    torch.testing.assert_close(model(ids).logits, fresh(ids).logits)
    model.to(torch.bfloat16)
    assert model(ids).logits.dtype == torch.bfloat16
    model.train()
    block = model.model.layers[0].mlp
    weights = bank_weights(block.experts, layout_of(block.experts))  # what the engine reads
    assert weights.w1.data_ptr() == block.experts.gate_up_proj.data_ptr()


def test_unpatch_and_deepcopy():
    model = _model("qwen2_moe").eval()
    patch_model(model)
    ids = torch.randint(0, 64, (2, 6))
    want = model(ids).logits
    clone = copy.deepcopy(model)
    assert is_patched(clone.model.layers[1].mlp)
    block = clone.model.layers[1].mlp
    assert (
        block.gate.forward.router is block.gate and block.experts.forward.experts is block.experts
    )
    torch.testing.assert_close(clone(ids).logits, want)
    assert unpatch_model(model) == 2
    assert not any(is_patched(m) for m in model.modules())
    torch.testing.assert_close(model(ids).logits, want)


class FooSparseMoeBlock(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.gate = nn.Linear(4, 2)
        self.experts = nn.ModuleList([nn.Linear(4, 4), nn.Linear(4, 4)])


def test_unsupported_blocks_are_left_alone_with_one_warning():
    model = nn.Sequential(FooSparseMoeBlock(), FooSparseMoeBlock())
    with pytest.warns(UserWarning, match="FooSparseMoeBlock") as record:
        assert patch_model(model) == 0
    assert len(record) == 1
    with pytest.raises(TypeError, match="FooSparseMoeBlock"):
        moe_from_hf(model[0])
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        patch_model("not a model")


def _rules():
    from moekit.hf import RULES

    return sorted({rule.family for rule in RULES.values()})


# transformers 5.25 fails computing these families' auxiliary loss (no router logits recorded)
_NO_ROUTER_LOGITS = {"deepseek_v4"}


def _family_step(model: nn.Module, inputs: dict, router_logits: bool = True):
    """Train mode, a fixed seed (dropout, jitter): the output under a fixed upstream gradient
    plus the auxiliary loss, backward. Returns (output, aux loss or None, gradients)."""
    model.zero_grad(set_to_none=True)
    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        out = model(**inputs, output_router_logits=router_logits)
    y = out.logits if getattr(out, "logits", None) is not None else out.last_hidden_state
    upstream = torch.randn(y.shape, generator=torch.Generator().manual_seed(3))
    objective = (y * upstream).sum()
    aux = getattr(out, "aux_loss", None)
    if aux is not None:
        objective = objective + aux
    objective.backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    return y.detach(), aux, grads


@pytest.mark.parametrize("family", _rules())
def test_every_family_rule_equals_transformers(family):
    """Each family of the rule table (`moekit.hf.RULES`), its tiny model built from the
    installed transformers' config: train mode, output, aux loss and every gradient within
    1e-5 relative, or twice transformers' own grouped_mm-vs-eager spread where float32
    rounding alone exceeds it (ill-conditioned parameters of a few families)."""
    from moekit.hf import RULES
    from moekit.hf.catalog import TinyModelError, dummy_inputs, tiny_model
    from moekit.hf.patch import holds_experts
    from moekit.hf.routers import attribute

    try:
        model = tiny_model(family).train()
    except TinyModelError as error:
        pytest.skip(f"no tiny model: {error}")
    with torch.no_grad():  # clear router choices, experts of unit scale
        for param in model.parameters():
            if param.dim() == 3:
                param.normal_(0.0, 0.2)
        for module in model.modules():
            rule = RULES.get(type(module).__name__)
            if rule is not None:
                attribute(module, rule.weight).normal_(0.0, 1.0)
    interface = any(hasattr(m, "has_gate") for m in model.modules())
    if interface:
        model.set_experts_implementation("eager")
    patched = copy.deepcopy(model)
    blocks = patch_model(patched, strict=True)
    assert blocks == sum(holds_experts(m) for m in model.modules()) >= 1
    inputs = dummy_inputs(model, 3, 12, seed=1)
    logits = family not in _NO_ROUTER_LOGITS
    want, want_aux, want_grads = _family_step(model, inputs, logits)
    got, got_aux, got_grads = _family_step(patched, inputs, logits)
    peer, peer_aux, peer_grads = want, want_aux, want_grads
    if interface:
        model.set_experts_implementation("grouped_mm")
        peer, peer_aux, peer_grads = _family_step(model, inputs, logits)
    assert _rel(got, want) <= max(1e-5, 2 * _rel(peer, want))
    if want_aux is not None:
        assert _rel(got_aux, want_aux) <= max(1e-5, 2 * _rel(peer_aux, want_aux))
    assert got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        tolerance = max(1e-5, 2 * _rel(peer_grads[name], grad))
        assert _rel(got_grads[name], grad) <= tolerance, name


def _all_families():
    from moekit.hf.catalog import moe_families

    return [f.name for f in moe_families()]


@pytest.mark.parametrize("family", _all_families())
def test_patch_model_is_never_a_silent_no_op(family):
    """On every MoE family of the installed transformers: each block that holds experts is
    patched or named in the warning (and `strict=True` raises)."""
    from moekit.hf.catalog import TinyModelError, tiny_model
    from moekit.hf.patch import holds_experts

    try:
        model = tiny_model(family)
    except TinyModelError as error:
        pytest.skip(f"no tiny model: {error}")
    clone = copy.deepcopy(model)
    with warnings.catch_warnings(record=True) as record:
        warnings.simplefilter("always")
        count = patch_model(clone)
    blocks = [m for m in clone.modules() if holds_experts(m)]
    left = {type(m).__name__ for m in blocks if not is_patched(m)}
    assert blocks, "a family model with no MoE block"
    assert count == len(blocks) - sum(type(m).__name__ in left for m in blocks)
    text = " ".join(str(w.message) for w in record)
    assert all(name in text for name in left)
    if left:
        with pytest.raises(ValueError, match=sorted(left)[0]):
            patch_model(copy.deepcopy(model), strict=True)


def test_half_precision_routers_are_named_in_a_warning():
    """moekit routes in float32: on a bf16 model, where transformers' bf16 logits tie, its
    choice can differ from transformers', and patch_model says so."""
    model = _model("qwen3_moe").to(torch.bfloat16)
    with pytest.warns(UserWarning, match="moekit routes in float32.*bfloat16"):
        assert patch_model(model) == 2
    ids = torch.randint(0, 64, (2, 5))
    assert torch.isfinite(model(ids).logits.float()).all()


def test_experts_that_wrap_the_interface_are_left_with_the_reason():
    """Ergo's experts class wraps the interface's call with a per-route norm: its block is named
    in the warning, never run without that norm."""
    from moekit.hf.catalog import TinyModelError, tiny_model

    try:
        model = tiny_model("ergo")
    except TinyModelError as error:
        pytest.skip(f"no tiny model: {error}")
    with pytest.raises(ValueError, match="ErgoMoE: its experts class wraps"):
        patch_model(model, strict=True)


def test_info_hf_reports_each_block_of_a_saved_model(tmp_path, capsys):
    """`moekit info --hf DIR`: each MoE block of a saved model, whether the backend and the
    patch cover it; expert weights stored quantised are reported, never run."""
    from safetensors.torch import load_file, save_file

    from moekit.cli import main
    from moekit.hf.report import saved_coverage

    model = _model("qwen3_moe")
    model.save_pretrained(tmp_path / "qwen3")
    assert main(["info", "--hf", str(tmp_path / "qwen3")]) == 0
    out = capsys.readouterr().out
    assert "model.layers.1.mlp: Qwen3MoeSparseMoeBlock (router Qwen3MoeTopKRouter" in out
    assert "2 MoE blocks: 2 on the experts backend" in out and "2 patched" in out

    files = list((tmp_path / "qwen3").glob("*.safetensors"))
    tensors = load_file(files[0])
    key = next(k for k in sorted(tensors) if k.startswith("model.layers.0.mlp.experts."))
    tensors[key] = tensors[key].to(torch.float8_e4m3fn)
    save_file(tensors, files[0], metadata={"format": "pt"})
    _, rows = saved_coverage(tmp_path / "qwen3")
    assert rows[0].patch == rows[0].backend and "F8_E4M3" in rows[0].patch
    assert rows[1].patch is None

    assert main(["info", "--hf", str(tmp_path / "missing")]) == 1
    assert "not a saved transformers model" in capsys.readouterr().err


def test_switch_transformers_capacity_drops_as_transformers_does():
    """Switch Transformers' capacity: an expert keeps its first `expert_capacity` tokens of
    each sequence by position; the patched model drops the same tokens (their MLP output is 0:
    the residual carries them) and trains the same."""
    from moekit.hf.catalog import TinyModelError, dummy_inputs, tiny_model

    try:
        model = tiny_model("switch_transformers").train()
    except TinyModelError as error:
        pytest.skip(f"no tiny model: {error}")
    for module in model.modules():
        if type(module).__name__ == "SwitchTransformersTop1Router":
            module.expert_capacity = 2  # 12 tokens a sequence over 8 experts: some overflow
    patched = copy.deepcopy(model)
    assert patch_model(patched, strict=True) >= 2
    inputs = dummy_inputs(model, 3, 12, seed=1)
    want, _, want_grads = _family_step(model, inputs)
    got, _, got_grads = _family_step(patched, inputs)
    assert _rel(got, want) <= 1e-5
    for name, grad in want_grads.items():
        assert _rel(got_grads[name], grad) <= 1e-5, name
    router = next(m for m in patched.modules() if type(m).__name__.endswith("Top1Router"))
    mask, _, _ = router(torch.randn(3, 12, router.classifier.in_features))
    assert mask.sum(1).max() <= 2 and mask.sum() < 36  # capacity held, tokens dropped


def test_quantised_experts_are_left_with_the_reason():
    """Expert weights in an 8-bit dtype: named in the warning (strict raises), never run as if
    they were floats; the backend refuses them too."""
    model = _model("qwen3_moe")
    experts = model.model.layers[0].mlp.experts
    experts.down_proj = nn.Parameter(
        experts.down_proj.detach().to(torch.float8_e4m3fn), requires_grad=False
    )
    with pytest.raises(ValueError, match="down_proj is torch.float8_e4m3fn: quantised"):
        patch_model(copy.deepcopy(model), strict=True)
    with pytest.warns(UserWarning, match="quantised"):
        assert patch_model(model) == 1  # the other layer


@pytest.mark.parametrize("order", ["patch, then peft", "peft, then patch"])
def test_peft_lora_on_experts_and_router_in_either_order(order):
    """PEFT LoRA on the fused experts and the router (`target_parameters`) with the model
    patched before or after the adapters: the logits and every LoRA gradient are PEFT's own on
    the unpatched model. The patch runs the experts' LoRA inside moekit's grouped pass
    (`LoraExperts`: x @ A_e @ B_e per expert, no W + BA); the router's through PEFT's wrapper."""
    peft = pytest.importorskip("peft")
    from moekit.hf.catalog import dummy_inputs, tiny_model

    base = tiny_model("qwen3_moe").train()
    base.set_experts_implementation("eager")
    targets = ["mlp.experts.gate_up_proj", "mlp.experts.down_proj", "mlp.gate.weight"]

    def adapted(model):
        torch.manual_seed(0)
        config = peft.LoraConfig(r=4, target_parameters=targets, init_lora_weights=False)
        return peft.get_peft_model(model, config)

    ids = dummy_inputs(base, 2, 8, seed=1)["input_ids"]

    def step(model):
        model.zero_grad(set_to_none=True)
        out = model(input_ids=ids, labels=ids)
        out.loss.backward()
        grads = {n: p.grad for n, p in model.named_parameters() if "lora" in n}
        return out.logits.detach(), grads

    want, want_grads = step(adapted(copy.deepcopy(base)))
    if order == "patch, then peft":
        model = copy.deepcopy(base)
        assert patch_model(model, strict=True) == 2
        model = adapted(model)
        got, got_grads = step(model)  # PEFT's forward around moekit's experts (W + BA)
        assert _rel(got, want) <= 1e-5
        assert patch_model(model) == 0  # patched already; the adapters' LoRA now in moekit's pass
    else:
        model = adapted(copy.deepcopy(base))
        assert patch_model(model, strict=True) == 2
    blocks = [m for m in model.modules() if type(m).__name__ == "Qwen3MoeSparseMoeBlock"]
    assert all(type(b.experts.__dict__.get("forward")).__name__ == "LoraExperts" for b in blocks)
    got, got_grads = step(model)
    assert _rel(got, want) <= 1e-5
    assert len(want_grads) == 12 and got_grads.keys() == want_grads.keys()
    for name, grad in want_grads.items():
        assert grad is not None and grad.abs().sum() > 0, name
        assert _rel(got_grads[name], grad) <= 1e-5, name


@pytest.mark.parametrize(
    "family", ["qwen3_moe", "gpt_oss", "deepseek_v3", "granitemoe", "nemotron_h", "llama4"]
)
def test_expert_lora_in_the_engine_equals_peft(family):
    """LoRA on every stacked expert weight (any layout: transposed gpt-oss with biases,
    ungated Nemotron-H) and the router, computed per expert in moekit's grouped pass: output
    and every LoRA gradient equal PEFT's own forward on the unpatched model (float32, 1e-5).
    Llama 4's block reads its experts itself: PEFT-wrapped, it is left alone with the reason."""
    peft = pytest.importorskip("peft")
    from moekit.hf.catalog import TinyModelError, dummy_inputs, tiny_model
    from moekit.hf.lora import lora_targets

    try:
        base = tiny_model(family).train()
    except TinyModelError as error:
        pytest.skip(f"no tiny model: {error}")
    if any(hasattr(m, "has_gate") for m in base.modules()):
        base.set_experts_implementation("eager")
    parameters, _ = lora_targets(base, ("experts", "router"))
    torch.manual_seed(0)
    config = peft.LoraConfig(r=4, target_parameters=parameters, init_lora_weights=False)
    want_model = peft.get_peft_model(copy.deepcopy(base), config)
    got_model = copy.deepcopy(want_model)
    inputs = dummy_inputs(base, 2, 8, seed=1)
    if family == "llama4":
        with pytest.raises(ValueError, match="PEFT adapters wrap its experts"):
            patch_model(got_model, strict=True)
        return
    assert patch_model(got_model, strict=True) >= 1
    want, _, want_grads = _family_step(want_model, inputs)
    got, _, got_grads = _family_step(got_model, inputs)
    assert _rel(got, want) <= 1e-5
    lora = [n for n in want_grads if "lora" in n]
    assert lora and got_grads.keys() == want_grads.keys()
    for name in lora:
        assert want_grads[name].abs().sum() > 0, name
        assert _rel(got_grads[name], want_grads[name]) <= 1e-5, name
