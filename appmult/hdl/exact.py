"""The exact multiplier: the full partial-product array (Baugh--Wooley when signed)."""

from __future__ import annotations

from ..codes import codes_to_values
from ._base import PartialProductMultiplier
from .registry import register_family


__all__ = ["ExactMultiplier"]


@register_family
class ExactMultiplier(PartialProductMultiplier):
    """Exact array multiplier: every partial-product bit, summed exactly.

    Signed operands use the modified Baugh--Wooley array (two's complement throughout).
    """

    family = "exact"
    DESCRIPTION = "exact array multiplier (Baugh-Wooley when signed)"

    def _model(self, a_codes, b_codes):
        # Independent of the partial-product expansion: the true product of the values.
        return (codes_to_values(a_codes, self.width_a, self.signed)
                * codes_to_values(b_codes, self.width_b, self.signed))
