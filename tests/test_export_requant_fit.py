"""Exact requantization on float32-scaled int8 kernels (rsq/export/requant_fit.py): the fitted scale and
integer bias give rsq.runtime's integers for every reachable accumulator."""
import numpy as np
import pytest

from rsq.export.requant_fit import accumulator_bounds, boundaries, boundary_weights_from_counts, fit_layer
from rsq.runtime.fixedpoint import quantize_multipliers, requantize


def _table(rng, channels: int, lo: int, hi: int, unit_range, bias_shift: int = 12) -> dict:
    """A conv's requantization table as lower writes it: real multipliers of either sign, fractional biases."""
    real = rng.uniform(*unit_range, channels) * rng.choice([-1, 1], channels)
    m0, shift = quantize_multipliers(real / 2 ** bias_shift)
    return {"m0": np.asarray(m0, np.int64), "shift": np.asarray(shift, np.int64),
            "bias": np.rint(rng.normal(0, 40, channels) * 2 ** bias_shift).astype(np.int64),
            "bias_shift": np.array([bias_shift]), "lo": np.array([lo]), "hi": np.array([hi])}


def _exact(table, acc: np.ndarray) -> np.ndarray:
    """rsq.runtime's requantization of every channel's accumulators (acc [channels, N])."""
    shifted = (acc.astype(np.int64) << int(table["bias_shift"][0])) + table["bias"][:, None]
    out = requantize(shifted, table["m0"][:, None], table["shift"][:, None])
    return np.clip(out, int(table["lo"][0]), int(table["hi"][0]))


def _kernel(fit, multiple, acc: np.ndarray, lo: int, hi: int) -> np.ndarray:
    """onnxruntime's / XNNPACK's requantization: round_half_even(float32(acc + B) * float32(S)), clamped,
    on the kernel's accumulator (the rsq.runtime one times the weights' shift, sign-oriented)."""
    kernel_acc = fit.sign[:, None] * np.asarray(multiple)[..., None] * acc + fit.bias[:, None]
    assert np.abs(kernel_acc).max() < 2 ** 24
    value = kernel_acc.astype(np.float32) * fit.scale.astype(np.float32)[:, None]
    return np.clip(np.rint(value), lo, hi).astype(np.int64)


@pytest.mark.parametrize("multiple", [16, 1])
def test_fitted_channels_reproduce_every_reachable_accumulator(multiple):
    rng = np.random.default_rng(multiple)
    channels, lo, hi = 48, 0, 15  # a 4-bit activation after a ReLU
    weights = rng.integers(-8, 8, (channels, 16, 3, 3))
    table = _table(rng, channels, lo, hi, (0.01, 0.06))
    fit = fit_layer(table, weights, multiple, (0, 15))
    least, most = accumulator_bounds(weights, 0, 15)
    for c in range(channels):
        acc = np.arange(least[c], most[c] + 1)[None, :]
        exact = _exact({k: (v[c:c + 1] if len(v) == channels else v) for k, v in table.items()}, acc)
        sub = type(fit)(fit.scale[c:c + 1], fit.bias[c:c + 1], fit.sign[c:c + 1], fit.exact[c:c + 1])
        got = _kernel(sub, multiple, acc, lo, hi)
        if fit.exact[c]:
            assert np.array_equal(got, exact), c
    # 15 boundaries on a 16x finer accumulator: the fit finds a scale for (nearly) every channel; with the
    # weights unshifted, many channels keep one or more boundaries off by one accumulator value.
    assert fit.exact.mean() >= (0.95 if multiple == 16 else 0.2)


def test_a_channel_without_exact_fit_keeps_the_rounded_bias():
    """8-bit outputs on unshifted weights: 255 boundaries rarely fit at once. Such a channel keeps the
    bias rounded to the accumulator unit and the multiplier's own scale, the writers' behaviour before the
    fit; one that fits reproduces every accumulator."""
    rng = np.random.default_rng(3)
    channels, lo, hi, bias_shift = 16, -128, 127, 13
    weights = rng.integers(-128, 128, (channels, 1, 3, 3))
    table = _table(rng, channels, lo, hi, (0.03, 0.1), bias_shift=bias_shift)
    fit = fit_layer(table, weights, 1, (-128, 127))
    least, most = accumulator_bounds(weights, -128, 127)
    real = np.abs(table["m0"]) * np.exp2(-(31.0 + table["shift"]) + bias_shift)
    assert (fit.sign == np.sign(table["m0"])).all()
    for c in range(channels):
        if fit.exact[c]:
            acc = np.arange(least[c], most[c] + 1)[None, :]
            one = {k: (v[c:c + 1] if len(v) == channels else v) for k, v in table.items()}
            sub = type(fit)(fit.scale[c:c + 1], fit.bias[c:c + 1], fit.sign[c:c + 1], fit.exact[c:c + 1])
            assert np.array_equal(_kernel(sub, 1, acc, lo, hi), _exact(one, acc)), c
        else:
            assert fit.scale[c] == real[c]
            assert fit.bias[c] == np.rint(fit.sign[c] * table["bias"][c] / 2 ** bias_shift)
    assert not fit.exact.all()


def _kept_share(fit, c, table, least, most, weights) -> float:
    """The share of ``weights`` at the boundaries that the kernel's (S, B) of channel ``c`` reproduce, by running
    the kernel's float32 arithmetic at both sides of every reachable boundary."""
    lo, hi, bias_shift = int(table["lo"][0]), int(table["hi"][0]), int(table["bias_shift"][0])
    s = int(fit.sign[c])
    t = boundaries(s * int(table["bias"][c]), bias_shift, abs(int(table["m0"][c])), int(table["shift"][c]), lo, hi)
    low, high = (least[c], most[c]) if s > 0 else (-most[c], -least[c])

    def kernel(acc):
        return np.rint(np.float32(acc + fit.bias[c]) * np.float32(fit.scale[c]))

    v = np.arange(lo, hi)
    ok = ((t > high) | (kernel(t) >= v + 1)) & ((t - 1 < low) | (kernel(t - 1) <= v))
    constrains = (t <= high) | (t - 1 >= low)
    return float((weights * ok)[constrains].sum() / weights[constrains].sum())


def test_without_an_exact_fit_the_weighted_fit_keeps_the_busiest_boundaries():
    """8-bit outputs after a ReLU, whose values crowd near 0 (geometric counts): where no (S, B) reproduces all
    255 boundaries, calibration counts choose the ones that most values sit at. The kernel's own arithmetic
    reproduces at least the weight the fit reports, and more than the rounded bias does."""
    rng = np.random.default_rng(5)
    channels, lo, hi = 24, 0, 255
    weights = rng.integers(-128, 128, (channels, 8, 3, 3))
    table = _table(rng, channels, lo, hi, (0.002, 0.02), bias_shift=13)
    counts = np.round(5000 * 0.93 ** np.arange(hi - lo + 1))[None, :].repeat(channels, 0)
    boundary = boundary_weights_from_counts(counts)
    fit = fit_layer(table, weights, 1, (0, 255), boundary)
    plain = fit_layer(table, weights, 1, (0, 255))
    least, most = accumulator_bounds(weights, 0, 255)
    inexact = np.flatnonzero(~fit.exact)
    assert len(inexact) >= channels // 2  # the case this is for
    kept = [_kept_share(fit, c, table, least, most, boundary[c]) for c in inexact]
    rounded_kept = [_kept_share(plain, c, table, least, most, boundary[c]) for c in inexact]
    assert all(k >= claimed - 1e-9 for k, claimed in zip(kept, fit.kept[inexact]))
    assert all(k >= r - 1e-9 for k, r in zip(kept, rounded_kept))
    assert np.mean(kept) > np.mean(rounded_kept) + 0.05  # here 0.86 against 0.76
    assert (fit.kept[fit.exact] == 1).all() and np.array_equal(fit.exact, plain.exact)


def test_a_channel_whose_boundaries_no_scale_keeps_falls_back_to_the_rounded_bias():
    """Every boundary beyond float32's exact integers (|acc| >= 2^24): no (S, B) is trusted, so the weighted fit
    returns the multiplier's own scale and the bias rounded to the kernel's unit, keeping no weight."""
    from rsq.export.requant_fit import fit_channel_weighted
    thresholds = np.arange(3, dtype=np.int64) * 1000 + 2 ** 25
    scale, bias, share = fit_channel_weighted(thresholds, 0, 1, 12.6, 1e-7, 0, 2 ** 26, 4, np.ones(3))
    assert (scale, bias, share) == (1e-7, 13, 0.0)
