"""CIFAR-style ResNets (He et al. 2016, section 4.2) for small images such as Fashion-MNIST."""
from __future__ import annotations

from torch import nn

from ..nn.fused_bn import bn_relu
from .registry import register_model


class BasicBlock(nn.Module):
    def __init__(self, in_planes: int, planes: int, stride: int = 1):
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.relu = nn.ReLU(inplace=True)
        self.downsample = None
        if stride != 1 or in_planes != planes:
            # A 1x1 projection (option B) rather than zero padding, so every path has a BN.
            self.downsample = nn.Sequential(
                nn.Conv2d(in_planes, planes, 1, stride, bias=False), nn.BatchNorm2d(planes)
            )

    def forward(self, x):
        identity = x if self.downsample is None else self.downsample(x)
        out = bn_relu(self.bn1, self.conv1(x), self.relu)  # relu(bn1(conv1(x))), fused where it can be
        return bn_relu(self.bn2, self.conv2(out), self.relu, residual=identity)  # relu(bn2(...) + identity)


class CifarResNet(nn.Module):
    """Three stages of ``depth`` basic blocks at widths 16/32/64, global pooling, one FC."""

    fuses_bn_relu = True  # its forward goes through bn_relu (rsq/nn/fused_bn.py); `rsq train` says so

    def __init__(self, depth: int, num_classes: int = 10, in_chans: int = 3, width: int = 16):
        super().__init__()
        self.conv1 = nn.Conv2d(in_chans, width, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(width)
        self.relu = nn.ReLU(inplace=True)
        planes, layers = width, []
        for stage in range(3):
            out_planes = width * 2**stage
            stride = 1 if stage == 0 else 2
            blocks = [BasicBlock(planes, out_planes, stride)]
            blocks += [BasicBlock(out_planes, out_planes) for _ in range(depth - 1)]
            layers.append(nn.Sequential(*blocks))
            planes = out_planes
        self.layer1, self.layer2, self.layer3 = layers
        self.avgpool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(planes, num_classes)
        for m in self.modules():
            if isinstance(m, nn.Conv2d):
                nn.init.kaiming_normal_(m.weight, mode="fan_out", nonlinearity="relu")

    def forward(self, x):
        x = bn_relu(self.bn1, self.conv1(x), self.relu)
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.fc(self.avgpool(x).flatten(1))


@register_model
def resnet20(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return CifarResNet(3, num_classes, in_chans)


@register_model
def resnet32(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return CifarResNet(5, num_classes, in_chans)


@register_model
def resnet56(num_classes: int = 10, in_chans: int = 3) -> nn.Module:
    return CifarResNet(9, num_classes, in_chans)
