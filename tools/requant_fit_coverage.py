"""How many output channels the exact requantization fit covers (rsq/export/requant_fit.py, docs/export.md §8c).

For each checkpoint and resolution: the channels of the convs whose output is requantized (narrow) for which
a per-channel scale and int32 bias exist that make a float32-scaled int8 kernel give rsq.runtime's integers
for every input; as the `executorch` writer fits them (XNNPACK, per-channel weight shifts) and as the
`qlinear` writer does (onnxruntime's QLinearConv, a shift per layer).

    python tools/requant_fit_coverage.py runs/bench_verify/w8 runs/bench_verify/w4 runs/bench_verify/w2
"""
from __future__ import annotations

import argparse
import time
from pathlib import Path

from benchlib import cpu_name, write_outputs


def coverage(checkpoint: Path) -> list[dict]:
    from rsq.checkpoint import checkpoint_config, checkpoint_file, load_model
    from rsq.convert import mode_state
    from rsq.export import lower_checkpoint_model
    from rsq.export.pt2e import fit_xnnpack_requantization, float_model_for, lowered
    from rsq.export.qlinear import narrow_output_fit, weight_shifts

    model, ckpt = load_model(checkpoint_file(checkpoint))
    integer = lower_checkpoint_model(model, checkpoint_config(ckpt))
    shifts = weight_shifts(integer)
    rows = []
    for r in mode_state(model).resolutions:
        start = time.perf_counter()
        float_model, grids = float_model_for(model, r, integer.in_chans)
        xnnpack = fit_xnnpack_requantization(lowered(model, [r]), float_model, grids, r)
        xnnpack_s = time.perf_counter() - start
        exact = total = 0
        start = time.perf_counter()
        for op in integer.ops:
            if op.kind == "conv" and integer.tensors[op.output].kind == "narrow":
                fit = narrow_output_fit(integer, r, op, shifts)
                exact, total = exact + int(fit.exact.sum()), total + len(fit.exact)
        rows.append({"checkpoint": str(checkpoint), "resolution": r,
                     "xnnpack_exact": sum(e for e, _ in xnnpack.values()),
                     "xnnpack_channels": sum(c for _, c in xnnpack.values()), "xnnpack_layers": len(xnnpack),
                     "qlinear_exact": exact, "qlinear_channels": total, "qlinear_fit_s": time.perf_counter() - start,
                     "xnnpack_fit_s": xnnpack_s})
    return rows


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("checkpoints", nargs="+")
    parser.add_argument("--out", default="tools/results/requant_fit_coverage")
    args = parser.parse_args()
    rows = [row for checkpoint in args.checkpoints for row in coverage(Path(checkpoint))]
    lines = ["# Output channels whose int8 requantization is exact (docs/export.md §8c)", "",
             f"CPU: {cpu_name()}.", "", "Command: `python tools/requant_fit_coverage.py "
             + " ".join(args.checkpoints) + "`", "",
             "Channels of the convs whose output is requantized (a block's first conv in a ResNet-20) for which the fit "
             "found a scale and bias reproducing rsq.runtime's integers for every input; the others keep the rounded "
             "bias. Seconds: the fit of every such layer at one resolution (ExecuTorch: with the float model it edits).",
             "", "| checkpoint | resolution | executorch (XNNPACK) exact | qlinear (onnxruntime) exact | fit s (executorch / qlinear) |",
             "|:---|---:|---:|---:|---:|"]
    for row in rows:
        lines.append(f"| {row['checkpoint']} | {row['resolution']} | {row['xnnpack_exact']} / {row['xnnpack_channels']} "
                     f"| {row['qlinear_exact']} / {row['qlinear_channels']} "
                     f"| {row['xnnpack_fit_s']:.2f} / {row['qlinear_fit_s']:.2f} |")
    write_outputs(args.out, lines, {"cpu": cpu_name(), "rows": rows})


if __name__ == "__main__":
    main()
