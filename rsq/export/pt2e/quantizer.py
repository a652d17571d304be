"""The torchao Quantizer that puts rsq's learned steps on the exported graph (nothing is calibrated)."""
from __future__ import annotations

from typing import Optional

import torch

from ...deps import require
from ...errors import RsqError
from .graph import ADDS, MAX_POOLS, clamp_to_grids, int8_weighted, layer_of
from .grids import INT8_MAX, INT8_MIN, PURPOSE, LayerGrid, activation_dtype, activation_qparams
from .xnnpack import xnnpack_weight_scale


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
                name = layer_of(node)
                if name in grids and (grids[name].shortcut or grids[name].input_owner is not None):
                    first_reader.setdefault(grids[name].input_owner or name, node)
            for node in model.graph.nodes:
                if node.op == "call_function" and node.target in MAX_POOLS and len(node.args[0].users) == 1:
                    reader = _pooled_reader(node, grids)
                    if reader is not None:
                        # Max commutes with rounding and clamping, so pooling the integers of the reader's
                        # grid gives its input exactly, and the conv before the pool writes uint8, not float.
                        node.meta["quantization_annotation"] = spec_mod.QuantizationAnnotation(
                            input_qspec_map={node.args[0]: act_spec(reader)}, allow_implicit_sharing=False,
                            _annotated=True)
                    continue
                name = layer_of(node)
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


def _pooled_reader(pool: torch.fx.Node, grids: dict[str, "LayerGrid"]) -> Optional["LayerGrid"]:
    """The grid every quantized reader of a max pooling's output reads it on (through a clamp), if one grid."""
    readers, adds = [], 0
    for user in pool.users:
        users = list(user.users) if user.target is torch.ops.aten.hardtanh.default else [user]
        for reader in users:
            name = layer_of(reader)
            if name is not None:
                grid = grids.get(name)
                if grid is None or grid.act is None:
                    return None
                readers.append(grids[grid.input_owner] if grid.input_owner else grid)
            elif reader.op == "call_function" and reader.target in ADDS:
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
        if user.op == "call_function" and user.target in ADDS:
            user.meta["quantization_annotation"] = spec_mod.QuantizationAnnotation(
                input_qspec_map={source: spec_mod.SharedQuantizationSpec((source, first))},
                allow_implicit_sharing=False, _annotated=True)
