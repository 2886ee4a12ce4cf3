"""Specs too wide for a full product LUT, refused with what to do from the command line."""

from __future__ import annotations


def check_lut_widths(spec: str, why: str) -> None:
    """Refuse a spec too wide for a full product LUT, with what to do from the command line.

    (The Python API's own message points at ``characterize_metrics``, which a command-line
    user cannot call; ``appmult characterize`` gives such a multiplier's metrics.)

    Raises:
        appmult.errors.UsageError: an operand wider than
            :data:`~appmult.lut_gen.characterization.MAX_LUT_WIDTH` bits.
        appmult.errors.SpecError: a spec that does not parse.
    """
    import shlex

    from ..errors import UsageError
    from ..hdl import from_spec
    from ..lut_gen.characterization import MAX_LUT_WIDTH
    mult = from_spec(spec)
    if max(mult.width_a, mult.width_b) > MAX_LUT_WIDTH:
        raise UsageError(f"Full product LUTs are limited to {MAX_LUT_WIDTH}x{MAX_LUT_WIDTH} operands and {why}; "
                         f"{mult.spec} is {mult.width_a}x{mult.width_b}: use operands of at most {MAX_LUT_WIDTH} "
                         f"bits. For this one's error metrics, run "
                         f"'appmult characterize {shlex.quote(spec)} -o DIR' (metrics only above "
                         f"{MAX_LUT_WIDTH} bits)")
