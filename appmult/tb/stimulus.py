"""What the testbenches drive: operand pairs, corner cases, MAC beats, and lanes packed on a bus.

The host side (:mod:`appmult.tb.verify`) chooses and validates the operands here; the
in-simulator modules use :func:`pack_lanes` / :func:`unpack_lanes` to put many operand
pairs on one wide bus. numpy only -- no cocotb, no Amaranth -- so both sides can import it.

Why lanes: each cocotb write/read/``await`` crosses the simulator interface (tens of
microseconds); driving 64 instances of the same module per time step cuts that overhead
64-fold, so an exhaustive 8x8 check takes about a second instead of tens of seconds.
"""

from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from ..codes import values_to_codes
from ..errors import InvalidTypeError, InvalidValueError

__all__ = [
    "DEFAULT_SAMPLE",
    "EXHAUSTIVE_MAX_WIDTH",
    "MAC_CORRECTION_STIMULUS",
    "corner_codes",
    "mac_correction_stimulus",
    "mac_stimulus",
    "operand_pairs",
    "pack_lanes",
    "unpack_lanes",
]

#: Operands up to this width are checked exhaustively (every pair); wider ones are sampled.
EXHAUSTIVE_MAX_WIDTH = 10
#: Random pairs drawn (besides the corner cases) when the check is not exhaustive.
DEFAULT_SAMPLE = 1 << 16
#: The per-beat arrays :func:`appmult.tb.run_mac_correction` drives.
MAC_CORRECTION_STIMULUS = ("a", "b", "valid", "clear", "alpha_fx", "beta")


# -- multiplier operands ----------------------------------------------------------------------

def corner_codes(width: int, signed: bool) -> np.ndarray:
    """Codes of the corner-case values: 0, 1, -1, max, min, next to max and min, every power
    of two (both signs) and every all-ones pattern ``2**k - 1``.

    Args:
        width: operand width.
        signed: two's complement operand.

    Returns:
        Sorted unique int64 codes.
    """
    if signed:
        lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
    else:
        lo, hi = 0, (1 << width) - 1
    values = {0, 1, lo, hi, hi - 1, lo + 1}
    if signed:
        values.add(-1)
    for k in range(width):
        for v in (1 << k, -(1 << k), (1 << k) - 1):
            if lo <= v <= hi:
                values.add(v)
    return np.unique(values_to_codes(np.array(sorted(values)), width, signed))


def operand_pairs(width_a: int, width_b: int, signed: bool, *, seed: int,
                  max_pairs: int | None) -> tuple[np.ndarray, bool]:
    """Operand code pairs to drive, shape (n, 2), and whether that is every pair.

    Every pair when both widths are at most :data:`EXHAUSTIVE_MAX_WIDTH` and ``max_pairs``
    allows it; else every combination of :func:`corner_codes` followed by a seeded
    random sample (:data:`DEFAULT_SAMPLE` pairs, or up to ``max_pairs`` in all).

    Raises:
        ValueError: ``max_pairs`` is not a positive integer or None.
    """
    total = 1 << (width_a + width_b)
    if max_pairs is not None and (not isinstance(max_pairs, int) or isinstance(max_pairs, bool)
                                  or max_pairs < 1):
        raise InvalidValueError(f"max_pairs must be a positive integer or None, not {max_pairs!r}")
    exhaustive_ok = max(width_a, width_b) <= EXHAUSTIVE_MAX_WIDTH
    if exhaustive_ok and (max_pairs is None or max_pairs >= total):
        a, b = np.meshgrid(np.arange(1 << width_a), np.arange(1 << width_b), indexing="ij")
        return np.stack([a.ravel(), b.ravel()], axis=1).astype(np.int64), True
    ca, cb = corner_codes(width_a, signed), corner_codes(width_b, signed)
    ga, gb = np.meshgrid(ca, cb, indexing="ij")
    flat = (ga.ravel().astype(np.int64) << width_b) | gb.ravel()
    flat = flat[np.sort(np.unique(flat, return_index=True)[1])]  # distinct, in corner order
    n_random = DEFAULT_SAMPLE if max_pairs is None else max(0, max_pairs - len(flat))
    n_random = min(n_random, total - len(flat))
    # distinct pairs, none a corner: drawn with replacement, --max-pairs 65535 of 8x8 checked
    # only 63% of the pairs it counted, and one wrong pair was reported three times
    rand = _distinct_sample(np.random.default_rng(seed), total, n_random, flat)
    both = np.concatenate([flat, rand])
    pairs = np.stack([both >> width_b, both & ((1 << width_b) - 1)], axis=1).astype(np.int64)
    if max_pairs is not None:
        pairs = pairs[:max_pairs]
    return pairs, len(pairs) == total  # (a sample that holds every pair is exhaustive)


def _distinct_sample(rng: np.random.Generator, total: int, n: int, exclude: np.ndarray) -> np.ndarray:
    """``n`` distinct integers of ``0 .. total-1`` not in ``exclude``, in drawing order (seeded).

    Drawn with replacement in rounds and de-duplicated, so the memory follows ``n``, not
    ``total`` (``Generator.choice(total, replace=False)`` builds the whole population when
    ``n`` is a sizeable share of it: 32 GiB for 16x16); a dense request is a permutation.
    """
    if n <= 0:
        return np.empty(0, dtype=np.int64)
    if 4 * (n + len(exclude)) >= total:
        picked = rng.permutation(total)
        return picked[~np.isin(picked, exclude)][:n].astype(np.int64)
    chosen = np.empty(0, dtype=np.int64)
    while len(chosen) < n:
        draw = np.concatenate([chosen, rng.integers(0, total, size=2 * (n - len(chosen)) + 16, dtype=np.int64)])
        draw = draw[~np.isin(draw, exclude)]
        chosen = draw[np.sort(np.unique(draw, return_index=True)[1])]
    return chosen[:n]


# -- MAC beats --------------------------------------------------------------------------------

def mac_stimulus(mac, stimulus: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validated ``a``, ``b`` (beats, lanes) codes and ``valid``, ``clear`` (beats,) flags.

    Args:
        mac: the :class:`~appmult.hdl.MacUnit` the beats are for.
        stimulus: as for :func:`appmult.tb.run_mac`; ``valid`` defaults to all True,
            ``clear`` to all False.

    Raises:
        TypeError: not a mapping, or codes that are not integers.
        ValueError: unknown or missing keys, wrong shapes, codes out of range.
    """
    if not isinstance(stimulus, Mapping):
        raise InvalidTypeError(f"MAC stimulus must be a mapping with keys 'a', 'b' (and optionally 'valid', "
                               f"'clear'), not {type(stimulus).__name__}")
    unknown = sorted(set(stimulus) - {"a", "b", "valid", "clear"})
    if unknown:
        raise InvalidValueError(f"MAC stimulus has unknown keys {', '.join(map(repr, unknown))}; "
                                f"expected 'a', 'b', 'valid', 'clear'")
    mult = mac.multiplier
    out: dict[str, np.ndarray] = {}
    for key, width in (("a", mult.width_a), ("b", mult.width_b)):
        if key not in stimulus:
            raise InvalidValueError(f"MAC stimulus needs {key!r}: (beats, lanes) operand codes")
        arr = np.asarray(stimulus[key])
        if arr.ndim != 2 or arr.shape[1] != mac.lanes or arr.shape[0] < 1:
            raise InvalidValueError(f"MAC stimulus {key!r} must have shape (beats >= 1, {mac.lanes}) for a "
                                    f"{mac.lanes}-lane MAC, not {arr.shape}")
        if not np.issubdtype(arr.dtype, np.integer):
            raise InvalidTypeError(f"MAC stimulus {key!r} must hold integer codes, not {arr.dtype}")
        if arr.min() < 0 or arr.max() >= (1 << width):
            raise InvalidValueError(f"MAC stimulus {key!r} holds codes outside 0..{(1 << width) - 1} "
                                    f"({width}-bit operand)")
        out[key] = arr.astype(np.int64)
    beats = out["a"].shape[0]
    if out["b"].shape[0] != beats:
        raise InvalidValueError(f"MAC stimulus 'a' has {beats} beats but 'b' has {out['b'].shape[0]}")
    # Defaults: every beat valid; no clear (reset leaves the accumulator at 0).
    for key, default in (("valid", True), ("clear", False)):
        arr = np.asarray(stimulus.get(key, np.full(beats, default)))
        if arr.shape != (beats,) or arr.dtype != np.bool_:
            raise InvalidValueError(f"MAC stimulus {key!r} must be {beats} booleans (one per beat), "
                                    f"not {arr.dtype} of shape {arr.shape}")
        out[key] = arr
    return out


def mac_correction_stimulus(mac, stimulus: Mapping[str, Any]) -> dict[str, np.ndarray]:
    """Validated per-beat arrays (:data:`MAC_CORRECTION_STIMULUS`) for a correcting MAC.

    Args:
        mac: a :class:`~appmult.hdl.MacUnit` with ``correction=True``.
        stimulus: ``a``, ``b`` ``(beats, lanes)`` codes; ``valid``, ``clear``, ``alpha_fx``,
            ``beta`` ``(beats,)``.

    Raises:
        ValueError: an array is missing or mis-shaped, or an ``alpha_fx``/``beta`` does not
            fit its port.
    """
    missing = [k for k in MAC_CORRECTION_STIMULUS if k not in stimulus]
    if missing:
        raise InvalidValueError(f"MAC correction stimulus lacks {', '.join(missing)}")
    st = {k: np.asarray(stimulus[k]) for k in MAC_CORRECTION_STIMULUS}
    beats = len(st["valid"])
    if st["a"].shape != (beats, mac.lanes) or st["b"].shape != (beats, mac.lanes) \
            or any(st[k].shape != (beats,) for k in ("clear", "alpha_fx", "beta")):
        raise InvalidValueError(f"MAC correction stimulus must be (beats, {mac.lanes}) operands and (beats,) controls")
    for key, width in (("alpha_fx", mac.alpha_width), ("beta", mac.acc_width)):
        lo, hi = -(1 << (width - 1)), (1 << (width - 1)) - 1
        if st[key].size and (int(st[key].min()) < lo or int(st[key].max()) > hi):
            raise InvalidValueError(f"MAC {key} values must fit the {width}-bit signed port ({lo}..{hi})")
    return st


# -- packed buses (used by the in-simulator side) ---------------------------------------------

def pack_lanes(codes: np.ndarray, width: int) -> list[int]:
    """Packed bus values: row ``k`` of ``codes`` (lanes) becomes one integer, lane 0 in the LSBs."""
    n, lanes = codes.shape
    bits = ((codes[:, :, None] >> np.arange(width)) & 1).astype(np.uint8).reshape(n, lanes * width)
    packed = np.packbits(bits, axis=1, bitorder="little")
    return [int.from_bytes(row.tobytes(), "little") for row in packed]


def unpack_lanes(words: list[int], lanes: int, width: int) -> np.ndarray:
    """Inverse of :func:`pack_lanes` for resolved bus values: shape (len(words) * lanes,) of codes."""
    nbytes = (lanes * width + 7) // 8
    raw = np.frombuffer(b"".join(w.to_bytes(nbytes, "little") for w in words), dtype=np.uint8)
    bits = np.unpackbits(raw.reshape(len(words), nbytes), axis=1, bitorder="little")[:, :lanes * width]
    bits = bits.reshape(len(words) * lanes, width).astype(np.int64)
    return bits @ (np.int64(1) << np.arange(width, dtype=np.int64))
