"""Routing replay (`moekit.hf.replay`): record each token's experts, route a later forward by
them.

Oracles: the logits of the same model without recording (recording changes nothing, bit for
bit); replaying a model's own recorded routes reproduces its logits (float32, 1e-6); after its
routers are perturbed, a replayed forward routes by the recorded ids (recorded again inside
the replay) and its router gradient equals a float64 reference written here (the family's
rule by hand: softmax or sigmoid, renormalised or not, a correction bias for the choice only,
a scaling factor; each token's experts by loops over its k ids); activation recomputation
routes by the replayed ids.
"""

from __future__ import annotations

import base64
import copy
import warnings

import numpy as np
import pytest
import torch

pytest.importorskip("transformers")

from moekit.hf import (  # noqa: E402
    RULES,
    from_sglang,
    from_vllm,
    patch_model,
    record_routing,
    replay_routing,
    router_mismatch,
    routing_overlap,
)
from moekit.hf.catalog import TinyModelError, dummy_inputs, tiny_model  # noqa: E402
from moekit.hf.experts import bank_weights, layout_of  # noqa: E402
from moekit.hf.patch import experts_of, holds_experts, router_of  # noqa: E402
from moekit.hf.routers import attribute, flag  # noqa: E402


def _families() -> list[str]:
    return sorted({rule.family for rule in RULES.values()})


def _model(family: str, seed: int = 0):
    try:
        model = tiny_model(family, seed=seed).eval()
    except TinyModelError as error:
        pytest.skip(f"no tiny model: {error}")
    generator = torch.Generator().manual_seed(7)
    with torch.no_grad():  # clear router choices (no near-ties), experts of unit scale
        for param in model.parameters():
            if param.dim() == 3:
                param.copy_(torch.randn(param.shape, generator=generator) * 0.2)
        for module in model.modules():
            rule = RULES.get(type(module).__name__)
            if rule is not None:
                weight = attribute(module, rule.weight)
                weight.copy_(torch.randn(weight.shape, generator=generator))
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        patch_model(model)
    return model


def _perturb(model) -> None:
    """Move every router: its weight, and the token -> experts table of a hash router."""
    generator = torch.Generator().manual_seed(11)
    with torch.no_grad():
        for module in model.modules():
            rule = RULES.get(type(module).__name__)
            if rule is not None:
                weight = attribute(module, rule.weight)
                weight.add_(torch.randn(weight.shape, generator=generator) * 2.0)
                if rule.hash is not None:
                    table = attribute(module, rule.hash)  # [vocab, k] expert ids
                    experts = weight.shape[0]
                    table.copy_(torch.randint(0, experts, table.shape, generator=generator))


def _logits(model, inputs) -> torch.Tensor:
    out = model(**inputs)
    return (out.logits if hasattr(out, "logits") else out[0]).detach()


# routes some tokens apart from the others (text and vision experts): refused, one line
_SUBSET_FAMILIES = {"ernie4_5_vl_moe"}


@pytest.mark.parametrize("family", sorted(set(_families()) - _SUBSET_FAMILIES))
def test_record_changes_nothing_and_replay_reproduces(family):
    model = _model(family)
    inputs = dummy_inputs(model, 2, 9, seed=1)
    with torch.no_grad():
        want = _logits(model, inputs)
        with record_routing(model) as rec:
            got = _logits(model, inputs)
        routes = rec.routes
        assert torch.equal(got, want)
        layers = sum(holds_experts(m) and router_of(m)[0] is not None for m in model.modules())
        assert routes.shape[:3] == (2, 9, layers) and routes.dtype == torch.int64
        with replay_routing(model, routes), record_routing(model) as again:
            replayed = _logits(model, inputs)
        assert torch.equal(again.routes, routes)
        torch.testing.assert_close(replayed, want, rtol=1e-6, atol=1e-6)
        _perturb(model)
        with record_routing(model) as moved:
            _logits(model, inputs)
        with replay_routing(model, routes), record_routing(model) as kept:
            _logits(model, inputs)
    assert torch.equal(kept.routes, routes)  # the recorded ids, not the moved routers'
    assert router_mismatch(moved.routes, routes) > 0  # the perturbation moved the routing


@pytest.mark.parametrize("family", sorted(_SUBSET_FAMILIES))
def test_a_family_that_routes_a_subset_of_the_tokens_is_one_clear_line(family):
    model = _model(family)
    with torch.no_grad(), record_routing(model) as rec:
        model(**dummy_inputs(model, 2, 9, seed=1))
    with pytest.raises(ValueError, match="routed .* of its block's"):
        _ = rec.routes


# the families whose rules differ in the weights: softmax renormalised (Qwen3-MoE), softmax
# as is (Qwen2-MoE), softmax of the top-k logits (Mixtral), sigmoid with a correction bias,
# renormalised and scaled (DeepSeek-V3)
_GRADIENT_FAMILIES = ["qwen3_moe", "qwen2_moe", "mixtral", "deepseek_v3"]


def _reference_block_router_grad(block, x, ids, upstream) -> torch.Tensor:
    """The router weight's gradient of sum(routed(x) * upstream) in float64, the routing
    given by `ids` [N, k]: the family's weights by hand, each token's experts by loops."""
    router, rule = router_of(block)
    experts = experts_of(block)
    weight = attribute(router, rule.weight).detach().double().requires_grad_(True)  # [E, d]
    bias = attribute(router, rule.bias)
    x = x.double()  # [N, d]
    logits = x @ weight.T + (0 if bias is None else bias.detach().double())  # [N, E]
    bank = bank_weights(experts, layout_of(experts))
    w1, w2 = bank.w1.detach().double(), bank.w2.detach().double()  # [E, d, 2h], [E, h, d]
    out = torch.zeros_like(x)
    family = rule.family
    renormalise = flag(router, rule.normalize)  # the config's norm_topk_prob where it has one
    for n in range(x.shape[0]):
        if family == "deepseek_v3":  # sigmoid scores (the correction bias chose, not weighs)
            scores = torch.sigmoid(logits[n])
        else:
            scores = torch.softmax(logits[n], -1)
        picked = torch.stack([scores[e] for e in ids[n]])
        if renormalise:
            picked = picked / (picked.sum() + (1e-20 if family == "deepseek_v3" else 0.0))
        if family == "deepseek_v3":
            picked = picked * router.routed_scaling_factor
        for j, e in enumerate(ids[n].tolist()):
            gate, up = (x[n] @ w1[e]).chunk(2)
            out[n] = out[n] + picked[j] * ((torch.nn.functional.silu(gate) * up) @ w2[e])
    (out * upstream.double()).sum().backward()
    return weight.grad


@pytest.mark.parametrize("family", _GRADIENT_FAMILIES)
def test_replay_router_gradient_equals_a_float64_reference(family):
    model = _model(family)
    inputs = dummy_inputs(model, 2, 7, seed=2)
    with torch.no_grad(), record_routing(model) as rec:
        model(**inputs)
    _perturb(model)  # the replayed ids are no longer the routers' own
    block = next(m for m in model.modules() if holds_experts(m) and router_of(m)[0] is not None)
    router, rule = router_of(block)
    seen = {}
    handle = block.register_forward_pre_hook(lambda m, a: seen.setdefault("x", a[0].detach()))
    with torch.no_grad():
        model(**inputs)
    handle.remove()
    x = seen["x"].reshape(-1, seen["x"].shape[-1])  # [N, d]: the first MoE block's input
    ids = rec.routes[:, :, 0].reshape(x.shape[0], -1)  # [N, k] layer 0's recorded ids
    with record_routing(model) as own:
        model(**inputs)
    assert not torch.equal(own.routes[:, :, 0].reshape(ids.shape), ids)
    upstream = torch.randn(x.shape, generator=torch.Generator().manual_seed(4))
    with replay_routing(model, rec.routes):
        out = block(x[None])
        out = out[0] if isinstance(out, tuple) else out
        shared = getattr(block, "shared_experts", None) or getattr(block, "shared_expert", None)
        routed = out.reshape(x.shape)
        if shared is not None:  # the shared path has no router gradient; take it out
            routed = routed - _shared(block, shared, x).detach()
        (routed * upstream).sum().backward()
    weight = attribute(router, rule.weight)
    want = _reference_block_router_grad(block, x, ids, upstream)
    error = (weight.grad.double() - want).norm() / want.norm()  # float32 against float64
    assert want.norm() > 0 and error <= 1e-5, f"relative error {error:.2e}"


def _shared(block, shared, x):
    with torch.no_grad():
        y = shared(x)
        gate = getattr(block, "shared_expert_gate", None)
        return y * torch.sigmoid(gate(x)) if gate is not None else y


def test_activation_recomputation_routes_by_the_replayed_ids():
    """Gradient checkpointing: the backward recomputes each layer, after the replay's context
    has closed; it routes by the replayed ids, so the gradients equal the unchecked run's."""
    model = _model("qwen3_moe").train()
    inputs = dummy_inputs(model, 2, 8, seed=3)
    with torch.no_grad(), record_routing(model) as rec:
        model(**inputs)
    _perturb(model)
    plain = copy.deepcopy(model)
    with replay_routing(plain, rec.routes):
        plain(**inputs).logits.square().mean().backward()
    model.activation_checkpointing_enable({"use_reentrant": False})
    with replay_routing(model, rec.routes):
        loss = model(**inputs).logits.square().mean()
    loss.backward()  # recomputation outside the context
    want = {n: p.grad for n, p in plain.named_parameters() if p.grad is not None}
    got = {n: p.grad for n, p in model.named_parameters() if p.grad is not None}
    assert want.keys() == got.keys()
    for name in want:
        torch.testing.assert_close(got[name], want[name], rtol=1e-5, atol=1e-7)
    # a later forward of its own: nothing replayed left behind
    model.zero_grad()
    with record_routing(model) as own:
        model(**inputs).logits.square().mean().backward()
    assert router_mismatch(own.routes, rec.routes) > 0


def test_generate_records_the_prompt_and_every_generated_token():
    model = _model("qwen3_moe")
    prompt = dummy_inputs(model, 2, 5, seed=4)["input_ids"]
    with torch.no_grad(), record_routing(model) as rec:
        out = model.generate(prompt, max_new_tokens=4, do_sample=False, pad_token_id=0)
    routes = rec.routes
    assert routes.shape[:2] == (2, out.shape[1] - 1)  # the last token is never fed back
    with torch.no_grad(), record_routing(model) as full:
        model(input_ids=out[:, :-1])
    assert router_mismatch(routes, full.routes) < 0.05  # kv-cache steps route as one pass
    seqs = rec.per_sequence()
    assert len(seqs) == 2 and seqs[0].shape == routes.shape[1:]


def test_routes_of_the_wrong_shape_are_one_clear_line():
    model = _model("qwen3_moe")
    inputs = dummy_inputs(model, 2, 6, seed=5)
    with torch.no_grad(), record_routing(model) as rec:
        model(**inputs)
    routes = rec.routes
    bad = routes.clone()
    bad[0, 0, 0, 0] = 10_000
    cases = [
        (routes[0], r"\[B, T, L, k\]"),
        (routes[:, :, :1], "MoE layers"),
        (bad, "expert id 10000"),
        (routes[..., :1], "experts a token"),
    ]
    for wrong, message in cases:
        with pytest.raises(ValueError, match=message), replay_routing(model, wrong):
            pass
    other = replay_routing(model, routes[:1])  # another batch's routes
    with pytest.raises(ValueError, match="tokens"), torch.no_grad(), other:
        model(**inputs)


def test_minus_one_rows_route_live():
    model = _model("deepseek_v3")
    inputs = dummy_inputs(model, 2, 6, seed=6)
    with torch.no_grad(), record_routing(model) as rec:
        want = _logits(model, inputs)
        live = torch.full_like(rec.routes, -1)
        with replay_routing(model, live):
            got = _logits(model, inputs)
    torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-6)


def test_vllm_and_sglang_formats():
    a = np.arange(3 * 2 * 2).reshape(3, 2, 2)
    b = np.arange(2 * 2 * 2).reshape(2, 2, 2) + 100
    routes = from_vllm([a, b])
    assert routes.shape == (2, 3, 2, 2)
    assert torch.equal(routes[0], torch.as_tensor(a))
    assert torch.equal(routes[1, :2], torch.as_tensor(b)) and (routes[1, 2] == -1).all()
    data = base64.b64encode(a.astype("<i4").tobytes())
    assert torch.equal(from_sglang(data, 2, 2), torch.as_tensor(a))
    with pytest.raises(ValueError, match="whole number of tokens"):
        from_sglang(base64.b64encode(b"\0" * 12), 2, 2)
    with pytest.raises(ValueError, match="sequence 1"):
        from_vllm([a, np.zeros((2, 3, 2))])


def test_routing_overlap_of_a_model_with_itself_and_a_moved_copy():
    model = _model("qwen3_moe")
    inputs = dummy_inputs(model, 2, 8, seed=7)
    same = routing_overlap(model, copy.deepcopy(model), inputs)
    assert torch.equal(same, torch.ones_like(same))
    moved = copy.deepcopy(model)
    _perturb(moved)
    overlap = routing_overlap(model, moved, inputs)
    assert overlap.shape == same.shape and (overlap < 1).any() and (overlap >= 0).all()


def test_the_grpo_example_has_no_router_mismatch_with_replay():
    """examples/grpo_replay.py: TRL's GRPOTrainer on a tiny MoE whose routers move between
    the rollout and the training forwards (two iterations a generation, a high learning
    rate): replayed, the training forwards route exactly as the rollout did; not replayed,
    some (token, layer) pairs differ."""
    import re
    import subprocess
    import sys
    from pathlib import Path

    pytest.importorskip("trl")
    pytest.importorskip("datasets")
    example = Path(__file__).resolve().parents[1] / "examples" / "grpo_replay.py"
    done = subprocess.run(
        [sys.executable, str(example)], capture_output=True, text=True, timeout=300
    )
    assert done.returncode == 0, done.stdout[-2000:] + done.stderr[-2000:]
    found = re.search(r"with replay ([\d.]+), without ([\d.]+)", done.stdout)
    assert found and float(found.group(1)) == 0.0 and float(found.group(2)) > 0.0


@pytest.mark.parametrize("variant", ["lora", "nf4"])
def test_replay_with_expert_lora_and_quantised_experts(variant):
    """Replay reaches the routers whatever runs the experts: PEFT's LoRA on them (moekit's
    `LoraExperts`) or nf4-quantised experts. Replaying the recorded routes reproduces the
    logits; after the routers move, it still routes by them, and the routers (their LoRA
    factors under PEFT) get their gradient through the live logits."""
    from moekit.hf.lora import add_lora
    from moekit.hf.quantize import quantize_experts

    model = _model("qwen3_moe")
    if variant == "lora":
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = add_lora(model, 2, None, ("experts", "router"))
        with torch.no_grad():  # B off zero: the adapter changes the experts' output
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.normal_(0.0, 0.1, generator=torch.Generator().manual_seed(3))
    else:
        quantize_experts(model, "nf4")
    inputs = dummy_inputs(model, 2, 7, seed=8)
    with torch.no_grad(), record_routing(model) as rec:
        want = _logits(model, inputs)
    with torch.no_grad(), replay_routing(model, rec.routes):
        torch.testing.assert_close(_logits(model, inputs), want, rtol=1e-6, atol=1e-6)
    _perturb(model)
    with replay_routing(model, rec.routes), record_routing(model) as kept:
        model(**inputs).logits.square().mean().backward()
    assert torch.equal(kept.routes, rec.routes)
    routers = [p for n, p in model.named_parameters() if ".mlp.gate." in n and p.requires_grad]
    assert routers and all(p.grad is not None and p.grad.abs().sum() > 0 for p in routers)
