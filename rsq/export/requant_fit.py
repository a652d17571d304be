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
boundaries rarely do. A channel that does not fit (``exact`` False) keeps the rounded bias, or, given how often
values sit at each boundary (calibration counts), the (S, B) that reproduce the boundaries holding the most
values: an 8-bit activation after a ReLU crowds near 0, and those boundaries usually fit together.

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
    # Per channel, the share of calibration weight at boundaries the kernel reproduces (fit_layer with
    # boundary weights; 1 where exact); None without weights.
    kept: Optional[np.ndarray] = None


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


def _boundary_intervals(thresholds, lo, multiple, bias_real, search, least, most):
    """The candidate biases (a column: every B within ``search`` of ``multiple * bias_real``) and, per candidate
    (rows) and boundary (columns), the open interval (low, high) of scales S for which the kernel rounds
    boundary v where rsq.runtime does, and whether the boundary constrains S at all."""
    c = np.arange(lo, lo + len(thresholds), dtype=np.float64) + 0.5
    centre = int(np.rint(multiple * bias_real))
    candidates = np.arange(centre - search, centre + search + 1, dtype=np.int64)[:, None]
    above = thresholds <= most            # acc = T_v is reachable: it must round to >= v + 1
    below = thresholds - 1 >= least       # acc = T_v - 1 is reachable: it must round to <= v
    x = (multiple * thresholds[None, :] + candidates).astype(np.float64)        # S * x > c
    y = (multiple * (thresholds[None, :] - 1) + candidates).astype(np.float64)  # S * y < c
    with np.errstate(divide="ignore", invalid="ignore"):
        low = np.maximum(np.where(above & (x > 0), c / x, 0.0), np.where(below & (y < 0), c / y, 0.0))
        high = np.minimum(np.where(above & (x < 0), c / x, np.inf), np.where(below & (y > 0), c / y, np.inf))
    impossible = (above & (x == 0) & (c >= 0)) | (below & (y == 0) & (c <= 0))
    impossible |= (np.abs(x) >= FLOAT_EXACT) & above | (np.abs(y) >= FLOAT_EXACT) & below
    return candidates, low, np.where(impossible, 0.0, high), np.broadcast_to(above | below, low.shape)


def fit_channel(thresholds: np.ndarray, lo: int, multiple: int, bias_real: float, own: float,
                least: int, most: int, search: int) -> Optional[tuple[float, int]]:
    """(S, B) with S > 0 such that round(S * (multiple * acc + B)) crosses v + 1/2 exactly between
    thresholds[v - lo] - 1 and thresholds[v - lo], for every reachable boundary, S as near ``own`` (the
    multiplier's scale) as allows; None if no B within ``search`` of ``multiple * bias_real`` allows it."""
    candidates, low, high, _ = _boundary_intervals(thresholds, lo, multiple, bias_real, search, least, most)
    low, high = low.max(1), high.min(1)
    room = np.where(~np.isfinite(high) | (low <= 0) | (high <= 0), -1.0,
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


def fit_channel_weighted(thresholds: np.ndarray, lo: int, multiple: int, bias_real: float, own: float,
                         least: int, most: int, search: int, weights: np.ndarray) -> tuple[float, int, float]:
    """Where no exact fit exists: (S, B, share) that reproduce the boundaries of the most weight, ``weights[v - lo]``
    (how often a value sits at boundary v, from calibration), S nearest ``own`` among the best; ``share`` is the
    weight kept over all the weight of the reachable boundaries.

    For each candidate B every boundary allows an interval of S; the best S lies where the most weight overlaps,
    found by a sweep over the intervals' ends. Where no boundary can be kept: ``own`` and the rounded bias."""
    candidates, low, high, constrains = _boundary_intervals(thresholds, lo, multiple, bias_real, search, least,
                                                            most)
    low, high = low * (1 + 2 * MARGIN), high * (1 - 2 * MARGIN)
    total = float(weights[constrains[0]].sum())
    best = (0.0, np.inf, own, int(np.rint(multiple * bias_real)))  # (weight, log distance to own, S, B)
    for row, bias in enumerate(candidates[:, 0]):
        keep = constrains[row] & (high[row] > low[row]) & (high[row] > 0)
        starts, ends, w = np.maximum(low[row][keep], 0.0), high[row][keep], weights[keep]
        # An interval is open: at one position, its end comes before another's start.
        position = np.concatenate([starts, ends])
        delta = np.concatenate([w, -w])
        order = np.lexsort((delta, position))
        position, covered = position[order], np.cumsum(delta[order])
        if not len(position):
            continue
        segment_ends = np.append(position[1:], np.inf)
        for i in np.flatnonzero(np.isclose(covered, covered.max(), rtol=0, atol=1e-9)):
            a, b = position[i], segment_ends[i]
            if not b > a:
                continue
            scale = float(np.clip(own, a, b)) if np.isfinite(b) else max(own, a)
            if scale <= 0:
                continue
            distance = abs(np.log(scale) - np.log(own))
            if (covered[i], -distance) > (best[0], -best[1]):
                best = (float(covered[i]), distance, scale, int(bias))
    return best[2], best[3], best[0] / total if total > 0 else 1.0


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


def fit_layer(table: dict, weights: np.ndarray, multiple, x_range: tuple[int, int],
              boundary_weights: Optional[np.ndarray] = None) -> ChannelFit:
    """The kernel's (S, B) per output channel of one conv/linear with a narrow output, reproducing ``table``'s
    requantization (rsq.runtime's) where a fit exists. Elsewhere ``rounded``'s, or with ``boundary_weights``
    ([channels, hi - lo]: how often a value sits at each boundary, boundary_weights_from_counts) the (S, B) that
    reproduce the boundaries of the most weight (fit_channel_weighted)."""
    fit = rounded(table, multiple)
    if boundary_weights is not None:
        fit.kept = np.ones(len(fit.scale))
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
        elif boundary_weights is not None:
            scale[c], bias[c], fit.kept[c] = fit_channel_weighted(
                t, lo, m, s * float(biases[c]) / 2.0 ** bias_shift, float(scale[c]), int(low_acc), int(high_acc),
                search=max(2 * m, 4), weights=np.asarray(boundary_weights[c], dtype=np.float64))
    return fit


def boundary_weights_from_counts(counts: np.ndarray) -> np.ndarray:
    """Boundary weights from how often each output integer occurred (counts [channels, hi - lo + 1]): the values
    on either side of boundary v (between v and v + 1). A clamped end value stands for every value beyond it, so
    its neighbour's count stands in for it; every boundary keeps a small weight, so one never seen still
    counts for something."""
    counts = np.asarray(counts, dtype=np.float64).copy()
    if counts.shape[1] >= 3:
        counts[:, 0], counts[:, -1] = counts[:, 1], counts[:, -2]
    pairs = counts[:, :-1] + counts[:, 1:]
    return pairs + 1e-3 * np.maximum(pairs.max(1, keepdims=True), 1.0)
