"""BatchNorm with one private set of statistics and affine parameters per mode."""
from __future__ import annotations

import copy

import torch
from torch import nn

from .mode import Mode, ModeState


class SwitchableBatchNorm2d(nn.Module):
    """One ``BatchNorm2d`` per mode, chosen by the shared :class:`ModeState`.

    BNs are looked up by the mode's key, never by list position, so a wrong resolution list
    fails loudly instead of silently using another resolution's statistics.
    """

    def __init__(self, num_features: int, state: ModeState, eps: float = 1e-5, momentum: float = 0.1):
        super().__init__()
        self.num_features = num_features
        self.state = state
        self.bns = nn.ModuleDict(
            {m.key: nn.BatchNorm2d(num_features, eps=eps, momentum=momentum) for m in state.modes}
        )

    @classmethod
    def from_batchnorm(cls, bn: nn.BatchNorm2d, state: ModeState) -> "SwitchableBatchNorm2d":
        """Every mode starts as a copy of ``bn`` (its weights and running statistics)."""
        module = cls(bn.num_features, state, eps=bn.eps, momentum=bn.momentum)
        for key in module.bns:
            module.bns[key] = copy.deepcopy(bn)
        return module

    def add_mode(self, mode: Mode, like: Mode) -> None:
        """Give ``mode`` its own BN, initialised from the BN of mode ``like``."""
        self.bns[mode.key] = copy.deepcopy(self.bns[like.key])

    def for_mode(self, key: str) -> nn.Module:
        """The BN that mode ``key`` runs (every switchable layer has this method)."""
        return self.bns[key]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.bns[self.state.current.key](x)

    def extra_repr(self) -> str:
        return f"{self.num_features}, modes={list(self.bns.keys())}"
