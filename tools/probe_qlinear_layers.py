"""Where the QLinear graph departs from rsq.runtime, layer by layer.

For a trained LSQ checkpoint: the IntegerModel, its QLinear graph (8-bit grids of the wide tensors
calibrated as `rsq export --format qlinear` does), and per resolution, on the first --images test images:
top-1 agreement of the graph's logits with rsq.runtime's, and for every narrow tensor the share of
integers that differ from rsq.runtime's (every intermediate tensor added as a graph output, so the
differences are cascaded: what each layer receives, as in a real run), and for each QLinearConv with a narrow
output the same share when it alone is fed rsq.runtime's input (its own rounding, nothing carried in). Also,
per conv with a narrow output, how many channels the exact requantization fit covers (docs/export.md §8c).

--align puts each wide tensor read by one requantization on a grid of step s_reader / n (n odd, the
largest that still holds the calibrated range), so that the reader's rounding boundaries fall between
the wide tensor's integers: an experiment, not what the writer does. --range-scale F calibrates every wide
tensor's 8-bit grid to F times its largest calibration value (F < 1 saturates the rest): another one.

--tie (a model with quantized shortcuts): an experiment on the trained model itself. Each identity block's
output grid is set to its input grid (the next block's input step := this block's, chained through a stage,
without retraining), so a block's add reads its shortcut on the grid it writes; its second conv then writes
that same grid (a zero point from the calibrated minimum and maximum), and QLinearAdd adds two integers on
one grid: the add itself is exact, what is left is the conv's own rounding. Reports the fake-quant top-1
before and after tying, and the agreement of the QLinear graph with the tied model (rsq.runtime).
--shift8: each 8-bit conv's weights moved left inside int8 by the headroom their largest integer leaves, for
a finer accumulator (so a finer integer bias), whatever the input's bits: another experiment.
--weighted: what `rsq export --format qlinear` does: a channel with no exact requantization fit takes the scale and
bias that reproduce the rounding boundaries the most calibration values sit at (requant_fit.fit_channel_weighted);
without it, such a channel rounds its bias, as the writer did before. The fit table then also gives the share of
calibration weight the fits keep.
--exact-stem: also the agreement of the graph from the stem conv's output on, fed rsq.runtime's stem integers: what
an exact stem would leave.

    python tools/probe_qlinear_layers.py RUN/checkpoint.pt [--images 256] [--align] [--range-scale F] [--tie]
        [--shift8] [--weighted] [--exact-stem] [--out FILE]
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


def tie_identity_grids(model) -> int:
    """Each identity block's output grid := its input grid (the next block's input quantizer takes this block's
    step), chained through a stage; returns how many steps changed."""
    import torch

    from rsq.nn.residual import has_quantized_input, residual_blocks
    blocks = [block for _, block in residual_blocks(model)]
    if not all(has_quantized_input(block) for block in blocks):
        raise SystemExit("--tie needs a model trained with quantized shortcuts")
    tied = 0
    with torch.no_grad():
        for block, following in zip(blocks, blocks[1:]):
            if block.downsample is None:
                following.conv1.act_quantizer.step.copy_(block.conv1.act_quantizer.step)
                tied += 1
    return tied


def wide_extremes(integer, images) -> dict:
    """Per resolution: (min, max) integer of every wide tensor on the calibration images, by rsq.runtime."""
    from rsq.runtime import Runtime
    runtime = Runtime(integer, gemm="float")
    wide = [name for name, info in integer.tensors.items() if info.kind == "wide"]
    extremes = {}
    for r in integer.resolutions:
        low, high = dict.fromkeys(wide, 0), dict.fromkeys(wide, 0)
        for start in range(0, len(images[r]), 64):
            values = runtime.run_all(images[r][start:start + 64], r)
            for name in wide:
                low[name] = min(low[name], int(values[name].min()))
                high[name] = max(high[name], int(values[name].max()))
        extremes[r] = {name: (low[name], high[name]) for name in wide}
    return extremes


def tied_grids(qlinear, extremes):
    """_QLinearGraph._grids with each add whose shortcut is on the grid the add writes reading its other (wide)
    input on that grid too: the zero point puts the calibrated range of that input, as far as it can matter
    (a sum outside [0, 255] steps saturates anyway: [-255, 255]), inside uint8."""
    plain = qlinear._QLinearGraph._grids

    def grids(self, ranges):
        result = plain(self, ranges)
        for op in self.model.ops:
            if not qlinear.fused_requantize(self.model, op):
                continue
            add = qlinear._producer(self.model, op.inputs[0])
            kinds = [self.model.tensors[t].kind for t in add.inputs]
            if sorted(kinds) != ["narrow", "wide"]:
                continue
            narrow, wide = add.inputs[kinds.index("narrow")], add.inputs[kinds.index("wide")]
            step = result[op.output][0]
            if result[narrow][0] != step:
                continue
            low, high = (v * self.scales[wide] / step for v in extremes[self.r][wide])
            low, high = max(low, -255.0), min(high, 255.0)
            zero = np.ceil(-low) if high - low <= 255 else np.round(127.5 - (low + high) / 2)
            result[wide] = (step, int(np.clip(zero, 0, 255)))
        return result
    return grids


def headroom_shifts(qlinear):
    """qlinear.weight_shifts, and each 8-bit conv's weights moved left by as many bits as its largest
    |integer| leaves inside int8 (a 4x finer accumulator for weights within +-31), whatever its input's bits."""
    plain = qlinear.weight_shifts

    def shifts(model):
        result = plain(model)
        for op in model.ops:
            weight = model.weights[op.attrs["weight"]] if op.kind == "conv" else None
            if weight is None or weight.bits != 8:
                continue
            peak, k = max(int(np.abs(weight.values).max()), 1), 0
            while peak << (k + 1) <= 127:
                k += 1
            if k:
                result[op.attrs["weight"]] = k
        return result
    return shifts


def fake_quant_top1(model, test, resolutions) -> dict:
    import torch

    from rsq.evaluate import evaluate
    with torch.no_grad():
        per_resolution = evaluate(model, test, resolutions)["per_resolution"]
    return {r: per_resolution[r]["top1"] for r in resolutions}


def fit_coverage(integer, resolution: int, counts) -> list[str]:
    from rsq.export.qlinear import narrow_output_fit, weight_shifts
    shifts, lines = weight_shifts(integer), []
    for op in integer.ops:
        if op.kind not in ("conv", "linear") or integer.tensors[op.output].kind != "narrow":
            continue
        fit = narrow_output_fit(integer, resolution, op, shifts, None if counts is None else counts[op.output])
        weight_bits = integer.weights[op.attrs["weight"]].bits
        kept = "" if fit.kept is None else f" {100 * fit.kept.mean():.2f} % |"
        lines.append(f"| {op.name} | {weight_bits} | {integer.tensors[op.inputs[0]].bits} | "
                     f"{integer.tensors[op.output].bits} | {int(fit.exact.sum())} of {len(fit.exact)} |{kept}")
    return lines


def from_the_stem_on(onnx, ort, integer, qlinear, proto, resolution: int):
    """(session, input name, zero point, stem op): the QLinear graph from the stem conv's output to the logits,
    to be fed rsq.runtime's stem integers, as if the stem were exact (--exact-stem)."""
    from onnx.utils import Extractor
    stem = next(op for op in integer.ops if op.kind == "conv")
    conv = next(n for n in proto.graph.node if n.op_type == "QLinearConv" and n.output[0].startswith(stem.output))
    clips = [n for n in proto.graph.node if n.op_type == "Clip" and n.input[0] == conv.output[0]]
    tensor = clips[0].output[0] if clips else conv.output[0]
    proto.graph.value_info.append(onnx.helper.make_tensor_value_info(tensor, onnx.TensorProto.UINT8, None))
    rest = Extractor(proto).extract_model([tensor], ["logits"])
    session = ort.InferenceSession(rest.SerializeToString(), providers=["CPUExecutionProvider"])
    return session, tensor, qlinear.zero_point(integer, resolution, stem), stem


def single_convs(onnx, ort, integer, qlinear, proto, resolution: int) -> dict:
    """tensor -> (session, input name, input zero point, output zero point): each QLinearConv with a narrow output
    (and its Clip) as a graph of its own, to be fed rsq.runtime's input."""
    h, initializers, convs = onnx.helper, {t.name: t for t in proto.graph.initializer}, {}
    for op in integer.ops:
        if op.kind != "conv" or integer.tensors[op.output].kind != "narrow":
            continue
        conv = next(n for n in proto.graph.node if n.op_type == "QLinearConv" and n.output[0].startswith(op.output))
        nodes = [conv] + [n for n in proto.graph.node if n.op_type == "Clip" and n.input[0] == conv.output[0]]
        graph = h.make_graph(nodes, "one_conv", [h.make_tensor_value_info(conv.input[0], onnx.TensorProto.UINT8, None)],
                             [h.make_tensor_value_info(nodes[-1].output[0], onnx.TensorProto.UINT8, None)],
                             [initializers[name] for n in nodes for name in n.input[1:] if name in initializers])
        model = h.make_model(graph, opset_imports=proto.opset_import, ir_version=proto.ir_version)
        session = ort.InferenceSession(model.SerializeToString(), providers=["CPUExecutionProvider"])
        x_zero, y_zero = (int(onnx.numpy_helper.to_array(initializers[conv.input[i]])) for i in (2, 7))
        convs[op.output] = (session, op.inputs[0], x_zero, y_zero)
    return convs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoint")
    parser.add_argument("--images", type=int, default=256)
    parser.add_argument("--align", action="store_true")
    parser.add_argument("--range-scale", type=float, default=1.0)
    parser.add_argument("--tie", action="store_true")
    parser.add_argument("--shift8", action="store_true")
    parser.add_argument("--weighted", action="store_true")
    parser.add_argument("--exact-stem", action="store_true")
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
    test = _test_data(ckpt, resolutions, args.images, None)
    tie_lines = []
    if args.tie:
        before = fake_quant_top1(model, test, resolutions)
        tied = tie_identity_grids(model)
        after = fake_quant_top1(model, test, resolutions)
        tie_lines = [f"Tied: {tied} identity blocks' output grids set to their input grids, without retraining. "
                     "Fake-quant top-1 before / after tying, same images:", "",
                     "| resolution | before | after |", "|---:|---:|---:|"]
        tie_lines += [f"| {r} | {before[r]:.2f} | {after[r]:.2f} |" for r in resolutions] + [""]
    integer = lower_checkpoint_model(model, config, resolutions, None)
    pool = training_pool(config.replace(device="cpu"), qlinear.CALIBRATION_IMAGES)
    pool_images = {r: resize_batch(pool, r).numpy() for r in resolutions}
    ranges, counts = qlinear.calibrate(integer, pool_images)
    counts = counts if args.weighted else None
    if args.tie:
        qlinear._QLinearGraph._grids = tied_grids(qlinear, wide_extremes(integer, pool_images))
    if args.shift8:
        qlinear.weight_shifts = headroom_shifts(qlinear)
    if args.range_scale != 1.0:
        ranges = {r: {t: max(1, int(v * args.range_scale)) for t, v in wide.items()} for r, wide in ranges.items()}
    if args.align:
        qlinear._QLinearGraph._grids = aligned_grids(qlinear)
    folder = Path(tempfile.mkdtemp(prefix="probe_qlinear_layers."))
    qlinear.write_qlinear(integer, ranges, counts, folder)
    runtime = Runtime(integer, gemm="float")
    variant = (" (grids aligned to their readers)" if args.align else "") + (
        f" (wide ranges x {args.range_scale:g})" if args.range_scale != 1.0 else "") + (
        " (identity blocks' grids tied)" if args.tie else "") + (
        " (8-bit weights moved left by their headroom)" if args.shift8 else "") + (
        " (requantization fits weighted by calibration counts)" if args.weighted else "")
    lines = [f"# QLinear against rsq.runtime, layer by layer{variant}",
             "", f"CPU: {cpu_name()}.", "",
             f"`python tools/probe_qlinear_layers.py {args.checkpoint} --images {args.images}"
             f"{' --align' if args.align else ''}"
             f"{f' --range-scale {args.range_scale:g}' if args.range_scale != 1.0 else ''}"
             f"{' --tie' if args.tie else ''}{' --shift8' if args.shift8 else ''}"
             f"{' --weighted' if args.weighted else ''}{' --exact-stem' if args.exact_stem else ''}`", "", *tie_lines]
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
        convs = single_convs(onnx, ort, integer, qlinear, onnx.load(str(folder / qlinear.graph_file(r))), r)
        alone = dict.fromkeys(convs, 0)
        rest = from_the_stem_on(onnx, ort, integer, qlinear, onnx.load(str(folder / qlinear.graph_file(r))), r) \
            if args.exact_stem else None
        agree_rest = 0
        differ = dict.fromkeys(narrow, 0)
        total = dict.fromkeys(narrow, 0)
        agree = images = 0
        for xs, _ in test.batches():
            x = xs[r].numpy().astype(np.float32)
            reference = runtime.run_all(x, r)
            got = dict(zip(names, session.run(None, {"input": x})))
            agree += int((got["logits"].argmax(1) == reference[integer.output].argmax(1)).sum())
            if rest is not None:
                rest_session, tensor, zero, stem = rest
                fed = (reference[stem.output].transpose(0, 3, 1, 2) + zero).astype(np.uint8)
                logits = rest_session.run(["logits"], {tensor: fed})[0]
                agree_rest += int((logits.argmax(1) == reference[integer.output].argmax(1)).sum())
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
            for t, (one, source, x_zero, y_zero) in convs.items():
                fed = (reference[source].transpose(0, 3, 1, 2) + x_zero).astype(np.uint8)
                out = one.run(None, {one.get_inputs()[0].name: fed})[0].astype(np.int64) - y_zero
                alone[t] += int((out.transpose(0, 2, 3, 1) != reference[t]).sum())
        shares = {t: differ[t] / max(total[t], 1) for t in narrow}
        alone = {t: alone[t] / max(total[t], 1) for t in convs}
        payload["resolutions"][r] = {"agreement": 100 * agree / images, "differ": shares, "differ_alone": alone}
        lines += [f"## {r} px: top-1 agreement with rsq.runtime {100 * agree / images:.2f} % ({images} images)", ""]
        if rest is not None:
            payload["resolutions"][r]["agreement_exact_stem"] = 100 * agree_rest / images
            lines += [f"From the stem's output on, fed rsq.runtime's stem integers (an exact stem): "
                      f"{100 * agree_rest / images:.2f} %.", ""]
        lines += [
                  "| tensor | bits | integers that differ | a conv's, fed rsq.runtime's input |",
                  "|:---|---:|---:|---:|"]
        lines += [f"| {t} | {integer.tensors[t].bits} | {100 * shares[t]:.2f} % | "
                  f"{f'{100 * alone[t]:.2f} %' if t in alone else ''} |" for t in narrow]
        weight = " calibration weight kept |" if args.weighted else ""
        lines += ["", "Exact requantization fit (§8c) per conv with a narrow output:", "",
                  "| conv | weight bits | input bits | output bits | channels that fit |" + weight,
                  "|:---|---:|---:|---:|---:|" + ("---:|" if weight else "")]
        lines += fit_coverage(integer, r, None if counts is None else counts[r]) + [""]
    print("\n".join(lines))
    if args.out:
        write_outputs(args.out, lines, payload)


if __name__ == "__main__":
    main()
