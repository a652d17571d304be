"""Turn a torchvision-style model into a resolution-switchable network (RS-Net), in place."""
from __future__ import annotations

import contextlib
from typing import Iterable, Optional, Union

from torch import nn

from .errors import RsqError
from .nn.mode import Mode, ModeState
from .nn.switchable_bn import SwitchableBatchNorm2d

_STATE_ATTR = "rsq_mode_state"


def _check_resolutions(resolutions: Iterable[int]) -> list[int]:
    values = list(resolutions)
    if not values:
        raise RsqError("resolutions must name at least one resolution, e.g. 224,192,160")
    for r in values:
        if isinstance(r, bool) or not isinstance(r, int) or r <= 0:
            raise RsqError(f"resolution {r!r} is not a positive integer")
    if len(set(values)) != len(values):
        raise RsqError(f"resolutions {values} contain duplicates")
    return sorted(values, reverse=True)


def _swap_batchnorms(module: nn.Module, state: ModeState) -> int:
    swapped = 0
    for name, child in module.named_children():
        if isinstance(child, nn.BatchNorm2d):
            setattr(module, name, SwitchableBatchNorm2d.from_batchnorm(child, state))
            swapped += 1
        else:
            swapped += _swap_batchnorms(child, state)
    return swapped


def _follow_input_size(model: nn.Module, args) -> None:
    """Forward pre-hook: unless a mode is pinned, the input's size picks the mode."""
    state: ModeState = getattr(model, _STATE_ATTR)
    if state.pinned is not None:
        state.current = state.pinned
        return
    x = args[0]
    height, width = x.shape[-2], x.shape[-1]
    if height != width:
        raise RsqError(
            f"input is {height}x{width}, not square; pin a resolution with rsq.set_mode(model, r)"
        )
    if state.current is None or state.current.resolution != height:
        state.current = state.find(int(height))


def convert(model: nn.Module, resolutions: Iterable[int], bits: Optional[Iterable[int]] = None) -> nn.Module:
    """Make ``model`` resolution-switchable in place and return it.

    Every ``BatchNorm2d`` becomes a :class:`SwitchableBatchNorm2d` with one BN per resolution
    (each a copy of the original); all other parameters stay shared by every resolution.
    """
    if hasattr(model, _STATE_ATTR):
        raise RsqError("model is already resolution-switchable")
    resolutions = _check_resolutions(resolutions)
    if bits is None:
        state = ModeState([Mode(r) for r in resolutions])
    else:
        state = ModeState([Mode(r, b) for r in resolutions for b in check_bit_widths(bits)])
    if _swap_batchnorms(model, state) == 0:
        raise RsqError("model has no BatchNorm2d layers to make switchable")
    setattr(model, _STATE_ATTR, state)
    model.register_forward_pre_hook(_follow_input_size)
    return model


def mode_state(model: nn.Module) -> ModeState:
    """The shared mode state of a converted model (unwrapping DDP / compile wrappers)."""
    for candidate in (model, getattr(model, "module", None), getattr(model, "_orig_mod", None)):
        if candidate is not None and hasattr(candidate, _STATE_ATTR):
            return getattr(candidate, _STATE_ATTR)
    raise RsqError("model is not resolution-switchable; call rsq.convert(model, resolutions) first")


def resolutions_of(model: nn.Module) -> list[int]:
    return mode_state(model).resolutions


def check_bit_widths(bits: Iterable[int]) -> list[int]:
    """The bit widths of a joint model: at least two, distinct, each 2-8 or 32; widest first."""
    from .nn.quantizers import check_bits

    values = [check_bits(b, "bit width") for b in bits]
    if len(values) < 2 or len(set(values)) != len(values):
        raise RsqError(f"a model that switches bit widths needs at least two distinct ones, got {values}")
    return sorted(values, reverse=True)


def set_mode(model: nn.Module, resolution: Union[int, Mode, None], bits: Optional[int] = None) -> None:
    """Pin the model to one resolution (and, in a joint model, bit width), or pass None to follow
    the input's size again; ``bits=None`` keeps the current bit width."""
    state = mode_state(model)
    if resolution is None:
        state.pinned = None
        return
    mode = resolution if isinstance(resolution, Mode) else state.find(int(resolution), bits)
    if mode not in state.modes:
        state.find(mode.resolution)  # raises with the known resolutions
        known = ", ".join(str(m) for m in state.modes)
        raise RsqError(f"mode {mode} is not one of this model's modes ({known})")
    state.pinned = mode
    state.current = mode


@contextlib.contextmanager
def using_mode(model: nn.Module, resolution: Union[int, Mode], bits: Optional[int] = None):
    """Run a block with the model pinned to ``resolution`` (and ``bits``), restoring the previous mode after."""
    state = mode_state(model)
    previous = state.pinned, state.current
    set_mode(model, resolution, bits)
    try:
        yield
    finally:
        state.pinned, state.current = previous


def add_resolution(model: nn.Module, resolution: int, like: Optional[int] = None) -> list[Mode]:
    """Add a BN set for a new resolution (one per bit width in a joint model), each copied from
    resolution ``like`` at the same bit width (default: the nearest known resolution)."""
    state = mode_state(model)
    if resolution in state.resolutions:
        raise RsqError(f"resolution {resolution} is already known to this model")
    if like is None:
        like = nearest_resolution(state.resolutions, resolution)
    added = []
    for bits in state.bit_widths or [None]:
        source = state.find(like, bits)
        mode = Mode(resolution, source.bits)
        # Every switchable layer (BN, per-mode quantizers) implements add_mode(mode, like).
        for module in model.modules():
            if module is not model and callable(getattr(module, "add_mode", None)):
                module.add_mode(mode, source)
        state.add(mode)
        added.append(mode)
    return added


def nearest_resolution(known: Iterable[int], resolution: int) -> int:
    """The known resolution closest to ``resolution``; on a tie the larger one (more detail)."""
    return min(known, key=lambda r: (abs(r - resolution), -r))
