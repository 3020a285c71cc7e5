"""Expert weights verified against the files: a clean load passes (per-expert checkpoints that
transformers fuses on load, and fused ones), an injected loader fault is caught with its
layer, tensor, expert and kind, and exact copies of an expert are reported, not refused."""

from __future__ import annotations

import warnings

import pytest
import torch

pytest.importorskip("transformers")

from moekit.hf.catalog import tiny_model  # noqa: E402
from moekit.hf.load import load_model  # noqa: E402
from moekit.hf.verify import LoaderFault, verify_experts  # noqa: E402


def _saved(tmp_path, family: str, **config):
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model(family, **config)
        model.save_pretrained(tmp_path / family)
    return tmp_path / family


def _experts(model):
    return [m for m in model.modules() if hasattr(m, "has_gate") and hasattr(m, "down_proj")]


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss", "deepseek_v3", "mixtral"])
def test_a_clean_load_equals_the_files(tmp_path, family):
    """Per-expert checkpoints (Qwen3-MoE, DeepSeek-V3: fused on load) and fused ones (gpt-oss)
    compare row for row; Mixtral's renames its block (`block_sparse_moe`) and its experts
    (w1, w3, w2): found by the family's own conversion mapping."""
    directory = _saved(tmp_path, family)
    report = verify_experts(load_model(directory, torch.float32), directory)
    assert report.checked and report.experts >= 2 * len(report.checked)
    assert not report.unverified and not report.duplicates


@pytest.fixture
def square(tmp_path):
    """A Qwen3-MoE whose fused gate_up [E, 2h, d] is square (2h = d): a transposed expert
    keeps its shape."""
    directory = _saved(tmp_path, "qwen3_moe", d_model=32, d_hidden=16)
    return directory, load_model(directory, torch.float32)


@pytest.mark.parametrize(
    "fault,match",
    [
        ("transposed", r"layers\.1\.mlp: gate_up_proj, expert 3: .*\(transposed;"),
        ("shifted", r"layers\.1\.mlp: gate_up_proj, expert 3: .*\(expert 4's rows of the file;"),
        ("noise", r"layers\.1\.mlp: gate_up_proj, expert 3: .*\(different values;"),
    ],
)
def test_an_injected_loader_fault_is_named(square, fault, match):
    directory, model = square
    weight = _experts(model)[1].gate_up_proj
    with torch.no_grad():
        if fault == "transposed":
            weight[3] = weight[3].T.clone()
        elif fault == "shifted":
            weight[3] = weight[4].clone()
        else:
            weight[3] += 1e-3
    with pytest.raises(LoaderFault, match=match):
        verify_experts(model, directory)


def test_a_stack_loaded_transposed_is_named(tmp_path):
    directory = _saved(tmp_path, "qwen3_moe")
    model = load_model(directory, torch.float32)
    experts = _experts(model)[0]
    up = experts.gate_up_proj.detach()  # [E, 2h, d], not square
    experts.gate_up_proj = torch.nn.Parameter(up.transpose(1, 2).clone())
    with pytest.raises(LoaderFault, match=r"layers\.0\.mlp: gate_up_proj was loaded transposed"):
        verify_experts(model, directory)


def test_exact_copies_are_reported_not_refused(tmp_path, capsys):
    """After sparse upcycling every expert starts as a copy of one: reported, not a fault."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model("qwen3_moe")
    with torch.no_grad():
        for experts in _experts(model):
            experts.gate_up_proj[:] = experts.gate_up_proj[0].clone()
    model.save_pretrained(tmp_path / "upcycled")
    report = verify_experts(load_model(tmp_path / "upcycled", torch.float32), tmp_path / "upcycled")
    assert report.duplicates and all(e == 0 for _, e, _ in report.duplicates)
    assert "exact copies" in report.summary()
    from moekit.cli import main

    assert main(["info", "--hf", str(tmp_path / "upcycled"), "--verify"]) == 0
    assert "exact copies (fine after upcycling)" in capsys.readouterr().out
