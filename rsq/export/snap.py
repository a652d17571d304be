"""``snap_biases(model)``: move each BatchNorm's shift so that its conv's folded bias lies on the grid that
onnxruntime's and XNNPACK's int8 convs hold.

Those kernels add an int32 bias in accumulator units and requantize in float32 (docs/export.md section 8c).
rsq's lowering keeps up to 16 fraction bits of the folded bias, more than any such kernel holds, so their
graphs differ from rsq.runtime by a fraction of an accumulator unit per channel, and on models whose
activations are all 8-bit or narrower that alone costs about 1 % top-1 agreement
(tools/results/probe_kernel_bias.md). Snapping changes the model instead of the kernels: in every mode,
each conv with a narrow output (the ones whose requantization the kernels can reproduce) gets the BN
shift that puts its folded bias on the kernel's grid, the nearest one, at most half a kernel accumulator
unit away. The fake-quant model, rsq.runtime and the int8 graphs then compute the same thing.
`rsq export` snaps the model it exports (and stores that model as the export's checkpoint.pt).
"""
from __future__ import annotations

import math

import numpy as np
import torch
from torch import nn

from ..convert import mode_state
from ..nn.switchable_bn import SwitchableBatchNorm2d
from .steps import act_quantizer, bn_affine


def kernel_bias_bits(weights: np.ndarray, weight_bits: int, input_bits: int) -> int:
    """Fraction bits of bias an int8 kernel holds: the bits its weights can move left inside int8.

    The QLinear writer's shift (qlinear.layer_weight_shift: 8 - bits, none for 8-bit weights or 8-bit
    inputs), at most as many as keep every integer and its negation (a negative BN gain, which XNNPACK's
    per-channel shift folds in) inside int8.
    """
    from .qlinear import layer_weight_shift

    shift = layer_weight_shift(weight_bits, input_bits)
    if not shift:
        return 0
    largest = max(int(np.abs(weights.astype(np.int64)).max()), 1)
    return max(0, min(shift, int(math.floor(math.log2(127 / largest)))))


@torch.no_grad()
def snap_biases(model: nn.Module) -> dict:
    """Snap the BN shifts of ``model`` (a quantized LSQ RS-Net, in place) at every resolution, at the bit width it
    is switched to; returns {"convs": how many convs, "largest_move": the largest move in kernel accumulator
    units (at most 0.5)}."""
    from .lower import prepared_lowering

    lowering = prepared_lowering(model)
    state = mode_state(model)
    convs, largest = 0, 0.0
    for op in lowering.float_ops:
        if op.kind != "conv" or op.bn is None or lowering.tensors[op.output].kind != "narrow":
            continue
        weight = lowering.weights[op.name]
        bits = kernel_bias_bits(weight.values, weight.bits, lowering.tensors[lowering.int_input[op.name]].bits)
        convs += 1
        for r in state.resolutions:
            key = state.find(r).key
            bn = op.bn.for_mode(key) if isinstance(op.bn, SwitchableBatchNorm2d) else op.bn
            if bn.bias is None:
                continue  # a BN without affine parameters: no shift to move
            step_in = float(act_quantizer(op.module, op.name, key).step.detach().double().item())
            gain, shift = bn_affine(op.bn, key, len(weight.step))
            unit = step_in * weight.step.astype(np.float64) * gain / 2.0 ** bits  # real value of one kernel unit
            if op.module.bias is not None:
                shift = shift + gain * op.module.bias.detach().double().numpy()
            move = np.rint(shift / unit) * unit - shift
            largest = max(largest, float(np.abs(move / unit).max()))
            bn.bias.add_(torch.from_numpy(move).to(bn.bias.dtype))
    return {"convs": convs, "largest_move": largest}
