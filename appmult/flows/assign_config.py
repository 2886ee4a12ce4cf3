"""What an assignment run depends on: :class:`AssignConfig`.

Imported by ``appmult --help`` (the command line reads its defaults from the dataclass), so
this module imports no torch or numpy; the names a field is checked against are looked up
when a config is built.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Sequence
from types import SimpleNamespace

from ._fields import check_bool, check_choice, check_int, check_number, check_str, fspath_fields
from .retrain_config import check_data_dir

__all__ = ["AssignConfig"]


def _vocabulary() -> SimpleNamespace:
    # The names fields are checked against, and AssignError, live with the code that uses
    # them, in modules that import torch; looked up here, when a config is built, so that
    # importing this module (as `appmult --help` does) stays light.
    from ..methods.assignment import AssignError
    from ..sim.cost import FIGURES
    from ..train import DATASETS, MODEL_NAMES
    return SimpleNamespace(error=AssignError, cost_figures=tuple(FIGURES), datasets=tuple(DATASETS),
                           models=tuple(MODEL_NAMES))


@dataclasses.dataclass(frozen=True)
class AssignConfig:
    """One assignment run (:func:`~appmult.flows.run_assign`); the CLI's arguments. Frozen; validated on construction.

    Args:
        candidates: specs or LUT files (a non-empty sequence; stored as a tuple of str).
        model, dataset, data_dir: network and data (:func:`appmult.train.make_loaders`);
            ``data_dir`` is refused for the data sets that ship inside a package
            (:data:`~appmult.flows.retrain_config.PACKAGED_DATASETS`).
        checkpoint: FP32 model file from :func:`~appmult.train.pretrain_fp32`
            (default: pretrain ``pretrain_epochs`` epochs, cached in ``out/pretrained``).
        pretrain_epochs, batch_size, lr, seed: FP32 pretraining and retraining settings.
        surrogate_epochs, sigma_lr, lam, sigma_max: noise-surrogate training.
        retrain_epochs: STE retraining epochs after conversion (0: none).
        calib_batches, stats_batches: batches for calibration and operand statistics.
        error_model: ``"population"`` or ``"global"``.
        cost_figure: relative cost figure.
        include_exact: add the exact multiplier to the candidates.
        homogeneous: also convert/retrain with each candidate everywhere (Pareto plot).
        validate: measure each candidate's real error std per layer next to the predictions.
        out: output directory.
        overwrite: replace the assignment run ``out`` already holds (``plan.json``,
            ``results.json``); without it such a directory is refused.
        progress: stage messages.

    Raises:
        appmult.methods.AssignError: a value of the wrong type or out of range, with the
            field and the offending value named.
    """

    candidates: Sequence[str]
    model: str = "lenet5"
    dataset: str = "digits"
    data_dir: str | None = None
    checkpoint: str | None = None
    pretrain_epochs: int = 30
    batch_size: int = 32
    lr: float = 1e-3
    seed: int = 0
    surrogate_epochs: int = 5
    sigma_lr: float = 1e-2
    lam: float = 0.2
    sigma_max: float = 0.5
    retrain_epochs: int = 2
    calib_batches: int = 8
    stats_batches: int = 8
    error_model: str = "population"
    cost_figure: str = "transistors"
    include_exact: bool = True
    homogeneous: bool = True
    validate: bool = True
    out: str = "assign-out"
    overwrite: bool = False
    progress: bool = True

    def __post_init__(self) -> None:
        names = _vocabulary()
        self._check_candidates(names.error)
        check_choice(names.error, "Model", self.model, names.models)
        check_choice(names.error, "Dataset", self.dataset, names.datasets)
        paths = ("data_dir", "checkpoint", "out")
        fspath_fields(self, paths)
        for name in paths:
            check_str(names.error, name, getattr(self, name), what="a path", optional=name != "out")
        check_data_dir(names.error, self.dataset, self.data_dir, names.datasets)
        for name in ("pretrain_epochs", "surrogate_epochs", "calib_batches", "stats_batches", "batch_size"):
            check_int(names.error, name, getattr(self, name))
        check_int(names.error, "retrain_epochs", self.retrain_epochs, low=0)
        check_int(names.error, "seed", self.seed, low=0)
        for name in ("lr", "sigma_lr", "sigma_max"):
            check_number(names.error, name, getattr(self, name))
        check_number(names.error, "lam", self.lam, positive=False)
        if self.error_model not in ("population", "global"):
            raise names.error(f"Error model must be 'population' or 'global', not {self.error_model!r}")
        if self.cost_figure not in names.cost_figures:
            raise names.error(f"Cost figure must be one of {', '.join(names.cost_figures)}, "
                              f"not {self.cost_figure!r}")
        for name in ("include_exact", "homogeneous", "validate", "overwrite", "progress"):
            check_bool(names.error, name, getattr(self, name))

    def _check_candidates(self, error: type[Exception]) -> None:
        if isinstance(self.candidates, (str, os.PathLike)) or not isinstance(self.candidates, Sequence):
            raise error(f"candidates must be a list or tuple of specs or LUT files, not {self.candidates!r}")
        if not self.candidates:
            raise error("Give at least one candidate multiplier (spec or LUT file)")
        candidates = tuple(os.fspath(c) if isinstance(c, os.PathLike) else c for c in self.candidates)
        for c in candidates:
            if not isinstance(c, str) or not c:
                raise error(f"Each candidate must be a spec or a LUT file path, not {c!r}")
        object.__setattr__(self, "candidates", candidates)
