"""Pretrained FP32 models: trained once per (model, data set, settings), cached as sealed files."""

from __future__ import annotations

import json
import os
import shutil
from dataclasses import asdict
from pathlib import Path
from typing import Any, NamedTuple

import torch
from torch import nn

from ..errors import MissingFileError
from ..files import atomic_write_text
from . import training
from .checkpoints import PRETRAINED_FORMAT, CheckpointError, load_sealed, save_torch
from .data import DatasetInfo, data_digest, make_loaders
from .models import build_model

__all__ = ["Pretrained", "load_pretrained", "pretrain_fp32"]


class Pretrained(NamedTuple):
    """A trained model with where it came from."""

    model: nn.Module
    history: list[dict[str, Any]]
    path: Path


#: What a message about a user's own model file (``--checkpoint``) advises, instead of
#: deleting it (right only for appmult's cache).
USER_FILE_ADVICE = "pass a model file that appmult's pretraining wrote, or leave --checkpoint out to pretrain here"


def load_pretrained(path: str | os.PathLike, *, advice: str = "delete it to retrain") -> Pretrained:
    """Rebuild a model saved by :func:`pretrain_fp32` (read with ``weights_only=True``).

    Args:
        path: The ``.pt`` file written by :func:`pretrain_fp32`.
        advice: how an error message ends (the default suits appmult's cache; for a file
            the user named, :data:`USER_FILE_ADVICE`).

    Returns:
        :class:`Pretrained` with the model on the CPU.

    Raises:
        FileNotFoundError: If ``path`` does not exist.
        CheckpointError: If the file is unreadable or not a pretrained-model file.
    """

    path = Path(path)
    if not path.is_file():
        raise MissingFileError(f"No pretrained model at {path}")
    state = load_sealed(path, PRETRAINED_FORMAT, "Pretrained model", advice)
    if state is None:
        raise CheckpointError(f"{path} is not an appmult pretrained model; {advice}")
    info = DatasetInfo(**state["dataset_info"])
    model = build_model(state["model_name"], info)
    model.load_state_dict(state["model"])
    return Pretrained(model, list(state["history"]), path)


def pretrain_fp32(model_name: str, dataset: str, epochs: int, seed: int = 0,
                  out_dir: str | os.PathLike = "pretrained", *, batch_size: int = 64,
                  lr: float = 1e-3, data_dir: str | os.PathLike | None = None,
                  progress: bool = True, device: torch.device | str | None = None,
                  data_sha256: str | None = None) -> Pretrained:
    """Train (or load from cache) an FP32 model, the common start of retraining runs.

    The result is cached in ``out_dir`` as
    ``<model>-<dataset>-<data>-e<epochs>-bs<batch>-lr<lr>-s<seed>.pt``, ``<data>`` the first 12
    hex digits of the data's :func:`~appmult.train.data_digest` (with a ``.json`` history
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
        data_sha256: the data's :func:`~appmult.train.data_digest`, when the caller has it
            (the data is then read only if the model must be trained).

    Returns:
        :class:`Pretrained` ``(model, history, path)``.

    Raises:
        ValueError: For unknown model or dataset names.
        CheckpointError: If a cached file is corrupt.
    """

    out_dir = Path(out_dir)
    loaders = None
    if data_sha256 is None:
        loaders = make_loaders(dataset, batch_size, seed, data_dir)
        data_sha256 = data_digest(loaders)
    # the data by content: a data_dir of other files must not find this one's model (nor resume its checkpoint)
    stem = f"{model_name}-{dataset}-{data_sha256[:12]}-e{epochs}-bs{batch_size}-lr{lr:g}-s{seed}"
    path = out_dir / f"{stem}.pt"
    if path.exists():
        return load_pretrained(path)
    if loaders is None:
        loaders = make_loaders(dataset, batch_size, seed, data_dir)
    training.seed_everything(seed)
    model = build_model(model_name, loaders.info)
    # Looked up on the module at call time, so a test can replace the loop.
    history = training.fit(model, loaders, epochs, lr=lr, seed=seed, checkpoint_dir=out_dir / f"{stem}.ckpt",
                  resume=True, progress=progress, device=device)
    model.cpu()
    save_torch(path, {"format": PRETRAINED_FORMAT, "model_name": model_name, "dataset": dataset,
                       "dataset_info": asdict(loaders.info), "epochs": epochs, "seed": seed,
                       "batch_size": batch_size, "lr": lr, "model": model.state_dict(),
                       "history": history})
    atomic_write_text(out_dir / f"{stem}.json", json.dumps(history, indent=1) + "\n")
    training.plot_history({stem: history}, out_dir / f"{stem}.png")
    shutil.rmtree(out_dir / f"{stem}.ckpt", ignore_errors=True)
    return Pretrained(model, history, path)


# --- plots -----------------------------------------------------------------------------
