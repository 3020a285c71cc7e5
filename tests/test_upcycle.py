"""Sparse upcycling (`moekit.upcycle`) and the char LM's dense -> MoE path (`moekit upcycle`).

Oracle: the dense module itself. In eval mode an upcycled layer (E identical experts, a router
whose k weights sum to 1) computes the dense output up to float rounding; the upcycled char LM's
loss equals the dense one's on the same batch, and training resumes from the dense step.
"""

from __future__ import annotations

import copy
import json
import logging
import random

import pytest
import torch
from torch import nn

from moekit import (
    ExpertBank,
    ExpertList,
    MLPExpert,
    MoE,
    SoftmaxRouter,
    SparseMoE,
    UpcycledMoE,
    total_aux_loss,
    upcycle,
)
from moekit.cli import main
from moekit.lm.config import build_config
from moekit.lm.inference import load_model
from moekit.train import files as ckpt


class Net(nn.Module):
    """A toy parent: two residual feed-forwards that return tensors."""

    def __init__(self, first: nn.Module, second: nn.Module) -> None:
        super().__init__()
        self.blocks = nn.ModuleList(
            [nn.ModuleDict({"ffwd": first}), nn.ModuleDict({"ffwd": second})]
        )

    def forward(self, x):
        for block in self.blocks:
            x = x + block["ffwd"](x)
        return x


class Gated(nn.Module):
    """A feed-forward no `ExpertBank` computes: it becomes an `ExpertList` of copies."""

    def __init__(self, d: int) -> None:
        super().__init__()
        self.norm = nn.LayerNorm(d)
        self.up = nn.Linear(d, 2 * d)
        self.down = nn.Linear(d, d)

    def forward(self, x):
        a, b = self.up(self.norm(x)).chunk(2, dim=-1)
        return self.down(torch.tanh(a) * b)


def sequential(d: int, act: nn.Module, bias: bool = True) -> nn.Sequential:
    return nn.Sequential(
        nn.Linear(d, 3 * d, bias=bias), act, nn.Linear(3 * d, d, bias=bias), nn.Dropout(0.2)
    )


DENSE = {
    "seq_relu": lambda d: sequential(d, nn.ReLU()),
    "seq_gelu_nobias": lambda d: sequential(d, nn.GELU(), bias=False),
    "mlp_swiglu": lambda d: MLPExpert(d, 5, "swiglu", dropout=0.1),
    "mlp_gelu": lambda d: MLPExpert(d, 2 * d, "gelu"),
    "gated": Gated,
}


@pytest.mark.parametrize("kind", sorted(DENSE))
@pytest.mark.parametrize(("num_experts", "top_k"), [(1, 1), (3, 2), (8, 1), (8, 2), (3, 3)])
@pytest.mark.parametrize("router", [None, "noisy", "sigmoid"])
def test_upcycled_module_equals_dense_at_step_0(kind, num_experts, top_k, router):
    d = 17
    net = Net(DENSE[kind](d), DENSE[kind](d)).eval()
    x = torch.randn(3, 7, d)  # [B, T, d]
    with torch.no_grad():
        want = net(x)
    assert upcycle(net, num_experts, top_k, targets="blocks.*.ffwd", router=router) == 2
    layer = net.blocks[0]["ffwd"]
    assert isinstance(layer, UpcycledMoE) and not layer.training
    assert (layer.num_experts, layer.top_k) == (num_experts, top_k)
    assert isinstance(layer.experts, ExpertList if kind == "gated" else ExpertBank)
    with torch.no_grad():
        got = net(x)
    torch.testing.assert_close(got, want)


def test_bank_copies_are_the_dense_weights():
    dense = sequential(6, nn.ReLU())
    net = Net(dense, sequential(6, nn.ReLU()))
    upcycle(net, 4, 2, targets=nn.Sequential)
    bank = net.blocks[0]["ffwd"].experts
    for e in range(4):
        assert torch.equal(bank.w1[e], dense[0].weight.t())  # [d, h]
        assert torch.equal(bank.w2[e], dense[2].weight.t())  # [h, d]
        assert torch.equal(bank.b1[e], dense[0].bias) and torch.equal(bank.b2[e], dense[2].bias)
    assert bank.dropout == 0.2 and bank.activation == "relu"


@pytest.mark.parametrize("experts", ["bank", "list"])
@pytest.mark.parametrize("layer_cls", [MoE, SparseMoE])
def test_one_expert_moe_grows_in_place(experts, layer_cls):
    d = 12
    if layer_cls is SparseMoE:  # seed 003's preset: returns the tensor, NoisyTopkRouter
        layer = SparseMoE(d, 1, 1, dropout=0.0)
    else:
        modules = [MLPExpert(d, 4 * d, "relu")] if experts == "list" else None
        layer = MoE(d, 1, 1, activation="relu", router="noisy", experts=modules, bias=True)
    layer.eval()
    router_cls = type(layer.router)
    x = torch.randn(2, 5, d)
    with torch.no_grad():
        want = layer(x)
    parent = nn.Sequential(layer)
    assert upcycle(parent, 8, 2) == 1
    assert parent[0] is layer and type(layer.router) is router_cls  # same layer, same router kind
    assert (layer.num_experts, layer.top_k, layer.router.num_experts) == (8, 2, 8)
    assert not layer.training and not layer.router.training
    with torch.no_grad():
        got = layer(x)
    torch.testing.assert_close(
        got.output if layer_cls is MoE else got, want.output if layer_cls is MoE else want
    )


def test_new_router_is_small_and_noise_only_in_training():
    layer = MoE(16, 1, 1, router="noisy", bias=True)
    upcycle(nn.Sequential(layer), 8, 2, router_init_std=0.02)
    for linear in (layer.router.gate, layer.router.noise_gate):
        assert linear.weight.shape == (8, 16)
        assert 0.01 < float(linear.weight.detach().std()) < 0.03
    x = torch.randn(64, 16)
    layer.eval()
    torch.testing.assert_close(layer(x).output, layer(x).output, rtol=0, atol=0)  # no noise
    layer.train()
    first = layer.router.route(x).indices
    assert any(not torch.equal(first, layer.router.route(x).indices) for _ in range(5))


def test_aux_loss_stays_readable_and_everything_trains():
    net = Net(sequential(8, nn.ReLU()), Gated(8))
    upcycle(net, 4, 2, targets=lambda name, m: name.endswith("ffwd"))
    x = torch.randn(4, 6, 8)
    out = net(x)  # the parent's code runs unchanged: each layer returns a tensor
    assert isinstance(out, torch.Tensor) and out.shape == x.shape
    aux = total_aux_loss(net)
    assert aux > 0 and all(m.aux_loss is not None for m in net.modules() if isinstance(m, MoE))
    (out.square().mean() + aux).backward()
    assert all(p.grad is not None for p in net.parameters())
    clone = copy.deepcopy(net)  # still a value after a forward
    assert isinstance(clone.blocks[1]["ffwd"], UpcycledMoE)


def test_targets_by_type_name_and_predicate_count_modules():
    def build():
        return Net(MLPExpert(8, 16), sequential(8, nn.ReLU()))

    assert upcycle(build(), 2, 1, targets=MLPExpert) == 1
    assert upcycle(build(), 2, 1, targets=(MLPExpert, nn.Sequential)) == 2
    assert upcycle(build(), 2, 1, targets="blocks.1.*") == 1
    shared = MLPExpert(8, 16)
    net = Net(shared, shared)  # one module registered twice: upcycled once, still shared
    assert upcycle(net, 2, 1, targets=MLPExpert) == 1
    assert net.blocks[0]["ffwd"] is net.blocks[1]["ffwd"]


def test_non_renormalising_router_warns(caplog):
    net = Net(sequential(8, nn.ReLU()), sequential(8, nn.ReLU()))
    router = SoftmaxRouter(8, 4, 2, normalize=False)
    with caplog.at_level(logging.WARNING, logger="moekit.upcycle"):
        upcycle(net, 4, 2, targets=nn.Sequential, router=router)
    assert "not renormalised" in caplog.text
    assert net.blocks[0]["ffwd"].router is not router  # copied per layer


@pytest.mark.parametrize(
    ("kwargs", "error", "match"),
    [
        (dict(targets="nothing.*"), ValueError, "matched no submodule"),
        (dict(targets=3), TypeError, "targets"),
        (dict(top_k=5), ValueError, "top_k=5 must be <= num_experts=4"),
        (dict(num_experts=0), ValueError, "num_experts"),
        (dict(router="fancy"), ValueError, "router='fancy'"),
        (dict(router=3.0), TypeError, "router"),
        (dict(router=SoftmaxRouter(8, 3, 2)), ValueError, "router.num_experts=3"),
        (dict(router="switch"), ValueError, "top_k=2 must be 1"),
        (dict(router_init_std=-1.0), ValueError, "router_init_std"),
    ],
)
def test_bad_arguments_are_named(kwargs, error, match):
    net = Net(sequential(8, nn.ReLU()), sequential(8, nn.ReLU()))
    args = dict(num_experts=4, top_k=2, targets=nn.Sequential) | kwargs
    with pytest.raises(error, match=match):
        upcycle(net, **args)


def test_moe_with_several_experts_and_moduleless_targets_are_refused():
    with pytest.raises(ValueError, match="num_experts=4; upcycle grows"):
        upcycle(nn.Sequential(MoE(8, 4, 2)), 8, 2)
    with pytest.raises(ValueError, match="cannot tell the width"):
        upcycle(nn.Sequential(nn.ReLU()), 4, 2, targets=nn.ReLU)
    with pytest.raises(ValueError, match="experts already"):
        upcycle(nn.Sequential(ExpertBank(2, 8, 16)), 4, 2, targets=ExpertBank)


# --- the char LM: moekit train --num-experts 1, moekit upcycle, moekit train --resume ---


@pytest.fixture(scope="module")
def text_file(tmp_path_factory):
    rng = random.Random(0)
    words = ["sparse", "dense", "expert", "router", "token", "upcycle", "moe", "copy"]
    path = tmp_path_factory.mktemp("data") / "words.txt"
    path.write_text(" ".join(rng.choice(words) for _ in range(800)) + "\n")
    return path


def _train_flags(text_file, out, max_iters: int, *extra: str) -> list[str]:
    return [
        "train",
        "--preset",
        "tiny",
        "--data",
        str(text_file),
        "--out",
        str(out),
        "--max-iters",
        str(max_iters),
        "--eval-interval",
        "4",
        "--eval-iters",
        "1",
        "--save-every",
        "0",
        "--sample-tokens",
        "0",
        "--no-track",
        "--no-progress",
        *extra,
    ]


@pytest.fixture(scope="module")
def dense_run(tmp_path_factory, text_file):
    out = tmp_path_factory.mktemp("dense")
    assert main(_train_flags(text_file, out, 6, "--num-experts", "1")) == 0
    return out


def test_num_experts_1_alone_is_the_dense_model():
    assert build_config("tiny", None, num_experts=1).model.top_k == 1
    assert build_config("tiny", None, num_experts=8).model.top_k == 2
    with pytest.raises(ValueError, match="top_k=2 must be <= num_experts=1"):
        build_config("tiny", None, num_experts=1, top_k=2)


def test_cli_upcycle_equals_dense_then_resumes(dense_run, text_file, tmp_path, capsys):
    out = tmp_path / "moe"
    assert (
        main(["upcycle", "--checkpoint", str(dense_run), "--num-experts", "4", "--out", str(out)])
        == 0
    )
    assert "optimizer state fresh" in capsys.readouterr().out
    dense, moe = load_model(dense_run), load_model(out)
    assert moe.step == dense.step == 6
    assert (moe.model.config.num_experts, moe.model.config.top_k) == (4, 2)
    assert all(layer.num_experts == 4 for layer in moe.model.moe_layers())
    # (a) the same loss on the same batch at the upcycling step
    x = torch.randint(0, dense.model.config.vocab_size, (8, 16))
    y = torch.randint(0, dense.model.config.vocab_size, (8, 16))
    with torch.no_grad():
        dense_loss, moe_loss = dense.model(x, y)[1], moe.model(x, y)[1]
    torch.testing.assert_close(moe_loss, dense_loss, rtol=0, atol=1e-5)
    state = ckpt.latest_checkpoint(out).state
    assert ckpt.latest_checkpoint(out).optimizer["state"] == {}  # fresh optimizer state
    assert state["model_config"]["num_experts"] == 4 and state["train_config"]["out"] == str(out)
    # (b) training goes on from the dense step; the model comes from the checkpoint
    assert main(_train_flags(text_file, out, 9, "--resume")) == 0
    resumed = ckpt.latest_checkpoint(out)
    assert resumed.step == 9
    history = resumed.state["loop"]
    assert len(history["train_losses"]) == 9  # the dense run's 6, then 3 upcycled
    assert [e["step"] for e in history["evals"]] == [0, 4, 6, 8, 9]
    assert json.loads((out / "config.json").read_text())["model"]["num_experts"] == 4
    # a model flag that contradicts the checkpoint is an error, not a silent change
    assert main(_train_flags(text_file, out, 10, "--resume", "--num-experts", "2")) != 0
    assert "differs from the requested" in capsys.readouterr().err


def test_cli_upcycle_refusals(dense_run, tmp_path, capsys):
    out = tmp_path / "moe"
    assert (
        main(
            [
                "upcycle",
                "--checkpoint",
                str(dense_run),
                "--num-experts",
                "2",
                "--top-k",
                "3",
                "--out",
                str(out),
            ]
        )
        == 1
    )
    assert "top_k=3 must be <= num_experts=2" in capsys.readouterr().err
    assert (
        main(["upcycle", "--checkpoint", str(dense_run), "--num-experts", "2", "--out", str(out)])
        == 0
    )
    assert (
        main(["upcycle", "--checkpoint", str(dense_run), "--num-experts", "2", "--out", str(out)])
        == 1
    )
    assert "holds checkpoints already" in capsys.readouterr().err
    assert (
        main(
            [
                "upcycle",
                "--checkpoint",
                str(out),
                "--num-experts",
                "4",
                "--out",
                str(tmp_path / "x"),
            ]
        )
        == 1
    )
    assert "num_experts=2; upcycle takes a dense run" in capsys.readouterr().err
