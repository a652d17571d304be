"""One resolution of an LSQ RS-Net as a torchao PT2E quantized program (q/dq ops around float ops).

The float model keeps rsq's numbers: each conv's weight is its fake-quantized weight with that
resolution's BN folded in, and a Quantizer of our own puts rsq's learned steps on every conv /
linear input and weight through fixed-qparams observers, so nothing is re-calibrated.

Grid mapping (8-bit containers; the integers stay rsq's, shifted by the zero point):
- activations, backend "x86" (oneDNN int8 convs take uint8 inputs only): uint8, zero point Qn,
  range [0, Qn + Qp]; an unsigned sub-8-bit grid read from a ReLU's output: zero point 255 - Qp,
  so uint8's saturation at 255 is the clamp at Qp (no hardtanh; LayerGrid.saturates).
  Backend "xnnpack" (its static int8 ops take int8 only): signed -> zero point 0, range [-Qn, Qp];
  unsigned b < 8 -> zero point 0, range [0, Qp]; unsigned 8-bit -> zero point -128, range
  [-128, 127]. Where the range is narrower than the container a float hardtanh clips first
  (clamp_to_grids: int8 kernels ignore quant_max).
- weights: int8 per output channel (ch_axis 0, per_channel_symmetric), scale = step * |BN gain|;
  a negative BN gain flips a channel's integers to [-Qp, Qn]. Linears declare rsq's range
  [-Qn, Qp]; convs declare [-128, 127] (see _fold_layer). Backend "xnnpack" stores each channel's
  integers shifted left by k bits, scale / 2**k, range [-128, 127] (xnnpack_weight_scale): the same
  real weights, a finer accumulator unit for the bias XNNPACK rounds to int32, positive scales only;
  a requantized conv's scale and bias are then fitted so that XNNPACK's rounding is rsq.runtime's
  (fit_xnnpack_requantization).
Residual adds, pooling and the logits stay float, exactly as in the fake-quant model. With quantized
shortcuts (rsq/nn/residual.py) a block's input is one quantized tensor: its conv1 owns the grid, and the
downsample conv and the add's shortcut input share that one q/dq (SharedQuantizationSpec), so Inductor
fuses the second conv, the add and the ReLU into one int8 conv, as in torchao's own recipe.

Every reader of a tensor gets its own q/dq with its own step (allow_implicit_sharing=False): torchao
otherwise shares the first reader's observer with every other reader whose spec has the same dtype
and range, without comparing scales, so a block's conv1 was quantized with its downsample conv's
step whenever no clamp separates them (8-bit grids). That, not float rounding, was the W8A8 gap.
What remains is float32 noise: the folded BN and the quantize op's multiplication by 1 / step move
a value that sits within ~1e-5 of a step of a rounding boundary (a few in a million).
"""
from __future__ import annotations

import copy
from pathlib import Path
from typing import Callable, Optional

import numpy as np
import torch
from torch import nn

from ..allocator import keep_freed_memory
from ..convert import mode_state, using_mode
from ..deps import require
from ..errors import RsqError
from ..nn.quant_layers import QuantConv2d, QuantLinear
from ..nn.quantizers import FULL_PRECISION, LQNetQuantizer, LSQQuantizer, quantizer_in_mode
from ..nn.residual import (downsample_conv, has_quantized_input, plain_class, refuse_residual_grids,
                           residual_blocks)
from ..nn.switchable_bn import SwitchableBatchNorm2d

PURPOSE = "PT2E export"
INT8_MIN, INT8_MAX = -128, 127
BACKENDS = ("x86", "xnnpack")


def _torchao_pt2e():
    return require("torchao.quantization.pt2e.quantize_pt2e", PURPOSE, "torchao")


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


class LayerGrid:
    """rsq's integer grids of one conv / linear in one mode, as PT2E needs them."""

    def __init__(self, act: Optional[LSQQuantizer], weight_int: Optional[torch.Tensor],
                 weight_scale: Optional[torch.Tensor], weight_range: Optional[tuple[int, int]]):
        self.act = act
        self.weight_int = weight_int
        self.weight_scale = weight_scale  # [out_channels]: rsq step times |BN gain|
        self.weight_range = weight_range
        # Quantized shortcuts: a block's conv1 owns its input's grid (``shortcut``), which the shortcut add
        # reads too; its downsample conv reads the same quantized tensor (``input_owner``: conv1's name).
        self.shortcut = False
        self.input_owner: Optional[str] = None
        # x86 only: an unsigned sub-8-bit grid read from a value >= 0 (after a ReLU) sits at the top of uint8,
        # zero point 255 - Qp, so uint8's saturation is the clamp at Qp and no hardtanh is needed (clamp_to_grids).
        self.saturates = False
        # rsq's own weight and the BN that follows it, unfolded (None without a BN): see unfold_float_layers.
        self.unfolded: Optional[tuple[torch.Tensor, torch.Tensor, torch.Tensor]] = None
        # xnnpack: per-channel weight scales chosen with the bias so that XNNPACK's int8 requantization
        # gives rsq.runtime's integers (fit_xnnpack_requantization); None: xnnpack_weight_scale's.
        self.fitted_scale: Optional[torch.Tensor] = None


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


def activation_dtype(backend: str) -> torch.dtype:
    if backend not in BACKENDS:
        raise RsqError(f"unknown PT2E backend {backend!r}; choose from: {', '.join(BACKENDS)}")
    return torch.uint8 if backend == "x86" else torch.int8


def container_range(dtype: torch.dtype) -> tuple[int, int]:
    return (0, 255) if dtype == torch.uint8 else (INT8_MIN, INT8_MAX)


def activation_qparams(act: LSQQuantizer, dtype: torch.dtype = torch.uint8,
                       saturates: bool = False) -> tuple[float, int, int, int]:
    """(scale, zero_point, quant_min, quant_max) of an activation grid in a uint8 or int8 container
    (``saturates``: see LayerGrid)."""
    if dtype == torch.uint8 and saturates:
        return float(act.step.detach()), 255 - act.qp, 0, 255
    if dtype == torch.uint8:
        return float(act.step.detach()), act.qn, 0, act.qn + act.qp
    if act.signed or act.qp <= INT8_MAX:
        return float(act.step.detach()), 0, -act.qn, act.qp
    return float(act.step.detach()), INT8_MIN, INT8_MIN, INT8_MIN + act.qp


def _step_observers():
    """Observer classes that report rsq's steps instead of observing anything (built on first use,
    so that importing this module never needs torchao)."""
    observer_mod = require("torchao.quantization.pt2e.observer", PURPOSE, "torchao")

    class RsqStepObserver(observer_mod.ObserverBase):
        """Fixed (scale, zero point) taken from rsq; forward leaves values untouched."""

        def __init__(self, scale, zero_point, dtype=torch.int8, qscheme=torch.per_tensor_affine,
                     quant_min=INT8_MIN, quant_max=INT8_MAX, is_dynamic=False, ch_axis=0, **kwargs):
            super().__init__(dtype=dtype, is_dynamic=is_dynamic)
            self.qscheme, self.quant_min, self.quant_max, self.ch_axis = qscheme, quant_min, quant_max, ch_axis
            self.register_buffer("scale", torch.as_tensor(scale, dtype=torch.float32).clone())
            self.register_buffer("zero_point", torch.as_tensor(zero_point, dtype=torch.int32).clone())

        def forward(self, x):
            return x

        def calculate_qparams(self, **kwargs):
            return self.scale, self.zero_point

    # torchao passes ch_axis only to observer classes whose name contains "PerChannel".
    class RsqPerChannelStepObserver(RsqStepObserver):
        pass

    return RsqStepObserver, RsqPerChannelStepObserver


def weight_shift(weight_int: torch.Tensor) -> torch.Tensor:
    """Per output channel, the largest k (0..7) with every integer q * 2**k still inside int8.

    The XNNPACK program stores q * 2**k with scale step / 2**k: the same real weights, but its
    int8 conv's accumulator unit (input step x weight scale), in which it rounds the float bias to
    int32, becomes 2**k times finer. A 4-bit grid gets k >= 3 (4 unless a channel holds +8, which a
    negative BN gain or step gives), a 2-bit one k >= 5, an 8-bit channel whose integers stay within
    [-64, 63] k >= 1.
    """
    flat = weight_int.reshape(weight_int.shape[0], -1).to(torch.int64)
    shift = torch.zeros(flat.shape[0], dtype=torch.int64)
    for k in range(1, 8):
        fits = ((flat << k) >= INT8_MIN).all(1) & ((flat << k) <= INT8_MAX).all(1)
        shift = torch.where(fits, torch.full_like(shift, k), shift)
    return shift


def xnnpack_weight_scale(grid: LayerGrid) -> Optional[torch.Tensor]:
    """Per-channel weight scales of a layer in an XNNPACK program; None when its integers do not fit.

    XNNPACK takes positive scales only: a channel whose scale is negative (a learned LSQ step can
    be) keeps |scale| and negated integers, which an 8-bit channel holding -128 cannot (the layer
    then keeps float weights). XNNPACK rounds a conv's float bias to int32 in accumulator units
    (input step x weight scale): integers shifted left by k bits (weight_shift) make that unit
    2**k times finer.
    """
    ints = _xnnpack_integers(grid)
    if ints is None:
        return None
    if grid.fitted_scale is not None:
        return grid.fitted_scale
    return grid.weight_scale.abs() / 2.0 ** weight_shift(ints)


def _xnnpack_integers(grid: LayerGrid) -> Optional[torch.Tensor]:
    """The layer's integers with each channel's sign flipped where its scale is negative (before the shift);
    None when one leaves int8."""
    sign = torch.where(grid.weight_scale < 0, -1, 1)
    ints = grid.weight_int * sign.reshape((-1,) + (1,) * (grid.weight_int.dim() - 1))
    if ints.min() < INT8_MIN or ints.max() > INT8_MAX:
        return None
    return ints


def lowered(model: nn.Module, resolutions: list[int]):
    """rsq.runtime's definition of ``model`` at ``resolutions`` (an IntegerModel), which
    fit_xnnpack_requantization reproduces; None where the lowering refuses the model."""
    from .lower import lower
    try:
        return lower(model, resolutions)
    except RsqError:
        return None


@torch.no_grad()
def fit_xnnpack_requantization(integer, float_model: nn.Module, grids: dict[str, LayerGrid],
                               resolution: int) -> dict[str, tuple[int, int]]:
    """Give every int8 conv of an XNNPACK program whose output is requantized the per-channel weight scale
    and int32 bias that make XNNPACK's float32 requantization reproduce rsq.runtime's integers for every
    input, where one exists (rsq/export/requant_fit.py); returns {layer: (channels exact, channels)}.
    ``integer``: the model lowered at ``resolution`` among others (``lowered``); None keeps the writer's
    own rounding everywhere.

    The float layer gets weights equal to its int8 integers times the fitted scale and a bias equal to the
    fitted integer bias times its accumulator unit, which XNNPACK's own rounding gives back unchanged.
    """
    from .requant_fit import fit_layer, input_range
    if integer is None:
        return {}
    tables, scales, report = integer.tables[resolution], integer.scales[resolution], {}
    for op in integer.ops:
        grid = grids.get(op.name)
        if op.kind != "conv" or integer.tensors[op.output].kind != "narrow" or grid is None or grid.weight_int is None:
            continue
        ints = _xnnpack_integers(grid)
        if ints is None:
            continue
        shifts = weight_shift(ints)
        rsq_ints = integer.weights[op.attrs["weight"]].values
        fit = fit_layer(tables[op.name], rsq_ints, (1 << shifts).numpy(), input_range(integer, resolution, op.inputs[0]))
        shape = (-1,) + (1,) * (ints.dim() - 1)
        if not np.array_equal(ints.numpy(), rsq_ints * fit.sign.reshape(shape)):
            continue  # not the orientation the fit assumes (cannot happen for an LSQ layer; keep the old way)
        s_in, s_out = float(scales[op.inputs[0]]), float(scales[op.output])
        # Channels without an exact fit keep what they had: XNNPACK rounds their float bias itself.
        exact = torch.from_numpy(fit.exact)
        fitted = torch.from_numpy(fit.scale * s_out / s_in).float()
        w_scale = torch.where(exact, fitted, grid.weight_scale.abs() / 2.0 ** shifts)
        layer = float_model.get_submodule(op.name)
        weight = (ints << shifts.reshape(shape)).float() * w_scale.reshape(shape)
        layer.weight = nn.Parameter(torch.where(exact.reshape(shape), weight, layer.weight), requires_grad=False)
        bias = (torch.from_numpy(fit.bias).double() * w_scale.double() * float(np.float32(s_in))).float()
        layer.bias = nn.Parameter(torch.where(exact, bias, layer.bias), requires_grad=False)
        grid.fitted_scale = w_scale
        report[op.name] = (int(fit.exact.sum()), len(fit.exact))
    return report


def make_quantizer(grids: dict[str, LayerGrid], backend: str = "x86", int8_weights: bool = True):
    """A torchao Quantizer that annotates each conv / linear of the exported graph with rsq's grids.

    For "xnnpack", int8 weights only on layers whose output is quantized again (XNNPACK's static
    int8 conv needs dq -> conv [-> act] -> q); a layer feeding a residual add or the logits keeps
    float weights, equal to the dequantized ones, and runs as a float op. ``int8_weights=False``
    keeps float weights everywhere (only the activations are quantized): every gemm is a float op.
    """
    act_dtype = activation_dtype(backend)
    spec_mod = require("torchao.quantization.pt2e.quantizer", PURPOSE, "torchao")
    per_tensor, per_channel = _step_observers()

    def act_spec(grid: LayerGrid):
        scale, zero_point, low, high = activation_qparams(grid.act, act_dtype, grid.saturates)
        return spec_mod.QuantizationSpec(
            dtype=act_dtype, quant_min=low, quant_max=high, qscheme=torch.per_tensor_affine,
            observer_or_fake_quant_ctr=per_tensor.with_args(scale=scale, zero_point=zero_point))

    def weight_spec(grid: LayerGrid):
        zeros = torch.zeros_like(grid.weight_scale, dtype=torch.int32)
        scale, (low, high) = grid.weight_scale, grid.weight_range
        if backend == "xnnpack":
            scale, (low, high) = xnnpack_weight_scale(grid), (INT8_MIN, INT8_MAX)
        return spec_mod.QuantizationSpec(
            dtype=torch.int8, quant_min=low, quant_max=high,
            qscheme=torch.per_channel_symmetric, ch_axis=0,
            observer_or_fake_quant_ctr=per_channel.with_args(scale=scale, zero_point=zeros))

    class RsqStepQuantizer(spec_mod.Quantizer):
        """Annotates by layer name (the weight's attribute path), never by op pattern, so a shared
        ReLU module or any other module reuse cannot confuse it; each input edge gets its own q/dq."""

        def transform_for_annotation(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            return clamp_to_grids(model, grids, act_dtype)

        def annotate(self, model: torch.fx.GraphModule) -> torch.fx.GraphModule:
            self.done = set()
            # A quantized shortcut's readers share the q/dq of the first of them in the graph (torchao can
            # only share an edge it has already seen): conv1, or the downsample conv that runs before it.
            first_reader: dict[str, torch.fx.Node] = {}
            for node in model.graph.nodes:
                name = _layer_of(node)
                if name in grids and (grids[name].shortcut or grids[name].input_owner is not None):
                    first_reader.setdefault(grids[name].input_owner or name, node)
            for node in model.graph.nodes:
                if node.op == "call_function" and node.target in _MAX_POOLS and len(node.args[0].users) == 1:
                    reader = _pooled_reader(node, grids)
                    if reader is not None:
                        # Max commutes with rounding and clamping, so pooling the integers of the reader's
                        # grid gives its input exactly, and the conv before the pool writes uint8, not float.
                        node.meta["quantization_annotation"] = spec_mod.QuantizationAnnotation(
                            input_qspec_map={node.args[0]: act_spec(reader)}, allow_implicit_sharing=False,
                            _annotated=True)
                    continue
                name = _layer_of(node)
                if name is None or name not in grids:
                    continue
                grid, qspecs = grids[name], {}
                first = first_reader.get(grid.input_owner or name)
                if first is not None and first is not node:
                    qspecs[node.args[0]] = spec_mod.SharedQuantizationSpec((first.args[0], first))
                elif grid.act is not None:
                    qspecs[node.args[0]] = act_spec(grids[grid.input_owner or name])
                if grid.shortcut:
                    _annotate_shortcut(node, first, spec_mod)
                if int8_weighted(node, grids, backend, int8_weights):
                    qspecs[node.args[1]] = weight_spec(grid)
                # No implicit sharing: torchao would otherwise give every reader of one tensor the
                # observer of the first reader whose spec matches in dtype and range (the scale
                # lives in the observer, so it is not compared), e.g. a block's conv1 would be
                # quantized with its downsample conv's step.
                node.meta["quantization_annotation"] = spec_mod.QuantizationAnnotation(
                    input_qspec_map=qspecs, allow_implicit_sharing=False, _annotated=True)
                self.done.add(name)
            return model

        def validate(self, model: torch.fx.GraphModule) -> None:
            missing = sorted(set(grids) - self.done)
            if missing:
                raise RsqError(f"PT2E export found no conv/linear op for layer {missing[0]} in the exported graph")

    return RsqStepQuantizer()


_GEMMS = (torch.ops.aten.conv2d.default, torch.ops.aten.linear.default)
_RELUS = (torch.ops.aten.relu.default, torch.ops.aten.relu_.default)
_ADDS = (torch.ops.aten.add.Tensor, torch.ops.aten.add_.Tensor)
_MAX_POOLS = (torch.ops.aten.max_pool2d.default,)


def _pooled_reader(pool: torch.fx.Node, grids: dict[str, "LayerGrid"]) -> Optional["LayerGrid"]:
    """The grid every quantized reader of a max pooling's output reads it on (through a clamp), if one grid."""
    readers, adds = [], 0
    for user in pool.users:
        users = list(user.users) if user.target is torch.ops.aten.hardtanh.default else [user]
        for reader in users:
            name = _layer_of(reader)
            if name is not None:
                grid = grids.get(name)
                if grid is None or grid.act is None:
                    return None
                readers.append(grids[grid.input_owner] if grid.input_owner else grid)
            elif reader.op == "call_function" and reader.target in _ADDS:
                adds += 1
            else:
                return None
    steps = {(float(g.act.step.detach()), g.act.bits, g.act.signed) for g in readers}
    # An add reads the pooled values on the grid only through a quantized shortcut.
    if len(steps) != 1 or (adds and not readers[0].shortcut):
        return None
    return readers[0]


def _annotate_shortcut(conv1: torch.fx.Node, first: torch.fx.Node, spec_mod) -> None:
    """The add that reads a block's input (its identity shortcut) reads it through the block's one q/dq."""
    source = conv1.args[0]
    for user in source.users:
        if user.op == "call_function" and user.target in _ADDS:
            user.meta["quantization_annotation"] = spec_mod.QuantizationAnnotation(
                input_qspec_map={source: spec_mod.SharedQuantizationSpec((source, first))},
                allow_implicit_sharing=False, _annotated=True)


def _requantized(node: torch.fx.Node, grids: dict[str, LayerGrid]) -> bool:
    """Whether a gemm's output (through at most one relu / hardtanh) only feeds a quantized layer input."""
    if len(node.users) != 1:
        return False
    user = next(iter(node.users))
    if user.op == "call_function" and user.target in _RELUS + (torch.ops.aten.hardtanh.default,):
        if len(user.users) != 1:
            return False
        user = next(iter(user.users))
    name = _layer_of(user)
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
        name = _layer_of(node)
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
        if source.op == "call_function" and source.target in _RELUS and only_reader and not act.signed:
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
    grid = grids[_layer_of(node)]
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
        name = _layer_of(node)
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


def _nonnegative(node: torch.fx.Node) -> bool:
    """Whether a value is >= 0 by construction: a ReLU's output, or a max pooling of one."""
    if node.op != "call_function":
        return False
    return node.target in _RELUS or (node.target in _MAX_POOLS and _nonnegative(node.args[0]))


def _layer_of(node: torch.fx.Node) -> Optional[str]:
    """The module path of a conv / linear node, read from its weight's get_attr target."""
    if node.op != "call_function" or node.target not in _GEMMS:
        return None
    weight = node.args[1]
    if weight.op != "get_attr" or not weight.target.endswith("weight"):
        return None
    return weight.target.rsplit(".", 1)[0] if "." in weight.target else ""


def to_pt2e(model: nn.Module, resolution: int, in_chans: int, batch: Optional[int] = None,
            backend: str = "x86", int8_weights: bool = True,
            fold_float_bn: bool = True, integer=None) -> torch.export.ExportedProgram:
    """The converted PT2E program (q/dq + float ops) of ``model`` at ``resolution``.

    ``batch=None`` keeps the batch dimension dynamic (the server path); an int fixes it.
    ``backend``: "x86" (Inductor, uint8 activations) or "xnnpack" (ExecuTorch, int8 activations).
    ``int8_weights=False``: float weights (rsq's dequantized ones) everywhere, see make_quantizer.
    ``fold_float_bn=False`` ("xnnpack" only): float-weight layers keep rsq's weight and apply their BN
    after it (unfold_float_layers), so every resolution's program holds the same float weights.
    ``integer`` ("xnnpack" with int8 weights): the model already lowered at this resolution (``lowered``),
    so that a caller writing several resolutions lowers once; lowered here when not given.
    """
    refuse_residual_grids(model, "the PT2E / ExecuTorch path")
    activation_dtype(backend)  # an unknown backend fails before any work
    pt2e = _torchao_pt2e()
    float_model, grids = float_model_for(model, resolution, in_chans)
    if backend == "xnnpack" and int8_weights:
        integer = integer if integer is not None else lowered(model, [resolution])
        fit_xnnpack_requantization(integer, float_model, grids, resolution)
    # Batch 2 when dynamic: export specialises a size-1 dimension instead of keeping it symbolic.
    example = (torch.randn(batch or 2, in_chans, resolution, resolution),)
    dynamic = None if batch else ({0: torch.export.Dim("batch", min=1, max=4096)},)
    graph = torch.export.export(float_model, example, dynamic_shapes=dynamic).module()
    if backend == "xnnpack" and not fold_float_bn:
        graph = unfold_float_layers(graph, grids, int8_weights)
    prepared = pt2e.prepare_pt2e(graph, make_quantizer(grids, backend, int8_weights))
    converted = pt2e.convert_pt2e(prepared)
    return torch.export.export(converted, example, dynamic_shapes=dynamic)


def write_pt2e(model: nn.Module, resolution: int, in_chans: int, path) -> Path:
    """Save the PT2E program of one resolution with torch.export.save; returns the path."""
    path = Path(path)
    torch.export.save(to_pt2e(model, resolution, in_chans), str(path))
    return path


def load_pt2e(path, compile: bool = True, keep_memory: bool = True) -> Callable[[torch.Tensor], torch.Tensor]:
    """A callable for a saved PT2E program: Inductor-compiled (the server CPU path) unless compile=False.

    Inductor fuses dq -> conv -> act -> q into oneDNN int8 convs only with freezing on and with
    torchao's x86 passes registered, which importing its X86 Inductor quantizer module does.
    ``keep_memory`` (with compile) sets glibc to keep freed memory for the next call, process-wide
    (rsq/allocator.py): a ResNet-18 RS-Net at batch 32 ran 1.2-2.1x faster that way.
    """
    require("torchao.quantization.pt2e.quantizer.x86_inductor_quantizer", "the Inductor PT2E path", "torchao")
    program = torch.export.load(str(path))
    module = program.module()
    if not compile:
        return module
    if keep_memory:
        keep_freed_memory()
    import torch._inductor.config as inductor_config
    inductor_config.freezing = True
    # One static graph per batch size: with dynamic shapes Inductor's fused int8 conv asserted the wrong
    # strides for a batch other than the first one it saw.
    return torch.compile(module, dynamic=False)
