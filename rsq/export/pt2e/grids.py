"""rsq's integer grids of one layer in one mode, and how they sit in PT2E's 8-bit containers."""
from __future__ import annotations

from typing import Optional

import torch

from ...errors import RsqError
from ...nn.quantizers import LSQQuantizer

PURPOSE = "PT2E export"
INT8_MIN, INT8_MAX = -128, 127
BACKENDS = ("x86", "xnnpack")


class LayerGrid:
    """rsq's integer grids of one conv / linear in one mode, as PT2E needs them."""

    def __init__(self, act: Optional[LSQQuantizer], weight_int: Optional[torch.Tensor],
                 weight_scale: Optional[torch.Tensor], weight_range: Optional[tuple[int, int]]):
        self.act = act
        self.weight_int = weight_int
        self.weight_scale = weight_scale  # [out_channels]: rsq step times |BN gain|
        self.weight_range = weight_range
        # Quantized shortcuts: a block's conv1 owns its input's grid (``shortcut``), which the shortcut add
        # reads too; its downsample conv reads the same quantized tensor (``input_owner``: conv1's name).
        self.shortcut = False
        self.input_owner: Optional[str] = None
        # x86 only: an unsigned sub-8-bit grid read from a value >= 0 (after a ReLU) sits at the top of uint8,
        # zero point 255 - Qp, so uint8's saturation is the clamp at Qp and no hardtanh is needed (clamp_to_grids).
        self.saturates = False
        # rsq's own weight and the BN that follows it, unfolded (None without a BN): see unfold_float_layers.
        self.unfolded: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        # xnnpack: per-channel weight scales chosen with the bias so that XNNPACK's int8 requantization
        # gives rsq.runtime's integers (fit_xnnpack_requantization); None: xnnpack_weight_scale's.
        self.fitted_scale: Optional[torch.Tensor] = None


def activation_dtype(backend: str) -> torch.dtype:
    if backend not in BACKENDS:
        raise RsqError(f"unknown PT2E backend {backend!r}; choose from: {', '.join(BACKENDS)}")
    return torch.uint8 if backend == "x86" else torch.int8


def container_range(dtype: torch.dtype) -> tuple[int, int]:
    return (0, 255) if dtype == torch.uint8 else (INT8_MIN, INT8_MAX)


def activation_qparams(act: LSQQuantizer, dtype: torch.dtype = torch.uint8,
                       saturates: bool = False) -> tuple[float, int, int, int]:
    """(scale, zero_point, quant_min, quant_max) of an activation grid in a uint8 or int8 container
    (``saturates``: see LayerGrid)."""
    if dtype == torch.uint8 and saturates:
        return float(act.step.detach()), 255 - act.qp, 0, 255
    if dtype == torch.uint8:
        return float(act.step.detach()), act.qn, 0, act.qn + act.qp
    if act.signed or act.qp <= INT8_MAX:
        return float(act.step.detach()), 0, -act.qn, act.qp
    return float(act.step.detach()), INT8_MIN, INT8_MIN, INT8_MIN + act.qp
