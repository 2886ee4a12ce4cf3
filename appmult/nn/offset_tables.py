"""A LUT's entries offset by its minimum, as the 16-bit tables the CPU gather kernels read.

Where a table's entries span fewer than ``2**16`` values (every 8x8 multiplier's), the
gathers look up ``T - min`` instead of ``T`` (half the cache footprint of int32; the caller
adds ``K * min`` back, exactly): the scalar loops of :mod:`appmult.nn.gather_loops` as a
uint16 table indexed ``[w, x]``, the byte-shuffle kernel of :mod:`appmult.nn.byte_shuffle`
as its byte planes. Both are made once per table tensor and kept in a small cache keyed by
the tensor's identity and version (a write to the table bumps its version and makes new
ones), so a layer called many times -- or the many small products of an attention layer --
converts its table once, not per call. :func:`float_planes` keeps, the same way, the byte
planes of a float32 LUT-2D gradient table (:mod:`appmult.nn.float_shuffle`).
"""

from __future__ import annotations

import collections
import threading
import weakref

import numpy as np
import torch

from . import byte_shuffle, float_shuffle

#: Most tables kept; the one cached first is dropped first.
CACHE_SIZE = 32


class OffsetTables:
    """``t16``: ``(NB, NA)`` uint16 ``T[x, w] - lo`` indexed ``[w, x]``; ``lo``/``hi``: the
    table's minimum and maximum; :attr:`planes`: the byte-shuffle planes (made on first use)."""

    __slots__ = ("t16", "lo", "hi", "_planes")

    def __init__(self, t16: np.ndarray, lo: int, hi: int):
        self.t16, self.lo, self.hi = t16, lo, hi
        self._planes = None

    @property
    def planes(self) -> np.ndarray:
        """:func:`byte_shuffle.planes` of :attr:`t16` (made once)."""
        if self._planes is None:
            self._planes = byte_shuffle.planes(self.t16)
        return self._planes


#: ``id(table)`` -> (weak reference to it, its ``_version``, :class:`OffsetTables` or
#: ``None``): a new tensor at a reused id fails the reference check.
_cache: collections.OrderedDict = collections.OrderedDict()
_lock = threading.Lock()


def _per_tensor(table: torch.Tensor, kind: str, make):
    """``make()``, kept per (tensor, ``kind``) while the tensor lives and its version holds."""
    key = (id(table), kind)
    with _lock:
        hit = _cache.get(key)
    if hit is None or hit[0]() is not table or hit[1] != table._version:
        hit = (weakref.ref(table), table._version, make())
        with _lock:
            _cache[key] = hit
            while len(_cache) > CACHE_SIZE:
                _cache.popitem(last=False)
    return hit[2]


def offset_tables(table: torch.Tensor) -> OffsetTables | None:
    """The 16-bit forms of the integer ``(NA, NB)`` ``table`` (cached), or ``None`` where its
    entries span ``2**16`` values or more or it has none (the callers' other paths then give
    their own result or error).

    The cache trusts the tensor's version counter: a write through ``.data`` or a numpy view
    of the same memory does not bump it (the LUT tables of :class:`~appmult.nn.tables.LutTables`
    are never written after construction)."""
    if table.numel() == 0:
        return None
    return _per_tensor(table, "offset", lambda: _offset(table))


def _offset(table: torch.Tensor) -> OffsetTables | None:
    lo, hi = (int(v) for v in torch.aminmax(table))
    if hi - lo >= 1 << 16:
        return None
    t16 = np.ascontiguousarray((table.t().to(torch.int64) - lo).numpy().astype(np.uint16))
    return OffsetTables(t16, lo, hi)


def float_planes(table: torch.Tensor) -> np.ndarray:
    """:func:`float_shuffle.planes` of the float ``(NA <= 256, NB <= 256)`` gradient table
    indexed ``[x, w]`` (its transpose's rows, one per weight code), cached like
    :func:`offset_tables`."""
    return _per_tensor(table, "float_planes",
                       lambda: float_shuffle.planes(table.detach().t().to(torch.float32).contiguous().numpy()))
