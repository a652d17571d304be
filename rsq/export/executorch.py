"""PT2E programs of an RS-Net lowered to ExecuTorch's XNNPACK backend: one .pte, one method per resolution.

Methods are named ``r<resolution>`` (as rsq's mode keys) and take one image (batch 1): the
on-device case, and dynamic batch breaks in graphs that are only partly delegated.

XNNPACK runs the convs whose output is re-quantized (dq -> conv [-> clamp] -> q) in int8. Convs
whose output stays float (before a residual add) and the final linear keep float weights (the
dequantized values) and run as XNNPACK float ops on the dequantized input, so the whole network is
one XNNPACK delegate: with those layers left as int8-weight portable ops beside int8 delegates,
executorch 1.5.1 returned logits unrelated to the reference.

XNNPACK's int8 conv rounds its float bias to int32 in accumulator units (input step x weight scale),
then requantizes in float32: round(acc x M), M = that unit / the output step. A bias rounded so moves
every output within M / 2 of a rounding boundary by one step. Weights are stored shifted left inside
int8 (pt2e.weight_shift: 4-bit weights as multiples of 16), so the unit is 2**k times finer, and each
requantized conv takes the per-channel weight scale and integer bias that make XNNPACK's rounding give
rsq.runtime's integers for every input (pt2e.fit_xnnpack_requantization, docs/export.md §8c). Such a
pair exists for every channel of the W4A4 and W2A2 models measured, so the int8 program then agrees
with the fake-quant model as the float one does; an 8-bit output (255 rounding boundaries on an
accumulator at most 4x finer) rarely has one, and keeps the rounded bias: about one requantized
output in a thousand moves by one step (under 0.3 % of the answers of the W8A8 models measured).

One program for every resolution, one set of weights: ExecuTorch stores a constant once however many
methods use it, so the int8 weights (rsq's integers, the same in every mode) are shared as they are.
The float-weight convs (those before a residual add) would each carry their resolution's BN folded
in, a float32 copy per method (a ResNet-18 RS-Net's five methods: 136 MB against 33 MB for one);
instead they keep rsq's weight and apply the BN after it as a 1x1 depthwise conv
(pt2e.unfold_float_layers), so five methods cost about one. The price is that one extra pass per
such layer (tools/results/bench_executorch_sharing.md). ``share_weights=False`` folds as before.

``int8_gemms=False`` is the exact variant for any bit width: every conv / linear is an XNNPACK float op
on the dequantized activations (the q/dq pairs still put each activation on rsq's grid), so the program
equals the fake-quant model up to float32 summation order, as the PT2E program does, at XNNPACK's
float speed.
"""
from __future__ import annotations

from pathlib import Path
from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn

from ..deps import require
from ..errors import RsqError
from ..quiet import native_stderr_captured
from .pt2e import lowered, to_pt2e

PURPOSE = "ExecuTorch export"


def method_name(resolution: int) -> str:
    return f"r{int(resolution)}"


def to_executorch_bytes(model: nn.Module, resolutions: Iterable[int], in_chans: int, int8_gemms: bool = True,
                        share_weights: bool = True, calibration: Optional[dict] = None) -> bytes:
    """The serialised .pte: every resolution's PT2E program, XNNPACK-delegated, in one program.

    ``int8_gemms=False``: every conv / linear a float op on the dequantized activations (no int8 conv,
    so no bias rounding even where no exact fit exists, see the module docstring). ``share_weights=False`` folds each resolution's BN
    into its float weights: one method per resolution, each with its own copy (see the module docstring).
    ``calibration`` ({resolution: NCHW float images}, the run's training images): a conv with no exact
    requantization fit keeps the rounding boundaries that most of their values sit at (fit_xnnpack_requantization,
    counted by rsq.export.qlinear.calibrate); None: XNNPACK's own rounding there.
    """
    exir = require("executorch.exir", PURPOSE, "executorch")
    xnnpack = require("executorch.backends.xnnpack.partition.xnnpack_partitioner", PURPOSE, "executorch")
    # Registers the out variants of the q/dq ops, for any of them XNNPACK does not take.
    require("executorch.kernels.quantized", PURPOSE, "executorch")
    resolutions = [int(r) for r in resolutions]
    if not resolutions:
        raise RsqError("ExecuTorch export needs at least one resolution")
    integer = lowered(model, resolutions) if int8_gemms else None  # once for every method's requantization fit
    counts = None
    if integer is not None and calibration is not None:
        from .qlinear import calibrate
        counts = calibrate(integer, calibration)[1]
    programs = {method_name(r): to_pt2e(model, r, in_chans, batch=1, backend="xnnpack", int8_weights=int8_gemms,
                                        fold_float_bn=not share_weights, integer=integer,
                                        counts=(counts or {}).get(r))
                for r in resolutions}
    # One partitioner list per method: a partitioner instance keeps state from the program it saw.
    partitioners = {name: [xnnpack.XnnpackPartitioner()] for name in programs}
    edge = exir.to_edge_transform_and_lower(programs, partitioner=partitioners)
    return edge.to_executorch().buffer


def write_executorch(model: nn.Module, resolutions: Iterable[int], in_chans: int, path,
                     int8_gemms: bool = True, share_weights: bool = True, calibration: Optional[dict] = None) -> Path:
    """Write one .pte with a method ``r<resolution>`` per resolution; returns the path."""
    path = Path(path)
    path.write_bytes(to_executorch_bytes(model, resolutions, in_chans, int8_gemms, share_weights, calibration))
    return path


def set_xnnpack_threads(threads: int) -> None:
    """The size of the thread pool XNNPACK's kernels use in this process (by default, every core)."""
    try:
        from executorch.extension.pybindings.portable_lib import _unsafe_reset_threadpool
    except ImportError:  # an executorch without it keeps its default
        return
    _unsafe_reset_threadpool(threads)


def _runtime():
    runtime_mod = require("executorch.runtime", "running a .pte", "executorch")
    require("executorch.kernels.quantized", "running a .pte", "executorch")  # the dequantize kernels
    return runtime_mod.Runtime.get()


class ExecutorchProgram:
    """A .pte loaded once, its methods loaded on first use: what an app holds between calls."""

    def __init__(self, path):
        self.path = Path(path)
        self.program = _runtime().load_program(self.path)
        self.methods = {}

    def __call__(self, method: str, x_numpy: np.ndarray) -> np.ndarray:
        """Logits of ``method`` (e.g. "r16") for an NCHW float array, one image at a time."""
        if method not in self.methods:
            if method not in self.program.method_names:
                raise RsqError(f"{self.path} has no method {method!r}; it has: "
                               f"{', '.join(sorted(self.program.method_names))}")
            with native_stderr_captured():  # XNNPACK's CPU probe prints to stderr on the first method
                self.methods[method] = self.program.load_method(method)
        runner = self.methods[method]
        x = torch.from_numpy(np.ascontiguousarray(x_numpy, dtype=np.float32))
        return torch.cat([runner.execute([image.unsqueeze(0)])[0].clone() for image in x]).numpy()


def run_executorch(path, method: str, x_numpy: np.ndarray) -> np.ndarray:
    """Logits of ``method`` (e.g. "r16") for an NCHW float array, one image at a time in ExecuTorch
    (the program loaded for this call only; ExecutorchProgram keeps it)."""
    return ExecutorchProgram(path)(method, x_numpy)
