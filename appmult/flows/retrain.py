"""The retraining workflow behind ``appmult retrain``: FP32 -> quantized -> approximate -> retrained.

Pipeline (:func:`run_retrain`):

1. An FP32 model: pretrained and cached (:func:`appmult.train.pretrain_fp32`) or
   loaded from a checkpoint.
2. Quantize and calibrate once against the LUT: this is the *starting point* every
   gradient mode retrains from (same weights, same activation ranges).
3. Evaluate the starting point with exact products (same quantization: the
   "exact-quantized" reference) and with the approximate multiplier ("approx before").
4. Retrain once per mode -- ``ste``, ``lut2d``, ``lut1d`` backward (Meng et al.) and,
   optionally, ``simulated-error`` (Hammad et al.: exact products plus per-product noise
   of the LUT's MRE in training, see :mod:`appmult.methods.simulated_error`) -- each from the same start,
   with the same seeds and batch order; optional hybrid schedule (exact products, same
   quantization, for the last ``exact_last`` epochs).
5. Evaluate each result on the approximate multiplier and with exact products; write
   ``results.json``, ``results.md`` and ``curves.png``.
6. Optionally (``verify_rtl``) the hardware proof per mode: the retrained model's first
   approximate conv layer (the first linear one in a model without convolutions), fed a
   few real test images, has its integer accumulators recomputed by the RTL MAC unit of
   the LUT's circuit in a simulator (:func:`appmult.flows.verify_layer_rtl`); the
   outcome is recorded per mode, and ``appmult retrain`` exits non-zero on a mismatch.

LUT-2D half window: the LUT file's stored tables by default; an explicit ``H``; or
``"auto"``, the published procedure -- a short training trial per ``H`` in 1, 2, 4, ...
(while ``2H+1`` fits the operand range), keeping the ``H`` with the lowest training loss
afterwards; the trials are recorded in ``results.json``.

Every epoch is checkpointed atomically per mode (``<out>/modes/<mode>/last.pt``); with
``resume=True`` an interrupted run continues where it stopped and ends with the same
numbers as an uninterrupted one. Under ``torchrun`` (``WORLD_SIZE > 1``) the same call
trains with DistributedDataParallel (gloo on CPU, NCCL on GPUs): each rank sees its
shard of every epoch's permutation; only rank 0 writes files.
"""

from __future__ import annotations

import copy
import dataclasses
import hashlib
import json
import math
import os
import platform
import shutil
import sys
import tempfile
import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader, DistributedSampler

from ..errors import InvalidTypeError, MissingFileError, UserError
from ..files import atomic_write_text
from ..lut_gen.gradients import HALF_WINDOWS, check_half_window, lut2d_and_lut1d
from ..lut_gen.lutfile import LutFile
from ..methods.simulated_error import NOISE_OPERANDS, SimulatedError, attach_simulated_error, lut_mre
from ..nn import (ActivationQuantizer, ApproxConfig, ApproxConv2d, ApproxLinear, GradMode, approximate_,
                  calibrate, exact_, exact_multiplication, load_lut)
from ..tb import check_simulator
from ..train import (CHECKPOINT_NAME, DATASETS, MODEL_NAMES, Loaders, build_model, evaluate, fit,
                     load_checkpoint, load_pretrained, make_loaders, plot_history, pretrain_fp32,
                     seed_everything, train_epoch)
from .characterization import characterize
from . import rtlcheck

__all__ = [
    "RESULTS_FORMAT",
    "SIMULATED_ERROR_MODE",
    "RetrainConfig",
    "RetrainError",
    "half_window_trials",
    "results_markdown",
    "run_retrain",
    "state_digest",
    "with_half_window",
]

RESULTS_FORMAT = "appmult.retrain.results/1"
#: Name of the simulated-error mode in results (trained with noise, evaluated on the LUT).
SIMULATED_ERROR_MODE = "simulated-error"
GRAD_MODES = tuple(g.value for g in GradMode)

EpochHook = Callable[[str, int, dict], Any]


class RetrainError(UserError, ValueError):
    """A retraining run that cannot proceed as asked (mismatched files, bad arguments)."""


def _is_int(v: object) -> bool:
    return isinstance(v, (int, np.integer)) and not isinstance(v, bool)


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
        exact_last: hybrid schedule: exact products (same quantization) in the last N epochs.
        simulated_error: also train a ``simulated-error`` mode (exact products plus
            per-product noise of the LUT's MRE), evaluated on the real LUT.
        mre: MRE for the simulated error (default: the LUT's).
        noise_operands: products the simulated error applies to: ``"codes"`` (what the
            multiplier receives) or ``"values"`` (zero-point-corrected ``x * w``); see
            :func:`appmult.nn.noise.attach_simulated_error`.
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
        if (self.lut is None) == (self.spec is None):
            which = "both" if self.lut is not None else "neither"
            raise RetrainError(f"Give exactly one of a LUT file (--lut) or a multiplier spec (--spec), "
                               f"not {which}")
        for name in ("lut", "checkpoint", "data_dir", "pretrained_dir", "out"):
            v = getattr(self, name)
            if isinstance(v, os.PathLike):
                object.__setattr__(self, name, os.fspath(v))
        if self.model not in MODEL_NAMES:
            raise RetrainError(f"Model must be one of {', '.join(map(repr, MODEL_NAMES))}, not {self.model!r}")
        if self.dataset not in DATASETS:
            raise RetrainError(f"Dataset must be one of {', '.join(map(repr, DATASETS))}, not {self.dataset!r}")
        for name in ("epochs", "pretrain_epochs", "batch_size", "calib_batches"):
            v = getattr(self, name)
            if not _is_int(v) or v < 1:
                raise RetrainError(f"{name} must be a positive integer, not {v!r}")
        if self.trial_batches is not None and (not _is_int(self.trial_batches) or self.trial_batches < 1):
            raise RetrainError(f"trial_batches must be a positive integer or None, not {self.trial_batches!r}")
        if not _is_int(self.seed) or self.seed < 0:
            raise RetrainError(f"seed must be a non-negative integer, not {self.seed!r}")
        if isinstance(self.lr, bool) or not isinstance(self.lr, (int, float)) or not self.lr > 0 \
                or not math.isfinite(self.lr):
            raise RetrainError(f"lr must be a positive number, not {self.lr!r}")
        grads = (self.grads,) if isinstance(self.grads, str) else tuple(self.grads)
        if not grads and not self.simulated_error:
            raise RetrainError("Give at least one gradient mode (--grad ste lut2d lut1d) or --simulated-error")
        for g in grads:
            if g not in GRAD_MODES:
                raise RetrainError(f"Gradient mode must be one of {', '.join(map(repr, GRAD_MODES))}, not {g!r}")
        if len(set(grads)) != len(grads):
            raise RetrainError(f"Gradient modes repeat: {' '.join(grads)}")
        object.__setattr__(self, "grads", grads)
        if self.half_window is not None:
            hw = self.half_window
            if isinstance(hw, str) and hw != "auto" and hw.isdigit():
                hw = int(hw)
            try:
                object.__setattr__(self, "half_window", check_half_window(hw))
            except ValueError:
                raise RetrainError(f"Half window must be one of {', '.join(map(str, HALF_WINDOWS))} or "
                                   f"'auto', not {self.half_window!r}") from None
        if not _is_int(self.exact_last) or not 0 <= self.exact_last < self.epochs:
            raise RetrainError(f"exact_last must be an integer in 0..{self.epochs - 1} (at least one "
                               f"approximate epoch), not {self.exact_last!r}")
        if self.mre is not None:
            try:
                SimulatedError(self.mre)
            except ValueError as exc:
                raise RetrainError(str(exc)) from None
        if self.noise_operands not in NOISE_OPERANDS:
            raise RetrainError(f"Noise operands must be 'codes' or 'values', not {self.noise_operands!r}")
        if self.threads is not None and (not _is_int(self.threads) or self.threads < 1):
            raise RetrainError(f"threads must be a positive integer, not {self.threads!r}")
        if not isinstance(self.verify_rtl, bool):
            raise RetrainError(f"verify_rtl must be a bool, not {self.verify_rtl!r}")
        if not _is_int(self.rtl_positions) or self.rtl_positions < 1:
            raise RetrainError(f"rtl_positions must be a positive integer, not {self.rtl_positions!r}")
        if self.rtl_sim not in ("icarus", "verilator"):
            raise RetrainError(f"rtl_sim must be 'icarus' or 'verilator', not {self.rtl_sim!r}")

    @property
    def modes(self) -> tuple[str, ...]:
        """The retraining modes, in order: the gradient modes, then ``simulated-error``."""
        return self.grads + ((SIMULATED_ERROR_MODE,) if self.simulated_error else ())


# --- distributed context -----------------------------------------------------------------------

@dataclasses.dataclass(frozen=True)
class _Dist:
    rank: int = 0
    world: int = 1
    owned: bool = False  # this run initialized the process group and must destroy it

    @property
    def main(self) -> bool:
        return self.rank == 0

    def barrier(self) -> None:
        if self.world > 1:
            torch.distributed.barrier()


def _init_distributed() -> _Dist:
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if world <= 1:
        return _Dist()
    import torch.distributed as dist
    if dist.is_initialized():
        return _Dist(dist.get_rank(), dist.get_world_size(), False)
    backend = "nccl" if torch.cuda.is_available() else "gloo"
    dist.init_process_group(backend)
    return _Dist(dist.get_rank(), dist.get_world_size(), True)


def _device(d: _Dist) -> torch.device:
    if torch.cuda.is_available():
        local = int(os.environ.get("LOCAL_RANK", d.rank))
        torch.cuda.set_device(local % torch.cuda.device_count())
        return torch.device("cuda", torch.cuda.current_device())
    return torch.device("cpu")


class _EpochSeededDistributedSampler(DistributedSampler):
    """DistributedSampler whose epoch is drawn from a generator that ``fit`` reseeds per epoch.

    :func:`appmult.nn.training.fit` reseeds ``loader.generator`` from ``(seed, epoch)`` at
    the start of every epoch but does not call ``set_epoch``; drawing the epoch from that
    generator gives every rank the same permutation (so the shards partition it) and makes
    a resumed run replay the same shards.
    """

    def __init__(self, dataset, generator: torch.Generator, num_replicas: int, rank: int):
        super().__init__(dataset, num_replicas=num_replicas, rank=rank, shuffle=True, drop_last=True)
        self.generator = generator

    def __iter__(self):
        self.set_epoch(int(torch.randint(0, 2 ** 31 - 1, (), generator=self.generator)))
        return super().__iter__()


def _shard_loaders(loaders: Loaders, d: _Dist, batch_size: int) -> Loaders:
    if d.world == 1:
        return loaders
    if batch_size % d.world:
        raise RetrainError(f"Batch size {batch_size} must be divisible by the {d.world} processes")
    gen = torch.Generator()
    ds = loaders.train.dataset
    sampler = _EpochSeededDistributedSampler(ds, gen, d.world, d.rank)
    train = DataLoader(ds, batch_size=batch_size // d.world, sampler=sampler, generator=gen)
    return Loaders(train, loaders.test, loaders.info)


# --- LUT ---------------------------------------------------------------------------------------

def _resolve_lut(cfg: RetrainConfig) -> LutFile:
    if cfg.lut is not None:
        return load_lut(cfg.lut)
    return characterize(cfg.spec, gradients=("ste", "lut2d", "lut1d"), progress=cfg.progress,
                        cost=False).to_lutfile()


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


def _stored_half_window(lut: LutFile, grad: str) -> int | None:
    params = (lut.metadata.get("gradient_params") or {}).get(grad) or {}
    hw = params.get("half_window")
    return int(hw) if _is_int(hw) else None


def _half_window_candidates(lut: LutFile) -> list[int]:
    n = 1 << min(lut.width_a, lut.width_b)
    return [h for h in HALF_WINDOWS if 2 * h + 1 < n]


def _lut_summary(lut: LutFile) -> dict[str, Any]:
    md = lut.metadata
    return {"id": lut.lut_id, "sha256": lut.sha256, "spec": md.get("spec") or md.get("name"),
            "family": md.get("family"), "width_a": lut.width_a, "width_b": lut.width_b,
            "signed": lut.signed, "gradients": sorted(lut.gradients), "metrics": md.get("metrics"),
            "gradient_params": md.get("gradient_params")}


# --- models ------------------------------------------------------------------------------------

def _say(cfg: RetrainConfig, d: _Dist, msg: str) -> None:
    if cfg.progress and d.main:
        print(f"[retrain] {msg}", file=sys.stderr, flush=True)


def _fp32_model(cfg: RetrainConfig, loaders: Loaders, d: _Dist) -> tuple[nn.Module, dict[str, Any]]:
    if cfg.checkpoint is not None:
        return _load_fp32_checkpoint(cfg, loaders), {"source": "checkpoint", "path": cfg.checkpoint}
    cache = Path(cfg.pretrained_dir) if cfg.pretrained_dir else Path(cfg.out) / "pretrained"

    def pretrain():
        return pretrain_fp32(cfg.model, cfg.dataset, cfg.pretrain_epochs, cfg.seed, out_dir=cache,
                             batch_size=cfg.batch_size, lr=cfg.lr, data_dir=cfg.data_dir,
                             progress=cfg.progress and d.main)
    # Rank 0 pretrains (or finds the cache); the others then load its file.
    if d.main:
        pre = pretrain()
    d.barrier()
    if not d.main:
        pre = pretrain()
    times = [r["epoch_time_s"] for r in pre.history if r.get("epoch_time_s") is not None]
    return pre.model, {"source": "pretrained", "path": str(pre.path), "epochs": len(pre.history),
                       "epoch_time_s": float(np.mean(times)) if times else None}


def _load_fp32_checkpoint(cfg: RetrainConfig, loaders: Loaders) -> nn.Module:
    path = Path(cfg.checkpoint)
    if not path.is_file():
        raise MissingFileError(f"Checkpoint {path} does not exist")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as exc:  # torch raises several types for foreign files
        raise RetrainError(f"Checkpoint {path} is not a readable torch file: {exc}") from None
    if isinstance(state, dict) and "model_name" in state and "model" in state:
        if state["model_name"] != cfg.model or state.get("dataset") != cfg.dataset:
            raise RetrainError(f"Checkpoint {path} holds a {state['model_name']!r} model for "
                               f"{state.get('dataset')!r}; this run asks for {cfg.model!r} on {cfg.dataset!r}")
        return load_pretrained(path).model
    if isinstance(state, dict) and "model" in state and isinstance(state["model"], dict):
        state = state["model"]  # a fit() checkpoint
    if not isinstance(state, dict) or not all(isinstance(v, torch.Tensor) for v in state.values()):
        raise RetrainError(f"Checkpoint {path} is neither a pretrained model file nor a state_dict")
    model = build_model(cfg.model, loaders.info)
    try:
        model.load_state_dict(state)
    except RuntimeError as exc:
        first = str(exc).strip().splitlines()[0]
        raise RetrainError(f"Checkpoint {path} does not fit model {cfg.model!r} for {cfg.dataset!r}: "
                           f"{first}") from None
    return model


def _is_lut_key(key: str) -> bool:
    return ".lut." in f".{key}"


def _approx_model(fp32: nn.Module, lut: LutFile, grad: str, device: torch.device) -> nn.Module:
    model = copy.deepcopy(fp32).to(device)
    return approximate_(model, ApproxConfig(lut, grad=grad, compute_missing_gradients=True))


def _load_start(model: nn.Module, start: dict[str, torch.Tensor]) -> nn.Module:
    # The LUT buffers and identity differ between modes (gradient tables change the LUT's
    # hash); everything else -- weights, biases, activation ranges -- is the shared start.
    missing, unexpected = model.load_state_dict(start, strict=False)
    bad = [k for k in missing if not _is_lut_key(k)] + list(unexpected)
    if bad:
        raise RuntimeError(f"Starting state does not fit the model: {', '.join(bad[:5])}")
    return model


def _fixed_batches(loader: DataLoader, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed)
    out = []
    for i, batch in enumerate(loader):
        if i >= n:
            break
        out.append((batch[0], batch[1]))
    return out


def _reseed(seed: int, loader: Any) -> None:
    # Every trial (and the timing epoch) sees the same batches and initial randomness.
    seed_everything(seed)
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed)


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


# --- schedule: approximate / exact / simulated error ----------------------------------------------

class _Schedule:
    """Decides per forward whether products are exact, and counts what training really used.

    Training forwards of epoch ``e`` (0-based) use the LUT, or exact products during the
    last ``exact_last`` epochs (hybrid), or exact products plus simulated error (noise
    hooks). Evaluation uses the LUT, or exact products in the hybrid's exact epochs.
    """

    def __init__(self, model: nn.Module, epochs: int, exact_last: int, noise=None):
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


def _sync_observers(model: nn.Module, d: _Dist) -> None:
    # DDP runs without per-forward buffer broadcasts (they would ship every LUT table each
    # step); activation ranges are made identical from rank 0 after every epoch instead.
    if d.world == 1:
        return
    for m in model.modules():
        if isinstance(m, ActivationQuantizer):
            for b in m.buffers():
                torch.distributed.broadcast(b, 0)


# --- half-window trials --------------------------------------------------------------------------

def half_window_trials(fp32: nn.Module, lut: LutFile, grad: str, start: dict[str, torch.Tensor],
                       loader: DataLoader, probe: Sequence[tuple[torch.Tensor, torch.Tensor]], *,
                       lr: float, seed: int, trial_batches: int | None, device: torch.device,
                       candidates: Iterable[int] | None = None) -> dict[str, Any]:
    """The published automatic choice of the LUT-2D half window: short training trials.

    For each candidate ``H`` the model is rebuilt from the same start with ``grad``
    tables of half window ``H``, trained for ``trial_batches`` batches (one epoch when
    None) with Adam, identically seeded, and its training loss is then measured on fixed
    ``probe`` batches of training data in evaluation mode. The lowest loss wins (ties: the
    smaller ``H``).

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

    Returns:
        ``{"grad", "trial_batches", "criterion", "trials": [{"half_window", "train_loss_during",
        "train_loss_after", "time_s"}...], "chosen"}``.
    """
    cands = list(candidates) if candidates is not None else _half_window_candidates(lut)
    trials = []
    limited = _Limited(loader, trial_batches)
    for h in cands:
        t0 = time.perf_counter()
        model = _load_start(_approx_model(fp32, with_half_window(lut, h), grad, device), start)
        opt = torch.optim.Adam(model.parameters(), lr=lr)
        _reseed(seed, loader)
        during = train_epoch(model, limited, opt, device=device, desc=f"H={h}")
        after = evaluate(model, probe, device=device)
        trials.append({"half_window": h, "train_loss_during": during.loss, "train_loss_after": after.loss,
                       "time_s": time.perf_counter() - t0})
    chosen = min(trials, key=lambda t: (t["train_loss_after"], t["half_window"]))["half_window"]
    return {"grad": grad, "trial_batches": trial_batches, "criterion": "train_loss_after",
            "trials": trials, "chosen": chosen}


# --- one mode ------------------------------------------------------------------------------------

def _mode_identity(cfg: RetrainConfig, mode: str, lut: LutFile, fp32_info: dict, half_window) -> dict[str, Any]:
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


def _train_mode(cfg: RetrainConfig, d: _Dist, mode: str, fp32: nn.Module, lut: LutFile,
                start: dict[str, torch.Tensor], loaders: Loaders, device: torch.device,
                identity: dict[str, Any], on_epoch_end: EpochHook | None) -> tuple[nn.Module, list[dict]]:
    grad = "ste" if mode == SIMULATED_ERROR_MODE else mode
    model = _load_start(_approx_model(fp32, lut, grad, device), start)
    # Evidence that every mode starts from the same point: its own model, before training.
    start_accuracy = evaluate(model, loaders.test, device=device).accuracy
    noise = None
    if mode == SIMULATED_ERROR_MODE:
        sim = SimulatedError(cfg.mre if cfg.mre is not None else lut_mre(lut))
        noise = attach_simulated_error(model, sim, cfg.noise_operands)
    schedule = _Schedule(model, cfg.epochs, cfg.exact_last, noise)

    mode_dir = Path(cfg.out) / "modes" / mode
    ckpt_dir: Path | None = mode_dir
    scratch: str | None = None
    labels_path = mode_dir / "multiplication.json"
    labels: dict[str, dict] = {}
    if cfg.resume:
        _check_resumable(mode_dir, identity)
        if labels_path.is_file():
            labels = json.loads(labels_path.read_text())
        if (mode_dir / CHECKPOINT_NAME).is_file():
            schedule.epoch = int(load_checkpoint(mode_dir / CHECKPOINT_NAME)["epoch"])
    if d.main:
        if not cfg.resume and mode_dir.exists():
            shutil.rmtree(mode_dir)
        mode_dir.mkdir(parents=True, exist_ok=True)
        atomic_write_text(mode_dir / "run.json", json.dumps(identity, indent=1) + "\n")
    else:
        # Only rank 0 writes into the output directory; the other ranks resume from a
        # private copy of its checkpoint and write their own (discarded) ones there.
        scratch = tempfile.mkdtemp(prefix=f"appmult-retrain-rank{d.rank}-")
        if cfg.resume and (mode_dir / CHECKPOINT_NAME).is_file():
            shutil.copy2(mode_dir / CHECKPOINT_NAME, Path(scratch) / CHECKPOINT_NAME)
        ckpt_dir = Path(scratch)

    trained: nn.Module = model
    if d.world > 1:
        from torch.nn.parallel import DistributedDataParallel as DDP
        trained = DDP(model, device_ids=[device.index] if device.type == "cuda" else None,
                      broadcast_buffers=False)

    def epoch_end(epoch: int, record: dict) -> Any:
        _sync_observers(model, d)
        used = schedule.take()
        record.update(used)
        labels[str(epoch)] = used
        schedule.epoch = epoch
        if d.main:
            atomic_write_text(labels_path, json.dumps(labels, indent=1) + "\n")
        if cfg.progress and d.main:
            print(f"[retrain] {mode} epoch {epoch}/{cfg.epochs}: train loss {record['train_loss']:.4f}, "
                  f"test acc {100 * record['test_accuracy']:.2f}% ({used['train_multiplication']}, "
                  f"{record['epoch_time_s']:.1f} s)", file=sys.stderr, flush=True)
        return on_epoch_end(mode, epoch, record) if on_epoch_end is not None else None

    try:
        history = fit(trained, loaders, cfg.epochs, lr=cfg.lr, seed=cfg.seed, checkpoint_dir=ckpt_dir,
                      resume=cfg.resume, progress=cfg.progress and d.main, on_epoch_end=epoch_end)
    finally:
        schedule.remove()
        if scratch is not None:
            shutil.rmtree(scratch, ignore_errors=True)
    _sync_observers(model, d)
    for r in history:  # epochs restored from a checkpoint get their labels from the side file
        for k, v in labels.get(str(r["epoch"]), {}).items():
            r.setdefault(k, v)
    return model, history, start_accuracy


def state_digest(model: nn.Module) -> str:
    """SHA-256 over a model's state_dict tensors (names, dtypes, shapes, bytes), in key order.

    Two processes hold the same trained model exactly when their digests agree (used to
    check that DDP ranks end identical).
    """
    h = hashlib.sha256()
    for k, v in model.state_dict().items():
        if not isinstance(v, torch.Tensor):
            continue
        t = v.detach().cpu().contiguous()
        h.update(f"{k}:{t.dtype}:{tuple(t.shape)};".encode())
        h.update(t.reshape(-1).view(torch.uint8).numpy().tobytes())
    return h.hexdigest()


def _time_exact_epoch(start_model: nn.Module, loaders: Loaders, cfg: RetrainConfig, device) -> float:
    """Seconds of one training epoch plus evaluation with exact products (same quantization)."""
    model = copy.deepcopy(start_model)
    exact_(model, True)
    opt = torch.optim.Adam(model.parameters(), lr=cfg.lr)
    _reseed(cfg.seed, loaders.train)
    t0 = time.perf_counter()
    train_epoch(model, loaders.train, opt, device=device, desc="exact-quantized timing")
    evaluate(model, loaders.test, device=device)
    return time.perf_counter() - t0


# --- the hardware proof --------------------------------------------------------------------------

#: Test images fed to the model for the RTL check.
RTL_IMAGES = 4


def _check_rtl_possible(cfg: RetrainConfig, lut: LutFile) -> None:
    """Refuse ``verify_rtl`` before any training when it cannot work."""
    if not lut.metadata.get("spec"):
        raise RetrainError(f"--verify-rtl needs a LUT characterized from a circuit; LUT {lut.lut_id} has no "
                           f"'spec' in its metadata")
    check_simulator(cfg.rtl_sim)


def _first_approx_layer(model: nn.Module) -> tuple[str, nn.Module]:
    named = list(model.named_modules())
    for kind in (ApproxConv2d, ApproxLinear):
        for name, m in named:
            if isinstance(m, kind):
                return name, m
    raise RetrainError("The model has no approximate layer to check in RTL")


@torch.no_grad()
def _layer_input(model: nn.Module, layer: nn.Module, images: torch.Tensor) -> torch.Tensor:
    """What ``layer`` receives when ``model`` (eval mode) sees ``images``."""
    seen: list[torch.Tensor] = []
    handle = layer.register_forward_pre_hook(lambda mod, args: seen.append(args[0].detach().clone()))
    was_training = model.training
    model.eval()
    try:
        model(images)
    finally:
        handle.remove()
        model.train(was_training)
    return seen[0]


def _rtl_check(model: nn.Module, test_loader: Iterable, cfg: RetrainConfig, device: torch.device,
               build_dir: Path) -> dict[str, Any]:
    """:func:`~appmult.flows.verify_layer_rtl` on the first approximate layer, as a results dict."""
    name, layer = _first_approx_layer(model)
    images = next(iter(test_loader))[0][:RTL_IMAGES].to(device)
    x = _layer_input(model, layer, images)
    result = rtlcheck.verify_layer_rtl(layer, x, positions=cfg.rtl_positions, sim=cfg.rtl_sim, build_dir=build_dir,
                              seed=cfg.seed)
    return dict(result.to_dict(), layer_name=name, images=int(images.shape[0]))


# --- results -------------------------------------------------------------------------------------

def _versions() -> dict[str, str]:
    import importlib.metadata as md
    out = {"python": platform.python_version(), "torch": torch.__version__, "numpy": np.__version__}
    try:
        out["appmult"] = md.version("appmult")
    except md.PackageNotFoundError:  # pragma: no cover - running from a bare checkout
        out["appmult"] = "unknown"
    return out


def _pct(x: float | None) -> str:
    return "—" if x is None else f"{100 * x:.2f}"


def _secs(x: float | None) -> str:
    return "—" if x is None else f"{x:.2f}"


def results_markdown(results: dict[str, Any]) -> str:
    """The ``results.md`` table of a results dict (one row per mode).

    Args:
        results: as returned by :func:`run_retrain`.

    Returns:
        Markdown text: a heading line and one table.
    """
    lut, start = results["lut"], results["start"]
    lines = [f"# Retraining {results['config']['model']} on {results['config']['dataset']} "
             f"with {lut['spec'] or lut['id']}", "",
             f"FP32 accuracy {_pct(results['fp32']['accuracy'])}%; LUT {lut['id']}; "
             f"{results['config']['epochs']} epochs, seed {results['config']['seed']}.", "",
             "| mode | exact-quantized acc (%) | approx before (%) | approx after (%) | exact after (%) "
             "| epoch time approx (s) | epoch time exact-quantized (s) |",
             "|---|---|---|---|---|---|---|"]
    for name, m in results["modes"].items():
        lines.append(f"| {name} | {_pct(start['exact_quantized_accuracy'])} | {_pct(start['approx_accuracy'])} "
                     f"| {_pct(m['approx_after'])} | {_pct(m['exact_after'])} | {_secs(m['epoch_time_s'])} "
                     f"| {_secs(results['timing']['exact_quantized_epoch_s'])} |")
    rtl = [(name, m["rtl_check"]) for name, m in results["modes"].items() if m.get("rtl_check")]
    if rtl:
        lines.append("")
        for name, r in rtl:
            lines.append(f"- {name}, layer `{r['layer_name']}`: {r['summary']}")
            lines += [f"  - position ({', '.join(map(str, c['position']))}): int_forward {c['expected']}, "
                      f"RTL {c['actual']}" for c in r["checks"] if not c["matched"]]
    return "\n".join(lines) + "\n"


def _write_results(out: Path, results: dict[str, Any]) -> None:
    atomic_write_text(out / "results.json", json.dumps(results, indent=1, allow_nan=False) + "\n")
    atomic_write_text(out / "results.md", results_markdown(results))
    plot_history({name: m["history"] for name, m in results["modes"].items()}, out / "curves.png",
                 title=f"{results['config']['model']} / {results['config']['dataset']} / "
                       f"{results['lut']['spec'] or results['lut']['id']}")


# --- the workflow --------------------------------------------------------------------------------

def run_retrain(cfg: RetrainConfig, *, on_epoch_end: EpochHook | None = None) -> dict[str, Any]:
    """Run the whole retraining workflow (see the module docstring) and write its results.

    Args:
        cfg: the run's configuration.
        on_epoch_end: called as ``on_epoch_end(mode, epoch, record)`` after every epoch's
            checkpoint; raising from it interrupts the run (resume later with
            ``resume=True``), returning True stops that mode early.

    Returns:
        The results dict, as written to ``<out>/results.json`` (on every rank).

    Raises:
        RetrainError: mismatched checkpoint or output directory, or invalid settings.
        FileNotFoundError: a missing LUT file or checkpoint.
        appmult.lut_gen.LutFileError: an invalid LUT file.
        appmult.nn.training.CheckpointError: a corrupt checkpoint in the output directory.
    """
    if not isinstance(cfg, RetrainConfig):
        raise InvalidTypeError(f"run_retrain needs a RetrainConfig, not {type(cfg).__name__}")
    saved_threads = torch.get_num_threads()
    if cfg.threads is not None:
        torch.set_num_threads(cfg.threads)
    d = _init_distributed()
    try:
        return _run(cfg, d, on_epoch_end)
    finally:
        torch.set_num_threads(saved_threads)
        if d.owned:
            torch.distributed.destroy_process_group()


def _run(cfg: RetrainConfig, d: _Dist, on_epoch_end: EpochHook | None) -> dict[str, Any]:
    t_start = time.perf_counter()
    out = Path(cfg.out)
    device = _device(d)
    lut = _resolve_lut(cfg)
    if cfg.verify_rtl:
        _check_rtl_possible(cfg, lut)
    _say(cfg, d, f"LUT {lut.lut_id} ({lut.metadata.get('spec') or 'custom'}), "
                 f"{lut.width_a}x{lut.width_b} {'signed' if lut.signed else 'unsigned'}")
    full_loaders = make_loaders(cfg.dataset, cfg.batch_size, cfg.seed, cfg.data_dir)
    loaders = _shard_loaders(full_loaders, d, cfg.batch_size)

    fp32, fp32_info = _fp32_model(cfg, full_loaders, d)
    fp32 = fp32.to(device)
    fp32_info["accuracy"] = evaluate(fp32, loaders.test, device=device).accuracy
    _say(cfg, d, f"FP32 {cfg.model}: {100 * fp32_info['accuracy']:.2f}% ({fp32_info['source']})")

    # The shared starting point: quantized and calibrated once, on fixed training batches.
    calib = _fixed_batches(full_loaders.train, cfg.calib_batches, cfg.seed)
    start_model = _approx_model(fp32, lut, "ste", device)
    calibrate(start_model, [(x.to(device), y) for x, y in calib])
    start = {k: v.detach().clone() for k, v in start_model.state_dict().items() if not _is_lut_key(k)}
    with exact_multiplication(start_model):
        exact_q = evaluate(start_model, loaders.test, device=device)
    approx_before = evaluate(start_model, loaders.test, device=device)
    _say(cfg, d, f"exact-quantized {100 * exact_q.accuracy:.2f}%, approximate before retraining "
                 f"{100 * approx_before.accuracy:.2f}%")

    # Per gradient mode: which tables (half window) to retrain with.
    mode_luts: dict[str, LutFile] = {m: lut for m in cfg.modes}
    half_windows: dict[str, int | None] = {m: None for m in cfg.modes}
    trials: dict[str, Any] = {}
    for g in ("lut2d", "lut1d"):
        if g not in cfg.grads:
            continue
        if cfg.half_window is None:
            half_windows[g] = _stored_half_window(lut, g) if g in lut.gradients else None
            continue
        if cfg.half_window == "auto":
            result = None
            if d.main:
                _say(cfg, d, f"half-window trials for {g}: H in {_half_window_candidates(lut)}")
                result = half_window_trials(fp32, lut, g, start, full_loaders.train,
                                            [(x.to(device), y.to(device)) for x, y in calib], lr=cfg.lr,
                                            seed=cfg.seed, trial_batches=cfg.trial_batches, device=device)
            if d.world > 1:
                box = [result]
                torch.distributed.broadcast_object_list(box, 0)
                result = box[0]
            trials[g] = result
            h = result["chosen"]
            _say(cfg, d, f"{g}: chose H={h} " + ", ".join(f"H={t['half_window']}: {t['train_loss_after']:.4f}"
                                                           for t in result["trials"]))
        else:
            h = cfg.half_window
        mode_luts[g] = with_half_window(lut, h)
        half_windows[g] = h

    exact_epoch_s = _time_exact_epoch(start_model, loaders, cfg, device) if cfg.time_exact else None
    del start_model

    modes: dict[str, Any] = {}
    for mode in cfg.modes:
        _say(cfg, d, f"retraining: {mode} ({cfg.epochs} epochs"
                     + (f", exact products in the last {cfg.exact_last}" if cfg.exact_last else "") + ")")
        identity = _mode_identity(cfg, mode, mode_luts[mode], fp32_info, half_windows[mode])
        model, history, start_acc = _train_mode(cfg, d, mode, fp32, mode_luts[mode], start, loaders, device, identity,
                                     on_epoch_end)
        approx_after = evaluate(model, loaders.test, device=device)
        with exact_multiplication(model):
            exact_after = evaluate(model, loaders.test, device=device)
        approx_times = [r["epoch_time_s"] for r in history if r.get("train_multiplication") != "exact"]
        modes[mode] = {
            "grad": "ste" if mode == SIMULATED_ERROR_MODE else mode,
            "simulated_error": ({"mre": cfg.mre if cfg.mre is not None else lut_mre(lut),
                                 "distribution": "uniform", "method": "auto",
                                 "operands": cfg.noise_operands}
                                if mode == SIMULATED_ERROR_MODE else None),
            "half_window": half_windows[mode], "lut_id": mode_luts[mode].lut_id,
            "approx_start": start_acc, "state_sha256": state_digest(model),
            "approx_after": approx_after.accuracy, "approx_after_loss": approx_after.loss,
            "exact_after": exact_after.accuracy, "exact_after_loss": exact_after.loss,
            "epoch_time_s": float(np.mean(approx_times)) if approx_times else None,
            "history": history,
            "rtl_check": None,
        }
        if cfg.verify_rtl:
            rtl = None
            if d.main:
                rtl = _rtl_check(model, loaders.test, cfg, device, out / "modes" / mode / "rtl")
                _say(cfg, d, f"{mode}: {rtl['summary']}")
            if d.world > 1:
                box = [rtl]
                torch.distributed.broadcast_object_list(box, 0)
                rtl = box[0]
            modes[mode]["rtl_check"] = rtl

    results = {
        "format": RESULTS_FORMAT,
        "config": dataclasses.asdict(cfg),
        "lut": _lut_summary(lut),
        "fp32": fp32_info,
        "start": {"exact_quantized_accuracy": exact_q.accuracy, "exact_quantized_loss": exact_q.loss,
                  "approx_accuracy": approx_before.accuracy, "approx_loss": approx_before.loss,
                  "calib_batches": len(calib)},
        "half_window_trials": trials,
        "modes": modes,
        "timing": {"exact_quantized_epoch_s": exact_epoch_s, "fp32_epoch_s": fp32_info.get("epoch_time_s"),
                   "total_s": None},
        "seeds": {"seed": cfg.seed, "epoch_seeds": "numpy SeedSequence([seed, epoch]) per epoch "
                                                   "(appmult.nn.training.fit)"},
        "distributed": {"world_size": d.world, "backend": (torch.distributed.get_backend()
                                                           if d.world > 1 else None)},
        "device": str(device),
        "threads": torch.get_num_threads(),
        "versions": _versions(),
    }
    results["timing"]["total_s"] = time.perf_counter() - t_start
    if d.main:
        _write_results(out, results)
        _say(cfg, d, f"wrote {out / 'results.json'}, {out / 'results.md'}, {out / 'curves.png'}")
    d.barrier()
    return results
