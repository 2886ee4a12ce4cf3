"""Noise surrogate training (Trommer, Waschneck, Kumar; ICCAD 2022): how much error each layer tolerates.

In training, every ``nn.Conv2d``/``nn.Linear`` (approximate layers included) gets its output
perturbed by Gaussian noise whose size is a learnable fraction ``sigma_l`` of the spread of
that output::

    y_l = Q(W) Q(x) + N(0, 1) * std(y_l) * |sigma_l|          (training only)
    loss = CE - lambda * sum_l (ops_l / ops_total) * min(|sigma_l|, sigma_max)

The reward term pushes every ``sigma_l`` up, weighted by the layer's share of the
multiply-accumulates (``ops_l``: MACs for one input sample), until the cross-entropy says
the layer cannot take more. The learned ``|sigma_l|`` is the relative error the layer
tolerates; :mod:`appmult.methods.assignment` turns it into a tolerance on the predicted error std
of a multiplier.

Choices (documented because the paper leaves them open):

* ``std(y_l)`` is one scalar per layer and batch, over all elements of the output *minus
  the layer bias* (the noise models the products' error, and the bias is not a product),
  and it is **detached**: the noise is a fixed-scale perturbation for the step, so the
  network cannot shrink the noise by shrinking its activations, and the only gradient
  into ``sigma_l`` is through the noise term and the reward.
* The noise is per output element (the accumulated error of one output), independent
  across elements and batches.
* In eval mode the layers are deterministic (no noise).

Nothing in the wrapped model is edited: the noise comes from forward hooks, and the
sigmas live in a :class:`NoiseSurrogate` module kept as the plain attribute
``model.noise_surrogate``, deliberately *not* registered as a submodule: an
``nn.Sequential`` would call it as one more stage, and the model's ``state_dict`` keeps
its keys. Hence ``model.parameters()`` does not list the sigmas; train with
:func:`surrogate_optimizer` (or :func:`train_surrogate`), which includes them.
:func:`detach_noise_surrogate` removes hooks and attribute again.
"""

from __future__ import annotations

import math
from typing import Callable, Iterable, Mapping

import torch
from torch import nn

from ..errors import InvalidValueError
from ..train import fit

__all__ = [
    "ATTRIBUTE",
    "NoiseSurrogate",
    "attach_noise_surrogate",
    "detach_noise_surrogate",
    "learned_sigmas",
    "surrogate_loss",
    "surrogate_loss_fn",
    "surrogate_optimizer",
    "train_surrogate",
]

#: Name of the submodule that holds the sigmas on a model with a surrogate attached.
ATTRIBUTE = "noise_surrogate"


def _layer_macs(module: nn.Module, out: torch.Tensor) -> int:
    """MACs of one forward for one input sample (batch = first dimension)."""
    per_sample = out[0].numel() if out.dim() > 1 else out.numel()
    if isinstance(module, nn.Conv2d):
        k = module.in_channels // module.groups * module.kernel_size[0] * module.kernel_size[1]
    else:
        k = module.in_features
    return int(per_sample * k)


class NoiseSurrogate(nn.Module):
    """The learnable relative noise levels ``sigma_l`` of one model, and its forward hooks.

    Built by :func:`attach_noise_surrogate`; not meant to be built by hand.

    Args:
        layers: layer name -> layer (``nn.Conv2d`` or ``nn.Linear``).
        init: initial ``sigma_l``.
        lam: weight of the reward term (``lambda``).
        sigma_max: reward saturates at this ``|sigma_l|``.

    Attributes:
        sigmas: ``nn.ParameterDict`` keyed by layer name (dots replaced by ``/``).
        ops: layer name -> MACs per input sample (known after the first forward).
        enabled: add noise in training mode (``False`` turns the surrogate off).
    """

    def __init__(self, layers: Mapping[str, nn.Module], *, init: float, lam: float, sigma_max: float):
        super().__init__()
        self.lam = float(lam)
        self.sigma_max = float(sigma_max)
        self.enabled = True
        # ParameterDict keys cannot contain dots.
        self.sigmas = nn.ParameterDict({_key(n): nn.Parameter(torch.tensor(float(init))) for n in layers})
        self.ops: dict[str, int] = {}
        self._names = list(layers)
        self._handles = [m.register_forward_hook(self._hook(n)) for n, m in layers.items()]

    @property
    def layer_names(self) -> list[str]:
        """Names of the layers with a sigma, in model order."""
        return list(self._names)

    def sigma(self, name: str) -> nn.Parameter:
        """The raw (signed) parameter of layer ``name``; the noise level is its absolute value."""
        return self.sigmas[_key(name)]

    def _hook(self, name: str) -> Callable:
        def hook(module: nn.Module, args: tuple, out: torch.Tensor) -> torch.Tensor | None:
            if name not in self.ops:
                self.ops[name] = _layer_macs(module, out)
            if not (module.training and self.enabled):
                return None
            y = out
            if getattr(module, "bias", None) is not None:
                shape = (1, -1, 1, 1) if isinstance(module, nn.Conv2d) else (-1,)
                y = out - module.bias.detach().reshape(shape)
            scale = y.detach().float().std() if y.numel() > 1 else y.detach().abs().float().sum()
            sigma = self.sigma(name).abs().to(out.dtype)
            return out + torch.randn_like(out) * scale.to(out.dtype) * sigma
        return hook

    def reward(self) -> torch.Tensor:
        """``sum_l (ops_l / ops_total) * min(|sigma_l|, sigma_max)`` (differentiable in the sigmas).

        Raises:
            RuntimeError: no forward pass has been seen yet (ops unknown).
        """
        missing = [n for n in self._names if n not in self.ops]
        if missing:
            raise RuntimeError(f"Noise surrogate: run one forward pass before computing the loss "
                               f"(no MAC count yet for {', '.join(missing)})")
        total = float(sum(self.ops[n] for n in self._names))
        terms = [self.ops[n] / total * torch.clamp(self.sigma(n).abs(), max=self.sigma_max) for n in self._names]
        return torch.stack(terms).sum()

    def remove_hooks(self) -> None:
        """Detach the forward hooks (the model becomes deterministic in training too)."""
        for h in self._handles:
            h.remove()
        self._handles = []

    def extra_repr(self) -> str:
        return f"{len(self._names)} layers, lambda={self.lam:g}, sigma_max={self.sigma_max:g}"


def _key(name: str) -> str:
    return name.replace(".", "/")


def _check_positive(what: str, value: object, *, allow_zero: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value) \
            or value < 0 or (value == 0 and not allow_zero):
        kind = "a non-negative" if allow_zero else "a positive"
        raise InvalidValueError(f"Noise surrogate {what} must be {kind} finite number, not {value!r}")
    return float(value)


def attach_noise_surrogate(model: nn.Module, *, init: float = 0.1, lam: float = 0.2, sigma_max: float = 0.5,
                           layers: Iterable[str] | None = None) -> NoiseSurrogate:
    """Give every ``nn.Conv2d``/``nn.Linear`` of ``model`` a learnable relative noise level.

    Args:
        model: an FP32 model, or one with approximate layers (they subclass the torch layers).
        init: initial ``sigma_l`` (not 0: ``|sigma|`` has no useful gradient there).
        lam: reward weight ``lambda`` (paper: about 0.2).
        sigma_max: the reward stops growing at ``|sigma_l| = sigma_max`` (paper: about 0.5).
        layers: names of the layers to cover (default: all Conv2d/Linear layers).

    Returns:
        The :class:`NoiseSurrogate`, also kept as ``model.noise_surrogate`` (not a
        registered submodule; it stays on the device the model had at attach time).

    Raises:
        ValueError: a surrogate is already attached, the model has no Conv2d/Linear
            layer, an unknown layer name, or a non-positive ``init``/``sigma_max`` or
            negative ``lam``.
    """
    _check_positive("init", init)
    _check_positive("lambda", lam, allow_zero=True)
    _check_positive("sigma_max", sigma_max)
    if isinstance(getattr(model, ATTRIBUTE, None), NoiseSurrogate):
        raise InvalidValueError("A noise surrogate is already attached to this model; detach_noise_surrogate() it first")
    found = {n: m for n, m in model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    if layers is not None:
        wanted = list(layers)
        unknown = [n for n in wanted if n not in found]
        if unknown:
            raise InvalidValueError(f"Noise surrogate: no nn.Conv2d/nn.Linear layer named {', '.join(map(repr, unknown))}")
        found = {n: found[n] for n in wanted}
    if not found:
        raise InvalidValueError("Noise surrogate: the model has no nn.Conv2d or nn.Linear layer")
    p = next(model.parameters(), None)
    surrogate = NoiseSurrogate(found, init=init, lam=lam, sigma_max=sigma_max)
    if p is not None:
        surrogate.to(p.device)
    # object.__setattr__ bypasses nn.Module registration on purpose (see the module docstring).
    object.__setattr__(model, ATTRIBUTE, surrogate)
    return surrogate


def _get(model: nn.Module) -> NoiseSurrogate:
    s = getattr(model, ATTRIBUTE, None)
    if not isinstance(s, NoiseSurrogate):
        raise InvalidValueError("This model has no noise surrogate; call attach_noise_surrogate(model) first")
    return s


def detach_noise_surrogate(model: nn.Module) -> dict[str, float]:
    """Remove the surrogate's hooks and module from ``model``.

    Returns:
        The learned ``|sigma_l|`` per layer (:func:`learned_sigmas`) at removal.

    Raises:
        ValueError: no surrogate attached.
    """
    s = _get(model)
    sigmas = learned_sigmas(model)
    s.remove_hooks()
    del model.__dict__[ATTRIBUTE]
    return sigmas


def surrogate_loss(model: nn.Module, ce: torch.Tensor) -> torch.Tensor:
    """``ce - lambda * sum_l (ops_l/ops_total) * min(|sigma_l|, sigma_max)``.

    Args:
        model: a model with a surrogate attached and at least one forward pass done.
        ce: the task loss of the batch (cross-entropy).

    Returns:
        The surrogate training loss (scalar tensor).

    Raises:
        ValueError: no surrogate attached.
        RuntimeError: no forward pass seen yet.
    """
    s = _get(model)
    return ce - s.lam * s.reward().to(ce.dtype)


def surrogate_loss_fn(model: nn.Module) -> Callable[[torch.Tensor, torch.Tensor], torch.Tensor]:
    """A ``loss_fn(logits, labels)`` for :func:`appmult.train.fit`.

    It adds the reward term only while the model is in training mode, so the test loss
    that ``fit`` reports stays the plain cross-entropy.

    Raises:
        ValueError: no surrogate attached.
    """
    _get(model)

    def loss_fn(logits: torch.Tensor, labels: torch.Tensor) -> torch.Tensor:
        ce = nn.functional.cross_entropy(logits, labels)
        return surrogate_loss(model, ce) if model.training else ce
    return loss_fn


def surrogate_optimizer(model: nn.Module, lr: float = 1e-3, sigma_lr: float = 1e-2) -> torch.optim.Optimizer:
    """Adam with its own (larger) learning rate for the sigmas.

    A short surrogate run has a few hundred steps; at the weights' ``lr`` Adam moves a
    sigma by about ``lr`` per step, too slow to reach ``sigma_max`` from 0.1.

    Raises:
        ValueError: no surrogate attached.
    """
    s = _get(model)
    ids = {id(p) for p in s.parameters()}
    rest = [p for p in model.parameters() if id(p) not in ids]
    return torch.optim.Adam([{"params": rest, "lr": lr}, {"params": list(s.parameters()), "lr": sigma_lr}])


def learned_sigmas(model: nn.Module) -> dict[str, float]:
    """``{layer name: |sigma_l|}`` in model order.

    Raises:
        ValueError: no surrogate attached.
    """
    s = _get(model)
    return {n: abs(float(s.sigma(n).detach())) for n in s.layer_names}


def train_surrogate(model: nn.Module, loaders, epochs: int, *, lr: float = 1e-3, sigma_lr: float = 1e-2,
                    init: float = 0.1, lam: float = 0.2, sigma_max: float = 0.5, seed: int = 0,
                    progress: bool = False, detach: bool = True) -> tuple[dict[str, float], list[dict]]:
    """Attach a surrogate, train ``model`` with it (:func:`appmult.train.fit`), read the sigmas.

    The model's weights are trained too (the paper trains both jointly); pass a copy to
    keep the original.

    Args:
        model: the network (trained in place).
        loaders: ``(train, test)`` loaders.
        epochs: training epochs.
        lr: learning rate of the weights.
        sigma_lr: learning rate of the sigmas.
        init, lam, sigma_max: see :func:`attach_noise_surrogate`.
        seed: seed of ``fit``.
        progress: progress bars.
        detach: remove the surrogate afterwards.

    Returns:
        ``(sigmas, history)``: learned ``|sigma_l|`` per layer and ``fit``'s history.
    """
    attach_noise_surrogate(model, init=init, lam=lam, sigma_max=sigma_max)
    # One forward pass so that the MAC counts exist before the first loss.
    x0 = next(iter(loaders[0]))[0][:2]
    with torch.no_grad():
        was = model.training
        model.eval()
        model(x0.to(next(model.parameters()).device))
        model.train(was)
    try:
        history = fit(model, loaders, epochs, optimizer=surrogate_optimizer(model, lr, sigma_lr), seed=seed,
                      progress=progress, loss_fn=surrogate_loss_fn(model))
        sigmas = learned_sigmas(model)
    finally:
        if detach:
            detach_noise_surrogate(model)
    return sigmas, history
