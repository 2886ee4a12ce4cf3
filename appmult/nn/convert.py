"""Model conversion: swap ``nn.Linear``/``nn.Conv2d`` for approximate layers, in place."""

from __future__ import annotations

import contextlib
import dataclasses
from typing import Callable, Iterator, Mapping

from torch import nn

from ..errors import ConfigError, InvalidTypeError, InvalidValueError
from .config import ApproxConfig
from .attention import _attention_conversion, _is_attention, attention_modules
from .layers import ApproxConv2d, ApproxLinear
from .tables import LutTables

__all__ = ["approximate_", "approximate_layers", "exact_", "exact_multiplication"]

FilterFn = Callable[[nn.Module, str], bool]


def _conversion(module: nn.Module, config: ApproxConfig, name: str) -> Callable[[], nn.Module] | None:
    """How :func:`approximate_` converts ``module`` (see :func:`_attention_conversion`), or
    ``None`` for a module it leaves alone. Checks and builds here; the model is not changed.

    Raises:
        ConfigError: an attention module that cannot be approximated, or a layer already
            approximate with another configuration.
        InvalidValueError: a layer the approximate layers cannot reproduce (named).
    """
    # Attention modules first (their projections are "projections", not "mlp").
    converted = _attention_conversion(module, config, name)
    if converted is not None:
        return converted
    if "mlp" not in config.parts:
        return None
    if isinstance(module, (ApproxLinear, ApproxConv2d)):
        if _config_key(module.config) != _config_key(config):  # (it used to keep its first LUT, silently)
            raise ConfigError(f"approximate_: layer {name or '<root>'!r} is already approximate with another "
                              f"configuration (LUT {module.lut.lut_id}); convert the float model, or skip the "
                              "layer with filter_fn")
        return lambda: module
    # Exact type checks on purpose: subclasses of Linear/Conv2d (e.g. attention's out_proj) stay.
    cls = ApproxLinear if type(module) is nn.Linear else ApproxConv2d if type(module) is nn.Conv2d else None
    if cls is None:
        return None
    try:
        new = cls.from_float(module, config)
    except InvalidValueError as exc:
        raise type(exc)(f"approximate_: layer {name or '<root>'!r}: {exc}") from None
    _share_parameters(new, module)
    return lambda: new


def _config_key(config: ApproxConfig) -> ApproxConfig:
    """``config`` with its LUT named by content: equal for one LUT given as a path or loaded."""
    return dataclasses.replace(config, lut=f"sha256:{config.load().sha256}")


def _share_parameters(new: nn.Module, module: nn.Module) -> None:
    """The approximate layer takes over the float layer's Parameter objects (same values),
    so a weight tied to another module (a language model's head and its embedding) stays
    tied, and an optimizer built before the conversion still updates the model's weights."""
    for key in ("weight", "bias"):
        p = module._parameters.get(key)
        if isinstance(p, nn.Parameter) and isinstance(new._parameters.get(key), nn.Parameter):
            new._parameters[key] = p


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

    Trained weights and biases are reused: the approximate layers take over the float layers'
    Parameter objects, so tied weights stay tied and an optimizer built before still holds
    the model's parameters. A module registered more than once stays one module. Every
    layer is checked before any is replaced: a refused one (named in the error) leaves the
    model as it was. A layer already approximate with another configuration is refused.

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
        ConfigError: an attention module whose products cannot be approximated, or a layer
            already approximate with another configuration (named).
        InvalidValueError: a layer the approximate layers cannot reproduce (named), e.g. a
            convolution padded other than with zeros.
        TypeError: ``config`` is neither an ApproxConfig nor a mapping of them.
    """
    if isinstance(config, ApproxConfig):
        def pick(module: nn.Module, name: str) -> ApproxConfig | None:
            return config
    elif isinstance(config, Mapping):
        aliases: dict[int, list[str]] = {}  # every name of each module (one registered twice has two)
        for n, m in model.named_modules(remove_duplicate=False):
            if type(m) in (nn.Linear, nn.Conv2d) or isinstance(m, (ApproxLinear, ApproxConv2d)) or _is_attention(m):
                aliases.setdefault(id(m), []).append(n)
        unknown = sorted(set(config) - {n for names in aliases.values() for n in names})
        if unknown:
            raise KeyError(f"approximate_: no nn.Linear/nn.Conv2d layer named {', '.join(map(repr, unknown))}")
        for name, c in config.items():
            if not isinstance(c, ApproxConfig):
                raise InvalidTypeError(f"approximate_: config for {name!r} is a {type(c).__name__}, not an ApproxConfig")

        def pick(module: nn.Module, name: str) -> ApproxConfig | None:
            named = {n: config[n] for n in aliases.get(id(module), [name]) if n in config}
            if len(set(named.values())) > 1:
                raise ConfigError(f"approximate_: {' and '.join(map(repr, named))} are one module, given different "
                                  "configurations")
            return next(iter(named.values()), None)
    else:
        raise InvalidTypeError(f"approximate_ needs an ApproxConfig or a dict of them, not {type(config).__name__}")

    # Phase 1 checks and builds every conversion without changing the model (a refused layer
    # leaves it as it was); a module registered more than once (under one parent or two) is
    # converted once and stays one module.
    plan: dict[int, Callable[[], nn.Module] | None] = {}
    seen: set[int] = set()

    def visit(module: nn.Module, name: str) -> None:
        if id(module) in seen:
            return
        seen.add(id(module))
        cfg = pick(module, name)
        if cfg is not None and (filter_fn is None or filter_fn(module, name)):
            plan[id(module)] = _conversion(module, cfg, name)
            if plan[id(module)] is not None:
                return
        for child_name, child in list(module._modules.items()):  # (named_children lists a module once)
            if child is not None:
                visit(child, f"{name}.{child_name}" if name else child_name)

    visit(model, "")
    done: dict[int, nn.Module] = {}

    def apply(module: nn.Module) -> nn.Module:
        if id(module) in done:
            return done[id(module)]
        convert = plan.get(id(module))
        done[id(module)] = module  # (a cycle back to it keeps it)
        if convert is not None:
            done[id(module)] = new = convert()
            return new
        for child_name, child in list(module._modules.items()):
            if child is not None and (new_child := apply(child)) is not child:
                setattr(module, child_name, new_child)
        return module

    root = apply(model)
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
