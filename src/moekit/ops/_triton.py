"""The one place that imports moekit's Triton modules (optional: triton may be missing)."""

from __future__ import annotations

import functools
import importlib
from types import ModuleType


@functools.cache
def triton_module(name: str) -> ModuleType | None:
    """`moekit.ops.<name>`, or None where triton is not installed or cannot load here."""
    try:
        return importlib.import_module(f"{__package__}.{name}")
    except Exception:  # not installed, or no driver for this platform
        return None
