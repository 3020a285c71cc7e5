"""The one place that imports moekit's Triton modules (optional: triton may be missing).

`MOEKIT_TRITON=0` in the environment turns them all off (the torch twins run instead): for
comparing the two paths, or where a Triton build misbehaves.
"""

from __future__ import annotations

import functools
import importlib
import os
from types import ModuleType


@functools.cache
def triton_module(name: str) -> ModuleType | None:
    """`moekit.ops.<name>`, or None where triton is not installed, cannot load here, or
    `MOEKIT_TRITON=0`."""
    if os.environ.get("MOEKIT_TRITON", "1") == "0":
        return None
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except Exception:  # not installed, or no driver for this platform
        return None
