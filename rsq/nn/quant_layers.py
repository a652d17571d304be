"""Conv2d and Linear that fake-quantize their input activations and their weights.

They stay subclasses of nn.Conv2d / nn.Linear, so code that looks for those (cost counting,
weight init, export) keeps working; ``weight_bits`` and ``act_bits`` tell counting.py the bits.
"""
from __future__ import annotations

from typing import Optional

import torch
import torch.nn.functional as F
from torch import nn

from .quantizers import FULL_PRECISION


def _bits_of(quantizer: nn.Module) -> int:
    return int(getattr(quantizer, "bits", FULL_PRECISION))


class _Quantized:
    """What QuantConv2d and QuantLinear share: their two quantizers (nn.Identity where none is given) and
    the bits that counting.py reads from them."""

    def _attach_quantizers(self, weight_quantizer: Optional[nn.Module], act_quantizer: Optional[nn.Module]):
        self.weight_quantizer = weight_quantizer if weight_quantizer is not None else nn.Identity()
        self.act_quantizer = act_quantizer if act_quantizer is not None else nn.Identity()

    @property
    def weight_bits(self) -> int:
        return _bits_of(self.weight_quantizer)

    @property
    def act_bits(self) -> int:
        return _bits_of(self.act_quantizer)


class QuantConv2d(_Quantized, nn.Conv2d):
    """nn.Conv2d whose forward is conv(act_quantizer(x), weight_quantizer(weight)).

    ``reads_quantized_input`` (set by rsq.nn.residual): the caller has already applied
    ``act_quantizer`` to x (a residual block's input, quantized once for every reader), so the
    forward skips it; the quantizer stays here for counting and export.
    """

    reads_quantized_input = False

    def __init__(self, in_channels: int, out_channels: int, kernel_size, stride=1, padding=0,
                 dilation=1, groups: int = 1, bias: bool = True, padding_mode: str = "zeros", *,
                 weight_quantizer: Optional[nn.Module] = None, act_quantizer: Optional[nn.Module] = None,
                 device=None, dtype=None):
        super().__init__(in_channels, out_channels, kernel_size, stride, padding, dilation, groups,
                         bias, padding_mode, device=device, dtype=dtype)
        self._attach_quantizers(weight_quantizer, act_quantizer)

    @classmethod
    def from_conv(cls, conv: nn.Conv2d, weight_quantizer: nn.Module, act_quantizer: nn.Module) -> "QuantConv2d":
        """Wrap ``conv``'s own weight and bias Parameters (the same objects, not copies)."""
        module = cls(conv.in_channels, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                     conv.dilation, conv.groups, conv.bias is not None, conv.padding_mode,
                     weight_quantizer=weight_quantizer, act_quantizer=act_quantizer, device="meta")
        module.weight, module.bias = conv.weight, conv.bias
        return module.train(conv.training)

    def to_conv(self) -> nn.Conv2d:
        """A plain nn.Conv2d on the same Parameters; the quantizers are dropped."""
        conv = nn.Conv2d(self.in_channels, self.out_channels, self.kernel_size, self.stride, self.padding,
                         self.dilation, self.groups, self.bias is not None, self.padding_mode, device="meta")
        conv.weight, conv.bias = self.weight, self.bias
        return conv.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = x if self.reads_quantized_input else self.act_quantizer(x)
        return self._conv_forward(x, self.weight_quantizer(self.weight), self.bias)


class QuantLinear(_Quantized, nn.Linear):
    """nn.Linear whose forward is linear(act_quantizer(x), weight_quantizer(weight))."""

    def __init__(self, in_features: int, out_features: int, bias: bool = True, *,
                 weight_quantizer: Optional[nn.Module] = None, act_quantizer: Optional[nn.Module] = None,
                 device=None, dtype=None):
        super().__init__(in_features, out_features, bias, device=device, dtype=dtype)
        self._attach_quantizers(weight_quantizer, act_quantizer)

    @classmethod
    def from_linear(cls, linear: nn.Linear, weight_quantizer: nn.Module, act_quantizer: nn.Module) -> "QuantLinear":
        """Wrap ``linear``'s own weight and bias Parameters (the same objects, not copies)."""
        module = cls(linear.in_features, linear.out_features, linear.bias is not None,
                     weight_quantizer=weight_quantizer, act_quantizer=act_quantizer, device="meta")
        module.weight, module.bias = linear.weight, linear.bias
        return module.train(linear.training)

    def to_linear(self) -> nn.Linear:
        """A plain nn.Linear on the same Parameters; the quantizers are dropped."""
        linear = nn.Linear(self.in_features, self.out_features, self.bias is not None, device="meta")
        linear.weight, linear.bias = self.weight, self.bias
        return linear.train(self.training)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.linear(self.act_quantizer(x), self.weight_quantizer(self.weight), self.bias)
