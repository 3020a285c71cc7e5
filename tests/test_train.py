"""Training, checkpoints, resume, crash safety and the CLI on the tiny preset.

Oracles: an uninterrupted run for every resumed one (bitwise equal losses and weights); the
manifest's hashes for corrupt checkpoints; the seed's loss going down.
"""

from __future__ import annotations

import json
import math
import random
import re
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch

from moekit.cli import main
from moekit.lm.config import build_config
from moekit.lm.train import LMJob, NonFiniteError, train
from moekit.train import files as ckpt
from moekit.train.loop import Loop

CORPUS = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt")


def cfg_for(out: Path, **kw):
    base = dict(
        data=CORPUS,
        out=str(out),
        track=False,
        progress=False,
        steps=30,
        save_every=10,
        eval_interval=10,
        eval_batches=2,
        sample_tokens=8,
    )
    return build_config("tiny", None, **(base | kw))


def weights(path: Path) -> dict[str, torch.Tensor]:
    return ckpt.load_checkpoint(path).model


def assert_same_weights(a: Path, b: Path) -> None:
    wa, wb = weights(a), weights(b)
    assert wa.keys() == wb.keys()
    for name in wa:
        assert torch.equal(wa[name], wb[name]), name


@pytest.fixture(scope="module")
def reference_run(tmp_path_factory):
    """The uninterrupted 30-step run every interrupted run must reproduce."""
    out = tmp_path_factory.mktemp("reference")
    return train(cfg_for(out))


def test_tiny_training_lowers_the_loss(reference_run):
    evals = reference_run.evals
    assert evals[-1]["val_loss"] < evals[0]["val_loss"] - 0.5
    assert sum(reference_run.train_losses[-5:]) < sum(reference_run.train_losses[:5])
    assert [e["step"] for e in evals] == [0, 10, 20, 30]
    assert len(reference_run.train_losses) == 30
    out = reference_run.out
    assert {p.name for p in ckpt.list_checkpoints(out)} == {
        "ckpt-00000020",
        "ckpt-00000030",
    }  # keep 2
    assert (out / "loss.png").stat().st_size > 0 and (out / "expert_load.png").stat().st_size > 0


def test_save_load_resume_is_bitwise(tmp_path, reference_run):
    first = train(cfg_for(tmp_path, steps=20))
    assert first.step == 20
    resumed = train(cfg_for(tmp_path), resume=True)
    assert resumed.train_losses == reference_run.train_losses
    assert_same_weights(resumed.checkpoint, reference_run.checkpoint)


SCRIPT = textwrap.dedent(
    """
    import os, signal, sys
    from moekit.lm import train
    from moekit.train import files as checkpoint, loop
    from moekit.lm.config import build_config
    mode, at = sys.argv[1], int(sys.argv[2])
    cfg = build_config("tiny", None, data=sys.argv[3], out=sys.argv[4], track=False, progress=False,
                       steps=30, save_every=10, eval_interval=10, eval_batches=2, sample_tokens=8)
    if mode == "step":  # SIGKILL when step `at` begins
        original = loop.Loop.train_step
        def step(self):
            if self.step == at:
                os.kill(os.getpid(), signal.SIGKILL)
            return original(self)
        loop.Loop.train_step = step
    else:  # SIGKILL in the middle of a checkpoint write: files written, not yet published
        calls = {"n": 0}
        original = checkpoint._fsync
        def fsync(path):
            calls["n"] += 1
            if calls["n"] == at:
                os.kill(os.getpid(), signal.SIGKILL)
            original(path)
        checkpoint._fsync = fsync
    train.train(cfg)
    """
)


@pytest.mark.parametrize("mode", ["step", "write"])
def test_kill_9_then_resume_is_bitwise(tmp_path, reference_run, mode):
    # a random step in 1..29, or a random fsync of the second checkpoint's write (calls 6..10)
    at = random.randint(1, 29) if mode == "step" else random.randint(6, 10)
    script = tmp_path / "crash.py"
    script.write_text(SCRIPT)
    proc = subprocess.run(
        [sys.executable, str(script), mode, str(at), CORPUS, str(tmp_path / "run")],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert proc.returncode == -9, f"{mode} {at}: {proc.stderr[-2000:]}"
    resumed = train(cfg_for(tmp_path / "run"), resume=True)
    assert resumed.train_losses == reference_run.train_losses, f"killed at {mode} {at}"
    assert_same_weights(resumed.checkpoint, reference_run.checkpoint)


@pytest.mark.parametrize("damage", ["truncate", "bitflip", "manifest"])
def test_corrupt_checkpoint_is_refused_and_previous_used(tmp_path, damage):
    run = train(cfg_for(tmp_path, steps=20))
    newest, older = ckpt.list_checkpoints(tmp_path)[-1], ckpt.list_checkpoints(tmp_path)[0]
    if damage == "truncate":
        target = newest / "model.safetensors"
        target.write_bytes(target.read_bytes()[:1000])
    elif damage == "bitflip":
        target = newest / "optimizer.safetensors"
        data = bytearray(target.read_bytes())
        data[len(data) // 2] ^= 0x10
        target.write_bytes(bytes(data))
    else:
        (newest / "manifest.json").write_text("{not json")
    with pytest.raises(ckpt.CheckpointError, match=str(newest.name)):
        ckpt.load_checkpoint(newest)
    assert ckpt.latest_checkpoint(tmp_path).path == older
    assert run.step == 20
    resumed = Loop(LMJob(cfg_for(tmp_path), resume=True))
    assert resumed.step == 10  # continued from the older, intact checkpoint
    assert main(["generate", "--checkpoint", str(newest)]) == 1  # a clear error, not a traceback


def test_non_finite_loss_stops_before_the_optimizer(tmp_path, monkeypatch):
    job = LMJob(cfg_for(tmp_path, steps=12))
    trainer = Loop(job)
    original = type(job.model).forward

    def poisoned(self, idx, targets=None, cache=None):
        logits, loss = original(self, idx, targets, cache)
        if targets is not None and self.training and trainer.step == 11:
            loss = loss * float("nan")
        return logits, loss

    monkeypatch.setattr(type(job.model), "forward", poisoned)
    before = {}

    def snapshot_then_step(step=trainer.train_step):
        if trainer.step == 11:
            before.update({k: v.clone() for k, v in job.model.state_dict().items()})
        return step()

    trainer.train_step = snapshot_then_step
    with pytest.raises(NonFiniteError, match="step 11"):
        trainer.run()
    for name, value in job.model.state_dict().items():
        assert torch.equal(value, before[name]), name
    kept = ckpt.latest_checkpoint(tmp_path)
    assert kept is not None and kept.step == 10


def test_cli_train_generate_eval_in_process(tmp_path, capsys):
    out = tmp_path / "cli"
    args = f"train --preset tiny --data {CORPUS} --out {out} --max-iters 6 --eval-interval 3 --eval-iters 2 --no-track --no-progress --n-layer 1".split()
    assert main(args) == 0
    assert "step 3: train loss" in capsys.readouterr().out
    assert json.loads((out / "config.json").read_text())["model"]["n_layer"] == 1
    assert (
        main(
            [
                "generate",
                "--checkpoint",
                str(out),
                "--prompt",
                "ROMEO:",
                "--max-new-tokens",
                "12",
                "--seed",
                "3",
            ]
        )
        == 0
    )
    text = capsys.readouterr().out
    assert text.startswith("ROMEO:") and len(text.rstrip("\n")) == len("ROMEO:") + 12
    assert main(["eval", "--checkpoint", str(out), "--eval-iters", "2"]) == 0
    assert "perplexity" in capsys.readouterr().out
    fresh = str(tmp_path / "fresh")
    assert (
        main(["train", "--preset", "tiny", "--data", str(tmp_path / "none.txt"), "--out", fresh])
        == 1
    )
    assert "--data" in capsys.readouterr().err
    # an OUT holding a run: refused without --resume or --overwrite, its checkpoint kept
    again = ["train", "--preset", "tiny", "--data", CORPUS, "--out", str(out), "--no-track"]
    assert main(again) == 1
    assert "holds a run (ckpt-00000006): pass --resume" in capsys.readouterr().err
    assert [p.name for p in ckpt.list_checkpoints(out)] == ["ckpt-00000006"]


def test_installed_command_trains_with_mlflow_and_plots(tmp_path):
    out = tmp_path / "tracked"
    cmd = f"moekit train --preset tiny --data {CORPUS} --out {out} --max-iters 4 --eval-interval 2 --eval-iters 1 --no-progress".split()
    proc = subprocess.run(cmd, capture_output=True, text=True, timeout=300)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert (out / "mlflow.db").exists() and (out / "loss.png").exists()
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["moekit"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert {"train_loss", "val_loss", "layer0_expert0_load", "layer1_router_entropy"} <= set(
        runs[0].data.metrics
    )
    assert runs[0].data.params["batch_size"] == "8"
    client = mlflow.MlflowClient()
    history = client.get_metric_history(runs[0].info.run_id, "loss")  # every step, batched
    assert [m.step for m in sorted(history, key=lambda m: m.step)] == [1, 2, 3, 4]
    assert all(math.isfinite(m.value) for m in history)
    assert len(client.get_metric_history(runs[0].info.run_id, "learning_rate")) == 4
    artifacts = {a.path for a in mlflow.MlflowClient().list_artifacts(runs[0].info.run_id)}
    assert {"loss.png", "expert_load.png", "config.json", "samples.txt"} <= artifacts


def test_learning_rate_schedule():
    from moekit.train.config import learning_rate

    cfg = build_config(
        "tiny",
        None,
        learning_rate=1e-3,  # the old name: an alias
        min_lr=1e-4,
        warmup_steps=10,
        steps=110,
        schedule="cosine",
    )
    assert learning_rate(cfg, 0, 110) == pytest.approx(1e-4)  # warmup: (step + 1) / warmup
    assert learning_rate(cfg, 9, 110) == pytest.approx(1e-3)
    assert learning_rate(cfg, 60, 110) == pytest.approx(5.5e-4)  # half way down the cosine
    assert learning_rate(cfg, 110, 110) == pytest.approx(1e-4)
    linear = build_config("tiny", None, lr=1e-3, min_lr=0.0, steps=100, schedule="linear")
    assert learning_rate(linear, 50, 100) == pytest.approx(5e-4)
    assert learning_rate(linear, 100, 100) == 0.0
    constant = build_config("tiny", None, lr=2e-3)
    assert learning_rate(constant, 0, 60) == learning_rate(constant, 50, 60) == 2e-3


def test_bf16_autocast_training_runs(tmp_path):
    result = train(cfg_for(tmp_path, dtype="bfloat16", steps=12, eval_interval=6, sample_tokens=0))
    assert all(torch.isfinite(torch.tensor(result.train_losses)))
    assert result.evals[-1]["val_loss"] < result.evals[0]["val_loss"]


def test_bf16_without_a_native_gemm_warns(tmp_path, monkeypatch, caplog):
    import moekit.lm.train as train_module

    monkeypatch.setattr(train_module, "fast_bfloat16", lambda device: False)
    with caplog.at_level("WARNING", logger="moekit.lm.train"):
        LMJob(cfg_for(tmp_path / "bf16", dtype="bfloat16"))
        assert "--dtype bfloat16" in caplog.text and "native bf16 GEMM" in caplog.text
        caplog.clear()
        LMJob(cfg_for(tmp_path / "fp32"))
        assert not caplog.text


def test_estimate_loss_equals_makemoe_per_batch_loop(tmp_path):
    """Chunked evaluation = makeMoE's loop: the mean over `eval_iters` separate batch losses."""
    trainer = LMJob(cfg_for(tmp_path, eval_batches=11))  # 11: a partial last chunk
    trainer.step = 7
    got = trainer.estimate_loss()
    gen = torch.Generator().manual_seed(trainer.cfg.seed * 1_000_003 + trainer.step)
    trainer.model.eval()
    with torch.no_grad():
        for split in ("train", "val"):
            batches = [trainer.data.batch(split, 8, 16, gen) for _ in range(11)]
            losses = [trainer.model(*batch)[1].item() for batch in batches]
            assert got[split] == pytest.approx(sum(losses) / 11, rel=1e-5)


@pytest.mark.parametrize(
    "flags,toml,match",
    [
        (["--device", "cuda"], None, "--device cuda: this torch"),
        (["--out", "{tmp}/file/run"], None, "--out .*cannot create the run directory"),
        ([], 'max_iters = "ten"', r"steps must be int, got str 'ten'"),
        ([], "[model]\ndropout = true", "dropout must be float, got bool"),
        ([], "model = 3", "model must be a table"),
        (["--expert-parallel", "2"], None, "needs 2 or more processes: launch with torchrun"),
        (["--dist-timeout", "0"], None, "--dist-timeout must be > 0 seconds"),
        (["--grad-accum", "3"], None, "--grad-accum 3 must divide --batch-size 8"),
        ([], "no_such_key = 1", "no_such_key is no flag of this command"),
        (["--out", "{tmp}/file"], None, "--out .*file: is a file, not a run directory"),
    ],
)
def test_bad_train_inputs_get_one_line_errors(tmp_path, capsys, monkeypatch, flags, toml, match):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    (tmp_path / "file").write_text("a file where a directory should be")
    args = ["train", "--preset", "tiny", "--data", CORPUS, "--out", str(tmp_path / "run")]
    args += ["--no-track", "--no-progress", "--max-iters", "1"]
    args += [flag.format(tmp=tmp_path) for flag in flags]
    if toml is not None:
        (tmp_path / "run.toml").write_text(toml)
        args += ["--config", str(tmp_path / "run.toml")]
    assert main(args) == 1
    err = capsys.readouterr().err
    assert err.startswith("moekit train: error:") and err.count("\n") == 1, err
    assert re.search(match, err), err


def test_compiled_training_follows_eager(tmp_path):
    """--compile: the same losses as eager (dropout 0, no routing noise: no RNG in the step)."""
    kw = dict(steps=6, eval_interval=100, sample_tokens=0, save_every=0, dropout=0.0)
    kw |= dict(router="softmax")
    eager = train(cfg_for(tmp_path / "eager", **kw))
    torch._dynamo.reset()
    compiled = train(cfg_for(tmp_path / "compiled", compile=True, **kw))
    assert compiled.train_losses == pytest.approx(eager.train_losses, rel=1e-4, abs=1e-4)


def test_a_rank_reads_only_its_rows_of_the_optimizer_state(tmp_path):
    """`Checkpoint.optimizer_slices`: an expert shard's Adam moments cut to its rows from the
    file (each expert-parallel rank reads its part); scalars and other parameters whole."""
    from moekit.train.files import load_checkpoint, save_checkpoint

    experts, dense = torch.nn.Parameter(torch.randn(4, 3)), torch.nn.Parameter(torch.randn(5))
    optimizer = torch.optim.AdamW([experts, dense])
    (experts.sum() + dense.sum()).backward()
    optimizer.step()
    path = save_checkpoint(tmp_path, 1, {"w": experts.detach()}, optimizer.state_dict(), {})
    saved = load_checkpoint(path)
    whole, mine = saved.optimizer, saved.optimizer_slices({0: slice(2, 4)})
    for key in ("exp_avg", "exp_avg_sq"):
        torch.testing.assert_close(mine["state"][0][key], whole["state"][0][key][2:4])
        torch.testing.assert_close(mine["state"][1][key], whole["state"][1][key])
    assert mine["state"][0]["step"] == whole["state"][0]["step"] == 1
    assert mine["param_groups"] == whole["param_groups"]


def test_activation_checkpointing_and_grad_accum_keep_the_losses(tmp_path):
    """--activation-checkpointing recomputes each block (the same noise draws) and
    --grad-accum splits the batch: the same training losses as the plain run."""
    kw = dict(steps=4, eval_interval=100, sample_tokens=0, save_every=0)
    plain = train(cfg_for(tmp_path / "plain", **kw))
    recomputed = train(cfg_for(tmp_path / "ckpt", activation_checkpointing=True, **kw))
    assert recomputed.train_losses == pytest.approx(plain.train_losses, rel=1e-6)
    kw |= dict(dropout=0.0, router="softmax")  # no random draws whose shapes differ
    accumulated = train(cfg_for(tmp_path / "accum", grad_accum=4, **kw))
    reference = train(cfg_for(tmp_path / "ref", **kw))
    assert accumulated.train_losses[0] == pytest.approx(reference.train_losses[0], rel=1e-6)
    # later steps differ by the auxiliary loss alone, a mean over the micro-batches
    assert accumulated.train_losses == pytest.approx(reference.train_losses, rel=1e-2)


def test_epochs_set_the_number_of_steps(tmp_path):
    """--epochs E: E passes over the training split's tokens (windows of B x T a step)."""
    from moekit.train.loop import total_steps

    job = LMJob(cfg_for(tmp_path, epochs=0.01))
    tokens = len(job.data.train)
    assert total_steps(job.cfg, job) == math.ceil(0.01 * (tokens // (8 * 16)))


def test_a_checkpoint_from_before_the_shared_runtime_is_refused_with_why(tmp_path, capsys):
    """A run directory written by the old trainer (no loop state) is refused on --resume with
    one line saying why; `moekit generate` still reads it."""
    run = train(cfg_for(tmp_path, steps=2, save_every=0))
    path = run.checkpoint
    state = json.loads((path / "state.json").read_text())
    loop = state.pop("loop")
    state["history"] = {"evals": loop["evals"], "train_losses": loop["train_losses"]}
    groups = state.pop("param_groups")
    model = ckpt.load_checkpoint(path).model
    optimizer = ckpt.load_checkpoint(path).optimizer
    ckpt.save_checkpoint(tmp_path, 2, model, optimizer | {"param_groups": groups}, state)
    flags = ["--data", CORPUS, "--out", str(tmp_path), "--no-track", "--no-progress"]
    assert main(["train", "--preset", "tiny", *flags, "--steps", "4", "--resume"]) == 1
    err = capsys.readouterr().err
    assert "written by an older moekit train" in err and err.count("\n") == 1, err
    assert main(["generate", "--checkpoint", str(tmp_path), "--max-new-tokens", "4"]) == 0
