"""Training under torchrun: 2 ranks equal one process, checkpoints move between EP sizes, and a
dead or hung rank fails the others instead of hanging them.

Oracle: the single-process run of the same config (20 steps, dropout 0, a deterministic router);
weights compared to 1e-4 relative (fp32, different summation order across ranks).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

from moekit.lm.config import build_config
from moekit.lm.inference import load_model
from moekit.lm.train import train
from moekit.train import files as ckpt
from spawn import rank_0_of

pytestmark = pytest.mark.distributed

CORPUS = str(Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt")
JOB = str(Path(__file__).with_name("ep_train_job.py"))
TIMEOUT_S = 300  # a whole torchrun job; the process-group timeout inside is far shorter


def config(out: Path, **kw) -> dict:
    return (
        dict(
            data=CORPUS,
            out=str(out),
            track=False,
            progress=False,
            steps=20,
            save_every=10,
            eval_interval=10,
            eval_batches=2,
            sample_tokens=8,
            dropout=0.0,
            router="softmax",
            dist_timeout=30.0,
        )
        | kw
    )


def torchrun(nproc: int, cfg: dict, *extra: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", JOB, json.dumps(cfg), *extra]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def assert_close_weights(a: Path, b: Path, rtol: float = 1e-4) -> None:
    wa, wb = ckpt.load_checkpoint(a).model, ckpt.load_checkpoint(b).model
    assert wa.keys() == wb.keys()
    for name in wb:
        assert wa[name].shape == wb[name].shape, name
        err = (wa[name] - wb[name]).norm() / wb[name].norm().clamp_min(1e-12)
        assert err <= rtol, f"{name}: relative error {err:.2e}"


@pytest.fixture(scope="module")
def single(tmp_path_factory):
    """The single-process run every distributed run must follow."""
    return train(build_config("tiny", None, **config(tmp_path_factory.mktemp("single"))))


@pytest.fixture(scope="module")
def ep2(tmp_path_factory):
    """2 ranks, experts split in two (EP 2), logits of the trained model on a fixed batch."""
    out = tmp_path_factory.mktemp("ep2")
    torchrun(2, config(out, expert_parallel=2), "--logits", str(out / "logits.pt"))
    return out


def test_two_ranks_train_like_one_process(ep2, single):
    final = ckpt.load_checkpoint(ep2 / "ckpt-00000020")
    assert_close_weights(final.path, single.checkpoint)
    losses = final.state["loop"]["train_losses"]
    torch.testing.assert_close(torch.tensor(losses), torch.tensor(single.train_losses))
    evals = final.state["loop"]["evals"]
    assert [e["step"] for e in evals] == [e["step"] for e in single.evals]
    for got, want in zip(evals, single.evals, strict=True):
        assert got["val_loss"] == pytest.approx(want["val_loss"], rel=1e-5)
    # the expert load is counted over all ranks' tokens: the single process's history
    want = ckpt.load_checkpoint(single.checkpoint).state["loop"]["health"]["history"]
    got = final.state["loop"]["health"]["history"]
    assert [e["step"] for e in got] == [e["step"] for e in want]
    torch.testing.assert_close(torch.tensor(got[-1]["load"]), torch.tensor(want[-1]["load"]))


def test_ep_checkpoint_loads_in_one_process_with_equal_logits(ep2):
    saved = torch.load(ep2 / "logits.pt")
    loaded = load_model(ep2)
    assert loaded.model.blocks[0].moe.experts.w1.shape[0] == 4  # every expert, one process
    with torch.no_grad():
        logits = loaded.model(saved["idx"])[0]
    torch.testing.assert_close(logits, saved["logits"], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("nproc,ep", [(4, 4), (1, 1), (4, 2), (2, 1)])
def test_resume_at_another_ep_size(tmp_path, ep2, single, nproc, ep):
    """The EP 2 run's step-10 checkpoint continues at EP 4, in one process, at 2 x EP 2, and
    data-parallel on 2 ranks (every expert on each)."""
    (tmp_path / "ckpt-00000010").symlink_to(ep2 / "ckpt-00000010", target_is_directory=True)
    cfg = config(tmp_path, expert_parallel=ep)
    if nproc == 1:
        result = train(build_config("tiny", None, **cfg), resume=True)
        assert result.step == 20
    else:
        torchrun(nproc, cfg, "--resume")
    assert_close_weights(tmp_path / "ckpt-00000020", single.checkpoint)


@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_dead_or_hung_rank_fails_the_others_then_resume(tmp_path, ep2, fault):
    timeout = 8.0
    cfg = config(tmp_path, expert_parallel=2, save_every=4, dist_timeout=timeout)
    # as torchrun would: one thread per rank (the EP 2 run it is compared with bitwise ran so)
    argv = [JOB, json.dumps(cfg), "--fault", fault, "--at", "6"]
    code, err = rank_0_of(argv, 2, TIMEOUT_S)
    assert code != 0
    assert "rank 0 of 2, step 6" in err and "another rank died or hung" in err, err[-3000:]
    assert [p.name for p in ckpt.list_checkpoints(tmp_path)] == ["ckpt-00000004"]
    ckpt.verify(tmp_path / "ckpt-00000004")
    torchrun(2, config(tmp_path, expert_parallel=2), "--resume")
    # the same EP size resumes bitwise: the uninterrupted EP 2 run's weights and losses
    resumed, uninterrupted = (ckpt.load_checkpoint(p / "ckpt-00000020") for p in (tmp_path, ep2))
    for name, value in uninterrupted.model.items():
        assert torch.equal(resumed.model[name], value), name
    history = [c.state["loop"]["train_losses"] for c in (resumed, uninterrupted)]
    assert history[0] == history[1]


def _torchrun_cli(nproc: int, *args: str) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", "--standalone"]
    cmd += [f"--nproc-per-node={nproc}", "-m", "moekit", "train", "--preset", "tiny"]
    cmd += ["--data", CORPUS, *args]
    return subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)


def test_torchrun_cli_rank_0_alone_prints_tracks_and_plots(tmp_path):
    out = tmp_path / "run"
    done = _torchrun_cli(
        2,
        "--out",
        str(out),
        "--expert-parallel",
        "2",
        "--max-iters",
        "4",
        "--eval-interval",
        "2",
        "--eval-iters",
        "2",
        "--no-progress",
        "--dist-timeout",  # rank 0's MLflow setup and plots take longer: not a step's wait
        "2",
    )
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("moekit train: preset tiny") == 1
    assert done.stdout.count("step 2: train loss") == 1
    assert (out / "loss.png").exists() and (out / "expert_load.png").exists()
    assert (out / "samples.txt").read_text().count("--- step 2") == 1
    import mlflow

    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["moekit"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["expert_parallel"] == "2"


def test_torchrun_cli_batch_not_divisible_by_ranks(tmp_path):
    done = _torchrun_cli(2, "--out", str(tmp_path), "--batch-size", "7", "--no-track")
    assert done.returncode != 0
    assert "--batch-size 7 must be divisible by the number of ranks 2" in done.stderr


_FREED = """
import gc, weakref
import torch, torch.distributed as dist
from moekit.parallel import expert_parallel
from moekit.parallel.training import end_distributed, init_distributed
from moekit import MoE

gc.disable()  # what end_distributed frees, it frees itself
topo = init_distributed(2, "cpu", timeout_s=60.0)
import transformers.integrations.moe  # imports torch._dynamo, and it torch.distributed.nn
layer = expert_parallel(MoE(8, 4, 2, 16), topo.ep_group)
layer.cycle = layer  # a finished run's model: garbage only a collection frees
layer(torch.randn(2, 5, 8)).output.sum().backward()  # exchanges of tensors Python made
groups = [dist.group.WORLD, topo.ep_group, topo.data_group, topo.control_group]
refs = [weakref.ref(g) for g in groups]
del groups, topo, layer
dist.barrier()
end_distributed()
alive = [i for i, r in enumerate(refs) if r() is not None]
assert not alive, f"groups {alive} (world, ep, data, control) alive after end_distributed"
"""


@pytest.mark.distributed
def test_end_distributed_frees_every_group_of_a_run():
    """Each group `init_distributed` makes is freed (its gloo threads joined) by
    `end_distributed`, though transformers imports torch.distributed.nn after it and a model
    in a reference cycle holds the expert-parallel group: a group held past it kept threads
    that, releasing a finished all-to-all's tensors while Python shut down, aborted a rank
    that had succeeded (3 two-rank loads in 120 here)."""
    rc, err = rank_0_of(["-c", _FREED], 2, TIMEOUT_S)
    assert rc == 0, err[-3000:]
