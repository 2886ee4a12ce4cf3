"""Retraining one mode from the shared start: schedule, checkpoints, per-epoch side effects.

A mode is a gradient mode (``ste``, ``lut2d``, ``lut1d``) or ``simulated-error`` (STE
backward, exact products plus per-product noise in training). Its files live in
``<out>/modes/<mode>/``: ``run.json`` (what the run depends on, checked on resume),
``last.pt`` (the checkpoint of every epoch, written by :func:`appmult.train.fit`) and
``multiplication.json`` (what each epoch's forwards really used).
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..files import atomic_write_text
from ..lut_gen import LutFile
from ..methods.simulated_error import SimulatedError, SimulatedErrorHooks, attach_simulated_error, lut_mre
from ..nn import exact_
from ..train import CHECKPOINT_NAME, Loaders, evaluate, fit, load_checkpoint
from .distributed import Dist
from .retrain_config import SIMULATED_ERROR_MODE, RetrainConfig, RetrainError
from .retrain_start import approx_model, load_start

__all__ = ["EpochHook", "mode_identity", "train_mode"]

#: ``on_epoch_end(mode, epoch, record)`` of :func:`~appmult.flows.run_retrain`.
EpochHook = Callable[[str, int, dict], Any]


class _Schedule:
    """Decides per forward whether products are exact, and counts what training really used.

    Training forwards of epoch ``e`` (0-based) use the LUT, or exact products during the
    last ``exact_last`` epochs (hybrid), or exact products plus simulated error (noise
    hooks). Evaluation uses the LUT, or exact products in the hybrid's exact epochs.
    """

    def __init__(self, model: nn.Module, epochs: int, exact_last: int, noise: SimulatedErrorHooks | None = None):
        self.model, self.epochs, self.exact_last, self.noise = model, epochs, exact_last, noise
        self.epoch = 0
        self.train_modes: Counter[str] = Counter()
        self.eval_modes: Counter[str] = Counter()
        self._handle = model.register_forward_pre_hook(self._pre)

    def exact_epoch(self, epoch: int) -> bool:
        return epoch >= self.epochs - self.exact_last

    def _pre(self, module: nn.Module, args: tuple) -> None:
        hybrid_exact = self.exact_epoch(self.epoch)
        if module.training:
            noisy = self.noise is not None and not hybrid_exact
            exact_(module, hybrid_exact or noisy)
            if self.noise is not None:
                self.noise.enabled = noisy
            self.train_modes["exact+noise" if noisy else "exact" if hybrid_exact else "approx"] += 1
        else:
            exact_(module, hybrid_exact)
            self.eval_modes["exact" if hybrid_exact else "approx"] += 1

    def take(self) -> dict[str, str]:
        """What the epoch just finished used (one label each, or ``"mixed"``), and reset."""
        def one(c: Counter) -> str | None:
            return None if not c else next(iter(c)) if len(c) == 1 else "mixed"
        out = {"train_multiplication": one(self.train_modes), "eval_multiplication": one(self.eval_modes)}
        self.train_modes.clear()
        self.eval_modes.clear()
        return out

    def remove(self) -> None:
        self._handle.remove()
        if self.noise is not None:
            self.noise.remove()
        exact_(self.model, False)


# --- the mode's directory --------------------------------------------------------------------------

def mode_identity(cfg: RetrainConfig, mode: str, lut: LutFile, fp32_info: dict, half_window) -> dict[str, Any]:
    """What one mode's training depends on (``run.json``); a resumed run must match it."""
    return {"mode": mode, "lut_sha256": lut.sha256, "half_window": half_window, "model": cfg.model,
            "dataset": cfg.dataset, "epochs": cfg.epochs, "batch_size": cfg.batch_size, "lr": cfg.lr,
            "seed": cfg.seed, "exact_last": cfg.exact_last, "mre": cfg.mre,
            "noise_operands": cfg.noise_operands if mode == SIMULATED_ERROR_MODE else None,
            "fp32": fp32_info.get("path"), "calib_batches": cfg.calib_batches}


def _check_resumable(mode_dir: Path, identity: dict[str, Any]) -> None:
    path = mode_dir / "run.json"
    if not path.is_file():
        return
    theirs = json.loads(path.read_text())
    diffs = [f"{k}: {theirs.get(k)!r} != {v!r}" for k, v in identity.items() if theirs.get(k) != v]
    if diffs:
        raise RetrainError(f"{mode_dir} holds another run ({'; '.join(diffs[:3])}); use another --out "
                           f"or run without --resume")


class _EpochLabels:
    """``multiplication.json``: what each epoch's forwards used, which a checkpoint does not hold."""

    def __init__(self, path: Path, write: bool):
        self.path, self.write = path, write
        self.labels: dict[str, dict] = {}

    def load(self) -> None:
        if self.path.is_file():
            self.labels = json.loads(self.path.read_text())

    def record(self, epoch: int, used: dict[str, str]) -> None:
        self.labels[str(epoch)] = used
        if self.write:
            atomic_write_text(self.path, json.dumps(self.labels, indent=1) + "\n")

    def restore(self, history: list[dict]) -> None:
        """Label the epochs restored from a checkpoint."""
        for r in history:
            for k, v in self.labels.get(str(r["epoch"]), {}).items():
                r.setdefault(k, v)


class _ModeDir:
    """``<out>/modes/<mode>``, fresh or resumed; where this rank writes its checkpoints.

    Only rank 0 writes into the output directory; the other ranks resume from a private
    copy of its checkpoint and write their own (discarded) ones into a scratch directory.
    """

    def __init__(self, cfg: RetrainConfig, d: Dist, mode: str, identity: dict[str, Any]):
        self.path = Path(cfg.out) / "modes" / mode
        self.labels = _EpochLabels(self.path / "multiplication.json", write=d.main)
        self.resumed_epoch = 0  # epochs already done (from the checkpoint)
        self.scratch: str | None = None
        checkpoint = self.path / CHECKPOINT_NAME
        if cfg.resume:
            _check_resumable(self.path, identity)
            self.labels.load()
            if checkpoint.is_file():
                self.resumed_epoch = int(load_checkpoint(checkpoint)["epoch"])
        if d.main:
            if not cfg.resume and self.path.exists():
                shutil.rmtree(self.path)
            self.path.mkdir(parents=True, exist_ok=True)
            atomic_write_text(self.path / "run.json", json.dumps(identity, indent=1) + "\n")
        else:
            self.scratch = tempfile.mkdtemp(prefix=f"appmult-retrain-rank{d.rank}-")
            if cfg.resume and checkpoint.is_file():
                shutil.copy2(checkpoint, Path(self.scratch) / CHECKPOINT_NAME)

    @property
    def checkpoints(self) -> Path:
        return self.path if self.scratch is None else Path(self.scratch)

    def cleanup(self) -> None:
        if self.scratch is not None:
            shutil.rmtree(self.scratch, ignore_errors=True)


# --- per epoch ---------------------------------------------------------------------------------------

class _EpochEnd:
    """``fit``'s ``on_epoch_end`` for one mode: ranges synced, labels recorded, progress, the user's hook."""

    def __init__(self, cfg: RetrainConfig, d: Dist, mode: str, model: nn.Module, schedule: _Schedule,
                 labels: _EpochLabels, hook: EpochHook | None):
        self.cfg, self.d, self.mode, self.model = cfg, d, mode, model
        self.schedule, self.labels, self.hook = schedule, labels, hook

    def __call__(self, epoch: int, record: dict) -> Any:
        self.d.sync_observers(self.model)
        used = self.schedule.take()
        record.update(used)
        self.labels.record(epoch, used)
        self.schedule.epoch = epoch
        if self.cfg.progress and self.d.main:
            print(f"[retrain] {self.mode} epoch {epoch}/{self.cfg.epochs}: train loss {record['train_loss']:.4f}, "
                  f"test acc {100 * record['test_accuracy']:.2f}% ({used['train_multiplication']}, "
                  f"{record['epoch_time_s']:.1f} s)", file=sys.stderr, flush=True)
        return self.hook(self.mode, epoch, record) if self.hook is not None else None


# --- one mode --------------------------------------------------------------------------------------

def train_mode(cfg: RetrainConfig, d: Dist, mode: str, fp32: nn.Module, lut: LutFile,
               start: dict[str, torch.Tensor], loaders: Loaders, device: torch.device,
               identity: dict[str, Any], on_epoch_end: EpochHook | None) -> tuple[nn.Module, list[dict], float]:
    """Retrain ``mode`` from the shared ``start`` (resuming when asked).

    Returns:
        The trained model, its per-epoch history, and its own accuracy before training
        (evidence that every mode starts from the same point).
    """
    grad = "ste" if mode == SIMULATED_ERROR_MODE else mode
    model = load_start(approx_model(fp32, lut, grad, device), start)
    start_accuracy = evaluate(model, loaders.test, device=device).accuracy
    noise = None
    if mode == SIMULATED_ERROR_MODE:
        sim = SimulatedError(cfg.mre if cfg.mre is not None else lut_mre(lut))
        noise = attach_simulated_error(model, sim, cfg.noise_operands)
    schedule = _Schedule(model, cfg.epochs, cfg.exact_last, noise)
    mode_dir = _ModeDir(cfg, d, mode, identity)
    schedule.epoch = mode_dir.resumed_epoch

    trained: nn.Module = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        trained = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      broadcast_buffers=False)
    epoch_end = _EpochEnd(cfg, d, mode, model, schedule, mode_dir.labels, on_epoch_end)
    try:
        history = fit(trained, loaders, cfg.epochs, lr=cfg.lr, seed=cfg.seed, checkpoint_dir=mode_dir.checkpoints,
                      resume=cfg.resume, progress=cfg.progress and d.main, on_epoch_end=epoch_end)
    finally:
        schedule.remove()
        mode_dir.cleanup()
    d.sync_observers(model)
    mode_dir.labels.restore(history)
    return model, history, start_accuracy
