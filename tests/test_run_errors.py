"""Bad input to `moekit finetune` and `moekit train` gets one line naming the flag, and nothing
already saved is lost (issue 28): corrupt weights, a hub id offline, an unreachable tracking
server, a half-built MLflow store, bad topologies under torchrun, run directories, resumes of
another run, flag and data errors. The oracle is the message: one line, `moekit <command>:
error: ...`, naming the flag; no traceback.

The hub and tracking tests assert seconds because the bug was minutes of retries; every address
they use refuses at once (127.0.0.1:9, the discard port, has no listener here) or is never
reached (HF_HUB_OFFLINE). Nothing touches the network.
"""

from __future__ import annotations

import os
import sqlite3
import subprocess
import sys
import time
import warnings
from pathlib import Path

import pytest
import torch

pytest.importorskip("transformers")
pytest.importorskip("peft")

from moekit.cli import main  # noqa: E402
from moekit.hf.catalog import tiny_model  # noqa: E402
from spawn import free_port  # noqa: E402

SHAKESPEARE = Path(__file__).resolve().parents[2] / "shared" / "data" / "tinyshakespeare.txt"
REFUSED = "http://127.0.0.1:9"  # nothing listens on the discard port: refused at once
FAST = ["--steps", "1", "--seq-len", "16", "--batch-size", "2", "--eval-batches", "1"]
PROXIES = ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY")


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
    """Two tiny Qwen3-MoE models (vocabulary 256: byte tokens) and a 20 kB text file."""
    root = tmp_path_factory.mktemp("run_errors")
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")
        tiny_model("qwen3_moe", vocab_size=256).save_pretrained(root / "model")
        tiny_model("qwen3_moe", seed=1, vocab_size=256).save_pretrained(root / "other")
    text = SHAKESPEARE.read_text(encoding="utf-8")[:20_000]
    (root / "data.txt").write_text(text, encoding="utf-8")
    return root


def _args(saved: Path, out: Path, *more: str, model: str | None = None) -> list[str]:
    model = model or str(saved / "model")
    return ["--model", model, "--data", str(saved / "data.txt"), "--out", str(out), *FAST, *more]


def _finetune(*args: str, track: bool = False) -> int:
    return main(["finetune", "--no-progress", *([] if track else ["--no-track"]), *args])


def _error_line(err: str, command: str = "finetune") -> str:
    """The one error line of `err` (stderr), after checking it is the only one."""
    assert "Traceback" not in err, err
    lines = [line for line in err.splitlines() if "error" in line.lower()]
    assert len(lines) == 1, err
    assert lines[0].startswith(f"moekit {command}: error: "), err
    return lines[0]


# --- 1. corrupt weights -------------------------------------------------------------------
@pytest.mark.parametrize("damage", ["truncated", "garbage"])
def test_corrupt_safetensors_is_one_line_naming_model(saved, tmp_path, capsys, damage):
    model = tmp_path / "model"
    model.mkdir()
    for file in (saved / "model").iterdir():
        (model / file.name).write_bytes(file.read_bytes())
    weights = model / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[: len(data) // 2] if damage == "truncated" else bytes(range(256)))
    assert _finetune(*_args(saved, tmp_path / "run", model=str(model))) == 1
    line = _error_line(capsys.readouterr().err)
    assert "--model" in line and "model.safetensors" in line
    assert "truncated or corrupt" in line


# --- 2. a hub id offline ------------------------------------------------------------------
def _offline_finetune(
    saved: Path, tmp_path: Path, env: dict
) -> tuple[subprocess.CompletedProcess, float]:
    """`moekit finetune --model someorg/somemodel` in a process of its own (huggingface_hub
    reads its environment at import), the cache in `tmp_path/hf`; the result and seconds."""
    dropped = ("HF_HUB_OFFLINE", "HF_ENDPOINT", *PROXIES)  # a proxy would be asked instead
    base = {k: v for k, v in os.environ.items() if k not in dropped}
    env = base | {"HF_HOME": str(tmp_path / "hf"), "HF_HUB_DISABLE_TELEMETRY": "1"} | env
    command = [sys.executable, "-m", "moekit", "finetune", "--no-progress", "--no-track"]
    tic = time.monotonic()
    result = subprocess.run(
        [*command, *_args(saved, tmp_path / "run", model="someorg/somemodel")],
        capture_output=True,
        text=True,
        env=env,
        timeout=120,
    )
    return result, time.monotonic() - tic


@pytest.mark.parametrize(
    "env", [{"HF_HUB_OFFLINE": "1"}, {"HF_ENDPOINT": REFUSED}], ids=["offline", "refused"]
)
def test_hub_id_offline_is_one_line_in_seconds(saved, tmp_path, env):
    result, elapsed = _offline_finetune(saved, tmp_path, env)
    assert result.returncode == 1
    line = _error_line(result.stderr)
    assert "--model someorg/somemodel" in line and "not in the local cache" in line
    assert elapsed < 15, f"{elapsed:.1f} s"  # huggingface_hub's backoff took ~25 s


def test_a_cached_hub_id_trains_while_the_hub_refuses(saved, tmp_path):
    """Offline, a hub id in the local cache loads from it at once, with no retries (nor a
    PEFT adapter looked up on the hub), and no empty tokenizer built from its config."""
    repo = tmp_path / "hf" / "hub" / "models--someorg--somemodel"
    commit = "0123456789abcdef0123456789abcdef01234567"
    (repo / "refs").mkdir(parents=True)
    (repo / "refs" / "main").write_text(commit)
    (repo / "snapshots" / commit).mkdir(parents=True)
    for file in (saved / "model").iterdir():
        (repo / "snapshots" / commit / file.name).write_bytes(file.read_bytes())
    result, elapsed = _offline_finetune(saved, tmp_path, {"HF_ENDPOINT": REFUSED})
    assert result.returncode == 0, result.stderr[-3000:]
    assert "Retrying" not in result.stderr and (tmp_path / "run" / "final").is_dir()
    assert elapsed < 15, f"{elapsed:.1f} s"  # one adapter lookup's backoff took ~23 s


# --- 3. an unreachable tracking server ----------------------------------------------------
@pytest.fixture
def no_proxy(monkeypatch):
    """No proxy in the environment: the refused address is asked, not a proxy."""
    for name in PROXIES:
        monkeypatch.delenv(name, raising=False)


def test_unreachable_tracking_uri_is_one_line_in_seconds(saved, tmp_path, capsys, no_proxy):
    tic = time.monotonic()
    args = _args(saved, tmp_path / "run", "--tracking-uri", REFUSED)
    assert _finetune(*args, track=True) == 1
    elapsed = time.monotonic() - tic
    line = _error_line(capsys.readouterr().err)
    assert f"--tracking-uri {REFUSED}" in line and "cannot connect" in line
    assert elapsed < 15, f"{elapsed:.1f} s"  # MLflow's retries took 254 s


def test_train_shares_the_tracking_check(tmp_path, capsys, no_proxy):
    """`moekit train` builds its tracker with the same `make_tracker`."""
    data = tmp_path / "data.txt"
    data.write_text(SHAKESPEARE.read_text(encoding="utf-8")[:20_000], encoding="utf-8")
    args = ["train", "--preset", "tiny", "--no-progress", "--steps", "1", "--eval-batches", "1"]
    args += ["--data", str(data), "--out", str(tmp_path / "run"), "--tracking-uri", REFUSED]
    assert main(args) == 1
    line = _error_line(capsys.readouterr().err, "train")
    assert f"--tracking-uri {REFUSED}" in line


# --- 4. a half-built MLflow store ---------------------------------------------------------
def _partial_store(db: Path) -> None:
    """What a kill during MLflow's first migrations leaves: some tables, an early revision."""
    with sqlite3.connect(db) as con:
        con.execute(
            "CREATE TABLE experiments (experiment_id INTEGER NOT NULL, name VARCHAR(256) NOT "
            "NULL, artifact_location VARCHAR(256), lifecycle_stage VARCHAR(32), "
            "PRIMARY KEY (experiment_id), UNIQUE (name))"
        )
        con.execute("CREATE TABLE alembic_version (version_num VARCHAR(32) NOT NULL)")
        con.execute("INSERT INTO alembic_version VALUES ('451aebb31d03')")  # MLflow's first
    con.close()


def _runs(db: Path) -> list[str]:
    con = sqlite3.connect(db)
    try:
        return [row[0] for row in con.execute("SELECT run_uuid FROM runs")]
    finally:
        con.close()


@pytest.mark.parametrize("store", ["garbage", "partial schema"])
def test_half_built_mlflow_store_is_moved_aside(saved, tmp_path, caplog, store):
    out = tmp_path / "run"
    out.mkdir()
    db = out / "mlflow.db"
    if store == "garbage":
        db.write_bytes(b"not an sqlite database\n" * 100)
    else:
        _partial_store(db)
    before = db.read_bytes()
    assert _finetune(*_args(saved, out), track=True) == 0
    (aside,) = out.glob("mlflow.db.broken-*")
    assert aside.read_bytes() == before  # kept, byte for byte
    assert any(
        "moved aside" in r.getMessage() and "mlflow.db" in r.getMessage() for r in caplog.records
    )
    assert len(_runs(db)) == 1  # a fresh store, holding this run


def test_resume_keeps_a_good_store_and_survives_a_broken_one(saved, tmp_path, caplog):
    """A store holding runs is resumed into; one broken since the checkpoint is moved aside
    and the resumed run is tracked as a new one."""
    out = tmp_path / "run"
    assert _finetune(*_args(saved, out), track=True) == 0
    (first,) = _runs(out / "mlflow.db")
    assert _finetune(*_args(saved, out, "--resume", "--steps", "2"), track=True) == 0
    assert _runs(out / "mlflow.db") == [first] and not list(out.glob("mlflow.db.broken-*"))
    (out / "mlflow.db").write_bytes(b"\0garbage" * 100)
    assert _finetune(*_args(saved, out, "--resume", "--steps", "3"), track=True) == 0
    assert len(list(out.glob("mlflow.db.broken-*"))) == 1
    assert len(_runs(out / "mlflow.db")) == 1 and _runs(out / "mlflow.db") != [first]
    assert any("tracking this run as a new one" in r.getMessage() for r in caplog.records)


def test_a_users_broken_store_is_left_alone(saved, tmp_path, capsys):
    db = tmp_path / "mine.db"
    db.write_bytes(b"not an sqlite database\n" * 100)
    args = _args(saved, tmp_path / "run", "--tracking-uri", f"sqlite:///{db}")
    assert _finetune(*args, track=True) == 1
    line = _error_line(capsys.readouterr().err)
    assert "--tracking-uri" in line
    assert db.read_bytes() == b"not an sqlite database\n" * 100
    assert not list(tmp_path.glob("mine.db.broken-*"))


# --- 5. a bad topology under torchrun ----------------------------------------------------
@pytest.mark.distributed
@pytest.mark.parametrize(
    "flags, message",
    [
        (["--expert-parallel", "3"], "--expert-parallel 3 must divide"),
        (["--batch-size", "3"], "--batch-size 3 must be divisible"),
    ],
)
def test_torchrun_bad_topology_is_one_line_from_rank_0(saved, tmp_path, flags, message):
    torchrun = [sys.executable, "-m", "torch.distributed.run", "--nproc-per-node=2"]
    torchrun += ["--rdzv-backend=c10d", f"--rdzv-endpoint=127.0.0.1:{free_port()}"]
    command = ["-m", "moekit", "finetune", "--no-progress", "--no-track"]
    result = subprocess.run(
        [*torchrun, *command, *_args(saved, tmp_path / "run"), *flags],
        capture_output=True,
        text=True,
        env=os.environ | {"OMP_NUM_THREADS": "1"},
        timeout=120,
    )
    assert result.returncode != 0
    ours = [line for line in result.stderr.splitlines() if "moekit finetune: error" in line]
    assert len(ours) == 1 and message in ours[0], result.stderr  # rank 0's, not rank 1's
    assert result.stderr.startswith(ours[0] + "\n")  # first, before torchrun's own summary


# --- 6. run directories -------------------------------------------------------------------
def test_out_that_is_no_run_directory_is_one_line(saved, tmp_path, capsys):
    file = tmp_path / "a_file"
    file.write_text("mine")
    assert _finetune(*_args(saved, file)) == 1
    assert "--out" in _error_line(capsys.readouterr().err) and file.read_text() == "mine"
    assert _finetune(*_args(saved, file / "run")) == 1
    assert "cannot create the run directory" in _error_line(capsys.readouterr().err)


def test_out_holding_a_run_needs_resume_or_overwrite(saved, tmp_path, capsys):
    out = tmp_path / "run"
    assert _finetune(*_args(saved, out)) == 0
    (checkpoint,) = out.glob("ckpt-*")
    files = {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()}
    capsys.readouterr()
    assert _finetune(*_args(saved, out)) == 1
    line = _error_line(capsys.readouterr().err)
    assert "--resume" in line and "--overwrite" in line
    assert {p: p.read_bytes() for p in checkpoint.rglob("*") if p.is_file()} == files
    assert _finetune(*_args(saved, out), "--overwrite") == 0


# --- 7. resuming another run ---------------------------------------------------------------
def test_resume_of_another_adapter_or_model_is_refused(saved, tmp_path, capsys):
    out = tmp_path / "run"
    assert _finetune(*_args(saved, out, "--lora-rank", "2")) == 0
    capsys.readouterr()
    assert _finetune(*_args(saved, out, "--lora-rank", "4", "--resume")) == 1
    line = _error_line(capsys.readouterr().err)
    assert "lora_rank 2 there, 4 here" in line and "--resume" in line
    other = str(saved / "other")
    assert _finetune(*_args(saved, out, "--lora-rank", "2", "--resume", model=other)) == 1
    line = _error_line(capsys.readouterr().err)
    assert "model " in line and str(saved / "other") in line


# --- 8. flags and data ---------------------------------------------------------------------
def _toml(tmp_path: Path) -> str:
    path = tmp_path / "run.toml"
    path.write_text("lora_rnak = 4\n")
    return str(path)


def _latin1(tmp_path: Path) -> str:
    path = tmp_path / "latin1.txt"
    path.write_bytes(SHAKESPEARE.read_text(encoding="utf-8")[:20_000].encode() + b"caf\xe9\n")
    return str(path)


@pytest.mark.parametrize(
    "flags, message",
    [
        (lambda tmp: ["--data", _latin1(tmp)], "--data"),
        (lambda tmp: ["--lora-targets", "attention"], "--lora-targets"),
        (lambda tmp: ["--seq-len", "40000"], "--seq-len 40000 is beyond"),
        (lambda tmp: ["--grad-accum", "3"], "--grad-accum 3 must divide"),
        (lambda tmp: ["--device", "cuda"], "--device cuda"),
        (lambda tmp: ["--config", _toml(tmp)], "lora_rnak"),
        (lambda tmp: ["--lora-rank", "2", "--router-bias-update"], "--router-bias-update"),
    ],
    ids=["non-utf8", "targets-without-rank", "seq-len", "grad-accum", "cuda", "toml", "bias"],
)
def test_flag_and_data_errors_are_one_line(saved, tmp_path, capsys, monkeypatch, flags, message):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert _finetune(*_args(saved, tmp_path / "run"), *flags(tmp_path)) == 1
    assert message in _error_line(capsys.readouterr().err)


# --- 9. data errors before the model loads -----------------------------------------------
def test_a_bad_record_is_named_before_the_model_loads(saved, tmp_path, capsys, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("the model was loaded")

    monkeypatch.setattr("moekit.hf.load.load_model", never)
    monkeypatch.setattr("moekit.hf.finetune.load_model", never)
    records = tmp_path / "data.jsonl"
    good = '{"prompt": "to be", "completion": " or not to be"}\n'
    records.write_text(good * 2 + '{"question": "what?"}\n' + good * 7)
    args = _args(saved, tmp_path / "run")
    args[args.index("--data") + 1] = str(records)
    assert _finetune(*args) == 1
    line = _error_line(capsys.readouterr().err)
    assert "--data" in line and "line 3" in line
