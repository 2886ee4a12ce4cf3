"""Orchestration where torch meets Amaranth, Yosys and cocotb.

* :func:`characterize` -- a circuit (multiplier, spec or netlist) synthesized and simulated
  exhaustively into a :class:`~appmult.lut_gen.Characterization` (LUT, metrics, cost,
  gradient tables); :func:`circuit_lut` for the product table alone.
* :func:`run_retrain` -- FP32 -> quantized -> approximate -> retrained, per gradient mode.
* :func:`run_assign` -- heterogeneous multiplier assignment on a trained network.
* :func:`verify_layer_rtl` -- a trained layer's accumulators recomputed by the RTL MAC.

Each name is imported on first use (PEP 562), so ``from appmult.flows import characterize``
does not import torch and ``from appmult.flows import run_retrain`` does not wait for it.
"""

import importlib

_HOMES = {
    "AssignConfig": "assign",
    "load_candidate": "assign",
    "plot_pareto": "assign",
    "run_assign": "assign",
    "characterize": "characterization",
    "characterize_metrics": "characterization",
    "characterize_verilog": "characterization",
    "circuit_lut": "characterization",
    "lut_cache_dir": "characterization",
    "required_acc_width": "characterization",
    "RESULTS_FORMAT": "retrain",
    "SIMULATED_ERROR_MODE": "retrain",
    "RetrainConfig": "retrain",
    "RetrainError": "retrain",
    "half_window_trials": "retrain",
    "results_markdown": "retrain",
    "run_retrain": "retrain",
    "state_digest": "retrain",
    "with_half_window": "retrain",
    "LayerOperands": "rtlcheck",
    "LayerRtlResult": "rtlcheck",
    "PositionCheck": "rtlcheck",
    "RtlCheckError": "rtlcheck",
    "layer_operands": "rtlcheck",
    "verify_layer_rtl": "rtlcheck",
}

__all__ = sorted(_HOMES)


def __getattr__(name: str):
    if name in _HOMES:
        value = getattr(importlib.import_module(f".{_HOMES[name]}", __name__), name)
        globals()[name] = value
        return value
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(set(globals()) | set(__all__))
