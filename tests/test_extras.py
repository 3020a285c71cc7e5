"""The light install: the core imports and runs without the extras; a missing extra says which.

Oracle: `sys.modules` of a fresh interpreter (what `import moekit` really loads), the
`pip install` command in each error message, and pyproject.toml's dependency lists.
"""

from __future__ import annotations

import re
import subprocess
import sys
from pathlib import Path

import pytest

from moekit import MoE
from moekit._extras import MissingExtraError, require
from moekit.bench.hf_peer import mixtral_peer
from moekit.cli import main
from moekit.lm.config import build_config
from moekit.lm.data import BPETokenizer
from moekit.lm.train import LMJob
from moekit.train.plots import plot_losses
from moekit.train.tracking import make_tracker

# what a plain `pip install moekit` must not bring in (the extras and MLflow's server stack)
OPTIONAL = ("mlflow", "matplotlib", "tqdm", "tokenizers", "transformers", "pandas", "flask")
PYPROJECT = Path(__file__).resolve().parents[1] / "pyproject.toml"

CORE_SCRIPT = """
import sys
import torch
torch_loaded = set(sys.modules)  # torch.hub imports tqdm when it is installed
import moekit, moekit.layers, moekit.routing, moekit.experts
import moekit.bench, moekit.cli, moekit.lm.train
layer = moekit.MoE(d_model=8, num_experts=4, top_k=2)
out, aux = layer(torch.randn(2, 5, 8))
(out.sum() + aux).backward()
moekit.cli.build_parser()
optional = set(sys.argv[1:])
loaded = set(sys.modules) - torch_loaded
print(",".join(sorted(m for m in loaded if m.partition(".")[0] in optional)))
"""

# every optional package made unimportable, as on a machine with the core alone
BLOCKED_CLI_SCRIPT = """
import sys
for name in sys.argv[3:]:
    sys.modules[name] = None
import moekit.bench, moekit.lm.train, moekit.train.plots
from moekit.cli import main
try:
    main(["train", "--help"])
except SystemExit as done:
    assert done.code == 0, done.code
sys.exit(main(["train", "--preset", "tiny", "--data", sys.argv[1], "--out", sys.argv[2]]))
"""


def _corpus(tmp_path: Path) -> Path:
    path = tmp_path / "corpus.txt"
    path.write_text("to be or not to be, that is the question\n" * 40)
    return path


def test_core_import_and_forward_load_no_optional_package():
    proc = subprocess.run(
        [sys.executable, "-c", CORE_SCRIPT, *OPTIONAL], capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert proc.stdout.strip() == ""  # the optional modules moekit imported


def test_cli_help_and_train_without_the_train_extra(tmp_path):
    args = [str(_corpus(tmp_path)), str(tmp_path / "run"), *OPTIONAL]
    proc = subprocess.run(
        [sys.executable, "-c", BLOCKED_CLI_SCRIPT, *args],
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert "--max-iters" in proc.stdout  # the train --help
    assert proc.returncode == 1, proc.stderr[-3000:]
    assert 'pip install "moekit[train]"' in proc.stderr
    assert "Traceback" not in proc.stderr


@pytest.mark.parametrize(
    "blocked, extra, call",
    [
        (("mlflow",), "train", lambda tmp: make_tracker(True, tmp, "moekit", None, None)),
        (
            ("matplotlib", "matplotlib.pyplot"),
            "train",
            lambda tmp: plot_losses(
                [{"step": 0, "train_loss": 1.0, "val_loss": 1.0}], tmp / "l.png"
            ),
        ),
        (
            ("tqdm", "tqdm.auto"),
            "train",
            lambda tmp: LMJob(build_config("tiny", None, data=str(tmp / "x.txt"), out=str(tmp))),
        ),
        (("tokenizers",), "train", lambda tmp: BPETokenizer.train("abc abc", 300)),
        (("transformers",), "hf", lambda tmp: mixtral_peer(MoE(16, 4, 2, 24, "swiglu"))),
    ],
    ids=["mlflow", "matplotlib", "tqdm", "tokenizers", "transformers"],
)
def test_missing_extra_names_the_pip_command(tmp_path, monkeypatch, blocked, extra, call):
    for name in blocked:
        monkeypatch.setitem(sys.modules, name, None)  # `import name` now raises
    with pytest.raises(MissingExtraError, match=re.escape(f'pip install "moekit[{extra}]"')) as err:
        call(tmp_path)
    assert isinstance(err.value, ModuleNotFoundError) and err.value.name == blocked[0]
    assert blocked[0] in str(err.value)


def test_cli_train_without_mlflow_exits_with_the_message(tmp_path, monkeypatch, capsys):
    monkeypatch.setitem(sys.modules, "mlflow", None)
    args = ["train", "--preset", "tiny", "--data", str(_corpus(tmp_path)), "--no-progress"]
    assert main([*args, "--out", str(tmp_path / "run"), "--max-iters", "1"]) == 1
    err = capsys.readouterr().err
    assert err.startswith("moekit train: error: MLflow tracking (off with --no-track) needs mlflow")
    assert 'pip install "moekit[train]"' in err


def test_require_leaves_a_broken_install_alone(tmp_path, monkeypatch):
    package = tmp_path / "broken_pkg_for_moekit"
    package.mkdir()
    (package / "__init__.py").write_text("import missing_dependency_of_broken_pkg\n")
    monkeypatch.syspath_prepend(str(tmp_path))
    with pytest.raises(ModuleNotFoundError) as err:
        require("broken_pkg_for_moekit", "train", "A test")
    assert not isinstance(err.value, MissingExtraError)
    assert err.value.name == "missing_dependency_of_broken_pkg"


def _names(requirements: list[str]) -> set[str]:
    return {re.match(r"[A-Za-z0-9_.-]+", req).group(0).lower() for req in requirements}


def test_core_dependencies_are_torch_numpy_safetensors():
    if sys.version_info >= (3, 11):
        import tomllib
    else:  # pragma: no cover
        import tomli as tomllib
    project = tomllib.loads(PYPROJECT.read_text())["project"]
    extras = project["optional-dependencies"]
    assert _names(project["dependencies"]) == {"torch", "numpy", "safetensors"}
    assert {"mlflow", "matplotlib", "tqdm", "tokenizers"} <= _names(extras["train"])
    assert _names(extras["hf"]) == {"transformers", "peft"}  # moekit.hf, moekit finetune
    assert "moekit[train,hf]" in extras["test"]  # the tests use every extra
