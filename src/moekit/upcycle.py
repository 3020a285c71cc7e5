"""Sparse upcycling: dense feed-forwards become MoE layers of E copies (Komatsuzaki et al. 2022,
arXiv:2212.05055).

module -> the targets (by name pattern, type or predicate) -> each becomes an MoE whose E experts
are copies of it and whose router is new (small init). At step 0 the MoE computes the dense
function: every expert is the same and a renormalising router's k weights sum to 1. An
`MLPExpert` or `nn.Sequential(Linear, ReLU|GELU, Linear[, Dropout])` becomes an `ExpertBank`
(stacked copies: the fast path); any other module an `ExpertList` of deep copies; a moekit `MoE`
with one expert grows to E experts in place.
"""

from __future__ import annotations

import copy
import fnmatch
import logging
from collections.abc import Callable

import torch
from torch import Tensor, nn

from ._checks import check_non_negative, check_positive_int, check_top_k
from ._dropout import Dropout
from .experts import ExpertBank, ExpertList, MLPExpert
from .layers import ROUTERS, MoE, _build_router
from .routing import ExpertChoiceRouter, Router, SwitchRouter

log = logging.getLogger(__name__)

Targets = str | type[nn.Module] | tuple[type[nn.Module], ...] | Callable[[str, nn.Module], bool]


class UpcycledMoE(MoE):
    """An MoE standing in for a feed-forward that returned a tensor: `forward(x [..., d])`
    returns the output [..., d] alone, so the parent's code is unchanged. The auxiliary losses
    stay on the layer (`aux_loss`, `aux_losses`, `stats`), where `total_aux_loss` finds them."""

    def forward(self, x: Tensor, *, aux_losses: bool = True) -> Tensor:  # type: ignore[override]
        return super().forward(x, aux_losses=aux_losses).output


def _matcher(targets: Targets) -> Callable[[str, nn.Module], bool]:
    if isinstance(targets, str):  # a glob over qualified names: "blocks.*.ffwd"
        return lambda name, _: fnmatch.fnmatchcase(name, targets)
    if isinstance(targets, type) or (
        isinstance(targets, tuple) and all(isinstance(t, type) for t in targets)
    ):
        return lambda _, module: isinstance(module, targets)
    if callable(targets):
        return targets
    raise TypeError(
        "targets must be a name pattern (str), a module class or tuple of classes, or a "
        f"predicate (name, module) -> bool, got {targets!r}"
    )


def _find(module: nn.Module, match: Callable[[str, nn.Module], bool]) -> list[tuple]:
    """(parent, attribute, qualified name, child) of every match, top-down; the search enters
    neither a match nor an MoE (an MoE's experts are not dense feed-forwards)."""
    found = []

    def visit(parent: nn.Module, prefix: str) -> None:
        for attr, child in parent.named_children():
            name = f"{prefix}.{attr}" if prefix else attr
            if match(name, child):
                found.append((parent, attr, name, child))
            elif not isinstance(child, MoE):
                visit(child, name)

    visit(module, "")
    return found


def _mlp_parts(module: nn.Module) -> tuple[nn.Linear, str, nn.Linear, float] | None:
    """(fc1, activation, fc2, dropout) of a feed-forward an `ExpertBank` computes, else None."""
    if isinstance(module, MLPExpert):
        return module.fc1, module.activation, module.fc2, module.drop.p
    if not isinstance(module, nn.Sequential) or len(module) not in (3, 4):
        return None
    fc1, act, fc2, *rest = module
    if isinstance(act, nn.ReLU):
        activation = "relu"
    elif isinstance(act, nn.GELU) and act.approximate == "none":
        activation = "gelu"
    else:
        return None
    p = 0.0
    if rest:
        if not isinstance(rest[0], (nn.Dropout, Dropout)):
            return None
        p = rest[0].p
    if not (isinstance(fc1, nn.Linear) and isinstance(fc2, nn.Linear)):
        return None
    shapes_fit = fc2.in_features == fc1.out_features and fc2.out_features == fc1.in_features
    if not shapes_fit or (fc1.bias is None) != (fc2.bias is None):
        return None
    return fc1, activation, fc2, p


def _bank_like(
    weight: Tensor, num_experts: int, d: int, h: int, activation: str, **kw
) -> ExpertBank:
    return ExpertBank(num_experts, d, h, activation, **kw).to(weight.device, weight.dtype)


def _dense_experts(module: nn.Module, num_experts: int) -> nn.Module:
    """E copies of a dense feed-forward: an `ExpertBank` where one computes it, else a list."""
    parts = _mlp_parts(module)
    if parts is None:
        return ExpertList(copy.deepcopy(module) for _ in range(num_experts))
    fc1, activation, fc2, p = parts
    bias = fc1.bias is not None
    bank = _bank_like(
        fc1.weight, num_experts, fc1.in_features, fc2.in_features, activation, bias=bias, dropout=p
    )
    with torch.no_grad():  # copy_ broadcasts each [d_in, d_out] over the E experts
        bank.w1.copy_(fc1.weight.t())  # [E, d, h or 2h]
        bank.w2.copy_(fc2.weight.t())  # [E, h, d]
        if bias:
            bank.b1.copy_(fc1.bias)  # [E, h or 2h]
            bank.b2.copy_(fc2.bias)  # [E, d]
    return bank


def _grown_experts(experts: nn.Module, num_experts: int, name: str) -> nn.Module:
    """The one expert of an MoE, copied E times."""
    if isinstance(experts, ExpertList):
        return ExpertList(copy.deepcopy(experts[0]) for _ in range(num_experts))
    if not isinstance(experts, ExpertBank):
        raise TypeError(
            f"{name}: cannot copy experts of type {type(experts).__name__}; upcycle grows an "
            "ExpertBank or an ExpertList"
        )
    # [1, ...] -> [E, ...]: E copies of the one expert
    return experts.rebuilt(lambda param: param.expand(num_experts, *param.shape[1:]).clone())


def _resized_router(old: Router, num_experts: int, top_k: int) -> Router:
    """A router of the same class and options as `old` for E experts: its [E, d] gates and
    [E] buffers are new, the rest (bias flags, jitter, normalisation) is kept."""
    if isinstance(old, SwitchRouter) and top_k != 1:
        raise ValueError(f"top_k={top_k} must be 1 for the layer's SwitchRouter")
    new = copy.deepcopy(old)
    new.num_experts, new.top_k = num_experts, top_k
    for attr, child in list(new.named_children()):
        if isinstance(child, nn.Linear) and child.out_features == old.num_experts:
            gate = nn.Linear(child.in_features, num_experts, bias=child.bias is not None)
            setattr(new, attr, gate.to(child.weight.device, child.weight.dtype))
    for attr, buffer in list(new.named_buffers(recurse=False)):
        if buffer.shape == (old.num_experts,):
            setattr(new, attr, buffer.new_zeros(num_experts))  # e.g. the sigmoid router's bias
    return new


def _new_router(
    spec: str | Router | None,
    old: Router | None,
    d_model: int,
    num_experts: int,
    top_k: int,
    init_std: float,
) -> Router:
    """A built router is copied as given; otherwise a new one whose linear gates start at
    N(0, init_std^2) weights and zero biases (noise only in training: the routers' rule)."""
    if isinstance(spec, Router):
        router = copy.deepcopy(spec)
        for attr, want in (("d_model", d_model), ("num_experts", num_experts), ("top_k", top_k)):
            if getattr(router, attr) != want:
                raise ValueError(f"router.{attr}={getattr(router, attr)} must equal {attr}={want}")
        return router
    if spec is None and old is not None:
        router = _resized_router(old, num_experts, top_k)
    elif spec is None or isinstance(spec, str):
        router = _build_router(spec or "softmax", d_model, num_experts, top_k, None, {})
    else:
        raise TypeError(
            f"router must be a name in {ROUTERS}, a moekit Router or None, got {spec!r}"
        )
    for linear in router.modules():
        if isinstance(linear, nn.Linear):
            nn.init.normal_(linear.weight, 0.0, init_std)
            if linear.bias is not None:
                nn.init.zeros_(linear.bias)
    return router


def _warn_if_not_equal(name: str, moe: MoE) -> None:
    """Log where the upcycled layer does not compute the dense one at step 0."""
    router = moe.router
    reasons = []
    if isinstance(router, ExpertChoiceRouter):
        reasons.append("expert-choice routing may skip tokens")
    elif not getattr(router, "normalize", True):
        reasons.append("the router's k weights are not renormalised to sum to 1")
    if getattr(router, "scaling_factor", 1.0) != 1.0:
        reasons.append(f"scaling_factor={router.scaling_factor}")
    if moe.capacity_factor is not None:
        reasons.append(f"capacity_factor={moe.capacity_factor} may drop tokens")
    if reasons:
        log.warning(
            "upcycle %s: differs from the dense layer at step 0 (%s)", name, "; ".join(reasons)
        )


def _grow_moe(moe: MoE, name: str, num_experts: int, top_k: int, router, init_std) -> None:
    """An MoE with one expert becomes one with E copies of it, in place (its class, shared
    experts, capacity and loss coefficients stay)."""
    if moe.num_experts != 1:
        raise ValueError(
            f"{name}: an MoE with num_experts={moe.num_experts}; upcycle grows a dense "
            "feed-forward or an MoE with num_experts=1"
        )
    if moe.parallel is not None:
        raise ValueError(f"{name}: upcycle before moekit.parallel.expert_parallel, not after")
    device = next(moe.router.parameters()).device
    new_router = _new_router(router, moe.router, moe.d_model, num_experts, top_k, init_std)
    moe.experts = _grown_experts(moe.experts, num_experts, name)
    moe.router = new_router.to(device)
    moe.num_experts, moe.top_k = num_experts, top_k
    moe.aux_losses, moe.aux_loss, moe._stats, moe._stats_inputs = {}, None, None, None
    moe.train(moe.training)  # the new router and experts in the layer's mode


def _width(module: nn.Module, name: str) -> int:
    """d of a dense feed-forward: the input width of its first nn.Linear."""
    for sub in module.modules():
        if isinstance(sub, nn.Linear):
            return sub.in_features
    raise ValueError(
        f"{name}: cannot tell the width of a {type(module).__name__} with no nn.Linear; "
        "target feed-forwards that hold one"
    )


def _moe_for(module, name, num_experts, top_k, router, init_std, load_balance_coef) -> MoE:
    """The `UpcycledMoE` replacing a dense feed-forward [..., d] -> [..., d]."""
    if isinstance(module, (ExpertBank, ExpertList)):
        raise ValueError(f"{name}: a {type(module).__name__} is experts already, not dense")
    d_model = _width(module, name)
    experts = _dense_experts(module, num_experts)
    new_router = _new_router(router, None, d_model, num_experts, top_k, init_std)
    layer = UpcycledMoE(
        d_model,
        num_experts,
        top_k,
        router=new_router,
        experts=experts,
        load_balance_coef=load_balance_coef,
    )
    param = next(module.parameters(), None)
    if param is not None:  # the router on the module's device, in its floating dtype
        layer.router.to(device=param.device)
        if param.is_floating_point():
            layer.router.to(dtype=param.dtype)
    return layer.train(module.training)


def upcycle(
    module: nn.Module,
    num_experts: int,
    top_k: int = 2,
    *,
    targets: Targets = MoE,
    router: str | Router | None = None,
    router_init_std: float = 0.02,
    load_balance_coef: float = 0.01,
) -> int:
    """Sparse upcycling, in place: each targeted dense feed-forward of `module` becomes an MoE
    of `num_experts` copies of it with a new router.

    In eval mode the upcycled model computes what the dense one did (up to float rounding)
    when the router renormalises its k weights (softmax, noisy, sigmoid with normalize; not
    Switch or expert choice) and the layer is dropless; a warning names any layer where not.

    Args:
        module: The model; it is changed in place (its own root is never replaced).
        num_experts: Experts E of each new layer.
        top_k: Experts per token k, 1 <= k <= E.
        targets: Which submodules to upcycle: a glob over qualified names
            ("blocks.*.ffwd"), a module class or tuple of classes, or a predicate
            (name, module) -> bool. Default: `MoE` layers, which must hold one expert (the
            dense variant of the char LM). Each dense target maps [..., d] -> [..., d]; an
            `MLPExpert` or `nn.Sequential(Linear, ReLU|GELU, Linear[, Dropout])` becomes an
            `ExpertBank`, any other module an `ExpertList` of deep copies, and is replaced by
            an `UpcycledMoE` (returns the output tensor, keeps `aux_loss`). A one-expert `MoE`
            grows in place. The search enters no match and no MoE.
        router: None (a one-expert MoE's router class and options; "softmax" for a dense
            target), a name in `moekit.layers.ROUTERS`, or a built `Router` (deep-copied per
            layer, weights kept). New routers start small: weights N(0, router_init_std^2),
            zero biases; routing noise applies in training mode only.
        router_init_std: Std of the new routers' weights.
        load_balance_coef: Coefficient of the load-balancing loss of new `UpcycledMoE` layers.

    Returns:
        The number of modules upcycled.

    Raises:
        ValueError: Nothing matched, a matched MoE has more than one expert, or an argument is
            out of range (named in the message).
        TypeError: `targets` or `router` of the wrong kind, or experts that cannot be copied.
    """
    check_positive_int("num_experts", num_experts)
    check_top_k(top_k, num_experts)
    check_non_negative("router_init_std", router_init_std)
    found = _find(module, _matcher(targets))
    if not found:
        raise ValueError(f"targets={targets!r} matched no submodule of {type(module).__name__}")
    done: dict[int, nn.Module] = {}  # a module registered twice is upcycled once
    for parent, attr, name, child in found:
        if id(child) not in done:
            if isinstance(child, MoE):
                _grow_moe(child, name, num_experts, top_k, router, router_init_std)
                done[id(child)] = child
            else:
                done[id(child)] = _moe_for(
                    child, name, num_experts, top_k, router, router_init_std, load_balance_coef
                )
            _warn_if_not_equal(name, done[id(child)])
        setattr(parent, attr, done[id(child)])
    return len(done)
