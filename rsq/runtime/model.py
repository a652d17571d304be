"""IntegerModel: an RS-Net lowered to integer ops, as plain data (numpy arrays, dataclasses).

One graph and ONE copy of the integer weights serve every resolution; only ``tables`` (bias,
multipliers, clamp ranges) and ``scales`` (the real value of one integer step) differ per
resolution. Every zero point is 0: weights and activations are on symmetric (signed) or
unsigned LSQ grids, so a zero point never appears in the arithmetic.
"""
from __future__ import annotations

import hashlib
import json
from dataclasses import asdict, dataclass, field

import numpy as np

# Tensor kinds. "float": the network's input before quantization. "narrow": one conv/linear's
# quantized input (its LSQ grid, <= 8 bits). "wide": an int32 value on a fine grid (residual
# stream, a conv output feeding an add or a pooling). "logits": the int32 network output.
KINDS = ("float", "narrow", "wide", "logits")
# Op kinds and their table entries (per resolution; "per channel" arrays have one value per
# output channel, the rest are 1-element arrays):
#   quantize_input: lo, hi                  q = clamp(round_half_even(x / scale), lo, hi)
#   requantize:     m0, shift, lo, hi       q = clamp(rq(x, m0, shift), lo, hi)
#   conv / linear:  bias (per channel), bias_shift, m0, shift (per channel), lo, hi
#                   q = clamp(rq((acc << bias_shift) + bias, m0, shift), lo, hi)
#   add:            m0_a, shift_a, m0_b, shift_b, lo, hi
#                   q = clamp(rq(a, m0_a, shift_a) + rq(b, m0_b, shift_b), lo, hi)
#   global_avg_pool: m0, shift, lo, hi      q = clamp(rq(sum_hw(x), m0, shift), lo, hi)
#   max_pool:       (none)                  q = max over each window (attrs kernel, stride, padding;
#                                           padding acts as -infinity); output on the input's grid
OP_KINDS = ("quantize_input", "requantize", "conv", "linear", "add", "global_avg_pool", "max_pool")


@dataclass(frozen=True)
class TensorInfo:
    name: str
    kind: str
    bits: int      # 8 for "float" (the input's grid is set by quantize_input), 32 for wide/logits
    signed: bool
    channels: int

    @property
    def dtype(self) -> str:
        """The numpy/ONNX element type that holds this tensor's integers."""
        if self.kind in ("wide", "logits"):
            return "int32"
        if self.kind == "float":
            return "float32"
        return "int8" if self.signed else "uint8"


@dataclass(frozen=True)
class Op:
    kind: str
    name: str
    inputs: tuple[str, ...]
    output: str
    attrs: dict = field(default_factory=dict)  # JSON-able: weight name, stride, padding, groups, kernel


@dataclass
class QuantWeight:
    """Integer weights on their signed LSQ grid: values in [-2**(bits-1), 2**(bits-1) - 1]."""

    values: np.ndarray  # int8, shape [out, in/groups, kh, kw] (conv) or [out, in] (linear)
    bits: int
    step: np.ndarray    # float32 per output channel: the real value of one weight step (for dequantizing)


@dataclass
class IntegerModel:
    model: str
    num_classes: int
    in_chans: int
    resolutions: tuple[int, ...]
    input: str
    output: str
    tensors: dict[str, TensorInfo]
    ops: tuple[Op, ...]
    weights: dict[str, QuantWeight]
    tables: dict[int, dict[str, dict[str, np.ndarray]]]  # resolution -> op name -> entry -> array
    scales: dict[int, dict[str, float]]                   # resolution -> tensor -> real value of one step
    meta: dict = field(default_factory=dict)              # JSON-able: input mean/std, bits, source

    def check_resolution(self, resolution: int) -> int:
        from ..errors import RsqError
        if resolution not in self.tables:
            known = ", ".join(str(r) for r in self.resolutions)
            raise RsqError(f"resolution {resolution} is not in this export (exported: {known})")
        return int(resolution)

    def digest(self) -> str:
        """SHA-256 over every field in a fixed order: equal digests mean byte-identical models."""
        h = hashlib.sha256()
        head = {k: getattr(self, k) for k in ("model", "num_classes", "in_chans", "resolutions", "input", "output")}
        head["tensors"] = [asdict(self.tensors[k]) for k in sorted(self.tensors)]
        head["ops"] = [asdict(op) for op in self.ops]
        head["meta"] = self.meta
        head["scales"] = {str(r): {k: float(v).hex() for k, v in sorted(s.items())}
                          for r, s in sorted(self.scales.items())}
        h.update(json.dumps(head, sort_keys=True).encode())
        for name in sorted(self.weights):
            w = self.weights[name]
            _hash_array(h, f"w/{name}", w.values)
            _hash_array(h, f"s/{name}", w.step)
            h.update(str(w.bits).encode())
        for r in sorted(self.tables):
            for op_name in sorted(self.tables[r]):
                for key in sorted(self.tables[r][op_name]):
                    _hash_array(h, f"t/{r}/{op_name}/{key}", self.tables[r][op_name][key])
        return h.hexdigest()


def _hash_array(h, label: str, array: np.ndarray) -> None:
    array = np.ascontiguousarray(array)
    h.update(f"{label}|{array.dtype.str}|{array.shape}|".encode())
    h.update(array.tobytes())
