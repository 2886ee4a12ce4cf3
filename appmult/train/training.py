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

Checkpoints are written atomically (``appmult.files.atomic_writer``), hold only tensors
and plain Python containers, and are read with ``torch.load(weights_only=True)``:
loading a checkpoint never unpickles arbitrary objects. Each checkpoint and pretrained
model file carries the SHA-256 of its contents (one more record in torch's zip archive,
so it stays an ordinary torch file), checked on every load: a corrupt or modified file
is refused, never resumed from.
"""

from __future__ import annotations

import contextlib
import hashlib
import json
import math
import os
import pickle
import random
import shutil
import time
import zipfile
import zlib
from collections.abc import Callable, Iterator, Sequence
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..errors import InvalidTypeError, InvalidValueError, MissingFileError, UserError
from ..files import atomic_write_text, atomic_writer
from ..plotting import new_figure, save_figure
from .data import DatasetInfo, make_loaders
from .models import build_model

__all__ = [
    "CHECKPOINT_NAME",
    "CheckpointError",
    "Metrics",
    "Pretrained",
    "default_milestones",
    "deterministic_algorithms",
    "evaluate",
    "fit",
    "load_checkpoint",
    "load_pretrained",
    "plot_history",
    "pretrain_fp32",
    "read_torch_file",
    "seed_everything",
    "train_epoch",
]

CHECKPOINT_NAME = "last.pt"
_CHECKPOINT_FORMAT = "appmult.training.checkpoint/1"
_PRETRAINED_FORMAT = "appmult.training.pretrained/1"

EpochCallback = Callable[[int, dict], "bool | None"]


class CheckpointError(UserError, RuntimeError):
    """A checkpoint file exists but cannot be used (corrupt, foreign, or another run's)."""


class Metrics(NamedTuple):
    """Mean loss and accuracy (fraction correct, 0..1) over a pass through a loader."""

    loss: float
    accuracy: float


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
             device: torch.device | str | None = None) -> Metrics:
    """Loss and accuracy of ``model`` in evaluation mode; its previous mode is restored.

    Args:
        model: The network.
        loader: Batches of ``(inputs, integer labels)``.
        loss_fn: Mean loss over a batch (default: cross-entropy).
        device: Where to run (default: the model's device).

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
    count = 0
    try:
        for inputs, labels in loader:
            inputs, labels = inputs.to(device), labels.to(device)
            logits = model(inputs)
            total_loss += loss_fn(logits, labels).to(torch.float64) * labels.shape[0]
            correct += (logits.argmax(dim=1) == labels).sum()
            count += labels.shape[0]
    finally:
        model.train(was_training)
    if count == 0:
        raise InvalidValueError("Evaluation loader yielded no samples")
    return Metrics(total_loss.item() / count, correct.item() / count)


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
_HASH_RECORD = "appmult.sha256"


def _records_digest(archive: zipfile.ZipFile, skip: str | None) -> str:
    h = hashlib.sha256()
    for info in sorted(archive.infolist(), key=lambda i: i.filename):
        if info.filename == skip:
            continue
        h.update(f"{info.filename}\0{info.file_size}\0".encode())
        with archive.open(info) as f:
            for chunk in iter(lambda: f.read(1 << 20), b""):
                h.update(chunk)
    return h.hexdigest()


def _seal(path: Path) -> None:
    """Add the SHA-256 of every record to the torch archive at ``path``."""
    with zipfile.ZipFile(path, "a") as archive:
        names = archive.namelist()
        prefix = names[0].split("/", 1)[0] if names and "/" in names[0] else "archive"
        archive.writestr(f"{prefix}/{_HASH_RECORD}", _records_digest(archive, None))


def _seal_state(path: Path) -> bool | None:
    """True: ``path`` carries a hash that matches its records; False: one that does not
    (or records that fail their zip checksum); None: no hash (or not a zip archive)."""
    try:
        archive = zipfile.ZipFile(path)
    except (zipfile.BadZipFile, OSError, EOFError, ValueError):
        return None
    with archive:
        record = next((n for n in archive.namelist() if n.rsplit("/", 1)[-1] == _HASH_RECORD), None)
        if record is None:
            return None
        try:
            return archive.read(record).decode("ascii") == _records_digest(archive, record)
        except (zipfile.BadZipFile, OSError, EOFError, ValueError, RuntimeError, zlib.error):
            return False


def _save_torch(path: Path, obj: Any) -> None:
    with atomic_writer(path) as tmp:
        torch.save(obj, tmp)
        _seal(tmp)


def _torch_load(path: Path) -> Any:
    return torch.load(path, map_location="cpu", weights_only=True)


def read_torch_file(path: str | os.PathLike) -> Any:
    """Read any torch file with weights only (a :func:`fit` checkpoint, a :func:`pretrain_fp32`
    model, a plain ``state_dict``), on the CPU; a file that carries appmult's content hash is
    verified first.

    For files a user names (``--checkpoint``): the errors say what the file is, never how
    to load it unsafely.

    Args:
        path: The file.

    Returns:
        What the file holds (tensors and plain containers).

    Raises:
        FileNotFoundError: If ``path`` does not exist or is a directory.
        CheckpointError: If the file is not a torch file, holds other objects than tensors and
            plain containers, or does not match the content hash it carries.
    """
    path = Path(path)
    if path.is_dir():
        raise MissingFileError(f"Checkpoint {path} is a directory, not a file")
    if not path.is_file():
        raise MissingFileError(f"Checkpoint {path} does not exist")
    if _seal_state(path) is False:
        raise CheckpointError(f"Checkpoint {path} does not match the content hash stored with it: it is "
                              f"corrupt or was modified")
    try:
        return _torch_load(path)
    except pickle.UnpicklingError:
        if zipfile.is_zipfile(path):
            raise CheckpointError(f"Checkpoint {path} holds objects other than tensors and plain containers; "
                                  f"appmult reads only weights and never unpickles code") from None
        raise CheckpointError(f"Checkpoint {path} is not an appmult or torch checkpoint file") from None
    except Exception:  # torch raises several types for foreign or damaged files
        raise CheckpointError(f"Checkpoint {path} is not an appmult or torch checkpoint file") from None


def _load_sealed(path: Path, fmt: str, what: str, advice: str) -> dict[str, Any] | None:
    """A file of format ``fmt`` written by :func:`_save_torch`, verified (None: another format);
    messages name the file as ``what`` and end in ``advice``."""
    sealed = _seal_state(path)
    if sealed is False:
        raise CheckpointError(f"{what} {path} does not match the content hash stored with it: it is corrupt "
                              f"or was modified; {advice}")
    try:
        state = _torch_load(path)
    except Exception as exc:  # torch raises several types for corrupt or foreign files
        raise CheckpointError(f"{what} {path} is corrupt or not a torch file; {advice}") from exc
    if not isinstance(state, dict) or state.get("format") != fmt:
        return None  # the caller says what it is not
    if sealed is None:
        raise CheckpointError(f"{what} {path} carries no content hash (written by another program or an "
                              f"older appmult); {advice}")
    return state


def load_checkpoint(path: str | os.PathLike) -> dict[str, Any]:
    """Read a checkpoint written by :func:`fit` (on the CPU, ``weights_only=True``), verified
    against the content hash stored in it.

    Args:
        path: The checkpoint file (``<checkpoint_dir>/last.pt``).

    Returns:
        Dict with ``epoch`` (completed epochs), ``model``, ``optimizer``, ``scheduler``
        (state dicts), ``rng``, ``history`` and ``run`` (seed and schedule).

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CheckpointError: If the file is unreadable, not a :func:`fit` checkpoint, or does not
            match its content hash (one flipped bit is enough).
    """
    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"No checkpoint at {path}")
    state = _load_sealed(path, _CHECKPOINT_FORMAT, "Checkpoint", "delete it or pass resume=False")
    if state is None:
        raise CheckpointError(f"{path} is not an appmult training checkpoint; delete it "
                              f"or pass resume=False")
    return state


def _save_checkpoint(path: Path, state: dict[str, Any]) -> None:
    _save_torch(path, state)


def fit(model: nn.Module, loaders: Sequence[DataLoader | None], epochs: int, *,
        optimizer: torch.optim.Optimizer | None = None, lr: float = 1e-3,
        milestones: Sequence[int] | None = None, gamma: float = 0.5, seed: int = 0,
        checkpoint_dir: str | os.PathLike | None = None, resume: bool = True,
        progress: bool = True, on_epoch_end: EpochCallback | None = None,
        device: torch.device | str | None = None, deterministic: bool = True,
        loss_fn: Callable[[torch.Tensor, torch.Tensor], torch.Tensor] | None = None,
        ) -> list[dict[str, Any]]:
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

    Returns:
        The history: one dict per completed epoch with ``epoch``, ``lr``, ``train_loss``,
        ``train_accuracy``, ``test_loss``, ``test_accuracy`` (None without a test loader)
        and ``epoch_time_s`` (training plus evaluation wall time).

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
    history: list[dict[str, Any]] = []
    start = 0
    checkpoint = Path(checkpoint_dir) / CHECKPOINT_NAME if checkpoint_dir is not None else None
    if checkpoint is not None and resume and checkpoint.exists():
        state = load_checkpoint(checkpoint)
        if state["run"] != run:
            raise CheckpointError(f"Checkpoint {checkpoint} belongs to another run "
                                  f"({state['run']}, this run: {run}); pass resume=False "
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
            test = (evaluate(model, test_loader, loss_fn=loss_fn, device=device)
                    if test_loader is not None else None)
            scheduler.step()
            record = {
                "epoch": epoch + 1, "lr": lr_now,
                "train_loss": train.loss, "train_accuracy": train.accuracy,
                "test_loss": test.loss if test else None,
                "test_accuracy": test.accuracy if test else None,
                "epoch_time_s": time.perf_counter() - started,
            }
            history.append(record)
            if checkpoint is not None:
                _save_checkpoint(checkpoint, {
                    "format": _CHECKPOINT_FORMAT, "epoch": epoch + 1, "run": run,
                    "model": model.state_dict(), "optimizer": optimizer.state_dict(),
                    "scheduler": scheduler.state_dict(), "rng": _rng_state(),
                    "history": history,
                })
                atomic_write_text(checkpoint.parent / "history.json",
                                  json.dumps(history, indent=1) + "\n")
            if on_epoch_end is not None and on_epoch_end(epoch + 1, record) is True:
                break
    return history


# --- pretrained FP32 models -----------------------------------------------------------

class Pretrained(NamedTuple):
    """A trained model with where it came from."""

    model: nn.Module
    history: list[dict[str, Any]]
    path: Path


def load_pretrained(path: str | os.PathLike) -> Pretrained:
    """Rebuild a model saved by :func:`pretrain_fp32` (read with ``weights_only=True``).

    Args:
        path: The ``.pt`` file written by :func:`pretrain_fp32`.

    Returns:
        :class:`Pretrained` with the model on the CPU.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CheckpointError: If the file is unreadable or not a pretrained-model file.
    """

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"No pretrained model at {path}")
    state = _load_sealed(path, _PRETRAINED_FORMAT, "Pretrained model", "delete it to retrain")
    if state is None:
        raise CheckpointError(f"{path} is not an appmult pretrained model; delete it to retrain")
    info = DatasetInfo(**state["dataset_info"])
    model = build_model(state["model_name"], info)
    model.load_state_dict(state["model"])
    return Pretrained(model, list(state["history"]), path)


def pretrain_fp32(model_name: str, dataset: str, epochs: int, seed: int = 0,
                  out_dir: str | os.PathLike = "pretrained", *, batch_size: int = 64,
                  lr: float = 1e-3, data_dir: str | os.PathLike | None = None,
                  progress: bool = True, device: torch.device | str | None = None,
                  ) -> Pretrained:
    """Train (or load from cache) an FP32 model, the common start of retraining runs.

    The result is cached in ``out_dir`` as
    ``<model>-<dataset>-e<epochs>-bs<batch>-lr<lr>-s<seed>.pt`` (with a ``.json`` history
    and a ``.png`` training curve beside it); a second call with the same arguments
    loads it instead of training. An interrupted pretraining resumes from its
    checkpoint directory ``<stem>.ckpt``, which is removed once the model is saved.

    Args:
        model_name: A name accepted by :func:`appmult.train.build_model`.
        dataset: A name accepted by :func:`appmult.train.make_loaders`.
        epochs: Training epochs.
        seed: Seed of the initial weights, the data split and the training run.
        out_dir: Cache directory.
        batch_size: Training batch size.
        lr: Initial Adam learning rate (halved at 1/3 and 2/3 of the run).
        data_dir: Data directory for ``"mnist"`` and ``"cifar10"``.
        progress: Show progress bars.
        device: Where to train (default: CPU); the returned model is on the CPU.

    Returns:
        :class:`Pretrained` ``(model, history, path)``.

    Raises:
        ValueError: For unknown model or dataset names.
        CheckpointError: If a cached file is corrupt.
    """

    out_dir = Path(out_dir)
    stem = f"{model_name}-{dataset}-e{epochs}-bs{batch_size}-lr{lr:g}-s{seed}"
    path = out_dir / f"{stem}.pt"
    if path.exists():
        return load_pretrained(path)
    loaders = make_loaders(dataset, batch_size, seed, data_dir)
    seed_everything(seed)
    model = build_model(model_name, loaders.info)
    history = fit(model, loaders, epochs, lr=lr, seed=seed, checkpoint_dir=out_dir / f"{stem}.ckpt",
                  resume=True, progress=progress, device=device)
    model.cpu()
    _save_torch(path, {"format": _PRETRAINED_FORMAT, "model_name": model_name, "dataset": dataset,
                       "dataset_info": asdict(loaders.info), "epochs": epochs, "seed": seed,
                       "batch_size": batch_size, "lr": lr, "model": model.state_dict(),
                       "history": history})
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(history, indent=1) + "\n")
    plot_history({stem: history}, out_dir / f"{stem}.png")
    shutil.rmtree(out_dir / f"{stem}.ckpt", ignore_errors=True)
    return Pretrained(model, history, path)


# --- plots -----------------------------------------------------------------------------

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
