"""`moekit finetune` end to end on tiny saved transformers models (no downloads): LoRA and full
fine-tunes, the adapter loaded by PEFT in a process that never imports moekit, bitwise resume,
routing statistics, and one clear line for bad input."""

from __future__ import annotations

import json
import subprocess
import sys
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
peft = pytest.importorskip("peft")

from safetensors.torch import load_file  # noqa: E402

from moekit.cli import main  # noqa: E402
from moekit.hf.catalog import tiny_model  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Tiny Qwen3-MoE and gpt-oss models (vocabulary 256: byte tokens) and a text file."""
    root = tmp_path_factory.mktemp("finetune")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        for family in ("qwen3_moe", "gpt_oss"):
            tiny_model(family, vocab_size=256).save_pretrained(root / family)
    text = SHAKESPEARE.read_text(encoding="utf-8")[:20_000]
    (root / "data.txt").write_text(text, encoding="utf-8")
    return root


def _run(*args: str) -> int:
    return main(["finetune", "--no-progress", "--no-track", *args])


def _config(saved: Path, tmp_path: Path, **changes):
    """A one-step `FinetuneConfig` of the tiny Qwen3-MoE, no tracking, no progress bar."""
    from moekit.hf.finetune import FinetuneConfig

    options = dict(steps=1, seq_len=16, batch_size=2, track=False, progress=False)
    return FinetuneConfig(
        model=str(saved / "qwen3_moe"),
        data=str(saved / "data.txt"),
        out=str(tmp_path / "run"),
        **(options | changes),
    )


def _common(saved: Path, family: str, out: Path, steps: int = 4) -> list[str]:
    return [
        "--model",
        str(saved / family),
        "--data",
        str(saved / "data.txt"),
        "--out",
        str(out),
        "--steps",
        str(steps),
        "--seq-len",
        "16",
        "--batch-size",
        "2",
        "--eval-interval",
        "2",
        "--eval-batches",
        "1",
        "--lr",
        "1e-2",
    ]


_CLEAN_PROCESS = """
import sys, torch
from transformers import AutoModelForCausalLM
from peft import PeftModel
from safetensors.torch import save_file
base = AutoModelForCausalLM.from_pretrained(sys.argv[1], experts_implementation="eager")
model = PeftModel.from_pretrained(base, sys.argv[2]).eval()
ids = torch.arange(24).reshape(2, 12) * 7 % 200
with torch.no_grad():
    save_file({"logits": model(input_ids=ids).logits.contiguous()}, sys.argv[3])
assert not any(name.startswith("moekit") for name in sys.modules), "moekit was imported"
"""


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_lora_finetune_trains_every_expert_and_loads_without_moekit(saved, tmp_path, family):
    out = tmp_path / "run"
    assert _run(*_common(saved, family, out), "--lora-rank", "4", "--merge") == 0
    final = out / "final"
    config = json.loads((final / "adapter_config.json").read_text())
    assert config["r"] == 4 and config["target_parameters"]
    tensors = load_file(final / "adapter_model.safetensors")
    experts_b = [k for k in tensors if ".experts." in k and "lora_B" in k]
    assert len(experts_b) == 4  # 2 layers x (gate_up, down): every MoE layer's experts
    for name in experts_b:  # B starts at zero: every expert's LoRA moved
        per_expert = tensors[name].reshape(tensors[name].shape[0], -1)
        assert (per_expert.abs().sum(-1) > 0).all(), name
    assert (out / "merged" / "config.json").is_file()
    assert (out / "expert_load.png").is_file() and (out / "loss.png").is_file()

    # the adapter in a process that never imports moekit gives the logits moekit computes
    logits_file = tmp_path / "logits.safetensors"
    subprocess.run(
        [sys.executable, "-c", _CLEAN_PROCESS, str(saved / family), str(final), str(logits_file)],
        check=True,
        timeout=300,
        capture_output=True,
    )
    from moekit.hf.load import load_model

    model = peft.PeftModel.from_pretrained(load_model(saved / family, torch.float32), final).eval()
    ids = torch.arange(24).reshape(2, 12) * 7 % 200
    with torch.no_grad():
        ours = model(input_ids=ids).logits
    theirs = load_file(logits_file)["logits"]
    assert ((ours - theirs).abs().max() / theirs.abs().max()).item() <= 1e-5


@pytest.mark.parametrize("family", ["qwen3_moe", "gpt_oss"])
def test_full_finetune_writes_a_transformers_model(saved, tmp_path, family):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "run"
    assert _run(*_common(saved, family, out, steps=2)) == 0
    tuned = AutoModelForCausalLM.from_pretrained(out / "final")
    base = AutoModelForCausalLM.from_pretrained(saved / family)
    moved = [
        name
        for (name, a), (_, b) in zip(
            tuned.state_dict().items(), base.state_dict().items(), strict=True
        )
        if not torch.equal(a, b)
    ]
    assert any(".experts." in n for n in moved) and any("self_attn" in n for n in moved)


def test_resume_continues_bitwise(saved, tmp_path):
    straight, resumed = tmp_path / "straight", tmp_path / "resumed"
    lora = ["--lora-rank", "2", "--lora-targets", "experts,router,attention"]
    assert _run(*_common(saved, "qwen3_moe", straight, steps=4), *lora) == 0
    assert _run(*_common(saved, "qwen3_moe", resumed, steps=2), *lora) == 0
    assert _run(*_common(saved, "qwen3_moe", resumed, steps=4), *lora, "--resume") == 0
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(resumed / "final" / "adapter_model.safetensors")
    assert (
        a.keys() == b.keys() and any("self_attn" in k for k in a) and any(".gate." in k for k in a)
    )
    assert all(torch.equal(a[k], b[k]) for k in a)


def test_router_health_is_counted_per_layer(saved, tmp_path):
    from moekit.hf.finetune import FinetuneJob
    from moekit.train.loop import Loop

    loop = Loop(FinetuneJob(_config(saved, tmp_path)))
    loop.train_step()
    record = loop.evaluate()  # the training step's tokens (the evaluation's are not counted)
    for layer in (0, 1):
        assert 1.0 <= record[f"layer{layer}_load_max_over_mean"] <= 8.0
        assert 0.0 < record[f"layer{layer}_load_entropy"] <= 1.0
    (load,) = [entry["load"] for entry in loop.health.history]
    assert len(load) == 2 and all(abs(sum(row) - 1.0) < 1e-9 for row in load)
    # 2 rows x 16 tokens x top-k routed pairs per layer, nothing from the evaluation
    top_k = loop.job.model.config.num_experts_per_tok
    shares = torch.tensor(load[0]) * 2 * 16 * top_k
    assert torch.allclose(shares, shares.round(), atol=1e-6)


def test_bad_input_gets_one_clear_line(saved, tmp_path, capsys):
    args = _common(saved, "qwen3_moe", tmp_path / "run", steps=1)
    not_a_model = [*args, "--model", str(tmp_path)]
    assert _run(*not_a_model) == 1
    assert "is not a saved transformers model" in capsys.readouterr().err
    (tmp_path / "short.txt").write_text("too short")
    assert _run(*args, "--data", str(tmp_path / "short.txt")) == 1
    assert "--data is too short" in capsys.readouterr().err
    assert _run(*args, "--lora-rank", "2", "--lora-targets", "mlp") == 1
    assert "--lora-targets must name some of experts, attention, router" in capsys.readouterr().err
    assert _run(*args, "--dtype", "float8") == 1
    assert "--dtype must be one of float32, bfloat16" in capsys.readouterr().err
    (tmp_path / "bad.jsonl").write_text('{"text": "a"}\nnot json\n')
    assert _run(*args, "--data", str(tmp_path / "bad.jsonl")) == 1
    assert "bad.jsonl line 2: not JSON" in capsys.readouterr().err


def test_router_bias_update_balances_and_resumes(saved, tmp_path, capsys):
    """--router-bias-update: DeepSeek-V3's correction biases move by the sign rule after every
    step, are checkpointed (bitwise resume) and saved in the fine-tuned model; with LoRA
    (an adapter cannot carry buffers) and on a model whose routers have no correction bias it
    is refused in one line."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_model("deepseek_v3", vocab_size=256).save_pretrained(tmp_path / "dsv3")
    common = [
        *_common(saved, "qwen3_moe", tmp_path / "a", steps=4),
        "--model",
        str(tmp_path / "dsv3"),
    ]
    lora = ["--router-bias-update", "0.01"]

    def biases(run: str) -> dict:
        tensors = load_file(tmp_path / run / "final" / "model.safetensors")
        return {k: v for k, v in tensors.items() if k.endswith("e_score_correction_bias")}

    assert _run(*common, *lora) == 0
    first = biases("a")
    assert first and all(b.abs().max() > 0 for b in first.values())  # moved from zero
    assert all(b.abs().max() <= 0.04 + 1e-6 for b in first.values())  # 4 steps of 0.01
    resumed = [
        *_common(saved, "qwen3_moe", tmp_path / "b", steps=2),
        "--model",
        str(tmp_path / "dsv3"),
    ]
    assert _run(*resumed, *lora) == 0
    resumed[resumed.index("--steps") + 1] = "4"
    assert _run(*resumed, *lora, "--resume") == 0
    again = biases("b")
    assert all(torch.equal(again[k], first[k]) for k in first)
    assert _run(*common, "--lora-rank", "2", "--router-bias-update", "0.01") == 1
    assert "a PEFT adapter cannot carry the routers' correction biases" in capsys.readouterr().err
    assert _run(*_common(saved, "qwen3_moe", tmp_path / "c", steps=1), "--router-bias-update") == 1
    assert "no router of this model chooses with a correction bias" in capsys.readouterr().err


def test_moekit_aux_loss_trains_the_routers_on_their_own_choices(saved, tmp_path):
    """--aux-loss moekit: the Switch loss over the step's router logits and the experts the
    routers chose (`moekit.hf.aux.switch_loss`), transformers' own off; it reaches the routers."""
    from moekit.hf.finetune import FinetuneJob
    from moekit.train.loop import Loop

    cfg = _config(saved, tmp_path, aux_loss="moekit", aux_loss_coef=1.0, lr=1e-2)
    tuner = Loop(FinetuneJob(cfg))
    gate = next(p for n, p in tuner.job.model.named_parameters() if n.endswith("mlp.gate.weight"))
    before = gate.detach().clone()
    metrics = tuner.train_step()
    assert 1.0 <= metrics["aux_loss"] <= 8.0  # E * sum f P: 1 when balanced, at most E
    assert not torch.equal(gate, before)


def test_transformers_aux_loss_agrees_with_the_routers_choices_where_softmax_routes():
    """transformers' aux loss recomputes the choice as a softmax top-k of the logits: equal to
    the routers' own choices for softmax routers, not where a correction bias routes (docs)."""
    from moekit.hf.aux import aux_loss_agreement

    for family, agrees in (("qwen3_moe", True), ("mixtral", True), ("minimax_m2", False)):
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            theirs, ours = aux_loss_agreement(tiny_model(family).train())
        assert (abs(theirs - ours) <= 1e-5 * ours) is agrees, family


def test_family_aux_loss_of_a_padded_batch_counts_its_real_tokens_only():
    """`family_aux`: the family's own loss times its coefficient; with padding the forward was
    not told of, the loss of the real tokens' router logits alone (transformers' unmasked
    formula on those rows) and its gradient, also through a PeftModel."""
    from transformers.models.qwen3_moe import modeling_qwen3_moe

    from moekit.hf.aux import family_aux

    torch.manual_seed(0)
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        model = tiny_model("qwen3_moe")
    model.config.output_router_logits, model.config.router_aux_loss_coef = True, 0.25
    ids = torch.randint(0, model.config.vocab_size, (3, 7))  # [b, T]
    mask = torch.ones_like(ids)
    out = model(input_ids=ids, attention_mask=mask)
    assert torch.equal(family_aux(model, out, mask), 0.25 * out.aux_loss)
    mask[0, 5:], mask[2, 2:] = 0, 0  # padding, the forward not told (packed rows' tails)
    out = model(input_ids=ids)
    real = mask.reshape(-1).bool()  # [N]
    config = model.config
    expected = modeling_qwen3_moe.load_balancing_loss_func(
        tuple(layer[real] for layer in out.router_logits),
        config.num_experts,
        config.num_experts_per_tok,
    )
    assert not torch.allclose(expected, out.aux_loss)  # the padding would have counted
    aux = family_aux(model, out, mask)
    torch.testing.assert_close(aux, 0.25 * expected)
    gate = model.model.layers[0].mlp.gate.weight
    (grad,) = torch.autograd.grad(aux, gate, retain_graph=True)  # it trains the routers
    (want,) = torch.autograd.grad(0.25 * expected, gate)
    assert grad.abs().sum() > 0
    torch.testing.assert_close(grad, want)
    lora = peft.get_peft_model(model, peft.LoraConfig(r=2, target_modules=["q_proj"]))
    torch.testing.assert_close(family_aux(lora, out, mask), 0.25 * expected)
    assert family_aux(model, model(input_ids=ids, output_router_logits=False), mask) is None


def test_a_dense_model_fine_tunes_anyway_and_says_so(saved, tmp_path, caplog, capsys):
    from transformers import LlamaConfig, LlamaForCausalLM

    config = LlamaConfig(
        vocab_size=256,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=1,
        num_attention_heads=4,
        num_key_value_heads=4,
    )
    LlamaForCausalLM(config).save_pretrained(tmp_path / "dense")
    args = [
        *_common(saved, "qwen3_moe", tmp_path / "run", steps=1),
        "--model",
        str(tmp_path / "dense"),
    ]
    with caplog.at_level("WARNING"):
        assert _run(*args, "--lora-rank", "2", "--lora-targets", "attention") == 0
    assert "has no MoE blocks: fine-tuning it anyway" in caplog.text
    assert (tmp_path / "run" / "final" / "adapter_config.json").is_file()
    args[args.index("--out") + 1] = str(tmp_path / "other")
    assert _run(*args, "--lora-rank", "2", "--lora-targets", "experts,router") == 1
    assert "--lora-targets experts,router names nothing in this model" in capsys.readouterr().err


def test_bfloat16_fine_tunes(saved, tmp_path):
    out = tmp_path / "run"
    assert (
        _run(*_common(saved, "qwen3_moe", out, steps=1), "--lora-rank", "2", "--dtype", "bfloat16")
        == 0
    )
    tensors = load_file(out / "final" / "adapter_model.safetensors")
    assert all(torch.isfinite(t.float()).all() for t in tensors.values())


def test_a_missing_model_is_one_clear_line(saved, tmp_path, capsys):
    args = _common(saved, "qwen3_moe", tmp_path / "run", steps=1)
    assert _run(*args, "--model", str(tmp_path / "missing" / "deeper" / "dir")) == 1
    assert "neither a model directory nor a hub id" in capsys.readouterr().err


def test_resume_after_kill_9_is_bitwise(saved, tmp_path):
    """A run killed with SIGKILL mid-way resumes from its newest complete checkpoint and ends
    where an uninterrupted run ends, bit for bit (checkpoints are written atomically)."""
    import os
    import signal
    import time

    def args(out: Path) -> list[str]:
        common = _common(saved, "qwen3_moe", out, steps=30)
        common[common.index("--eval-interval") + 1] = "5"
        flags = ["--lora-rank", "2", "--save-every", "5"]
        return ["finetune", "--no-progress", "--no-track", *common, *flags]

    straight, killed = tmp_path / "straight", tmp_path / "killed"
    assert main(args(straight)) == 0
    process = subprocess.Popen(
        [sys.executable, "-m", "moekit", *args(killed)],
        stdout=subprocess.DEVNULL,
        stderr=subprocess.DEVNULL,
    )
    deadline = time.monotonic() + 120
    while not (killed / "ckpt-00000010").exists() and process.poll() is None:
        assert time.monotonic() < deadline, "no checkpoint within 120 s"
        time.sleep(0.02)
    if process.poll() is None:
        os.kill(process.pid, signal.SIGKILL)
    process.wait(timeout=60)
    assert process.returncode == -9, "the run ended before the kill"
    assert main([*args(killed), "--resume"]) == 0
    a = load_file(straight / "final" / "adapter_model.safetensors")
    b = load_file(killed / "final" / "adapter_model.safetensors")
    assert a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


@pytest.mark.parametrize("lora", [True, False])
def test_routing_drift_is_measured_plotted_and_warned(saved, tmp_path, caplog, lora):
    """Each evaluation logs, per MoE layer, the overlap of the routing with the base model's
    on the calibration batch (1.0 before the first step: the base itself); training the
    routers hard moves it below 1, which --drift-warn names; the plot is written. A LoRA
    run's base is the model with its adapter disabled, a full run's the routes it took before
    its first step (kept for a resume, which measures against the same base)."""
    from moekit.hf.finetune import finetune

    train = dict(steps=4, eval_interval=2, eval_batches=1, lr=0.2, drift_warn=0.999)
    if lora:
        train |= dict(lora_rank=4, lora_targets=("experts", "router"))
    with caplog.at_level("WARNING"):
        result = finetune(_config(saved, tmp_path, **train))
    evals = result.evals
    assert [e["step"] for e in evals] == [0, 2, 4]
    layers = [k for k in evals[0] if k.startswith("layer") and k.endswith("_routing_overlap")]
    assert len(layers) == 2  # the tiny model's MoE layers
    assert all(evals[0][k] == 1.0 for k in layers) and evals[0]["routing_overlap"] == 1.0
    assert evals[-1]["routing_overlap"] < 1.0
    assert "routing drift: MoE layer" in caplog.text
    out = tmp_path / "run"
    assert (out / "routing_overlap.png").stat().st_size > 0
    if not lora:  # resumed: the same base, not the resumed model
        assert (out / "routing_base" / "rank0.pt").is_file()
        again = finetune(_config(saved, tmp_path, **(train | dict(steps=6))), resume=True)
        assert again.evals[-1]["step"] == 6 and again.evals[-1]["routing_overlap"] < 1.0
        state = json.loads((out / "ckpt-00000004" / "state.json").read_text())
        kept = state["loop"]["evals"][-1]["routing_overlap"]
        assert kept == pytest.approx(evals[-1]["routing_overlap"])
