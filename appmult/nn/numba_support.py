"""numba for the CPU loop modules (:mod:`~appmult.nn.gather_loops`,
:mod:`~appmult.nn.int8_loops`, :mod:`~appmult.nn.quant_loops`), or its absence.

numba is an optional dependency of the ``nn`` extra: without it ``numba``, ``njit`` and
``prange`` are ``None``, :data:`AVAILABLE` is ``False``, the loop modules define no
kernels and every caller takes its torch path. (The ``APPMULT_NO_NUMBA`` switch is read
by :func:`appmult.nn.kernels.numba_available`, at each call.)
"""

from __future__ import annotations

try:  # numba is an optional dependency of the nn extra; the torch path works without it
    import numba
    from numba import njit, prange
except ImportError:  # pragma: no cover - exercised only without numba
    numba = njit = prange = None

#: Whether numba is installed.
AVAILABLE = numba is not None


def num_threads() -> int:
    """numba's thread count (call only when :data:`AVAILABLE`)."""
    return numba.get_num_threads()
