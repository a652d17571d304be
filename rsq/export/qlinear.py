"""QLinear ONNX writer: the IntegerModel on onnxruntime's fused 8-bit kernels, for speed on server CPUs.

The exact ONNX graph (onnx.py) spells every requantization out in int64 ops, which onnxruntime runs
as separate passes over memory. This graph uses the operators onnxruntime's own int8 quantization
emits instead (QLinearConv with the requantization inside the kernel, QLinearAdd,
QLinearGlobalAveragePool), plus Clip where rsq's range is narrower than 8 bits. Every tensor is
uint8 (zero point 0 when unsigned, 128 when signed); the weights are the same int8 integers,
stored once in weights.bin for every resolution.

Not bit-exact with rsq.runtime (docs/export.md §8a says where and measures it):
- onnxruntime requantizes in float32 (round half to even) where rsq.runtime uses Q31 fixed point;
- QLinearConv's int32 bias has no fraction bits (rsq's keeps up to 16), except as the per-channel scale
  and bias fitted where a conv's output is narrow make up for (requant_fit; every channel at 4 bits; where no
  exact fit exists, the one that keeps the boundaries most calibration values sit at);
- every "wide" tensor (the residual stream and the conv outputs that feed an add or a pooling,
  int32 in the IntegerModel) becomes 8-bit, on a grid calibrated on training images
  (``calibrate``): the one choice this writer makes that the lowering did not.
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..runtime.model import IntegerModel
from .onnx import SWITCHABLE_FILE, WEIGHTS_FILE, OnnxGraph, describe, graph_file, require_onnx, write_weights
from .requant_fit import boundary_weights_from_counts, fit_layer, input_range, rounded

RANGES_FILE = "ranges.json"
CALIBRATION_IMAGES = 256
SIGNED_ZERO_POINT = 128  # a signed grid [-128, 127] stored as uint8
MS = "com.microsoft"      # onnxruntime's contrib operators (QLinearAdd, QLinearGlobalAveragePool, ...)


def calibrate(model: IntegerModel, images: dict[int, np.ndarray], batch: int = 64):
    """One rsq.runtime pass over ``images[r]`` (NCHW float) per resolution: (ranges, counts).

    ranges[r][tensor]: the largest |integer| of every wide tensor, for its 8-bit grid.
    counts[r][tensor]: for every conv/linear with a narrow output, how often each output integer occurred per
    channel ([channels, hi - lo + 1]): where no exact requantization fit exists, the fit keeps the rounding
    boundaries that the most values sit at (requant_fit.fit_channel_weighted)."""
    from ..runtime import Runtime
    runtime = Runtime(model, gemm="float")
    wide = [name for name, info in model.tensors.items() if info.kind == "wide"]
    narrow = [op for op in model.ops if op.kind in ("conv", "linear") and model.tensors[op.output].kind == "narrow"]
    ranges, counts = {}, {}
    for r in model.resolutions:
        largest = dict.fromkeys(wide, 0)
        bounds = {op.output: (int(model.tables[r][op.name]["lo"][0]), int(model.tables[r][op.name]["hi"][0]))
                  for op in narrow}
        seen = {op.output: np.zeros((model.tensors[op.output].channels, hi - lo + 1), np.int64)
                for op in narrow for lo, hi in [bounds[op.output]]}
        x = images[r]
        for start in range(0, len(x), batch):
            values = runtime.run_all(x[start:start + batch], r)
            for name in wide:
                largest[name] = max(largest[name], int(np.abs(values[name]).max(initial=0)))
            for name, table in seen.items():
                channels, width = table.shape
                flat = values[name].reshape(-1, channels).astype(np.int64) - bounds[name][0]  # channels last
                table += np.bincount((flat + np.arange(channels) * width).ravel(),
                                     minlength=channels * width).reshape(channels, width)
        ranges[r], counts[r] = largest, seen
    return ranges, counts


def write_qlinear(model: IntegerModel, ranges: dict[int, dict[str, int]],
                  counts: Optional[dict[int, dict[str, np.ndarray]]], folder) -> list[Path]:
    """One ``model_r{R}.onnx`` per resolution, the shared ``weights.bin`` and ``ranges.json``, and with more than
    one resolution the switchable ``model.onnx`` (switchable_graph); returns the per-resolution graph paths.
    ``ranges`` and ``counts``: calibrate's (without counts, a channel with no exact fit rounds its bias)."""
    onnx = require_onnx()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    shifts = weight_shifts(model)
    locations = write_weights(model, folder / WEIGHTS_FILE, shifts)
    (folder / RANGES_FILE).write_text(json.dumps({str(r): v for r, v in ranges.items()}, indent=1, sort_keys=True))
    protos = {r: _QLinearGraph(onnx, model, r, locations, ranges[r], shifts, (counts or {}).get(r, {})).build()
              for r in model.resolutions}
    paths = []
    for r, proto in protos.items():
        path = folder / graph_file(r)
        path.write_bytes(proto.SerializeToString())
        paths.append(path)
    if len(protos) > 1:
        (folder / SWITCHABLE_FILE).write_bytes(switchable_graph(onnx, model, protos, locations).SerializeToString())
    return paths


def switchable_graph(onnx, model: IntegerModel, protos: dict, locations):
    """Every resolution's QLinear graph in one model, for one onnxruntime session: per resolution an ``If``
    whose then-branch is that resolution's graph (its tables as constants; the int8 weights stay outer
    initializers in weights.bin, which every branch reads) and whose else-branch is an empty batch; the
    outputs are the branches' outputs concatenated, so the one branch the input's size selects gives them.

    Not the exact graph's layout (one graph, tables stacked and gathered): onnxruntime's QLinearConv
    leaves its fast path when its int32 bias is not a constant (1.3-1.6x slower, measured). Branches
    nested in one another's else-branch were slower too; side by side at the top level, each is
    optimised like a graph of its own. An input size that is not a resolution fails in the Gather of
    the resolution by its index (OnnxGraph.graph_input), before any branch runs, instead of every
    branch yielding an empty batch."""
    h, TP = onnx.helper, onnx.TensorProto
    top = OnnxGraph(onnx, model, model.resolutions, locations)
    graph_input = top.graph_input()
    size = top.node("Gather", [top.const("resolution.sizes", np.array(model.resolutions, np.int64)), top.mode],
                    "input.resolution")
    selected = {r: top.node("Equal", [size, top.scalar(r, np.int64)], f"is_r{r}") for r in protos}
    first = next(iter(protos.values()))
    outer = {t.name for t in first.graph.initializer if t.data_location == TP.EXTERNAL} | {model.input}
    outputs = list(first.graph.output)
    widths = [model.num_classes, model.tensors[features_tensor(model)].channels]
    empty = [h.make_node("Constant", [], [f"{o.name}.none"], value=onnx.numpy_helper.from_array(
        np.zeros((0, width), h.tensor_dtype_to_np_dtype(o.type.tensor_type.elem_type))))
        for o, width in zip(outputs, widths)]
    no_batch = h.make_graph(empty, "other_resolution", [],
                            [h.make_tensor_value_info(f"{o.name}.none", o.type.tensor_type.elem_type, None)
                             for o in outputs])
    nodes, parts = list(top.nodes), {o.name: [] for o in outputs}
    codes = _short_names(list(protos.values()), outer)
    for r, proto in protos.items():
        names = [f"{o.name}.r{r}" for o in outputs]
        nodes.append(h.make_node("If", [selected[r]], names, then_branch=_branch(onnx, proto, f"r{r}", outer, codes),
                                 else_branch=no_batch))
        for o, name in zip(outputs, names):
            parts[o.name].append(name)
    nodes += [h.make_node("Concat", parts[o.name], [o.name], axis=0) for o in outputs]
    weights = [t for t in first.graph.initializer if t.name in outer]
    graph = h.make_graph(nodes, f"{model.model}_switchable", [graph_input], outputs, weights + top.initializers)
    proto = h.make_model(graph, opset_imports=list(first.opset_import), producer_name="rsq",
                         doc_string=f"rsq QLinear export, resolutions {'/'.join(map(str, model.resolutions))}: "
                                    "the input's size picks one")
    proto.ir_version = first.ir_version
    describe(h, proto, model, model.resolutions)
    return proto


def _short_names(protos: list, outer: set[str]) -> dict[str, str]:
    """A short code for every tensor name that the If branches rename, the same in every branch (the
    resolutions' graphs share their names): numbers in base 36, in the order the graphs hold them. Each branch
    repeats every name, so at the ResNet-20's size the readable ones cost about a third of a branch's bytes;
    the per-resolution graphs keep them, node for node in the same order."""
    codes: dict[str, str] = {}
    for proto in protos:
        for name in [t.name for t in proto.graph.initializer] + [n for node in proto.graph.node for n in node.output]:
            if name and name not in outer and name not in codes:
                codes[name] = np.base_repr(len(codes), 36).lower()
    return codes


def _branch(onnx, proto, prefix: str, outer: set[str], codes: dict[str, str]):
    """A resolution's graph as an If branch: no inputs, its own names replaced by short codes (_short_names) and
    prefixed (so no name repeats anywhere in the model, and none shadows the outer graph's), the outer graph's
    weights and input read as they are; the outputs keep their names, prefixed."""
    h = onnx.helper
    outputs = {o.name for o in proto.graph.output}

    def rename(name: str) -> str:
        if not name or name in outer:
            return name
        return f"{prefix}/{name}" if name in outputs else f"{prefix}/{codes[name]}"

    nodes = []
    for node in proto.graph.node:
        copy = onnx.NodeProto()
        copy.CopyFrom(node)
        copy.input[:] = [rename(n) for n in node.input]
        copy.output[:] = [rename(n) for n in node.output]
        nodes.append(copy)
    tables = []
    for tensor in proto.graph.initializer:
        if tensor.name not in outer:
            copy = onnx.TensorProto()
            copy.CopyFrom(tensor)
            copy.name = rename(tensor.name)
            tables.append(copy)
    outputs = [h.make_tensor_value_info(rename(o.name), o.type.tensor_type.elem_type, None) for o in proto.graph.output]
    return h.make_graph(nodes, prefix, [], outputs, tables)


def features_tensor(model: IntegerModel) -> str:
    """The last linear's integer input: the graph's second output, compared with rsq.runtime's by verify."""
    last = next(op for op in model.ops if op.output == model.output)
    return last.inputs[0]


def weight_shifts(model: IntegerModel) -> dict[str, int]:
    """Bits each layer's weights move left inside their int8 container: 8 - bits for sub-8-bit weights.

    The accumulator gets as many bits finer, so QLinearConv's integer bias keeps that many fraction
    bits (rsq.runtime keeps up to 16; none would move about 1 % of the outputs by one step). Only where
    the input has at most 7 bits: AVX2's u8 x s8 pair sums (vpmaddubsw) saturate int16 otherwise.
    """
    shifts = {}
    for op in model.ops:
        if op.kind in ("conv", "linear"):
            shift = layer_weight_shift(model.weights[op.attrs["weight"]].bits, model.tensors[op.inputs[0]].bits)
            if shift:
                shifts[op.attrs["weight"]] = shift
    return shifts


def layer_weight_shift(weight_bits: int, input_bits: int) -> int:
    """weight_shifts' rule for one layer: 8 - bits for sub-8-bit weights read by an input of at most 7 bits."""
    return 8 - weight_bits if weight_bits < 8 and input_bits <= 7 else 0


def narrow_output_fit(model: IntegerModel, resolution: int, op, shifts: dict[str, int],
                      counts: Optional[np.ndarray] = None):
    """The exact requantization fit (requant_fit.fit_layer) of a conv/linear whose output is narrow, on the
    weights as this writer stores them (``shifts``: weight_shifts); ``counts`` (calibrate's, for this output)
    weigh the boundaries of a channel that has no exact fit."""
    weights = None if counts is None else boundary_weights_from_counts(counts)
    return fit_layer(model.tables[resolution][op.name], model.weights[op.attrs["weight"]].values,
                     2 ** shifts.get(op.attrs["weight"], 0), input_range(model, resolution, op.inputs[0]), weights)


def _producer(model: IntegerModel, tensor: str):
    return next(op for op in model.ops if op.output == tensor)


def fused_requantize(model: IntegerModel, op) -> bool:
    """Whether a requantize reads an add that nothing else reads: QLinearAdd then writes the requantize's grid
    directly (one rounding of the float sum, as the fake-quant model quantizes its sum, and one op fewer).
    With quantized shortcuts every block ends this way."""
    if op.kind != "requantize":
        return False
    source = _producer(model, op.inputs[0])
    readers = [other for other in model.ops if source.output in other.inputs]
    return source.kind == "add" and len(readers) == 1 and source.output != model.output


def clamp_by_saturation(model: IntegerModel, resolution: int, op) -> bool:
    """A requantize of a value >= 0 onto a grid [0, Qp] narrower than 8 bits needs no Clip: with zero point
    255 - Qp, uint8's own saturation at 255 is the clamp at Qp, and 0 is never crossed."""
    table = model.tables[resolution][op.name]
    return (op.kind == "requantize" and not fused_requantize(model, op) and int(table["lo"][0]) == 0
            and int(table["hi"][0]) < 255 and zero_point(model, resolution, _producer(model, op.inputs[0])) == 0)


def zero_point(model: IntegerModel, resolution: int, op) -> int:
    """The uint8 zero point of ``op``'s output: 128 where its range goes below 0, 255 - Qp where uint8's
    saturation is the clamp (clamp_by_saturation), else 0."""
    if op.kind == "max_pool":  # keeps its input's grid
        return zero_point(model, resolution, _producer(model, op.inputs[0]))
    table = model.tables[resolution][op.name]
    if clamp_by_saturation(model, resolution, op):
        return 255 - int(table["hi"][0])
    return SIGNED_ZERO_POINT if int(table["lo"][0]) < 0 else 0


def features_zero_point(model: IntegerModel, resolution: int) -> int:
    return zero_point(model, resolution, _producer(model, features_tensor(model)))


class _QLinearGraph(OnnxGraph):
    def __init__(self, onnx, model: IntegerModel, resolution: int, locations, ranges: dict[str, int],
                 shifts: dict[str, int], counts: dict[str, np.ndarray]):
        super().__init__(onnx, model, [resolution], locations)
        self.grids = self._grids(ranges)
        self.shifts = shifts
        self.counts = counts
        self.flat: dict[str, str] = {}
        # add output -> the requantize that QLinearAdd writes instead (fused_requantize)
        self.fused = {op.inputs[0]: op for op in model.ops if fused_requantize(model, op)}

    def _grids(self, ranges: dict[str, int]) -> dict[str, tuple[float, int]]:
        """(real step, zero point) of every integer tensor's uint8 form at this resolution."""
        grids = {}
        for op in self.model.ops:
            info = self.model.tensors[op.output]
            if op.kind == "max_pool":
                grids[op.output] = grids[op.inputs[0]]  # the max of integers keeps their grid
                continue
            zero = zero_point(self.model, self.r, op)
            step = self.scales[op.output]
            if info.kind == "wide":  # the IntegerModel's int32 grid, coarsened so the calibrated range fits 8 bits
                step *= max(ranges[op.output], 1) / (127 if zero else 255)
            grids[op.output] = (step, zero)
        return grids

    def grid(self, tensor: str) -> tuple[str, str]:
        """Names of the (scale, zero point) constants of a tensor's uint8 grid."""
        step, zero = self.grids[tensor]
        scale = f"{tensor}.q_scale"
        if scale not in self.shared:
            # Per tensor, not shared by value with other tensors' grids: a zero point shared across
            # unrelated QLinear ops kept onnxruntime's layout optimizer from removing transposes (8-15 %
            # slower on ResNet-20).
            self.shared.add(scale)
            self.const(scale, np.array(step, np.float32))
            self.const(f"{tensor}.q_zero", np.array(zero, np.uint8))
        return scale, f"{tensor}.q_zero"

    def clamped(self, op, produce, lo_at_least: Optional[int] = None) -> None:
        """``produce(name)`` writes op's uint8 output; a Clip follows where rsq's range is narrower than uint8's."""
        table = self.tables[op.name]
        zero = self.grids[op.output][1]
        low = int(table["lo"][0]) if lo_at_least is None else max(int(table["lo"][0]), lo_at_least)
        lo, hi = max(low + zero, 0), min(int(table["hi"][0]) + zero, 255)
        if clamp_by_saturation(self.model, self.r, op):
            lo = 0  # the input is >= 0 (see clamp_by_saturation)
        if (lo, hi) == (0, 255):
            produce(op.output)
            return
        produce(f"{op.output}.unclipped")
        self.node("Clip", [f"{op.output}.unclipped", self.scalar(lo, np.uint8), self.scalar(hi, np.uint8)], op.output)

    def build(self):
        model, TP = self.model, self.onnx.TensorProto
        graph_input = self.helper.make_tensor_value_info(model.input, TP.FLOAT,
                                                         ["batch", model.in_chans, self.r, self.r])
        for op in model.ops:
            getattr(self, f"_{op.kind}")(op, self.tables[op.name])
        features = features_tensor(model)
        outputs = [self.helper.make_tensor_value_info("logits", TP.FLOAT, ["batch", model.num_classes]),
                   self.helper.make_tensor_value_info(self.flatten(features), TP.UINT8, ["batch", None])]
        return self.finish([graph_input], outputs, f"rsq QLinear export, resolution {self.r}",
                           domains=(MS,))

    def flatten(self, tensor: str) -> str:
        """A pooled [N, C, 1, 1] tensor as [N, C] (rsq.runtime's layout of a linear's input)."""
        if tensor not in self.flat:
            self.flat[tensor] = self.node("Flatten", [tensor], f"{tensor}.flat", axis=1)
        return self.flat[tensor]

    def _quantize_input(self, op, table):
        scale, zero = self.grid(op.output)
        self.clamped(op, lambda out: self.node("QuantizeLinear", [op.inputs[0], scale, zero], out))

    def _requantize(self, op, table):
        if op.inputs[0] in self.fused:
            return  # written by its add
        # Adding an exact 0 (integer 0, step 1) rescales onto the reader's grid in one pass, with the same
        # integers as QLinearMul by an exact 1 (1.8x its time) or QLinearLeakyRelu's 256-entry lookup (2.0x):
        # tools/results/probe_qlinear_rescale.md, a [32, 16, 28, 28] tensor on one thread.
        if "zero" not in self.shared:  # the exact 0 (grid step 1) every rescale adds
            self.shared.add("zero")
            self.const("zero", np.array(0, np.uint8))
            self.const("zero.scale", np.array(1.0, np.float32))
        args = [op.inputs[0], *self.grid(op.inputs[0]), "zero", "zero.scale", "zero", *self.grid(op.output)]
        self.clamped(op, lambda out: self.node("QLinearAdd", args, out, domain=MS))

    def _weight_scales(self, op, table) -> tuple[np.ndarray, np.ndarray]:
        """(real value of one accumulator unit per channel, int32 bias in accumulator units).

        A conv with a narrow output takes the per-channel scale and bias that reproduce rsq.runtime's
        integers for every input where one exists (requant_fit), else with calibration counts those that keep
        the boundaries most values sit at; elsewhere, the bias rounded to the accumulator's units."""
        if self.model.tensors[op.output].kind == "narrow":
            fit = narrow_output_fit(self.model, self.r, op, self.shifts, self.counts.get(op.output))
        else:  # accumulator units per rsq.runtime unit: the weights' shift inside int8
            fit = rounded(table, 2 ** self.shifts.get(op.attrs["weight"], 0))
        return fit.sign * fit.scale * self.scales[op.output], (fit.sign * fit.bias).astype(np.int32)

    def _integer_inputs(self, op, table, x: str) -> tuple[list[str], np.ndarray]:
        """QLinearConv's and QGemm's first six inputs (x, its grid, the int8 weights, their per-channel
        scale and zero point) and the int32 bias. The kernel multiplies by x_scale * w_scale: w_scale
        carries BN's gain (and its sign)."""
        unit, bias = self._weight_scales(op, table)
        x_scale, x_zero = self.grid(op.inputs[0])
        w_scale = self.const(f"{op.name}.w_scale", (unit / self.grids[op.inputs[0]][0]).astype(np.float32))
        # QLinearConv takes one zero point for every channel; QGemm wants one per channel
        w_zero = self.const(f"{op.name}.w_zero", np.zeros(1 if op.kind == "conv" else len(unit), np.int8).squeeze())
        return [x, x_scale, x_zero, self.weight(op.attrs["weight"]), w_scale, w_zero], bias

    def _conv(self, op, table):
        attrs = op.attrs
        ph, pw = attrs["padding"]
        inputs, bias = self._integer_inputs(op, table, op.inputs[0])
        args = [*inputs, *self.grid(op.output), self.const(f"{op.name}.bias", bias)]
        self.clamped(op, lambda out: self.node("QLinearConv", args, out, kernel_shape=attrs["kernel"],
                                               strides=attrs["stride"], pads=[ph, pw, ph, pw], group=attrs["groups"]))

    def _linear(self, op, table):
        """The logits: int32 accumulators plus bias, scaled per class in float (no 8-bit rounding of the output).

        One QGemm without an output grid: it computes (acc + bias) x a_scale x b_scale[class] in float32,
        the same numbers as MatMulInteger + Add + DequantizeLinear at a quarter of the nodes (batch 1 pays
        per node)."""
        inputs, bias = self._integer_inputs(op, table, self.flatten(op.inputs[0]))
        self.node("QGemm", [*inputs, self.const(f"{op.name}.bias", bias)], "logits", domain=MS, transB=1)

    def _add(self, op, table):
        a, b = op.inputs
        target = self.fused.get(op.output, op)  # the requantize this add writes, if fused
        args = [a, *self.grid(a), b, *self.grid(b), *self.grid(target.output)]
        relu = 0 if int(table["lo"][0]) >= 0 else None  # the add's ReLU, kept on the requantize's grid
        self.clamped(target, lambda out: self.node("QLinearAdd", args, out, domain=MS),
                     lo_at_least=relu if target is not op else None)

    def _global_avg_pool(self, op, table):
        args = [op.inputs[0], *self.grid(op.inputs[0]), *self.grid(op.output)]
        self.clamped(op, lambda out: self.node("QLinearGlobalAveragePool", args, out, domain=MS, channels_last=0))

    def _max_pool(self, op, table):
        attrs = op.attrs
        ph, pw = attrs["padding"]
        self.node("MaxPool", [op.inputs[0]], op.output, kernel_shape=attrs["kernel"], strides=attrs["stride"],
                  pads=[ph, pw, ph, pw])
