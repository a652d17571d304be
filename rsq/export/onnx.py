"""ONNX writer: one graph per resolution, integers from the input's QuantizeLinear to the logits' DequantizeLinear.

Convs (and the final linear, as a 1x1 conv on [N, C, 1, 1]) are ConvInteger with int8 operands;
every requantization is spelled out in int64 ops (Mul, Add, Div, Sub, then Clip and Cast), the
same integers as rsq.runtime's floor((x * m0 + 2**(n-1)) / 2**n), n = 31 + shift (see requant).
So onnxruntime reproduces rsq.runtime bit for bit. The integer weights are written once, to weights.bin, and every
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


class OnnxGraph:
    """What every rsq ONNX graph builder shares: constants, nodes, the shared external weights."""

    def __init__(self, onnx, model: IntegerModel, resolution: int, locations):
        self.onnx, self.model, self.r, self.locations = onnx, model, resolution, locations
        self.helper = onnx.helper
        self.nodes, self.initializers = [], []
        self.tables = model.tables[resolution]
        self.scales = model.scales[resolution]
        self.count = 0

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(self.onnx.numpy_helper.from_array(np.asarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], output: str, domain: str = "", **attrs) -> str:
        self.count += 1
        self.nodes.append(self.helper.make_node(op, inputs, [output], name=f"{op}_{self.count}", domain=domain,
                                                **attrs))
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

    def finish(self, inputs, outputs, doc: str, domains=()):
        """The ModelProto of the nodes built so far (opset OPSET, plus ``domains`` at version 1)."""
        graph = self.helper.make_graph(self.nodes, f"{self.model.model}_r{self.r}", inputs, outputs,
                                       self.initializers)
        opsets = [self.helper.make_opsetid("", OPSET)] + [self.helper.make_opsetid(d, 1) for d in domains]
        proto = self.helper.make_model(graph, opset_imports=opsets, producer_name="rsq", doc_string=doc)
        proto.ir_version = IR_VERSION
        return proto


class _ExactGraph(OnnxGraph):
    """ConvInteger + int64 requantization: the same integers as rsq.runtime."""

    def __init__(self, onnx, model: IntegerModel, resolution: int, locations):
        super().__init__(onnx, model, resolution, locations)
        self.widened: dict[str, str] = {}

    def requant(self, x: str, prefix: str, m0, shift, shape, pre_shift: int = 0, bias=None) -> str:
        """rq((x << pre_shift) + bias, m0, shift) of rsq.runtime.fixedpoint, in four int64 ops.

        With y = x * (m0 << pre_shift) + (bias * m0 + 2**(n-1) + 2**62), n = 31 + shift, the
        result is Div(y, 2**n) - 2**(62-n): lower keeps |((x << pre_shift) + bias) * m0| < 2**61,
        so y > 0 and integer Div (which truncates) floors it. The same integers, regrouped.
        """
        n = MANTISSA_BITS + np.asarray(shift, dtype=np.int64).reshape(shape)
        m0 = np.asarray(m0, dtype=np.int64).reshape(shape)
        bias = np.zeros(shape, np.int64) if bias is None else np.asarray(bias, np.int64).reshape(shape)
        scale = self.const(f"{prefix}.m0_shifted", m0 << pre_shift)
        offset = self.const(f"{prefix}.offset", bias * m0 + (np.int64(1) << (n - 1)) + (np.int64(1) << 62))
        divisor = self.const(f"{prefix}.divisor", np.int64(1) << n)
        correction = self.const(f"{prefix}.correction", np.int64(1) << (62 - n))
        y = self.node("Add", [self.node("Mul", [x, scale], f"{prefix}.product"), offset], f"{prefix}.positive")
        return self.node("Sub", [self.node("Div", [y, divisor], f"{prefix}.quotient"), correction], f"{prefix}.rounded")

    def clamp_cast(self, x: str, prefix: str, table, output: str, dtype: str = "") -> str:
        lo = self.const(f"{prefix}.lo", np.array(int(table["lo"][0]), dtype=np.int64))
        hi = self.const(f"{prefix}.hi", np.array(int(table["hi"][0]), dtype=np.int64))
        clipped = self.node("Clip", [x, lo, hi], f"{prefix}.clipped")
        dtype = dtype or self.model.tensors[output].dtype
        return self.node("Cast", [clipped], output, to=self.onnx.helper.np_dtype_to_tensor_dtype(np.dtype(dtype)))

    def int64(self, x: str) -> str:
        """``x`` as int64, cast once however many ops read it."""
        if x not in self.widened:
            self.widened[x] = self.node("Cast", [x], f"{x}.int64", to=self.onnx.TensorProto.INT64)
        return self.widened[x]

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
        return self.finish([graph_input], outputs, f"rsq integer export, resolution {self.r}")

    def _quantize_input(self, op, table):
        info = self.model.tensors[op.output]
        dtype = np.dtype(info.dtype)
        scale = self.const(f"{op.name}.scale", np.array(self.scales[op.output], dtype=np.float32))
        zero = self.const(f"{op.name}.zero_point", np.array(0, dtype=dtype))
        lo, hi = int(table["lo"][0]), int(table["hi"][0])
        if (lo, hi) == (np.iinfo(dtype).min, np.iinfo(dtype).max):
            self.node("QuantizeLinear", [op.inputs[0], scale, zero], op.output)
            return
        quantized = self.node("QuantizeLinear", [op.inputs[0], scale, zero], f"{op.output}.full")
        self.node("Clip", [quantized, self.const(f"{op.name}.lo", np.array(lo, dtype=dtype)),
                           self.const(f"{op.name}.hi", np.array(hi, dtype=dtype))], op.output)

    def _requantize(self, op, table):
        y = self.requant(self.int64(op.inputs[0]), op.name, table["m0"], table["shift"], [])
        self.clamp_cast(y, op.name, table, op.output)

    def _conv(self, op, table):
        attrs = op.attrs
        ph, pw = attrs["padding"]
        self._layer(op, table, op.inputs[0], self.weight(attrs["weight"]), op.output, kernel_shape=attrs["kernel"],
                    strides=attrs["stride"], pads=[ph, pw, ph, pw], group=attrs["groups"])

    def _linear(self, op, table):
        # A 1x1 ConvInteger on [N, C, 1, 1]: the weights keep their stored [out, in] layout (as [out, in, 1, 1]).
        axes = self.const(f"{op.name}.axes", np.array([2, 3], np.int64))
        x4 = self.node("Unsqueeze", [op.inputs[0], axes], f"{op.name}.input4d")
        out4 = self._layer(op, table, x4, self.weight_4d(op.attrs["weight"]), f"{op.output}.4d")
        self.node("Flatten", [out4], op.output, axis=1)

    def _layer(self, op, table, x: str, weight: str, output: str, **conv_attrs) -> str:
        """clamp(rq((acc << bias_shift) + bias, m0, shift), lo, hi), per output channel."""
        acc = self.node("ConvInteger", [x, weight], f"{op.name}.acc", **conv_attrs)
        shape = [1, len(table["m0"]), 1, 1]
        y = self.requant(self.int64(acc), op.name, table["m0"], table["shift"], shape,
                         pre_shift=int(table["bias_shift"][0]), bias=table["bias"])
        return self.clamp_cast(y, op.name, table, output, self.model.tensors[op.output].dtype)

    def weight_4d(self, name: str) -> str:
        """A linear's [out, in] weights seen as [out, in, 1, 1]: a Reshape of the same external bytes."""
        flat = self.weight(name)
        shape = self.const(f"{name}.shape4d", np.array(list(self.model.weights[name].values.shape) + [1, 1], np.int64))
        return self.node("Reshape", [flat, shape], f"{name}.weight4d")

    def _add(self, op, table):
        a, b = op.inputs
        ya = self.requant(self.int64(a), f"{op.name}.a", table["m0_a"], table["shift_a"], [])
        yb = self.requant(self.int64(b), f"{op.name}.b", table["m0_b"], table["shift_b"], [])
        self.clamp_cast(self.node("Add", [ya, yb], f"{op.name}.sum"), op.name, table, op.output)

    def _global_avg_pool(self, op, table):
        axes = self.const(f"{op.name}.axes", np.array([2, 3], np.int64))
        total = self.node("ReduceSum", [self.int64(op.inputs[0]), axes], f"{op.name}.total", keepdims=0)
        y = self.requant(total, op.name, table["m0"], table["shift"], [])
        self.clamp_cast(y, op.name, table, op.output)

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

