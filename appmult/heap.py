"""Keep freed memory in the process, so that torch's CPU tensors stop faulting their pages in.

glibc's ``malloc`` serves a block of 128 KiB or more by a fresh ``mmap`` (the threshold then
follows the largest block freed, up to 32 MiB) and gives the top of its heap back to the
kernel whenever more than twice that threshold is free there. A training step allocates
and frees the same few activation-sized tensors every call, so with the defaults their
memory goes back to the kernel at the end of a step and comes back page by page, one
page fault per 4 KiB, at the start of the next; a fault costs about 1.6 us on the 2-core
VM these figures come from. ``benchmarks/bench_train_step.py`` (LeNet-5, batch 128,
approximate layers through an exact-product LUT, interleaved with other networks):
1,176 faults and 18.1 ms a step with the defaults, 1 and 15.9 ms with the heap kept; the
float ResNet-20 conv's forward alone, in a loop: 7.6 ms with the defaults, 2.9 ms with the heap kept.

:func:`keep_freed_memory` sets two ``mallopt`` parameters once per process: every block
comes from the heap (no ``mmap`` of its own), and the heap is given back to the kernel only
when 2 GiB at its top are free. Keeping blocks of up to 32 MiB (glibc's largest moving
threshold) was not enough: a CIFAR ResNet-18 float training step (batch 128) still faulted
62,881 pages a step (2.27 s) against 1,639 with no ``mmap`` (2.16 s; 258,626 and 2.50 s with
the defaults; measured through glibc's ``MALLOC_*_`` variables, trim threshold 4 GB). The price is a resident size that stays near the process's peak until it
exits. :mod:`appmult.nn` and :mod:`appmult.train` call it when imported. It does nothing
where ``APPMULT_NO_MALLOPT=1`` is set, where the user chose malloc settings of their own
(any ``MALLOC_*_`` variable, or ``glibc.malloc`` in ``GLIBC_TUNABLES``), and off glibc
(musl, macOS, Windows).
"""

from __future__ import annotations

import ctypes
import os
from collections.abc import Mapping

#: ``mallopt`` parameter numbers (glibc ``malloc.h``).
M_TRIM_THRESHOLD = -1
M_MMAP_MAX = -4

#: The heap is given back to the kernel only when this much is free at its top (the largest
#: value ``mallopt``'s ``int`` takes).
TRIM_THRESHOLD = (1 << 31) - 1

#: Environment variables through which a user sets glibc's malloc parameters.
_USER_SETTINGS = ("MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", "MALLOC_MMAP_MAX_",
                  "MALLOC_ARENA_MAX")

_done: bool | None = None


def user_chose(environ: Mapping[str, str]) -> str | None:
    """The setting in ``environ`` that leaves malloc alone (the opt-out or the user's own
    malloc parameters), or ``None``."""
    if environ.get("APPMULT_NO_MALLOPT", "") not in ("", "0"):
        return "APPMULT_NO_MALLOPT"
    for name in _USER_SETTINGS:
        if name in environ:
            return name
    if "glibc.malloc" in environ.get("GLIBC_TUNABLES", ""):
        return "GLIBC_TUNABLES"
    return None


def _glibc_mallopt():
    """glibc's ``mallopt`` in this process, or ``None`` elsewhere."""
    try:
        libc = ctypes.CDLL(None)
        libc.gnu_get_libc_version  # noqa: B018 -- only glibc has it (musl also has mallopt, a no-op)
        mallopt = libc.mallopt
    except (OSError, AttributeError):
        return None
    mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    mallopt.restype = ctypes.c_int
    return mallopt


def keep_freed_memory() -> bool:
    """Set glibc's malloc to serve every block from its heap and keep what is freed there
    (see the module docstring); once per process. Returns whether the settings are in effect."""
    global _done
    if _done is None:
        mallopt = None if user_chose(os.environ) else _glibc_mallopt()
        _done = mallopt is not None and bool(mallopt(M_MMAP_MAX, 0)) \
            and bool(mallopt(M_TRIM_THRESHOLD, TRIM_THRESHOLD))
    return _done
