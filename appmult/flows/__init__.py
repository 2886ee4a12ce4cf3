"""Orchestration where torch meets Amaranth, Yosys and cocotb.

* :func:`characterize` -- a circuit (multiplier, spec or netlist) synthesized and simulated
  exhaustively into a :class:`~appmult.lut_gen.Characterization` (LUT, metrics, cost,
  gradient tables); :func:`circuit_lut` for the product table alone.
* :func:`run_retrain` -- FP32 -> quantized -> approximate -> retrained, per gradient mode.
* :func:`run_assign` -- heterogeneous multiplier assignment on a trained network.
* :func:`verify_layer_rtl` -- a trained layer's accumulators recomputed by the RTL MAC.
* :func:`run_network_explore` -- search multipliers under a trained network's operand
  distributions, retrain a shortlist, verify the chosen circuit's RTL.

Each name is imported on first use (PEP 562), so ``from appmult.flows import characterize``
does not import torch and ``from appmult.flows import run_retrain`` does not wait for it.
:class:`RetrainConfig` and :class:`AssignConfig` live in modules that import neither torch
nor numpy: the command line reads its defaults from them.

The retraining workflow is split into its steps: ``retrain_config`` (the config),
``retrain`` (the pipeline), ``retrain_start`` (FP32 model, shared starting point),
``half_window`` (LUT-2D half window: stored, explicit or by trials), ``retrain_mode``
(one mode: schedule, checkpoints, per-epoch side effects), ``distributed`` (DDP),
``retrain_results`` (the files written).
"""

import importlib

_HOMES = {
    "AssignConfig": "assign_config",
    "load_candidate": "assign",
    "plot_pareto": "assign",
    "run_assign": "assign",
    "characterize": "characterization",
    "characterize_metrics": "characterization",
    "characterize_verilog": "characterization",
    "circuit_lut": "characterization",
    "lut_cache_dir": "characterization",
    "required_acc_width": "characterization",
    "RESULTS_FORMAT": "retrain_results",
    "RECIPES": "retrain_config",
    "SIMULATED_ERROR_MODE": "retrain_config",
    "RetrainConfig": "retrain_config",
    "RetrainError": "retrain_config",
    "half_window_trials": "half_window",
    "results_markdown": "retrain_results",
    "run_retrain": "retrain",
    "state_digest": "retrain",
    "with_half_window": "half_window",
    "NetworkExploreConfig": "explore_config",
    "run_network_explore": "explore",
    "LayerRtlResult": "rtlcheck",
    "PositionCheck": "rtlcheck",
    "RtlCheckError": "rtlcheck",
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
