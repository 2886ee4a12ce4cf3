"""Retraining one mode from the shared start: schedule, checkpoints, per-epoch side effects.

A mode is a gradient mode (``ste``, ``lut2d``, ``lut1d``) or ``simulated-error`` (STE
backward, exact products plus per-product noise in training). Its files live in
``<out>/modes/<mode>/``: ``run.json`` (what the run depends on, checked on resume; by
content, so a run directory resumes wherever it was moved or copied), ``last.pt`` (the
checkpoint of every epoch, written by :func:`appmult.train.fit`) and
``multiplication.json`` (what each epoch's forwards really used, and the threads, device and
processes it ran on, written *before* that epoch's checkpoint, so that a resumed run never
finds a checkpoint without its labels; a resume on another platform is warned of).
:func:`existing_run` says what run an output directory already holds.
"""

from __future__ import annotations

import json
import shutil
import sys
import tempfile
import warnings
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
from .retrain_start import Conversion, approx_model, load_start

__all__ = ["MODES_DIR", "EpochHook", "check_resume_settings", "existing_run", "mode_identity", "remove_modes",
           "train_mode"]

#: The directory of ``<out>`` holding one directory per mode.
MODES_DIR = "modes"
_RUN_FILE = "run.json"
_LABELS_FILE = "multiplication.json"
_HISTORY_FILE = "history.json"  # written by appmult.train.fit beside each checkpoint

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
    """What one mode's training depends on (``run.json``); a resumed run must match it.

    Files are identified by content, never by path: the LUT by its content hash, the FP32
    model by :func:`~appmult.flows.state_digest` (``fp32_info["sha256"]``), the data by
    :func:`~appmult.train.data_digest` (``fp32_info["data_sha256"]``: a ``data_dir`` whose
    files changed, or another one, is another run). The rest is :func:`_settings_identity`.
    """
    return {"mode": mode, "lut_sha256": lut.sha256, "half_window": half_window, **_settings_identity(cfg, mode),
            "fp32_sha256": fp32_info["sha256"], "data_sha256": fp32_info["data_sha256"]}


def _settings_identity(cfg: RetrainConfig, mode: str) -> dict[str, Any]:
    """The part of :func:`mode_identity` the configuration alone decides (checked before any work)."""
    return {"model": cfg.model, "dataset": cfg.dataset, "epochs": cfg.epochs, "batch_size": cfg.batch_size,
            "lr": cfg.lr, "seed": cfg.seed, "exact_last": cfg.exact_last, "mre": cfg.mre,
            "weight_decay": cfg.weight_decay, "milestones": list(cfg.milestones),
            "weight_scheme": cfg.weight_scheme, "approximate": cfg.approximate, "calibration": cfg.calibration,
            "augment": cfg.augment,
            "noise_operands": cfg.noise_operands if mode == SIMULATED_ERROR_MODE else None,
            "calib_batches": cfg.calib_batches}


def check_resume_settings(cfg: RetrainConfig) -> None:
    """Refuse a ``--resume`` whose settings differ from the run's, before any work is done.

    :func:`mode_identity` is checked again where each mode starts (the LUT's tables, the
    FP32 model and the data are known only then); this catches what the configuration
    alone decides, before the FP32 pretraining, the calibration and the half-window trials
    that such a resume would otherwise run to no end.
    """
    for mode in cfg.modes:
        _check_resumable(Path(cfg.out) / MODES_DIR / mode, _settings_identity(cfg, mode))


def _read_json(path: Path) -> Any:
    """A JSON file's content, or None when it is missing or unreadable."""
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError):
        return None


def _check_resumable(mode_dir: Path, identity: dict[str, Any]) -> None:
    path = mode_dir / _RUN_FILE
    if not path.is_file():
        if (mode_dir / CHECKPOINT_NAME).exists():  # (a checkpoint alone says not what made it)
            raise RetrainError(f"{mode_dir} holds a checkpoint ({CHECKPOINT_NAME}) but no {_RUN_FILE}, so which "
                               "settings made it cannot be checked; replace the run with --overwrite instead of "
                               "--resume, or use another --out")
        return
    theirs = _read_json(path)
    if not isinstance(theirs, dict):
        raise RetrainError(f"{path} is not a run description (JSON object); use another --out, or replace the "
                           f"run with --overwrite")
    diffs = [f"{k}: {theirs.get(k)!r} != {v!r}" for k, v in identity.items() if theirs.get(k) != v]
    if diffs:
        raise RetrainError(f"{mode_dir} holds another run ({'; '.join(diffs[:3])}); use another --out, or "
                           f"replace it with --overwrite instead of --resume")


def _mode_dirs(out: Path) -> list[Path]:
    """The mode directories of ``out`` that hold something of a run (a description or a checkpoint)."""
    modes = out / MODES_DIR
    if not modes.is_dir():
        return []
    return sorted(d for d in modes.iterdir()
                  if d.is_dir() and ((d / _RUN_FILE).exists() or (d / CHECKPOINT_NAME).exists()))


def existing_run(out: Path, *, finished: bool) -> str | None:
    """The retraining run ``out`` holds, in words, or None when it holds none.

    E.g. ``"mlp on digits, LUT 0123456789abcdef: ste 1/3 epochs; interrupted"``. A
    directory with nothing but the FP32 cache (``pretrained/``) holds no run.

    Args:
        out: the output directory.
        finished: whether the run's results (``results.json``) are there.
    """
    dirs = _mode_dirs(out)
    state = "finished" if finished else "interrupted"
    if not dirs:
        return f"{state}; results.json" if finished else None
    idents = {d.name: _read_json(d / _RUN_FILE) for d in dirs}
    idents = {k: v if isinstance(v, dict) else {} for k, v in idents.items()}
    modes = []
    for d in dirs:
        history = _read_json(d / _HISTORY_FILE)
        done = len(history) if isinstance(history, list) else 0
        modes.append(f"{d.name} {done}/{idents[d.name].get('epochs', '?')} epochs")
    listing = f"{', '.join(modes)}; {state}"
    # The LUT as the user knows it: a mode with the file's own tables (no half window chosen here).
    known = [i for i in idents.values() if i.get("lut_sha256")]
    plain = [i for i in known if i.get("half_window") is None] or known
    if not plain:
        return listing
    first = plain[0]
    return f"{first.get('model')} on {first.get('dataset')}, LUT {str(first['lut_sha256'])[:16]}: {listing}"


def remove_modes(out: Path) -> None:
    """Delete the mode directories of the run ``out`` holds (``--overwrite``)."""
    modes = out / MODES_DIR
    if modes.is_dir():
        shutil.rmtree(modes)


class _EpochLabels:
    """``multiplication.json``: what each epoch's forwards used, which a checkpoint does not hold."""

    def __init__(self, path: Path, write: bool):
        self.path, self.write = path, write
        self.labels: dict[str, dict] = {}

    def load(self) -> None:
        if self.path.is_file():
            labels = _read_json(self.path)
            if not isinstance(labels, dict):
                raise RetrainError(f"{self.path} is not a record of epoch labels (JSON object); the run cannot "
                                   f"be resumed: replace it with --overwrite")
            self.labels = labels

    def record(self, epoch: int, used: dict[str, str]) -> None:
        self.labels[str(epoch)] = used
        if self.write:
            atomic_write_text(self.path, json.dumps(self.labels, indent=1) + "\n")

    def warn_if_moved(self, epoch: int, platform: dict[str, Any]) -> None:
        """Warn when a run resumes after ``epoch`` on another platform than that epoch ran on."""
        before = self.labels.get(str(epoch), {})
        moved = [f"{k} {before[k]!r} -> {v!r}" for k, v in platform.items() if k in before and before[k] != v]
        if moved:
            warnings.warn(f"{self.path.parent} resumes after epoch {epoch} with {', '.join(moved)}: float sums "
                          f"may round differently there, so the result can differ in its last bits from an "
                          f"uninterrupted run (each epoch's platform is in its history); to match, resume as "
                          f"epoch {epoch} ran (--threads {before.get('threads')} on {before.get('device')})",
                          RuntimeWarning, stacklevel=4)

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
        self.path = Path(cfg.out) / MODES_DIR / mode
        self.labels = _EpochLabels(self.path / _LABELS_FILE, write=d.main)
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
            atomic_write_text(self.path / _RUN_FILE, json.dumps(identity, indent=1) + "\n")
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

class _LabelsBeforeCheckpoint:
    """``fit``'s test loader: when an epoch's evaluation has seen its last batch, its labels are recorded.

    :func:`appmult.train.fit` evaluates each epoch, then writes its checkpoint, then calls
    ``on_epoch_end``. Recording what the epoch's forwards used at the end of its evaluation
    -- its last forward -- writes ``multiplication.json`` before the checkpoint: a crash
    between the two leaves labels of an epoch that is retrained on resume (and labelled
    again), never a checkpoint without its labels.
    """

    def __init__(self, loader: Any, schedule: _Schedule, labels: _EpochLabels, platform: dict[str, Any]):
        self.loader, self.schedule, self.labels, self.platform = loader, schedule, labels, platform

    def __iter__(self):
        yield from self.loader
        epoch = self.schedule.epoch + 1  # 1-based, as fit counts
        self.labels.record(epoch, {**self.schedule.take(), **self.platform})
        self.schedule.epoch = epoch

    def __len__(self) -> int:
        return len(self.loader)

    def __getattr__(self, name: str) -> Any:
        if name == "loader":  # not set yet (copy, unpickling): no recursion
            raise AttributeError(name)
        return getattr(self.loader, name)  # dataset, batch_size, ... of the real loader


class _EpochEnd:
    """``fit``'s ``on_epoch_end`` for one mode: ranges synced, labels reported, progress, the user's hook."""

    def __init__(self, cfg: RetrainConfig, d: Dist, mode: str, model: nn.Module, labels: _EpochLabels,
                 hook: EpochHook | None):
        self.cfg, self.d, self.mode, self.model = cfg, d, mode, model
        self.labels, self.hook = labels, hook

    def __call__(self, epoch: int, record: dict) -> Any:
        self.d.sync_observers(self.model)
        used = self.labels.labels[str(epoch)]  # recorded when the epoch's evaluation ended
        record.update(used)
        if self.cfg.progress and self.d.main:
            print(f"[retrain] {self.mode} epoch {epoch}/{self.cfg.epochs}: train loss {record['train_loss']:.4f}, "
                  f"test acc {100 * record['test_accuracy']:.2f}% ({used['train_multiplication']}, "
                  f"{record['epoch_time_s']:.1f} s)", file=sys.stderr, flush=True)
        return self.hook(self.mode, epoch, record) if self.hook is not None else None


# --- one mode --------------------------------------------------------------------------------------

def _platform(device: torch.device, d: Dist) -> dict[str, Any]:
    """What an epoch's float sums depend on beyond the run's settings: its torch threads, device and
    number of processes (a resume elsewhere can round differently; recorded per epoch)."""
    return {"threads": torch.get_num_threads(), "device": str(device), "world_size": d.world}


def train_mode(cfg: RetrainConfig, d: Dist, mode: str, fp32: nn.Module, lut: LutFile,
               start: dict[str, torch.Tensor], loaders: Loaders, device: torch.device,
               identity: dict[str, Any], on_epoch_end: EpochHook | None) -> tuple[nn.Module, list[dict], float]:
    """Retrain ``mode`` from the shared ``start`` (resuming when asked).

    Returns:
        The trained model, its per-epoch history, and its own accuracy before training
        (evidence that every mode starts from the same point).
    """
    grad = "ste" if mode == SIMULATED_ERROR_MODE else mode
    model = load_start(approx_model(fp32, lut, grad, device, Conversion.of(cfg)), start)
    start_accuracy = evaluate(model, loaders.test, device=device).accuracy
    noise = None
    if mode == SIMULATED_ERROR_MODE:
        sim = SimulatedError(cfg.mre if cfg.mre is not None else lut_mre(lut))
        # Only the layers that multiply through the LUT carry its error (not quantized-but-exact ones).
        noise = attach_simulated_error(model, sim, cfg.noise_operands,
                                       layers=[m for m in model.modules() if getattr(m, "lut", None) is not None
                                               and getattr(m.lut, "sha256", None) == lut.sha256])
    schedule = _Schedule(model, cfg.epochs, cfg.exact_last, noise)
    mode_dir = _ModeDir(cfg, d, mode, identity)
    schedule.epoch = mode_dir.resumed_epoch
    platform = _platform(device, d)
    mode_dir.labels.warn_if_moved(mode_dir.resumed_epoch, platform)

    trained: nn.Module = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        trained = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      broadcast_buffers=False)
    epoch_end = _EpochEnd(cfg, d, mode, model, mode_dir.labels, on_epoch_end)
    labelled = (loaders.train, _LabelsBeforeCheckpoint(loaders.test, schedule, mode_dir.labels, platform))
    try:
        optimizer = torch.optim.Adam(trained.parameters(), lr=cfg.lr, weight_decay=cfg.weight_decay)
        history = fit(trained, labelled, cfg.epochs, optimizer=optimizer, milestones=cfg.milestones, gamma=0.5,
                      seed=cfg.seed, checkpoint_dir=mode_dir.checkpoints, resume=cfg.resume,
                      progress=cfg.progress and d.main, on_epoch_end=epoch_end, top5=cfg.dataset == "cifar100",
                      identity=identity)
    finally:
        schedule.remove()
        mode_dir.cleanup()
    d.sync_observers(model)
    mode_dir.labels.restore(history)
    return model, history, start_accuracy
