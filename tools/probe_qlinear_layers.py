"""Where the QLinear graph departs from rsq.runtime, layer by layer.

For a trained LSQ checkpoint: the IntegerModel, its QLinear graph (8-bit grids of the wide tensors
calibrated as `rsq export --format qlinear` does), and per resolution, on the first --images test images:
top-1 agreement of the graph's logits with rsq.runtime's, and for every narrow tensor the share of
integers that differ from rsq.runtime's (every intermediate tensor added as a graph output, so the
differences are cascaded: what each layer receives, as in a real run). Also, per conv with a narrow
output, how many channels the exact requantization fit covers (docs/export.md §8c).

--align puts each wide tensor read by one requantization on a grid of step s_reader / n (n odd, the
largest that still holds the calibrated range), so that the reader's rounding boundaries fall between
the wide tensor's integers: an experiment, not what the writer does. --range-scale F calibrates every wide
tensor's 8-bit grid to F times its largest calibration value (F < 1 saturates the rest): another one.

    python tools/probe_qlinear_layers.py RUN/checkpoint.pt [--images 256] [--align] [--range-scale F] [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import cpu_name, write_outputs  # noqa: E402


def aligned_grids(qlinear):
    """_QLinearGraph._grids with each wide tensor's step moved to its reader's step / n (n odd)."""
    plain = qlinear._QLinearGraph._grids

    def grids(self, ranges):
        result = plain(self, ranges)
        done = set()
        for op in self.model.ops:
            source = op.inputs[0] if op.kind == "requantize" else None
            if source is None or source in done or qlinear.fused_requantize(self.model, op):
                continue
            if self.model.tensors[source].kind != "wide":
                continue
            step, zero = result[source]
            n = int(result[op.output][0] // step)
            n -= 1 - n % 2  # the largest odd n with s_reader / n >= the calibrated step
            if n >= 1:
                result[source] = (result[op.output][0] / n, zero)
                done.add(source)
        return result
    return grids


def fit_coverage(integer, resolution: int) -> list[str]:
    from rsq.export.qlinear import narrow_output_fit, weight_shifts
    shifts, lines = weight_shifts(integer), []
    for op in integer.ops:
        if op.kind not in ("conv", "linear") or integer.tensors[op.output].kind != "narrow":
            continue
        fit = narrow_output_fit(integer, resolution, op, shifts)
        weight_bits = integer.weights[op.attrs["weight"]].bits
        lines.append(f"| {op.name} | {weight_bits} | {integer.tensors[op.inputs[0]].bits} | "
                     f"{integer.tensors[op.output].bits} | {int(fit.exact.sum())} of {len(fit.exact)} |")
    return lines


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--align", action="store_true")
    parser.add_argument("--range-scale", type=float, default=1.0)
    parser.add_argument("--out", default=None, help="write FILE.md and FILE.json (default: print only)")
    args = parser.parse_args()
    import onnx
    import onnxruntime as ort

    from rsq.checkpoint import checkpoint_config, load_model
    from rsq.convert import mode_state
    from rsq.data import resize_batch
    from rsq.export import lower_checkpoint_model
    from rsq.export import qlinear
    from rsq.runs import training_pool
    from rsq.runtime import Runtime
    from rsq.verify import _test_data

    model, ckpt = load_model(args.checkpoint)
    config = checkpoint_config(ckpt)
    resolutions = list(mode_state(model).resolutions)
    integer = lower_checkpoint_model(model, config, resolutions, None)
    pool = training_pool(config.replace(device="cpu"), qlinear.CALIBRATION_IMAGES)
    ranges = qlinear.wide_ranges(integer, {r: resize_batch(pool, r).numpy() for r in resolutions})
    if args.range_scale != 1.0:
        ranges = {r: {t: max(1, int(v * args.range_scale)) for t, v in wide.items()} for r, wide in ranges.items()}
    if args.align:
        qlinear._QLinearGraph._grids = aligned_grids(qlinear)
    folder = Path(tempfile.mkdtemp(prefix="probe_qlinear_layers."))
    qlinear.write_qlinear(integer, ranges, folder)
    test = _test_data(ckpt, resolutions, args.images, None)
    runtime = Runtime(integer, gemm="float")
    variant = (" (grids aligned to their readers)" if args.align else "") + (
        f" (wide ranges x {args.range_scale:g})" if args.range_scale != 1.0 else "")
    lines = [f"# QLinear against rsq.runtime, layer by layer{variant}",
             "", f"CPU: {cpu_name()}.", "",
             f"`python tools/probe_qlinear_layers.py {args.checkpoint} --images {args.images}"
             f"{' --align' if args.align else ''}"
             f"{f' --range-scale {args.range_scale:g}' if args.range_scale != 1.0 else ''}`", ""]
    payload = {"cpu": cpu_name(), "settings": vars(args), "resolutions": {}}
    for r in resolutions:
        proto = onnx.load(str(folder / qlinear.graph_file(r)), load_external_data=False)
        outputs = {o.name for o in proto.graph.output}
        produced = {name for node in proto.graph.node for name in node.output}
        narrow = [t for t, info in integer.tensors.items()
                  if info.kind == "narrow" and t in produced and t not in outputs]
        for t in narrow:
            proto.graph.output.append(onnx.helper.make_tensor_value_info(t, onnx.TensorProto.UINT8, None))
        path = folder / f"probe_r{r}.onnx"
        onnx.save(proto, str(path))
        session = ort.InferenceSession(str(path), providers=["CPUExecutionProvider"])
        names = [o.name for o in session.get_outputs()]
        differ = dict.fromkeys(narrow, 0)
        total = dict.fromkeys(narrow, 0)
        agree = images = 0
        for xs, _ in test.batches():
            x = xs[r].numpy().astype(np.float32)
            reference = runtime.run_all(x, r)
            got = dict(zip(names, session.run(None, {"input": x})))
            agree += int((got["logits"].argmax(1) == reference[integer.output].argmax(1)).sum())
            images += len(x)
            for t in narrow:
                zero = qlinear.zero_point(integer, r, qlinear._producer(integer, t))
                ours = got[t].astype(np.int64) - zero
                theirs = reference[t].astype(np.int64)
                if theirs.ndim == 4:  # rsq.runtime keeps NHWC (a shape check alone fails where H = W = C)
                    theirs = theirs.transpose(0, 3, 1, 2)
                theirs = theirs.reshape(ours.shape)
                differ[t] += int((ours != theirs).sum())
                total[t] += ours.size
        shares = {t: differ[t] / max(total[t], 1) for t in narrow}
        payload["resolutions"][r] = {"agreement": 100 * agree / images, "differ": shares}
        lines += [f"## {r} px: top-1 agreement with rsq.runtime {100 * agree / images:.2f} % ({images} images)", "",
                  "| tensor | bits | integers that differ |", "|:---|---:|---:|"]
        lines += [f"| {t} | {integer.tensors[t].bits} | {100 * shares[t]:.2f} % |" for t in narrow]
        lines += ["", "Exact requantization fit (§8c) per conv with a narrow output:", "",
                  "| conv | weight bits | input bits | output bits | channels that fit |", "|:---|---:|---:|---:|---:|"]
        lines += fit_coverage(integer, r) + [""]
    print("\n".join(lines))
    if args.out:
        write_outputs(args.out, lines, payload)


if __name__ == "__main__":
    main()
