"""Patch transformers' MoE blocks in place to run on moekit: routing, plan, experts.

    patch_model(model, strict=False) -> int   every block whose router is in `families.RULES`
    unpatch_model(model) -> int               back to transformers' forwards
    is_patched(block)
    router_of(block) -> (router, rule)        a block's router and its family rule

A patched block keeps its class, parameters and submodules: `state_dict`, `save_pretrained`,
optimizers and PEFT see nothing new. The forwards of its router (moekit's routing,
`routers.Router`) and experts (moekit's plan and kernels, `blocks.Experts`) become instance
attributes, plain picklable objects; the block's own forward still calls them as modules, so
hooks and transformers' output recorder (the router logits of the auxiliary loss) see them.
"""

from __future__ import annotations

import re
import warnings

import torch
from torch import nn

from ..layers import MoE
from .backend import NAME
from .blocks import DbrxBlock, Experts, Llama4Block, LoraExperts, ModuleExperts
from .experts import layout_of, quantised_reason, unsupported_weights
from .families import RULES, SKIPPED, FamilyRule
from .routers import Router

__all__ = [
    "holds_experts",
    "patch_reason",
    "is_patched",
    "patch_model",
    "experts_of",
    "inner",
    "router_of",
    "unpatch_model",
    "unsupported",
]

_MOE_NAME = re.compile(r"(MoE|SparseMoe|SparseMoeBlock|MoeBlock)$")


def holds_experts(module: nn.Module) -> bool:
    """Whether a module is an MoE block: it has an `experts` submodule, or its class says MoE.
    The experts modules themselves (and lists of experts) are not blocks, nor are containers
    of blocks (Ernie-4.5-VL's text and vision MoE blocks side by side)."""
    if isinstance(module, (nn.ModuleList, MoE)) or hasattr(module, "has_gate"):
        return False
    if isinstance(getattr(module, "experts", None), nn.Module):
        return True
    return bool(_MOE_NAME.search(type(module).__name__)) and not any(
        isinstance(getattr(child, "experts", None), nn.Module) for child in module.children()
    )


def inner(module: nn.Module) -> nn.Module:
    """The module under PEFT's wrappers (their `base_layer`): an adapter added before the patch
    wraps a router or experts module; the patch runs the module itself, the wrapper around it
    (PEFT's `ParamWrapper` adds W + BA to the weights while its forward runs)."""
    while isinstance(getattr(module, "base_layer", None), nn.Module):
        module = module.base_layer
    return module


def router_of(block: nn.Module) -> tuple[nn.Module, FamilyRule] | tuple[None, None]:
    """The block's router submodule (under any PEFT wrapper) whose class has a family rule,
    and the rule."""
    for child in block.children():
        router = inner(child)
        rule = RULES.get(type(router).__name__)
        if rule is not None:
            return router, rule
    return None, None


def experts_of(block: nn.Module) -> nn.Module | None:
    """The block's experts module, under any PEFT wrapper."""
    experts = getattr(block, "experts", None)
    return inner(experts) if isinstance(experts, nn.Module) else None


def unsupported(block: nn.Module, rule: FamilyRule) -> str | None:
    """Why a block whose router has a rule cannot run on moekit, or None."""
    experts = experts_of(block)
    if experts is None:
        return "no experts submodule"
    if rule.block == "switch":
        return None if isinstance(experts, (nn.ModuleDict, nn.ModuleList)) else "experts not a dict"
    if rule.block in ("llama4", "dbrx") and experts is not block.experts:
        return "PEFT adapters wrap its experts, which moekit's block would bypass"
    if rule.block == "dbrx":
        return _dbrx_reason(experts)
    if rule.block == "experts" and not hasattr(experts, "has_gate"):
        return "its experts are not on transformers' ExpertsInterface"
    if rule.block == "experts" and not _interface_forward(experts):
        return (
            f"{type(experts).__name__}.forward wraps the interface's experts call with code of "
            'its own (its experts run on moekit with experts_implementation="moekit")'
        )
    layout = layout_of(experts, is_transposed=rule.block == "llama4")
    return unsupported_weights(experts, layout)


def _dbrx_reason(experts: nn.Module) -> str | None:
    mlp = getattr(experts, "mlp", None)
    for name in ("w1", "v1", "w2"):
        tensor = getattr(mlp, name, None)
        if not isinstance(tensor, torch.Tensor):
            return f"no tensor experts.mlp.{name}"
        reason = quantised_reason(tensor)
        if reason is not None:
            return f"experts.mlp.{name} {reason}: quantised expert weights are not supported"
    return None


def patch_reason(block: nn.Module) -> str | None:
    """Why `patch_model` would leave a block that holds experts alone, or None."""
    _, rule = router_of(block)
    return _no_rule_reason(block) if rule is None else unsupported(block, rule)


def _interface_forward(experts: nn.Module) -> bool:
    """Whether the experts class's forward is the one `@use_experts_implementation` made
    (a subclass may wrap it with code of its own: Ergo's per-route norm)."""
    forward = type(experts).forward
    return hasattr(forward, "__wrapped__") and (
        forward.__globals__.get("__name__") == "transformers.integrations.moe"
    )


def is_patched(block: nn.Module) -> bool:
    """Whether `block` runs on moekit (`patch_model`)."""
    router, _ = router_of(block)
    return router is not None and isinstance(router.__dict__.get("forward"), Router)


def patch_model(model: nn.Module, strict: bool = False) -> int:
    """Run every MoE block of a transformers model on moekit's engine, in place.

    Blocks whose router class has a rule in `moekit.hf.families.RULES` get moekit's routing
    (the same choice and weights), dispatch plan and experts; their parameters, buffers and
    submodules stay as they are. Every other module that holds experts is left alone and
    named, with its reason, in one warning. Patching twice is a no-op.

    The config says what runs: a transformers model's experts implementation becomes
    "moekit" (where moekit's backend can run all its experts, so the blocks left alone run
    their experts there too), and its `set_experts_implementation(name)` with any other name
    undoes the patch first (with a warning), so the config and the code never disagree.
    `unpatch_model` restores the implementation the model had. Routing runs in
    float32 whatever the model's dtype: on a half-precision model, where transformers' router
    logits tie in that precision, the choice can differ from transformers' (a warning says so).

    Args:
        model: A `torch.nn.Module`, typically a transformers `PreTrainedModel`.
        strict: Raise instead of warning when a block that holds experts is left alone.

    Returns:
        The number of blocks this call patched.

    Raises:
        TypeError: `model` is not a module.
        ValueError: `strict` and some block could not be patched.
    """
    if not isinstance(model, nn.Module):
        raise TypeError(f"model must be a torch.nn.Module, got {type(model).__name__}")
    patched, skipped, half = 0, {}, set()
    for module in list(model.modules()):
        if not holds_experts(module):
            continue
        if is_patched(module):
            _lora_forward(module)  # adapters added since the patch
            continue
        reason = patch_reason(module)
        if reason is not None:
            skipped.setdefault(type(module).__name__, reason)
            continue
        router, rule = router_of(module)
        router.forward = Router(router, rule)
        experts = experts_of(module)
        if rule.block == "experts":
            experts.forward = Experts(experts)
            _lora_forward(module)
        elif rule.block == "switch":
            experts.forward = ModuleExperts(experts)
        if rule.block == "llama4":
            module.forward = Llama4Block(module)
        elif rule.block == "dbrx":
            module.forward = DbrxBlock(module)
        dtypes = {p.dtype for p in router.parameters()}
        half |= dtypes & {torch.float16, torch.bfloat16}
        patched += 1
    if patched:
        _guard_implementation(model)
    if skipped:
        lines = "; ".join(f"{name}: {reason}" for name, reason in skipped.items())
        message = f"moekit.hf.patch_model left these MoE blocks as they are: {lines}"
        if strict:
            raise ValueError(message)
        warnings.warn(message, stacklevel=2)
    if half:
        warnings.warn(
            f"moekit routes in float32; the model's routers are {', '.join(map(str, half))}, so "
            "where transformers' half-precision router logits tie, the chosen experts can differ "
            "from transformers' (moekit's are the float32 choice)",
            stacklevel=2,
        )
    return patched


class SetExpertsImplementation:
    """`set_experts_implementation` of a transformers model that `patch_model` patched, so that
    its config and its code agree: "moekit" (what the patched experts run) keeps the patch;
    any other implementation undoes the patch (`unpatch_model`, with a warning), then switches
    as transformers does (a model whose implementation transformers cannot set, Llama 4's,
    keeps both its config and its patch, as transformers leaves it). `previous`: the model's
    implementations before the patch, restored by `unpatch_model`."""

    def __init__(self, model: nn.Module, previous: str | dict | None) -> None:
        self.model, self.previous = model, previous

    def __call__(self, experts_implementation: str | dict) -> None:
        model = self.model
        requested = experts_implementation
        names = set(requested.values()) if isinstance(requested, dict) else {requested}
        if names - {NAME, None} and _settable(model):
            count = unpatch_model(model)
            if count:
                warnings.warn(
                    f"set_experts_implementation({requested!r}) undid moekit.hf.patch_model on "
                    f"{count} MoE blocks (their routers and experts run transformers' code "
                    "again); patch_model(model) patches them again",
                    stacklevel=2,
                )
        type(model).set_experts_implementation(model, requested)


def _guard_implementation(model: nn.Module) -> None:
    """Each transformers model in `model` (the outer one and its submodels) gets a
    `SetExpertsImplementation`; its experts implementation becomes "moekit" where every
    experts module on the interface can run there (a quantised one cannot: it keeps its own)."""
    models = [
        m
        for m in model.modules()
        if hasattr(type(m), "set_experts_implementation")
        and not isinstance(m.__dict__.get("set_experts_implementation"), SetExpertsImplementation)
    ]
    switch = [m for m in models if _settable(m) and _backend_runs_all(m)]
    previous = {id(m): _implementation(m) for m in switch}  # before any switch
    for module in models:
        if id(module) in previous:
            type(module).set_experts_implementation(module, NAME)
        guard = SetExpertsImplementation(module, previous.get(id(module)))
        module.set_experts_implementation = guard


def _settable(model: nn.Module) -> bool:
    """Whether transformers sets this model's experts implementation (it has MoE experts)."""
    can = getattr(model, "_can_set_experts_implementation", None)
    return bool(can()) if callable(can) else True


def _implementation(model: nn.Module) -> str | dict:
    """The model's experts implementation(s), as `set_experts_implementation` takes them back."""
    get = getattr(model, "get_experts_implementation", None)  # with its sub-configs
    return get() if callable(get) else model.config._experts_implementation


def _backend_runs_all(model: nn.Module) -> bool:
    """Whether moekit's experts backend can run every experts module on the interface."""
    return all(
        unsupported_weights(m, layout_of(m)) is None
        for m in model.modules()
        if hasattr(m, "has_gate") and hasattr(m, "_is_expert_parallel")
    )


def _unguard_implementation(model: nn.Module) -> None:
    """Remove the `SetExpertsImplementation`s of `patch_model`, restoring the implementations
    the models had before it (parents first: a model's restore reaches its submodels)."""
    for module in model.modules():
        guard = module.__dict__.get("set_experts_implementation")
        if isinstance(guard, SetExpertsImplementation):
            del module.set_experts_implementation
            if guard.previous is not None:
                module.set_experts_implementation(guard.previous)


_OURS = (Router, Experts, LoraExperts, ModuleExperts, Llama4Block, DbrxBlock)


def _lora_forward(block: nn.Module) -> None:
    """PEFT wrappers around a patched block's stacked experts: their LoRA in moekit's pass."""
    wrapper, experts = getattr(block, "experts", None), experts_of(block)
    if (
        wrapper is not experts
        and isinstance(experts.__dict__.get("forward"), Experts)
        and not isinstance(wrapper.__dict__.get("forward"), LoraExperts)
    ):
        wrapper.forward = LoraExperts(wrapper)


def _no_rule_reason(module: nn.Module) -> str:
    for child in module.children():
        reason = SKIPPED.get(type(inner(child)).__name__)
        if reason is not None:
            return reason
    experts = experts_of(module)
    if experts is not None and hasattr(experts, "has_gate"):
        return (
            "no family rule for its router (its experts run on moekit with "
            'experts_implementation="moekit")'
        )
    return "no family rule, and its experts are not on transformers' ExpertsInterface"


def unpatch_model(model: nn.Module) -> int:
    """Undo `patch_model`: the blocks run transformers' own forwards again, with the experts
    implementation the model had before. Returns how many blocks."""
    count = 0
    for module in model.modules():
        if holds_experts(module) and is_patched(module):
            for part in (module, module.experts, router_of(module)[0], experts_of(module)):
                if isinstance(part.__dict__.get("forward"), _OURS):
                    del part.forward
            count += 1
    _unguard_implementation(model)
    return count
