"""The `moekit` command: in-process and once as the installed program."""

from __future__ import annotations

import shutil
import subprocess
import sys

import pytest

from moekit.cli import main


def test_info_in_process(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    assert "moekit" in out and "torch" in out and "grouped_mm available" in out
    assert "native bf16 GEMM" in out and "triton combine kernels on CUDA" in out


def test_unknown_command_exits_with_usage():
    with pytest.raises(SystemExit) as err:
        main(["fly"])
    assert err.value.code == 2


def test_python_dash_m_and_installed_command():
    result = subprocess.run(
        [sys.executable, "-m", "moekit", "info"], capture_output=True, text=True
    )
    assert result.returncode == 0 and "moekit" in result.stdout
    if shutil.which("moekit"):
        result = subprocess.run(["moekit", "--version"], capture_output=True, text=True)
        assert result.returncode == 0 and result.stdout.startswith("moekit")
