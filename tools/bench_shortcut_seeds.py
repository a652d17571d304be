"""Quantized shortcuts (`--quantized-shortcut`) against the float shortcut, paired by seed, at W8A8 and W4A4.

    .venv/bin/python tools/bench_shortcut_seeds.py [--seeds 0,1,2,3,4] [--subset 30000] [--work DIR] [--reuse]

Every run starts from one full-precision RS-Net (`rsq train fashion_mnist --epochs 2`: the main job's
recipe in `--fp-epochs` epochs on all 60k images, 2 threads) and trains `--epochs` epochs of the W4A4
recipe on the first `--subset` training images (`rsq train fashion_mnist_w4a4 --bits B --init ... --seed S`),
once with float shortcuts (the paper's, `--no-quantized-shortcut`) and once with `--quantized-shortcut`
(the `fashion_mnist_w8a8` recipe's setting), two runs side by side on one thread each.
Top-1 is each run's own evaluation on all 10k test images. The table gives, per bit width and
resolution, each side's mean and the paired difference (quantized minus float shortcut) as mean,
sample standard deviation and range over the seeds.
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))
from benchlib import cpu_name, run_configs, top1, write_outputs  # noqa: E402

SIDES = {"float": ["--no-quantized-shortcut"], "quantized": ["--quantized-shortcut"]}


def _stats(values: list[float]) -> dict:
    return {"mean": statistics.fmean(values), "std": statistics.stdev(values) if len(values) > 1 else 0.0,
            "min": min(values), "max": max(values)}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--seeds", default="0,1,2,3,4")
    parser.add_argument("--bits", default="8,4")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--subset", type=int, default=30000)
    parser.add_argument("--fp-epochs", type=int, default=2)
    parser.add_argument("--work", default="runs/bench_shortcut_seeds")
    parser.add_argument("--reuse", action="store_true", help="keep runs already finished in --work")
    parser.add_argument("--out", default="tools/results/bench_shortcut_seeds")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    bit_widths = [int(b) for b in args.bits.split(",")]

    work = Path(args.work)
    fp = run_configs({"fp": []}, ["fashion_mnist", "--epochs", str(args.fp_epochs)], args.work, threads=2, jobs=1,
                     reuse=args.reuse)["fp"]
    common = ["fashion_mnist_w4a4", "--init", str(work / "fp" / "checkpoint.pt"), "--epochs", str(args.epochs),
              "--subset", str(args.subset)]
    configs = {f"w{b}_{side}_s{seed}": ["--bits", str(b), "--seed", str(seed), *flags]
               for b in bit_widths for seed in seeds for side, flags in SIDES.items()}
    runs = run_configs(configs, common, args.work, threads=1, jobs=2, reuse=args.reuse)

    resolutions = [row["resolution"] for row in fp["rows"]]
    lines = ["# Quantized shortcuts against the float shortcut, paired by seed", "",
             "`tools/bench_shortcut_seeds.py" + "".join(f" --{k.replace('_', '-')} {getattr(args, k)}"
                                                        for k in ("seeds", "bits", "epochs", "subset", "fp_epochs"))
             + "`", "",
             f"CPU: {cpu_name()}.", "",
             f"Every run starts from one full-precision RS-Net ({args.fp_epochs} epochs on all 60k images, top-1 "
             + " / ".join(f"{top1(fp, r):.2f}" for r in resolutions) + f" at {'/'.join(map(str, resolutions))} px) "
             f"and trains {args.epochs} epoch(s) of the W4A4 recipe at the bit width below on the first "
             f"{args.subset} training images; seeds {args.seeds}; top-1 on all 10k test images. "
             "diff = quantized minus float shortcut, paired by seed: mean ± sample std (range).", ""]
    summary = {}
    for b in bit_widths:
        lines += [f"## W{b}A{b}", "",
                  "| resolution | float shortcut: mean top-1 | quantized shortcut: mean top-1 | diff |",
                  "|---:|---:|---:|:---|"]
        for r in resolutions:
            side = {s: [top1(runs[f"w{b}_{s}_s{seed}"], r) for seed in seeds] for s in SIDES}
            diff = _stats([q - f for q, f in zip(side["quantized"], side["float"])])
            summary[f"w{b}_{r}"] = {"float": side["float"], "quantized": side["quantized"], "diff": diff}
            lines.append(f"| {r} | {statistics.fmean(side['float']):.2f} | {statistics.fmean(side['quantized']):.2f} "
                         f"| {diff['mean']:+.2f} ± {diff['std']:.2f} ({diff['min']:+.2f} .. {diff['max']:+.2f}) |")
        times = {s: statistics.fmean(runs[f"w{b}_{s}_s{seed}"]["train_time_s"] for seed in seeds) for s in SIDES}
        lines += ["", f"Mean training time (rsq's own count, one thread, two runs side by side): float "
                      f"{times['float']:.0f} s, quantized {times['quantized']:.0f} s.", ""]
    write_outputs(args.out, lines, {"cpu": cpu_name(), "settings": vars(args), "fp": fp, "runs": runs,
                                    "summary": summary})


if __name__ == "__main__":
    main()
