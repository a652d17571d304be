"""The residual stream on learned 8-bit grids (`--residual-bits 8`) against the float one, at W4A4 (or W8A8).

    .venv/bin/python tools/bench_residual_bits.py [--work runs/bench_residual_bits] [--reuse] [--bits 8]

Both models start from one full-precision RS-Net (`rsq train fashion_mnist --epochs 1`, all 60k images)
and train one W4A4 epoch on 20k images (`rsq train fashion_mnist_w4a4 --bits 4 --init ... --epochs 1
--subset 20000`, the second with `--residual-bits 8`), the two side by side on one thread each. `--bits 8`:
the same at W8A8 (`--bits 8`, float shortcuts either way). Each is
exported as packed, c and qlinear and verified on the first 2000 test images: top-1 of the fake-quant
model, agreement of the integer model (rsq.runtime, the C runtime) and of the QLinear graph with it,
and the C runtime's arena per resolution (the residual stream is int32 in one, int8 in the other).
"""
from __future__ import annotations

import argparse
import json
import sys
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import cpu_name, finished_run, run_train, write_outputs  # noqa: E402

FORMATS = ("packed", "c", "qlinear")
RUNS = {"float residual": [], "8-bit residual": ["--residual-bits", "8"]}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench_residual_bits")
    parser.add_argument("--reuse", action="store_true", help="keep runs already finished in --work")
    parser.add_argument("--test-subset", type=int, default=2000)
    parser.add_argument("--bits", type=int, choices=(4, 8), default=4)
    parser.add_argument("--out", default="tools/results/bench_residual_bits")
    args = parser.parse_args()
    from rsq.export import export_checkpoint
    from rsq.verify import verify_export

    work = Path(args.work)
    fp = (args.reuse and finished_run(args.work, "fp")) or run_train("fp", ["fashion_mnist", "--epochs", "1"],
                                                                     args.work, 2)
    names = {"float residual": f"w{args.bits}", "8-bit residual": f"w{args.bits}r"}
    # float shortcuts whatever the recipe says
    common = ["fashion_mnist_w4a4", "--bits", str(args.bits), "--init", str(work / "fp" / "checkpoint.pt"),
              "--epochs", "1", "--subset", "20000", "--no-quantized-shortcut"]

    def trained(label: str) -> dict:
        name = names[label]
        return (args.reuse and finished_run(args.work, name)) or run_train(name, common + RUNS[label], args.work, 1)

    with ThreadPoolExecutor(2) as pool:
        results = dict(zip(RUNS, pool.map(trained, RUNS)))
    rows = {}
    for label, name in names.items():
        export = work / f"export_{name}"
        for fmt in FORMATS:
            export_checkpoint(work / name, fmt, export, overwrite=fmt == FORMATS[0])
        verified = verify_export(export, test_subset=args.test_subset, quiet=True, latency=False)
        memory = json.loads((export / "c" / "memory.json").read_text())["resolutions"]
        by = {(row["resolution"], row["artifact"]): row for row in verified["rows"]}
        rows[label] = [{"resolution": r, "top1": by[r, "fake-quant"]["top1"],
                        **{f"{a}_agreement": by[r, a]["agreement"] for a in ("runtime", "c", "qlinear")},
                        "c_integers": by[r, "c"]["integers_vs_runtime"], "arena_bytes": memory[str(r)]["arena_bytes"]}
                       for r in sorted({row["resolution"] for row in verified["rows"]}, reverse=True)]
    bits = f"W{args.bits}A{args.bits}"
    lines = [f"# The residual stream on learned 8-bit grids (`--residual-bits 8`), {bits}", "",
             "`tools/bench_residual_bits.py" + (" --reuse" if args.reuse else "") + (
                 f" --bits {args.bits}" if args.bits != 4 else "") + "`", "", f"CPU: {cpu_name()}.", "",
             f"Both from one full-precision RS-Net (1 epoch, all images; top-1 at 28 px "
             f"{next(r['top1'] for r in fp['rows'] if r['resolution'] == 28):.2f}), then one {bits} epoch on 20k "
             f"images, one seed; verified on the first {args.test_subset} test images.", "",
             "| resolution | " + " | ".join(f"{label}: {what}" for label in RUNS for what in
                                              ("fake-quant top-1", "integer model agreement", "qlinear agreement",
                                               "C arena bytes")) + " |",
             "|---:|" + "---:|" * 8]
    for i, row in enumerate(rows["float residual"]):
        other = rows["8-bit residual"][i]
        cells = [f"{x['top1']:.2f} | {x['runtime_agreement']:.2f} | {x['qlinear_agreement']:.2f} | {x['arena_bytes']}"
                 for x in (row, other)]
        lines.append(f"| {row['resolution']} | " + " | ".join(cells) + " |")
    lines += ["", "The C runtime's integer logits equal rsq.runtime's in every row ("
              + ", ".join(sorted({x["c_integers"] for rs in rows.values() for x in rs})) + ").",
              "Training time (rsq's own count): " + ", ".join(f"{label} {results[label]['train_time_s']} s"
                                                              for label in RUNS) + " (one thread each, side by side)."]
    write_outputs(args.out, lines, {"cpu": cpu_name(), "settings": vars(args), "fp": fp, "runs": results,
                                    "rows": rows})


if __name__ == "__main__":
    main()
