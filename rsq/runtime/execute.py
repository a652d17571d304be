"""Execute an IntegerModel with numpy: integers only from the quantized input to the int32 logits.

Activations are NHWC inside (a channel is the last axis, so per-channel tables broadcast);
convolutions are im2col + int32 matmul (or a provably exact float32 one, see Runtime). Every
accumulator fits in int32 by construction (lower keeps (acc << bias_shift) + bias within 2**30)
and every requantization is an int64 product and a rounding shift (fixedpoint.py), so the
result is the exact definition of the exported model.
"""
from __future__ import annotations

import numpy as np
from numpy.lib.stride_tricks import as_strided

from ..errors import RsqError
from .fixedpoint import requantize
from .model import IntegerModel


# float32 represents every integer below 2**24 exactly, so a matmul whose every partial sum stays
# below that bound returns exactly the integer result, through BLAS (several times faster).
FLOAT32_EXACT = 2**24


class Runtime:
    """A reusable executor: weight matrices are laid out once, tables are looked up per call.

    gemm="int32" (default) multiplies in int32; gemm="float" uses float32 BLAS for every layer whose
    accumulators provably stay below 2**24 (|weights| summed per channel times the largest input),
    which gives the same integers, and int32 for the others.
    """

    def __init__(self, model: IntegerModel, gemm: str = "int32"):
        if gemm not in ("int32", "float"):
            raise ValueError(f"gemm must be 'int32' or 'float', not {gemm!r}")
        self.model = model
        self.matrices = {}
        for op in model.ops:
            if op.kind in ("conv", "linear"):
                weights = model.weights[op.attrs["weight"]].values
                mats = _weight_matrices(weights, op)
                if gemm == "float" and _accumulator_bound(weights, model.tensors[op.inputs[0]]) < FLOAT32_EXACT:
                    mats = [m.astype(np.float32) for m in mats]
                self.matrices[op.name] = mats

    def quantize_input(self, x: np.ndarray, resolution: int) -> np.ndarray:
        """The one float step: NCHW float32 images -> the first conv's integer input (NCHW)."""
        return quantize_input(self.model, x, resolution)

    def run(self, x: np.ndarray, resolution: int, quantized: bool = False) -> np.ndarray:
        """int32 logits [N, classes] for NCHW images (float, or already quantized when ``quantized``)."""
        return self.run_all(x, resolution, quantized)[self.model.output]

    def run_all(self, x: np.ndarray, resolution: int, quantized: bool = False) -> dict[str, np.ndarray]:
        """Every integer tensor by name (NHWC int32; the logits [N, classes]), for debugging and verify."""
        model = self.model
        resolution = model.check_resolution(resolution)
        x = np.asarray(x)
        if x.ndim != 4 or x.shape[1] != model.in_chans or x.shape[2] != resolution or x.shape[3] != resolution:
            raise RsqError(f"input shape {tuple(x.shape)} is not [N, {model.in_chans}, {resolution}, {resolution}]")
        values = {}
        first = next(op for op in model.ops if op.kind == "quantize_input")
        q = x if quantized else self.quantize_input(x, resolution)
        values[first.output] = np.ascontiguousarray(q.transpose(0, 2, 3, 1)).astype(np.int32)
        tables = model.tables[resolution]
        for op in model.ops:
            if op.kind == "quantize_input":
                continue
            values[op.output] = self._run_op(op, tables[op.name], values)
        return values

    def _run_op(self, op, table, values) -> np.ndarray:
        if op.kind in ("conv", "linear"):
            x = values[op.inputs[0]]
            mats = self.matrices[op.name]
            if mats[0].dtype == np.float32:
                x = x.astype(np.float32)
            acc = conv_accumulate(x, mats, op) if op.kind == "conv" else x @ mats[0]
            shifted = (acc.astype(np.int64) << int(table["bias_shift"][0])) + table["bias"].astype(np.int64)
            out = requantize(shifted, table["m0"], table["shift"])
        elif op.kind == "requantize":
            out = requantize(values[op.inputs[0]], table["m0"][0], table["shift"][0])
        elif op.kind == "add":
            a, b = (values[name] for name in op.inputs)
            out = (requantize(a, table["m0_a"][0], table["shift_a"][0])
                   + requantize(b, table["m0_b"][0], table["shift_b"][0]))
        elif op.kind == "max_pool":
            return max_pool(values[op.inputs[0]], op.attrs)  # no table: same grid in and out
        elif op.kind == "global_avg_pool":
            total = values[op.inputs[0]].astype(np.int64).sum(axis=(1, 2))  # < 2**31 * H * W: m0 has fewer bits
            out = requantize(total, table["m0"][0], table["shift"][0])
        else:
            raise ValueError(f"unknown op kind {op.kind!r}")
        return np.clip(out, int(table["lo"][0]), int(table["hi"][0])).astype(np.int32)


def quantize_input(model: IntegerModel, x: np.ndarray, resolution: int) -> np.ndarray:
    """NCHW float32 images -> the first conv's integer input (NCHW) at ``resolution``."""
    table_op = next(op for op in model.ops if op.kind == "quantize_input")
    table = model.tables[model.check_resolution(resolution)][table_op.name]
    scale = np.float32(model.scales[resolution][table_op.output])
    # float32 division then round half to even: the same arithmetic as the fake quantizer.
    q = np.round(np.asarray(x, dtype=np.float32) / scale)
    q = np.clip(q, int(table["lo"][0]), int(table["hi"][0]))
    return q.astype(model.tensors[table_op.output].dtype)


def _accumulator_bound(weights: np.ndarray, input_info) -> int:
    """The largest |accumulator| any input on this layer's grid can produce."""
    largest_input = 2 ** (input_info.bits - 1) if input_info.signed else 2**input_info.bits - 1
    per_channel = np.abs(weights.astype(np.int64)).reshape(weights.shape[0], -1).sum(1)
    return int(per_channel.max()) * largest_input


def _weight_matrices(weights: np.ndarray, op) -> list[np.ndarray]:
    """Per group: int32 [kh * kw * cin_per_group, cout_per_group], rows in (kh, kw, cin) order."""
    if op.kind == "linear":
        return [np.ascontiguousarray(weights.astype(np.int32).T)]
    groups = op.attrs["groups"]
    per_group = weights.shape[0] // groups
    mats = []
    for g in range(groups):
        w = weights[g * per_group:(g + 1) * per_group].astype(np.int32)  # [cout_g, cin_g, kh, kw]
        mats.append(np.ascontiguousarray(w.transpose(2, 3, 1, 0).reshape(-1, per_group)))
    return mats


def conv_accumulate(x: np.ndarray, matrices: list[np.ndarray], op) -> np.ndarray:
    """int32 accumulators [N, Ho, Wo, Cout] of a zero-padded strided conv on NHWC integers."""
    kh, kw = op.attrs["kernel"]
    sh, sw = op.attrs["stride"]
    ph, pw = op.attrs["padding"]
    n, h, w, c = x.shape
    if ph or pw:
        x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)))  # zero point 0: padding with 0 is padding with 0.0
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    s = x.strides
    windows = as_strided(x, (n, ho, wo, kh, kw, c), (s[0], s[1] * sh, s[2] * sw, s[1], s[2], s[3]), writeable=False)
    groups = len(matrices)
    per_group = c // groups
    outs = []
    for g, mat in enumerate(matrices):
        cols = windows[..., g * per_group:(g + 1) * per_group].reshape(n * ho * wo, kh * kw * per_group)
        outs.append(cols @ mat)
    acc = outs[0] if groups == 1 else np.concatenate(outs, axis=1)
    return acc.reshape(n, ho, wo, -1)


def max_pool(x: np.ndarray, attrs: dict) -> np.ndarray:
    """Max over each window of NHWC integers; padding never wins (it is the dtype's minimum, i.e. -infinity)."""
    kh, kw = attrs["kernel"]
    sh, sw = attrs["stride"]
    ph, pw = attrs["padding"]
    n, h, w, c = x.shape
    if ph or pw:
        x = np.pad(x, ((0, 0), (ph, ph), (pw, pw), (0, 0)), constant_values=np.iinfo(x.dtype).min)
    ho, wo = (h + 2 * ph - kh) // sh + 1, (w + 2 * pw - kw) // sw + 1
    s = x.strides
    windows = as_strided(x, (n, ho, wo, kh, kw, c), (s[0], s[1] * sh, s[2] * sw, s[1], s[2], s[3]), writeable=False)
    return np.ascontiguousarray(windows.max(axis=(3, 4)))


def run(model: IntegerModel, x: np.ndarray, resolution: int, quantized: bool = False) -> np.ndarray:
    """int32 logits of ``model`` at ``resolution`` (see Runtime.run)."""
    return Runtime(model).run(x, resolution, quantized)


def dequantize_logits(model: IntegerModel, logits: np.ndarray, resolution: int) -> np.ndarray:
    """float32 logits: the integers times the output's step at this resolution."""
    step = model.scales[model.check_resolution(resolution)][model.output]
    return (logits.astype(np.float64) * step).astype(np.float32)
