"""Host memory the process has freed, handed back to the system.

glibc's malloc keeps what a training step frees in its arenas' free lists: a step's
activations come and go, the holes between live blocks are not returned, and a CPU run's
resident memory climbs step after step (a 1.2B nf4 LoRA fine-tune here: +250 MB a step over
its first steps, a third of its peak). `trim_host_memory()` asks malloc to return them
(`malloc_trim(0)`). Pages handed back are faulted in again when reused, so a step pays for
what it trims: the training loop trims after loading, and after a CPU step only where the
arenas hold more than `STEP_TRIM_BYTES` free (the makemoe LM frees ~65 MB a step; trimming
that each step made its 112 ms step 18 ms slower; a 1.2B model's ~600 MB cost nothing
measurable). Elsewhere (macOS, musl) it does nothing.

Large blocks fragment it most: glibc maps a block of at least its mmap threshold on its own
and unmaps it when freed, but raises that threshold to the largest block freed so far (up to
32 MB), so after a step a model's activations and gradients come from the heap and leave holes
there. `map_large_blocks()` fixes the threshold (4 MB). An nf4 LoRA step of the 3.6B bench
model peaked 445 MB (11%) lower and ran 13% slower (each block's pages faulted in anew: ~6 GB
of blocks a step); a quantised fine-tune on the CPU, which is there to fit, sets it before it
loads (set after loading, the weights kept sat between the load's holes: half the gain).
"""

from __future__ import annotations

import ctypes
import ctypes.util
import functools

__all__ = ["LARGE_BLOCK_BYTES", "STEP_TRIM_BYTES", "map_large_blocks", "trim_host_memory"]

STEP_TRIM_BYTES = 256 * 2**20
LARGE_BLOCK_BYTES = 4 * 2**20
_M_MMAP_THRESHOLD = -3  # mallopt's parameter (malloc.h)


class _MallInfo2(ctypes.Structure):  # glibc >= 2.33
    _fields_ = [
        (name, ctypes.c_size_t)
        for name in (
            "arena",
            "ordblks",
            "smblks",
            "hblks",
            "hblkhd",
            "usmblks",
            "fsmblks",
            "uordblks",
            "fordblks",  # bytes free in the arenas
            "keepcost",
        )
    ]


@functools.cache
def _libc():
    """The C library where it has `malloc_trim` (glibc), else None."""
    name = ctypes.util.find_library("c")
    try:
        libc = ctypes.CDLL(name) if name else None
    except OSError:
        return None
    if libc is None or not hasattr(libc, "malloc_trim"):
        return None
    if hasattr(libc, "mallinfo2"):
        libc.mallinfo2.restype = _MallInfo2
    return libc


def free_in_arenas() -> int | None:
    """Bytes malloc holds free in its arenas (`mallinfo2`), None where it cannot say."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallinfo2"):
        return None
    return libc.mallinfo2().fordblks


def trim_host_memory(min_free: int = 0) -> bool:
    """Return the free pages of malloc's arenas to the system, where they hold at least
    `min_free` bytes (0: always); whether it trimmed."""
    libc = _libc()
    if libc is None:
        return False
    if min_free > 0 and (free_in_arenas() or 0) < min_free:
        return False
    libc.malloc_trim(0)
    return True


def map_large_blocks(threshold: int = LARGE_BLOCK_BYTES) -> bool:
    """Have malloc map every block of at least `threshold` bytes on its own and unmap it when
    freed, for the rest of the process (`mallopt(M_MMAP_THRESHOLD)`: the threshold no longer
    rises); whether it could."""
    libc = _libc()
    if libc is None or not hasattr(libc, "mallopt"):
        return False
    return bool(libc.mallopt(_M_MMAP_THRESHOLD, threshold))
