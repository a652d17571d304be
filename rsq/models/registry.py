"""Model factories by name: ``@register_model`` and ``create_model(name, ...)``."""
from __future__ import annotations

from typing import Callable, Iterable, Optional

from torch import nn

from ..convert import convert
from ..errors import RsqError, choices_error

_FACTORIES: dict[str, Callable[..., nn.Module]] = {}


def register_model(factory: Callable[..., nn.Module]) -> Callable[..., nn.Module]:
    """Register ``factory`` under its function name; a name already taken is an error, never replaced."""
    name = factory.__name__
    if name in _FACTORIES and _FACTORIES[name] is not factory:
        existing = _FACTORIES[name]
        raise RsqError(f"model name {name!r} is already registered by {existing.__module__}.{existing.__qualname__}; "
                       f"give the factory another name")
    _FACTORIES[name] = factory
    return factory


def list_models() -> list[str]:
    return sorted(_FACTORIES)


def create_model(
    name: str,
    num_classes: int = 1000,
    in_chans: int = 3,
    resolutions: Optional[Iterable[int]] = None,
    bits: Optional[Iterable[int]] = None,
) -> nn.Module:
    """Build a model by name; with ``resolutions`` it comes back as an RS-Net (with ``bits``, one
    that also switches bit widths: call ``rsq.quantize_`` next)."""
    if name not in _FACTORIES:
        raise choices_error("model", name, list_models())
    model = _FACTORIES[name](num_classes=num_classes, in_chans=in_chans)
    if resolutions is not None:
        convert(model, resolutions, bits)
    return model
