"""torchvision's ImageNet models (random init; rsq never downloads weights)."""
from __future__ import annotations

import torchvision
from torch import nn

from .registry import register_model


def _with_in_chans(conv: nn.Conv2d, in_chans: int) -> nn.Conv2d:
    if in_chans == conv.in_channels:
        return conv
    new = nn.Conv2d(in_chans, conv.out_channels, conv.kernel_size, conv.stride, conv.padding,
                    bias=conv.bias is not None)
    nn.init.kaiming_normal_(new.weight, mode="fan_out", nonlinearity="relu")  # as torchvision does
    return new


@register_model
def resnet18(num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    model = torchvision.models.resnet18(num_classes=num_classes)
    model.conv1 = _with_in_chans(model.conv1, in_chans)
    return model


@register_model
def resnet50(num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    model = torchvision.models.resnet50(num_classes=num_classes)
    model.conv1 = _with_in_chans(model.conv1, in_chans)
    return model


@register_model
def mobilenet_v2(num_classes: int = 1000, in_chans: int = 3) -> nn.Module:
    model = torchvision.models.mobilenet_v2(num_classes=num_classes)
    model.features[0][0] = _with_in_chans(model.features[0][0], in_chans)
    return model
