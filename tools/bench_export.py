"""Integer export: latency per engine and size on disk per format, for one trained checkpoint.

    .venv/bin/python tools/bench_export.py CKPT [--out tools/results/bench_export] [--repeats 20]

Per resolution, batch 1 and 32 (median of timed runs after a warm-up):
  rsq ONNX int   rsq's integer export in onnxruntime (ConvInteger + int64 requantization)
  ORT fp32       onnxruntime on the same network in float32, BatchNorm folded (written here)
  ORT QOperator  onnxruntime.quantization.quantize_static of that float model (QLinearConv, per-channel int8)
  torch fp32     PyTorch eager on the float (dequantized) model
  rsq.runtime    the numpy reference runtime (int32 GEMM, and exact float32 GEMM)
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import statistics
import subprocess
import tempfile
import time
from pathlib import Path

# One thread in every engine, numpy's BLAS included (it reads these before it starts its pool).
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_description() -> str:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown").strip()
    flags = fields.get("Flags", "").split()
    return f"{name}; SIMD flags: {' '.join(f for f in SIMD_FLAGS if f in flags) or 'none found'}"


def median_ms(engines: dict, repeats: dict) -> dict:
    """Median ms per engine; the engines take turns within each round, so a busy machine slows all alike."""
    times = {name: [] for name in engines}
    for fn in engines.values():
        fn()  # warm-up
    for round_ in range(max(repeats.values())):
        for name, fn in engines.items():
            if round_ < repeats[name]:
                start = time.perf_counter()
                fn()
                times[name].append(time.perf_counter() - start)
    return {name: 1000 * statistics.median(t) for name, t in times.items()}


def float_onnx(model, integer_model, path: Path, resolution: int) -> None:
    """The fake-quant network as a plain float32 ONNX graph: dequantized weights, BN folded into the convs."""
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from rsq.convert import mode_state
    from rsq.export.steps import bn_affine
    from rsq.export.trace import INPUT, trace_float_ops, trace_graph

    key = mode_state(model).find(resolution).key
    nodes, inits = [], []
    for op in trace_float_ops(model, trace_graph(model)):
        if op.kind == "output":
            nodes.append(helper.make_node("Identity", [op.inputs[0]], ["logits"]))
        elif op.kind in ("conv", "linear"):
            weight = integer_model.weights[op.name]
            w = weight.values.astype(np.float32) * weight.step.reshape((-1,) + (1,) * (weight.values.ndim - 1))
            scale, shift = bn_affine(op.bn, key, w.shape[0])
            bias = op.module.bias.detach().double().numpy() if op.module.bias is not None else np.zeros(w.shape[0])
            w = (w * scale.reshape((-1,) + (1,) * (w.ndim - 1))).astype(np.float32)
            b = (scale * bias + shift).astype(np.float32)
            inits += [numpy_helper.from_array(w, f"{op.name}.w"), numpy_helper.from_array(b, f"{op.name}.b")]
            out = op.output if op.act is None else f"{op.output}.pre"
            if op.kind == "conv":
                m = op.module
                nodes.append(helper.make_node("Conv", [op.inputs[0], f"{op.name}.w", f"{op.name}.b"], [out],
                                              kernel_shape=list(m.kernel_size), strides=list(m.stride),
                                              pads=list(m.padding) * 2, group=m.groups))
            else:
                nodes.append(helper.make_node("Gemm", [op.inputs[0], f"{op.name}.w", f"{op.name}.b"], [out], transB=1))
            if op.act is not None:
                nodes.append(helper.make_node("Relu", [out], [op.output]))
        elif op.kind == "add":
            out = op.output if op.act is None else f"{op.output}.pre"
            nodes.append(helper.make_node("Add", op.inputs, [out]))
            if op.act is not None:
                nodes.append(helper.make_node("Relu", [out], [op.output]))
        else:
            nodes.append(helper.make_node("GlobalAveragePool", op.inputs, [f"{op.output}.4d"]))
            nodes.append(helper.make_node("Flatten", [f"{op.output}.4d"], [op.output], axis=1))
    graph = helper.make_graph(nodes, "float", [helper.make_tensor_value_info(
        INPUT, TensorProto.FLOAT, ["batch", integer_model.in_chans, resolution, resolution])],
        [helper.make_tensor_value_info("logits", TensorProto.FLOAT, ["batch", integer_model.num_classes])], inits)
    proto = helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)])
    proto.ir_version = 10
    onnx.checker.check_model(proto)
    onnx.save(proto, str(path))


def static_quantized(float_path: Path, out: Path, calibration: np.ndarray) -> None:
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.batches = iter([{"input": calibration[i:i + 16]} for i in range(0, len(calibration), 16)])

        def get_next(self):
            return next(self.batches, None)

    quantize_static(str(float_path), str(out), Reader(), quant_format=QuantFormat.QOperator, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)


def folder_size(path: Path) -> int:
    return sum(p.stat().st_size for p in path.rglob("*") if p.is_file())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint")
    parser.add_argument("--out", default="tools/results/bench_export")
    parser.add_argument("--repeats", type=int, default=20)
    args = parser.parse_args()
    torch.set_num_threads(1)
    import onnxruntime as ort

    from rsq.checkpoint import checkpoint_config, load_model
    from rsq.convert import using_mode
    from rsq.data import fashion_mnist
    from rsq.data.multires import resize_batch
    from rsq.export import export_checkpoint, lower_checkpoint_model
    from rsq.quantize import dequantize_
    from rsq.runtime import Runtime, load

    model, ckpt = load_model(args.checkpoint)
    config = checkpoint_config(ckpt)
    work = Path(tempfile.mkdtemp(prefix="bench_export."))
    try:
        export = work / "export"
        for fmt in ("onnx", "packed"):
            export_checkpoint(args.checkpoint, fmt, export)
        integer_model = lower_checkpoint_model(model, config)
        float_model = dequantize_(copy.deepcopy(model)).eval()
        options = ort.SessionOptions()
        options.intra_op_num_threads = 1
        session = lambda path: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
        images, _ = fashion_mnist.load("test", None)
        images = (images[:64].float() / 255 - fashion_mnist.MEAN[0]) / fashion_mnist.STD[0]
        runtimes = {"int32": Runtime(load(export / "packed")), "float": Runtime(load(export / "packed"), gemm="float")}
        rows, sizes = [], {}
        for r in integer_model.resolutions:
            x_all = resize_batch(images, r)
            float_path, qop_path = work / f"float_r{r}.onnx", work / f"qop_r{r}.onnx"
            float_onnx(model, integer_model, float_path, r)
            static_quantized(float_path, qop_path, x_all.numpy())
            sizes[f"ORT fp32 graph (r{r})"] = float_path.stat().st_size
            sizes[f"ORT QOperator graph (r{r})"] = qop_path.stat().st_size
            engines = {"rsq ONNX int": session(export / "onnx" / f"model_r{r}.onnx"),
                       "ORT fp32": session(float_path), "ORT QOperator": session(qop_path)}
            for batch in (1, 32):
                x = x_all[:batch]
                xn = x.numpy()
                calls = {name: (lambda s=s: s.run(None, {"input": xn})) for name, s in engines.items()}
                calls["torch fp32"] = lambda: _torch_forward(float_model, x, r, using_mode)
                for gemm, rt in runtimes.items():
                    calls[f"rsq.runtime ({gemm} GEMM)"] = lambda rt=rt: rt.run(xn, r)
                repeats = {name: args.repeats if "runtime" not in name else max(3, args.repeats // 4) for name in calls}
                timings = median_ms(calls, repeats)
                rows.append((r, batch, timings))
                print(r, batch, {k: round(v, 3) for k, v in timings.items()}, flush=True)
        sizes["checkpoint.pt"] = Path(export / "checkpoint.pt").stat().st_size
        sizes["rsq ONNX folder (all resolutions)"] = folder_size(export / "onnx")
        sizes["  of which weights.bin (int8, shared)"] = (export / "onnx" / "weights.bin").stat().st_size
        sizes["rsq packed folder (all resolutions)"] = folder_size(export / "packed")
        sizes["  of which weights.bin (bit-packed)"] = (export / "packed" / "weights.bin").stat().st_size
        write_report(args, config, rows, sizes)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def _torch_forward(model, x, resolution, using_mode):
    with torch.no_grad(), using_mode(model, resolution):
        return model(x)


def write_report(args, config, rows, sizes) -> None:
    import onnxruntime as ort
    names = list(rows[0][2])
    lines = ["# Integer export: latency and size", "",
             f"`tools/bench_export.py {args.checkpoint}`: {config.model}, W{config.weight_bits}A{config.act_bits} "
             f"(first/last {config.first_last}), one thread per engine, median ms per batch of {args.repeats} runs "
             f"({max(3, args.repeats // 4)} for rsq.runtime), the engines taking turns within each round.", "",
             f"CPU: {cpu_description()}; onnxruntime {ort.__version__}, torch {torch.__version__}; load average "
             f"{os.getloadavg()[0]:.1f} at the end (other jobs share the machine: compare within a row).", "",
             "| resolution | batch | " + " | ".join(names) + " |",
             "|---:|---:|" + "---:|" * len(names)]
    for r, batch, timings in rows:
        lines.append(f"| {r} | {batch} | " + " | ".join(f"{timings[n]:.3f}" for n in names) + " |")
    lines += ["", "| artifact | bytes |", "|:---|---:|"]
    lines += [f"| {name} | {size} |" for name, size in sizes.items()]
    path = Path(args.out + ".md")
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text("\n".join(lines) + "\n")
    print("\n".join(lines))


if __name__ == "__main__":
    main()
