"""The LUT-2D/LUT-1D half window of a retraining run: stored, explicit, or chosen by trials.

``H`` is chosen per multiplier from 1, 2, 4, ... (while ``2H+1`` fits the operand range).
The published procedure (Meng et al.) is a short training trial per ``H`` from the same
start, keeping the ``H`` with the lowest training loss afterwards (:func:`half_window_trials`).
"""

from __future__ import annotations

import time
from collections.abc import Iterable, Sequence
from typing import Any

import torch
from torch import nn
from torch.utils.data import DataLoader

from ..lut_gen import LutFile
from ..lut_gen.gradients import HALF_WINDOWS, lut2d_and_lut1d
from ..train import evaluate, train_epoch
from ._fields import is_int
from .retrain_start import Conversion, approx_model, load_start, reseed

__all__ = ["half_window_candidates", "half_window_trials", "stored_half_window", "with_half_window"]


def with_half_window(lut: LutFile, half_window: int) -> LutFile:
    """A copy of ``lut`` whose ``lut2d`` and ``lut1d`` tables use the given half window.

    Args:
        lut: the LUT file.
        half_window: one of 1, 2, 4, ..., 64, with ``2H+1`` below both operand ranges.

    Returns:
        A new :class:`LutFile` (same product and metadata, ``gradient_params`` updated).

    Raises:
        ValueError: an invalid half window or one too large for the operands.
    """
    (ga, gb), (ca, cb) = lut2d_and_lut1d(lut.product, lut.width_a, lut.width_b, lut.signed, half_window)
    md = lut.metadata
    params = dict(md.get("gradient_params") or {})
    params["lut2d"] = {"half_window": half_window, "half_window_choice": "retrain"}
    params["lut1d"] = {"compact": True, "half_window": half_window, "half_window_choice": "retrain",
                       "reduce": "mean"}
    md["gradient_params"] = params
    grads = {m: t for m, t in lut.gradients.items() if m not in ("lut2d", "lut1d")}
    grads["lut2d"] = (ga, gb)
    grads["lut1d"] = (ca, cb)
    return LutFile(lut.product, width_a=lut.width_a, width_b=lut.width_b, signed=lut.signed,
                   gradients=grads, metadata=md)


def stored_half_window(lut: LutFile, grad: str) -> int | None:
    """The half window of ``lut``'s stored ``grad`` tables, as its metadata records it (None: unknown)."""
    params = (lut.metadata.get("gradient_params") or {}).get(grad) or {}
    hw = params.get("half_window")
    return int(hw) if is_int(hw) else None


def half_window_candidates(lut: LutFile) -> list[int]:
    """The half windows 1, 2, 4, ... with ``2H+1`` below both operand ranges of ``lut``."""
    n = 1 << min(lut.width_a, lut.width_b)
    return [h for h in HALF_WINDOWS if 2 * h + 1 < n]


class _Limited:
    """The first ``n`` batches of a loader (a trial), keeping its generator for reseeding."""

    def __init__(self, loader: DataLoader, n: int | None):
        self.loader, self.n = loader, n
        self.generator = getattr(loader, "generator", None)

    def __iter__(self):
        for i, batch in enumerate(self.loader):
            if self.n is not None and i >= self.n:
                return
            yield batch

    def __len__(self) -> int:
        return len(self.loader) if self.n is None else min(self.n, len(self.loader))


def half_window_trials(fp32: nn.Module, lut: LutFile, grad: str, start: dict[str, torch.Tensor],
                       loader: DataLoader, probe: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                       lr: float, seed: int, trial_batches: int | None, device: torch.device,
                       candidates: Iterable[int] | None = None, epochs: int = 1,
                       conversion: Conversion = Conversion(), model_name: str | None = None) -> dict[str, Any]:
    """The published automatic choice of the LUT-2D half window: short training trials.

    For each candidate ``H`` the model is rebuilt from the same start with ``grad``
    tables of half window ``H``, trained for ``epochs`` epochs of ``trial_batches``
    batches each (whole epochs when None) with Adam, identically seeded, and its training
    loss is then measured on fixed ``probe`` batches of training data in evaluation mode.
    The lowest loss wins (ties: the smaller ``H``). (Meng et al. ran 5-epoch trials of a
    LeNet on the same data: ``fp32`` need not be the network that is retrained.)

    Args:
        fp32: the FP32 model (copied, not changed).
        lut: the LUT file (its product table; gradient tables are recomputed per ``H``).
        grad: ``"lut2d"`` or ``"lut1d"``.
        start: starting state (weights and activation ranges) shared by all trials.
        loader: training loader.
        probe: fixed training batches on which the loss is compared.
        lr: Adam learning rate.
        seed: seed of every trial.
        trial_batches: batches per trial (``None``: one epoch).
        device: where to train.
        candidates: half windows to try (default: 1, 2, 4, ... while ``2H+1`` fits).
        epochs: epochs per trial.
        conversion: how the trial model is quantized (as the run's model).
        model_name: the trial network's name, recorded.

    Returns:
        ``{"grad", "model", "epochs", "trial_batches", "criterion", "trials": [{"half_window",
        "train_loss_during", "train_loss_after", "time_s"}...], "chosen"}``
        (``train_loss_during``: the last epoch's).
    """
    cands = list(candidates) if candidates is not None else half_window_candidates(lut)
    trials = []
    limited = _Limited(loader, trial_batches)
    for h in cands:
        t0 = time.perf_counter()
        model = load_start(approx_model(fp32, with_half_window(lut, h), grad, device, conversion), start)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        reseed(seed, loader)
        for e in range(epochs):
            during = train_epoch(model, limited, opt, device=device, desc=f"H={h} epoch {e + 1}/{epochs}")
        after = evaluate(model, probe, device=device)
        trials.append({"half_window": h, "train_loss_during": during.loss, "train_loss_after": after.loss,
                       "time_s": time.perf_counter() - t0})
    chosen = min(trials, key=lambda t: (t["train_loss_after"], t["half_window"]))["half_window"]
    return {"grad": grad, "model": model_name, "epochs": epochs, "trial_batches": trial_batches,
            "criterion": "train_loss_after",
            "trials": trials, "chosen": chosen}
