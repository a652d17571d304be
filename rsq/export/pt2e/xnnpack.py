"""XNNPACK's int8 weights: integers shifted for a finer bias unit, and the requantization fit that makes
its float32 rounding give rsq.runtime's integers (docs/export.md §8c)."""
from __future__ import annotations

from typing import Optional

import numpy as np
import torch
from torch import nn

from ...errors import RsqError
from .grids import INT8_MAX, INT8_MIN, LayerGrid


def weight_shift(weight_int: torch.Tensor) -> torch.Tensor:
    """Per output channel, the largest k (0..7) with every integer q * 2**k still inside int8.

    The XNNPACK program stores q * 2**k with scale step / 2**k: the same real weights, but its
    int8 conv's accumulator unit (input step x weight scale), in which it rounds the float bias to
    int32, becomes 2**k times finer. A 4-bit grid gets k >= 3 (4 unless a channel holds +8, which a
    negative BN gain or step gives), a 2-bit one k >= 5, an 8-bit channel whose integers stay within
    [-64, 63] k >= 1.
    """
    flat = weight_int.reshape(weight_int.shape[0], -1).to(torch.int64)
    shift = torch.zeros(flat.shape[0], dtype=torch.int64)
    for k in range(1, 8):
        fits = ((flat << k) >= INT8_MIN).all(1) & ((flat << k) <= INT8_MAX).all(1)
        shift = torch.where(fits, torch.full_like(shift, k), shift)
    return shift


def xnnpack_weight_scale(grid: LayerGrid) -> Optional[torch.Tensor]:
    """Per-channel weight scales of a layer in an XNNPACK program; None when its integers do not fit.

    XNNPACK takes positive scales only: a channel whose scale is negative (a learned LSQ step can
    be) keeps |scale| and negated integers, which an 8-bit channel holding -128 cannot (the layer
    then keeps float weights). XNNPACK rounds a conv's float bias to int32 in accumulator units
    (input step x weight scale): integers shifted left by k bits (weight_shift) make that unit
    2**k times finer.
    """
    ints = _xnnpack_integers(grid)
    if ints is None:
        return None
    if grid.fitted_scale is not None:
        return grid.fitted_scale
    return grid.weight_scale.abs() / 2.0 ** weight_shift(ints)


def _xnnpack_integers(grid: LayerGrid) -> Optional[torch.Tensor]:
    """The layer's integers with each channel's sign flipped where its scale is negative (before the shift);
    None when one leaves int8."""
    sign = torch.where(grid.weight_scale < 0, -1, 1)
    ints = grid.weight_int * sign.reshape((-1,) + (1,) * (grid.weight_int.dim() - 1))
    if ints.min() < INT8_MIN or ints.max() > INT8_MAX:
        return None
    return ints


def lowered(model: nn.Module, resolutions: list[int]):
    """rsq.runtime's definition of ``model`` at ``resolutions`` (an IntegerModel), which
    fit_xnnpack_requantization reproduces; None where the lowering refuses the model."""
    from ..lower import lower
    try:
        return lower(model, resolutions)
    except RsqError:
        return None


@torch.no_grad()
def fit_xnnpack_requantization(integer, float_model: nn.Module, grids: dict[str, LayerGrid],
                               resolution: int, counts: Optional[dict] = None) -> dict[str, tuple[int, int]]:
    """Give every int8 conv of an XNNPACK program whose output is requantized the per-channel weight scale
    and int32 bias that make XNNPACK's float32 requantization reproduce rsq.runtime's integers for every
    input, where one exists (rsq/export/requant_fit.py); returns {layer: (channels exact, channels)}.
    ``integer``: the model lowered at ``resolution`` among others (``lowered``); None keeps the writer's
    own rounding everywhere. ``counts`` (rsq.export.qlinear.calibrate's at this resolution): a channel with no
    exact fit takes the scale and bias that keep the rounding boundaries most calibration values sit at
    (requant_fit.fit_channel_weighted); without them it keeps XNNPACK's own rounding of its bias.

    The float layer gets weights equal to its int8 integers times the fitted scale and a bias equal to the
    fitted integer bias times its accumulator unit, which XNNPACK's own rounding gives back unchanged.
    """
    from ..requant_fit import boundary_weights_from_counts, fit_layer, input_range
    if integer is None:
        return {}
    tables, scales, report = integer.tables[resolution], integer.scales[resolution], {}
    for op in integer.ops:
        grid = grids.get(op.name)
        if op.kind != "conv" or integer.tensors[op.output].kind != "narrow" or grid is None or grid.weight_int is None:
            continue
        ints = _xnnpack_integers(grid)
        if ints is None:
            continue
        shifts = weight_shift(ints)
        rsq_ints = integer.weights[op.attrs["weight"]].values
        weights = boundary_weights_from_counts(counts[op.output]) if counts and op.output in counts else None
        x_range = input_range(integer, resolution, op.inputs[0])
        fit = fit_layer(tables[op.name], rsq_ints, (1 << shifts).numpy(), x_range, weights)
        shape = (-1,) + (1,) * (ints.dim() - 1)
        if not np.array_equal(ints.numpy(), rsq_ints * fit.sign.reshape(shape)):
            continue  # not the orientation the fit assumes (cannot happen for an LSQ layer; keep the old way)
        s_in, s_out = float(scales[op.inputs[0]]), float(scales[op.output])
        # Channels without an exact fit keep what they had, XNNPACK rounding their float bias itself, unless
        # calibration counts chose their scale and bias.
        chosen = torch.from_numpy(fit.exact if fit.kept is None else fit.exact | (tables[op.name]["m0"] != 0))
        fitted = torch.from_numpy(fit.scale * s_out / s_in).float()
        w_scale = torch.where(chosen, fitted, grid.weight_scale.abs() / 2.0 ** shifts)
        layer = float_model.get_submodule(op.name)
        weight = (ints << shifts.reshape(shape)).float() * w_scale.reshape(shape)
        layer.weight = nn.Parameter(torch.where(chosen.reshape(shape), weight, layer.weight), requires_grad=False)
        bias = (torch.from_numpy(fit.bias).double() * w_scale.double() * float(np.float32(s_in))).float()
        layer.bias = nn.Parameter(torch.where(chosen, bias, layer.bias), requires_grad=False)
        grid.fitted_scale = w_scale
        report[op.name] = (int(fit.exact.sum()), len(fit.exact))
    return report
