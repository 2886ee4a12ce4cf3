"""Training loop for (re)training networks: reproducible, resumable, checkpointed.

The published retraining recipe (Meng et al., DATE 2025) is: start from a pretrained
FP32 model, convert and calibrate, then train with Adam at lr 1e-3 for 30 epochs,
halving the rate at epochs 10 and 20. :func:`fit` defaults to that recipe for any epoch
count (halving at 1/3 and 2/3 of the run).

Reproducibility: every epoch starts by seeding torch, numpy, Python's ``random`` and
the train loader's generator from ``(seed, epoch)``. An epoch's randomness (batch order,
dropout, noise surrogates) is therefore a function of the seed and the epoch number
alone, so a run resumed from the checkpoint of epoch k replays epochs k+1.. exactly as
an uninterrupted run would. The checkpoint additionally stores the RNG states at the end
of the epoch and restores them on resume, so code that runs after :func:`fit` also sees
the same random stream either way.

Checkpoints: :mod:`appmult.train.checkpoints` (atomic, sealed with a content hash, never
unpickled); pretrained FP32 models: :mod:`appmult.train.pretraining`.
"""

from __future__ import annotations

import contextlib
import json
import math
import os
import random
import time
from collections.abc import Callable, Iterator, Mapping, Sequence
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import InvalidTypeError, InvalidValueError
from ..files import atomic_write_text
from ..plotting import new_figure, save_figure
from .checkpoints import CHECKPOINT_FORMAT, CHECKPOINT_NAME, CheckpointError, load_checkpoint, save_checkpoint

__all__ = [
    "Metrics",
    "default_milestones",
    "deterministic_algorithms",
    "evaluate",
    "fit",
    "plot_history",
    "seed_everything",
    "train_epoch",
]

EpochCallback = Callable[[int, dict], "bool | None"]


class Metrics(NamedTuple):
    """Mean loss and accuracy (fraction correct, 0..1) over a pass through a loader.

    ``top5`` (fraction with the label among the five highest logits) only where asked
    for (:func:`evaluate` with ``top5=True``), else None.
    """

    loss: float
    accuracy: float
    top5: float | None = None


# --- seeding -------------------------------------------------------------------------

def seed_everything(seed: int) -> None:
    """Seed torch (CPU and CUDA), numpy's global RNG and Python's ``random``.

    Call it before building a model so that its initial weights are reproducible.

    Args:
        seed: Non-negative integer seed.

    Raises:
        TypeError: If ``seed`` is not a non-negative integer.
    """
    if not isinstance(seed, int) or isinstance(seed, bool) or seed < 0:
        raise InvalidTypeError(f"Seed must be a non-negative integer, not {seed!r}")
    torch.manual_seed(seed)
    np.random.seed(seed % 2**32)
    random.seed(seed)


def _epoch_seed(seed: int, epoch: int) -> int:
    # SeedSequence mixes (seed, epoch) well, so neighbouring seeds or epochs do not give
    # correlated streams, as seed + epoch would (seed 1 epoch 2 == seed 2 epoch 1).
    words = np.random.SeedSequence([seed, epoch]).generate_state(2, dtype=np.uint32)
    return (int(words[0]) << 31) | (int(words[1]) >> 1)  # 63 bits: valid for every RNG


def _seed_epoch(seed: int, epoch: int, loader: DataLoader) -> None:
    derived = _epoch_seed(seed, epoch)
    seed_everything(derived)
    generator = getattr(loader, "generator", None)
    if isinstance(generator, torch.Generator):
        generator.manual_seed(derived)


def _rng_state() -> dict[str, Any]:
    """The global RNG states as tensors and plain values (loadable with weights_only)."""
    _, keys, pos, has_gauss, cached = np.random.get_state()
    version, internal, gauss_next = random.getstate()
    return {
        "torch": torch.get_rng_state(),
        "cuda": torch.cuda.get_rng_state_all() if torch.cuda.is_available() else [],
        "numpy": {"keys": torch.from_numpy(keys.astype(np.int64)), "pos": int(pos),
                  "has_gauss": int(has_gauss), "cached_gaussian": float(cached)},
        "python": {"version": version, "internal": torch.tensor(internal, dtype=torch.int64),
                   "gauss_next": gauss_next},
    }


def _set_rng_state(state: dict[str, Any]) -> None:
    torch.set_rng_state(state["torch"])
    if state["cuda"] and torch.cuda.is_available():
        torch.cuda.set_rng_state_all(state["cuda"])
    np_state = state["numpy"]
    np.random.set_state(("MT19937", np_state["keys"].numpy().astype(np.uint32),
                         np_state["pos"], np_state["has_gauss"], np_state["cached_gaussian"]))
    py_state = state["python"]
    random.setstate((py_state["version"], tuple(int(v) for v in py_state["internal"].tolist()),
                     py_state["gauss_next"]))


@contextlib.contextmanager
def deterministic_algorithms(enabled: bool = True) -> Iterator[None]:
    """Temporarily select deterministic kernels (and no cuDNN autotuning); restore after.

    ``warn_only=True``: an op without a deterministic implementation warns instead of
    failing, because a retraining run should not die on a GPU op that is merely
    nondeterministic in its last bits.

    Args:
        enabled: If False, the context changes nothing.
    """
    previous = (torch.are_deterministic_algorithms_enabled(),
                torch.is_deterministic_algorithms_warn_only_enabled(),
                torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark)
    try:
        if enabled:
            torch.use_deterministic_algorithms(True, warn_only=True)
            torch.backends.cudnn.deterministic = True
            torch.backends.cudnn.benchmark = False
        yield
    finally:
        torch.use_deterministic_algorithms(previous[0], warn_only=previous[1])
        torch.backends.cudnn.deterministic, torch.backends.cudnn.benchmark = previous[2:]


# --- one pass -----------------------------------------------------------------------

def _model_device(model: nn.Module) -> torch.device:
    for tensor in model.parameters():
        return tensor.device
    for tensor in model.buffers():
        return tensor.device
    return torch.device("cpu")


def _progress_bar(loader: DataLoader, progress: bool, desc: str) -> Any:
    from tqdm.auto import tqdm

    # disable=None lets tqdm switch itself off when stderr is not a terminal (logs, CI).
    return tqdm(loader, desc=desc, leave=False, disable=None if progress else True,
                dynamic_ncols=True)


def train_epoch(model: nn.Module, loader: DataLoader, optimizer: torch.optim.Optimizer, *,
                loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
                device: torch.device | str | None = None, progress: bool = False,
                desc: str = "train") -> Metrics:
    """One pass of gradient descent over ``loader`` in training mode.

    Args:
        model: The network (put in training mode by this call).
        loader: Batches of ``(inputs, integer labels)``.
        optimizer: Optimizer over the model's parameters.
        loss_fn: Mean loss over a batch (default: cross-entropy).
        device: Where to run (default: the model's device).
        progress: Show a tqdm bar (only on a terminal).
        desc: Label of the progress bar.

    Returns:
        :class:`Metrics` averaged over samples (the training-mode loss and accuracy, as
        seen while the weights were changing).

    Raises:
        ValueError: If the loader yields no samples.
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    device = _model_device(model) if device is None else torch.device(device)
    model.train()
    # Accumulate on the device and read back once: a per-batch .item() would
    # synchronize a GPU after every step.
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    bar = _progress_bar(loader, progress, desc)
    for inputs, labels in bar:
        inputs, labels = inputs.to(device, non_blocking=True), labels.to(device, non_blocking=True)
        optimizer.zero_grad(set_to_none=True)
        logits = model(inputs)
        loss = loss_fn(logits, labels)
        loss.backward()
        optimizer.step()
        total_loss += loss.detach().to(torch.float64) * labels.shape[0]
        correct += (logits.detach().argmax(dim=1) == labels).sum()
        count += labels.shape[0]
    bar.close()
    if count == 0:
        raise InvalidValueError("Training loader yielded no samples")
    return Metrics(total_loss.item() / count, correct.item() / count)


@torch.no_grad()
def evaluate(model: nn.Module, loader: DataLoader, *,
             loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
             device: torch.device | str | None = None, top5: bool = False) -> Metrics:
    """Loss and accuracy of ``model`` in evaluation mode; its previous mode is restored.

    Args:
        model: The network.
        loader: Batches of ``(inputs, integer labels)``.
        loss_fn: Mean loss over a batch (default: cross-entropy).
        device: Where to run (default: the model's device).
        top5: Also measure top-5 accuracy (``Metrics.top5``; models with fewer than five
            classes count every sample as correct).

    Returns:
        :class:`Metrics` averaged over all samples.

    Raises:
        ValueError: If the loader yields no samples.
    """
    loss_fn = loss_fn or nn.functional.cross_entropy
    device = _model_device(model) if device is None else torch.device(device)
    was_training = model.training
    model.eval()
    total_loss = torch.zeros((), dtype=torch.float64, device=device)
    correct = torch.zeros((), dtype=torch.int64, device=device)
    correct5 = torch.zeros((), dtype=torch.int64, device=device)
    count = 0
    try:
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            logits = model(inputs)
            total_loss += loss_fn(logits, labels).to(torch.float64) * labels.shape[0]
            correct += (logits.argmax(dim=1) == labels).sum()
            if top5:
                best = logits.topk(min(5, logits.shape[1]), dim=1).indices
                correct5 += (best == labels[:, None]).any(dim=1).sum()
            count += labels.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise InvalidValueError("Evaluation loader yielded no samples")
    return Metrics(total_loss.item() / count, correct.item() / count,
                   correct5.item() / count if top5 else None)


# --- checkpoints ----------------------------------------------------------------------

def default_milestones(epochs: int) -> list[int]:
    """Epochs after which the learning rate is halved: 1/3 and 2/3 of the run.

    Args:
        epochs: Total epochs.

    Returns:
        Sorted distinct milestones in ``1..epochs-1`` (``[10, 20]`` for 30 epochs).
    """
    return sorted({m for m in (round(epochs / 3), round(2 * epochs / 3)) if 0 < m < epochs})


# A torch file is a zip archive; the hash of all its records is one more record in it, so
# the file stays an ordinary torch file (torch.load ignores the record) and the state dict
# keeps its keys.
def fit(model: nn.Module, loaders: Sequence[DataLoader | None], epochs: int, *,
        optimizer: torch.optim.Optimizer | None = None, lr: float = 1e-3,
        milestones: Sequence[int] | None = None, gamma: float = 0.5, seed: int = 0,
        checkpoint_dir: str | os.PathLike | None = None, resume: bool = True,
        progress: bool = True, on_epoch_end: EpochCallback | None = None,
        device: torch.device | str | None = None, deterministic: bool = True,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        top5: bool = False, identity: Mapping[str, Any] | None = None) -> list[dict[str, Any]]:
    """Train ``model`` in place for ``epochs`` epochs, checkpointing and resuming.

    After each epoch the checkpoint ``<checkpoint_dir>/last.pt`` (model, optimizer,
    scheduler, RNG states, history, epoch) is replaced atomically, and
    ``history.json`` beside it is rewritten. With ``resume=True`` an existing checkpoint
    is loaded first and training continues after its epoch; the result equals an
    uninterrupted run (same weights, same history apart from ``epoch_time_s``), provided
    the model, loaders and optimizer are built the same way.

    Args:
        model: The network, trained in place (moved to ``device`` if given).
        loaders: ``(train, test)`` loaders, e.g. :class:`appmult.train.Loaders`;
            ``test`` may be None (no evaluation).
        epochs: Total epochs of the run (including those done before a resume).
        optimizer: Optimizer over ``model``'s parameters (default: Adam at ``lr``).
        lr: Learning rate of the default optimizer.
        milestones: Epochs after which the rate is multiplied by ``gamma``
            (default: :func:`default_milestones`, 1/3 and 2/3 of the run).
        gamma: Learning-rate factor at each milestone (0.5 = halve).
        seed: Seed from which every epoch's randomness is derived.
        checkpoint_dir: Directory for checkpoints; None disables them (and resuming).
        resume: Continue from an existing checkpoint; if False, start over and overwrite.
        progress: Show tqdm progress bars (only when stderr is a terminal).
        on_epoch_end: Called as ``on_epoch_end(epoch, record)`` after the epoch's
            checkpoint is written (``epoch`` counts from 1); returning True stops training.
        device: Where to train (default: the model's device).
        deterministic: Use deterministic kernels during the run (restored afterwards).
        loss_fn: Mean batch loss (default: cross-entropy).
        top5: Also record ``test_top5`` (top-5 test accuracy) per epoch.
        identity: What else the run depends on (JSON values: a caller's settings, content
            hashes), stored in the checkpoint; a checkpoint that holds another identity is
            not resumed (one written without an identity is checked on the rest).

    Returns:
        The history: one dict per completed epoch with ``epoch``, ``lr``, ``train_loss``,
        ``train_accuracy``, ``test_loss``, ``test_accuracy`` (None without a test loader),
        ``test_top5`` (with ``top5``) and ``epoch_time_s`` (training plus evaluation wall time).

    Raises:
        TypeError: If ``epochs`` is not a positive integer.
        CheckpointError: If the checkpoint to resume is corrupt, belongs to a run with
            another seed or schedule, or is further along than ``epochs``.
    """
    if not isinstance(epochs, int) or isinstance(epochs, bool) or epochs < 1:
        raise InvalidTypeError(f"Epoch count must be a positive integer, not {epochs!r}")
    train_loader, test_loader = loaders[0], loaders[1]
    if device is not None:
        model.to(device)
    device = _model_device(model)
    if optimizer is None:
        optimizer = torch.optim.Adam(model.parameters(), lr=lr)
    milestones = default_milestones(epochs) if milestones is None else sorted(milestones)
    scheduler = torch.optim.lr_scheduler.MultiStepLR(optimizer, milestones, gamma=gamma)
    run = {"seed": seed, "milestones": list(milestones), "gamma": float(gamma)}
    if identity is not None:
        run["identity"] = json.loads(json.dumps(dict(identity)))  # as it reads back: lists, not tuples
    history: list[dict[str, Any]] = []
    start = 0
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if checkpoint is not None and resume and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        theirs = state["run"]
        if theirs != (run if "identity" in theirs else {k: v for k, v in run.items() if k != "identity"}):
            raise CheckpointError(f"Checkpoint {checkpoint} belongs to another run "
                                  f"({_run_difference(theirs, run)}); pass resume=False "
                                  f"or use another checkpoint_dir")
        if state["epoch"] > epochs:
            raise CheckpointError(f"Checkpoint {checkpoint} has {state['epoch']} epochs, "
                                  f"more than the {epochs} asked for")
        model.load_state_dict(state["model"])
        optimizer.load_state_dict(state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        _set_rng_state(state["rng"])
        history = list(state["history"])
        start = state["epoch"]

    with deterministic_algorithms(deterministic):
        for epoch in range(start, epochs):
            _seed_epoch(seed, epoch, train_loader)
            started = time.perf_counter()
            lr_now = optimizer.param_groups[0]["lr"]
            train = train_epoch(model, train_loader, optimizer, loss_fn=loss_fn, device=device,
                                progress=progress, desc=f"epoch {epoch + 1}/{epochs}")
            test = (evaluate(model, test_loader, loss_fn=loss_fn, device=device, top5=top5)
                    if test_loader is not None else None)
            scheduler.step()
            record = {
                "epoch": epoch + 1, "lr": lr_now,
                "train_loss": train.loss, "train_accuracy": train.accuracy,
                "test_loss": test.loss if test else None,
                "test_accuracy": test.accuracy if test else None,
                "epoch_time_s": time.perf_counter() - started,
            }
            if top5:
                record["test_top5"] = test.top5 if test else None
            history.append(record)
            if checkpoint is not None:
                save_checkpoint(checkpoint, {
                    "format": CHECKPOINT_FORMAT, "epoch": epoch + 1, "run": run,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                    "history": history,
                })
                atomic_write_text(checkpoint.parent / "history.json",
                                  json.dumps(history, indent=1) + "\n")
            if on_epoch_end is not None and on_epoch_end(epoch + 1, record) is True:
                break
    return history


def _run_difference(theirs: dict[str, Any], ours: dict[str, Any]) -> str:
    """What differs between a checkpoint's run and this one, in words (at most three entries)."""
    def flat(run: dict[str, Any]) -> dict[str, Any]:
        return {**{k: v for k, v in run.items() if k != "identity"}, **(run.get("identity") or {})}
    a, b = flat(theirs), flat(ours)
    diffs = [f"{k}: {a.get(k)!r} != {b.get(k)!r}" for k in dict.fromkeys([*a, *b]) if a.get(k) != b.get(k)]
    return "; ".join(diffs[:3]) + ("; ..." if len(diffs) > 3 else "")


# --- pretrained FP32 models -----------------------------------------------------------

def plot_history(histories: dict[str, list[dict[str, Any]]], path: str | os.PathLike, *,
                 title: str | None = None) -> Path:
    """Plot training curves of one or more runs to an image file.

    Left: train loss (solid) and test loss (dashed) per epoch; right: test accuracy
    (solid) and train accuracy (dashed), in percent. One colour per run.

    Args:
        histories: Run label -> history as returned by :func:`fit`.
        path: Output file; the format follows the suffix (``.png``, ``.pdf``, ``.svg``).
        title: Figure title.

    Returns:
        ``path`` as a :class:`~pathlib.Path`.

    Raises:
        ValueError: If ``histories`` is empty.
    """
    if not histories:
        raise InvalidValueError("Nothing to plot: histories is empty")
    fig, (ax_loss, ax_acc) = new_figure(1, 2, figsize=(10, 4))
    colors = [f"C{i % 10}" for i in range(len(histories))]
    nan = math.nan
    for (label, history), color in zip(histories.items(), colors):
        epochs = [r["epoch"] for r in history]
        value = lambda key, scale=1.0: [nan if r.get(key) is None else r[key] * scale  # noqa: E731
                                        for r in history]
        ax_loss.plot(epochs, value("train_loss"), color=color, label=f"{label} train")
        ax_loss.plot(epochs, value("test_loss"), color=color, linestyle="--",
                     label=f"{label} test")
        # Same line styles in both panels: solid = train, dashed = test.
        ax_acc.plot(epochs, value("train_accuracy", 100), color=color, label=f"{label} train")
        ax_acc.plot(epochs, value("test_accuracy", 100), color=color, linestyle="--",
                    label=f"{label} test")
    ax_loss.set(xlabel="epoch", ylabel="loss", title="loss")
    ax_acc.set(xlabel="epoch", ylabel="accuracy (%)", title="accuracy")
    for ax in (ax_loss, ax_acc):
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small")
    if title:
        fig.suptitle(title)
    return save_figure(fig, path, dpi=120)
