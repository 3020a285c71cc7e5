"""Expert parallelism on 2 and 4 gloo ranks against the full layer in one process (float64).

Each spawn runs many cases (a process start costs seconds); the rank-side checks and their
oracle are in ep_workers.py. Marker `distributed`; every run has a process-group timeout and a
deadline (spawn.py), so a broken collective fails instead of hanging.
"""

from __future__ import annotations

import pytest
import torch

import ep_workers
from moekit import MoE
from moekit.parallel import expert_parallel
from spawn import run_ranks

pytestmark = pytest.mark.distributed

TWO_RANKS = [
    dict(E=4, k=2, tokens=[3, 4]),
    dict(E=4, k=2, tokens=[3, 4], activation="swiglu", bias=True),
    dict(E=4, k=2, tokens=[6, 5], activation="gelu", router="noisy", train=False),
    dict(E=4, k=1, tokens=[7, 2], router="switch"),
    dict(E=8, k=3, tokens=[5, 5], router="sigmoid"),
    dict(E=4, k=4, tokens=[2, 3]),  # k = E: every rank gets every token
    dict(E=4, k=2, tokens=[0, 6]),  # rank 0 sends nothing and gets rank 1's rows
    dict(E=4, k=2, tokens=[1, 0]),  # one token in all
    dict(E=4, k=2, tokens=[5, 4], all_to_first_rank=True),  # rank 1's experts get no row
    dict(E=4, k=2, tokens=[9, 7], capacity_factor=0.5, lb=0.0),
    dict(E=4, k=2, tokens=[9, 7], capacity_factor=1.25, lb=0.0),
    dict(E=2, k=1, tokens=[4, 4], ep=1),  # data parallel only: experts replicated
    dict(E=4, k=2, tokens=[4, 3], mesh=True),  # a 1-D DeviceMesh as the group
    dict(E=4, k=2, tokens=[5, 3], shared=1),  # shared experts during the exchange (overlap)
    dict(E=4, k=2, tokens=[5, 3], shared=2, shared_gate=True, overlap=False),
    dict(E=4, k=2, tokens=[0, 4], shared=1, activation="swiglu"),  # rank 0: no rows, overlap
]

FOUR_RANKS = [
    dict(E=4, k=2, tokens=[3, 4, 2, 5]),
    dict(E=8, k=2, tokens=[5, 0, 2, 3], activation="swiglu"),
    dict(E=8, k=3, tokens=[4, 4, 4, 4], router="sigmoid", bias=True),
    dict(E=4, k=2, tokens=[3, 1, 0, 4], ep=2),  # 2 groups of 2 ranks, 2 replicas of each expert
    dict(E=4, k=1, tokens=[6, 6, 6, 6], ep=2, router="switch", capacity_factor=1.0, lb=0.0),
    dict(E=4, k=2, tokens=[5, 4, 3, 3], all_to_first_rank=True),
    dict(E=8, k=2, tokens=[4, 2, 0, 3], shared=1, ep=2, all_to_first_rank=True),
]


def test_two_ranks_equal_the_full_layer():
    assert run_ranks(ep_workers.parity, 2, TWO_RANKS) == [len(TWO_RANKS)] * 2


def test_four_ranks_equal_the_full_layer():
    assert run_ranks(ep_workers.parity, 4, FOUR_RANKS) == [len(FOUR_RANKS)] * 4


def test_sigmoid_bias_equals_the_single_process_bias():
    biases = run_ranks(ep_workers.sigmoid_bias, 2, 4)
    assert biases[0] == biases[1]


def test_bf16_autocast_matches_the_full_layer():
    run_ranks(ep_workers.bf16_autocast, 2)


def test_bad_layers_are_refused():
    run_ranks(ep_workers.errors, 2)


def test_without_a_process_group_the_error_says_so():
    with pytest.raises(RuntimeError, match="not initialised"):
        expert_parallel(MoE(4, 2, 1), None)


def test_transpose_blocks_hand_worked():
    from moekit.parallel.expert_parallel import _transpose_blocks

    # rows from 2 ranks for 3 local experts, rank-major: r0e0 r0e0 | r0e2 | r1e0 | r1e1 r1e1 r1e1
    sizes = torch.tensor([[2, 0, 1], [1, 3, 0]])
    rows = torch.tensor([0, 1, 2, 3, 4, 5, 6])  # row ids in rank-major order
    to_experts = _transpose_blocks(sizes, 7)
    # expert-major: e0 (r0: 0 1, r1: 3) | e1 (r1: 4 5 6) | e2 (r0: 2)
    assert rows[to_experts].tolist() == [0, 1, 3, 4, 5, 6, 2]
    back = _transpose_blocks(sizes.t(), 7)
    assert rows[to_experts][back].tolist() == rows.tolist()


def test_patched_transformers_models_shard_their_experts():
    """moekit.hf.parallel: tiny Qwen3-MoE (fused CPU path), DeepSeek-V3 (shared experts,
    sigmoid + bias routing) and gpt-oss (biased, transposed experts through the general path)
    on 2 ranks, 4 of 8 experts each, equal the one-process model; neither sharding is a
    silent no-op on a model it cannot shard."""
    families = ["qwen3_moe", "deepseek_v3", "gpt_oss"]
    assert run_ranks(ep_workers.hf_parity, 2, families) == [families, families]


def test_patched_transformers_experts_on_four_ranks():
    assert run_ranks(ep_workers.hf_parity, 4, ["qwen3_moe"]) == [["qwen3_moe"]] * 4


def test_hf_expert_lora_is_sharded_with_the_experts():
    """PEFT's LoRA factors on the experts: each rank its experts' (1/R of the adapter), the
    forward and gradients as one process's, put back together to the whole adapter (gpt-oss:
    transposed experts, biases)."""
    families = ["qwen3_moe", "gpt_oss"]
    assert run_ranks(ep_workers.hf_lora_parity, 2, families) == [families, families]


def test_routing_replay_under_expert_parallelism_equals_one_process():
    """Each EP rank replays its rows of routes recorded by one process (`moekit.hf.replay`):
    the logits and the routers' gradients are the one-process replay's."""
    assert run_ranks(ep_workers.hf_replay_parity, 2, "qwen3_moe") == [True, True]


def test_average_grads_in_buckets_is_the_mean_in_place():
    """The expert shards' gradient mean, a bucket at a time (mixed dtypes, an empty tensor,
    one larger than a bucket), equals the mean over the ranks in the same tensors."""
    assert run_ranks(ep_workers.averaged_grads, 2) == [True, True]
