"""Agreement of every export format with the fake-quantized model, per bit width (`rsq verify`'s table).

For each bit width: a short `rsq train` on Fashion-MNIST (ResNet-20, 28/20/12 px), `rsq export`
of every format, then `rsq.verify.verify_export` on the test set: top-1, top-1 agreement with the
fake-quant model, and whether each integer format's logits equal the reference runtime's.

With --init-epochs N (the committed setting) the quantized runs start, as the W4A4 recipe does,
from a full-precision RS-Net trained N epochs on all 60k images, and train at lr 0.02: models with
a trained model's margins, where a from-scratch epoch leaves many near-ties between logits.

    python tools/bench_verify.py --init-epochs 1 --subset 20000 --reuse   # W8A8, W4A4, W2A2
    python tools/bench_verify.py --bits 4 --quick

With --recipes the models are the shipped recipes' own: the main job (`rsq train`, the
full-precision fashion_mnist recipe), then `rsq train fashion_mnist_w4a4 --bits B --init` its
checkpoint, every resolution, the whole test set (the issue's goal is stated on these):

    python tools/bench_verify.py --recipes --bits 8,4 --reuse --out tools/results/bench_verify_recipes

The W4A4 rerun after the exact requantization fit (docs/export.md §8c), one run on both cores:

    python tools/bench_verify.py --recipes --bits 4 --jobs 1 --threads 2 --reuse --out tools/results/bench_verify_recipes_w4

With --shortcut the quantized runs add --quantized-shortcut (runs w{B}_shortcut, from the same --init):

    python tools/bench_verify.py --recipes --bits 8,4 --shortcut --reuse --out tools/results/bench_verify_shortcut

With --latency the tables also carry rsq verify's latency pass (each engine warm at batch 1 and 32, on
this process's threads), here for the W8A8 short run with quantized shortcuts:

    python tools/bench_verify.py --bits 8 --init-epochs 1 --subset 20000 --shortcut --latency \
        --out tools/results/bench_verify_latency

With --residual-bits 8 the residual stream is trained on learned 8-bit grids (runs w{B}_res8), which the
QLinear graph then carries without a grid of its own; the formats that refuse such a model are listed
under its table:

    python tools/bench_verify.py --bits 4 --quick --residual-bits 8
"""
from __future__ import annotations

import argparse
import contextlib
import io
import shutil
from pathlib import Path

from benchlib import cpu_name, run_configs, write_outputs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--bits", default="8,4,2")
    parser.add_argument("--subset", type=int, default=6000)
    parser.add_argument("--test-subset", type=int, default=1000)
    parser.add_argument("--work", default=None,
                        help="run folder (default runs/bench_verify; with --recipes runs/bench_verify_recipes)")
    parser.add_argument("--out", default="tools/results/bench_verify")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1, help="threads of each quantized run")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--init-epochs", type=int, default=0, help="start from a full-precision RS-Net "
                        "trained this many epochs on all images (0: train from scratch)")
    parser.add_argument("--reuse", action="store_true", help="keep runs already finished in --work")
    parser.add_argument("--shortcut", action="store_true", help="train the quantized runs with --quantized-shortcut")
    parser.add_argument("--residual-bits", type=int, default=0,
                        help="train the quantized runs with --residual-bits N (the residual stream on learned grids)")
    parser.add_argument("--latency", action="store_true", help="also rsq verify's latency pass (batch 1 and 32, "
                        "warm, on the process's threads); off by default, as the agreement is what this tool is for")
    parser.add_argument("--recipes", action="store_true", help="the recipes' models: fashion_mnist (4 epochs), "
                        "then fashion_mnist_w4a4 --bits B from it; all images, all resolutions, the whole test set")
    args = parser.parse_args()
    if args.quick:
        args.subset, args.test_subset, args.out = 1024, 128, args.out + "_quick"
    bits = [int(b) for b in args.bits.split(",")]
    if args.recipes:  # the shipped recipes: the main job, then the W4A4 recipe at each bit width from it
        args.work = args.work or "runs/bench_verify_recipes"
        fp, fp_threads, common, test_subset = ["fashion_mnist", "--seed", "0"], 2, ["fashion_mnist_w4a4"], None
        heading = (f"Each model: `rsq train fashion_mnist_w4a4 --bits B --init {args.work}/fp/checkpoint.pt` "
                   "(the W4A4 recipe, 4 epochs on all 60k images, from the main job's full-precision RS-Net, "
                   "`rsq train fashion_mnist --seed 0`), then every format of `rsq export` and `rsq verify` on "
                   "all 10k test images (qonnx: its first 64)")
    else:  # short runs at 28/20/12 px, from scratch or (--init-epochs) from a briefly trained FP RS-Net
        args.work = args.work or "runs/bench_verify"
        common = ["fashion_mnist", "--resolutions", "28,20,12", "--epochs", "1", "--subset", str(args.subset),
                  "--test-subset", str(args.test_subset), "--seed", "0", "--workers", "0"]
        fp = (["fashion_mnist", "--resolutions", "28,20,12", "--epochs", str(args.init_epochs), "--test-subset",
               str(args.test_subset), "--seed", "0", "--workers", "0"] if args.init_epochs else None)
        fp_threads, test_subset = 2, args.test_subset
        if fp:
            common += ["--lr", "0.02"]
        heading = (f"Each model: `rsq train {' '.join(common)} --bits B`"
                   + (f" (--init: `rsq train {' '.join(fp)}`)" if fp else "") + ", then every format of "
                   f"`rsq export` and `rsq verify` on the first {args.test_subset} test images (qonnx: its first 64)")
    init = []
    if fp:
        run_configs({"fp": []}, fp, args.work, fp_threads, 1, reuse=args.reuse)
        init = ["--init", str(Path(args.work) / "fp" / "checkpoint.pt")]
    # A recipe may quantize shortcuts (fashion_mnist_w8a8): the runs without --shortcut ask for float ones by name.
    suffix, extra, shortcut = "", [], ["--no-quantized-shortcut"]
    if args.shortcut:
        suffix, extra, shortcut = suffix + "_shortcut", extra + ["--quantized-shortcut"], []
    if args.residual_bits:
        suffix, extra = suffix + f"_res{args.residual_bits}", extra + ["--residual-bits", str(args.residual_bits)]
    heading += f"; with `{' '.join(extra + shortcut)}`"
    runs = run_configs({f"w{b}{suffix}": ["--bits", str(b), *init, *extra, *shortcut] for b in bits}, common, args.work,
                       args.threads, args.jobs, reuse=args.reuse)
    runs = {name.removesuffix(suffix): run for name, run in runs.items()}
    verify_all(bits, runs, args, test_subset, heading, "after the recipe" if args.recipes else "after the short run",
               suffix)


def verify_all(bits: list[int], runs: dict, args, test_subset, heading: str, when: str, suffix: str = "") -> None:
    """Export every format of each bit width's run (w{B}{suffix}), verify it, write the table."""
    from rsq.errors import RsqError
    from rsq.export import FORMATS, export_checkpoint
    from rsq.verify import format_verify_table, verify_export

    lines = ["# Every export format against the fake-quantized model", "", f"CPU: {cpu_name()}. {heading}.", ""]
    payload = {"settings": vars(args), "cpu": cpu_name(), "verify": {}}
    for b in bits:
        folder = Path(args.work) / f"export_w{b}{suffix}"
        shutil.rmtree(folder, ignore_errors=True)  # a fresh export of every format (a run may be reused)
        refused = []
        for fmt in FORMATS:
            try:
                export_checkpoint(Path(args.work) / f"w{b}{suffix}", fmt, folder)
            except RsqError as exc:  # a format that does not take this model (e.g. residual grids): said below
                refused.append(f"{fmt}: {exc}")
        with contextlib.redirect_stdout(io.StringIO()):
            result = verify_export(folder, test_subset=test_subset, quiet=True, latency=args.latency)
        rows = runs[f"w{b}"]["rows"]
        top1 = " / ".join(f"{row['top1']:.2f}" for row in rows)
        at = "/".join(str(row["resolution"]) for row in rows)
        lines += [f"## W{b}A{b} (fake-quant top-1 at {at} {when}: {top1})", "",
                  format_verify_table(result), ""]
        lines += [f"Not exported: {line}" for line in refused] + ([""] if refused else [])
        payload["verify"][f"W{b}A{b}"] = result
    write_outputs(args.out, lines, payload)


if __name__ == "__main__":
    main()
