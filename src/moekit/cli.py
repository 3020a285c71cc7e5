"""The `moekit` command: argparse subcommands over plain library functions.

moekit info    the versions, threads and kernels this machine gives moekit
"""

from __future__ import annotations

import argparse
import platform

import torch
import torch.nn.functional as F

from . import __version__


def _info(_: argparse.Namespace) -> int:
    print(f"moekit {__version__}")
    print(f"torch {torch.__version__}, python {platform.python_version()}, {platform.machine()}")
    print(f"threads {torch.get_num_threads()}, cuda available {torch.cuda.is_available()}")
    print(f"grouped_mm available {hasattr(F, 'grouped_mm')}")
    return 0


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="moekit", description=__doc__.splitlines()[0])
    parser.add_argument("--version", action="version", version=f"moekit {__version__}")
    commands = parser.add_subparsers(dest="command", required=True)
    info = commands.add_parser("info", help="print versions, threads and available kernels")
    info.set_defaults(run=_info)
    return parser


def main(argv: list[str] | None = None) -> int:
    args = build_parser().parse_args(argv)
    return args.run(args)
