"""Top-1 per resolution of quantized RS-Nets on Fashion-MNIST, one recipe for all bit widths.

1. A full-precision ResNet-20 RS-Net: the main job's checkpoint (`--init`, default
   runs/fashion_mnist/checkpoint.pt), or one trained here from scratch with `--init scratch`.
2. From that checkpoint, every setting is trained for the same further epochs with
   the same recipe: full precision again (`fp`, the fair reference), W8A8, W4A4 (activation
   quantizers shared by all resolutions, and one per resolution), W2A2 with LSQ, and W2A2 with
   the paper's LQ-Nets (first conv / last FC in full precision for LQ-Nets as in the paper, 8-bit
   for LSQ). Full MRED everywhere.

    python tools/bench_quant_accuracy.py [--quick]
"""
from __future__ import annotations

import argparse
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

from benchlib import finished_run, run_train, top1, write_outputs

RESOLUTIONS = [28, 24, 20, 16, 12]
SETTINGS = {  # name -> flags on top of the common fine-tuning recipe
    "fp": ["--bits", "32"],
    "w8a8": ["--bits", "8"],
    "w4a4": ["--bits", "4"],
    "w4a4_act_per_res": ["--bits", "4", "--act-per-resolution"],
    "w2a2_lsq": ["--bits", "2"],
    "w2a2_lqnet": ["--bits", "2", "--quantizer", "lqnet", "--first-last", "fp"],
}
GOALS = {"w4a4": 1.0, "w2a2_lsq": 4.0, "w2a2_lqnet": 4.0}  # allowed top-1 drop vs fp, points


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", default="runs/fashion_mnist/checkpoint.pt",
                        help="full-precision RS-Net checkpoint to start from, or 'scratch'")
    parser.add_argument("--subset", type=int, default=10000)
    parser.add_argument("--scratch-epochs", type=int, default=3)
    parser.add_argument("--epochs", type=int, default=2, help="epochs of every setting after --init")
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="runs/bench_quant")
    parser.add_argument("--out", default="tools/results/bench_quant_accuracy")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--report-only", action="store_true",
                        help="train nothing: tabulate the runs already in --work (missing ones marked)")
    args = parser.parse_args()
    if args.quick:
        args.subset, args.scratch_epochs, args.epochs, args.out = 1024, 1, 1, args.out + "_quick"
    res = ["--resolutions", ",".join(map(str, RESOLUTIONS)), "--subset", str(args.subset), "--distill", "full"]
    if args.quick:
        args.init = "scratch"
    start = None
    init = args.init
    if init == "scratch":
        start = (finished_run(args.work, "fp_scratch") if args.report_only else
                 run_train("fp_scratch", ["fashion_mnist", *res, "--epochs", str(args.scratch_epochs)],
                           args.work, args.threads * args.jobs))
        init = str(Path(args.work) / "fp_scratch" / "checkpoint.pt")
    elif not Path(init).is_file():
        raise SystemExit(f"--init {init} does not exist; train it first (the README's main command) or use --init scratch")
    common = ["fashion_mnist", *res, "--epochs", str(args.epochs), "--lr", str(args.lr), "--warmup-epochs", "0",
              "--weight-decay", "1e-4", "--init", init]
    if args.report_only:
        results = {name: done for name in SETTINGS if (done := finished_run(args.work, name)) is not None}
    else:
        with ThreadPoolExecutor(args.jobs) as pool:
            runs = pool.map(lambda kv: run_train(kv[0], common + kv[1], args.work, args.threads), SETTINGS.items())
            results = dict(zip(SETTINGS, runs))
    if start is not None:
        results["fp_scratch"] = start

    lines = [
        "# Quantized RS-Nets on Fashion-MNIST (ResNet-20, resolutions 28/24/20/16/12)",
        "",
        f"Setting: start from `{init}` (full precision)"
        + (f", trained here for {args.scratch_epochs} epochs from scratch on {args.subset} images" if start else "")
        + f". Every row: {args.epochs} epochs on {args.subset} training images from that checkpoint, lr {args.lr} "
        f"cosine, no warm-up, weight decay 1e-4, batch 128, full MRED. LSQ rows: first conv / last FC 8-bit; "
        f"LQ-Nets row: first/last full precision (the paper's setting). One thread per run, {args.jobs} runs at a time.",
        "Command: `python tools/bench_quant_accuracy.py "
        + ("--quick" if args.quick else f"--subset {args.subset} --epochs {args.epochs} --lr {args.lr}") + "`",
        "",
        "| setting | " + " | ".join(f"{r}px" for r in RESOLUTIONS) + " | ensemble | BitOPs @28 | weights |",
        "|:---|" + "---:|" * (len(RESOLUTIONS) + 3),
    ]
    for name in [*(["fp_scratch"] if start else []), *SETTINGS]:
        if name not in results:
            lines.append(f"| {name} | " + " | ".join("not run" for _ in RESOLUTIONS) + " | | | |")
            continue
        result = results[name]
        row28 = next(r for r in result["rows"] if r["resolution"] == RESOLUTIONS[0])
        cells = [f"{top1(result, r):.2f}" for r in RESOLUTIONS]
        lines.append(f"| {name} | " + " | ".join(cells) + f" | {result['ensemble']['top1']:.2f} | "
                     f"{row28['bitops'] / 1e9:.2f} G | {row28['weight_size_bits'] / 8 / 1024:.1f} KiB |")
    lines += ["", "Drop against `fp` (same recipe), points of top-1:", "",
              "| setting | " + " | ".join(f"{r}px" for r in RESOLUTIONS) + " | goal | met |",
              "|:---|" + "---:|" * (len(RESOLUTIONS) + 2)]
    for name in SETTINGS:
        if name == "fp" or name not in results:
            continue
        drops = [top1(results["fp"], r) - top1(results[name], r) for r in RESOLUTIONS]
        goal = GOALS.get(name)
        met = "" if goal is None else ("yes" if max(drops) <= goal else "no")
        lines.append(f"| {name} | " + " | ".join(f"{d:+.2f}" for d in drops)
                     + f" | {'' if goal is None else f'<= {goal}'} | {met} |")
    if "w4a4_act_per_res" not in results:
        write_outputs(args.out, lines, {"settings": vars(args), "results": results})
        return
    shared = sum(top1(results["w4a4"], r) for r in RESOLUTIONS)
    per_res = sum(top1(results["w4a4_act_per_res"], r) for r in RESOLUTIONS)
    better = "one activation quantizer per resolution" if per_res > shared else "shared activation quantizers"
    lines += ["", f"Shared vs per-resolution activation quantizers (W4A4, mean top-1): "
              f"{shared / len(RESOLUTIONS):.2f} vs {per_res / len(RESOLUTIONS):.2f}: {better} is better here."]
    write_outputs(args.out, lines, {"settings": vars(args), "results": results})


if __name__ == "__main__":
    main()
