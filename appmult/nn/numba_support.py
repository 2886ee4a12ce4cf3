"""numba for the CPU loop modules (:mod:`~appmult.nn.gather_loops`,
:mod:`~appmult.nn.int8_loops`, :mod:`~appmult.nn.quant_loops`), or its absence.

numba is an optional dependency of the ``nn`` extra: without it ``numba``, ``njit`` and
``prange`` are ``None``, :data:`AVAILABLE` is ``False``, the loop modules define no
kernels and every caller takes its torch path. (The ``APPMULT_NO_NUMBA`` switch is read
by :func:`appmult.nn.kernels.numba_available`, at each call.)
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

try:  # numba is an optional dependency of the nn extra; the torch path works without it
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only without numba
    numba = njit = prange = None

#: Whether numba is installed.
AVAILABLE = numba is not None


def _start_pool_keeping_torch_threads() -> None:
    """Start numba's thread pool now, and give torch back the thread count it had.

    Starting numba's OpenMP pool (which its first parallel kernel does) resets the OpenMP
    thread count that torch runs its own kernels with: after ``torch.set_num_threads(1)``,
    one numba kernel, and torch reported -- and used -- every core again (1 -> 2 here). So
    ``retrain --threads 1`` ran on two threads from the first approximate layer on, and a
    resumed run could not be told from it. Started here, between reading torch's count and
    setting it back, the pool leaves the user's setting alone (about 2 ms, once).
    """
    import torch

    threads = torch.get_num_threads()
    try:
        from numba.np.ufunc.parallel import _launch_threads
    except ImportError:  # pragma: no cover - a numba without this (private) entry: starts on first use
        return
    _launch_threads()
    torch.set_num_threads(threads)


if AVAILABLE:
    _start_pool_keeping_torch_threads()


def num_threads() -> int:
    """numba's thread count (call only when :data:`AVAILABLE`)."""
    return numba.get_num_threads()


@contextlib.contextmanager
def cpu_threads(threads: int | None) -> Iterator[None]:
    """Run a block on ``threads`` CPU threads: torch's and appmult's numba kernels' (numba's
    capped at the count its pool started with); both are restored afterwards. ``None``
    changes nothing."""
    if threads is None:
        yield
        return
    import torch

    saved = torch.get_num_threads(), (numba.get_num_threads() if AVAILABLE else None)
    torch.set_num_threads(threads)
    if AVAILABLE:
        numba.set_num_threads(min(threads, numba.config.NUMBA_NUM_THREADS))
    try:
        yield
    finally:
        torch.set_num_threads(saved[0])
        if AVAILABLE:
            numba.set_num_threads(saved[1])
