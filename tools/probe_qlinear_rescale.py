"""Which onnxruntime op rescales a uint8 tensor onto another grid fastest, with the same integers?

The QLinear export (rsq/export/qlinear.py) rescales the 8-bit residual stream onto the grid of each
conv that reads it. This times the candidates on one [N, C, H, W] uint8 tensor (default: ResNet-20's
first stage at batch 32), one thread, the candidates taking turns, each call after an untimed one of
its own, and checks each against the exact result clamp(round(x * s_in / s_out) + zero_out, 0, 255):

  add_zero   QLinearAdd of an exact 0 (integer 0, step 1)       what the writer uses
  mul_one    QLinearMul by an exact 1 (integer 1, step 1)        what it used before
  leaky      QLinearLeakyRelu with alpha 1 (a 256-entry lookup)
  dq_q       DequantizeLinear + QuantizeLinear (a float32 tensor between)

    python tools/probe_qlinear_rescale.py [--shape 32,16,28,28] [--calls 200]
"""
from __future__ import annotations

import argparse
import statistics
import sys
import time

import numpy as np

from benchlib import cpu_name, write_outputs

MS = "com.microsoft"
STEP_IN, STEP_OUT, ZERO_OUT = 0.05, 0.21, 240  # a 4-bit grid [0, 15] stored with zero point 255 - 15


def graphs(shape: list[int]) -> dict:
    from onnx import TensorProto, helper, numpy_helper

    def const(name, value):
        return numpy_helper.from_array(np.asarray(value), name)

    inits = [const("s_in", np.float32(STEP_IN)), const("z_in", np.uint8(0)), const("s_out", np.float32(STEP_OUT)),
             const("z_out", np.uint8(ZERO_OUT)), const("one", np.uint8(1)), const("zero", np.uint8(0)),
             const("unit", np.float32(1.0))]
    rescale_args = ["x", "s_in", "z_in", None, "unit", "zero", "s_out", "z_out"]
    nodes = {
        "add_zero": [helper.make_node("QLinearAdd", [a or "zero" for a in rescale_args], ["y"], domain=MS)],
        "mul_one": [helper.make_node("QLinearMul", [a or "one" for a in rescale_args], ["y"], domain=MS)],
        "leaky": [helper.make_node("QLinearLeakyRelu", ["x", "s_in", "z_in", "s_out", "z_out"], ["y"], domain=MS,
                                   alpha=1.0)],
        "dq_q": [helper.make_node("DequantizeLinear", ["x", "s_in", "z_in"], ["f"]),
                 helper.make_node("QuantizeLinear", ["f", "s_out", "z_out"], ["y"])],
    }
    protos = {}
    for name, graph_nodes in nodes.items():
        used = {i for n in graph_nodes for i in n.input}
        graph = helper.make_graph(graph_nodes, name, [helper.make_tensor_value_info("x", TensorProto.UINT8, shape)],
                                  [helper.make_tensor_value_info("y", TensorProto.UINT8, shape)],
                                  [t for t in inits if t.name in used])
        proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21), helper.make_opsetid(MS, 1)])
        proto.ir_version = 10
        protos[name] = proto
    return protos


def main() -> None:
    import onnxruntime as ort

    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--shape", default="32,16,28,28")
    parser.add_argument("--calls", type=int, default=200)
    parser.add_argument("--out", default="tools/results/probe_qlinear_rescale")
    args = parser.parse_args()
    shape = [int(v) for v in args.shape.split(",")]
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    sessions = {name: ort.InferenceSession(proto.SerializeToString(), options, providers=["CPUExecutionProvider"])
                for name, proto in graphs(shape).items()}
    x = np.random.default_rng(0).integers(0, 256, shape).astype(np.uint8)
    exact = np.clip(np.rint(x * STEP_IN / STEP_OUT) + ZERO_OUT, 0, 255).astype(np.uint8)
    differ = {name: int((s.run(None, {"x": x})[0] != exact).sum()) for name, s in sessions.items()}
    times = {name: [] for name in sessions}
    for _ in range(args.calls):
        for name, session in sessions.items():
            session.run(None, {"x": x})
            start = time.perf_counter()
            session.run(None, {"x": x})
            times[name].append(time.perf_counter() - start)
    ms = {name: 1000 * statistics.median(t) for name, t in times.items()}
    lines = ["# Rescaling a uint8 tensor onto another grid in onnxruntime", "",
             f"CPU: {cpu_name()}. onnxruntime {ort.__version__}, one thread; tensor {shape} (uniform 0-255), "
             f"step {STEP_IN} -> {STEP_OUT}, zero point 0 -> {ZERO_OUT}; median of {args.calls} calls per op, the "
             "ops taking turns, each call after an untimed one.",
             "Command: `python tools/probe_qlinear_rescale.py " + " ".join(sys.argv[1:]) + "`", "",
             "| op | median ms | time / add_zero | integers that differ from the exact rescale |",
             "|:---|---:|---:|---:|"]
    for name in sessions:
        lines.append(f"| {name} | {ms[name]:.4f} | {ms[name] / ms['add_zero']:.2f}x | {differ[name]} of {x.size} |")
    write_outputs(args.out, lines, {"settings": vars(args), "cpu": cpu_name(), "ms": ms, "differ": differ})


if __name__ == "__main__":
    main()
