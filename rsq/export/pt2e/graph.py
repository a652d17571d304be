"""Passes over the exported FX graph: finding rsq's layers in it, clamps for narrow grids, float layers
with their BN unfolded."""
from __future__ import annotations

from typing import Optional

import torch
from torch import nn

from .grids import LayerGrid, activation_qparams, container_range
from .xnnpack import xnnpack_weight_scale

GEMMS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
RELUS = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)
ADDS = (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)
MAX_POOLS = (torch.ops.aten.max_pool2d.default,)


def layer_of(node: torch.fx.Node) -> Optional[str]:
    """The module path of a conv / linear node, read from its weight's get_attr target."""
    if node.op != "call_function" or node.target not in GEMMS:
        return None
    weight = node.args[1]
    if weight.op != "get_attr" or not weight.target.endswith("weight"):
        return None
    return weight.target.rsplit(".", 1)[0] if "." in weight.target else ""


def _nonnegative(node: torch.fx.Node) -> bool:
    """Whether a value is >= 0 by construction: a ReLU's output, or a max pooling of one."""
    if node.op != "call_function":
        return False
    return node.target in RELUS or (node.target in MAX_POOLS and _nonnegative(node.args[0]))


def _requantized(node: torch.fx.Node, grids: dict[str, LayerGrid]) -> bool:
    """Whether a gemm's output (through at most one relu / hardtanh) only feeds a quantized layer input."""
    if len(node.users) != 1:
        return False
    user = next(iter(node.users))
    if user.op == "call_function" and user.target in RELUS + (torch.ops.aten.hardtanh.default,):
        if len(user.users) != 1:
            return False
        user = next(iter(user.users))
    name = layer_of(user)
    return name in grids and grids[name].act is not None and user.args[0] in (node,) + tuple(node.users)


def clamp_to_grids(model: torch.fx.GraphModule, grids: dict[str, LayerGrid],
                   dtype: torch.dtype = torch.uint8) -> torch.fx.GraphModule:
    """Put rsq's clip range in front of every activation grid narrower than its 8-bit container, as a
    float hardtanh.

    XNNPACK (and other int8 kernels) ignore a quantize op's quant_min/quant_max and clip only at
    the int8 limits, so a 4-bit grid would not clip at 15. The clamp keeps the values exact:
    clamp-then-round equals round-then-clamp for integer bounds. A ReLU whose only user is the
    quantized layer becomes the hardtanh itself, which XNNPACK fuses into the producing conv.
    In uint8 (x86) a grid read from a value >= 0 needs no clamp: with zero point 255 - Qp, uint8's
    saturation clips at Qp (LayerGrid.saturates), and no hardtanh runs beside Inductor's fused convs
    (a W4A4 ResNet-18 with quantized shortcuts: 120-131 ms -> 88-90 ms at 224 px, batch 32).
    """
    for node in list(model.graph.nodes):
        name = layer_of(node)
        if name is None or name not in grids or grids[name].act is None or grids[name].input_owner is not None:
            continue  # a downsample conv on a quantized shortcut reads what its conv1's clamp made
        act = grids[name].act
        _, _, low, high = activation_qparams(act, dtype)
        if (low, high) == container_range(dtype):
            continue
        step = float(act.step.detach())
        lo, hi = (-act.qn * step, act.qp * step) if act.signed else (0.0, act.qp * step)
        source = node.args[0]
        if dtype == torch.uint8 and not act.signed and _nonnegative(source):
            grids[name].saturates = True
            continue
        # On a quantized shortcut every reader of the block input (conv1, downsample, add) reads the clamp.
        only_reader = len(source.users) == 1 or grids[name].shortcut
        if source.op == "call_function" and source.target in RELUS and only_reader and not act.signed:
            source.target, source.args = torch.ops.aten.hardtanh.default, (source.args[0], lo, hi)
            continue
        with model.graph.inserting_after(source):
            clip = model.graph.call_function(torch.ops.aten.hardtanh.default, (source, lo, hi))
        clip.meta.update({k: v for k, v in source.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")})
        if grids[name].shortcut:
            source.replace_all_uses_with(clip, delete_user_cb=lambda user: user is not clip)
        else:
            node.replace_input_with(source, clip)
    model.graph.lint()
    model.recompile()
    return model


def int8_weighted(node: torch.fx.Node, grids: dict[str, LayerGrid], backend: str, int8_weights: bool) -> bool:
    """Whether a gemm of the exported graph gets int8 weights (else it keeps float ones)."""
    grid = grids[layer_of(node)]
    if grid.weight_scale is None or not int8_weights:
        return False
    return backend != "xnnpack" or (_requantized(node, grids) and xnnpack_weight_scale(grid) is not None)


@torch.no_grad()
def unfold_float_layers(model: torch.fx.GraphModule, grids: dict[str, LayerGrid],
                        int8_weights: bool) -> torch.fx.GraphModule:
    """Give every float-weight conv of an ExecuTorch program rsq's own weight, with its BN after it as a
    1x1 depthwise conv (per-channel gain as weights, shift as bias), instead of the weight with that
    resolution's BN folded in.

    ExecuTorch stores a constant once however many methods of a program use it, so each resolution's
    method then shares these weights with every other (as the int8 ones are shared: their integers
    are rsq's in every mode); folded, each method carried its own float32 copy. It is also the fake-quant
    model's own order of operations. XNNPACK runs the depthwise conv in one pass (a multiply and an add
    took two, 1.2x the batch-1 time of a ResNet-20); a linear gets the multiply and the add.
    """
    for node in list(model.graph.nodes):
        name = layer_of(node)
        if name is None or name not in grids or grids[name].unfolded is None:
            continue
        if int8_weighted(node, grids, "xnnpack", int8_weights):
            continue
        weight, gain, shift = grids[name].unfolded
        layer, channels, graph = model.get_submodule(name), weight.shape[0], model.graph
        layer.weight = nn.Parameter(weight.clone(), requires_grad=False)
        depthwise = weight.dim() == 4
        layer.register_buffer("bn_gain", gain.reshape((channels, 1, 1, 1) if depthwise else (channels,)).clone())
        layer.register_buffer("bn_shift", shift.reshape(channels).clone())
        node.args = (node.args[0], node.args[1], None) + tuple(node.args[3:])
        with graph.inserting_after(node):
            gain_node = graph.get_attr(f"{name}.bn_gain")
        with graph.inserting_after(gain_node):
            shift_node = graph.get_attr(f"{name}.bn_shift")
        with graph.inserting_after(shift_node):
            if depthwise:
                added = [graph.call_function(torch.ops.aten.conv2d.default, (
                    node, gain_node, shift_node, [1, 1], [0, 0], [1, 1], channels))]
            else:
                scaled = graph.call_function(torch.ops.aten.mul.Tensor, (node, gain_node))
                added = [scaled, graph.call_function(torch.ops.aten.add.Tensor, (scaled, shift_node))]
        node.replace_all_uses_with(added[-1], delete_user_cb=lambda user: user is not added[0])
        gain_node.meta["val"], shift_node.meta["val"] = layer.bn_gain, layer.bn_shift
        for new in added:
            new.meta.update({k: v for k, v in node.meta.items() if k in ("val", "tensor_meta", "nn_module_stack")})
    model.graph.lint()
    model.recompile()
    return model
