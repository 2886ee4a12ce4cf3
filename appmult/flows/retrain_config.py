"""What a retraining run depends on: :class:`RetrainConfig`, and :class:`RetrainError`.

Imported by ``appmult --help`` (the command line reads its defaults from the dataclass), so
this module imports no torch or numpy; the names a field is checked against are looked up
when a config is built.
"""

from __future__ import annotations

import dataclasses
from types import SimpleNamespace

from ..errors import UserError
from ._fields import check_bool, check_choice, check_int, check_number, check_str, fspath_fields, is_int

__all__ = ["SIMULATED_ERROR_MODE", "RetrainConfig", "RetrainError"]

#: Name of the simulated-error mode in results (trained with noise, evaluated on the LUT).
SIMULATED_ERROR_MODE = "simulated-error"


class RetrainError(UserError, ValueError):
    """A retraining run that cannot proceed as asked (mismatched files, bad arguments)."""


def _vocabulary() -> SimpleNamespace:
    # The names fields are checked against live with the code that uses them, in modules
    # that import torch; looked up here, when a config is built, so that importing this
    # module (as `appmult --help` does) stays light.
    from ..lut_gen.gradients import HALF_WINDOWS, check_half_window
    from ..methods.simulated_error import NOISE_OPERANDS, SimulatedError
    from ..nn import GradMode
    from ..train import DATASETS, MODEL_NAMES
    return SimpleNamespace(half_windows=HALF_WINDOWS, check_half_window=check_half_window,
                           noise_operands=NOISE_OPERANDS, simulated_error=SimulatedError,
                           grad_modes=tuple(g.value for g in GradMode), datasets=tuple(DATASETS),
                           models=tuple(MODEL_NAMES))


@dataclasses.dataclass(frozen=True)
class RetrainConfig:
    """Everything a retraining run depends on. Frozen; validated on construction.

    Args:
        lut: LUT file (``.npz``); exactly one of ``lut`` and ``spec``.
        spec: multiplier spec string, characterized on the fly (needs Amaranth and Yosys).
        model: ``"mlp"``, ``"lenet5"``, ``"resnet8"``, ``"resnet20"``.
        dataset: ``"digits"``, ``"mnist5k"``, ``"mnist"``, ``"cifar10"``.
        data_dir: directory of the ``mnist``/``cifar10`` files.
        epochs: retraining epochs per mode.
        pretrain_epochs: FP32 pretraining epochs (ignored with ``checkpoint``).
        batch_size: global training batch size (split evenly over DDP ranks).
        lr: Adam learning rate (halved at 1/3 and 2/3 of the run), for pretraining too.
        seed: seed of data split, initial weights, batch order, noise.
        grads: gradient modes, one retraining each, from the same starting point.
        half_window: LUT-2D/LUT-1D half window: ``None`` (the LUT file's tables),
            one of 1, 2, 4, ..., 64, or ``"auto"`` (training trials).
        out: output directory.
        resume: continue an interrupted run in ``out``.
        overwrite: replace the run ``out`` already holds (its checkpoints and results);
            without it (and without ``resume``) a run found there is refused.
        exact_last: hybrid schedule: exact products (same quantization) in the last N epochs.
        simulated_error: also train a ``simulated-error`` mode (exact products plus
            per-product noise of the LUT's MRE), evaluated on the real LUT.
        mre: MRE for the simulated error (default: the LUT's).
        noise_operands: products the simulated error applies to: ``"codes"`` (what the
            multiplier receives) or ``"values"`` (zero-point-corrected ``x * w``); see
            :func:`appmult.methods.attach_simulated_error`.
        checkpoint: start from this FP32 model instead of pretraining (a file written by
            ``pretrain_fp32`` or a plain state_dict of ``model``).
        pretrained_dir: cache of FP32 models (default ``<out>/pretrained``).
        progress: progress bars and stage messages on stderr.
        calib_batches: training batches used to calibrate activation ranges.
        trial_batches: length of each ``half_window="auto"`` trial in batches
            (``None``: one epoch).
        time_exact: time one training epoch of the exact-quantized model for comparison.
        threads: torch CPU threads (``None``: leave torch's setting).
        verify_rtl: after each mode, check the first approximate conv layer's accumulators
            against the RTL MAC in a simulator (needs a LUT with a circuit spec and Icarus).
        rtl_positions: output positions per RTL check.
        rtl_sim: simulator of the RTL check, ``"icarus"`` or ``"verilator"``.

    Raises:
        RetrainError: inconsistent or out-of-range values, with the offending value named.
    """

    lut: str | None = None
    spec: str | None = None
    model: str = "lenet5"
    dataset: str = "digits"
    data_dir: str | None = None
    epochs: int = 3
    pretrain_epochs: int = 5
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    grads: tuple[str, ...] = ("ste",)
    half_window: int | str | None = None
    out: str = "retrain-out"
    resume: bool = False
    overwrite: bool = False
    exact_last: int = 0
    simulated_error: bool = False
    mre: float | None = None
    noise_operands: str = "codes"
    checkpoint: str | None = None
    pretrained_dir: str | None = None
    progress: bool = True
    calib_batches: int = 8
    trial_batches: int | None = None
    time_exact: bool = True
    threads: int | None = None
    verify_rtl: bool = False
    rtl_positions: int = 8
    rtl_sim: str = "icarus"

    def __post_init__(self) -> None:
        names = _vocabulary()
        self._check_sources(names)
        self._check_training()
        self._check_modes(names)
        self._check_run()

    def _check_sources(self, names: SimpleNamespace) -> None:
        """The multiplier, the network, the data and the files."""
        if (self.lut is None) == (self.spec is None):
            which = "both" if self.lut is not None else "neither"
            raise RetrainError(f"Give exactly one of a LUT file (--lut) or a multiplier spec (--spec), "
                               f"not {which}")
        paths = ("lut", "checkpoint", "data_dir", "pretrained_dir", "out")
        fspath_fields(self, paths)
        for name in paths:
            check_str(RetrainError, name, getattr(self, name), what="a path", optional=name != "out")
        check_str(RetrainError, "spec", self.spec, what="a spec string", optional=True)
        check_choice(RetrainError, "Model", self.model, names.models)
        check_choice(RetrainError, "Dataset", self.dataset, names.datasets)

    def _check_training(self) -> None:
        """Lengths, sizes, seed and learning rate."""
        for name in ("epochs", "pretrain_epochs", "batch_size", "calib_batches"):
            check_int(RetrainError, name, getattr(self, name))
        check_int(RetrainError, "trial_batches", self.trial_batches, optional=True)
        check_int(RetrainError, "seed", self.seed, low=0)
        check_number(RetrainError, "lr", self.lr)

    def _check_modes(self, names: SimpleNamespace) -> None:
        """Gradient modes, half window, hybrid schedule, simulated error."""
        check_bool(RetrainError, "simulated_error", self.simulated_error)
        grads = (self.grads,) if isinstance(self.grads, str) else tuple(self.grads)
        if not grads and not self.simulated_error:
            raise RetrainError("Give at least one gradient mode (--grad ste lut2d lut1d) or --simulated-error")
        for g in grads:
            check_choice(RetrainError, "Gradient mode", g, names.grad_modes)
        if len(set(grads)) != len(grads):
            raise RetrainError(f"Gradient modes repeat: {' '.join(grads)}")
        object.__setattr__(self, "grads", grads)
        if self.half_window is not None:
            hw = self.half_window
            if isinstance(hw, str) and hw != "auto" and hw.isdigit():
                hw = int(hw)
            try:
                object.__setattr__(self, "half_window", names.check_half_window(hw))
            except ValueError:
                raise RetrainError(f"Half window must be one of {', '.join(map(str, names.half_windows))} or "
                                   f"'auto', not {self.half_window!r}") from None
        if not is_int(self.exact_last) or not 0 <= self.exact_last < self.epochs:
            raise RetrainError(f"exact_last must be an integer in 0..{self.epochs - 1} (at least one "
                               f"approximate epoch), not {self.exact_last!r}")
        if self.mre is not None:
            try:
                names.simulated_error(self.mre)
            except ValueError as exc:
                raise RetrainError(str(exc)) from None
        if self.noise_operands not in names.noise_operands:
            raise RetrainError(f"Noise operands must be 'codes' or 'values', not {self.noise_operands!r}")

    def _check_run(self) -> None:
        """How the run behaves: resume or overwrite, progress, threads, the RTL check."""
        for name in ("resume", "overwrite", "progress", "time_exact", "verify_rtl"):
            check_bool(RetrainError, name, getattr(self, name))
        if self.resume and self.overwrite:
            raise RetrainError("resume continues the run in the output directory and overwrite replaces it: "
                               "give one, not both")
        if self.threads is not None:
            check_int(RetrainError, "threads", self.threads)
        check_int(RetrainError, "rtl_positions", self.rtl_positions)
        if self.rtl_sim not in ("icarus", "verilator"):
            raise RetrainError(f"rtl_sim must be 'icarus' or 'verilator', not {self.rtl_sim!r}")

    @property
    def modes(self) -> tuple[str, ...]:
        """The retraining modes, in order: the gradient modes, then ``simulated-error``."""
        return self.grads + ((SIMULATED_ERROR_MODE,) if self.simulated_error else ())
