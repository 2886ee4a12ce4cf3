"""What a network-aware exploration depends on: :class:`NetworkExploreConfig`.

Imported by ``appmult --help`` (the command line reads its defaults from the dataclass), so
this module imports no torch, numba or amaranth; the model and data set names, and the
search's config class, are looked up when a config is built.
"""

from __future__ import annotations

import dataclasses
import math

from typing import TYPE_CHECKING

from ..errors import ConfigError

if TYPE_CHECKING:
    from ..explore import ExploreConfig

__all__ = ["NetworkExploreConfig"]


@dataclasses.dataclass(frozen=True)
class NetworkExploreConfig:
    """Everything a network-aware exploration depends on (frozen, validated).

    Attributes:
        out: output directory.
        search: the gate-level search (its ``p_a``/``p_b`` are replaced by the recorded
            distributions; its budget, bounds and objective are used as given).
        model: network name (:func:`appmult.train.build_model`).
        dataset: data set name (:func:`appmult.train.make_loaders`).
        width: operand width of the multipliers (unsigned, as the quantizers use them).
        target_accuracy: accuracy (%) a chosen circuit must reach after retraining;
            ``None``: ``max_drop`` below the better of the exact-quantized accuracy and
            the exact multiplier's accuracy after the same retraining.
        max_drop: allowed loss (percentage points) against that reference.
        pretrain_epochs: FP32 pretraining epochs (cached in ``pretrained_dir``).
        epochs: retraining epochs per shortlisted circuit.
        grad: gradient mode of the retraining (``ste``, ``lut2d``, ``lut1d``).
        batch_size, lr, seed: training settings (shared by pretraining and retraining).
        calib_batches: training batches that calibrate the activation ranges.
        record_batches: training batches whose operands make the histograms.
        sweep: also sweep the built-in families (they join the shortlist).
        family_starts: each bound may start from a family-front member
            (:func:`appmult.explore.search`'s ``starts``; needs ``sweep``).
        greedy_starts: each bound may also start from a circuit of the greedy walk
            (:func:`appmult.explore.greedy_trajectory`), whose circuits join the front.
        shortlist: at most this many found circuits are retrained (a bisection along the
            found front for the last one that meets the target).
        family_shortlist: the same along the family front.
        neighbours: after each bisection, retrain up to this many more members of that front,
            the nearest cheaper ones not yet retrained below the cheapest one that met the
            target (or below the dearest retrained one when none did): the bisection assumes
            accuracy falls as the error grows, and retrained accuracy is noisy, so a cheaper
            circuit can pass where the bisection stopped. ``0`` trusts the bisection.
        verify: check the chosen circuit's RTL in a simulator (skipped when none is installed).
        sim: ``"icarus"`` or ``"verilator"``.
        data_dir: data directory for ``mnist``/``cifar10``.
        pretrained_dir: FP32 cache (default ``<out>/pretrained``).
        progress: progress bars and stage messages.

    Raises:
        appmult.errors.ConfigError: a value that makes no sense (the message says which).
    """

    out: str
    search: ExploreConfig
    model: str = "lenet5"
    dataset: str = "digits"
    width: int = 8
    target_accuracy: float | None = None
    max_drop: float = 1.0
    pretrain_epochs: int = 5
    epochs: int = 2
    grad: str = "ste"
    batch_size: int = 64
    lr: float = 1e-3
    seed: int = 0
    calib_batches: int = 8
    record_batches: int = 8
    sweep: bool = True
    family_starts: bool = False
    greedy_starts: bool = False
    shortlist: int = 3
    family_shortlist: int = 3
    neighbours: int = 2
    verify: bool = True
    sim: str = "icarus"
    data_dir: str | None = None
    pretrained_dir: str | None = None
    progress: bool = True

    def __post_init__(self):
        from ..explore import ExploreConfig
        if not isinstance(self.search, ExploreConfig):
            raise ConfigError(f"search must be an ExploreConfig, not {type(self.search).__name__}")
        # Looked up here, not at import: the names live with the training code (torch).
        from ..train import DATASETS, MODEL_NAMES
        if self.model not in MODEL_NAMES and not str(self.model).startswith("resnet"):
            raise ConfigError(f"Unknown model {self.model!r}; choose one of {', '.join(MODEL_NAMES)}")
        if self.dataset not in DATASETS:
            raise ConfigError(f"Unknown dataset {self.dataset!r}; choose one of {', '.join(DATASETS)}")
        from .retrain_config import check_data_dir  # refused now, not by the retraining after the search
        check_data_dir(ConfigError, self.dataset, self.data_dir, tuple(DATASETS))
        for name, low in (("width", 2), ("pretrain_epochs", 1), ("epochs", 1), ("batch_size", 1),
                          ("calib_batches", 1), ("record_batches", 1), ("shortlist", 0),
                          ("family_shortlist", 0), ("neighbours", 0)):
            value = getattr(self, name)
            if not isinstance(value, int) or isinstance(value, bool) or value < low:
                raise ConfigError(f"{name} must be an integer of at least {low}, not {value!r}")
        if self.width > 12:
            raise ConfigError(f"width must be at most 12 (exhaustive LUTs), not {self.width}")
        if self.family_starts and not self.sweep:
            raise ConfigError("family_starts needs the family sweep (sweep=True)")
        if self.shortlist + (self.family_shortlist if self.sweep else 0) == 0:
            raise ConfigError("Nothing to retrain: shortlist and family_shortlist are both 0")
        t = self.target_accuracy
        if t is not None and (isinstance(t, bool) or not isinstance(t, (int, float)) or not 0 < t <= 100):
            raise ConfigError(f"target_accuracy must be a percentage in (0, 100], not {t!r}")
        if isinstance(self.max_drop, bool) or not isinstance(self.max_drop, (int, float)) or not (
                math.isfinite(self.max_drop) and self.max_drop >= 0):
            raise ConfigError(f"max_drop must be a non-negative number of percentage points, not {self.max_drop!r}")
        if self.grad not in ("ste", "lut2d", "lut1d"):
            raise ConfigError(f"Unknown gradient mode {self.grad!r}; choose one of ste, lut2d, lut1d")
        if self.sim not in ("icarus", "verilator"):
            raise ConfigError(f"sim must be 'icarus' or 'verilator', not {self.sim!r}")

    @property
    def exact_spec(self) -> str:
        return f"exact:width={self.width},signed=false"
