"""The float model PT2E exports: one resolution of an RS-Net with BN folded and weights on rsq's grids."""
from __future__ import annotations

import copy
from typing import Optional

import torch
from torch import nn

from ...convert import mode_state, using_mode
from ...errors import RsqError
from ...nn.quant_layers import QuantConv2d, QuantLinear
from ...nn.quantizers import FULL_PRECISION, LQNetQuantizer, LSQQuantizer, quantizer_in_mode
from ...nn.residual import downsample_conv, has_quantized_input, plain_class, residual_blocks
from ...nn.switchable_bn import SwitchableBatchNorm2d
from .grids import INT8_MAX, INT8_MIN, LayerGrid


def _lsq_for_mode(quantizer: nn.Module, mode_key: str, layer: str, role: str) -> Optional[LSQQuantizer]:
    """The LSQ quantizer a layer runs in one mode; None when that tensor stays full precision."""
    quantizer = quantizer_in_mode(quantizer, mode_key)
    if isinstance(quantizer, nn.Identity) or getattr(quantizer, "bits", None) == FULL_PRECISION:
        return None
    if isinstance(quantizer, LQNetQuantizer):
        raise RsqError(f"layer {layer} uses LQ-Nets ({role}): non-uniform levels have no PT2E int8 form; "
                       f"export needs the lsq quantizer")
    if not isinstance(quantizer, LSQQuantizer):
        raise RsqError(f"layer {layer}: unsupported {role} quantizer {type(quantizer).__name__}")
    if not bool(quantizer.initialized):
        raise RsqError(f"layer {layer}: its {role} quantizer was never initialised (an untrained model)")
    return quantizer


def _conv_feeding_each_bn(model: nn.Module, example: torch.Tensor) -> dict[str, str]:
    """BN name -> name of the conv whose output it normalises, found by one traced forward.

    Tensor identity is what ties them: a torchvision-style net calls bn(conv(x)) directly.
    """
    conv_output: dict[int, str] = {}
    pairs: dict[str, str] = {}
    names = {id(m): n for n, m in model.named_modules()}
    handles = []
    for name, module in model.named_modules():
        if isinstance(module, nn.Conv2d):
            handles.append(module.register_forward_hook(
                lambda m, i, out: conv_output.__setitem__(id(out), names[id(m)])))
        elif isinstance(module, nn.BatchNorm2d):
            handles.append(module.register_forward_pre_hook(
                lambda m, i: pairs.__setitem__(names[id(m)], conv_output.get(id(i[0])))))
    try:
        with torch.no_grad():
            model(example)
    finally:
        for handle in handles:
            handle.remove()
    unpaired = [bn for bn, conv in pairs.items() if conv is None]
    if unpaired:
        raise RsqError(f"BatchNorm {unpaired[0]} does not directly follow a conv; PT2E export folds every BN")
    return pairs


def _outermost_bn(root: nn.Module, bn_name: str) -> str:
    """The SwitchableBatchNorm2d holding BN ``bn_name`` (a per-mode child), else the BN itself."""
    parent = bn_name.rsplit(".", 2)[0] if bn_name.count(".") >= 2 else ""
    if parent and isinstance(root.get_submodule(parent), SwitchableBatchNorm2d):
        return parent
    return bn_name


def _swap_in(root: nn.Module, name: str, module: nn.Module) -> None:
    parent_name, _, child = name.rpartition(".")
    setattr(root.get_submodule(parent_name) if parent_name else root, child, module)


@torch.no_grad()
def float_model_for(model: nn.Module, resolution: int, in_chans: int) -> tuple[nn.Module, dict[str, LayerGrid]]:
    """A plain float copy of ``model`` at one resolution (BN folded, weights on rsq's grid), and its grids.

    Each conv's weight is int * step * BN gain, so dividing by the exported scale (step * |gain|)
    gives back rsq's integers up to float rounding, far from any rounding tie.
    """
    mode_key = mode_state(model).find(resolution).key
    float_model = copy.deepcopy(model).eval()
    owners = _shortcut_owners(float_model)
    example = torch.zeros(1, in_chans, resolution, resolution)
    with using_mode(float_model, resolution):
        bn_of_conv = {conv: bn for bn, conv in _conv_feeding_each_bn(float_model, example).items()}
    grids: dict[str, LayerGrid] = {}
    for name, layer in list(float_model.named_modules()):
        if isinstance(layer, (QuantConv2d, QuantLinear)):
            grids[name] = _fold_layer(float_model, name, layer, bn_of_conv.get(name), mode_key)
        elif isinstance(layer, (nn.Conv2d, nn.Linear)) and type(layer) not in (nn.Conv2d, nn.Linear):
            raise RsqError(f"layer {name} ({type(layer).__name__}) is not a plain or rsq quantized layer")
    for reader, owner in owners.items():
        if reader == owner:
            grids[owner].shortcut = True
        else:
            grids[reader].input_owner = owner
    for bn in bn_of_conv.values():
        _swap_in(float_model, _outermost_bn(float_model, bn), nn.Identity())
    leftover = [n for n, m in float_model.named_modules()
                if isinstance(m, (nn.modules.batchnorm._BatchNorm, SwitchableBatchNorm2d))]
    if leftover:
        raise RsqError(f"BatchNorm {leftover[0]} could not be folded into a conv")
    return float_model, grids


def _shortcut_owners(model: nn.Module) -> dict[str, str]:
    """Quantized shortcuts: {conv1 or downsample conv name: its block's conv1 name}, and every block back to
    its own class (the plain forward; the float model has no quantizers to call)."""
    names = {id(m): n for n, m in model.named_modules()}
    owners = {}
    for name, block in residual_blocks(model):
        if not has_quantized_input(block):
            continue
        conv1 = names[id(block.conv1)]
        owners[conv1] = conv1
        downsample = downsample_conv(block)
        if downsample is not None:
            owners[names[id(downsample)]] = conv1
        block.__class__ = plain_class(block)
    return owners


def _fold_layer(root: nn.Module, name: str, layer: nn.Module, bn_name: Optional[str], mode_key: str) -> LayerGrid:
    act = _lsq_for_mode(layer.act_quantizer, mode_key, name, "activation")
    weight_q = _lsq_for_mode(layer.weight_quantizer, mode_key, name, "weight")
    out_channels = layer.weight.shape[0]
    weight = layer.weight_quantizer(layer.weight).detach().float()  # rsq's own fake-quant weight
    bias = layer.bias.detach().float() if layer.bias is not None else torch.zeros(out_channels)
    gain = torch.ones(out_channels)
    if bn_name is not None:
        bn = root.get_submodule(bn_name)  # the BatchNorm2d that ran in this mode
        gain = bn.weight.detach() / torch.sqrt(bn.running_var + bn.eps)
        bias = bn.bias.detach() + (bias - bn.running_mean) * gain
    shape = (-1,) + (1,) * (weight.dim() - 1)
    folded = weight * gain.reshape(shape)
    weight_int = scale = weight_range = None
    if weight_q is not None:
        if not (weight_q.signed and weight_q.per_channel):
            raise RsqError(f"layer {name}: weights must be signed and per output channel")
        step = weight_q.step.detach().reshape(-1)
        if (gain == 0).any():
            raise RsqError(f"layer {name}: a BN channel has zero gain, so its weight scale would be 0")
        scale = (step * gain.abs()).float()
        weight_int = torch.round(folded / scale.reshape(shape)).to(torch.int64)
        if isinstance(layer, QuantConv2d):
            # XNNPACK reads a declared [-8, 7] as packed 4-bit weights, which it has for linears
            # only, so conv weights declare the whole int8 range (their values stay on rsq's grid).
            weight_range = (INT8_MIN, INT8_MAX)
        else:
            weight_range = (-weight_q.qn, weight_q.qp)
        if weight_int.min() < weight_range[0] or weight_int.max() > weight_range[1]:
            raise RsqError(f"layer {name}: a weight at the grid edge in a channel with negative BN gain "
                           f"needs +{weight_q.qn}, which int8 cannot hold")
    plain = _plain_layer(layer, folded, bias)
    _swap_in(root, name, plain)
    grid = LayerGrid(act, weight_int, scale, weight_range)
    if bn_name is not None:
        grid.unfolded = (weight, gain.float(), bias.float())
    return grid


def _plain_layer(layer: nn.Module, weight: torch.Tensor, bias: torch.Tensor) -> nn.Module:
    if isinstance(layer, QuantConv2d):
        plain = nn.Conv2d(layer.in_channels, layer.out_channels, layer.kernel_size, layer.stride, layer.padding,
                          layer.dilation, layer.groups, True, layer.padding_mode)
    else:
        plain = nn.Linear(layer.in_features, layer.out_features, True)
    plain.weight = nn.Parameter(weight.clone(), requires_grad=False)
    plain.bias = nn.Parameter(bias.clone().float(), requires_grad=False)
    return plain.eval()
