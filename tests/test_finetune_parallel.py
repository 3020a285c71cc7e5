"""`moekit finetune` under torchrun (gloo): expert parallelism x FSDP2 (or DDP) equals one process.

Oracle: the single-process run of the same config in float64 (6 AdamW steps, a checkpoint at
step 3): every trained tensor of <out>/final within 1e-5 relative (in norm; ~1e-7 seen: the
routers and the loss stay float32), the same train and
validation losses to 1e-6 (transformers computes the loss in float32).
Launches are few and shared (each holds several runs in one process group): world 2 (EP 2 and
EP 1, FSDP2 and DDP, full and LoRA), world 4 (EP 4 and EP 2; resumes of the world-2 EP 2
checkpoint), and in this process a resume at world 1. The DeepSeek-V3 model's correction bias
sends every token to experts 0-3: at EP 2 and 4 some ranks receive no token in any step.
"""

from __future__ import annotations

import json
import math
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from safetensors import safe_open  # noqa: E402
from safetensors.torch import load_file  # noqa: E402

from chat_fixtures import save_chat_model  # noqa: E402
from moekit.hf.catalog import tiny_model  # noqa: E402
from moekit.hf.finetune import FinetuneConfig, finetune  # noqa: E402
from moekit.hf.load import load_model  # noqa: E402
from moekit.train.files import list_checkpoints, verify  # noqa: E402
from moekit.train.sharded import REQUIRED  # noqa: E402
from spawn import free_port, rank_0_of  # noqa: E402

pytestmark = pytest.mark.distributed

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
JOB = str(Path(__file__).with_name("finetune_job.py"))
TIMEOUT_S = 400  # a whole launch; the process-group timeout inside is far shorter
CASES = {  # name: (model, changes to the config)
    "qwen": ("qwen3_moe", {}),
    "qwen-lora": ("qwen3_moe", {"lora_rank": 2, "lora_targets": ["experts", "attention"]}),
    # nf4 experts read a rank's half at a time (`hf.stream`), LoRA on top
    "qwen-lora-nf4": ("qwen3_moe", {"lora_rank": 2, "quantize_experts": "nf4"}),
    "deepseek": ("deepseek_v3", {}),
    "deepseek-lora": ("deepseek_v3", {"lora_rank": 2}),
    # chat records, supervised lengths differing tenfold (`chat_fixtures`): the loss is the
    # sum over the global batch's supervised tokens / their number at any ranks and grad-accum
    "qwen-chat": ("qwen3_moe-chat", {"data": "chat.jsonl", "seq_len": 128}),
}


@pytest.fixture(scope="module")
def root(tmp_path_factory) -> Path:
    """Tiny Qwen3-MoE and DeepSeek-V3 models (8 experts, byte vocabulary) and a text file."""
    root = tmp_path_factory.mktemp("ftpar")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_model("qwen3_moe", vocab_size=256).save_pretrained(root / "qwen3_moe")
        deepseek = tiny_model("deepseek_v3", vocab_size=256)
        for layer in deepseek.model.layers:  # experts 0-3 always win: 4-7 never get a token
            bias = layer.mlp.gate.e_score_correction_bias
            bias.copy_(torch.tensor([10.0] * 4 + [-10.0] * 4))
        deepseek.save_pretrained(root / "deepseek_v3")
    (root / "data.txt").write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000])
    save_chat_model(root)
    return root


BF16 = {"dtype": "bfloat16", "lr": 1e-3}


def config(root: Path, case: str, out: Path, **changes) -> dict:
    model, options = CASES[case]
    options = options | {"data": str(root / options.get("data", "data.txt"))}
    return (
        dict(
            model=str(root / model),
            out=str(out),
            steps=6,
            seq_len=16,
            batch_size=4,
            lr=1e-2,
            dtype="float64",
            eval_interval=3,
            save_every=3,
            eval_batches=1,
            track=False,
            progress=False,
            dist_timeout=60.0,
        )
        | options
        | changes
    )


def one_process(cfg: dict, resume: bool = False):
    fields = dict(cfg)
    if "lora_targets" in fields:
        fields["lora_targets"] = tuple(fields["lora_targets"])
    return finetune(FinetuneConfig(**fields), resume=resume)


def torchrun(nproc: int, runs: list[dict]) -> subprocess.CompletedProcess:
    cmd = [sys.executable, "-m", "torch.distributed.run", f"--nproc-per-node={nproc}"]
    cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    done = subprocess.run(
        [*cmd, JOB, json.dumps(runs)], capture_output=True, text=True, timeout=TIMEOUT_S
    )
    assert done.returncode == 0, done.stderr[-4000:]
    return done


def trained(out: Path) -> dict[str, torch.Tensor]:
    final = out / "final"
    name = "adapter_model" if (final / "adapter_model.safetensors").exists() else "model"
    return load_file(final / f"{name}.safetensors")


def assert_same_run(got: Path, want: Path) -> None:
    a, b = trained(got), trained(want)
    assert a.keys() == b.keys() and a
    for name in b:
        error = (a[name].double() - b[name].double()).norm() / b[name].double().norm()
        assert error <= 1e-5, f"{name}: relative error {error:.2e}"
    evals = [
        json.loads((p / "ckpt-00000006" / "state.json").read_text())["loop"]["evals"]
        for p in (got, want)
    ]
    assert [e["step"] for e in evals[0]] == [0, 3, 6]
    for e, f in zip(*evals, strict=True):
        assert e["val_loss"] == pytest.approx(f["val_loss"], rel=1e-6)
        assert e.get("train_loss", 0.0) == pytest.approx(f.get("train_loss", 0.0), rel=1e-6)


@pytest.fixture(scope="module")
def single(root, tmp_path_factory) -> dict[str, Path]:
    outs = {}
    for case in CASES:
        outs[case] = tmp_path_factory.mktemp(f"single-{case}")
        one_process(config(root, case, outs[case]))
    return outs


@pytest.fixture(scope="module")
def world2(root, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("world2")
    runs = [
        {"config": config(root, "qwen", base / "qwen-ep2", expert_parallel=2), "shards": True},
        {"config": config(root, "qwen", base / "qwen-ep1", expert_parallel=1)},
        {"config": config(root, "qwen", base / "qwen-ep2-ddp", expert_parallel=2, fsdp=False)},
        {"config": config(root, "qwen-lora", base / "qwen-lora-ep2", expert_parallel=2)},
        # the experts' LoRA factors sharded with them, left out of DDP's reduction
        {
            "config": config(
                root, "qwen-lora", base / "qwen-lora-ep2-ddp", expert_parallel=2, fsdp=False
            )
        },
        {"config": config(root, "qwen-lora-nf4", base / "qwen-lora-nf4-ep2", expert_parallel=2)},
        {"config": config(root, "deepseek", base / "deepseek-ep2", expert_parallel=2)},
        {"config": config(root, "deepseek-lora", base / "deepseek-lora-ep2", expert_parallel=2)},
        {
            "config": config(
                root, "qwen-chat", base / "qwen-chat-ep2", expert_parallel=2, grad_accum=2
            )
        },
        # bf16 base, fp32 LoRA factors (PEFT's default): FSDP2 units of one dtype
        {
            "config": config(
                root, "qwen-lora", base / "qwen-lora-bf16-ep2", **BF16, expert_parallel=2
            )
        },
        {"config": config(root, "deepseek-lora", base / "deepseek-lora-bf16-ep1", **BF16)},
        # MLflow's setup on rank 0 takes seconds: it must not trip a 3 s --dist-timeout
        {
            "config": config(
                root,
                "qwen",
                base / "tracked",
                expert_parallel=2,
                track=True,
                dist_timeout=3.0,
                steps=3,
            )
        },
    ]
    torchrun(2, runs)
    return base


def _resumable(src: Path, out: Path) -> Path:
    """`out` holding only `src`'s step-3 checkpoint."""
    out.mkdir(parents=True)
    (out / "ckpt-00000003").symlink_to(src / "ckpt-00000003", target_is_directory=True)
    return out


@pytest.fixture(scope="module")
def world4(root, world2, tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("world4")
    runs = [
        {"config": config(root, "qwen", base / "qwen-ep4", expert_parallel=4), "shards": True},
        {"config": config(root, "qwen", base / "qwen-ep2", expert_parallel=2)},
        {"config": config(root, "qwen-lora", base / "qwen-lora-ep4", expert_parallel=4)},
        {
            "config": config(root, "deepseek", base / "deepseek-ep4", expert_parallel=4),
            "shards": True,
        },
    ]
    for case in ("qwen", "qwen-lora"):  # saved at world 2, EP 2; resumed at world 4, EP 4
        out = _resumable(world2 / f"{case}-ep2", base / f"{case}-resumed-ep4")
        runs.append({"config": config(root, case, out, expert_parallel=4), "resume": True})
    torchrun(4, runs)
    return base


@pytest.mark.parametrize(
    "run",
    [
        "qwen-ep2",
        "qwen-ep1",
        "qwen-ep2-ddp",
        "qwen-lora-ep2",
        "qwen-lora-ep2-ddp",
        "qwen-lora-nf4-ep2",
        "deepseek-ep2",
        "deepseek-lora-ep2",
        "qwen-chat-ep2",  # EP 2 x FSDP2, --grad-accum 2 against one process, --grad-accum 1
    ],
)
def test_two_ranks_train_like_one_process(world2, single, run):
    assert_same_run(world2 / run, single[run.rsplit("-ep", 1)[0]])


@pytest.mark.parametrize("run", ["qwen-ep4", "qwen-ep2", "qwen-lora-ep4", "deepseek-ep4"])
def test_four_ranks_train_like_one_process(world4, single, run):
    assert_same_run(world4 / run, single[run.rsplit("-ep", 1)[0]])


@pytest.mark.parametrize(
    "world,run", [("world2", "qwen-ep2"), ("world4", "qwen-ep4"), ("world4", "deepseek-ep4")]
)
def test_each_rank_holds_its_slice_of_the_experts(request, root, world, run):
    """Rank r's expert shards are experts [r E/R, (r+1) E/R) of the one-process model (not
    rank 0's, not random)."""
    out = request.getfixturevalue(world) / run
    model = load_model(
        root / ("qwen3_moe" if run.startswith("qwen") else "deepseek_v3"), torch.float64
    )
    params = dict(model.named_parameters())
    ranks = sorted(out.glob("shards-*.safetensors"))
    assert len(ranks) == int(run[-1])
    covered = {}
    for path in ranks:
        with safe_open(path, "pt") as f:
            firsts = f.metadata()
            assert firsts, f"{path.name}: no expert shard"
            for name in firsts:
                shard, first = f.get_tensor(name), int(firsts[name])
                torch.testing.assert_close(
                    shard, params[name][first : first + shard.shape[0]], rtol=0, atol=0
                )
                covered.setdefault(name, []).append((first, shard.shape[0]))
    for name, parts in covered.items():
        assert sum(n for _, n in parts) == params[name].shape[0], name
        assert sorted(parts)[0][0] == 0


@pytest.mark.parametrize("run", ["qwen-lora-bf16-ep2", "deepseek-lora-bf16-ep1"])
def test_bfloat16_lora_trains_under_fsdp2(world2, run):
    """A bf16 model with PEFT's fp32 adapters (and DeepSeek-V3's fp32 router): every LoRA B
    factor moved off zero, finite; the losses finite and falling."""
    factors = trained(world2 / run)
    lora_b = {name: t for name, t in factors.items() if "lora_B" in name}
    assert lora_b and any("experts" in name for name in lora_b)
    for name, t in lora_b.items():
        assert t.float().isfinite().all() and t.abs().max() > 0, name
    state = json.loads((world2 / run / "ckpt-00000006" / "state.json").read_text())
    evals = state["loop"]["evals"]
    assert all(math.isfinite(e["val_loss"]) for e in evals)
    assert evals[-1]["train_loss"] < evals[1]["train_loss"]


def test_ranks_without_tokens_train(world2, world4):
    """DeepSeek-V3 routed every token to experts 0-3: ranks that hold 4-7 received none."""
    for out in (world2 / "deepseek-ep2", world4 / "deepseek-ep4"):
        state = json.loads((out / "ckpt-00000006" / "state.json").read_text())
        for layer in state["loop"]["health"]["history"][-1]["load"]:
            assert layer[4:] == [0.0] * 4 and sum(layer[:4]) == pytest.approx(1.0)


@pytest.mark.parametrize("case", ["qwen", "qwen-lora"])
def test_ep2_checkpoint_resumes_at_ep4_and_in_one_process(
    root, world2, world4, single, tmp_path, case
):
    """Saved at world 2 / EP 2, the step-3 checkpoint continues at world 4 / EP 4 and in one
    process (EP 1) to the uninterrupted run's weights and losses."""
    assert_same_run(world4 / f"{case}-resumed-ep4", single[case])
    out = _resumable(world2 / f"{case}-ep2", tmp_path / "resumed")
    assert one_process(config(root, case, out), resume=True).step == 6
    assert_same_run(out, single[case])


def test_tracked_run_with_a_short_dist_timeout(world2):
    """Rank 0 alone tracks (MLflow's setup took longer than the 3 s --dist-timeout) and the run
    finishes."""
    import mlflow

    out = world2 / "tracked"
    mlflow.set_tracking_uri(f"sqlite:///{out / 'mlflow.db'}")
    runs = mlflow.search_runs(experiment_names=["moekit-finetune"], output_format="list")
    assert len(runs) == 1 and runs[0].info.status == "FINISHED"
    assert runs[0].data.params["expert_parallel"] == "2"
    assert (out / "final" / "model.safetensors").exists()


@pytest.mark.parametrize(
    "fault,ep,fsdp", [("kill", 2, True), ("hang", 2, True), ("hang", 1, False)]
)
def test_a_dead_or_hung_rank_fails_the_others_then_resume(root, single, tmp_path, fault, ep, fsdp):
    """Rank 1 dies (SIGKILL) or hangs (SIGSTOP) at step 4 (EP 2 under FSDP2; data-parallel
    under DDP, whose all-reduce must carry the timeout): rank 0 exits within --dist-timeout
    (plus the interpreter's exit) with one clear line; the newest complete checkpoint (step 3)
    stays, and after the kill resumes to the uninterrupted run's weights."""
    timeout = 6.0
    cfg = config(root, "qwen", tmp_path, expert_parallel=ep, fsdp=fsdp, dist_timeout=timeout)
    runs = json.dumps([{"config": cfg, "fault": {"rank": 1, "at": 4, "kind": fault}}])
    code, err = rank_0_of([JOB, runs], 2, TIMEOUT_S)
    waited = time.time() - float((tmp_path / "fault-time").read_text())
    assert code != 0
    assert waited < timeout + 20, f"rank 0 exited {waited:.0f} s after the fault"
    lines = [line for line in err.splitlines() if line.startswith("error: ")]
    assert len(lines) == 1 and "rank 0 of 2, step 4" in lines[0], err[-3000:]
    assert "another rank died or hung" in lines[0] and "--resume" in lines[0]
    assert [p.name for p in list_checkpoints(tmp_path)] == ["ckpt-00000003"]
    verify(tmp_path / "ckpt-00000003", REQUIRED)
    if fault == "kill":  # the job after a kill -9 (the hung job resumes alike)
        torchrun(2, [{"config": cfg, "resume": True}])
        assert_same_run(tmp_path, single["qwen"])


def test_a_half_written_or_corrupt_checkpoint_is_never_taken(root, single, tmp_path, caplog):
    """Resume skips a `.tmp-` directory (a save killed mid-way) and a checkpoint whose pieces
    do not match its manifest, and continues from the newest complete one."""
    import shutil

    out = tmp_path / "run"
    shutil.copytree(single["qwen"], out, ignore=shutil.ignore_patterns("final", "*.png"))
    shutil.copytree(out / "ckpt-00000003", out / ".tmp-ckpt-00000009-dcp")  # never sealed
    piece = next((out / "ckpt-00000006" / "dcp").glob("*.distcp"))
    piece.write_bytes(piece.read_bytes()[:-7])  # truncated
    result = one_process(config(root, "qwen", out), resume=True)
    assert "ckpt-00000006" in caplog.text and "does not match its sha256" in caplog.text
    assert result.step == 6
    assert_same_run(out, single["qwen"])


def test_torchrun_cli_rank_0_alone_reports(root, tmp_path):
    """`torchrun -m moekit finetune --expert-parallel 2 --no-fsdp --lora-rank 2`: one report
    line, the adapter in OUT/final."""
    cmd = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    cmd += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}", "-m", "moekit"]
    cmd += ["finetune", "--model", str(root / "qwen3_moe"), "--data", str(root / "data.txt")]
    cmd += ["--out", str(tmp_path), "--steps", "2", "--seq-len", "16", "--batch-size", "4"]
    cmd += ["--eval-interval", "2", "--eval-batches", "1", "--no-track", "--no-progress"]
    cmd += ["--expert-parallel", "2", "--no-fsdp", "--lora-rank", "2", "--dist-timeout", "60"]
    done = subprocess.run(cmd, capture_output=True, text=True, timeout=TIMEOUT_S)
    assert done.returncode == 0, done.stderr[-4000:]
    assert done.stdout.count("fine-tuned 2 steps") == 1
    assert done.stderr.count("MoE blocks patched") == 1  # rank 0's log alone
    assert (tmp_path / "final" / "adapter_model.safetensors").exists()


def test_expert_parallel_without_torchrun_is_one_clear_line(root, tmp_path, capsys):
    from moekit.cli import main

    args = ["finetune", "--model", str(root / "qwen3_moe"), "--data", str(root / "data.txt")]
    assert main([*args, "--out", str(tmp_path), "--expert-parallel", "2", "--no-track"]) == 1
    err = capsys.readouterr().err
    assert "--expert-parallel 2 needs 2 or more processes" in err and "torchrun" in err
