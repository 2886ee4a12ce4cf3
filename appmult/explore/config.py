"""What a search optimizes: error objective, cost figure, error bounds, constraints, budget.

Error figures and their units (as :mod:`appmult.lut_gen.metrics` names them):

========  ==============================================  =====================
name      figure                                          unit of bounds
========  ==============================================  =====================
``mae``   mean ``|approx - exact|`` (``mae_pct``)          % of ``2**(wa+wb)``
``wce``   worst-case ``|approx - exact|`` (``wce_pct``)    % of ``2**(wa+wb)``
``mre``   mean relative error over exact != 0 (``mre_pct``)  %
``er``    error rate, share of pairs with an error          %
``mse``   mean squared error                                absolute
========  ==============================================  =====================

With operand distributions (``p_a``/``p_b``, e.g. histograms of a layer's inputs) the
mean figures are weighted by ``p_a[a] * p_b[b]`` and ``wce`` runs over the pairs of
non-zero weight.
"""

from __future__ import annotations

import dataclasses
import math
import re

from ..errors import ConfigError, InvalidValueError
from ._kernels import COST_FIGURES

__all__ = ["COST_FIGURES", "DEFAULT_BOUNDS", "ERROR_METRICS", "ExploreConfig", "parse_budget"]

#: Error objectives a search can bound.
ERROR_METRICS = ("mae", "mre", "wce", "mse", "er")

#: Error figures that are a share of the operand pairs in %, so never above 100.
PERCENT_OF_PAIRS = ("er",)

#: Most children per generation: each holds a simulation buffer of every gate's values over
#: one chunk of vectors (about 2.6 MB at 8x8, 64 MB at 10x10), so 64 children stay within a
#: few GB; CGP's usual lambda is 4 to a few tens.
MAX_LAM = 64
#: Default error bounds (a geometric sweep) per objective; ``mse`` has none (give bounds).
DEFAULT_BOUNDS = {
    "mae": (0.005, 0.01, 0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0),
    "wce": (0.02, 0.05, 0.1, 0.2, 0.5, 1.0, 2.0, 5.0),
    "mre": (0.1, 0.2, 0.5, 1.0, 2.0, 5.0, 10.0, 20.0),
    "er": (1.0, 2.0, 5.0, 10.0, 20.0, 50.0, 80.0, 95.0),
}

_UNITS = {"s": 1, "sec": 1, "m": 60, "min": 60, "h": 3600}


def parse_budget(text: str | float | int) -> float:
    """Seconds of a time budget: ``"90s"``, ``"10m"``, ``"1.5h"``, or a number of seconds.

    Raises:
        appmult.errors.InvalidValueError: not a positive duration.
    """
    if isinstance(text, (int, float)) and not isinstance(text, bool):
        seconds = float(text)
    else:
        match = re.fullmatch(r"\s*([0-9]*\.?[0-9]+)\s*(s|sec|m|min|h)?\s*", str(text))
        if not match:
            raise InvalidValueError(f"Budget must be a duration like 90s, 10m or 1h, not {text!r}")
        seconds = float(match.group(1)) * _UNITS[match.group(2) or "s"]
    if not math.isfinite(seconds) or seconds <= 0:
        raise InvalidValueError(f"Budget must be a positive duration, not {text!r}")
    return seconds


def _positive_int(name: str, value, low: int = 1) -> None:
    if not isinstance(value, int) or isinstance(value, bool) or value < low:
        raise ConfigError(f"{name} must be an integer of at least {low}, not {value!r}")


@dataclasses.dataclass(frozen=True)
class ExploreConfig:
    """Configuration of a gate-level search (frozen, validated, hashable).

    Attributes:
        error: error objective, one of :data:`ERROR_METRICS`.
        cost: cost figure to minimize, one of ``transistors``, ``gates``, ``aig_nodes``,
            ``depth`` (the search's estimate; reported figures come from Yosys).
        bounds: increasing error bounds (units in the module docstring); the search
            minimizes cost under each in turn, each run starting from the previous
            bound's best circuit. ``None``: :data:`DEFAULT_BOUNDS` of the objective.
        constraints: ``((metric, maximum), ...)`` every reported circuit must meet, e.g.
            ``(("wce", 1.0),)``: WCE at most 1% of ``2**(wa+wb)``.
        evaluations: candidate evaluations in all (split evenly over the bounds); the
            reproducible budget.
        budget_s: wall-clock seconds in all (split evenly over the bounds); not
            reproducible across machines. At least one of the two must be given; the
            search stops at whichever comes first.
        lam: children per generation of the (1 + lambda) strategy.
        max_mutations: each child gets 1 .. this many mutations.
        seed: random seed (same seed, same evaluation budget: same result).
        p_a: distribution of ``a`` codes (length ``2**width_a``) or ``None`` (uniform).
        p_b: distribution of ``b`` codes or ``None``.
        samples: pairs sampled when an operand is wider than 12 bits.
        checkpoint_every: generations between checkpoints.

    Raises:
        appmult.errors.ConfigError: any field that makes no sense (the message says which).
    """

    error: str = "mae"
    cost: str = "transistors"
    bounds: tuple[float, ...] | None = None
    constraints: tuple[tuple[str, float], ...] = ()
    evaluations: int | None = None
    budget_s: float | None = None
    lam: int = 4
    max_mutations: int = 3
    seed: int = 0
    p_a: tuple[float, ...] | None = None
    p_b: tuple[float, ...] | None = None
    samples: int = 1 << 18
    checkpoint_every: int = 500

    def __post_init__(self):
        if self.error not in ERROR_METRICS:
            raise ConfigError(f"Unknown error objective {self.error!r}; choose one of {', '.join(ERROR_METRICS)}")
        if self.cost not in COST_FIGURES:
            raise ConfigError(f"Unknown cost figure {self.cost!r}; choose one of {', '.join(COST_FIGURES)}")
        bounds = self.bounds
        if bounds is None:
            if self.error not in DEFAULT_BOUNDS:
                raise ConfigError(f"Error objective {self.error!r} has no default bounds; give bounds")
        else:
            bounds = tuple(bounds)
            if not bounds or any(isinstance(b, bool) or not isinstance(b, (int, float)) or not math.isfinite(b)
                                 or b < 0 for b in bounds):
                raise ConfigError(f"Error bounds must be non-negative numbers, not {self.bounds!r}")
            if list(bounds) != sorted(set(bounds)):
                raise ConfigError(f"Error bounds must be strictly increasing, not {list(bounds)!r}")
            if self.error in PERCENT_OF_PAIRS and bounds[-1] > 100:
                raise ConfigError(f"{self.error} bounds are percentages of the operand pairs, at most 100, "
                                  f"not {bounds[-1]!r}")
            object.__setattr__(self, "bounds", tuple(float(b) for b in bounds))
        cons = []
        for item in self.constraints:
            if not (isinstance(item, tuple) and len(item) == 2):
                raise ConfigError(f"A constraint is a (metric, maximum) pair, not {item!r}")
            metric, limit = item
            if metric not in ERROR_METRICS:
                raise ConfigError(f"Unknown constraint metric {metric!r}; choose one of {', '.join(ERROR_METRICS)}")
            if isinstance(limit, bool) or not isinstance(limit, (int, float)) or not math.isfinite(limit) or limit < 0:
                raise ConfigError(f"Constraint max_{metric} must be a non-negative number, not {limit!r}")
            if metric in PERCENT_OF_PAIRS and limit > 100:
                raise ConfigError(f"Constraint max_{metric} is a percentage of the operand pairs, at most 100, "
                                  f"not {limit!r}")
            cons.append((metric, float(limit)))
        if len({m for m, _ in cons}) != len(cons):
            raise ConfigError(f"A metric is constrained twice: {self.constraints!r}")
        object.__setattr__(self, "constraints", tuple(cons))
        if self.evaluations is None and self.budget_s is None:
            raise ConfigError("Give a budget: evaluations, a time budget (budget_s), or both")
        if self.evaluations is not None:
            _positive_int("evaluations", self.evaluations)
        if self.budget_s is not None:
            if (isinstance(self.budget_s, bool) or not isinstance(self.budget_s, (int, float))
                    or not math.isfinite(self.budget_s) or self.budget_s <= 0):
                raise ConfigError(f"budget_s must be a positive number of seconds, not {self.budget_s!r}")
        _positive_int("lam", self.lam)
        if self.lam > MAX_LAM:
            raise ConfigError(f"lam (children per generation) must be at most {MAX_LAM}, not {self.lam}: each "
                              "child holds a simulation buffer")
        _positive_int("max_mutations", self.max_mutations)
        _positive_int("checkpoint_every", self.checkpoint_every)
        _positive_int("samples", self.samples, 64)
        if not isinstance(self.seed, int) or isinstance(self.seed, bool) or self.seed < 0:
            raise ConfigError(f"seed must be a non-negative integer, not {self.seed!r}")
        for name in ("p_a", "p_b"):
            p = getattr(self, name)
            if p is None:
                continue
            p = tuple(float(x) for x in p)
            if not p or any(not math.isfinite(x) or x < 0 for x in p) or sum(p) <= 0:
                raise ConfigError(f"{name} must be non-negative weights with a positive sum")
            object.__setattr__(self, name, p)

    @property
    def error_bounds(self) -> tuple[float, ...]:
        """The bounds in use (the given ones or the objective's defaults)."""
        return self.bounds if self.bounds is not None else DEFAULT_BOUNDS[self.error]

    @property
    def needs_unpack(self) -> bool:
        """Whether evaluation needs per-vector values (MRE, MSE or weighted figures)."""
        metrics = {self.error, *(m for m, _ in self.constraints)}
        return bool(metrics & {"mre", "mse"}) or self.p_a is not None or self.p_b is not None

    def check_widths(self, width_a: int, width_b: int) -> None:
        """Check the distributions against the operand widths.

        Raises:
            appmult.errors.ConfigError: a distribution of the wrong length.
        """
        for name, p, w in (("p_a", self.p_a, width_a), ("p_b", self.p_b, width_b)):
            if p is not None and len(p) != 1 << w:
                raise ConfigError(f"{name} has {len(p)} entries; a {w}-bit operand needs {1 << w}")

    def describe(self) -> dict:
        """JSON-ready summary (distributions abbreviated to a flag)."""
        d = dataclasses.asdict(self)
        d["bounds"] = list(self.error_bounds)
        d["constraints"] = [list(c) for c in self.constraints]
        d["p_a"] = self.p_a is not None
        d["p_b"] = self.p_b is not None
        return d
