"""DispatchPlan, permute and unpermute.

Oracles: hand-worked layouts written out below, and Python re-derivations of each property
(pair sets, capacity ranks) on hypothesis-drawn routings.
"""

from __future__ import annotations

import math

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

from moekit import expert_choice_plan, make_plan, permute, unpermute
from strategies import routings

# Three tokens, k = 2, E = 3. Pair p = token * k + slot:
#   p0 (t0 -> e1, .6)  p1 (t0 -> e0, .4)  p2 (t1 -> e1, .7)
#   p3 (t1 -> e2, .3)  p4 (t2 -> e0, .5)  p5 (t2 -> e1, .5)
INDICES = torch.tensor([[1, 0], [1, 2], [0, 1]])
WEIGHTS = torch.tensor([[0.6, 0.4], [0.7, 0.3], [0.5, 0.5]])


def test_plan_dropless_hand_worked():
    plan = make_plan(INDICES, WEIGHTS, num_experts=3)
    # grouped by expert, token order inside: e0 [p1 p4] | e1 [p0 p2 p5] | e2 [p3]
    assert plan.token_index.tolist() == [0, 2, 0, 1, 2, 1]
    torch.testing.assert_close(plan.slot_weight, torch.tensor([0.4, 0.5, 0.6, 0.7, 0.5, 0.3]))
    assert plan.group_sizes.tolist() == [2, 3, 1]
    assert int(plan.num_dropped) == 0


def test_plan_capacity_drops_lowest_weight():
    # C = ceil(1.0 * 6 / 3) = 2: e1 holds p0 (.6), p2 (.7), p5 (.5) -> p5 dropped
    plan = make_plan(INDICES, WEIGHTS, num_experts=3, capacity_factor=1.0)
    assert plan.token_index.tolist() == [0, 2, 0, 1, 1]
    torch.testing.assert_close(plan.slot_weight, torch.tensor([0.4, 0.5, 0.6, 0.7, 0.3]))
    assert plan.group_sizes.tolist() == [2, 2, 1]
    assert int(plan.num_dropped) == 1


def test_plan_capacity_one_per_expert():
    # C = ceil(0.5 * 6 / 3) = 1: e0 keeps p4 (.5 > .4), e1 keeps p2 (.7), e2 keeps p3
    plan = make_plan(INDICES, WEIGHTS, num_experts=3, capacity_factor=0.5)
    assert plan.token_index.tolist() == [2, 1, 1]
    assert plan.group_sizes.tolist() == [1, 1, 1]
    assert int(plan.num_dropped) == 3


def test_plan_capacity_ties_keep_earlier_position():
    # E = 1, k = 1, equal weights, C = ceil(0.5 * 3) = 2: tokens 0, 1 kept, token 2 dropped
    plan = make_plan(torch.zeros(3, 1, dtype=torch.long), torch.full((3, 1), 0.5), 1, 0.5)
    assert plan.token_index.tolist() == [0, 1]
    assert int(plan.num_dropped) == 1


def test_plan_expert_with_no_tokens_and_all_to_one():
    indices = torch.tensor([[2], [2], [2], [2]])  # every token to expert 2 of 4
    plan = make_plan(indices, torch.ones(4, 1), num_experts=4)
    assert plan.group_sizes.tolist() == [0, 0, 4, 0]
    assert plan.token_index.tolist() == [0, 1, 2, 3]


def test_plan_empty_batch():
    plan = make_plan(torch.zeros(0, 2, dtype=torch.long), torch.zeros(0, 2), 4, capacity_factor=1.0)
    assert plan.token_index.numel() == 0 and plan.group_sizes.tolist() == [0, 0, 0, 0]
    out = unpermute(permute(torch.randn(0, 5), plan), plan, 0)
    assert out.shape == (0, 5)


def test_expert_choice_plan_hand_worked():
    token_index = torch.tensor([[2, 0], [0, 3]])  # e0 takes t2, t0; e1 takes t0, t3
    weights = torch.tensor([[0.9, 0.8], [0.7, 0.6]])
    plan = expert_choice_plan(token_index, weights, num_tokens=5)
    assert plan.token_index.tolist() == [2, 0, 0, 3]
    assert plan.group_sizes.tolist() == [2, 2]
    assert int(plan.num_dropped) == 2  # tokens 1 and 4 chosen by no expert
    x = torch.randn(5, 3)
    out = unpermute(permute(x, plan), plan, 5)
    torch.testing.assert_close(out[0], (0.8 + 0.7) * x[0])
    torch.testing.assert_close(out[1], torch.zeros(3))


def _row_experts(plan) -> list[int]:
    sizes = plan.group_sizes.tolist()
    return [e for e, size in enumerate(sizes) for _ in range(size)]


capacity_factors = st.sampled_from([None, 0.25, 0.5, 1.0, 1.5, 8.0])


@given(routings(), capacity_factors)
def test_plan_properties(routing, capacity_factor):
    indices, weights, num_experts = routing
    num_tokens, top_k = indices.shape
    plan = make_plan(indices, weights, num_experts, capacity_factor)
    rows = plan.token_index.tolist()
    row_experts = _row_experts(plan)
    # group sizes sum to the kept rows; drops counted
    assert len(rows) == len(row_experts) == int(plan.group_sizes.sum())
    assert int(plan.num_dropped) == num_tokens * top_k - len(rows)
    # every kept (token, slot) is computed once, by the expert the token chose
    kept = set()
    for token, expert in zip(rows, row_experts, strict=True):
        slot = indices[token].tolist().index(expert)  # raises if the token did not choose it
        assert (token, slot) not in kept
        kept.add((token, slot))
        assert plan.slot_weight[len(kept) - 1] == weights[token, slot]
    # token order inside each expert's group
    for e in range(num_experts):
        tokens = [t for t, x in zip(rows, row_experts, strict=True) if x == e]
        assert tokens == sorted(tokens)
    if capacity_factor is None:
        assert len(kept) == num_tokens * top_k
        return
    capacity = math.ceil(capacity_factor * num_tokens * top_k / num_experts)
    assert int(plan.group_sizes.max()) <= capacity
    # kept pairs are each expert's heaviest, ties to the earlier position
    for e in range(num_experts):
        pairs = [(n, j) for n in range(num_tokens) for j in range(top_k) if indices[n, j] == e]
        pairs.sort(key=lambda p: (-weights[p].item(), p[0] * top_k + p[1]))
        assert {p for p in pairs[:capacity]} == {p for p in kept if indices[p] == e}


@given(routings(), capacity_factors)
def test_permute_unpermute_inverse(routing, capacity_factor):
    indices, weights, num_experts = routing
    num_tokens, top_k = indices.shape
    x = torch.randn(num_tokens, 5, dtype=torch.float64)
    plan = make_plan(indices, weights.double(), num_experts, capacity_factor)
    # identity experts: each token gets the sum of its kept weights times itself
    out = unpermute(permute(x, plan), plan, num_tokens)
    kept_weight = torch.zeros(num_tokens, dtype=torch.float64).index_add(
        0, plan.token_index, plan.slot_weight
    )
    torch.testing.assert_close(out, kept_weight[:, None] * x)
    if capacity_factor is None:
        # normalised weights: the identity expert returns the input exactly
        unit = plan._replace(slot_weight=torch.full_like(plan.slot_weight, 1.0 / top_k))
        torch.testing.assert_close(unpermute(permute(x, unit), unit, num_tokens), x)


def test_unpermute_gradients_match_manual():
    x = torch.randn(3, 4, dtype=torch.float64, requires_grad=True)
    w = WEIGHTS.double().requires_grad_(True)
    plan = make_plan(INDICES, w, num_experts=3)
    torch.autograd.gradcheck(lambda a: unpermute(permute(a, plan), plan, 3), (x,))
    torch.autograd.gradcheck(
        lambda ww: unpermute(
            permute(x.detach(), make_plan(INDICES, ww, 3)), make_plan(INDICES, ww, 3), 3
        ),
        (w,),
    )


@pytest.mark.parametrize("bad", ["shape", "dtype", "range"])
def test_make_plan_rejects_bad_routing(bad):
    if bad == "shape":
        with pytest.raises(ValueError, match="weights"):
            make_plan(INDICES, WEIGHTS[:, :1], 3)
    elif bad == "dtype":
        with pytest.raises(ValueError, match="indices"):
            make_plan(INDICES.float(), WEIGHTS, 3)
    else:
        with pytest.raises(ValueError, match=r"indices must lie in \[0, 2\), got \[0, 2\]"):
            make_plan(INDICES, WEIGHTS, 2)
        with pytest.raises(ValueError, match="must lie in"):
            expert_choice_plan(torch.tensor([[0, 5]]), torch.ones(1, 2), num_tokens=3)


def test_make_plan_rejects_bad_capacity():
    with pytest.raises(ValueError, match="capacity_factor"):
        make_plan(INDICES, WEIGHTS, 3, capacity_factor=0.0)
    with pytest.raises(ValueError, match="num_experts"):
        make_plan(INDICES, WEIGHTS, 0)
