"""Published methods built on the approximate layers.

* Simulated error and hybrid training (Hammad et al., ROBIO 2019): :class:`SimulatedError`,
  :func:`attach_simulated_error`.
* Noise surrogate (Trommer et al., ICCAD 2022): :func:`attach_noise_surrogate`,
  :func:`train_surrogate`, :func:`learned_sigmas`.
* Output-error model: :func:`record_operands`, :func:`predict_sigma`, :func:`measure_error`.
* Heterogeneous assignment: :func:`assign`, :func:`choose`, :func:`plan_configs`.

Control-variate correction (Zervakis et al.) is part of what a layer computes, so it lives
in :mod:`appmult.nn` (``ApproxConfig(correction=True)``).
"""

from .assignment import (
    AssignError,
    Candidate,
    PLAN_FORMAT,
    assign,
    check_candidates,
    check_plan,
    choose,
    plan_configs,
)
from .error_model import (
    Measured,
    OperandStats,
    Prediction,
    error_map,
    measure_error,
    predict_global,
    predict_population,
    predict_sigma,
    record_operands,
)
from .simulated_error import (
    ErrorDistribution,
    NOISE_OPERANDS,
    NoiseMethod,
    SimulatedError,
    SimulatedErrorHooks,
    attach_simulated_error,
    lut_mre,
)
from .surrogate import (
    NoiseSurrogate,
    attach_noise_surrogate,
    detach_noise_surrogate,
    learned_sigmas,
    surrogate_loss,
    surrogate_loss_fn,
    surrogate_optimizer,
    train_surrogate,
)

__all__ = [
    "assign",
    "AssignError",
    "attach_noise_surrogate",
    "attach_simulated_error",
    "Candidate",
    "check_candidates",
    "check_plan",
    "choose",
    "detach_noise_surrogate",
    "error_map",
    "ErrorDistribution",
    "learned_sigmas",
    "lut_mre",
    "measure_error",
    "Measured",
    "NOISE_OPERANDS",
    "NoiseMethod",
    "NoiseSurrogate",
    "OperandStats",
    "plan_configs",
    "PLAN_FORMAT",
    "predict_global",
    "predict_population",
    "predict_sigma",
    "Prediction",
    "record_operands",
    "SimulatedError",
    "SimulatedErrorHooks",
    "surrogate_loss",
    "surrogate_loss_fn",
    "surrogate_optimizer",
    "train_surrogate",
]
