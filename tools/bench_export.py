"""Integer export: latency per engine and size on disk per format, per model.

    .venv/bin/python tools/bench_export.py [CKPT] [--resnet18] [--out tools/results/bench_export] [--repeats 20]

CKPT (e.g. a Fashion-MNIST ResNet-20) is timed with its test images; --resnet18 adds an untrained,
quantizer-initialised torchvision ResNet-18 RS-Net at 224/192/160/128/96 (timing does not depend on the
weights' values) timed on random images. Per resolution, batch 1 and 32 (median of timed runs after a warm-up):
  rsq ONNX int   rsq's integer export in onnxruntime (ConvInteger + int64 requantization: exact)
  rsq QLinear    rsq's QLinear export in onnxruntime (QLinearConv/QLinearAdd + Clip: fast, within steps)
  ORT fp32       onnxruntime on the same network in float32, BatchNorm folded (written here)
  ORT QOperator  onnxruntime.quantization.quantize_static of that float model (QLinearConv, per-channel int8)
  torch fp32     PyTorch eager on the float (dequantized) model
  rsq.runtime    the numpy reference runtime (int32 GEMM, and exact float32 GEMM)
  PT2E+Inductor  rsq's PT2E export, torch.compile'd with freezing (batch 32; compile time reported)
  ExecuTorch     rsq's .pte in ExecuTorch's XNNPACK backend (batch 1, the on-device case)
Every engine runs on one thread. Writes OUT.md and OUT.json.
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
# Inductor's compile workers too: the machine is shared.
for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS", "TORCHINDUCTOR_COMPILE_THREADS"):
    os.environ[_name] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

REWARM_BELOW_S = 0.5  # engines faster than this are timed warm (median_ms)
SIMD_FLAGS = ("sse4_2", "avx", "avx2", "fma", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni", "amx_int8")


def cpu_description() -> str:
    text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    name = fields.get("Model name", "unknown").strip()
    flags = fields.get("Flags", "").split()
    return f"{name}; SIMD flags: {' '.join(f for f in SIMD_FLAGS if f in flags) or 'none found'}"


def save_results(out: str, lines: list[str], cpu: str, **payload) -> None:
    """OUT.md from ``lines`` and OUT.json with the CPU, its lscpu flags and ``payload``; prints the table."""
    from benchlib import write_outputs
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    flags = next((ln.split(":", 1)[1].split() for ln in lscpu.splitlines() if ln.startswith("Flags:")), [])
    write_outputs(out, lines, {"cpu": cpu, "cpu_flags": flags, **payload})


def median_ms(engines: dict, repeats: dict, rewarm_below_s: float = REWARM_BELOW_S) -> dict:
    """Median ms per engine; the engines take turns within each round, so a busy machine slows all alike.

    Every engine is timed warm: the other engines' calls between its turns evict its caches (the exact
    int64 graph moves megabytes per call), which cost the next engine 10-25 % (measured on the QLinear
    graph) and favoured whichever engine followed a light one. So each timed call follows an untimed
    call of the same engine, for engines whose call takes under ``rewarm_below_s`` (the slow ones gain
    little from it and would double the run)."""
    times = {name: [] for name in engines}
    rewarm = {}
    for name, fn in engines.items():
        start = time.perf_counter()
        fn()  # warm-up
        rewarm[name] = time.perf_counter() - start < rewarm_below_s
    for round_ in range(max(repeats.values())):
        for name, fn in engines.items():
            if round_ < repeats[name]:
                if rewarm[name]:
                    fn()
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
        elif op.kind == "quantize":  # a quantized shortcut's block input: nothing to do in float
            nodes.append(helper.make_node("Identity", op.inputs, [op.output]))
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
        elif op.kind == "max_pool":
            a = op.attrs
            nodes.append(helper.make_node("MaxPool", op.inputs, [op.output], kernel_shape=a["kernel"],
                                          strides=a["stride"], pads=a["padding"] * 2))
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


def onnx_folder_bytes(folder: Path) -> dict:
    """Bytes of an onnx or qlinear export folder: ``shared`` (weights.bin, and ranges.json for qlinear),
    ``graphs`` (every per-resolution model_rR.onnx) and ``switchable`` (model.onnx, every resolution in one
    file; 0 without one)."""
    graphs = sum(p.stat().st_size for p in folder.glob("model_r*.onnx"))
    switchable = folder / "model.onnx"
    switchable = switchable.stat().st_size if switchable.exists() else 0
    return {"shared": folder_size(folder) - graphs - switchable, "graphs": graphs, "switchable": switchable}


def onnx_sizes(folder: Path, label: str = "rsq ONNX") -> dict:
    """An onnx or qlinear folder's bytes for all resolutions, labelled for the report: the per-resolution
    graphs with the shared files, and the switchable model.onnx with the shared files."""
    size = onnx_folder_bytes(folder)
    sizes = {f"{label} folder (all resolutions, a graph each)": size["shared"] + size["graphs"]}
    if size["switchable"]:
        sizes[f"{label} switchable graph + shared files (all resolutions)"] = size["shared"] + size["switchable"]
    return sizes


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoint", nargs="?", help="a trained checkpoint (Fashion-MNIST ResNet-20 or other)")
    parser.add_argument("--resnet18", action="store_true", help="also time a ResNet-18 RS-Net at 224..96")
    parser.add_argument("--out", default="tools/results/bench_export")
    parser.add_argument("--repeats", type=int, default=20)
    parser.add_argument("--r18-repeats", type=int, default=5, help="timed runs per engine for ResNet-18")
    parser.add_argument("--r18-pt2e", default="224,192,160,128,96", help="ResNet-18 resolutions compiled with Inductor")
    parser.add_argument("--r18-bits", type=int, default=4, help="the ResNet-18's W/A bits (first/last 8)")
    parser.add_argument("--r18-shortcut", action="store_true", help="the ResNet-18 with --quantized-shortcut")
    parser.add_argument("--sizes-of", nargs="*", default=[], help="more checkpoints: sizes on disk only")
    args = parser.parse_args()
    torch.set_num_threads(1)
    from bench_export_extra import R18_RESOLUTIONS, resnet18_checkpoint

    from rsq.allocator import keep_freed_memory
    keep_freed_memory()  # what rsq verify and the PT2E loader set, before anything is timed

    from rsq.data import fashion_mnist
    work = Path(tempfile.mkdtemp(prefix="bench_export."))
    models, sizes_only = [], {}
    try:
        if args.checkpoint:
            images, _ = fashion_mnist.load("test", None)
            images = (images[:64].float() / 255 - fashion_mnist.MEAN[0]) / fashion_mnist.STD[0]
            models.append(bench_model(args.checkpoint, images, work / "a", args.repeats, max(3, args.repeats // 4),
                                      pt2e_resolutions=None, int32_runtime=True, runtime_batches=(1, 32)))
        if args.resnet18:
            (work / "r18").mkdir()
            ckpt = resnet18_checkpoint(work / "r18" / "checkpoint.pt", R18_RESOLUTIONS, args.r18_bits,
                                       args.r18_shortcut)
            images = torch.randn(64, 3, R18_RESOLUTIONS[0], R18_RESOLUTIONS[0])
            pt2e = [int(r) for r in args.r18_pt2e.split(",") if r]
            models.append(bench_model(ckpt, images, work / "b", args.r18_repeats, 1, pt2e_resolutions=pt2e,
                                      int32_runtime=False, runtime_batches=(1, 32), label="resnet18 (random weights)",
                                      synthetic=True))
        for i, ckpt in enumerate(args.sizes_of):
            sizes_only[ckpt] = export_sizes(ckpt, work / f"sizes{i}")
        write_report(args, models, sizes_only)
    finally:
        shutil.rmtree(work, ignore_errors=True)


def export_sizes(checkpoint, folder: Path) -> dict:
    from rsq.export import export_checkpoint
    for fmt in ("onnx", "packed"):
        export_checkpoint(checkpoint, fmt, folder)
    return {**onnx_sizes(folder / "onnx"),
            "rsq packed folder (all resolutions)": folder_size(folder / "packed"),
            "  of which weights.bin (bit-packed)": (folder / "packed" / "weights.bin").stat().st_size}


def write_synthetic_qlinear(model, config, images, folder: Path) -> None:
    """The qlinear export of a checkpoint with no data set to calibrate on: its 8-bit grids calibrated on
    ``images`` (None: 16 random ones at the first resolution, drawn from torch's generator)."""
    from rsq.data.multires import resize_batch
    from rsq.export import lower_checkpoint_model
    from rsq.export.qlinear import calibrate, write_qlinear

    integer_model = lower_checkpoint_model(model, config)
    if images is None:
        first = integer_model.resolutions[0]
        images = torch.randn(16, config.in_chans, first, first)
    calibration = {r: resize_batch(images[:16], r).numpy() for r in integer_model.resolutions}
    write_qlinear(integer_model, *calibrate(integer_model, calibration, batch=8), folder)


def bench_model(checkpoint, images, work: Path, repeats: int, runtime_repeats: int, pt2e_resolutions,
                int32_runtime: bool, runtime_batches, label: str = "", synthetic: bool = False) -> dict:
    """Rows of median ms per engine, sizes on disk and build times for one checkpoint (``synthetic``: its
    data set is a stand-in, so the QLinear export calibrates on ``images``)."""
    import onnxruntime as ort
    from bench_export_extra import executorch_engine, executorch_program

    from rsq.checkpoint import checkpoint_config, load_model
    from rsq.convert import using_mode
    from rsq.data.multires import resize_batch
    from rsq.export import EXECUTORCH_FILE, export_checkpoint, lower_checkpoint_model, pt2e_file
    from rsq.export.pt2e import load_pt2e
    from rsq.quantize import dequantize_
    from rsq.runtime import Runtime, load

    model, ckpt = load_model(checkpoint)
    config = checkpoint_config(ckpt)
    work.mkdir(parents=True)
    export = work / "export"
    build_s, notes = {}, []
    if not int32_runtime:
        notes.append("rsq.runtime runs with its float32 GEMM only (the same integers); numpy's int32 matmul "
                     "has no BLAS and takes minutes per batch at this size")
    for fmt in ("onnx", "qlinear", "packed", "pt2e", "qonnx"):
        start = time.perf_counter()
        try:
            if fmt == "qlinear" and synthetic:  # no training images: 8-bit grids from the timing images
                write_synthetic_qlinear(model, config, images, export / fmt)
            else:
                export_checkpoint(checkpoint, fmt, export)
        except Exception as exc:  # noqa: BLE001 - a format that fails is reported, the rest still timed
            notes.append(f"{fmt} export failed: {str(exc).splitlines()[0][:200]}")
        build_s[f"export {fmt} (all resolutions)"] = time.perf_counter() - start
    integer_model = lower_checkpoint_model(model, config)
    resolutions = list(integer_model.resolutions)
    program, build_s["export executorch (all resolutions, XNNPACK lowering)"] = executorch_program(
        model, resolutions, ckpt["in_chans"], work / EXECUTORCH_FILE)
    float_model = dequantize_(copy.deepcopy(model)).eval()
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    session = lambda path: ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])
    runtimes = {"float": Runtime(load(export / "packed"), gemm="float")}
    if int32_runtime:
        runtimes["int32"] = Runtime(load(export / "packed"))
    rows, sizes = [], {}
    for r in resolutions:
        x_all = resize_batch(images, r)
        float_path, qop_path = work / f"float_r{r}.onnx", work / f"qop_r{r}.onnx"
        float_onnx(model, integer_model, float_path, r)
        start = time.perf_counter()
        static_quantized(float_path, qop_path, x_all.numpy())
        build_s[f"ORT quantize_static r{r}"] = time.perf_counter() - start
        sizes[f"ORT fp32 graph (r{r})"] = float_path.stat().st_size
        sizes[f"ORT QOperator graph (r{r})"] = qop_path.stat().st_size
        engines = {"rsq ONNX int": session(export / "onnx" / f"model_r{r}.onnx"),
                   "rsq QLinear": session(export / "qlinear" / f"model_r{r}.onnx"),
                   "ORT fp32": session(float_path), "ORT QOperator": session(qop_path)}
        compiled = None
        if pt2e_resolutions is None or r in pt2e_resolutions:
            start = time.perf_counter()
            compiled = load_pt2e(export / "pt2e" / pt2e_file(r))
            with torch.no_grad():
                compiled(x_all[:32])  # Inductor compiles on the first call
            build_s[f"PT2E Inductor compile + first call r{r} (batch 32)"] = time.perf_counter() - start
        for batch in (1, 32):
            x = x_all[:batch]
            xn = x.numpy()
            calls = {name: (lambda s=s: s.run(None, {"input": xn})) for name, s in engines.items()}
            calls["torch fp32"] = lambda: _torch_forward(float_model, x, r, using_mode)
            if batch in runtime_batches:
                for gemm, rt in runtimes.items():
                    calls[f"rsq.runtime ({gemm} GEMM)"] = lambda rt=rt: rt.run(xn, r)
            if batch == 32 and compiled is not None:
                calls["PT2E+Inductor"] = lambda: _torch_forward(compiled, x, None, None)
            if batch == 1:
                calls["ExecuTorch XNNPACK"] = executorch_engine(program, r, xn)
            counts = {name: repeats if "runtime" not in name else runtime_repeats for name in calls}
            timings = median_ms(calls, counts)
            # The QLinear goal, timed head to head: only these two take turns, many more times.
            pair = median_ms({name: calls[name] for name in HEAD_TO_HEAD}, dict.fromkeys(HEAD_TO_HEAD, 5 * repeats))
            rows.append({"resolution": r, "batch": batch, "ms": timings, "head_to_head_ms": pair})
            print(label or config.model, r, batch, {k: round(v, 3) for k, v in timings.items()},
                  "head to head:", {k: round(v, 3) for k, v in pair.items()}, flush=True)
    sizes["checkpoint.pt"] = Path(export / "checkpoint.pt").stat().st_size
    sizes.update(onnx_sizes(export / "onnx"))
    sizes["  of which weights.bin (int8, shared)"] = (export / "onnx" / "weights.bin").stat().st_size
    sizes["rsq ONNX, one resolution (graph + weights.bin)"] = (
        (export / "onnx" / f"model_r{resolutions[0]}.onnx").stat().st_size + sizes["  of which weights.bin (int8, shared)"])
    sizes.update(onnx_sizes(export / "qlinear", "rsq QLinear"))
    sizes["rsq packed folder (all resolutions)"] = folder_size(export / "packed")
    sizes["  of which weights.bin (bit-packed)"] = (export / "packed" / "weights.bin").stat().st_size
    for fmt in ("pt2e", "qonnx"):
        if (export / fmt).is_dir():
            sizes[f"{fmt} folder (all resolutions)"] = folder_size(export / fmt)
    sizes["ExecuTorch .pte (all resolutions)"] = (work / EXECUTORCH_FILE).stat().st_size
    sizes["ORT fp32 graphs (all resolutions)"] = sum(v for k, v in sizes.items() if k.startswith("ORT fp32 graph ("))
    sizes["ORT QOperator graphs (all resolutions)"] = sum(v for k, v in sizes.items()
                                                          if k.startswith("ORT QOperator graph ("))
    bits = f"W{config.weight_bits}A{config.act_bits} (first/last {config.first_last})"
    if config.quantized_shortcut:
        bits += ", quantized shortcut"
    return {"label": label or config.model, "checkpoint": str(checkpoint), "bits": bits, "repeats": repeats,
            "runtime_repeats": runtime_repeats, "rows": rows, "sizes": sizes, "build_s": build_s, "notes": notes}


def _torch_forward(model, x, resolution, using_mode):
    with torch.no_grad():
        if using_mode is None:
            return model(x)
        with using_mode(model, resolution):
            return model(x)


HEAD_TO_HEAD = ("rsq QLinear", "ORT QOperator")
# label: (numerator engine, denominator engine) of a ratio of median times
RATIOS = {"rsq QLinear time / ORT QOperator time": HEAD_TO_HEAD,
          "speed-up of rsq QLinear over ORT fp32": ("ORT fp32", "rsq QLinear"),
          "speed-up of PT2E+Inductor over torch fp32": ("torch fp32", "PT2E+Inductor"),
          "speed-up of ExecuTorch over torch fp32": ("torch fp32", "ExecuTorch XNNPACK")}


def write_report(args, models, sizes_only) -> None:
    import onnxruntime as ort
    cpu = cpu_description()
    settings = (f"one thread per engine (OMP/OpenBLAS/MKL = 1, torch.set_num_threads(1), onnxruntime intra/inter-op 1, "
                f"XNNPACK threadpool 1, Inductor compile threads 1), run under nice; median ms per batch; the engines "
                f"take turns within each round, and an engine whose call takes under {REWARM_BELOW_S} s is called once untimed before "
                f"each timed call (timed warm); onnxruntime {ort.__version__}, torch {torch.__version__}; load average "
                f"{os.getloadavg()[0]:.1f} at the end (other jobs share the machine: compare within a row)")
    lines = ["# Integer export: latency and size", "", f"`tools/bench_export.py {' '.join(_argv())}`", "",
             f"CPU: {cpu}.", "", f"Settings: {settings}.", ""]
    for m in models:
        names = list(dict.fromkeys(n for row in m["rows"] for n in row["ms"]))
        lines += [f"## {m['label']}, {m['bits']}", "",
                  f"{m['repeats']} timed runs per engine ({m['runtime_repeats']} for rsq.runtime); '-' = not run "
                  f"(PT2E+Inductor at batch 32, ExecuTorch at batch 1 only).", "",
                  "| resolution | batch | " + " | ".join(names) + " |", "|---:|---:|" + "---:|" * len(names)]
        for row in m["rows"]:
            cells = [f"{row['ms'][n]:.3f}" if n in row["ms"] else "-" for n in names]
            lines.append(f"| {row['resolution']} | {row['batch']} | " + " | ".join(cells) + " |")
        lines += ["", "Ratios of the medians above (the issue's goals: QLinear within 1.05x of QOperator; PT2E and "
                  "ExecuTorch speed-ups over eager fp32):", "", "| resolution | batch | " + " | ".join(RATIOS) + " |",
                  "|---:|---:|" + "---:|" * len(RATIOS)]
        for row in m["rows"]:
            ms = row["ms"]
            cells = [f"{ms[a] / ms[b]:.2f}x" if a in ms and b in ms else "-" for a, b in RATIOS.values()]
            lines.append(f"| {row['resolution']} | {row['batch']} | " + " | ".join(cells) + " |")
        a, b = HEAD_TO_HEAD
        lines += ["", f"{a} against {b} head to head: the two alone take turns ({5 * m['repeats']} timed runs "
                  "each, timed warm); the ratio the issue's 1.05x goal is about:", "",
                  f"| resolution | batch | {a} | {b} | ratio |", "|---:|---:|---:|---:|---:|"]
        for row in m["rows"]:
            pair = row["head_to_head_ms"]
            lines.append(f"| {row['resolution']} | {row['batch']} | {pair[a]:.3f} | {pair[b]:.3f} | "
                         f"{pair[a] / pair[b]:.2f}x |")
        lines += ["", "| artifact | bytes |", "|:---|---:|"] + [f"| {k} | {v} |" for k, v in m["sizes"].items()]
        lines += ["", "| build step | seconds |", "|:---|---:|"] + [f"| {k} | {v:.1f} |" for k, v in m["build_s"].items()]
        lines += [""] + [f"Note: {n}" for n in m["notes"]] + ([""] if m["notes"] else [])
    for ckpt, sizes in sizes_only.items():
        lines += [f"## Sizes of `{ckpt}`", "", "| artifact | bytes |", "|:---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in sizes.items()] + [""]
    save_results(args.out, lines, cpu, settings=settings, models=models, sizes_only=sizes_only)


def _argv() -> list[str]:
    import sys
    return sys.argv[1:]


if __name__ == "__main__":
    main()
