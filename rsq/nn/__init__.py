"""Switchable layers: BatchNorm per mode, quantizers, quantized conv/linear."""
from .mode import Mode, ModeState
from .quant_layers import QuantConv2d, QuantLinear
from .quantizers import LQNetQuantizer, LSQQuantizer, SwitchableQuantizer
from .switchable_bn import SwitchableBatchNorm2d

__all__ = [
    "LQNetQuantizer",
    "LSQQuantizer",
    "Mode",
    "ModeState",
    "QuantConv2d",
    "QuantLinear",
    "SwitchableBatchNorm2d",
    "SwitchableQuantizer",
]
