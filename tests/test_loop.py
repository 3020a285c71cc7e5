"""The shared training loop (`moekit.train.loop`) against a toy job (`loop_job.ToyJob`: masked
float64 linear regression, its own checkpoints): cadence and the run's result, bitwise resume,
a corrupt checkpoint skipped, the non-finite guard, one loss definition at any --grad-accum,
clipping, the schedule, a dead or hung rank, `check_batch`.

Oracles: an uninterrupted run for every resumed one (bitwise); the token losses of the global
batch summed by hand over its supervised count, and their gradient by autograd on a copy of
the model; torch's `clip_grad_norm_`; the schedules' formulas written out; the single-process
run for the two-rank one.
"""

from __future__ import annotations

import copy
import json
import logging
import math
from pathlib import Path

import pytest
import torch

from loop_job import ToyJob
from moekit.parallel.training import Topology
from moekit.train import files as ckpt
from moekit.train.config import RunConfig
from moekit.train.files import encode_bytes
from moekit.train.loop import Loop, NonFiniteError, check_batch, run, start_state
from spawn import rank_0_of

JOB = str(Path(__file__).with_name("loop_job.py"))
TIMEOUT_S = 120  # a whole two-rank run; the steps' collectives time out after 5 s


def config(out: Path, **kw) -> RunConfig:
    base = dict(
        out=str(out),
        steps=10,
        batch_size=8,
        lr=0.05,
        eval_interval=4,
        save_every=3,
        keep=10,
        track=False,
        progress=False,
        device="cpu",
    )
    return RunConfig(**(base | kw))


def weights(job: ToyJob) -> dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in job.model.state_dict().items()}


def assert_equal_weights(got: dict, want: dict) -> None:
    assert got.keys() == want.keys()
    for name in want:
        assert torch.equal(got[name], want[name]), name


def names(out: Path) -> list[str]:
    return [p.name for p in ckpt.list_checkpoints(out)]


def hand_step(job: ToyJob) -> tuple[float, list[torch.Tensor], torch.nn.Module]:
    """The loss of `job`'s next global batch (the sum of its token losses over the supervised
    tokens / their number) and the gradient of loss + aux, on a copy of the model; the job's
    streams do not move."""
    state = job.data_gen.get_state()
    x, y, mask = job.global_batch()  # [B, T, d], [B, T], [B, T]
    job.data_gen.set_state(state)
    twin = copy.deepcopy(job.model)
    loss = (twin(x).squeeze(-1) - y).square()[mask].sum() / mask.sum()
    (loss + job.aux_coef * twin.weight.square().sum()).backward()
    return loss.item(), [p.grad for p in twin.parameters()], twin


# --- 1. a run: the loss, cadence, checkpoints, result ---------------------------------------
def test_run_trains_with_its_cadence_and_result(tmp_path):
    out = tmp_path / "run"
    job = ToyJob(config(out))
    before = ToyJob(config(tmp_path / "fresh")).evaluate()  # the same seed: the same weights
    seen = []
    result = run(job, on_eval=seen.append)

    losses = result.train_losses
    assert len(losses) == 10 and all(math.isfinite(v) for v in losses)
    assert sum(losses[-3:]) < sum(losses[:3]) / 2
    # evaluations: before the first step, every eval_interval, after the last step
    assert [e["step"] for e in result.evals] == [0, 4, 8, 10]
    assert seen == result.evals
    assert result.evals[0] == {"step": 0, **before}
    val = [e["val_loss"] for e in result.evals]
    assert val == sorted(val, reverse=True) and val[-1] < val[0] / 2
    for record, (a, b) in zip(result.evals[1:], [(0, 4), (4, 8), (8, 10)], strict=True):
        assert record["train_loss"] == pytest.approx(sum(losses[a:b]) / (b - a), rel=1e-12)
        assert record["layer1_load_max_over_mean"] >= 1.0  # the job's router load, per layer
        assert not any("_expert" in key for key in record)
    # checkpoints: every save_every steps, and the final one
    assert job.saved == [3, 6, 9, 10]
    assert names(out) == [f"ckpt-{s:08d}" for s in (3, 6, 9, 10)]
    final = ckpt.load_checkpoint(out / "ckpt-00000010")
    loop = final.state["loop"]
    assert loop["step"] == 10 and loop["train_losses"] == losses and loop["evals"] == result.evals
    assert [e["step"] for e in loop["health"]["history"]] == [4, 8, 10]
    assert_equal_weights(final.model, weights(job))
    # the result, the job's final files and the reports
    assert (result.out, result.step, result.is_main) == (out, 10, True)
    assert result.checkpoint == out / "ckpt-00000010"
    assert result.final == [out / "final.pt"] and result.final[0].exists()
    for name in ("toy.json", "loss.png", "expert_load.png"):
        assert (out / name).exists(), name


def test_freed_host_memory_is_trimmed_after_loading_and_every_cpu_step(tmp_path, monkeypatch):
    import moekit.train.loop as loop_module

    calls = []
    monkeypatch.setattr(loop_module, "trim_host_memory", lambda *a: calls.append(a) or True)
    run(ToyJob(config(tmp_path / "run", steps=5, save_every=0)))
    # after loading whatever is free; after each step where much is (`_memory`)
    assert calls == [(), *[(loop_module.STEP_TRIM_BYTES,)] * 5]


_HOLES = """
import sys, torch
from moekit._memory import map_large_blocks
def anon():
    with open("/proc/self/status") as f:
        return next(int(l.split()[1]) / 1024 for l in f if l.startswith("RssAnon"))
if sys.argv[1] == "map":
    assert map_large_blocks()
start = anon()
torch.ones(2 * 2**20)  # an 8 MiB block, freed at once: glibc's own threshold rises to it
blocks = [torch.ones(2 * 2**20) for _ in range(64)]  # 8 MiB each, 512 MiB
del blocks[::2]  # every other one freed
print(anon() - start)
"""


@pytest.mark.parametrize("mapped", [False, True])
def test_large_blocks_mapped_on_their_own_leave_no_holes(mapped):
    """Freed 8 MiB blocks between live ones (256 MiB of each): kept in the heap by glibc's
    risen threshold, returned at once once `map_large_blocks` fixed it at 4 MiB."""
    import ctypes.util
    import subprocess
    import sys

    if not ctypes.util.find_library("c") or not Path("/proc/self/status").exists():
        pytest.skip("glibc and /proc: Linux only")
    argv = [sys.executable, "-c", _HOLES, "map" if mapped else "heap"]
    grown = float(subprocess.run(argv, capture_output=True, text=True, check=True).stdout)
    if mapped:
        assert 240 < grown < 300  # the live blocks alone
    else:
        assert grown > 256 + 192  # the live blocks and most of the holes


def test_trim_host_memory_hands_freed_heap_back():
    """Blocks freed between live ones stay in glibc's arenas until trimmed."""
    import ctypes.util
    import gc

    from moekit._memory import free_in_arenas, trim_host_memory

    if not ctypes.util.find_library("c") or not Path("/proc/self/status").exists():
        pytest.skip("glibc and /proc: Linux only")

    def anon_mb() -> float:
        status = Path("/proc/self/status").read_text().splitlines()
        return next(int(line.split()[1]) / 1024 for line in status if line.startswith("RssAnon"))

    blocks = [torch.ones(64 * 1024) for _ in range(2048)]  # 256 KiB each: 512 MiB, the heap
    del blocks[::2]  # every other one freed: holes between live blocks
    gc.collect()
    before = anon_mb()
    assert free_in_arenas() > 200 * 2**20
    assert not trim_host_memory(min_free=2**40)  # less free than asked for: kept
    assert anon_mb() > before - 16
    assert trim_host_memory()
    assert before - anon_mb() > 128  # most of the 256 MiB of holes returned
    del blocks


def test_epochs_set_the_steps_and_save_every_0_only_the_final_checkpoint(tmp_path):
    job = ToyJob(config(tmp_path, steps=100, epochs=1.5, save_every=0), epoch_steps=4)
    result = run(job)
    assert result.step == 6  # ceil(1.5 * 4)
    assert [e["step"] for e in result.evals] == [0, 4, 6]
    assert job.saved == [6] and names(tmp_path) == ["ckpt-00000006"]


def test_a_start_state_checkpoint_begins_a_new_run(tmp_path):
    """What `moekit upcycle` writes (`start_state` at step 0) runs as a fresh run would."""
    fresh = ToyJob(config(tmp_path / "fresh", steps=4))
    job_state = fresh.state()
    rng = encode_bytes(torch.get_rng_state())
    ckpt.save_checkpoint(
        tmp_path / "run",
        0,
        fresh.model.state_dict(),
        fresh.optimizer.state_dict(),
        {"loop": start_state(0, rng, job_state)},
    )
    want = run(fresh)
    got = run(ToyJob(config(tmp_path / "run", steps=4), resume=True))
    assert got.train_losses == want.train_losses
    assert got.evals == want.evals  # the evaluation at step 0 included


# --- 2. resume is bitwise ------------------------------------------------------------------
class Crash(Exception):
    """A process killed in the middle of a run."""


@pytest.mark.parametrize("how", ["interrupted", "extended"])
def test_resume_is_bitwise(tmp_path, how):
    """12 steps in one run == a run stopped after step 6 (its newest checkpoint at 4, or a
    6-step run) resumed by a new job. Dropout on the inputs draws from the global torch stream,
    the batches from the job's generator, AdamW keeps moments: all must come back."""
    kw = dict(steps=12, save_every=4, eval_interval=5, warmup_steps=2, schedule="cosine")
    if how == "extended":  # a 6-step run's schedule would end at step 6: constant lr
        kw = dict(steps=12, save_every=4, eval_interval=5)
    job = ToyJob(config(tmp_path / "whole", **kw), noise=0.2)
    whole = run(job)
    want = weights(job)

    out = tmp_path / "parts"
    if how == "interrupted":
        first = ToyJob(config(out, **kw), noise=0.2)
        draw = first.micro_batches

        def crash_at_6(k):
            if first.step == 6:
                raise Crash
            return draw(k)

        first.micro_batches = crash_at_6
        with pytest.raises(Crash):
            run(first)
        assert names(out) == ["ckpt-00000004"]
    else:
        run(ToyJob(config(out, **(kw | {"steps": 6})), noise=0.2))
    second = ToyJob(config(out, **kw), resume=True, noise=0.2)
    assert second.resumed["step"] == (4 if how == "interrupted" else 6)
    resumed = run(second)

    assert resumed.step == 12
    assert_equal_weights(weights(second), want)
    assert resumed.train_losses == whole.train_losses
    a, b = (ckpt.load_checkpoint(r.checkpoint) for r in (resumed, whole))
    assert_equal_weights(a.model, b.model)
    for index, entry in b.optimizer["state"].items():  # AdamW's moments and step
        for key, value in entry.items():
            assert torch.equal(a.optimizer["state"][index][key], value), (index, key)
    if how == "interrupted":  # evaluations (train loss since the last, router load) too
        assert resumed.evals == whole.evals
        assert a.state["loop"]["health"] == b.state["loop"]["health"]


# --- 3. a corrupt newest checkpoint is skipped ------------------------------------------------
@pytest.mark.parametrize("file", ["model.safetensors", "optimizer.safetensors", "state.json"])
def test_corrupt_newest_checkpoint_is_skipped_with_a_warning(tmp_path, caplog, file):
    cfg = config(tmp_path, steps=6, save_every=2)
    job = ToyJob(cfg)
    first = run(job)
    want = weights(job)
    target = tmp_path / "ckpt-00000006" / file
    target.write_bytes(target.read_bytes()[: target.stat().st_size // 2])  # truncated

    with caplog.at_level(logging.WARNING, logger="moekit.train.files"):
        job = ToyJob(cfg, resume=True)
    assert "skipping" in caplog.text and "ckpt-00000006" in caplog.text
    assert f"{file} does not match its sha256" in caplog.text
    assert job.resumed["step"] == 4  # the previous one
    result = run(job)
    assert result.step == 6 and result.train_losses == first.train_losses
    assert_equal_weights(weights(job), want)
    ckpt.verify(tmp_path / "ckpt-00000006")  # rewritten whole


# --- 4. the non-finite guard ---------------------------------------------------------------
@pytest.mark.parametrize("what", ["loss", "gradient norm"])
def test_non_finite_stops_before_the_optimizer(tmp_path, what):
    job = ToyJob(config(tmp_path, steps=10, save_every=2))
    draw, finish = job.micro_batches, job.finish_grads
    before = {}

    def poisoned_batches(k):
        micros, targets = draw(k)
        if job.step == 5:
            before.update(weights(job))
            before["adam"] = copy.deepcopy(job.optimizer.state_dict()["state"])
            if what == "loss":
                micros[0][1].fill_(float("nan"))  # y of the first micro-batch
        return micros, targets

    def poisoned_grads():
        if job.step == 5 and what == "gradient norm":
            job.model.weight.grad[0, 0] = float("inf")
        return finish()

    job.micro_batches, job.finish_grads = poisoned_batches, poisoned_grads
    with pytest.raises(NonFiniteError, match=f"^step 5: non-finite {what} (nan|inf)$"):
        run(job)
    adam = before.pop("adam")
    assert_equal_weights(weights(job), before)
    for index, entry in job.optimizer.state_dict()["state"].items():
        for key, value in entry.items():
            assert torch.equal(value, adam[index][key]), (index, key)
    assert int(adam[0]["step"]) == 5
    assert names(tmp_path) == ["ckpt-00000002", "ckpt-00000004"]  # the last good one kept
    assert ckpt.latest_checkpoint(tmp_path).step == 4


# --- 5. one loss definition at any --grad-accum ----------------------------------------------
SUPERVISED = (10, 10, 1, 1, 0, 0, 5, 3)  # per row (T = 10): micro-batches of 20, 2, 0, 8 at K=4


@pytest.mark.parametrize("grad_accum", [1, 2, 4])
def test_one_step_is_the_same_at_any_grad_accum(tmp_path, grad_accum):
    cfg = config(tmp_path, steps=1, grad_accum=grad_accum, lr=0.1)
    job = ToyJob(cfg, positions=10, supervised=SUPERVISED, optimizer="sgd")
    state = job.data_gen.get_state()
    micros, targets = job.micro_batches(4)
    job.data_gen.set_state(state)
    assert [int(m[2].sum()) for m in micros] == [20, 2, 0, 8] and targets == 30
    loss, grads, model = hand_step(job)
    want = {name: p.detach() - 0.1 * p.grad for name, p in model.named_parameters()}

    metrics = Loop(job).train_step()

    # float64; the micro-batches sum in another order than the whole batch
    tol = dict(rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(weights(job), want, **tol)
    assert metrics["loss"] == pytest.approx(loss, rel=1e-12)
    norm = torch.linalg.vector_norm(torch.cat([g.flatten() for g in grads]))
    assert metrics["grad_norm"] == pytest.approx(norm.item(), rel=1e-12)


@pytest.mark.parametrize("grad_accum", [1, 2, 4])
def test_logged_aux_loss_is_the_mean_over_micro_batches(tmp_path, grad_accum):
    """The module docstring: "The auxiliary loss is a mean over the micro-batches"; the toy's
    aux loss is the same in each, so the logged value is that value at any K."""
    job = ToyJob(config(tmp_path, steps=1, grad_accum=grad_accum), aux_coef=0.5)
    with torch.no_grad():
        aux = job.aux_loss().item()
    metrics = Loop(job).train_step()
    assert metrics["aux_loss"] == pytest.approx(aux, rel=1e-12)


# --- 6. clipping and the schedule ----------------------------------------------------------
@pytest.mark.parametrize("grad_clip", [0.5, 100.0])
def test_clipping_scales_the_update_as_clip_grad_norm(tmp_path, grad_clip):
    job = ToyJob(
        config(tmp_path, steps=1, grad_accum=2, lr=0.1, grad_clip=grad_clip), optimizer="sgd"
    )
    _, _, model = hand_step(job)
    norm = torch.nn.utils.clip_grad_norm_(model.parameters(), grad_clip)
    want = {name: p.detach() - 0.1 * p.grad for name, p in model.named_parameters()}
    assert (norm.item() > grad_clip) == (grad_clip == 0.5)  # one clipped step, one not

    metrics = Loop(job).train_step()

    torch.testing.assert_close(weights(job), want, rtol=1e-12, atol=1e-12)  # float64
    assert metrics["grad_norm"] == pytest.approx(norm.item(), rel=1e-12)  # before clipping


@pytest.mark.parametrize("schedule", ["constant", "cosine", "linear"])
def test_the_optimizer_runs_each_step_at_the_schedule_lr(tmp_path, schedule):
    peak, low, warmup, steps = 0.1, 0.01, 3, 8
    cfg = config(tmp_path, steps=steps, lr=peak, min_lr=low, warmup_steps=warmup, schedule=schedule)
    job = ToyJob(cfg, optimizer="sgd")
    run(job)
    want = []
    for step in range(steps):
        progress = (step - warmup) / (steps - warmup)  # 0 at the end of warmup, < 1 at the last
        if step < warmup:
            want.append(peak * (step + 1) / warmup)
        elif schedule == "constant":
            want.append(peak)
        elif schedule == "linear":
            want.append(peak + (low - peak) * progress)
        else:
            want.append(low + (peak - low) * 0.5 * (1 + math.cos(math.pi * progress)))
    assert job.lrs == pytest.approx(want, rel=1e-12)
    assert job.lrs[:3] == pytest.approx([peak / 3, 2 * peak / 3, peak], rel=1e-12)


# --- 7. a dead or hung rank ----------------------------------------------------------------
# per row: rank 0's micro-batches hold 8 and 0 targets, rank 1's 4 and 12 (grad_accum 2)
RANKS_SUPERVISED = (6, 2, 0, 0, 1, 3, 6, 6)


@pytest.mark.distributed
@pytest.mark.parametrize("fault", ["kill", "hang"])
def test_a_dead_or_hung_rank_fails_rank_0_in_one_line(tmp_path, caplog, fault):
    """Two ranks (gloo); rank 1 kills or stops itself at step 3; rank 0 fails the step's
    collective (at once, or after --dist-timeout 5 s) and exits with the rank-failure line. The
    step-2 checkpoint then resumes in one process and ends where the single-process run does
    (SGD: a gradient off by a factor shows, where Adam would hide it)."""
    kw = dict(steps=6, grad_accum=2, save_every=2, eval_interval=2)
    cfg = config(tmp_path / "run", dist_timeout=5.0, **kw)
    job_kw = dict(optimizer="sgd", supervised=RANKS_SUPERVISED)
    argv = [JOB, json.dumps(cfg.to_dict()), "--job", json.dumps(job_kw)]
    code, err = rank_0_of([*argv, "--fault", fault, "--at", "3"], 2, TIMEOUT_S)
    assert code != 0
    lines = [line for line in err.splitlines() if "rank 0 of 2" in line]
    assert len(lines) == 1, err[-3000:]
    assert "rank 0 of 2, step 3: " in lines[0]
    assert "another rank died or hung" in lines[0] and "--resume" in lines[0]
    assert str(tmp_path / "run") in lines[0]
    assert names(tmp_path / "run") == ["ckpt-00000002"]
    ckpt.verify(tmp_path / "run" / "ckpt-00000002")

    with caplog.at_level(logging.WARNING, logger="moekit.train.loop"):
        resumed = run(ToyJob(cfg, resume=True, **job_kw))
    assert "written by 2 rank(s), this run has 1" in caplog.text
    single = run(ToyJob(config(tmp_path / "single", **kw), **job_kw))
    assert resumed.step == 6
    # float64; two ranks sum their halves of the batch in another order
    torch.testing.assert_close(resumed.train_losses, single.train_losses, rtol=1e-12, atol=0)
    a, b = (ckpt.load_checkpoint(r.checkpoint).model for r in (resumed, single))
    torch.testing.assert_close(a, b, rtol=1e-12, atol=1e-12)


# --- 8. check_batch --------------------------------------------------------------------------
def fake_topology(rank: int, world_size: int) -> Topology:
    """A topology without process groups: check_batch reads the world size alone."""
    return Topology(rank, world_size, 1, torch.device("cpu"), None, None, None, None)


@pytest.mark.parametrize(
    "batch_size,world_size,grad_accum,match",
    [
        (7, 2, 1, r"^--batch-size 7 must be divisible by the number of ranks 2 "),
        (
            6,
            2,
            2,
            r"^--grad-accum 2 must divide each rank's rows \(--batch-size 6 / 2 ranks = 3\)$",
        ),
        (
            12,
            4,
            2,
            r"^--grad-accum 2 must divide each rank's rows \(--batch-size 12 / 4 ranks = 3\)$",
        ),
    ],
)
def test_check_batch_one_line_errors(batch_size, world_size, grad_accum, match):
    cfg = RunConfig(batch_size=batch_size, grad_accum=grad_accum)
    for rank in range(world_size):
        with pytest.raises(ValueError, match=match) as info:
            check_batch(cfg, fake_topology(rank, world_size))
        assert "\n" not in str(info.value)


@pytest.mark.parametrize("batch_size,world_size,grad_accum", [(8, 2, 2), (8, 4, 2), (3, 1, 3)])
def test_check_batch_accepts_even_splits(batch_size, world_size, grad_accum):
    check_batch(
        RunConfig(batch_size=batch_size, grad_accum=grad_accum), fake_topology(0, world_size)
    )
