"""Optional dependencies: imported where they are used, never by `import moekit`.

The core (layers, routing, dispatch, the language model, checkpoints) needs torch, numpy and
safetensors. The extras add: `train` (mlflow, matplotlib, tqdm, tokenizers, and tomli below
Python 3.11: `moekit train`, BPE tokenizers) and `hf` (transformers: the benchmark's Hugging
Face peer). `require` imports one of them or says which `pip install` brings it.
"""

from __future__ import annotations

import importlib
from types import ModuleType


class MissingExtraError(ModuleNotFoundError):
    """An optional dependency is not installed; the message names the pip command."""


def require(module: str, extra: str, purpose: str) -> ModuleType:
    """Import `module` (dotted names allowed) from the optional dependencies of `extra`.

    Args:
        module: The module to import, e.g. "mlflow" or "matplotlib.pyplot".
        extra: The moekit extra that installs it, e.g. "train".
        purpose: What needs it, the subject of the error message, e.g. "MLflow tracking".

    Returns:
        The imported module.

    Raises:
        MissingExtraError: `module`'s package is not installed.
    """
    package = module.partition(".")[0]
    try:
        return importlib.import_module(module)
    except ModuleNotFoundError as err:
        # only the package itself missing is ours to explain; a broken install reads as it is
        if err.name is None or err.name.partition(".")[0] != package:
            raise
        raise MissingExtraError(
            f'{purpose} needs {package}, which is not installed: pip install "moekit[{extra}]"',
            name=package,
        ) from err
