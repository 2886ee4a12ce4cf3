"""Numpy reference of what the hardware computes: MAC sums and the fixed-point correction.

The one home of these formulas: :class:`appmult.hdl.MacUnit` implements them in gates,
:mod:`appmult.nn.correction` in torch integer arithmetic, and the testbenches in
:mod:`appmult.tb` check the RTL against these functions.

Fixed-point control-variate correction (``F`` = ``frac_bits``): per output channel the
hardware holds ``alpha_fx`` (``alpha_bar`` with ``F`` fractional bits) and an integer
offset ``B``; with ``S`` the sum of the activations, the correction is
``c = floor((alpha_fx * S + 2**(F-1)) / 2**F) + B`` and the output ``acc - c``.
"""

from __future__ import annotations

import numpy as np

from .codes import check_codes, value_range, wrap_value
from .errors import InvalidTypeError

__all__ = [
    "MAX_FRAC_BITS",
    "check_frac_bits",
    "correct_accumulator",
    "correction_term",
    "mac_correction_reference",
    "mac_reference",
    "port_acc_width",
    "required_acc_width",
    "round_half_up_div",
]

#: Largest number of fractional bits of ``alpha_fx`` (int64 headroom for the products).
MAX_FRAC_BITS = 24


def check_frac_bits(frac_bits: int) -> int:
    """Validate a fractional bit count.

    Raises:
        TypeError: not an integer in ``0 .. MAX_FRAC_BITS``.
    """
    if not isinstance(frac_bits, (int, np.integer)) or isinstance(frac_bits, bool) \
            or not 0 <= int(frac_bits) <= MAX_FRAC_BITS:
        raise InvalidTypeError(f"Correction fractional bits must be an integer in 0..{MAX_FRAC_BITS}, not {frac_bits!r}")
    return int(frac_bits)


def round_half_up_div(n, d: int):
    """``floor(n / d + 1/2)`` in exact integer arithmetic (numpy or torch integers, ``d >= 1``)."""
    return (2 * n + d) // (2 * d)


def correction_term(act_sum, alpha_fx, beta, frac_bits: int):
    """``c = floor((alpha_fx * S + 2**(F-1)) / 2**F) + B`` (``F = 0``: ``alpha_fx*S + B``).

    Integer arrays/tensors (or Python integers) broadcast against each other.
    """
    f = check_frac_bits(frac_bits)
    return round_half_up_div(alpha_fx * act_sum, 1 << f) + beta


def correct_accumulator(acc, act_sum, alpha_fx, beta, frac_bits: int):
    """The corrected accumulator ``acc - c`` (see :func:`correction_term`)."""
    return acc - correction_term(act_sum, alpha_fx, beta, frac_bits)


def required_acc_width(lut, fan_in: int) -> int:
    """Smallest accumulator width that holds any sum of ``fan_in`` products without overflow.

    Uses the LUT's actual product range ``[lo, hi]``: a sum of ``K`` products lies in
    ``[K*min(lo, 0), K*max(hi, 0)]``. Signed multipliers need a two's complement width
    holding both ends; unsigned ones ``ceil(log2(K*hi + 1))`` bits. Approximate
    multipliers that never reach the exact extremes can need a bit less than the generic
    ``width_p + ceil(log2(K))``; ones that exceed them, more.

    Args:
        lut: a LUT (anything with ``product`` and ``signed``, e.g. a
            :class:`~appmult.lut_gen.LutFile`); :func:`appmult.flows.required_acc_width`
            also takes a multiplier.
        fan_in: number of products summed between clears (lanes x beats), >= 1.

    Returns:
        The width in bits (at least 1).

    Raises:
        TypeError: ``fan_in`` is not a positive integer, or ``lut`` has no product table.
    """
    if not isinstance(fan_in, int) or isinstance(fan_in, bool) or fan_in < 1:
        raise InvalidTypeError(f"Fan-in must be a positive integer, not {fan_in!r}")
    if not (hasattr(lut, "product") and hasattr(lut, "signed")):
        raise InvalidTypeError(f"required_acc_width needs a LutFile or a Multiplier, not {lut!r}")
    table = np.asarray(lut.product)
    return _sum_width(int(table.min()), int(table.max()), fan_in, lut.signed)


def port_acc_width(width_p: int, signed: bool, fan_in: int) -> int:
    """Accumulator width that holds any sum of ``fan_in`` values of a ``width_p``-bit product
    port, whatever the circuit behind it computes (:func:`required_acc_width` trusts a LUT's
    range instead, which a circuit under test need not keep)."""
    return _sum_width(*value_range(width_p, signed), fan_in, signed)


def _sum_width(lo: int, hi: int, fan_in: int, signed: bool) -> int:
    low, high = fan_in * min(lo, 0), fan_in * max(hi, 0)
    if not signed:
        return max(1, high.bit_length())
    # W bits hold -2**(W-1) .. 2**(W-1) - 1.
    return 1 + max(high.bit_length(), (-low - 1).bit_length() if low < 0 else 0)


def mac_reference(product, a_codes, b_codes, *, valid, clear, acc_width: int, signed: bool) -> np.ndarray:
    """Accumulator after each beat, as :class:`~appmult.hdl.MacUnit` computes it from a product LUT.

    Args:
        product: the LUT's product table ``[a_code, b_code]``.
        a_codes: ``(beats, lanes)`` operand codes of ``a``.
        b_codes: ``(beats, lanes)`` operand codes of ``b``.
        valid: ``(beats,)`` booleans, ``valid_in`` per beat.
        clear: ``(beats,)`` booleans, ``clear`` per beat (clear first, then add).
        acc_width: accumulator width; sums wrap modulo ``2**acc_width``.
        signed: two's complement accumulator.

    Returns:
        int64 array ``(beats,)``: ``acc`` after each beat (unchanged on idle beats).
    """
    table = np.asarray(product, dtype=np.int64)
    a = check_codes(a_codes, int(table.shape[0]).bit_length() - 1)
    b = check_codes(b_codes, int(table.shape[1]).bit_length() - 1)
    beat_sums = table[a, b].sum(axis=1)
    valid = np.asarray(valid, dtype=bool)
    clear = np.asarray(clear, dtype=bool)
    out = np.empty(len(beat_sums), dtype=np.int64)
    acc = 0
    mask = (1 << acc_width) - 1
    for k, s in enumerate(beat_sums):
        if clear[k]:
            acc = 0
        if valid[k]:
            acc = (acc + int(s)) & mask
        out[k] = acc
    return wrap_value(out, acc_width, signed)


def mac_correction_reference(acc, xsum, alpha_fx: int, beta: int, *, frac_bits: int, acc_width: int) -> np.ndarray:
    """``corrected`` of a :class:`~appmult.hdl.MacUnit` with ``correction=True``, from ``acc`` and ``xsum``.

    :func:`correct_accumulator` wrapped to ``acc_width + 1`` bits (two's complement).

    Args:
        acc: accumulator values (as the port reads, signed or unsigned).
        xsum: activation-sum values (as the port reads).
        alpha_fx: the ``alpha_fx`` input value (signed).
        beta: the ``beta`` input value (signed).
        frac_bits: ``F``.
        acc_width: the MAC's accumulator width.

    Returns:
        int64 array of ``corrected`` values.
    """
    width = acc_width + 1
    # Python integers: alpha_fx * xsum may pass 2**63 for wide sums before the wrap.
    out = [correct_accumulator(int(a), int(x), int(alpha_fx), int(beta), frac_bits) & ((1 << width) - 1)
           for a, x in zip(np.ravel(acc).tolist(), np.ravel(xsum).tolist())]
    out = [v - (1 << width) if v >> (width - 1) else v for v in out]
    return np.asarray(out, dtype=np.int64).reshape(np.shape(acc))
