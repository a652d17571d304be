"""``lower(model, resolutions)``: a fake-quant RS-Net as an IntegerModel (integer weights once, tables per resolution).

This is the only place that folds BatchNorm and turns real scales into fixed-point multipliers;
the writers (onnx, packed) only translate its result. docs/export.md has the formulas.
"""
from __future__ import annotations

import math
from typing import Iterable, Optional

import numpy as np
import torch
from torch import nn
from torch.fx.passes.shape_prop import ShapeProp

from ..convert import mode_state, using_mode
from ..errors import RsqError
from ..nn.quant_layers import QuantConv2d, QuantLinear
from ..nn.quantizers import integer_range
from ..runtime.fixedpoint import quantize_multipliers
from ..runtime.model import IntegerModel, Op, QuantWeight, TensorInfo
from .steps import act_quantizer, bn_affine, grid_quantizer, integer_weight
from .trace import INPUT, FloatOp, trace_float_ops, trace_graph

# A wide tensor's step is its consumers' smallest clip value (Qp * step) / 2**24: rounding to it
# moves a consumer's input by at most 2**-17 of one of its steps (the fake-quant model keeps these
# values in float), and values up to 2**6 clip values stay inside WIDE_RANGE.
WIDE_FRACTION_BITS = 24
# Integer logits: one step is the finest output channel's accumulator step / 2**4.
LOGIT_FRACTION_BITS = 4
# The bias gets up to 16 fraction bits (the accumulator is shifted left to match), so rounding
# the folded BN shift to an integer costs at most 2**-17 accumulator steps, not half a step.
MAX_BIAS_SHIFT = 16
# Every input x of a requantization stays within 2**30, so |x * m0| < 2**61: (acc << bias_shift)
# and bias each stay within 2**29, and wide tensors and logits saturate at +-2**30 (int32 storage).
# The headroom lets the ONNX writer floor-divide a non-negative number (docs/export.md section 8).
SHIFTED_ACC_LIMIT = 2**29
WIDE_RANGE = (-(2**30), 2**30)


def lower(model: nn.Module, resolutions: Optional[Iterable[int]] = None) -> IntegerModel:
    """The integer form of a quantized (LSQ) RS-Net at ``resolutions`` (default: all of its own).

    A model that switches bit widths is lowered at the bit width it is switched to
    (``with rsq.using_mode(model, r, bits=4): lower(model)``).
    """
    if not any(isinstance(m, (QuantConv2d, QuantLinear)) for m in model.modules()):
        raise RsqError("the model is full precision (no quantized layers): nothing to export as integers")
    state = mode_state(model)
    known = state.resolutions
    chosen = known if resolutions is None else [int(r) for r in resolutions]
    unknown = [r for r in chosen if r not in known]
    if unknown or not chosen:
        raise RsqError(f"resolution(s) {unknown or chosen} unknown to this model (known: "
                       f"{', '.join(str(r) for r in known)})")
    chosen = sorted(set(chosen), reverse=True)
    with torch.no_grad():
        return prepared_lowering(model).build(chosen)


def prepared_lowering(model: nn.Module) -> "_Lowering":
    """The lowering of ``model`` with its integer graph built (tensors, weights, which outputs are narrow), before
    any resolution's tables: what rsq.export.snap reads."""
    graph = trace_graph(model)
    lowering = _Lowering(model, graph, trace_float_ops(model, graph), mode_state(model))
    with torch.no_grad():
        lowering.build_graph()
    return lowering


class _Lowering:
    def __init__(self, model, graph, float_ops: list[FloatOp], state):
        self.model, self.graph, self.state = model, graph, state
        # Bits and signs of the activation grids are the same in every mode of one bit width: read
        # them from the largest resolution's mode (at the bit width a joint model is switched to).
        self.first_key = state.find(state.resolutions[0]).key
        self.float_ops = [op for op in float_ops if op.kind != "output"]
        # A quantize op whose input is already on its grid (the only reader of a conv's or add's output)
        # adds no op: its output is that tensor.
        self.alias: dict[str, str] = {}
        self.output = next(op for op in float_ops if op.kind == "output").inputs[0]
        self.producer = {op.output: op for op in self.float_ops}
        self.consumers: dict[str, list[FloatOp]] = {}
        for op in self.float_ops:
            for name in op.inputs:
                self.consumers.setdefault(name, []).append(op)
        names = [op.name for op in self.float_ops]
        if len(set(names)) != len(names):
            raise RsqError("integer export does not support a layer that runs twice in one forward")
        last = self.producer.get(self.output)
        if last is None or last.kind != "linear" or last.act is not None:
            raise RsqError("integer export needs the model to end in a linear layer (its integer logits)")

    # ---- the graph (the same at every resolution) ----

    def _pooled(self, value: str) -> str:
        """``value`` after the max poolings that are its only reader (they keep its grid, see _tensor_info)."""
        readers = self.consumers.get(value, [])
        while len(readers) == 1 and readers[0].kind == "max_pool":
            value = readers[0].output
            readers = self.consumers.get(value, [])
        return value

    def _narrow_consumer(self, value: str) -> Optional[FloatOp]:
        """The one quantized layer or quantize op that reads ``value`` (through max poolings), if it is its
        only reader: ``value`` is then computed on that reader's grid."""
        readers = self.consumers.get(self._pooled(value), [])
        if value == INPUT or len(readers) != 1 or readers[0].kind not in ("conv", "linear", "quantize"):
            return None
        producer = self.producer.get(value)
        if readers[0].kind == "quantize" and producer is not None and producer.kind == "add":
            # An add rounds each input onto its output's grid: onto a narrow grid that is two roundings, not
            # the fake-quant model's one, so its sum stays wide and a requantization follows.
            return None
        return readers[0]

    @staticmethod
    def _grid_module(op: FloatOp) -> nn.Module:
        """The activation quantizer module ``op`` (a conv / linear, or a quantize op) reads its input through."""
        return op.module if op.kind == "quantize" else op.module.act_quantizer

    def _grid(self, op: FloatOp, key: str):
        """That quantizer's LSQ grid in mode ``key``."""
        return grid_quantizer(self._grid_module(op), op.name, key)

    def _source(self, value: str) -> str:
        return self.alias.get(value, value)

    def _tensor_info(self, value: str, channels: int) -> TensorInfo:
        if value == self.output:
            return TensorInfo(value, "logits", 32, True, channels)
        producer = self.producer.get(value)
        if producer is not None and producer.kind == "max_pool":
            # Max pooling works on the integers of its input's grid (rounding and clamping are monotone,
            # so they commute with max): its output is on the same grid, whatever reads it.
            source = self.tensors[producer.inputs[0]]
            if source.kind not in ("narrow", "wide"):
                raise RsqError(f"integer export: max pooling {producer.name} must follow a conv, add or pooling")
            return TensorInfo(value, source.kind, source.bits, source.signed, channels)
        reader = self._narrow_consumer(value)
        if producer is not None and producer.kind == "quantize":
            reader = producer
        if reader is not None:
            quantizer = self._grid(reader, self.first_key)
            return TensorInfo(value, "narrow", quantizer.bits, quantizer.signed, channels)
        return TensorInfo(value, "wide", 32, True, channels)

    def build_graph(self) -> None:
        self.tensors: dict[str, TensorInfo] = {}
        self.ops: list[Op] = []
        self.weights: dict[str, QuantWeight] = {}
        self.int_input: dict[str, str] = {}  # float op name -> the integer tensor it reads
        channels: dict[str, int] = {INPUT: _in_chans(self.float_ops)}
        self.tensors[INPUT] = TensorInfo(INPUT, "float", 8, True, channels[INPUT])
        self.grid_owner: dict[str, nn.Module] = {}  # narrow tensor -> the quantizer module of its grid
        for op in self.float_ops:
            if op.kind in ("conv", "linear"):
                self._build_layer(op, channels)
            elif op.kind == "quantize":
                if self._build_quantize(op, channels):
                    continue
            elif op.kind == "add":
                a, b = (self._source(name) for name in op.inputs)
                if channels[a] != channels[b]:
                    raise RsqError(f"add {op.name}: inputs have {channels[a]} and {channels[b]} channels")
                channels[op.output] = channels[a]
                self.ops.append(Op("add", op.name, (a, b), op.output))
            elif op.kind == "max_pool":
                source = self._source(op.inputs[0])
                channels[op.output] = channels[source]
                self.ops.append(Op("max_pool", op.name, (source,), op.output, dict(op.attrs)))
            else:  # global_avg_pool
                source = self._source(op.inputs[0])
                channels[op.output] = channels[source]
                self.ops.append(Op("global_avg_pool", op.name, (source,), op.output))
            self.tensors[op.output] = self._tensor_info(op.output, channels[op.output])
            if self.tensors[op.output].kind == "narrow":
                reader = self._narrow_consumer(op.output) if op.kind != "quantize" else op
                if reader is None:  # a max pooling keeps its input's grid
                    self.grid_owner[op.output] = self.grid_owner[self._source(op.inputs[0])]
                else:
                    self.grid_owner[op.output] = self._grid_module(reader)
        for op in self.ops:
            for name in op.inputs:
                if self.tensors[name].kind != "narrow" or op.kind in ("conv", "linear", "max_pool"):
                    continue
                # Only a quantize op's output (a quantized shortcut, the residual stream's grid) goes to an add,
                # a pooling, or a requantization onto a reader's grid.
                if not (op.kind in ("add", "global_avg_pool", "requantize") and self._quantized_on_purpose(name)):
                    raise RsqError(f"integer export: {name} is quantized but read by {op.kind} {op.name}")

    def _quantized_on_purpose(self, name: str) -> bool:
        """Whether a narrow tensor is a quantize op's output (a quantized shortcut an add may read)."""
        return any(op.kind == "quantize" and self._source(op.output) == name for op in self.float_ops)

    def _build_quantize(self, op: FloatOp, channels: dict[str, int]) -> bool:
        """A quantize op: nothing when its input is already on its grid (True), else a requantization."""
        source = self._source(op.inputs[0])
        channels[op.output] = channels[source]
        if self.tensors[source].kind == "narrow":
            owner = self.grid_owner.get(source)
            if owner is not op.module:
                raise RsqError(f"integer export: {op.name} quantizes {source}, which is already on another grid")
            self.alias[op.output] = source
            return True
        kind = "quantize_input" if self.tensors[source].kind == "float" else "requantize"
        self.ops.append(Op(kind, op.name, (source,), op.output))
        return False

    def _build_layer(self, op: FloatOp, channels: dict[str, int]) -> None:
        source = self._source(op.inputs[0])
        kind = self.tensors[source].kind
        quantizer = act_quantizer(op.module, op.name, self.first_key)
        if kind == "narrow" and self.grid_owner.get(source) is op.module.act_quantizer:
            read = source
        elif kind == "narrow" and not self._quantized_on_purpose(source):
            raise RsqError(f"integer export: layer {op.name} reads {source}, which is on another layer's grid")
        else:  # the float input, a wide tensor, or a quantize op's grid (the residual stream): onto this layer's
            read = f"{op.name}.input"
            self.tensors[read] = TensorInfo(read, "narrow", quantizer.bits, quantizer.signed, channels[source])
            self.ops.append(Op("quantize_input" if kind == "float" else "requantize", f"{op.name}.quantize",
                               (source,), read))
        self.int_input[op.name] = read
        values, step, bits = integer_weight(op.module, op.name)
        self.weights[op.name] = QuantWeight(values, bits, step)
        channels[op.output] = values.shape[0]
        attrs = _conv_attrs(op.module, op.name) if op.kind == "conv" else {}
        attrs["weight"] = op.name
        self.ops.append(Op(op.kind, op.name, (read,), op.output, attrs))

    # ---- scales and tables (per resolution) ----

    def build(self, resolutions: list[int]) -> IntegerModel:
        tables, scales = {}, {}
        for r in resolutions:
            key = self.state.find(r).key
            tables[r], scales[r] = self._tables_at(r, key)
        out_channels = self.tensors[self.output].channels
        meta = {"wide_fraction_bits": WIDE_FRACTION_BITS, "logit_fraction_bits": LOGIT_FRACTION_BITS,
                "bits": {name: {"weight": w.bits, "input": self.tensors[self.int_input[name]].bits}
                         for name, w in self.weights.items()}}
        return IntegerModel(type(self.model).__name__, out_channels, self.tensors[INPUT].channels, tuple(resolutions),
                            INPUT, self.output, self.tensors, tuple(self.ops), self.weights, tables, scales, meta)

    def _tables_at(self, resolution: int, key: str):
        spatial = self._pool_sizes(resolution, key)
        scales: dict[str, float] = {}
        steps = {op.name: float(self._grid(op, key).step.detach().float().item())
                 for op in self.float_ops if op.kind in ("conv", "linear", "quantize")}
        for name, step in steps.items():
            if not step > 0:
                raise RsqError(f"layer {name}: its activation step is {step} at resolution {resolution}; integer "
                               f"export needs a positive one")
        for op in self.float_ops:
            if op.kind in ("conv", "linear"):
                scales[self.int_input[op.name]] = steps[op.name]
            elif op.kind == "quantize":
                scales[self._source(op.output)] = steps[op.name]
        ref = self._reference_steps(steps)
        for name, info in self.tensors.items():
            if info.kind == "wide":
                scales[name] = ref.get(name, min(ref.values())) / 2**WIDE_FRACTION_BITS
            elif info.kind == "narrow" and name not in scales:
                scales[name] = steps[self._narrow_consumer(name).name]
        for op in self.ops:  # in order, so a chain of poolings shares one grid
            if op.kind == "max_pool":
                scales[op.output] = scales[op.inputs[0]]
        scales[INPUT] = 1.0
        w = self.weights[self.producer[self.output].name]
        acc_steps = scales[self.int_input[self.producer[self.output].name]] * w.step.astype(np.float64)
        # abs: a learned weight step can turn negative (its channel's sign then lives in m0).
        scales[self.output] = float(np.abs(acc_steps).min()) / 2**LOGIT_FRACTION_BITS
        tables = {}
        by_name = {op.name: op for op in self.float_ops}
        for op in self.ops:
            out = self.tensors[op.output]
            lo, hi = self._range(out, by_name.get(op.name), scales[op.output])
            if op.kind == "max_pool":
                tables[op.name] = {}  # no arithmetic: the max of integers on one grid
                continue
            if op.kind in ("quantize_input", "requantize"):
                entry = {"lo": lo, "hi": hi}
                if op.kind == "requantize":
                    entry.update(_multiplier(scales[op.inputs[0]] / scales[op.output], ""))
            elif op.kind in ("conv", "linear"):
                entry = self._layer_table(by_name[op.name], key, scales[op.inputs[0]], scales[op.output], lo, hi)
            elif op.kind == "add":
                a, b = op.inputs
                entry = {**_multiplier(scales[a] / scales[op.output], "_a"),
                         **_multiplier(scales[b] / scales[op.output], "_b"), "lo": lo, "hi": hi}
            else:
                # The sum of `size` int32 values reaches 2**31 * size: fewer mantissa bits keep the product in int64.
                size = spatial[op.name]
                bits = 31 - math.ceil(math.log2(size)) if size > 1 else 31
                entry = {**_multiplier(scales[op.inputs[0]] / (size * scales[op.output]), "", bits), "lo": lo, "hi": hi}
            tables[op.name] = {k: v if isinstance(v, np.ndarray) else np.array([v], dtype=np.int32)
                               for k, v in entry.items()}
        return tables, scales

    def _reference_steps(self, steps: dict[str, float]) -> dict[str, float]:
        """Per value: the smallest clip value (Qp * step) of the layers that read it (through adds and pooling)."""
        ref: dict[str, float] = {}
        for op in reversed(self.float_ops):
            for value in op.inputs:
                if op.kind in ("conv", "linear"):
                    info = self.tensors[self.int_input[op.name]]
                    candidate = steps[op.name] * integer_range(info.bits, info.signed)[1]
                elif op.kind == "quantize":
                    info = self.tensors[self._source(op.output)]
                    candidate = steps[op.name] * integer_range(info.bits, info.signed)[1]
                else:
                    candidate = ref.get(op.output)
                if candidate is not None:
                    ref[value] = min(ref.get(value, math.inf), candidate)
        return ref

    def _range(self, info: TensorInfo, float_op: Optional[FloatOp], scale: float) -> tuple[int, int]:
        """Clamp range of an op's integer output: the consumer's grid and the fused activation."""
        if info.kind == "narrow":
            qn, qp = integer_range(info.bits, info.signed)
            lo, hi = -qn, qp
        else:
            lo, hi = WIDE_RANGE
        act = float_op.act if float_op is not None else None
        if act in ("relu", "relu6"):
            lo = max(lo, 0)
        if act == "relu6":  # round(min(v, 6) / s) = min(round(v / s), round(6 / s)): round is monotone
            hi = min(hi, int(np.round(np.float32(6.0) / np.float32(scale))))
        return lo, hi

    def _layer_table(self, op: FloatOp, key: str, s_in: float, s_out: float, lo: int, hi: int) -> dict:
        """Conv/linear + BN as q = clamp(rq((acc << bias_shift) + bias, m0, shift), lo, hi)."""
        weight = self.weights[op.name]
        channels = weight.values.shape[0]
        bn_scale, bn_shift = bn_affine(op.bn, key, channels)
        conv_bias = op.module.bias.detach().double().numpy() if op.module.bias is not None else np.zeros(channels)
        acc_step = s_in * weight.step.astype(np.float64) * bn_scale   # real value of one accumulator unit
        offset = bn_scale * conv_bias + bn_shift                       # real value added after the conv
        if np.any(acc_step == 0):
            raise RsqError(f"layer {op.name}: a BatchNorm gamma or weight step of 0 (mode {key}) leaves a channel "
                           f"with no integer form")
        bias_real = offset / acc_step                                   # in accumulator units
        in_info = self.tensors[self.int_input[op.name]]
        qn, qp = integer_range(in_info.bits, in_info.signed)
        acc_bound = float(np.abs(weight.values.astype(np.int64)).reshape(channels, -1).sum(1).max()) * max(qn, qp)
        largest = max(acc_bound, float(np.abs(bias_real).max()), 1.0)
        bias_shift = min(MAX_BIAS_SHIFT, int(math.floor(math.log2(SHIFTED_ACC_LIMIT / largest))))
        if bias_shift < 0:
            raise RsqError(f"layer {op.name}: the folded BatchNorm bias is too large for an int32 at resolution "
                           f"key {key} (a near-zero gamma?)")
        bias = np.rint(bias_real * 2.0**bias_shift).astype(np.int64)
        m0, shift = quantize_multipliers(acc_step / s_out / 2.0**bias_shift)
        return {"bias": bias.astype(np.int32), "bias_shift": np.array([bias_shift], dtype=np.int32),
                "m0": m0, "shift": shift, "lo": lo, "hi": hi}

    def _pool_sizes(self, resolution: int, key: str) -> dict[str, int]:
        """H * W of every pooling input at this resolution (from one shape-propagating forward)."""
        pools = [op for op in self.float_ops if op.kind == "global_avg_pool"]
        if not pools:
            return {}
        module = torch.fx.GraphModule(self.model, self.graph)
        with using_mode(self.model, resolution):
            ShapeProp(module).propagate(torch.zeros(1, self.tensors[INPUT].channels, resolution, resolution))
        nodes = {node.name: node for node in module.graph.nodes}
        sizes = {}
        for op in pools:
            shape = nodes[op.node].args[0].meta["tensor_meta"].shape
            sizes[op.name] = int(shape[-1] * shape[-2])
        return sizes


def _multiplier(real: float, suffix: str, bits: int = 31) -> dict:
    m0, shift = quantize_multipliers([real], bits)
    return {f"m0{suffix}": m0, f"shift{suffix}": shift}


def _in_chans(float_ops: list[FloatOp]) -> int:
    first = next((op for op in float_ops if INPUT in op.inputs), None)
    if first is None or first.kind != "conv":
        raise RsqError("integer export needs the input to go straight into a quantized conv")
    return first.module.in_channels


def _conv_attrs(conv: nn.Conv2d, name: str) -> dict:
    if conv.padding_mode != "zeros" or isinstance(conv.padding, str) or conv.dilation != (1, 1):
        raise RsqError(f"integer export does not support conv {name}'s padding mode/dilation "
                       f"({conv.padding_mode}, {conv.padding}, {conv.dilation})")
    return {"kernel": list(conv.kernel_size), "stride": list(conv.stride), "padding": list(conv.padding),
            "groups": conv.groups}
