"""Exact requantization on float32-scaled 8-bit kernels: a per-channel scale and integer bias chosen so that
the kernel's rounding reproduces rsq.runtime's integers for every input.

onnxruntime's QLinearConv (and XNNPACK's int8 convolutions) requantize as
``round_half_even(float32(acc + B) * S)``: an int32 bias ``B`` in accumulator units, a float32 scale ``S``.
rsq.runtime's requantization keeps up to 16 fraction bits of bias (docs/export.md §3); rounding it to an
integer moves some rounding boundaries by one accumulator value. But an activation of ``b`` bits has only
``2^b - 1`` boundaries that matter: the accumulator values ``T_v`` where the exact output first reaches
``v + 1``. Any ``(S, B)`` that puts each ``T_v`` above the kernel's boundary and ``T_v - 1`` below it gives the
same integers for every accumulator, so every input. Each boundary bounds ``S`` from one side; for each
candidate ``B`` near the rounded bias the bounds leave an interval or nothing; the scale nearest the
multiplier's own is taken (often that scale itself, with another B), so the real weights barely move. With 4-bit weights stored ``16x`` inside int8 (``weight_shifts``), the accumulator is 16x
finer than rsq.runtime's and a 4-bit output (15 boundaries) almost always fits; an 8-bit output's 255
boundaries rarely do, and a channel that does not fit keeps the rounded bias (``exact`` False).

Boundaries outside the accumulator's reachable range (from the weights and the input's integer range,
padding included as a 0 input) do not constrain.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional

import numpy as np

from ..runtime.fixedpoint import MANTISSA_BITS
from ..runtime.model import IntegerModel

FLOAT_EXACT = 2 ** 24      # int32 -> float32 is exact below this magnitude
MARGIN = 4e-7              # relative room kept from each bound: float32 rounding of the scale and the product


@dataclass
class ChannelFit:
    """Per output channel, in the orientation where the multiplier is positive: the kernel computes
    ``round(scale * (acc + bias))`` on ``acc = sign * multiple * (rsq.runtime's accumulator)``, so a channel
    with a negative multiplier (a negative BN gain or weight step) stores its integers negated."""
    scale: np.ndarray   # float64 > 0: output steps per kernel accumulator unit
    bias: np.ndarray    # int64: the kernel's bias, in its accumulator units
    sign: np.ndarray    # int64, +1 or -1
    exact: np.ndarray   # bool: every reachable boundary reproduced (else the bias rounded to the nearest unit)


def input_range(model: IntegerModel, resolution: int, tensor: str) -> tuple[int, int]:
    """The integer range [lo, hi] a narrow tensor can hold: its producer's clamp (max pooling keeps its input's)."""
    op = next(op for op in model.ops if op.output == tensor)
    if op.kind == "max_pool":
        return input_range(model, resolution, op.inputs[0])
    table = model.tables[resolution][op.name]
    return int(table["lo"][0]), int(table["hi"][0])


def accumulator_bounds(weights: np.ndarray, lo: int, hi: int) -> tuple[np.ndarray, np.ndarray]:
    """Per output channel, the least and greatest sum of weight x input over inputs in [lo, hi] (0 included:
    zero padding). ``weights`` [out, ...] integers (rsq.runtime units)."""
    w = weights.reshape(len(weights), -1).astype(np.int64)
    lo, hi = min(lo, 0), max(hi, 0)
    most = np.where(w > 0, w * hi, w * lo).sum(1)
    least = np.where(w > 0, w * lo, w * hi).sum(1)
    return least, most


def boundaries(bias: int, bias_shift: int, m0: int, shift: int, lo: int, hi: int) -> np.ndarray:
    """T_v for v in [lo, hi - 1]: the least accumulator whose exact output ``rq((acc << P) + bias)`` is >= v + 1
    (m0 > 0). Exact integer arithmetic: rq(x) >= v + 1  <=>  x * m0 >= (2v + 1) * 2^(n-1), n = 31 + shift."""
    n = MANTISSA_BITS + shift
    out = []
    for v in range(lo, hi):
        x_min = -((-(2 * v + 1) << (n - 1)) // m0)          # ceil((2v+1) 2^(n-1) / m0)
        out.append(-((-(x_min - bias)) >> bias_shift))      # ceil((x_min - bias) / 2^P)
    return np.array(out, dtype=np.int64)


def fit_channel(thresholds: np.ndarray, lo: int, multiple: int, bias_real: float, own: float,
                least: int, most: int, search: int) -> Optional[tuple[float, int]]:
    """(S, B) with S > 0 such that round(S * (multiple * acc + B)) crosses v + 1/2 exactly between
    thresholds[v - lo] - 1 and thresholds[v - lo], for every reachable boundary, S as near ``own`` (the
    multiplier's scale) as allows; None if no B within ``search`` of ``multiple * bias_real`` allows it."""
    c = np.arange(lo, lo + len(thresholds), dtype=np.float64) + 0.5
    above = thresholds <= most            # acc = T_v is reachable: it must round to >= v + 1
    below = thresholds - 1 >= least       # acc = T_v - 1 is reachable: it must round to <= v
    centre = int(np.rint(multiple * bias_real))
    candidates = np.arange(centre - search, centre + search + 1, dtype=np.int64)[:, None]
    x = (multiple * thresholds[None, :] + candidates).astype(np.float64)        # S * x > c
    y = (multiple * (thresholds[None, :] - 1) + candidates).astype(np.float64)  # S * y < c
    with np.errstate(divide="ignore", invalid="ignore"):
        low = np.maximum(np.where(above & (x > 0), c / x, 0.0), np.where(below & (y < 0), c / y, 0.0)).max(1)
        high = np.minimum(np.where(above & (x < 0), c / x, np.inf), np.where(below & (y > 0), c / y, np.inf)).min(1)
    impossible = (above & (x == 0) & (c >= 0)) | (below & (y == 0) & (c <= 0))
    impossible |= (np.abs(x) >= FLOAT_EXACT) & above | (np.abs(y) >= FLOAT_EXACT) & below
    room = np.where(impossible.any(1) | ~np.isfinite(high) | (low <= 0), -1.0,
                    np.log(np.maximum(high, 1e-300)) - np.log(np.maximum(low, 1e-300)))
    usable = room > 4 * MARGIN
    if not usable.any():
        return None
    # The scale nearest the multiplier's own (kept where it is inside): the real weights move the least.
    low, high = low * (1 + 2 * MARGIN), high * (1 - 2 * MARGIN)
    nearest = np.clip(own, low, high)
    with np.errstate(divide="ignore", invalid="ignore"):  # rows that are not usable hold anything
        distance = np.where(usable, np.abs(np.log(nearest) - np.log(own)), np.inf)
    best = int(np.argmin(distance))
    return float(nearest[best]), int(candidates[best, 0])


def rounded(table: dict, multiple) -> ChannelFit:
    """The kernel's (S, B) without a fit: the multiplier's own scale and the bias rounded to the kernel's
    accumulator unit. ``multiple``: kernel accumulator units per rsq.runtime unit (the weights' shift inside
    int8), one for the layer or one per channel."""
    bias_shift = int(table["bias_shift"][0])
    m0s, shifts = table["m0"], table["shift"]
    multiples = np.broadcast_to(np.asarray(multiple, dtype=np.int64), (len(m0s),))
    sign = np.where(m0s < 0, -1, 1).astype(np.int64)
    real = np.abs(m0s.astype(np.float64)) * np.exp2(-(MANTISSA_BITS + shifts.astype(np.float64)) + bias_shift)
    bias = np.rint(sign * table["bias"].astype(np.float64) * multiples / 2.0 ** bias_shift).astype(np.int64)
    return ChannelFit(real / multiples, bias, sign, np.zeros(len(m0s), dtype=bool))


def fit_layer(table: dict, weights: np.ndarray, multiple, x_range: tuple[int, int]) -> ChannelFit:
    """The kernel's (S, B) per output channel of one conv/linear with a narrow output, reproducing ``table``'s
    requantization (rsq.runtime's) where a fit exists, else ``rounded``'s."""
    fit = rounded(table, multiple)
    bias_shift = int(table["bias_shift"][0])
    lo, hi = int(table["lo"][0]), int(table["hi"][0])
    least, most = accumulator_bounds(weights, *x_range)
    m0s, shifts, biases = table["m0"], table["shift"], table["bias"]
    sign, scale, bias, exact = fit.sign, fit.scale, fit.bias, fit.exact
    multiples = np.broadcast_to(np.asarray(multiple, dtype=np.int64), (len(m0s),))
    for c in range(len(m0s)):
        if m0s[c] == 0:
            continue
        # A negative multiplier is the positive case on the negated accumulator (and negated bias).
        s, m = int(sign[c]), int(multiples[c])
        t = boundaries(s * int(biases[c]), bias_shift, abs(int(m0s[c])), int(shifts[c]), lo, hi)
        low_acc, high_acc = (least[c], most[c]) if s > 0 else (-most[c], -least[c])
        found = fit_channel(t, lo, m, s * float(biases[c]) / 2.0 ** bias_shift, float(scale[c]), int(low_acc),
                            int(high_acc), search=max(2 * m, 4))
        if found is not None:
            (scale[c], bias[c]), exact[c] = found, True
    return fit
