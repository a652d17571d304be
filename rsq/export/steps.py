"""Reading a fake-quant layer's LSQ grids and BN for one mode, with clear errors for the rest."""
from __future__ import annotations

import numpy as np
import torch
from torch import nn

from ..errors import RsqError
from ..nn.quantizers import FULL_PRECISION, LQNetQuantizer, LSQQuantizer, SwitchableQuantizer, quantizer_in_mode
from ..nn.switchable_bn import SwitchableBatchNorm2d


def _lsq(quantizer: nn.Module, layer: str, role: str) -> LSQQuantizer:
    if isinstance(quantizer, LQNetQuantizer):
        raise RsqError(f"layer {layer} uses LQ-Nets ({role}): its levels are not a uniform grid, so it has no "
                       f"integer form; integer export needs the lsq quantizer")
    if not isinstance(quantizer, LSQQuantizer) or quantizer.bits == FULL_PRECISION:
        raise RsqError(f"layer {layer} has full-precision {role} (first_last=fp?); integer export needs every "
                       f"conv and linear quantized (first_last 8 or same)")
    if not bool(quantizer.initialized):
        raise RsqError(f"layer {layer}: its {role} quantizer was never initialised (an untrained model)")
    return quantizer


def grid_quantizer(quantizer: nn.Module, name: str, mode_key: str) -> LSQQuantizer:
    """The LSQ quantizer that activation ``quantizer`` (of layer or quantize op ``name``) is in mode ``mode_key``."""
    return _lsq(quantizer_in_mode(quantizer, mode_key), name, "activation")


def act_quantizer(layer: nn.Module, name: str, mode_key: str) -> LSQQuantizer:
    """The LSQ quantizer that layer ``name`` applies to its input in mode ``mode_key``."""
    return grid_quantizer(layer.act_quantizer, name, mode_key)


def weight_quantizer(layer: nn.Module, name: str) -> LSQQuantizer:
    quantizer = layer.weight_quantizer
    if isinstance(quantizer, SwitchableQuantizer):
        if not quantizer.per_bits:
            raise RsqError(f"layer {name} has one weight quantizer per resolution; integer export shares one "
                           f"weight copy")
        quantizer = quantizer.active()  # a joint model: the bit width it is switched to
    quantizer = _lsq(quantizer, name, "weight")
    if not quantizer.signed or not quantizer.per_channel:
        raise RsqError(f"layer {name}: weights must be signed and per output channel")
    return quantizer


@torch.no_grad()
def integer_weight(layer: nn.Module, name: str) -> tuple[np.ndarray, np.ndarray, int]:
    """(int8 weights, float32 step per output channel, bits): exactly the grid the fake quantizer uses."""
    quantizer = weight_quantizer(layer, name)
    step = quantizer.step.detach().float()
    # The same ops as the fake quantizer's forward: divide, clamp, round (float32).
    q = torch.div(layer.weight.detach().float(), step).clamp_(-quantizer.qn, quantizer.qp).round_()
    return q.to(torch.int8).numpy(), step.reshape(-1).numpy().copy(), quantizer.bits


def bn_affine(bn: nn.Module, mode_key: str, channels: int) -> tuple[np.ndarray, np.ndarray]:
    """(scale, shift) of an eval-mode BN as float64: y = scale * x + shift; identity without a BN."""
    if bn is None:
        return np.ones(channels), np.zeros(channels)
    if isinstance(bn, SwitchableBatchNorm2d):
        bn = bn.for_mode(mode_key)
    if bn.running_mean is None or bn.running_var is None:
        raise RsqError("integer export needs BatchNorm running statistics (track_running_stats=True)")
    mean = bn.running_mean.double().numpy()
    sigma = np.sqrt(bn.running_var.double().numpy() + bn.eps)
    gamma = bn.weight.detach().double().numpy() if bn.weight is not None else np.ones(channels)
    beta = bn.bias.detach().double().numpy() if bn.bias is not None else np.zeros(channels)
    return gamma / sigma, beta - gamma * mean / sigma
