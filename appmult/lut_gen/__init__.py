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
    lut2d_and_lut1d,
    lut2d_gradients,
    ste_gradients,
)
from .lutfile import FORMAT_VERSION, LutFile, LutFileError, load
from .metrics import METRIC_KEYS, MetricsAccumulator, error_metrics, exact_product, metrics_under

# Heavy halves, imported on first use of one of their names (PEP 562): characterization
# needs Amaranth and Yosys, the report needs matplotlib.
_LAZY = {
    "Characterization": "characterization",
    "tool_versions": "characterization",
    "from_torchapprox": "interop",
    "read_listing": "interop",
    "read_tfapprox": "interop",
    "to_torchapprox": "interop",
    "write_listing": "interop",
    "write_tfapprox": "interop",
    "write_report": "report",
    "pareto_plot": "report",
}


def __getattr__(name: str):
    if name in _LAZY:
        import importlib
        module = importlib.import_module(f".{_LAZY[name]}", __name__)
        value = getattr(module, name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")

__all__ = [
    "FORMAT_VERSION",
    "Characterization",
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
    "from_torchapprox",
    "load",
    "lre_gradients",
    "lut1d_gradients",
    "lut2d_and_lut1d",
    "lut2d_gradients",
    "metrics_under",
    "pareto_plot",
    "read_listing",
    "read_tfapprox",
    "ste_gradients",
    "to_torchapprox",
    "tool_versions",
    "write_listing",
    "write_report",
    "write_tfapprox",
]
