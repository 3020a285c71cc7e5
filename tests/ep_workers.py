"""Rank-side checks of expert parallelism, run by `spawn.run_ranks` (see test_parallel.py).

Oracle: the full layer (every expert, one process, float64) on the whole global batch (dropless)
or on each rank's slice (a capacity factor: capacity is counted per sending rank). Compared:
each rank's outputs and input gradients, router gradients summed over ranks, each rank's expert
gradients summed over the ranks that hold the same experts, the global counts, the aux loss.
"""

from __future__ import annotations

import copy

import pytest
import torch
import torch.distributed as dist
from torch.distributed.device_mesh import init_device_mesh

from moekit import MoE, SoftMoE, update_router_biases
from moekit.experts import MLPExpert
from moekit.parallel import expert_parallel
from moekit.routing import SoftmaxRouter

TOL = {"atol": 1e-12, "rtol": 1e-10}  # float64 on both sides; only summation order differs


def _groups(world: int, ep_size: int):
    """(this rank's EP group of consecutive ranks, its replica group or None)."""
    ep, _ = dist.new_subgroups_by_enumeration(
        [list(range(s, s + ep_size)) for s in range(0, world, ep_size)]
    )
    replicas = None
    if world > ep_size:
        replicas, _ = dist.new_subgroups_by_enumeration(
            [list(range(i, world, ep_size)) for i in range(ep_size)]
        )
    return ep, replicas


def _layer(case: dict) -> MoE:
    d, num_experts, k = case.get("d", 5), case["E"], case["k"]
    router = case.get("router", "softmax")
    if case.get("all_to_first_rank"):  # a gate bias that sends every token to experts 0..k-1
        router = SoftmaxRouter(d, num_experts, k, bias=True)
        with torch.no_grad():
            router.gate.bias.zero_()
            router.gate.bias[:k] = 30.0
    layer = MoE(
        d,
        num_experts,
        k,
        case.get("h", 7),
        case.get("activation", "relu"),
        router=router,
        capacity_factor=case.get("capacity_factor"),
        bias=case.get("bias", False),
        load_balance_coef=case.get("lb", 0.01),
        z_loss_coef=1e-3,
        num_shared_experts=case.get("shared", 0),
        shared_gate=case.get("shared_gate", False),
    ).double()
    return layer.train(case.get("train", True))


def _sum_over(t: torch.Tensor, group) -> torch.Tensor:
    t = t.clone()
    if group is not None:
        dist.all_reduce(t, group=group)
    return t


def check_case(rank: int, world: int, case: dict) -> None:
    ep_size = case.get("ep", world)
    ep_group, replicas = _groups(world, ep_size)
    torch.manual_seed(case.get("seed", 0))  # the same full layer and batch on every rank
    full = _layer(case)
    tokens = case["tokens"]  # [world] tokens per rank
    total = sum(tokens)
    x = torch.randn(total, full.d_model, dtype=torch.float64)
    upstream = torch.randn_like(x)
    start = sum(tokens[:rank])
    mine = slice(start, start + tokens[rank])

    if case.get("mesh"):  # a 1-D DeviceMesh over the same ranks instead of the group
        assert ep_size == world
        ep_group = init_device_mesh("cpu", (world,))
    ep = expert_parallel(copy.deepcopy(full), ep_group)
    ep.parallel.overlap = case.get("overlap", True)  # shared experts during the exchange
    xr = x[mine].clone().requires_grad_()
    out, aux = ep(xr)
    # rank r's share of the global objective: its aux loss weighted by its share of the tokens
    share = tokens[rank] / total
    torch.autograd.backward((out * upstream[mine]).sum() + aux * share)

    x_ref = x.clone().requires_grad_()
    if case.get("capacity_factor") is None:
        ref_out, ref_aux = full(x_ref)
        ref_counts = full.stats.tokens_per_expert
        torch.autograd.backward((ref_out * upstream).sum() + ref_aux)
    else:  # capacity per sending rank: the full layer on each slice
        outs, ref_counts, objective, ref_aux = [], 0, 0.0, 0.0
        for r in range(world):
            s = slice(sum(tokens[:r]), sum(tokens[: r + 1]))
            o, a = full(x_ref[s])
            outs.append(o)
            ref_counts = ref_counts + full.stats.tokens_per_expert
            objective = objective + (o * upstream[s]).sum() + a * tokens[r] / total
            ref_aux = ref_aux + a.detach() * tokens[r] / total
        ref_out = torch.cat(outs)
        objective.backward()

    torch.testing.assert_close(out, ref_out[mine].detach(), **TOL)
    torch.testing.assert_close(xr.grad, x_ref.grad[mine], **TOL)
    torch.testing.assert_close(_sum_over(aux.detach() * share, None), aux.detach() * share)
    torch.testing.assert_close(_sum_over(aux.detach() * share, dist.group.WORLD), ref_aux, **TOL)
    for (name, p), p_ref in zip(
        ep.router.named_parameters(), full.router.parameters(), strict=True
    ):
        if p_ref.grad is None:  # the noisy router's noise gate in eval mode
            assert p.grad is None, name
            continue
        grad = _sum_over(p.grad, dist.group.WORLD)
        torch.testing.assert_close(grad, p_ref.grad, **TOL, msg=f"router {name}")
    if full.shared_experts is not None:  # replicated: gradients summed over every rank
        for (name, p), p_ref in zip(
            ep.shared_experts.named_parameters(), full.shared_experts.parameters(), strict=True
        ):
            grad = _sum_over(p.grad, dist.group.WORLD)
            torch.testing.assert_close(grad, p_ref.grad, **TOL, msg=f"shared {name}")
    local = full.num_experts // ep_size
    first = ep.parallel.rank * local
    for name, p in ep.experts.named_parameters():
        p_ref = getattr(full.experts, name)
        assert p.shape[0] == local
        torch.testing.assert_close(p.detach(), p_ref.detach()[first : first + local])
        grad = _sum_over(p.grad, replicas)
        torch.testing.assert_close(
            grad, p_ref.grad[first : first + local], **TOL, msg=f"experts.{name}"
        )
    assert torch.equal(ep.stats.tokens_per_expert, ref_counts)


def parity(rank: int, world: int, cases: list[dict]) -> int:
    for case in cases:
        try:
            check_case(rank, world, case)
        except Exception as err:
            raise AssertionError(f"case {case}: {type(err).__name__}: {err}") from err
    return len(cases)


def sigmoid_bias(rank: int, world: int, steps: int) -> list[float]:
    """The aux-loss-free bias under EP equals the single-process bias on the global batch."""
    alone = [dist.new_group([r]) for r in range(world)][rank]  # for the reference's update
    torch.manual_seed(0)
    full = MoE(6, 4, 2, 8, router="sigmoid").double()
    full.router.bias_update_rate = 0.05
    ep = expert_parallel(copy.deepcopy(full), None)
    n = 5
    for _ in range(steps):
        x = torch.randn(world * n, 6, dtype=torch.float64)
        ep(x[rank * n : (rank + 1) * n])  # train mode: the router counts its rank's load
        full(x)
        update_router_biases(ep)  # sums the ranks' counts
        full.router.update_bias(group=alone)
    torch.testing.assert_close(ep.router.expert_bias, full.router.expert_bias)
    assert ep.router.expert_bias.abs().sum() > 0
    return ep.router.expert_bias.tolist()


def errors(rank: int, world: int) -> None:
    with pytest.raises(ValueError, match=r"num_experts=3 .* R=2"):
        expert_parallel(MoE(4, 3, 1), None)
    with pytest.raises(ValueError, match="expert-choice"):
        expert_parallel(MoE(4, 4, 1, router="expert_choice"), None)
    with pytest.raises(ValueError, match="Soft MoE"):
        expert_parallel(torch.nn.Sequential(SoftMoE(4, 2, 2)), None)
    with pytest.raises(TypeError, match="ExpertBank"):
        expert_parallel(MoE(4, 2, 1, experts=[MLPExpert(4, 8), MLPExpert(4, 8)]), None)
    layer = expert_parallel(MoE(4, 2, 1), None)
    with pytest.raises(ValueError, match="already expert-parallel"):
        expert_parallel(layer, None)


def bf16_autocast(rank: int, world: int) -> None:
    """Under bf16 autocast (rows exchanged in the experts' bf16) the result is the full
    layer's to bf16 rounding."""
    torch.manual_seed(0)
    full = MoE(16, 4, 2, 32, "swiglu")
    ep = expert_parallel(copy.deepcopy(full), None)
    x = torch.randn(8 * world, 16)
    mine = slice(rank * 8, (rank + 1) * 8)
    xr, x_ref = x[mine].clone().requires_grad_(), x.clone().requires_grad_()
    with torch.autocast("cpu", dtype=torch.bfloat16):
        out = ep(xr).output
        ref = full(x_ref).output
    assert out.dtype == torch.float32
    out.sum().backward()
    ref.sum().backward()
    bf16 = {"atol": 3e-2, "rtol": 3e-2}  # bf16 GEMMs on differently batched rows
    torch.testing.assert_close(out, ref[mine].detach(), **bf16)
    torch.testing.assert_close(xr.grad, x_ref.grad[mine], **bf16)


@torch.no_grad()
def _clear_routing(model) -> None:
    """Router weights N(0, 1), experts of unit scale, the same on every rank: no near-ties
    that a GEMM over another number of rows could flip."""
    from moekit.hf import RULES
    from moekit.hf.routers import attribute

    generator = torch.Generator().manual_seed(7)
    for module in model.modules():
        rule = RULES.get(type(module).__name__)
        if rule is not None:
            weight = attribute(module, rule.weight)
            weight.copy_(torch.randn(weight.shape, generator=generator))
    for param in model.parameters():
        if param.dim() == 3:
            param.copy_(torch.randn(param.shape, generator=generator) * 0.2)


def hf_parity(rank: int, world: int, families: list[str]) -> list[str]:
    """Patched transformers models, experts sharded over all ranks (`moekit.hf.parallel`):
    each rank's logits and its shard's expert gradients equal the one-process model's on the
    global batch (float32, 1e-5 relative); the other gradients summed over ranks likewise; each
    shard holds the matching slice of the full model's experts."""
    import warnings

    from moekit.hf import patch_model
    from moekit.hf.catalog import dummy_inputs, tiny_model
    from moekit.hf.parallel import expert_parallel as hf_expert_parallel
    from moekit.hf.parallel import sharded_parameters

    def rel(got: torch.Tensor, want: torch.Tensor) -> float:
        return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()

    checked = []
    for family in families:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = tiny_model(family).train()  # seeded: the same weights on every rank
            patch_model(model, strict=True)
        _clear_routing(model)
        if not checked:  # never a silent no-op: the wrong sharding, an unpatched model
            with pytest.raises(ValueError, match="no moekit MoE layer"):
                expert_parallel(copy.deepcopy(model), None)
            with pytest.raises(ValueError, match="not patched"):
                hf_expert_parallel(tiny_model(family), None)
        full = copy.deepcopy(model)
        per_rank = 2
        ids = dummy_inputs(model, per_rank * world, 6, seed=1)["input_ids"]  # the global batch
        want = full(input_ids=ids).logits
        upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(3))
        (want * upstream).sum().backward()
        assert hf_expert_parallel(model) >= 1
        mine = slice(rank * per_rank, (rank + 1) * per_rank)
        got = model(input_ids=ids[mine]).logits
        (got * upstream[mine]).sum().backward()
        assert rel(got, want[mine]) <= 1e-5, (family, "logits")
        sharded = sharded_parameters(model)
        assert sharded, family
        for name, param in model.named_parameters():
            reference = full.get_parameter(name)
            if name in sharded:
                first, _ = sharded[name]
                part = slice(first, first + param.shape[0])
                assert torch.equal(param.detach(), reference.detach()[part]), (family, name)
                assert rel(param.grad, reference.grad[part]) <= 1e-5, (family, name)
            elif reference.grad is not None:
                grad = param.grad.clone()
                dist.all_reduce(grad)  # replicated: each rank's share of the global batch
                assert rel(grad, reference.grad) <= 1e-5, (family, name)
        checked.append(family)
        del model, full, got, want  # the graphs that hold the exchanges, before the next model
    return checked


def hf_lora_parity(rank: int, world: int, families: list[str]) -> list[str]:
    """PEFT LoRA on the experts of a patched transformers model, sharded with them
    (`hf.parallel.expert_parallel`): each rank holds its experts' factors only (1/R of
    them), equal to the whole adapter's slice; logits and factor gradients equal the
    one-process model's (float32, 1e-5 relative); every rank's factors put back together
    (`AdapterShard.whole`) are the whole adapter, PEFT's layout."""
    import warnings

    from moekit.hf import patch_model
    from moekit.hf.catalog import dummy_inputs, tiny_model
    from moekit.hf.lora import add_lora
    from moekit.hf.parallel import adapter_shards
    from moekit.hf.parallel import expert_parallel as hf_expert_parallel

    def rel(got: torch.Tensor, want: torch.Tensor) -> float:
        return ((got - want).abs().max() / want.abs().max().clamp_min(1e-30)).item()

    for family in families:
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            model = tiny_model(family).train()
            patch_model(model, strict=True)
        _clear_routing(model)
        torch.manual_seed(5)
        model = add_lora(model, 2, None, ("experts",))
        with torch.no_grad():  # B off zero: A's gradients are not zero
            for name, param in model.named_parameters():
                if "lora_B" in name:
                    param.copy_(
                        torch.randn(param.shape, generator=torch.Generator().manual_seed(9))
                    )
        full = copy.deepcopy(model)
        whole = adapter_shards(full)
        assert whole and {s.kind for s in whole.values()} == {"A", "B"}, family
        ids = dummy_inputs(model, 2 * world, 6, seed=1)["input_ids"]
        want = full(input_ids=ids).logits
        upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(3))
        (want * upstream).sum().backward()
        hf_expert_parallel(model)
        shards = adapter_shards(model)
        assert shards.keys() == whole.keys(), family
        mine = slice(rank * 2, (rank + 1) * 2)
        got = model(input_ids=ids[mine]).logits
        (got * upstream[mine]).sum().backward()
        assert rel(got, want[mine]) <= 1e-5, (family, "logits")
        for name, shard in shards.items():
            param, reference = model.get_parameter(name), full.get_parameter(name)
            assert param.numel() * world == reference.numel(), (family, name)
            assert shard.first == rank * shard.num_experts // world, (family, name)
            r = shard.rank
            for got_t, want_t in (
                (param.detach(), reference.detach()),
                (param.grad, reference.grad),
            ):
                e = shard.num_experts // world
                if shard.kind == "A":  # [r E, in], expert-major
                    part = want_t[shard.first * r : (shard.first + e) * r]
                else:  # [out, r E], expert-minor
                    part = want_t.view(want_t.shape[0], r, -1)[:, :, shard.first : shard.first + e]
                    part = part.reshape(want_t.shape[0], r * e)
                assert rel(got_t, part) <= 1e-5, (family, name)
            parts = [torch.empty_like(param) for _ in range(world)]
            dist.all_gather(parts, param.detach().contiguous())
            assert torch.equal(shard.whole(parts), reference.detach()), (family, name)
        del model, full, got, want
    return families


def hf_replay_parity(rank: int, world: int, family: str) -> bool:
    """Routing replay under expert parallelism: routes recorded by one process on the global
    batch, the routers then moved; each rank replays its rows of them on its rows of the
    batch. Its logits equal the one-process replay's (1e-5 relative), the routers' gradients
    summed over the ranks equal its, and what each rank records is what it replayed."""
    import warnings

    from moekit.hf import patch_model, record_routing, replay_routing
    from moekit.hf.catalog import dummy_inputs, tiny_model
    from moekit.hf.parallel import expert_parallel as hf_expert_parallel

    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(family).train()
        patch_model(model, strict=True)
    _clear_routing(model)
    ids = dummy_inputs(model, 2 * world, 6, seed=1)["input_ids"]
    with torch.no_grad(), record_routing(model) as rec:
        model(input_ids=ids)
    routes = rec.routes  # [B, T, L, k]
    generator = torch.Generator().manual_seed(13)
    with torch.no_grad():  # the routers move: their own choice is no longer the routes
        for name, param in model.named_parameters():
            if param.dim() == 2 and param.shape[0] == 8 and "gate" in name:
                param.add_(torch.randn(param.shape, generator=generator) * 3.0)
    full = copy.deepcopy(model)
    with torch.no_grad(), record_routing(full) as moved:
        full(input_ids=ids)
    assert not torch.equal(moved.routes, routes)  # replay is not the routers' own choice
    with replay_routing(full, routes):
        want = full(input_ids=ids).logits
    upstream = torch.randn(want.shape, generator=torch.Generator().manual_seed(3))
    (want * upstream).sum().backward()
    hf_expert_parallel(model)
    mine = slice(rank * 2, (rank + 1) * 2)
    with replay_routing(model, routes[mine]), record_routing(model) as again:
        got = model(input_ids=ids[mine]).logits
    (got * upstream[mine]).sum().backward()
    assert torch.equal(again.routes, routes[mine])
    scale = want[mine].abs().max()
    assert ((got - want[mine]).abs().max() / scale).item() <= 1e-5, "logits"
    routers = [n for n, p in model.named_parameters() if "gate" in n and p.dim() == 2]
    assert routers
    for name in routers:
        grad = model.get_parameter(name).grad.clone()
        dist.all_reduce(grad)
        reference = full.get_parameter(name).grad
        assert ((grad - reference).abs().max() / reference.abs().max()).item() <= 1e-5, name
    return True


def averaged_grads(rank: int, world: int) -> bool:
    """`average_grads` in buckets of 64 bytes (float32 and float64 runs, an empty tensor, one
    larger than a bucket) equals the mean over the ranks, in place; without a group it divides."""
    from moekit.parallel import training

    training.BUCKET_BYTES = 64
    shapes = [(3,), (0,), (40,), (2, 3), (5,), (1,)]
    dtypes = [
        torch.float32,
        torch.float32,
        torch.float32,
        torch.float64,
        torch.float64,
        torch.float32,
    ]

    def grads(r: int) -> list[torch.Tensor]:
        g = torch.Generator().manual_seed(r)
        return [torch.randn(s, generator=g).to(d) for s, d in zip(shapes, dtypes, strict=True)]

    mine = grads(rank)
    ptrs = [t.data_ptr() for t in mine]
    training.average_grads(mine, dist.group.WORLD, world)
    expected = [sum(ts) / world for ts in zip(*(grads(r) for r in range(world)), strict=True)]
    for got, want in zip(mine, expected, strict=True):
        torch.testing.assert_close(got, want)
    alone = grads(rank)
    training.average_grads(alone, None, 4)
    for got, want in zip(alone, grads(rank), strict=True):
        torch.testing.assert_close(got, want / 4)
    return [t.data_ptr() for t in mine] == ptrs
