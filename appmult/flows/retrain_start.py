"""The FP32 model of a retraining run and the starting point every mode shares.

The FP32 model is pretrained (and cached) or loaded from a checkpoint. Each mode (and each
half-window trial) then gets its own approximate copy, loaded with the shared starting
state: weights, biases and calibrated activation ranges -- everything but the LUT buffers,
which differ between modes.
"""

from __future__ import annotations

import copy
import dataclasses
import functools
from pathlib import Path
from typing import Any

import numpy as np
import torch
from torch import nn
from torch.utils.data import DataLoader

from ..lut_gen import LutFile, exact_product
from ..nn import ApproxConfig, approximate_, calibrating
from ..train import Loaders, build_model, data_digest, load_pretrained, pretrain_fp32, read_torch_file, seed_everything
from ..train.pretraining import USER_FILE_ADVICE
from .distributed import Dist
from .retrain_config import RetrainConfig, RetrainError

__all__ = ["Conversion", "approx_model", "calibrate_epoch", "exact_lut", "fixed_batches", "fp32_model",
           "load_start", "reseed", "start_state"]


@dataclasses.dataclass(frozen=True)
class Conversion:
    """How a run converts its FP32 model: weight scales, and which layers multiply through the LUT.

    Attributes:
        weight_scheme: ``"per_channel"`` or ``"per_tensor"`` weight scales.
        approximate: ``"all"`` (every Linear and Conv2d through the LUT) or ``"conv"``
            (Conv2d through the LUT; Linear layers quantized alike but with the exact
            multiplier of the same widths, :func:`exact_lut`).
    """

    weight_scheme: str = "per_channel"
    approximate: str = "all"

    @classmethod
    def of(cls, cfg: RetrainConfig) -> Conversion:
        return cls(cfg.weight_scheme, cfg.approximate)


@functools.lru_cache(maxsize=8)
def _exact_lut(width_a: int, width_b: int, signed: bool) -> LutFile:
    return LutFile(exact_product(width_a, width_b, signed), width_a=width_a, width_b=width_b, signed=signed,
                   metadata={"name": "exact", "family": "exact",
                             "spec": f"exact:width_a={width_a},width_b={width_b},signed={str(signed).lower()}"})


def exact_lut(lut: LutFile) -> LutFile:
    """The exact multiplier of ``lut``'s widths and signedness, as a LUT file (quantized-but-exact layers)."""
    return _exact_lut(lut.width_a, lut.width_b, lut.signed)


def fp32_model(cfg: RetrainConfig, loaders: Loaders, d: Dist, model_name: str | None = None
               ) -> tuple[nn.Module, dict[str, Any]]:
    """The FP32 model (from ``cfg.checkpoint``, or pretrained and cached) and where it came from.

    ``model_name``: another network than the run's (the half-window trials' network),
    always pretrained (the checkpoint is the run's model).
    """
    data_sha256 = data_digest(loaders)  # what the model trains on, whatever the data_dir (run.json)
    if cfg.checkpoint is not None and model_name in (None, cfg.model):
        return _load_fp32_checkpoint(cfg, loaders), {"source": "checkpoint", "path": cfg.checkpoint,
                                                      "data_sha256": data_sha256}
    cache = Path(cfg.pretrained_dir) if cfg.pretrained_dir else Path(cfg.out) / "pretrained"
    name = model_name or cfg.model

    def pretrain():
        return pretrain_fp32(name, cfg.dataset, cfg.pretrain_epochs, cfg.seed, out_dir=cache,
                             batch_size=cfg.batch_size, lr=cfg.lr, data_dir=cfg.data_dir,
                             progress=cfg.progress and d.main, data_sha256=data_sha256)
    # Rank 0 pretrains (or finds the cache); the others then load its file.
    if d.main:
        pre = pretrain()
    d.barrier()
    if not d.main:
        pre = pretrain()
    times = [r["epoch_time_s"] for r in pre.history if r.get("epoch_time_s") is not None]
    return pre.model, {"source": "pretrained", "path": str(pre.path), "epochs": len(pre.history),
                       "epoch_time_s": float(np.mean(times)) if times else None, "data_sha256": data_sha256}


def _load_fp32_checkpoint(cfg: RetrainConfig, loaders: Loaders) -> nn.Module:
    path = Path(cfg.checkpoint)
    state = read_torch_file(path)
    if isinstance(state, dict) and "model_name" in state and "model" in state:
        if state["model_name"] != cfg.model or state.get("dataset") != cfg.dataset:
            raise RetrainError(f"Checkpoint {path} holds a {state['model_name']!r} model for "
                               f"{state.get('dataset')!r}; this run asks for {cfg.model!r} on {cfg.dataset!r}")
        return load_pretrained(path, advice=USER_FILE_ADVICE).model
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


def approx_model(fp32: nn.Module, lut: LutFile, grad: str, device: torch.device,
                 conversion: Conversion = Conversion()) -> nn.Module:
    """A copy of ``fp32`` on ``device``, its layers quantized for ``lut`` (``grad`` backward).

    With ``conversion.approximate == "all"`` every Linear and Conv2d layer multiplies
    through ``lut``; with ``"conv"`` only the Conv2d layers do, and the Linear layers get
    the exact multiplier of the same widths (same quantization, STE backward, which is
    the exact product's own gradient).

    Raises:
        RetrainError: ``"conv"`` for a model without Conv2d layers.
    """
    model = copy.deepcopy(fp32).to(device)
    approx = ApproxConfig(lut, grad=grad, compute_missing_gradients=True, weight_scheme=conversion.weight_scheme)
    if conversion.approximate == "all":
        return approximate_(model, approx)
    exact = ApproxConfig(exact_lut(lut), grad="ste", weight_scheme=conversion.weight_scheme)
    per_layer = {name: approx if type(m) is nn.Conv2d else exact
                 for name, m in model.named_modules() if type(m) in (nn.Conv2d, nn.Linear)}
    if not any(c is approx for c in per_layer.values()):
        raise RetrainError(f"--approximate conv: the model ({type(fp32).__name__}) has no Conv2d layer to "
                           f"approximate")
    return approximate_(model, per_layer)


@torch.no_grad()
def calibrate_epoch(model: nn.Module, loader: DataLoader, device: torch.device) -> int:
    """Calibration as published: one pass over ``loader`` in train mode without backward.

    Activation observers start afresh and follow every batch; BatchNorm layers update
    their running statistics (train mode). The model's training flag is restored.

    Returns:
        The number of batches seen.
    """
    was_training = model.training
    model.train()
    n = 0
    try:
        with calibrating(model):
            for batch in loader:
                model(batch[0].to(device))
                n += 1
    finally:
        model.train(was_training)
    return n


def start_state(model: nn.Module) -> dict[str, torch.Tensor]:
    """A calibrated approximate model's state, less its LUT buffers: the shared starting point."""
    return {k: v.detach().clone() for k, v in model.state_dict().items() if not _is_lut_key(k)}


def load_start(model: nn.Module, start: dict[str, torch.Tensor]) -> nn.Module:
    """``model`` with the shared starting state loaded (its own LUT buffers kept)."""
    # The LUT buffers and identity differ between modes (gradient tables change the LUT's
    # hash); everything else -- weights, biases, activation ranges -- is the shared start.
    missing, unexpected = model.load_state_dict(start, strict=False)
    bad = [k for k in missing if not _is_lut_key(k)] + list(unexpected)
    if bad:
        raise RuntimeError(f"Starting state does not fit the model: {', '.join(bad[:5])}")
    return model


def fixed_batches(loader: DataLoader, n: int, seed: int) -> list[tuple[torch.Tensor, torch.Tensor]]:
    """The first ``n`` batches of ``loader`` with its generator seeded by ``seed`` (calibration, probes)."""
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed)
    out = []
    for i, batch in enumerate(loader):
        if i >= n:
            break
        out.append((batch[0], batch[1]))
    return out


def reseed(seed: int, loader: Any) -> None:
    """Seed every generator and ``loader``'s batch order: a trial or a timing epoch starts alike."""
    seed_everything(seed)
    gen = getattr(loader, "generator", None)
    if isinstance(gen, torch.Generator):
        gen.manual_seed(seed)
