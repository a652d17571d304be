"""Fake quantizers: LSQ (learned step size), LQ-Nets (learned basis), and one-per-mode switching.

Convention for both quantizers: ``per_channel=True`` is a weight quantizer (one step or basis
per output channel, dim 0); ``per_channel=False`` is an activation quantizer (one per tensor,
batch in dim 0). ``bits=32`` means off: the module is the identity and holds no state.

A quantizer initialises itself at its first forward in training mode. Before that, in eval
mode, it passes values through unchanged, so a dummy forward (cost counting, shape tracing)
never initialises a step from a meaningless input.
"""
from __future__ import annotations

import copy
import math
import warnings
from typing import Callable, Optional

import numpy as np
import torch
import torch.distributed as dist
from torch import nn

from ..errors import choices_error
from .mode import Mode, ModeState

FULL_PRECISION = 32


class QuantizationWarning(UserWarning):
    """Something quantization did other than asked: a layer left in full precision, a skipped update."""


VALID_BITS = (2, 3, 4, 5, 6, 7, 8, FULL_PRECISION)


def check_bits(bits, what: str = "bits") -> int:
    """``bits`` if it is one of VALID_BITS, else an RsqError naming the choices."""
    if isinstance(bits, bool) or not isinstance(bits, int) or bits not in VALID_BITS:
        raise choices_error(what, bits, VALID_BITS)
    return bits


def integer_range(bits: int, signed: bool) -> tuple[int, int]:
    """(Qn, Qp): the grid is the integers -Qn..Qp."""
    return (2 ** (bits - 1), 2 ** (bits - 1) - 1) if signed else (0, 2**bits - 1)


def _mark_no_weight_decay(module: nn.Module) -> None:
    # Read by the trainer's param groups. Set again after unpickling/deepcopy, because
    # Parameter.__deepcopy__ drops Python attributes.
    for p in module.parameters(recurse=False):
        p._rsq_no_weight_decay = True


def _mean_across_ranks(value: torch.Tensor) -> torch.Tensor:
    # Activation inits come from each rank's own batch; DDP would otherwise keep them different.
    if dist.is_available() and dist.is_initialized():
        dist.all_reduce(value)
        value /= dist.get_world_size()
    return value


def _f32_below(value: float) -> float:
    """The largest float32 < value that is a normal number (denormals may be flushed to 0)."""
    below = float(np.nextafter(np.float32(value), np.float32(-np.inf)))
    tiny = float(np.finfo(np.float32).tiny)
    return -tiny if -tiny < below <= 0.0 else below


def _f32_above(value: float) -> float:
    return -_f32_below(-value)


def pass_between(grad: torch.Tensor, x: torch.Tensor, low: float, high: float) -> torch.Tensor:
    """grad where low <= x <= high, else 0, in one fused pass.

    hardtanh_backward zeroes x <= min or x >= max (exclusive); moving both bounds one float32
    step outwards makes the range inclusive, as the LSQ and LQ-Nets formulas state.
    """
    return torch.ops.aten.hardtanh_backward(grad, x, _f32_below(low), _f32_above(high))


def _flat(t: torch.Tensor) -> Optional[torch.Tensor]:
    if t.is_contiguous():
        return t.view(-1)
    if t.dim() == 4 and t.is_contiguous(memory_format=torch.channels_last):
        return t.permute(0, 2, 3, 1).reshape(-1)  # a view: NHWC order is the memory order
    return None


def _dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """sum(a * b) without a temporary when both share one dense layout (BLAS dot).

    On the CPU a bf16/fp16 dot has no BLAS kernel: under `--amp bf16` it took two thirds of a W4A4
    step (1.35 s of 2.0 s, one thread). There the factors go to float32 first: two cheap passes, and
    the step's gradient is summed and returned in float32.
    """
    if a.device.type == "cpu" and a.dtype in (torch.bfloat16, torch.float16):
        a, b = a.float(), b.float()
    if a.stride() == b.stride():
        fa, fb = _flat(a), _flat(b)
        if fa is not None and fb is not None:
            return torch.dot(fa, fb)
    return (a * b).sum()


class _LSQFakeQuant(torch.autograd.Function):
    """LSQ forward and both gradients in as few memory passes as eager PyTorch allows.

    The per-tensor case (activations, the expensive one) saves only x and the output, which
    the neighbouring layers keep alive anyway, and uses
    sum(g * (q - v * inside)) = (dot(g, out) - dot(g_x, x)) / s.
    """

    @staticmethod
    def forward(ctx, x, step, qn: int, qp: int, grad_scale: float):
        # clamp before round: the same values as round-then-clamp (integer bounds) and the
        # range test below is then on v itself, as the formula states.
        v = torch.div(x, step).clamp_(-qn, qp)
        ctx.qn, ctx.qp, ctx.grad_scale = qn, qp, grad_scale
        if step.numel() == 1:
            out = v.round_().mul_(step)
            ctx.save_for_backward(x, out, step)
            return out
        q = v.round()
        ctx.save_for_backward(x, q, step)
        return q * step

    @staticmethod
    def backward(ctx, grad):
        x, saved, step = ctx.saved_tensors
        qn, qp, g = ctx.qn, ctx.qp, ctx.grad_scale
        if step.numel() == 1:
            s = step.item()
            grad_x = pass_between(grad, x, -qn * s, qp * s)
            grad_step = (_dot(grad, saved) - _dot(grad_x, x)) / step * g
            return grad_x, grad_step.reshape(step.shape), None, None, None
        v = x / step
        inside = (v >= -qn) & (v <= qp)
        grad_x = grad * inside
        grad_step = (grad * (saved - v * inside)).sum_to_size(step.shape) * g
        return grad_x, grad_step, None, None, None


def round_ste(x: torch.Tensor) -> torch.Tensor:
    return (x.round() - x).detach() + x


def lsq_reference(x: torch.Tensor, step: torch.Tensor, qn: int, qp: int, grad_scale: float) -> torch.Tensor:
    """LSQ written with plain autograd ops: what torch.compile traces, and the tests' oracle."""
    # Forward value exactly `step` (so range tests at the boundaries agree), gradient times g.
    scaled = step * grad_scale
    step = step.detach() + (scaled - scaled.detach())
    v = x / step
    # Not torch.clamp: its gradient excludes the bounds, the formula includes them.
    v = torch.where((v >= -qn) & (v <= qp), v, v.detach().clamp(-qn, qp))
    return round_ste(v) * step


class _LazyInit(nn.Module):
    """A quantizer whose parameters come from the first batch it sees in training (``initialize_``);
    ``initialized`` (a buffer) records that in checkpoints, ``_ready`` caches it between forwards."""

    def _check_ready(self, x: torch.Tensor) -> bool:
        if bool(self.initialized):
            self._ready = True
        elif self.training:
            self.initialize_(x)
        return self._ready


class LSQQuantizer(_LazyInit):
    """Learned step size quantization (Esser et al. 2020); docs/methods.md §2."""

    def __init__(self, bits: int, signed: bool, per_channel: bool, channels: int = 1, ndim: int = 4):
        super().__init__()
        self.bits = check_bits(bits)
        self.signed = bool(signed)
        self.per_channel = bool(per_channel)
        self.qn, self.qp = integer_range(self.bits, self.signed)
        self._ready = False
        if self.bits == FULL_PRECISION:
            return
        shape = (channels,) + (1,) * (ndim - 1) if per_channel else ()
        self.step = nn.Parameter(torch.ones(shape))
        self.register_buffer("initialized", torch.tensor(False))
        _mark_no_weight_decay(self)

    @torch.no_grad()
    def initialize_(self, x: torch.Tensor) -> bool:
        """s = 2 mean|x| / sqrt(Qp) (per output channel for weights); False if x is all zeros."""
        if self.per_channel:
            mean_abs = x.detach().abs().reshape(x.shape[0], -1).mean(1).clamp_min_(1e-8)
        else:
            mean_abs = x.detach().abs().mean()
            if mean_abs.item() == 0.0:
                return False
        init = _mean_across_ranks(2 * mean_abs.float() / math.sqrt(self.qp))
        self.step.copy_(init.reshape(self.step.shape))
        self.initialized.fill_(True)
        self._ready = True
        return True

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == FULL_PRECISION or (not self._ready and not self._check_ready(x)):
            return x
        # N: values sharing one step (elements of one channel, or of one sample).
        n = x.numel() // x.shape[0]
        grad_scale = 1.0 / math.sqrt(n * self.qp)
        if torch.compiler.is_compiling():
            return lsq_reference(x, self.step, self.qn, self.qp, grad_scale)
        return _LSQFakeQuant.apply(x, self.step, self.qn, self.qp, grad_scale)

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._ready = False  # re-read `initialized` from what was loaded

    def __setstate__(self, state):
        super().__setstate__(state)
        _mark_no_weight_decay(self)

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, per_channel={self.per_channel}"


class _SnapToLevels(torch.autograd.Function):
    """Forward: the given quantized values; backward: straight through inside [low, high]."""

    @staticmethod
    def forward(ctx, x, quantized, low: float, high: float):
        ctx.low, ctx.high = low, high
        ctx.save_for_backward(x)
        return quantized

    @staticmethod
    def backward(ctx, grad):
        if math.isinf(ctx.low) and math.isinf(ctx.high):
            return grad, None, None, None
        (x,) = ctx.saved_tensors
        return pass_between(grad, x, ctx.low, ctx.high), None, None, None


def _all_codes(bits: int, signed: bool) -> torch.Tensor:
    """Every code e in E^K as rows: E = {-1, +1} when signed, else {0, 1}."""
    index = torch.arange(2**bits).unsqueeze(1)
    code = ((index >> torch.arange(bits)) & 1).float()
    return 2 * code - 1 if signed else code


class LQNetQuantizer(_LazyInit):
    """LQ-Nets (Zhang et al. 2018): levels v.e for a basis v trained by QEM; docs/methods.md §3.

    Signed quantizers (all weights; activations that can be negative) use E = {-1, +1},
    unsigned activations E = {0, 1}. Weights get an identity straight-through gradient,
    activations one that passes only between the lowest and the top level.
    """

    def __init__(self, bits: int, signed: bool, per_channel: bool, channels: int = 1, momentum: float = 0.9):
        super().__init__()
        self.bits = check_bits(bits)
        self.signed = bool(signed)
        self.per_channel = bool(per_channel)
        self.momentum = momentum
        self._ready = False
        if self.bits == FULL_PRECISION:
            return
        rows = channels if per_channel else 1
        self.register_buffer("codes", _all_codes(self.bits, self.signed), persistent=False)
        self.register_buffer("basis", torch.zeros(rows, self.bits))
        self.register_buffer("initialized", torch.tensor(False))
        self.register_buffer("skipped_solves", torch.zeros((), dtype=torch.long))

    @torch.no_grad()
    def initialize_(self, x: torch.Tensor) -> bool:
        """Uniform levels: basis c * 2^i, c from mean|x| as in LSQ's init; False if x is all 0."""
        rows = self.basis.shape[0]
        mean_abs = x.detach().abs().reshape(rows, -1).mean(1).float()
        if not self.per_channel and mean_abs.item() == 0.0:
            return False
        # Signed levels are c * odd integers (spacing 2c), unsigned ones c * 0..2^K-1.
        scale = 1 / math.sqrt(2 ** (self.bits - 1)) if self.signed else 2 / math.sqrt(2**self.bits - 1)
        c = _mean_across_ranks(mean_abs.clamp_min(1e-8) * scale)
        powers = 2.0 ** torch.arange(self.bits, device=x.device)
        self.basis.copy_(c.unsqueeze(1) * powers)
        self.initialized.fill_(True)
        self._ready = True
        return True

    def _sorted_levels(self) -> tuple[torch.Tensor, torch.Tensor]:
        levels, order = (self.basis @ self.codes.T).sort(dim=1)  # [rows, 2^K]
        return levels, self.codes[order]  # codes[order]: [rows, 2^K, K], matching the levels

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.bits == FULL_PRECISION or (not self._ready and not self._check_ready(x)):
            return x
        with torch.no_grad():
            levels, codes = self._sorted_levels()
            mids = (levels[:, 1:] + levels[:, :-1]) / 2
            if self.per_channel:
                index = torch.searchsorted(mids, x.detach().reshape(x.shape[0], -1).contiguous())
                quantized = levels.gather(1, index).view_as(x)
            else:
                index = torch.bucketize(x.detach(), mids[0])
                quantized = levels[0][index]
            if self.training:
                self._qem_update(x.detach(), index, codes)
        if self.per_channel:
            low, high = -math.inf, math.inf
        else:
            low = levels[0, 0].item() if self.signed else -math.inf
            high = levels[0, -1].item()
        return _SnapToLevels.apply(x, quantized, low, high)

    def _qem_update(self, x: torch.Tensor, index: torch.Tensor, codes: torch.Tensor) -> None:
        """v <- m v + (1 - m) argmin ||B v - x||, with B^T B and B^T x from per-level sums."""
        rows, levels = codes.shape[0], codes.shape[1]
        flat_index = index.reshape(rows, -1)
        offset = torch.arange(rows, device=x.device).unsqueeze(1) * levels
        slots = (flat_index + offset).reshape(-1)
        counts = torch.bincount(slots, minlength=rows * levels).view(rows, levels).float()
        sums = torch.bincount(slots, weights=x.reshape(-1).float(), minlength=rows * levels).view(rows, levels)
        btb = torch.einsum("rm,rmk,rml->rkl", counts, codes, codes)
        btx = torch.einsum("rm,rmk->rk", sums, codes)
        # A tiny ridge towards the current basis keeps a component that no value used
        # (an all-zero column of B) where it is instead of collapsing it to 0.
        ridge = 1e-6 * btb.diagonal(dim1=1, dim2=2).mean(1).clamp_min(1e-12)
        eye = torch.eye(self.bits, device=x.device)
        lhs = btb + ridge.view(rows, 1, 1) * eye
        rhs = btx + ridge.view(rows, 1) * self.basis
        fitted = torch.linalg.solve(lhs, rhs)
        if torch.isfinite(fitted).all():
            self.basis.mul_(self.momentum).add_((1 - self.momentum) * fitted)
            return
        # The basis is kept as it was; the count goes into the checkpoint, and the first skip is said.
        self.skipped_solves += 1
        if int(self.skipped_solves) == 1:
            warnings.warn(f"LQ-Nets QEM solve was not finite and was skipped (basis kept); "
                          f"{self.extra_repr()}; later skips are counted in its 'skipped_solves' buffer",
                          QuantizationWarning, stacklevel=2)

    def _load_from_state_dict(self, state_dict, prefix, *args, **kwargs):
        # Checkpoints written before the counter existed start it at 0.
        if self.bits != FULL_PRECISION:
            state_dict.setdefault(prefix + "skipped_solves", torch.zeros((), dtype=torch.long))
        super()._load_from_state_dict(state_dict, prefix, *args, **kwargs)
        self._ready = False

    def extra_repr(self) -> str:
        return f"bits={self.bits}, signed={self.signed}, per_channel={self.per_channel}"


def quantizer_in_mode(quantizer: nn.Module, key: str) -> nn.Module:
    """The quantizer a layer runs in mode ``key``: a SwitchableQuantizer's own one, any other as it is."""
    return quantizer.for_mode(key) if isinstance(quantizer, SwitchableQuantizer) else quantizer


class SwitchableQuantizer(nn.Module):
    """One quantizer per mode, or per bit width, chosen by the shared :class:`ModeState` (like the BNs).

    ``per_bits=True`` (a model that switches bit widths): one quantizer per bit width, shared by
    every resolution, as rsq shares quantizers across resolutions. ``per_bits=False``: one per
    mode, i.e. per resolution (and bit width). ``make(bits)`` builds one for a mode's bit width
    (None in a model that switches resolution only).
    """

    def __init__(self, state: ModeState, make: Callable[[Optional[int]], nn.Module], per_bits: bool = False):
        super().__init__()
        self.state, self.per_bits = state, per_bits
        wanted = {self._key(m): m.bits for m in state.modes}
        self.quantizers = nn.ModuleDict({key: make(bits) for key, bits in wanted.items()})

    def _key(self, mode: Mode) -> str:
        return f"b{mode.bits}" if self.per_bits else mode.key

    def active(self) -> nn.Module:
        return self.quantizers[self._key(self.state.current)]

    @property
    def bits(self) -> int:
        return self.active().bits

    @property
    def signed(self) -> bool:
        return self.active().signed

    def add_mode(self, mode: Mode, like: Mode) -> None:
        """Give ``mode`` its quantizer: per bit width it has one already; per mode, a copy of ``like``'s."""
        if not self.per_bits:
            self.quantizers[mode.key] = copy.deepcopy(self.quantizers[like.key])

    def for_mode(self, key: str) -> nn.Module:
        """The quantizer that mode ``key`` runs (every switchable layer has this method)."""
        return self.quantizers[self._key(self.state.for_key(key))]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.active()(x)

    def extra_repr(self) -> str:
        return f"{'bits' if self.per_bits else 'modes'}={list(self.quantizers.keys())}"
