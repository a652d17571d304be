"""Fixed-point multipliers: a real M > 0 or < 0 as an int32 Q31 mantissa and a power-of-two shift.

``M ~= m0 * 2**-(31 + shift)`` with ``2**30 <= |m0| < 2**31`` (or m0 = 0 for M = 0; a pooling
multiplier uses fewer mantissa bits, see quantize_multiplier). Applying it
to an integer x is one 64-bit product and one rounding arithmetic right shift by ``31 + shift``:

    requantize(x, m0, shift) = floor((x * m0 + 2**(30 + shift)) / 2**(31 + shift))

which is exactly round-half-up(x * m0 / 2**(31 + shift)): gemmlowp's rounding doubling high
multiply followed by its rounding right shift, fused into ONE rounding (gemmlowp rounds twice,
which can differ from round(x * M) by one step). ``shift`` may be negative (M >= 1) down to -30.
Valid while |x * m0| < 2**63; rsq.export.lower keeps every input within 2**30, so |x * m0| < 2**61.
Numpy only: rsq.runtime imports this without torch.
"""
from __future__ import annotations

import math

import numpy as np

MANTISSA_BITS = 31
MIN_SHIFT = -30  # a right shift of 31 + shift >= 1 bit always, so the rounding term is an integer
MAX_SHIFT = 31   # |M| < 2**-62: round(x * M) is 0 for every |x| < 2**32, stored as m0 = 0


def quantize_multiplier(real: float, bits: int = MANTISSA_BITS) -> tuple[int, int]:
    """(m0, shift) for a real multiplier; the sign of ``real`` goes into m0 (negative BN gamma).

    ``bits`` < 31 keeps |m0| < 2**bits, for an input known to reach 2**(63 - bits) (a pooling sum).
    """
    if not math.isfinite(real):
        raise ValueError(f"multiplier {real!r} is not finite")
    if real == 0.0:
        return 0, 0
    mantissa, exponent = math.frexp(abs(real))  # abs(real) = mantissa * 2**exponent, mantissa in [0.5, 1)
    m0 = round(mantissa * 2**bits)
    if m0 == 2**bits:  # mantissa rounded up to 1.0
        m0, exponent = m0 // 2, exponent + 1
    shift = bits - exponent - MANTISSA_BITS  # real ~= m0 * 2**(exponent - bits) = m0 * 2**-(31 + shift)
    if shift > MAX_SHIFT:
        return 0, 0
    if shift < MIN_SHIFT:
        raise ValueError(f"multiplier {real!r} is too large for a Q31 fixed-point multiplier")
    return (m0 if real > 0 else -m0), shift


def quantize_multipliers(reals, bits: int = MANTISSA_BITS) -> tuple[np.ndarray, np.ndarray]:
    """Element-wise quantize_multiplier: (int32 m0 array, int32 shift array)."""
    pairs = [quantize_multiplier(float(r), bits) for r in np.asarray(reals, dtype=np.float64).reshape(-1)]
    m0 = np.array([p[0] for p in pairs], dtype=np.int32)
    shift = np.array([p[1] for p in pairs], dtype=np.int32)
    return m0, shift


def multiplier_value(m0: int, shift: int):
    """The exact rational that (m0, shift) represents, as a fractions.Fraction."""
    from fractions import Fraction
    return Fraction(int(m0), 2 ** (MANTISSA_BITS + int(shift)))


def requantize(x: np.ndarray, m0, shift) -> np.ndarray:
    """round-half-up(x * m0 / 2**(31 + shift)) in int64; m0 and shift broadcast against x."""
    x = np.asarray(x, dtype=np.int64)
    m0 = np.asarray(m0, dtype=np.int64)
    total = MANTISSA_BITS + np.asarray(shift, dtype=np.int64)
    return (x * m0 + (np.int64(1) << (total - 1))) >> total
