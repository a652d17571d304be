"""ONNX writer: one graph per resolution, integers from the input's QuantizeLinear to the logits' DequantizeLinear.

Convs (and the final linear, as a 1x1 conv on [N, C, 1, 1]) are ConvInteger with int8 operands;
every requantization is a call of one model-local function, Requantize, made of int64 ops (Mul,
Add, Pow, Div, Sub; then Clip and Cast), the same integers as rsq.runtime's
floor((x * m0 + 2**(n-1)) / 2**n), n = 31 + shift (see requantize_function). So onnxruntime
reproduces rsq.runtime bit for bit. The integer weights are written once, to weights.bin, and every
resolution's graph points into it (ONNX external data).
"""
from __future__ import annotations

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


def require_onnx():
    """The onnx module, or a one-line RsqError naming what to install."""
    try:
        import onnx
    except ImportError:
        raise RsqError("ONNX export needs the onnx package: pip install onnx onnxruntime") from None
    return onnx


def graph_file(resolution: int) -> str:
    return f"model_r{resolution}.onnx"


def write_onnx(model: IntegerModel, folder) -> list[Path]:
    """One ``model_r{R}.onnx`` per resolution plus the shared ``weights.bin``; returns the graph paths."""
    onnx = require_onnx()
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    locations = write_weights(model, folder / WEIGHTS_FILE)
    paths = []
    for r in model.resolutions:
        proto = _ExactGraph(onnx, model, r, locations).build()
        path = folder / graph_file(r)
        path.write_bytes(proto.SerializeToString())
        paths.append(path)
    return paths


def write_weights(model: IntegerModel, path: Path, shifts: Optional[dict[str, int]] = None) -> dict[str, tuple[int, int]]:
    """int8 weights, each at a 64-byte aligned offset: {name: (offset, length)}; ``shifts[name]`` bits to the left."""
    data = bytearray()
    locations = {}
    for name in sorted(model.weights):
        data.extend(b"\0" * (-len(data) % ALIGN))
        values = model.weights[name].values.astype(np.int16) << (shifts or {}).get(name, 0)
        payload = np.ascontiguousarray(values, dtype=np.int8).tobytes()
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
    """What every rsq ONNX graph builder shares: constants, nodes, the shared external weights."""

    def __init__(self, onnx, model: IntegerModel, resolution: int, locations):
        self.onnx, self.model, self.r, self.locations = onnx, model, resolution, locations
        self.helper = onnx.helper
        self.nodes, self.initializers = [], []
        self.tables = model.tables[resolution]
        self.scales = model.scales[resolution]
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

    def weight(self, name: str) -> str:
        values = self.model.weights[name].values
        tensor = self.onnx.TensorProto()
        tensor.name = f"{name}.weight"
        tensor.data_type = self.onnx.TensorProto.INT8
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
        graph = self.helper.make_graph(self.nodes, f"{self.model.model}_r{self.r}", inputs, outputs,
                                       self.initializers)
        opsets = [self.helper.make_opsetid("", OPSET)] + [self.helper.make_opsetid(d, 1) for d in domains]
        proto = self.helper.make_model(graph, opset_imports=opsets, producer_name="rsq", doc_string=doc,
                                       functions=list(functions))
        proto.ir_version = IR_VERSION
        return proto


DOMAIN = "ai.rsq"  # the model-local function below
REQUANTIZE = "Requantize"


def requantize_function(onnx):
    """clamp(rq((x << P) + bias, m0, shift), lo, hi) of rsq.runtime.fixedpoint as one ONNX function,
    int64 inside, cast to its attribute ``to``.

    Inputs: x (any integer type), m0 (int32), n = 31 + shift (uint8, 1..62), bias (int32) and
    up = 2**P (int64), the last four per channel or scalar; lo and hi (int64 scalars). With
    y = x * m0 * up + (bias * m0 + 2**(n-1) + 2**62) the result is Div(y, 2**n) - 2**(62-n): lower
    keeps |((x << P) + bias) * m0| < 2**61, so y > 0 and integer Div (which truncates) floors it.
    The same integers, regrouped.
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
        op("Add", ["product", "offset"], "positive"), op("Div", ["positive", "divisor"], "quotient"),
        op("Div", ["big", "divisor"], "correction"), op("Sub", ["quotient", "correction"], "rounded"),
        op("Clip", ["rounded", "lo", "hi"], "clipped"),
    ]
    cast = h.make_node("Cast", ["clipped"], ["y"])
    cast.attribute.append(h.make_attribute_ref("to", onnx.AttributeProto.INT))
    return h.make_function(DOMAIN, REQUANTIZE, ["x", "m0", "n", "bias", "up", "lo", "hi"], ["y"], body + [cast],
                           [h.make_opsetid("", OPSET)], attributes=["to"])


class _ExactGraph(OnnxGraph):
    """ConvInteger + the Requantize function: the same integers as rsq.runtime."""

    def requant(self, x: str, prefix: str, table, output: str, shape=(), pre_shift: int = 0, bias=None,
                suffix: str = "", clamp: bool = True, dtype=None) -> str:
        """clamp(rq((x << pre_shift) + bias, m0, shift), lo, hi) as ``output``: the op's tables (``m0``, ``shift``
        and ``bias`` entries of ``table``, each name plus ``suffix``) and one Requantize call. Unclamped
        (``clamp=False``), the int64 result of rq."""
        n = MANTISSA_BITS + np.asarray(table["shift" + suffix], dtype=np.int64).reshape(shape)
        assert n.min(initial=1) >= 1 and n.max(initial=1) <= 62, "lower keeps 31 + shift in 1..62"
        m0 = self.const(f"{prefix}.m0", np.asarray(table["m0" + suffix], dtype=np.int32).reshape(shape))
        n = self.const(f"{prefix}.n", n.astype(np.uint8))
        bias = (self.scalar(0, np.int32) if bias is None
                else self.const(f"{prefix}.bias", np.asarray(bias, np.int32).reshape(shape)))
        if clamp:
            lo, hi = int(table["lo"][0]), int(table["hi"][0])
            dtype = np.dtype(dtype or self.model.tensors[output].dtype)
        else:
            lo, hi, dtype = np.iinfo(np.int64).min, np.iinfo(np.int64).max, np.dtype(np.int64)
        return self.node(REQUANTIZE, [x, m0, n, bias, self.scalar(1 << pre_shift, np.int64),
                                      self.scalar(lo, np.int64), self.scalar(hi, np.int64)], output, domain=DOMAIN,
                         to=self.onnx.helper.np_dtype_to_tensor_dtype(dtype))

    # ---- ops ----

    def build(self):
        model, TP = self.model, self.onnx.TensorProto
        batch = "batch"
        graph_input = self.helper.make_tensor_value_info(model.input, TP.FLOAT, [batch, model.in_chans, self.r, self.r])
        for op in model.ops:
            getattr(self, f"_{op.kind}")(op, self.tables[op.name])
        logits_int = model.output
        scale = self.const("logits.scale", np.array(self.scales[model.output], dtype=np.float32))
        self.node("DequantizeLinear", [logits_int, scale], "logits")
        outputs = [self.helper.make_tensor_value_info("logits", TP.FLOAT, [batch, model.num_classes]),
                   self.helper.make_tensor_value_info(logits_int, TP.INT32, [batch, model.num_classes])]
        return self.finish([graph_input], outputs, f"rsq integer export, resolution {self.r}", domains=(DOMAIN,),
                           functions=[requantize_function(self.onnx)])

    def _quantize_input(self, op, table):
        info = self.model.tensors[op.output]
        dtype = np.dtype(info.dtype)
        scale = self.const(f"{op.name}.scale", np.array(self.scales[op.output], dtype=np.float32))
        zero = self.scalar(0, dtype)
        lo, hi = int(table["lo"][0]), int(table["hi"][0])
        if (lo, hi) == (np.iinfo(dtype).min, np.iinfo(dtype).max):
            self.node("QuantizeLinear", [op.inputs[0], scale, zero], op.output)
            return
        quantized = self.node("QuantizeLinear", [op.inputs[0], scale, zero], f"{op.output}.full")
        self.node("Clip", [quantized, self.scalar(lo, dtype), self.scalar(hi, dtype)], op.output)

    def _requantize(self, op, table):
        self.requant(op.inputs[0], op.name, table, op.output)

    def _conv(self, op, table):
        attrs = op.attrs
        ph, pw = attrs["padding"]
        self._layer(op, table, op.inputs[0], self.weight(attrs["weight"]), op.output, kernel_shape=attrs["kernel"],
                    strides=attrs["stride"], pads=[ph, pw, ph, pw], group=attrs["groups"])

    def _linear(self, op, table):
        # A 1x1 ConvInteger on [N, C, 1, 1]: the weights keep their stored [out, in] layout (as [out, in, 1, 1]).
        axes = self.scalar([2, 3], np.int64)
        x4 = self.node("Unsqueeze", [op.inputs[0], axes], f"{op.name}.input4d")
        out4 = self._layer(op, table, x4, self.weight_4d(op.attrs["weight"]), f"{op.output}.4d")
        self.node("Flatten", [out4], op.output, axis=1)

    def _layer(self, op, table, x: str, weight: str, output: str, **conv_attrs) -> str:
        """clamp(rq((acc << bias_shift) + bias, m0, shift), lo, hi), per output channel."""
        acc = self.node("ConvInteger", [x, weight], f"{op.name}.acc", **conv_attrs)
        return self.requant(acc, op.name, table, output, [1, len(table["m0"]), 1, 1],
                            pre_shift=int(table["bias_shift"][0]), bias=table["bias"],
                            dtype=self.model.tensors[op.output].dtype)

    def weight_4d(self, name: str) -> str:
        """A linear's [out, in] weights seen as [out, in, 1, 1]: a Reshape of the same external bytes."""
        flat = self.weight(name)
        shape = self.const(f"{name}.shape4d", np.array(list(self.model.weights[name].values.shape) + [1, 1], np.int64))
        return self.node("Reshape", [flat, shape], f"{name}.weight4d")

    def _add(self, op, table):
        a, b = op.inputs
        ya = self.requant(a, f"{op.name}.a", table, f"{op.name}.a.rounded", suffix="_a", clamp=False)
        yb = self.requant(b, f"{op.name}.b", table, f"{op.name}.b.rounded", suffix="_b", clamp=False)
        total = self.node("Add", [ya, yb], f"{op.name}.sum")
        clipped = self.node("Clip", [total, self.scalar(int(table["lo"][0]), np.int64),
                                     self.scalar(int(table["hi"][0]), np.int64)], f"{op.name}.clipped")
        self.node("Cast", [clipped], op.output,
                  to=self.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(self.model.tensors[op.output].dtype)))

    def _global_avg_pool(self, op, table):
        axes = self.scalar([2, 3], np.int64)
        # The sum in int64: an int32 sum of a pooled map could overflow.
        wide = self.node("Cast", [op.inputs[0]], f"{op.name}.int64", to=self.onnx.TensorProto.INT64)
        total = self.node("ReduceSum", [wide, axes], f"{op.name}.total", keepdims=0)
        self.requant(total, op.name, table, op.output)

    def _max_pool(self, op, table):
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

