"""Model conversion: swap ``nn.Linear``/``nn.Conv2d`` for approximate layers, in place."""

from __future__ import annotations

import contextlib
from typing import Callable, Iterator, Mapping

from torch import nn

from ..errors import InvalidTypeError
from .config import ApproxConfig
from .attention import _convert_attention, _is_attention, attention_modules
from .layers import ApproxConv2d, ApproxLinear
from .tables import LutTables

__all__ = ["approximate_", "approximate_layers", "exact_", "exact_multiplication"]

FilterFn = Callable[[nn.Module, str], bool]


def _convert_one(module: nn.Module, config: ApproxConfig, name: str = "") -> nn.Module | None:
    # Attention modules first (their projections are "projections", not "mlp").
    converted = _convert_attention(module, config, name)
    if converted is not None:
        return converted
    if "mlp" not in config.parts:
        return None
    # Exact type checks on purpose: an already converted layer is a subclass and stays.
    if type(module) is nn.Linear:
        return ApproxLinear.from_float(module, config)
    if type(module) is nn.Conv2d:
        return ApproxConv2d.from_float(module, config)
    return None


def _check_luts_before_load(module: nn.Module, state_dict, prefix: str, *args) -> None:
    """Load-state-dict pre-hook of a converted model: every approximate layer's LUT is checked
    against the state_dict before anything (float layers included) is loaded, so a refused
    load changes nothing. (A module-level function: a pickled model keeps its hook.)"""
    for name, m in module.named_modules():
        if isinstance(m, LutTables):
            m.check_state_dict(state_dict, f"{prefix}{name}.")


def approximate_(model: nn.Module, config: ApproxConfig | Mapping[str, ApproxConfig],
                 filter_fn: FilterFn | None = None) -> nn.Module:
    """Replace the ``nn.Linear`` and ``nn.Conv2d`` layers of ``model`` by approximate ones, in place.

    Attention too (``config.parts`` selects what is approximate): an
    ``nn.MultiheadAttention`` becomes an :class:`~appmult.nn.ApproxMultiheadAttention`; a
    module whose ``forward`` calls ``torch.nn.functional.scaled_dot_product_attention``
    gets its ``nn.Linear`` layers converted as projections and those calls routed through a
    :class:`~appmult.nn.LutAttention` child (``sdpa_lut``); any other module whose class
    name says attention is refused when ``"attention"`` is in ``config.parts``.

    Trained weights and biases are reused (:meth:`ApproxLinear.from_float`).

    Args:
        model: the model (itself converted when it is a Linear/Conv2d: use the return value).
        config: one config for every layer, or ``{qualified_layer_name: config}`` for
            heterogeneous multipliers (layers not named stay float).
        filter_fn: ``filter_fn(module, name) -> bool``; only layers it accepts are converted.

    Returns:
        The converted model. Its ``load_state_dict`` refuses a state_dict saved with other
        LUTs before it changes anything.

    Raises:
        KeyError: a name in the config dict is not a Linear/Conv2d layer of the model.
        ConfigError: an attention module whose products cannot be approximated (named).
        TypeError: ``config`` is neither an ApproxConfig nor a mapping of them.
    """
    if isinstance(config, ApproxConfig):
        def pick(name: str) -> ApproxConfig | None:
            return config
    elif isinstance(config, Mapping):
        convertible = {n for n, m in model.named_modules() if type(m) in (nn.Linear, nn.Conv2d) or _is_attention(m)}
        unknown = sorted(set(config) - convertible)
        if unknown:
            raise KeyError(f"approximate_: no nn.Linear/nn.Conv2d layer named {', '.join(map(repr, unknown))}")
        for name, c in config.items():
            if not isinstance(c, ApproxConfig):
                raise InvalidTypeError(f"approximate_: config for {name!r} is a {type(c).__name__}, not an ApproxConfig")

        def pick(name: str) -> ApproxConfig | None:
            return config.get(name)
    else:
        raise InvalidTypeError(f"approximate_ needs an ApproxConfig or a dict of them, not {type(config).__name__}")

    def visit(module: nn.Module, name: str) -> nn.Module:
        cfg = pick(name)
        if cfg is not None and (filter_fn is None or filter_fn(module, name)):
            new = _convert_one(module, cfg, name)
            if new is not None:
                return new
        for child_name, child in list(module.named_children()):
            full = f"{name}.{child_name}" if name else child_name
            new_child = visit(child, full)
            if new_child is not child:
                setattr(module, child_name, new_child)
        return module

    root = visit(model, "")
    _no_nested_fast_path(root)
    hooks = root._load_state_dict_pre_hooks.values()
    if not any(getattr(h, "hook", h) is _check_luts_before_load for h in hooks):
        root.register_load_state_dict_pre_hook(_check_luts_before_load)
    return root


def _no_nested_fast_path(model: nn.Module) -> None:
    """An ``nn.TransformerEncoder`` decides at construction to pack padded inputs into nested
    tensors in inference; with approximate attention that path reads the packed float
    weights its layers no longer have (an AttributeError on ``in_proj_weight``) and would
    bypass the LUT. Turned off for every encoder whose layers' attention was converted."""
    for m in model.modules():
        if isinstance(m, nn.TransformerEncoder) and getattr(m, "use_nested_tensor", False) and any(
                not isinstance(getattr(layer, "self_attn", None), nn.MultiheadAttention) for layer in m.layers):
            m.use_nested_tensor = False


def approximate_layers(model: nn.Module) -> Iterator[tuple[str, nn.Module]]:
    """``(name, layer)`` for every approximate layer of ``model``."""
    for name, m in model.named_modules():
        if isinstance(m, (ApproxLinear, ApproxConv2d)):
            yield name, m


def _switchable(model: nn.Module) -> list[nn.Module]:
    """Approximate layers and attention products: everything ``exact_`` switches."""
    return [m for _, m in approximate_layers(model)] + [m for _, m in attention_modules(model)]


def exact_(model: nn.Module, enabled: bool = True) -> nn.Module:
    """Switch every approximate layer to exact multiplication (same quantization), or back.

    For hybrid training (approximate for most epochs, exact for the last few) and for
    comparisons against the accurate multiplier at the same bit width.

    Args:
        model: a model with approximate layers.
        enabled: ``True`` for exact products, ``False`` to return to the LUT.

    Returns:
        ``model``.
    """
    for m in _switchable(model):
        m.exact_multiplication = bool(enabled)
    return model


@contextlib.contextmanager
def exact_multiplication(model: nn.Module) -> Iterator[nn.Module]:
    """Context manager: exact products inside, each layer's previous mode restored after."""
    layers = _switchable(model)
    saved = [m.exact_multiplication for m in layers]
    try:
        for m in layers:
            m.exact_multiplication = True
        yield model
    finally:
        for m, s in zip(layers, saved):
            m.exact_multiplication = s
