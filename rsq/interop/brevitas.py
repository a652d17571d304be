"""One resolution of a trained RS-Net as the equivalent brevitas model, and its QONNX export.

``to_brevitas(model, resolution)`` swaps every fake-quantized conv/linear for a brevitas
``QuantConv2d``/``QuantLinear`` whose weight and input quantizers carry rsq's learned LSQ steps
(a learned-scale parameter, so the result can be trained further; sign included, see
_quantizer_classes), with the same integer range (signed weights -2^(b-1)..2^(b-1)-1, unsigned
inputs after a ReLU 0..2^b-1) and the same half-to-even rounding; each SwitchableBatchNorm2d
becomes that resolution's own BatchNorm2d. A block with a quantized shortcut (rsq/nn/residual.py) gets a
brevitas QuantIdentity on its input with conv1's step, so its shortcut adds the quantized tensor too
(conv1's own input quantizer then leaves those values as they are).
The brevitas model computes what rsq's model computes at that resolution (a test checks it).
brevitas's ``export_qonnx`` then writes QONNX with the true bit widths, which FINN reads.
"""
from __future__ import annotations

import contextlib
import copy
import io
from pathlib import Path

import numpy as np
import torch
from torch import nn

from ..convert import mode_state
from ..deps import require
from ..errors import RsqError
from ..nn import LQNetQuantizer, QuantConv2d, QuantLinear, SwitchableBatchNorm2d
from ..nn.quantizers import FULL_PRECISION, quantizer_in_mode
from ..nn.residual import has_quantized_input, plain_class, quantized_input_class, refuse_residual_grids


class _StepIsTheScale(nn.Module):
    """brevitas divides its learned value by this (by default the largest integer, so that the value
    is a threshold); 1 makes the learned value the step itself, which carries rsq's step to the bit."""

    def __init__(self):  # brevitas's injector builds it from the signature: no *args/**kwargs
        super().__init__()

    def forward(self, bit_width: torch.Tensor, signed=None) -> torch.Tensor:
        return torch.ones_like(bit_width)


def _quantizer_classes():
    """brevitas quantizers with a learned (parameter) scale that rsq's step initialises, sign included.

    LSQ can drive a weight step below zero (a short W4A4 run does, in a channel of its first conv).
    rsq keeps computing s * round(clamp(w / s, -Qn, Qp)): the usual integers times a negative step.
    brevitas's default scale is |value| (FloatRestrictValue, at init and in every forward), which
    mirrors that channel's grid from |s| * [-Qp, Qn] to |s| * [-Qn, Qp] and so moves each weight at
    the grid's edge by one step (qonnx then agreed with rsq on 92-97% of top-1s). Signed scales
    keep rsq's numbers; the integers, and so the bit widths, stay the same (FINN folds a weight
    scale into a Mul after the conv, sign and all).
    """
    scaled_int = require("brevitas.quant.scaled_int", "the brevitas bridge (QONNX export)", "brevitas")
    restrict_val = require("brevitas.core.restrict_val", "the brevitas bridge (QONNX export)", "brevitas")

    class RsqWeightQuant(scaled_int.Int8WeightPerChannelFloat):
        scaling_impl_type = "parameter"
        int_scaling_impl = _StepIsTheScale
        restrict_scaling_impl = restrict_val.SignedFloatRestrictValue
        narrow_range = False  # LSQ's signed grid keeps -2^(b-1)

    class RsqSignedActQuant(scaled_int.Int8ActPerTensorFloat):
        scaling_impl_type = "parameter"
        int_scaling_impl = _StepIsTheScale
        restrict_scaling_impl = restrict_val.SignedFloatRestrictValue
        narrow_range = False

    class RsqUnsignedActQuant(scaled_int.Uint8ActPerTensorFloat):
        scaling_impl_type = "parameter"
        int_scaling_impl = _StepIsTheScale
        restrict_scaling_impl = restrict_val.SignedFloatRestrictValue

    return RsqWeightQuant, RsqSignedActQuant, RsqUnsignedActQuant


def _quant_kwargs(weight_q: nn.Module, act_q: nn.Module, name: str) -> dict:
    weight_cls, signed_cls, unsigned_cls = _quantizer_classes()
    kwargs = {"weight_quant": None, "input_quant": None}
    for q in (weight_q, act_q):
        if isinstance(q, LQNetQuantizer) and q.bits != FULL_PRECISION:
            raise RsqError(f"layer {name} uses LQ-Nets (non-uniform levels); brevitas and QONNX need a uniform "
                           f"grid: train with --quantizer lsq")
    if getattr(weight_q, "bits", FULL_PRECISION) != FULL_PRECISION:
        kwargs.update(weight_quant=weight_cls, weight_bit_width=weight_q.bits,
                      weight_scaling_init=weight_q.step.detach().clone())
    if getattr(act_q, "bits", FULL_PRECISION) != FULL_PRECISION:
        kwargs.update(input_quant=signed_cls if act_q.signed else unsigned_cls, input_bit_width=act_q.bits,
                      input_scaling_init=act_q.step.detach().clone())
    return kwargs


def _brevitas_layer(layer: nn.Module, key: str, name: str) -> nn.Module:
    qnn = require("brevitas.nn", "the brevitas bridge (QONNX export)", "brevitas")
    kwargs = _quant_kwargs(quantizer_in_mode(layer.weight_quantizer, key),
                           quantizer_in_mode(layer.act_quantizer, key), name)
    has_bias = layer.bias is not None
    if isinstance(layer, QuantConv2d):
        if layer.padding_mode != "zeros":
            raise RsqError(f"layer {name}: padding mode {layer.padding_mode!r} has no brevitas equivalent here")
        new = qnn.QuantConv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                              layer.dilation, layer.groups, bias=has_bias, **kwargs)
    else:
        new = qnn.QuantLinear(layer.in_features, layer.out_features, bias=has_bias, **kwargs)
    with torch.no_grad():
        new.weight.copy_(layer.weight)
        if has_bias:
            new.bias.copy_(layer.bias)
    return new


def _shortcut_quant(quantizer: nn.Module, name: str) -> nn.Module:
    """A brevitas QuantIdentity on rsq's grid ``quantizer`` (LSQ, one mode)."""
    qnn = require("brevitas.nn", "the brevitas bridge (QONNX export)", "brevitas")
    kwargs = _quant_kwargs(nn.Identity(), quantizer, name)
    if kwargs["input_quant"] is None:
        return nn.Identity()
    return qnn.QuantIdentity(act_quant=kwargs["input_quant"], bit_width=kwargs["input_bit_width"],
                             scaling_init=kwargs["input_scaling_init"], return_quant_tensor=False)


def to_brevitas(model: nn.Module, resolution: int) -> nn.Module:
    """The brevitas equivalent of ``model`` at ``resolution`` (a new model in eval mode; ``model`` is unchanged)."""
    key = mode_state(model).find(resolution).key
    if not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in model.modules()):
        raise RsqError("the model is not quantized (a full-precision checkpoint); brevitas export needs --bits")
    refuse_residual_grids(model, "the brevitas bridge")
    twin = copy.deepcopy(model)
    for name, block in list(twin.named_modules()):
        if has_quantized_input(block):
            shortcut_quant = _shortcut_quant(quantizer_in_mode(block.input_quantizer, key), f"{name}.input")
            block.__class__ = quantized_input_class(plain_class(block), via="shortcut_quant")
            block.shortcut_quant = shortcut_quant

    def swap(parent: nn.Module, prefix: str) -> None:
        for name, child in parent.named_children():
            path = f"{prefix}{name}"
            if isinstance(child, SwitchableBatchNorm2d):
                setattr(parent, name, child.bns[key])
            elif isinstance(child, (QuantConv2d, QuantLinear)):
                setattr(parent, name, _brevitas_layer(child, key, path))
            elif isinstance(child, (nn.Conv2d, nn.Linear)):
                raise RsqError(f"layer {path} ({type(child).__name__}) was left in full precision by quantize_; "
                               f"the brevitas bridge converts only rsq's quantized layers")
            else:
                swap(child, path + ".")

    swap(twin, "")
    # The RS-Net's input-size hook and mode state are of no use to a one-resolution model.
    twin._forward_pre_hooks.clear()
    for attr in [a for a in vars(twin) if a.startswith("_rsq")]:
        delattr(twin, attr)
    return twin.eval()


def write_qonnx(model: nn.Module, resolution: int, in_chans: int, path) -> Path:
    """QONNX of ``model`` at ``resolution`` through brevitas's exporter (bit widths kept: 2, 4, 8)."""
    export = require("brevitas.export", "QONNX export", "brevitas")
    require("onnxoptimizer", "brevitas's QONNX export", "onnxoptimizer")
    path = Path(path)
    brevitas_model = to_brevitas(model, resolution)
    example = torch.zeros(1, in_chans, resolution, resolution)
    with contextlib.redirect_stdout(io.StringIO()):  # torch.onnx's progress lines, one set per graph
        export.export_qonnx(brevitas_model, input_t=example, export_path=str(path))
    return path


def qonnx_cost(path) -> dict:
    """qonnx's inference cost of a QONNX file: {"macs", "bitops", "layers": {node: (macs, bitops)}}.

    Zero weights are counted like any other (rsq's MACs and BitOPs do not discount sparsity).
    """
    cost_module = require("qonnx.util.inference_cost", "the QONNX cost check", "qonnx")
    cost = cost_module.inference_cost(str(path), discount_sparsity=False, cost_breakdown=True)
    layers = {name: (c["total_macs"], c["total_bops"]) for name, c in cost["node_cost"].items()
              if c.get("total_macs")}
    return {"macs": cost["total_cost"]["total_macs"], "bitops": cost["total_cost"]["total_bops"], "layers": layers}


class QonnxRunner:
    """A QONNX file run by qonnx's reference executor (node by node, in numpy): loaded and cleaned once."""

    def __init__(self, path):
        wrapper = require("qonnx.core.modelwrapper", "running QONNX", "qonnx").ModelWrapper
        cleanup = require("qonnx.util.cleanup", "running QONNX", "qonnx").cleanup_model
        self.execute = require("qonnx.core.onnx_exec", "running QONNX", "qonnx").execute_onnx
        self.graph = cleanup(wrapper(str(path)))
        self.name_in, self.name_out = self.graph.graph.input[0].name, self.graph.graph.output[0].name

    def __call__(self, x: np.ndarray) -> np.ndarray:
        """Logits for an NCHW batch, one image at a time (the graph was exported at batch 1)."""
        return np.concatenate([self.execute(self.graph, {self.name_in: x[i:i + 1]})[self.name_out]
                               for i in range(len(x))])
