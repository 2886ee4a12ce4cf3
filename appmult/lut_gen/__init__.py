"""Product LUTs, error metrics, gradient LUTs and the LUT file format.

Never imports torch. The LUT file, metrics and gradient modules depend on numpy only
(:mod:`appmult.nn` uses them); characterization (which needs Amaranth and Yosys),
interop with third-party netlists and the plots are imported lazily, on first use of
their names.
"""

from .gradients import (
    HALF_WINDOWS,
    auto_half_window,
    broadcast_lut1d,
    check_half_window,
    lre_gradients,
    lut1d_gradients,
    lut2d_gradients,
    ste_gradients,
)
from .lutfile import FORMAT_VERSION, LutFile, LutFileError, load
from .metrics import METRIC_KEYS, MetricsAccumulator, error_metrics, exact_product, metrics_under

__all__ = [
    "FORMAT_VERSION",
    "HALF_WINDOWS",
    "METRIC_KEYS",
    "LutFile",
    "LutFileError",
    "MetricsAccumulator",
    "auto_half_window",
    "broadcast_lut1d",
    "check_half_window",
    "error_metrics",
    "exact_product",
    "load",
    "lre_gradients",
    "lut1d_gradients",
    "lut2d_gradients",
    "metrics_under",
    "ste_gradients",
]
