"""``quantize_(model, QuantConfig(...))``: swap every Conv2d / Linear for a fake-quantized one, in place."""
from __future__ import annotations

import dataclasses
import warnings
from dataclasses import dataclass
from typing import Callable, Optional

import torch
from torch import nn

from .convert import mode_state
from .errors import RsqError, choices_error
from .nn.quant_layers import QuantConv2d, QuantLinear
from .nn.quantizers import (FULL_PRECISION, LQNetQuantizer, LSQQuantizer, QuantizationWarning, SwitchableQuantizer,
                            check_bits)
from .nn.residual import plain_residual_, plain_shortcuts_, quantize_residual_, quantize_shortcuts_

QUANTIZERS = {"lsq": LSQQuantizer, "lqnet": LQNetQuantizer}
FIRST_LAST_POLICIES = ("8", "fp", "same")
# QuantConfig and TrainConfig both refuse the pair, with one message.
RESIDUAL_OR_SHORTCUT = ("residual_bits and quantized_shortcut are two ways to put the residual stream on a grid; "
                        "pick one (--no-quantized-shortcut turns the recipe's quantized shortcut off)")
# A plain model has no resolutions to trace at; convs of ImageNet-style models run at this size.
PLAIN_TRACE_RESOLUTION = 224


@dataclass
class QuantConfig:
    """Bits and quantizer for ``quantize_``; 32 bits means full precision.

    first_last: bits of the first conv and the last linear: "8" (8-bit wherever the rest is
    quantized), "fp" (full precision) or "same" (the bits of every other layer).
    act_per_mode: one activation quantizer per resolution instead of one shared by all.
    quantized_shortcut: every residual block quantizes its input once, on its conv1's grid, and
    its shortcut adds that quantized tensor (rsq/nn/residual.py); default: float shortcuts.
    residual_bits: below 32, the residual stream on learned grids of these bits (rsq/nn/residual.py):
    what each add reads (a branch's last BN, a downsample) and each block's output, so an int8 backend
    computes every add as the model does; default 32: the float residual stream of RS-Nets.
    """

    weight_bits: int = 4
    act_bits: int = 4
    quantizer: str = "lsq"
    first_last: str = "8"
    act_per_mode: bool = False
    quantized_shortcut: bool = False
    residual_bits: int = FULL_PRECISION

    def __post_init__(self):
        check_bits(self.weight_bits, "weight_bits")
        check_bits(self.act_bits, "act_bits")
        check_bits(self.residual_bits, "residual_bits")
        if self.residual_bits != FULL_PRECISION and self.quantized_shortcut:
            raise RsqError(RESIDUAL_OR_SHORTCUT)
        if self.quantizer not in QUANTIZERS:
            raise choices_error("quantizer", self.quantizer, sorted(QUANTIZERS))
        if self.first_last not in FIRST_LAST_POLICIES:
            raise choices_error("first_last policy", self.first_last, FIRST_LAST_POLICIES)
        for name in ("act_per_mode", "quantized_shortcut"):
            if not isinstance(getattr(self, name), bool):
                raise choices_error(name, getattr(self, name), (True, False))

    @property
    def full_precision(self) -> bool:
        return self.weight_bits == FULL_PRECISION and self.act_bits == FULL_PRECISION

    def edge_bits(self) -> tuple[int, int]:
        """(weight, activation) bits of the first conv and the last linear."""
        if self.first_last == "same":
            return self.weight_bits, self.act_bits
        if self.first_last == "fp":
            return FULL_PRECISION, FULL_PRECISION
        return tuple(FULL_PRECISION if b == FULL_PRECISION else 8 for b in (self.weight_bits, self.act_bits))


def bits_label(config: QuantConfig) -> str:
    """"W4A4", "W2A32", or "FP" when nothing is quantized."""
    return "FP" if config.full_precision else f"W{config.weight_bits}A{config.act_bits}"


def _is_target(module: nn.Module) -> bool:
    # Exact types only: a subclass (a quantized layer, MultiheadAttention's out_proj, a
    # weight-standardised conv) has its own forward that a swap would silently drop.
    return type(module) in (nn.Conv2d, nn.Linear)


def _example_input(model: nn.Module, targets: list[nn.Module]) -> torch.Tensor:
    first_conv = next((m for m in targets if isinstance(m, nn.Conv2d)), None)
    device = targets[0].weight.device
    generator = torch.Generator().manual_seed(0)
    if first_conv is None:
        return torch.randn(1, targets[0].in_features, generator=generator).to(device)
    try:
        size = mode_state(model).resolutions[0]
    except RsqError:
        size = PLAIN_TRACE_RESOLUTION
    return torch.randn(1, first_conv.in_channels, size, size, generator=generator).to(device)


@torch.no_grad()
def _trace(model: nn.Module, targets: list[nn.Module], example: torch.Tensor) -> tuple[list[nn.Module], set[int]]:
    """Targets in execution order, and the ids of those whose input was never negative.

    A ReLU/ReLU6 output (also after pooling) is never negative; the output of a BN or a linear
    bottleneck on a random input always has negative values, so one forward tells them apart.
    """
    order: list[nn.Module] = []
    negative: set[int] = set()

    def record(module, inputs):
        if module not in order:
            order.append(module)
        if inputs[0].min() < 0:
            negative.add(id(module))

    handles = [m.register_forward_pre_hook(record) for m in targets]
    was_training = model.training
    model.eval()
    try:
        model(example)  # a converted model picks the BN set from the input size itself
    except (RuntimeError, ValueError) as error:
        raise RsqError(f"quantize_ could not run the model on a {tuple(example.shape)} input "
                       f"to find each layer's input sign; pass example_input=... ({error})") from error
    finally:
        for h in handles:
            h.remove()
        model.train(was_training)
    non_negative = {id(m) for m in order if id(m) not in negative}
    return order, non_negative


def _joint_bit_widths(model: nn.Module) -> list[int]:
    """The bit widths of a model converted with ``bits=[...]`` (one mode per resolution and bits); else []."""
    try:
        return mode_state(model).bit_widths
    except RsqError:
        return []


def _act_quantizer(model: nn.Module, config: QuantConfig, layer_bits, signed: bool) -> nn.Module:
    """``layer_bits(mode_bits)``: this layer's (weight, act) bits in a mode of that bit width."""
    def make(mode_bits=None):
        return QUANTIZERS[config.quantizer](layer_bits(mode_bits)[1], signed=signed, per_channel=False)

    joint = bool(_joint_bit_widths(model))
    if not config.act_per_mode and not joint:
        return make()
    try:
        state = mode_state(model)
    except RsqError as error:
        raise RsqError("act_per_mode=True needs a resolution-switchable model; "
                       "call rsq.convert(model, resolutions) before quantize_") from error
    return SwitchableQuantizer(state, make, per_bits=not config.act_per_mode)


def _weight_quantizer(model: nn.Module, config: QuantConfig, layer_bits, layer: nn.Module) -> nn.Module:
    def make(mode_bits=None):
        bits, cls = layer_bits(mode_bits)[0], QUANTIZERS[config.quantizer]
        if cls is LSQQuantizer:
            return cls(bits, signed=True, per_channel=True, channels=layer.weight.shape[0], ndim=layer.weight.dim())
        return cls(bits, signed=True, per_channel=True, channels=layer.weight.shape[0])

    if not _joint_bit_widths(model):
        return make()
    # Weights are shared by every mode; their quantizer (the step sizes) is per bit width.
    return SwitchableQuantizer(mode_state(model), make, per_bits=True)


def _layer_bits(config: QuantConfig, is_edge: bool):
    """(weight, act) bits of a layer in a mode of ``mode_bits`` (None: the config's single bit width)."""
    def bits(mode_bits=None):
        if mode_bits is None:
            return config.edge_bits() if is_edge else (config.weight_bits, config.act_bits)
        same = dataclasses.replace(config, weight_bits=mode_bits, act_bits=mode_bits)
        return same.edge_bits() if is_edge else (mode_bits, mode_bits)
    return bits


def _replace_children(module: nn.Module, replacements: dict[int, nn.Module]) -> None:
    # By identity, so a layer reachable under two names is replaced everywhere.
    for name, child in module.named_children():
        if id(child) in replacements:
            setattr(module, name, replacements[id(child)])
        else:
            _replace_children(child, replacements)


def full_precision_layers(model: nn.Module) -> list[str]:
    """Names of the Conv2d / Linear layers (subclasses included) that are not fake-quantized."""
    return [name for name, m in model.named_modules()
            if isinstance(m, (nn.Conv2d, nn.Linear)) and not isinstance(m, (QuantConv2d, QuantLinear))]


def quantize_(model: nn.Module, config: QuantConfig, example_input: Optional[torch.Tensor] = None,
              filter_fn: Optional[Callable[[nn.Module, str], bool]] = None) -> nn.Module:
    """Fake-quantize every nn.Conv2d / nn.Linear of ``model`` in place and return it.

    Weights and biases stay the same Parameter objects; the quantizers' step sizes are new
    Parameters, so build the optimizer after this call. Each layer's input
    quantizer is unsigned when that input is never negative (after ReLU), else signed. The
    first conv and the last linear (in execution order) follow ``config.first_last``.

    In a model converted with ``bits=[...]`` (``rsq.convert(model, resolutions, bits=[2, 4, 8, 32])``),
    every mode runs weights and activations at its own bit width (first/last layers by
    ``config.first_last``): each layer gets one quantizer per bit width, shared by the
    resolutions (per mode with ``act_per_mode``), and ``weight_bits``/``act_bits`` are not used.

    ``filter_fn(module, name) -> bool`` (as in torchao's ``quantize_``) picks the layers to
    quantize; the others stay in full precision. Subclasses of Conv2d / Linear are never
    swapped (their own forward would be lost): they are named in a QuantizationWarning.
    """
    if not isinstance(config, QuantConfig):
        raise RsqError(f"config must be a rsq.QuantConfig, not {type(config).__name__}")
    if any(isinstance(m, (QuantConv2d, QuantLinear)) for m in model.modules()):
        raise RsqError("model is already quantized; call rsq.dequantize_(model) first")
    targets = [m for m in model.modules() if _is_target(m)]
    if not targets:
        raise RsqError("model has no nn.Conv2d or nn.Linear layers to quantize")
    subclasses = [name for name, m in model.named_modules()
                  if isinstance(m, (nn.Conv2d, nn.Linear)) and not _is_target(m)]
    if subclasses:
        warnings.warn(f"quantize_ left {len(subclasses)} layer(s) in full precision because they subclass "
                      f"Conv2d/Linear with a forward of their own: {', '.join(subclasses)}",
                      QuantizationWarning, stacklevel=2)
    example = example_input if example_input is not None else _example_input(model, targets)
    order, non_negative = _trace(model, targets, example)
    first_conv = next((m for m in order if isinstance(m, nn.Conv2d)), None)
    last_linear = next((m for m in reversed(order) if isinstance(m, nn.Linear)), None)

    if filter_fn is not None:
        chosen = {id(m) for name, m in model.named_modules() if _is_target(m) and filter_fn(m, name)}
        targets = [m for m in targets if id(m) in chosen]
    replacements: dict[int, nn.Module] = {}
    for layer in targets:
        layer_bits = _layer_bits(config, is_edge=layer is first_conv or layer is last_linear)
        weight_q = _weight_quantizer(model, config, layer_bits, layer)
        act_q = _act_quantizer(model, config, layer_bits, signed=id(layer) not in non_negative)
        device = layer.weight.device
        weight_q, act_q = weight_q.to(device), act_q.to(device)
        if isinstance(layer, nn.Conv2d):
            replacements[id(layer)] = QuantConv2d.from_conv(layer, weight_q, act_q)
        else:
            replacements[id(layer)] = QuantLinear.from_linear(layer, weight_q, act_q)
    _replace_children(model, replacements)
    if config.quantized_shortcut:
        if config.act_bits == FULL_PRECISION and not _joint_bit_widths(model):
            raise RsqError("quantized_shortcut needs quantized activations (act_bits below 32)")
        quantize_shortcuts_(model)
    if config.residual_bits != FULL_PRECISION:
        if _joint_bit_widths(model):
            raise RsqError("residual_bits is for a model of one bit width (not one that switches bit widths)")
        if config.act_bits == FULL_PRECISION:
            raise RsqError("residual_bits needs quantized activations (act_bits below 32)")
        device = next(model.parameters()).device
        quantize_residual_(model, lambda signed: _act_quantizer(
            model, config, lambda mode_bits=None: (config.residual_bits, config.residual_bits), signed).to(device))
    return model


def dequantize_(model: nn.Module) -> nn.Module:
    """Undo ``quantize_`` in place: plain Conv2d / Linear on the same Parameters, quantizers dropped."""
    plain_residual_(model)
    plain_shortcuts_(model)
    replacements: dict[int, nn.Module] = {}
    for module in model.modules():
        if isinstance(module, QuantConv2d):
            replacements[id(module)] = module.to_conv()
        elif isinstance(module, QuantLinear):
            replacements[id(module)] = module.to_linear()
    _replace_children(model, replacements)
    return model
