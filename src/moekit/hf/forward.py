"""The base of the plain objects `patch_model` sets as a module's `forward`.

A patched module's `forward` is an instance attribute holding a picklable object with a
`__call__` (`routers.Router`, `blocks.Experts`, ...), not a function. Tools that read a
forward's code object to name its arguments (`torch.export`'s non-strict tracing reads
`module.forward.__code__`) read the code of that `__call__`, whose arguments after `self` are
the forward's.
"""

from __future__ import annotations

from types import CodeType

__all__ = ["PatchedForward"]


class PatchedForward:
    """A module's patched forward: `__call__` is the forward, `__code__` its code."""

    @property
    def __code__(self) -> CodeType:
        return type(self).__call__.__code__
