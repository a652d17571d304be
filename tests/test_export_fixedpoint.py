"""Fixed-point requantization against exact rational arithmetic, and the packed format's bit packing."""
from fractions import Fraction
import math

import numpy as np
import pytest

from rsq.runtime.fixedpoint import multiplier_value, quantize_multiplier, quantize_multipliers, requantize
from rsq.runtime.packed import pack_bits, packed_size, unpack_bits


def exact_round(x: int, m0: int, shift: int) -> int:
    """round-half-up(x * m0 / 2**(31 + shift)), in exact rationals."""
    return math.floor(Fraction(x) * multiplier_value(m0, shift) + Fraction(1, 2))


def test_requantize_equals_exact_rational_on_random_inputs():
    rng = np.random.default_rng(0)
    reals = np.concatenate([rng.uniform(-4, 4, 200), 10.0 ** rng.uniform(-9, 3, 200)])
    m0, shift = quantize_multipliers(reals)
    x = rng.integers(-(2**31), 2**31, size=reals.size)
    x[:20] = 0
    got = requantize(x, m0, shift)
    want = [exact_round(int(a), int(m), int(s)) for a, m, s in zip(x, m0, shift)]
    assert got.tolist() == want


def test_requantize_ties_round_half_up_including_negatives():
    m0, shift = quantize_multiplier(0.5)
    assert (m0, shift) == (2**30, 0)
    x = np.array([-5, -3, -1, 1, 3, 5])
    assert requantize(x, m0, shift).tolist() == [-2, -1, 0, 1, 2, 3]  # -2.5 -> -2, -1.5 -> -1, -0.5 -> 0, ...
    m0, shift = quantize_multiplier(0.25)
    x = np.array([-6, -2, 2, 6, 10])                                  # -1.5, -0.5, 0.5, 1.5, 2.5
    assert requantize(x, m0, shift).tolist() == [exact_round(int(v), m0, shift) for v in x] == [-1, 0, 1, 2, 3]


@pytest.mark.parametrize("bits", [31, 25])
def test_quantized_multiplier_is_within_its_precision(bits):
    rng = np.random.default_rng(1)
    for real in list(rng.uniform(-3, 3, 100)) + list(10.0 ** rng.uniform(-9, 6, 100)):
        m0, shift = quantize_multiplier(float(real), bits)
        assert 2 ** (bits - 1) <= abs(m0) < 2**bits
        assert math.copysign(1, m0) == math.copysign(1, real)
        error = abs(multiplier_value(m0, shift) - Fraction(float(real))) / abs(Fraction(float(real)))
        assert error <= Fraction(1, 2**bits)


def test_multiplier_edge_cases():
    assert quantize_multiplier(0.0) == (0, 0)
    assert quantize_multiplier(1e-30) == (0, 0)              # rounds every int32 product to 0 anyway
    assert multiplier_value(*quantize_multiplier(1.0)) == 1   # exact: an add whose input is already on its grid
    with pytest.raises(ValueError):
        quantize_multiplier(2.0**40)
    with pytest.raises(ValueError):
        quantize_multiplier(float("nan"))


@pytest.mark.parametrize("bits", range(2, 9))
def test_bit_packing_round_trips_and_takes_bits_per_value(bits):
    rng = np.random.default_rng(bits)
    values = rng.integers(-(2 ** (bits - 1)), 2 ** (bits - 1), size=1001).astype(np.int8)
    values[:2] = [-(2 ** (bits - 1)), 2 ** (bits - 1) - 1]
    data = pack_bits(values, bits)
    assert len(data) == packed_size(values.size, bits) == math.ceil(values.size * bits / 8)
    assert np.array_equal(unpack_bits(data, bits, values.size), values)


def test_two_bit_weights_are_a_quarter_of_int8():
    values = np.zeros(4096, dtype=np.int8)
    assert len(pack_bits(values, 2)) * 4 == len(pack_bits(values, 8)) == values.nbytes
