"""ONNX writer: one graph per resolution, integers from the input's QuantizeLinear to the logits' DequantizeLinear,
and one switchable graph that holds every resolution (the input's height and width pick it).

Convs (and the final linear, as a 1x1 conv on [N, C, 1, 1]) are ConvInteger on the int8/uint8 activations
and uint8 weights (q + 128, zero point 128); every requantization is a call of one model-local function,
Requantize, made of int64 ops (Mul, Add, a uint64 BitShift, Sub; then Clip and Cast), the same integers
as rsq.runtime's floor((x * m0 + 2**(n-1)) / 2**n), n = 31 + shift (see requantize_function). So onnxruntime
reproduces rsq.runtime bit for bit. The integer weights are written once, to weights.bin, and every
graph points into it (ONNX external data).

The switchable graph (``model.onnx``) is the RS-Net as one file: the nodes once, each table that
differs by resolution stacked [R, ...], and a Gather picks the running resolution's row; the index
comes from the input's shape, so one onnxruntime session serves every resolution. An input size
that is not an exported resolution fails in that Gather (index out of range).
"""
from __future__ import annotations

import json
from pathlib import Path
from typing import Optional

import numpy as np

from ..errors import RsqError
from ..runtime.fixedpoint import MANTISSA_BITS
from ..runtime.model import IntegerModel

OPSET = 21
IR_VERSION = 10
WEIGHTS_FILE = "weights.bin"
ALIGN = 64
WEIGHT_ZERO_POINT = 128  # the exact graph's weights are uint8 q + 128


def require_onnx():
    """The onnx module, or a one-line RsqError naming what to install."""
    try:
        import onnx
    except ImportError:
        raise RsqError("ONNX export needs the onnx package: pip install onnx onnxruntime") from None
    return onnx


SWITCHABLE_FILE = "model.onnx"


def graph_file(resolution: int) -> str:
    return f"model_r{resolution}.onnx"


def write_onnx(model: IntegerModel, folder) -> list[Path]:
    """One ``model_r{R}.onnx`` per resolution plus the shared ``weights.bin``, and with more than one
    resolution the switchable ``model.onnx``; returns the per-resolution graph paths."""
    onnx = require_onnx()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    locations = write_weights(model, folder / WEIGHTS_FILE, offset=WEIGHT_ZERO_POINT)
    paths = []
    for r in model.resolutions:
        path = folder / graph_file(r)
        path.write_bytes(_ExactGraph(onnx, model, [r], locations).build().SerializeToString())
        paths.append(path)
    if len(model.resolutions) > 1:
        switchable = _ExactGraph(onnx, model, model.resolutions, locations).build()
        (folder / SWITCHABLE_FILE).write_bytes(switchable.SerializeToString())
    return paths


def write_weights(model: IntegerModel, path: Path, shifts: Optional[dict[str, int]] = None,
                  offset: int = 0) -> dict[str, tuple[int, int]]:
    """8-bit weights, each at a 64-byte aligned offset: {name: (offset, length)}; ``shifts[name]`` bits to the left.
    int8, or with ``offset`` 128 uint8 holding q + 128 (read with that zero point)."""
    data = bytearray()
    locations = {}
    for name in sorted(model.weights):
        data.extend(b"\0" * (-len(data) % ALIGN))
        values = (model.weights[name].values.astype(np.int16) << (shifts or {}).get(name, 0)) + offset
        payload = np.ascontiguousarray(values, dtype=np.uint8 if offset else np.int8).tobytes()
        locations[name] = (len(data), len(payload))
        data.extend(payload)
    path.write_bytes(bytes(data))
    return locations


def _is_default(name: str, value) -> bool:
    """Whether a conv/pool attribute holds its ONNX default (stride 1, no padding, one group)."""
    if name in ("strides", "pads"):
        return all(v == (1 if name == "strides" else 0) for v in value)
    return name == "group" and value == 1


class OnnxGraph:
    """What every rsq ONNX graph builder shares: constants, nodes, the shared external weights, and the
    modes: one resolution, or several in one switchable graph (``resolutions``, in the model's order)."""

    def __init__(self, onnx, model: IntegerModel, resolutions: list[int], locations):
        self.onnx, self.model, self.locations = onnx, model, locations
        self.modes = list(resolutions)
        self.r = self.modes[0]  # what every mode shares is read from the first
        self.switchable = len(self.modes) > 1
        self.mode: Optional[str] = None  # the running resolution's index (a graph tensor), when switchable
        self.helper = onnx.helper
        self.nodes, self.initializers = [], []
        self.tables = model.tables[self.r]
        self.scales = model.scales[self.r]
        self.shared: set[str] = set()

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def scalar(self, value, dtype) -> str:
        """A small constant shared by every reader of the same value and type, named by both (``uint8 128``,
        ``int64 [2, 3]``).

        Each resolution's graph repeats its constants, so sharing the small ones keeps five graphs near
        the size of one (the weights are stored once either way)."""
        array = np.array(value, dtype=dtype)
        name = f"{array.dtype} {array.tolist()!r}"
        if name not in self.shared:
            self.shared.add(name)
            self.const(name, array)
        return name

    def node(self, op: str, inputs: list[str], output: str, domain: str = "", **attrs) -> str:
        """A node, unnamed (the tensors carry the names), with its attributes' ONNX defaults left out."""
        attrs = {k: v for k, v in attrs.items() if not _is_default(k, v)}
        self.nodes.append(self.helper.make_node(op, inputs, [output], domain=domain, **attrs))
        return output

    def per_mode(self, name: str, value_of) -> str:
        """The constant ``value_of(resolution)``: one initializer when every mode's array is the same (a
        single-resolution graph's always are), else the arrays stacked and the running mode's row gathered."""
        arrays = [np.asarray(value_of(r)) for r in self.modes]
        if all(np.array_equal(a, arrays[0]) for a in arrays[1:]):
            return self.const(name, arrays[0])
        stacked = self.const(f"{name}.modes", np.stack(arrays))
        return self.node("Gather", [stacked, self.mode], name)

    def fixed(self, op_name: str, key: str) -> int:
        """A table entry every mode shares: a clamp bound, a bias shift (a tensor's grid is one for all modes)."""
        values = {int(self.model.tables[r][op_name][key][0]) for r in self.modes}
        assert len(values) == 1, f"{op_name}.{key} differs between resolutions"
        return values.pop()

    def graph_input(self):
        """The float image input, [batch, C, R, R] or, switchable, [batch, C, height, width]; a switchable
        graph's mode is then the index of the input's (height, width) among the modes' sizes, or len(modes)
        when it is none of them (so the first Gather fails rather than running some resolution's tables)."""
        model = self.model
        size = ["height", "width"] if self.switchable else [self.r, self.r]
        graph_input = self.helper.make_tensor_value_info(model.input, self.onnx.TensorProto.FLOAT,
                                                         ["batch", model.in_chans, *size])
        if not self.switchable:
            return graph_input
        x, count = model.input, len(self.modes)
        sizes = self.const("resolutions", np.array([[r, r] for r in self.modes], np.int64))
        size = self.node("Shape", [x], "input.size", start=2)
        match = self.node("Cast", [self.node("Equal", [sizes, size], "mode.equal")], "mode.match",
                          to=self.onnx.TensorProto.INT64)
        rows = self.node("ReduceMin", [match, self.scalar([1], np.int64)], "mode.rows", keepdims=0)
        # sum(rows * (i - count)) + count: i for the one matching row, count for none.
        offsets = self.const("mode.offsets", np.arange(count, dtype=np.int64) - count)
        found = self.node("ReduceSum", [self.node("Mul", [rows, offsets], "mode.offset")], "mode.found", keepdims=0)
        self.mode = self.node("Add", [found, self.scalar(count, np.int64)], "mode")
        return graph_input

    def weight(self, name: str, unsigned: bool = False) -> str:
        """The weights in weights.bin: int8, or ``unsigned`` uint8 (q + 128, write_weights' offset)."""
        values = self.model.weights[name].values
        tensor = self.onnx.TensorProto()
        tensor.name = f"{name}.weight"
        tensor.data_type = self.onnx.TensorProto.UINT8 if unsigned else self.onnx.TensorProto.INT8
        tensor.dims.extend(values.shape)
        offset, length = self.locations[name]
        tensor.data_location = self.onnx.TensorProto.EXTERNAL
        for key, value in (("location", WEIGHTS_FILE), ("offset", str(offset)), ("length", str(length))):
            entry = tensor.external_data.add()
            entry.key, entry.value = key, value
        self.initializers.append(tensor)
        return tensor.name

    def finish(self, inputs, outputs, doc: str, domains=(), functions=()):
        """The ModelProto of the nodes built so far (opset OPSET, plus ``domains`` at version 1)."""
        name = f"{self.model.model}_{'switchable' if self.switchable else f'r{self.r}'}"
        graph = self.helper.make_graph(self.nodes, name, inputs, outputs, self.initializers)
        opsets = [self.helper.make_opsetid("", OPSET)] + [self.helper.make_opsetid(d, 1) for d in domains]
        proto = self.helper.make_model(graph, opset_imports=opsets, producer_name="rsq", doc_string=doc,
                                       functions=list(functions))
        proto.ir_version = IR_VERSION
        describe(self.helper, proto, self.model, self.modes)
        return proto


def describe(helper, proto, model: IntegerModel, resolutions) -> None:
    """What an app needs to feed the graph, in its metadata (onnxruntime: ``get_modelmeta().custom_metadata_map``):
    ``rsq.resolutions`` (the image sizes it takes, comma-separated) and ``rsq.input`` (JSON: the
    normalisation from 8-bit pixels)."""
    entries = {"rsq.resolutions": ",".join(map(str, resolutions))}
    if "input" in model.meta:
        entries["rsq.input"] = json.dumps(model.meta["input"])
    helper.set_model_props(proto, entries)


DOMAIN = "ai.rsq"  # the model-local function below
REQUANTIZE = "Requantize"


def requantize_function(onnx):
    """clamp(rq((x << P) + bias, m0, shift), lo, hi) of rsq.runtime.fixedpoint as one ONNX function,
    int64 inside, cast to its attribute ``to``.

    Inputs: x (any integer type), m0 (int32), n = 31 + shift (uint8, 1..62), bias (int32) and
    up = 2**P (int64), the last four per channel or scalar; lo and hi (int64 scalars). With
    y = x * m0 * up + (bias * m0 + 2**(n-1) + 2**62) the result is (y >> n) - 2**(62-n): lower
    keeps |((x << P) + bias) * m0| < 2**61, so 0 < y < 2**63, and the shift (BitShift, on uint64: ONNX
    shifts only unsigned integers) floors it. The same integers, regrouped; an int64 Div took about 4x a
    shift's time (tools/results/probe_onnx_exact_speed.md).
    Defined once per graph, called once per requantization: each resolution's graph then holds only
    its tables (m0, n, bias), not four int64 constants per channel; onnxruntime inlines the function
    and folds the constant parts when it loads the graph."""
    h, TP = onnx.helper, onnx.TensorProto

    def constant(name, value):
        return h.make_node("Constant", [], [name], value=h.make_tensor("", TP.INT64, [], [value]))

    def op(kind, inputs, output, **attrs):
        return h.make_node(kind, inputs, [output], **attrs)

    body = [
        constant("two", 2), constant("big", 1 << 62),
        op("Cast", ["x"], "x64", to=TP.INT64), op("Cast", ["m0"], "m", to=TP.INT64),
        op("Cast", ["n"], "n64", to=TP.INT64), op("Cast", ["bias"], "b", to=TP.INT64),
        op("Pow", ["two", "n64"], "divisor"), op("Div", ["divisor", "two"], "half"),
        op("Mul", ["b", "m"], "bm"), op("Add", ["bm", "half"], "rounding"), op("Add", ["rounding", "big"], "offset"),
        op("Mul", ["m", "up"], "scale"), op("Mul", ["x64", "scale"], "product"),
        op("Add", ["product", "offset"], "positive"),
        op("Cast", ["positive"], "positive_u", to=TP.UINT64), op("Cast", ["n"], "n_u", to=TP.UINT64),
        op("BitShift", ["positive_u", "n_u"], "quotient_u", direction="RIGHT"),
        op("Cast", ["quotient_u"], "quotient", to=TP.INT64),
        op("Div", ["big", "divisor"], "correction"), op("Sub", ["quotient", "correction"], "rounded"),
        op("Clip", ["rounded", "lo", "hi"], "clipped"),
    ]
    cast = h.make_node("Cast", ["clipped"], ["y"])
    cast.attribute.append(h.make_attribute_ref("to", onnx.AttributeProto.INT))
    return h.make_function(DOMAIN, REQUANTIZE, ["x", "m0", "n", "bias", "up", "lo", "hi"], ["y"], body + [cast],
                           [h.make_opsetid("", OPSET)], attributes=["to"])


class _ExactGraph(OnnxGraph):
    """ConvInteger + the Requantize function: the same integers as rsq.runtime, for one resolution or,
    switchable, for several (``resolutions``, in the model's order)."""

    def requant(self, x: str, prefix: str, op_name: str, output: str, shape=(), bias: bool = False,
                suffix: str = "", clamp: bool = True, dtype=None) -> str:
        """clamp(rq((x << P) + bias, m0, shift), lo, hi) as ``output``: the op's tables (``m0``, ``shift``
        and, with ``bias``, ``bias`` and ``bias_shift`` = P entries of op ``op_name``'s table, each name plus
        ``suffix``) and one Requantize call. Unclamped (``clamp=False``), the int64 result of rq."""
        def entry(key, dtype):
            return lambda r: np.asarray(self.model.tables[r][op_name][key + suffix], dtype=dtype).reshape(shape)

        def exponent(r):
            n = MANTISSA_BITS + entry("shift", np.int64)(r)
            assert n.min(initial=1) >= 1 and n.max(initial=1) <= 62, "lower keeps 31 + shift in 1..62"
            return n.astype(np.uint8)

        m0 = self.per_mode(f"{prefix}.m0", entry("m0", np.int32))
        n = self.per_mode(f"{prefix}.n", exponent)
        if bias:
            bias, up = self.per_mode(f"{prefix}.bias", entry("bias", np.int32)), self.bias_scale(op_name)
        else:
            bias, up = self.scalar(0, np.int32), self.scalar(1, np.int64)
        if clamp:
            lo, hi = self.fixed(op_name, "lo"), self.fixed(op_name, "hi")
            dtype = np.dtype(dtype or self.model.tensors[output].dtype)
        else:
            lo, hi, dtype = np.iinfo(np.int64).min, np.iinfo(np.int64).max, np.dtype(np.int64)
        return self.node(REQUANTIZE, [x, m0, n, bias, up, self.scalar(lo, np.int64), self.scalar(hi, np.int64)],
                         output, domain=DOMAIN,
                         to=self.onnx.helper.np_dtype_to_tensor_dtype(dtype))

    def bias_scale(self, op_name: str) -> str:
        """2**P, the accumulator's shift before its bias is added: a shared scalar, or per mode where the
        modes' P differ (lower picks P from the bias's size, which BN sets per resolution)."""
        shifts = {r: int(self.model.tables[r][op_name]["bias_shift"][0]) for r in self.modes}
        if len(set(shifts.values())) == 1:
            return self.scalar(1 << shifts[self.r], np.int64)
        return self.per_mode(f"{op_name}.up", lambda r: np.array(1 << shifts[r], np.int64))

    def scale(self, name: str, tensor: str) -> str:
        return self.per_mode(name, lambda r: np.array(self.model.scales[r][tensor], dtype=np.float32))

    # ---- ops ----

    def build(self):
        model, TP = self.model, self.onnx.TensorProto
        batch = "batch"
        graph_input = self.graph_input()
        for op in model.ops:
            getattr(self, f"_{op.kind}")(op)
        logits_int = model.output
        scale = self.scale("logits.scale", model.output)
        self.node("DequantizeLinear", [logits_int, scale], "logits")
        outputs = [self.helper.make_tensor_value_info("logits", TP.FLOAT, [batch, model.num_classes]),
                   self.helper.make_tensor_value_info(logits_int, TP.INT32, [batch, model.num_classes])]
        doc = (f"rsq integer export, resolutions {'/'.join(map(str, self.modes))}: the input's size picks one"
               if self.switchable else f"rsq integer export, resolution {self.r}")
        return self.finish([graph_input], outputs, doc, domains=(DOMAIN,), functions=[requantize_function(self.onnx)])

    def _quantize_input(self, op):
        info = self.model.tensors[op.output]
        dtype = np.dtype(info.dtype)
        scale = self.scale(f"{op.name}.scale", op.output)
        zero = self.scalar(0, dtype)
        lo, hi = self.fixed(op.name, "lo"), self.fixed(op.name, "hi")
        if (lo, hi) == (np.iinfo(dtype).min, np.iinfo(dtype).max):
            self.node("QuantizeLinear", [op.inputs[0], scale, zero], op.output)
            return
        quantized = self.node("QuantizeLinear", [op.inputs[0], scale, zero], f"{op.output}.full")
        self.node("Clip", [quantized, self.scalar(lo, dtype), self.scalar(hi, dtype)], op.output)

    def _requantize(self, op):
        self.requant(op.inputs[0], op.name, op.name, op.output)

    def _conv(self, op):
        attrs = op.attrs
        ph, pw = attrs["padding"]
        self._layer(op, op.inputs[0], self.weight(attrs["weight"], unsigned=True), op.output,
                    kernel_shape=attrs["kernel"], strides=attrs["stride"], pads=[ph, pw, ph, pw], group=attrs["groups"])

    def _linear(self, op):
        # A 1x1 ConvInteger on [N, C, 1, 1]: the weights keep their stored [out, in] layout (as [out, in, 1, 1]).
        axes = self.scalar([2, 3], np.int64)
        x4 = self.node("Unsqueeze", [op.inputs[0], axes], f"{op.name}.input4d")
        out4 = self._layer(op, x4, self.weight_4d(op.attrs["weight"]), f"{op.output}.4d")
        self.node("Flatten", [out4], op.output, axis=1)

    def _layer(self, op, x: str, weight: str, output: str, **conv_attrs) -> str:
        """clamp(rq((acc << bias_shift) + bias, m0, shift), lo, hi), per output channel."""
        # uint8 weights with zero point 128: onnxruntime's ConvInteger runs u8/s8 x u8 4-5.5x as fast as x s8
        # (tools/results/probe_onnx_exact_speed.md); the products are the same integers.
        zero = self.scalar(WEIGHT_ZERO_POINT, np.uint8)
        acc = self.node("ConvInteger", [x, weight, "", zero], f"{op.name}.acc", **conv_attrs)
        channels = len(self.tables[op.name]["m0"])
        return self.requant(acc, op.name, op.name, output, [1, channels, 1, 1], bias=True,
                            dtype=self.model.tensors[op.output].dtype)

    def weight_4d(self, name: str) -> str:
        """A linear's [out, in] weights seen as [out, in, 1, 1]: a Reshape of the same external bytes."""
        flat = self.weight(name, unsigned=True)
        shape = self.const(f"{name}.shape4d", np.array(list(self.model.weights[name].values.shape) + [1, 1], np.int64))
        return self.node("Reshape", [flat, shape], f"{name}.weight4d")

    def _add(self, op):
        a, b = op.inputs
        ya = self.requant(a, f"{op.name}.a", op.name, f"{op.name}.a.rounded", suffix="_a", clamp=False)
        yb = self.requant(b, f"{op.name}.b", op.name, f"{op.name}.b.rounded", suffix="_b", clamp=False)
        total = self.node("Add", [ya, yb], f"{op.name}.sum")
        clipped = self.node("Clip", [total, self.scalar(self.fixed(op.name, "lo"), np.int64),
                                     self.scalar(self.fixed(op.name, "hi"), np.int64)], f"{op.name}.clipped")
        self.node("Cast", [clipped], op.output,
                  to=self.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(self.model.tensors[op.output].dtype)))

    def _global_avg_pool(self, op):
        axes = self.scalar([2, 3], np.int64)
        # The sum in int64: an int32 sum of a pooled map could overflow.
        wide = self.node("Cast", [op.inputs[0]], f"{op.name}.int64", to=self.onnx.TensorProto.INT64)
        total = self.node("ReduceSum", [wide, axes], f"{op.name}.total", keepdims=0)
        self.requant(total, op.name, op.name, op.output)

    def _max_pool(self, op):
        """MaxPool on the integers themselves (no requantization: the output keeps the input's grid).

        onnxruntime's MaxPool has int8/uint8 kernels but none for int32: a wide tensor goes through
        double, which holds every int32 exactly. MaxPool pads with -infinity, as the runtime does.
        """
        attrs = op.attrs
        ph, pw = attrs["padding"]
        pool = dict(kernel_shape=attrs["kernel"], strides=attrs["stride"], pads=[ph, pw, ph, pw])
        if self.model.tensors[op.inputs[0]].kind == "narrow":
            self.node("MaxPool", [op.inputs[0]], op.output, **pool)
            return
        TP = self.onnx.TensorProto
        as_double = self.node("Cast", [op.inputs[0]], f"{op.name}.double", to=TP.DOUBLE)
        pooled = self.node("MaxPool", [as_double], f"{op.name}.pooled", **pool)
        self.node("Cast", [pooled], op.output, to=TP.INT32)
