"""Training-mode BatchNorm fused with the ReLU after it (and a residual block's add before that ReLU).

Why: on a 2-core CPU the convolutions of rsq's 5-resolution ResNet-20 step already run at about four
fifths of the core's fp32 matrix-product rate, and a third of the step is BatchNorm, ReLU and adds,
each a memory-bound pass of its own over a full activation tensor (tools/results/probe_step_profile.md).
One C kernel (rsq/nn/kernels/bn_act.c) does the same arithmetic in fewer passes: the statistics in one
pass, normalisation, add and ReLU in a second; backward reads the incoming gradient and the BN input
twice each (the ReLU's mask recomputed from them) where BN's and ReLU's own backwards wrote and re-read
a masked gradient. The math is BatchNorm's; the float rounding differs from ATen's (sums run in float
per 64 rows, then in double).

Where: ``bn_relu(bn, x, relu)`` and ``bn_relu(bn, x, relu, residual)`` in a model's forward. The fused
kernel runs when it can help and is safe: a BatchNorm2d (or rsq's switchable one) in training mode with
running statistics, float32 channels_last tensors on the CPU, one intra-op thread (the kernel is serial:
rsq's default step runs each mode on a thread of its own, rsq/mode_threads.py), no autocast, no compiler
or FX trace, and a C compiler to build the kernel once per machine (cached under ~/.cache/rsq/kernels).
Anywhere else the modules themselves run, exactly as they did without it. ``set_enabled(False)``
(``rsq train --no-fused-bn``) turns it off.
"""
from __future__ import annotations

import ctypes
import hashlib
import os
import platform
import subprocess
import tempfile
import threading
from pathlib import Path
from typing import Optional

import torch
from torch import nn

from ..cpu_info import cpuinfo_text
from .switchable_bn import SwitchableBatchNorm2d

SOURCE = Path(__file__).with_name("kernels") / "bn_act.c"
_state = {"enabled": True, "library": None, "why_not": ""}  # library: None = not tried yet, False = cannot build
_build_lock = threading.Lock()


def set_enabled(enabled: bool) -> None:
    _state["enabled"] = bool(enabled)


def enabled() -> bool:
    return _state["enabled"]


def describe(model: nn.Module, one_thread: bool, channels_last: bool) -> str:
    """Whether a training run of ``model`` on the CPU will use the kernel, and if not why: one phrase."""
    if not _state["enabled"]:
        return "fused BatchNorm + ReLU off (--no-fused-bn)"
    if not getattr(model, "fuses_bn_relu", False):
        return "fused BatchNorm + ReLU not used by this model"
    if not (one_thread and channels_last):
        return "fused BatchNorm + ReLU not used (it needs channels_last and one intra-op thread per mode)"
    if library() is None:
        why = _state["why_not"] or "it could not be built"
        return f"fused BatchNorm + ReLU unavailable: {why}, plain modules instead"
    return "fused BatchNorm + ReLU kernel"


def _cpu_signature() -> str:
    """What -march=native compiles for: the CPU's model and flags (a cached library never crosses CPUs)."""
    text = cpuinfo_text()
    if not text:
        return platform.machine() + platform.processor()
    wanted = [line for line in text.splitlines() if line.startswith(("model name", "flags", "Features"))]
    return "\n".join(dict.fromkeys(wanted)) + platform.machine()


def _cache_dir() -> Path:
    root = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(root) / "rsq" / "kernels"


def _compile(compiler: str, flags: list[str], target: Path) -> bool:
    target.parent.mkdir(parents=True, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=target.parent, prefix=".bn_act.", suffix=".so")
    os.close(fd)
    try:
        done = subprocess.run([compiler, *flags, "-o", tmp, str(SOURCE)], capture_output=True, text=True)
        if done.returncode != 0:
            return False
        os.replace(tmp, target)  # another process building the same file at once writes the same bytes
        return True
    finally:
        if os.path.exists(tmp):
            os.unlink(tmp)


def _build() -> Optional[ctypes.CDLL]:
    from ..runtime.native import find_compiler

    compiler = find_compiler()
    if compiler is None or not SOURCE.exists():
        _state["why_not"] = ("no C compiler found (install gcc or set CC)" if compiler is None
                             else f"{SOURCE} is missing")
        return None
    for flags in (["-O3", "-march=native", "-std=c99", "-fPIC", "-shared"], ["-O3", "-std=c99", "-fPIC", "-shared"]):
        parts = [SOURCE.read_bytes(), compiler.encode(), " ".join(flags).encode(), _cpu_signature().encode()]
        key = hashlib.sha256(b"\0".join(parts)).hexdigest()[:16]
        target = _cache_dir() / f"bn_act_{key}.so"
        try:
            if target.exists() or _compile(compiler, flags, target):
                return _declare(ctypes.CDLL(str(target)))
        except OSError:
            continue
    _state["why_not"] = f"{compiler} could not build it into {_cache_dir()} (not writable? set XDG_CACHE_HOME)"
    return None


def _declare(lib: ctypes.CDLL) -> ctypes.CDLL:
    p, n = ctypes.c_void_p, ctypes.c_int64
    lib.rsq_bn_max_channels.restype = ctypes.c_int
    lib.rsq_bn_sums.argtypes = [p, n, n, p, p]
    lib.rsq_bn_act_forward.argtypes = [p, p, n, n, p, p, p]
    lib.rsq_bn_relu_backward.argtypes = [p, p, n, n, p, p, p, p, p, p, p, p]
    lib.rsq_bn_add_relu_backward.argtypes = [p, p, p, n, n, p, p, p, p, p, p, p]
    for fn in (lib.rsq_bn_sums, lib.rsq_bn_act_forward, lib.rsq_bn_relu_backward, lib.rsq_bn_add_relu_backward):
        fn.restype = None
    return lib


def library() -> Optional[ctypes.CDLL]:
    """The built kernel library, building it on first use; None where it cannot be built."""
    if _state["library"] is None:
        with _build_lock:
            if _state["library"] is None:
                _state["library"] = _build() or False
    return _state["library"] or None


def _ptr(t: Optional[torch.Tensor]):
    return None if t is None else ctypes.c_void_p(t.data_ptr())


def _dense(t: torch.Tensor) -> bool:
    return (type(t) is torch.Tensor and t.device.type == "cpu" and t.dtype == torch.float32 and t.dim() == 4
            and t.is_contiguous(memory_format=torch.channels_last))


def _fusable(bn: nn.Module, x, relu: nn.Module, residual) -> Optional[nn.BatchNorm2d]:
    """The BatchNorm2d to run fused on ``x``, or None when the plain modules must run."""
    if not _state["enabled"] or not isinstance(x, torch.Tensor) or torch.compiler.is_compiling():
        return None
    if type(relu) is not nn.ReLU:  # a model whose activation was swapped (ReLU6, a quantizer) runs that module
        return None
    layer = bn.for_mode(bn.state.current.key) if isinstance(bn, SwitchableBatchNorm2d) else bn
    if type(layer) is not nn.BatchNorm2d or not (layer.training and layer.track_running_stats and layer.affine):
        return None
    if not _dense(x) or x.shape[1] > 4096 or x.numel() // x.shape[1] < 2:
        return None
    if residual is not None and not (_dense(residual) and residual.shape == x.shape):
        return None
    if torch.get_num_threads() != 1 or torch.is_autocast_enabled("cpu") or library() is None:
        return None
    return layer


def bn_relu(bn: nn.Module, x: torch.Tensor, relu: nn.Module, residual: Optional[torch.Tensor] = None) -> torch.Tensor:
    """``relu(bn(x))``, or ``relu(bn(x) + residual)``: one fused kernel where it applies, else these modules."""
    layer = _fusable(bn, x, relu, residual)
    if layer is None:
        out = bn(x)
        return relu(out if residual is None else out + residual)
    stats: list = []
    y = _BatchNormReLU.apply(x, residual, layer.weight, layer.bias, layer.eps, stats)
    _update_running_stats(layer, *stats)
    return y


@torch.no_grad()
def _update_running_stats(layer: nn.BatchNorm2d, mean: torch.Tensor, var: torch.Tensor, rows: int) -> None:
    """What BatchNorm2d's training forward does to its buffers (unbiased variance, momentum or cumulative)."""
    layer.num_batches_tracked.add_(1)
    factor = 1.0 / float(layer.num_batches_tracked) if layer.momentum is None else layer.momentum
    layer.running_mean.mul_(1 - factor).add_(mean.to(layer.running_mean.dtype), alpha=factor)
    unbiased = var * (rows / (rows - 1))
    layer.running_var.mul_(1 - factor).add_(unbiased.to(layer.running_var.dtype), alpha=factor)


class _BatchNormReLU(torch.autograd.Function):
    @staticmethod
    def forward(ctx, x, residual, weight, bias, eps, stats):
        lib = library()
        channels = x.shape[1]
        rows = x.numel() // channels
        sums, squares = torch.empty(channels, dtype=torch.float64), torch.empty(channels, dtype=torch.float64)
        lib.rsq_bn_sums(_ptr(x), rows, channels, _ptr(sums), _ptr(squares))
        mean = sums / rows
        var = (squares / rows - mean * mean).clamp_min(0)
        invstd = (var + eps).rsqrt()
        gain = weight.detach().double() * invstd
        scale, shift = gain.float(), (bias.detach().double() - mean * gain).float()
        y = torch.empty_like(x, memory_format=torch.channels_last)
        lib.rsq_bn_act_forward(_ptr(x), _ptr(residual), rows, channels, _ptr(scale), _ptr(shift), _ptr(y))
        mean32, invstd32 = mean.float(), invstd.float()
        ctx.save_for_backward(x, y if residual is not None else None, weight, mean32, invstd32, scale, shift)
        ctx.has_residual = residual is not None
        stats.extend([mean, var, rows])
        return y

    @staticmethod
    def backward(ctx, grad):
        lib = library()
        x, y, weight, mean, invstd, scale, shift = ctx.saved_tensors
        channels = x.shape[1]
        rows = x.numel() // channels
        grad = grad.contiguous(memory_format=torch.channels_last)
        gamma = weight.detach().float().contiguous()
        dx = torch.empty_like(x, memory_format=torch.channels_last)
        sum_g, sum_gx = torch.empty(channels, dtype=torch.float64), torch.empty(channels, dtype=torch.float64)
        d_residual = None
        if ctx.has_residual:
            d_residual = torch.empty_like(x, memory_format=torch.channels_last)
            lib.rsq_bn_add_relu_backward(_ptr(grad), _ptr(y), _ptr(x), rows, channels, _ptr(mean), _ptr(invstd),
                                         _ptr(gamma), _ptr(d_residual), _ptr(dx), _ptr(sum_g), _ptr(sum_gx))
        else:
            lib.rsq_bn_relu_backward(_ptr(grad), _ptr(x), rows, channels, _ptr(scale), _ptr(shift), _ptr(mean),
                                     _ptr(invstd), _ptr(gamma), _ptr(dx), _ptr(sum_g), _ptr(sum_gx))
        return dx, d_residual, sum_gx.to(weight.dtype), sum_g.to(weight.dtype), None, None
