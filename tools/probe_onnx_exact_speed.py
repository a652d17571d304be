"""Where the exact ONNX graph (`rsq export --format onnx`) spends its time, and what two writer choices save.

The exact graph is ConvInteger plus an integer requantization (docs/export.md section 8). Two choices of the
writer are compared here against the graphs they replaced, in one process, taking turns:
- the conv weights as uint8 (q + 128, zero point 128) instead of int8: onnxruntime's ConvInteger takes a
  slower path for int8 weights;
- the requantization's division by 2^n as a BitShift on uint64 instead of an int64 Div.
The older graphs are rebuilt from the export itself (weights back to int8 in a second file, the Div put
back in the function), so all of them compute the same integers; the tool checks that they do.

Per resolution of a checkpoint, at batch 1 and 32, one onnxruntime thread: ms per call (median of
--repeats blocks) of each graph and of the QLinear graph (the fast, inexact form), and onnxruntime's
profile of the current graph by op type. Also ConvInteger alone on one layer's shape, by operand types.

    python tools/probe_onnx_exact_speed.py RUN [--repeats 7] [--out FILE]
"""
from __future__ import annotations

import argparse
import collections
import json
import shutil
import statistics
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import cpu_name, write_outputs  # noqa: E402

VARIANTS = ("int8 weights, Div", "uint8 weights, Div", "uint8 weights, BitShift (the writer)")


def session(ort, source, profile_prefix: str | None = None):
    """One-thread onnxruntime session of a graph file (a str/Path) or of a ModelProto without external data;
    with ``profile_prefix`` it profiles, writing its file there."""
    options = ort.SessionOptions()
    options.intra_op_num_threads = options.inter_op_num_threads = 1
    if profile_prefix:
        options.enable_profiling = True
        options.profile_file_prefix = profile_prefix
    source = str(source) if isinstance(source, (str, Path)) else source.SerializeToString()
    return ort.InferenceSession(source, options, providers=["CPUExecutionProvider"])


def with_div(onnx, proto):
    """The graph with the requantization's uint64 shift replaced by the int64 Div it replaced."""
    proto = copy_proto(onnx, proto)
    [function] = proto.functions
    kept = []
    for node in function.node:
        if node.op_type == "Cast" and node.output[0] in ("positive_u", "n_u", "quotient"):
            continue
        if node.op_type == "BitShift":
            node = onnx.helper.make_node("Div", ["positive", "divisor"], ["quotient"])
        kept.append(node)
    del function.node[:]
    function.node.extend(kept)
    return proto


def with_int8_weights(onnx, proto, folder: Path, name: str):
    """The graph reading int8 weights (q) from ``name`` in ``folder`` (written here from weights.bin's q + 128),
    its ConvIntegers without the weight zero point."""
    proto = copy_proto(onnx, proto)
    source = folder / "weights.bin"
    target = folder / name
    if not target.exists():
        target.write_bytes((np.frombuffer(source.read_bytes(), np.uint8) ^ 0x80).tobytes())
    for tensor in proto.graph.initializer:
        if tensor.data_location == onnx.TensorProto.EXTERNAL:
            tensor.data_type = onnx.TensorProto.INT8
            for entry in tensor.external_data:
                if entry.key == "location":
                    entry.value = name
    for node in proto.graph.node:
        if node.op_type == "ConvInteger":
            del node.input[2:]
    kept = [t for t in proto.graph.initializer if t.name != "uint8 128"]
    del proto.graph.initializer[:]
    proto.graph.initializer.extend(kept)
    return proto


def copy_proto(onnx, proto):
    other = onnx.ModelProto()
    other.CopyFrom(proto)
    return other


def time_block(sess, feeds, calls: int) -> float:
    start = time.perf_counter()
    for _ in range(calls):
        sess.run(None, feeds)
    return (time.perf_counter() - start) / calls * 1e3


def profile_by_op(sess, feeds, calls: int) -> dict[str, float]:
    for _ in range(calls):
        sess.run(None, feeds)
    events = json.loads(Path(sess.end_profiling()).read_text())
    by = collections.Counter()
    for event in events:
        if event.get("cat") == "Node" and event["name"].endswith("_kernel_time"):
            by[event["args"]["op_name"]] += event["dur"]
    total = sum(by.values())
    return {op: 100.0 * us / total for op, us in by.most_common()}


def conv_integer_alone(onnx, ort, shape, repeats: int) -> dict[str, float]:
    """ConvInteger on [N, C, H, W] with C 3x3 filters, by operand types (ms per call)."""
    from onnx import TensorProto as T
    from onnx import helper, numpy_helper
    rng = np.random.default_rng(0)
    n, c, hgt, wid = shape
    out = {}
    for x_type, w_type, zero in ((T.INT8, T.INT8, None), (T.UINT8, T.INT8, None), (T.INT8, T.UINT8, 128),
                                 (T.UINT8, T.UINT8, 128)):
        x_np, w_np = (helper.tensor_dtype_to_np_dtype(t) for t in (x_type, w_type))
        x = rng.integers(0, 100, shape).astype(x_np)
        inits = [numpy_helper.from_array(rng.integers(0, 100, (c, c, 3, 3)).astype(w_np), "w")]
        inputs = ["x", "w"]
        if zero is not None:
            inits.append(numpy_helper.from_array(np.array(zero, w_np), "wz"))
            inputs += ["", "wz"]
        graph = helper.make_graph([helper.make_node("ConvInteger", inputs, ["y"], pads=[1, 1, 1, 1])], "g",
                                  [helper.make_tensor_value_info("x", x_type, x.shape)],
                                  [helper.make_tensor_value_info("y", T.INT32, None)], inits)
        sess = session(ort, helper.make_model(graph, opset_imports=[helper.make_opsetid("", 21)]))
        time_block(sess, {"x": x}, 3)
        label = f"{T.DataType.Name(x_type).lower()} x {T.DataType.Name(w_type).lower()}"
        out[label] = statistics.median(time_block(sess, {"x": x}, 10) for _ in range(repeats))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("run", help="a trained LSQ run (folder or checkpoint)")
    parser.add_argument("--repeats", type=int, default=7, help="timed blocks per graph, batch and resolution")
    parser.add_argument("--images", type=int, default=32)
    parser.add_argument("--out", default=None, help="write FILE.md and FILE.json (default: print only)")
    args = parser.parse_args()
    import onnx
    import onnxruntime as ort

    from rsq.checkpoint import load_model
    from rsq.export import export_checkpoint
    from rsq.verify import _test_data

    work = Path(tempfile.mkdtemp(prefix="rsq_onnx_speed_"))
    try:
        export = work / "export"
        export_checkpoint(args.run, "onnx", export)
        export_checkpoint(args.run, "qlinear", export)
        _, ckpt = load_model(args.run)
        resolutions = list(json.loads((export / "export.json").read_text())["resolutions"])
        xs, _ = next(iter(_test_data(ckpt, resolutions, args.images, None).batches()))
        rows, profiles = [], {}
        for r in resolutions:
            folder = export / "onnx"
            path = folder / f"model_r{r}.onnx"
            current = onnx.load(str(path), load_external_data=False)
            older = {VARIANTS[0]: with_int8_weights(onnx, with_div(onnx, current), folder, "weights_s8.bin"),
                     VARIANTS[1]: with_div(onnx, current)}
            paths = {}
            for i, (label, proto) in enumerate(older.items()):  # beside weights.bin: external data is relative
                paths[label] = folder / f"variant{i}_r{r}.onnx"
                paths[label].write_bytes(proto.SerializeToString())
            paths[VARIANTS[2]] = path
            paths["QLinear (inexact)"] = export / "qlinear" / f"model_r{r}.onnx"
            sessions = {k: session(ort, p) for k, p in paths.items()}
            images = xs[r].numpy().astype(np.float32)[:args.images]
            first = sessions[VARIANTS[2]].run(None, {"input": images})[1]
            for label in VARIANTS[:2]:
                if not np.array_equal(sessions[label].run(None, {"input": images})[1], first):
                    raise SystemExit(f"{label} at {r} px: integer logits differ from the writer's graph")
            for batch in (1, 32):
                feeds = {"input": images[:batch]}
                calls = 20 if batch == 1 else 3
                for sess in sessions.values():
                    time_block(sess, feeds, 2)
                times = {k: [] for k in sessions}
                for _ in range(args.repeats):  # taking turns, so drift hits every graph alike
                    for k, sess in sessions.items():
                        times[k].append(time_block(sess, feeds, calls))
                rows.append({"resolution": r, "batch": batch, **{k: statistics.median(v) for k, v in times.items()}})
            profiled = session(ort, path, profile_prefix=str(work / "profile"))
            profiles[r] = profile_by_op(profiled, {"input": images}, 5)
        shape = (32, 16, resolutions[0], resolutions[0])
        alone = conv_integer_alone(onnx, ort, shape, args.repeats)
    finally:
        shutil.rmtree(work, ignore_errors=True)

    labels = [*VARIANTS, "QLinear (inexact)"]
    lines = ["# The exact ONNX graph: where its time goes, and two writer choices", "",
             f"`python tools/probe_onnx_exact_speed.py {args.run} --repeats {args.repeats}`", "",
             f"CPU: {cpu_name()}. onnxruntime {ort.__version__}, one thread; ms per call, the median of "
             f"{args.repeats} blocks taken in turns (20 calls a block at batch 1, 3 at batch 32) on the first test "
             f"images. The three exact graphs give the same integer logits (checked).", "",
             "| px | batch | " + " | ".join(labels)
             + " | speed-up of the writer's graph | QLinear's speed-up over it |",
             "|---:|---:|" + "---:|" * (len(labels) + 2)]
    for row in rows:
        cells = " | ".join(f"{row[k]:.3f}" for k in labels)
        qlinear = row["QLinear (inexact)"]
        lines.append(f"| {row['resolution']} | {row['batch']} | {cells} | "
                     f"{row[VARIANTS[0]] / row[VARIANTS[2]]:.2f}x | {row[VARIANTS[2]] / qlinear:.1f}x |")
    lines += ["", "Share of the writer's graph's kernel time by op type (onnxruntime's profile, batch "
              f"{args.images}):", "", "| px | op types, share of kernel time |", "|---:|:---|"]
    for r, shares in profiles.items():
        lines.append(f"| {r} | " + ", ".join(f"{op} {share:.1f} %" for op, share in shares.items() if share >= 0.5)
                     + " |")
    lines += ["", f"ConvInteger alone, input {list(shape)}, 16 3x3 filters, padding 1 (ms per call):", "",
              "| x x weights | ms |", "|:---|---:|"]
    lines += [f"| {k} | {v:.3f} |" for k, v in alone.items()]
    write_outputs(args.out, lines, {"cpu": cpu_name(), "settings": vars(args), "rows": rows, "profiles": profiles,
                                    "conv_integer_alone": alone}) if args.out else print("\n".join(lines))


if __name__ == "__main__":
    main()
