"""What the QLinear graph's agreement would be if rsq.runtime kept only the bias fraction an int8 kernel holds.

onnxruntime's QLinearConv (and XNNPACK's int8 conv) add an int32 bias in accumulator units; sub-8-bit
weights stored shifted left inside int8 (docs/export.md section 8a) make that unit 2^k times finer. rsq's
lowering keeps up to 16 fraction bits of the folded BatchNorm bias (section 3), more than any such kernel
can hold. An experiment, not what rsq does: lower each conv with a narrow output with its bias rounded to
``rsq.export.snap.kernel_bias_bits`` fraction bits (8 - weight bits for sub-8-bit weights read
by at most 7-bit inputs, capped by the weights' headroom in int8; 0 for 8-bit weights), the rest unchanged, so
that an exact requantization fit (section 8c) exists for (nearly) every channel. The models are exported as
trained (``snap=False``): `rsq export` now snaps the BN shifts instead (rsq/export/snap.py, section 8d), which
moves the fake-quant model rather than the integer one. Both lowerings are written
as `packed` and `qlinear` and verified against the fake-quant model: top-1 agreement of rsq.runtime and of
the QLinear graph, and how the QLinear graph's pooled features compare with rsq.runtime's.

    python tools/probe_kernel_bias.py RUN [RUN ...] [--test-subset 2000] [--out FILE]
"""
from __future__ import annotations

import argparse
import sys
import tempfile
from pathlib import Path

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import cpu_name, write_outputs  # noqa: E402

LOWERINGS = ("as rsq lowers it", "bias at the kernel's precision")


def kernel_bias_lowering(lower_module):
    """Patch rsq.export.lower so each conv/linear with a narrow output keeps at most kernel_bias_bits of bias.

    The table is re-expressed, not re-derived: with P' = min(P, bits), bias' = round(bias / 2^(P - P')), and
    the multiplier, applied to (acc << P') + bias', moves its shift by P - P' (m0 unchanged)."""
    from rsq.export.snap import kernel_bias_bits

    plain = lower_module._Lowering._layer_table

    def layer_table(self, op, key, s_in, s_out, lo, hi):
        table = plain(self, op, key, s_in, s_out, lo, hi)
        if self.tensors[op.output].kind != "narrow":
            return table
        weight = self.weights[op.name]
        bits = kernel_bias_bits(weight.values, weight.bits, self.tensors[self.int_input[op.name]].bits)
        shift = int(table["bias_shift"][0])
        drop = shift - min(shift, bits)
        if drop:
            bias = np.floor(table["bias"].astype(np.float64) / 2.0 ** drop + 0.5).astype(np.int32)
            table = {**table, "bias": bias, "bias_shift": np.array([shift - drop], dtype=np.int32),
                     "shift": (table["shift"] - drop).astype(np.int32)}
        return table

    lower_module._Lowering._layer_table = layer_table
    return plain


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("runs", nargs="+", help="trained LSQ runs (folders or checkpoints)")
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--out", default=None, help="write FILE.md and FILE.json (default: print only)")
    args = parser.parse_args()
    import rsq.export.lower as lower_module
    from rsq.export import export_checkpoint
    from rsq.verify import verify_export

    results = {}
    for run in args.runs:
        for lowering in LOWERINGS:
            plain = kernel_bias_lowering(lower_module) if lowering == LOWERINGS[1] else None
            try:
                with tempfile.TemporaryDirectory(prefix="probe_kernel_bias.") as work:
                    export = Path(work) / "export"
                    export_checkpoint(run, "packed", export, snap=False)  # the model as trained
                    export_checkpoint(run, "qlinear", export, snap=False)
                    verified = verify_export(export, test_subset=args.test_subset, quiet=True, latency=False)
            finally:
                if plain is not None:
                    lower_module._Lowering._layer_table = plain
            by = {(row["resolution"], row["artifact"]): row for row in verified["rows"]}
            results[run, lowering] = [
                {"resolution": r, "fake_quant_top1": by[r, "fake-quant"]["top1"],
                 "runtime": by[r, "runtime"]["agreement"], "qlinear": by[r, "qlinear"]["agreement"],
                 "qlinear_vs_runtime": by[r, "qlinear"]["integers_vs_runtime"]}
                for r in sorted({row["resolution"] for row in verified["rows"]}, reverse=True)]

    lines = ["# rsq.runtime with the bias precision of an int8 kernel: the QLinear graph's agreement", "",
             "`python tools/probe_kernel_bias.py " + " ".join(args.runs) + f" --test-subset {args.test_subset}`",
             "", f"CPU: {cpu_name()}.", "",
             "Top-1 agreement with the fake-quant model, in %, of rsq.runtime and of the QLinear graph, for each "
             f"lowering, on the first {args.test_subset} test images; and the QLinear graph's pooled features "
             "against rsq.runtime's (`rsq verify`'s last column).", ""]
    for run in args.runs:
        columns = [f"{lowering}: {what}" for lowering in LOWERINGS
                   for what in ("rsq.runtime", "qlinear", "qlinear vs runtime")]
        lines += [f"## {run}", "", "| px | fake-quant top-1 | " + " | ".join(columns) + " |",
                  "|---:|---:|" + "---:|---:|:---|" * len(LOWERINGS)]
        for i, row in enumerate(results[run, LOWERINGS[0]]):
            other = results[run, LOWERINGS[1]][i]
            cells = [f"{x['runtime']:.2f} | {x['qlinear']:.2f} | {x['qlinear_vs_runtime']}" for x in (row, other)]
            lines.append(f"| {row['resolution']} | {row['fake_quant_top1']:.2f} | " + " | ".join(cells) + " |")
        lines.append("")
    write_outputs(args.out, lines, {"cpu": cpu_name(), "settings": vars(args),
                                    "results": {f"{run} | {lowering}": rows for (run, lowering), rows in
                                                results.items()}}) if args.out else print("\n".join(lines))


if __name__ == "__main__":
    main()
