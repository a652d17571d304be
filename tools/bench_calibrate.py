"""How a resolution added after training (`rsq calibrate`) compares with its trained neighbours.

Takes a finished RS-Net checkpoint (default: the main job's, trained at 28/24/20/16/12 px) and,
for each untrained resolution in between and beyond, measures top-1 on the full test set:
- "nearest BN": the nearest trained resolution's BN used as is (what a model without
  calibration would have to do);
- "calibrated": the same BN copy with statistics re-estimated on N training images;
next to the trained neighbours' own top-1.

    python tools/bench_calibrate.py [--checkpoint runs/fashion_mnist/checkpoint.pt] [--images 512]
"""
from __future__ import annotations

import argparse
import copy

import torch

from benchlib import write_outputs
from rsq.checkpoint import build_model, checkpoint_config, load_checkpoint
from rsq.convert import add_resolution, nearest_resolution
from rsq.data import build_data
from rsq.evaluate import evaluate
from rsq.runs import recalibrate_bn, training_pool


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--checkpoint", default="runs/fashion_mnist/checkpoint.pt")
    parser.add_argument("--new", default="32,26,22,18,14,10", help="untrained resolutions to add")
    parser.add_argument("--images", type=int, default=512, help="training images for the statistics")
    parser.add_argument("--out", default="tools/results/bench_calibrate")
    args = parser.parse_args()
    torch.set_num_threads(1)
    ckpt = load_checkpoint(args.checkpoint)
    config = checkpoint_config(ckpt)
    trained = list(ckpt["resolutions"])
    new = [int(r) for r in args.new.split(",")]
    base = build_model(ckpt).eval()
    pool = training_pool(config, args.images)

    config.resolutions = sorted(trained + new, reverse=True)
    test = build_data(config, train=False).test
    nearest, calibrated = copy.deepcopy(base), copy.deepcopy(base)
    for r in new:
        like = nearest_resolution(trained, r)
        add_resolution(nearest, r, like=like)
        add_resolution(calibrated, r, like=like)
        recalibrate_bn(calibrated, r, pool)
    acc_nearest = evaluate(nearest, test, config.resolutions)["per_resolution"]
    acc_cal = evaluate(calibrated, test, config.resolutions)["per_resolution"]

    lines = [
        "# Resolutions added after training (`rsq calibrate`)",
        "",
        f"Checkpoint: `{args.checkpoint}` ({config.model} RS-Net trained at {trained} px on {config.data}, "
        f"{config.epochs} epochs). Calibration: BN statistics re-estimated on {args.images} training images. "
        f"Top-1 on the full test set. Command: `python tools/bench_calibrate.py`",
        "",
        "| resolution | kind | top-1, nearest BN as is | top-1, calibrated |",
        "|---:|:---|---:|---:|",
    ]
    for r in config.resolutions:
        if r in trained:
            lines.append(f"| {r} | trained | | {acc_cal[r]['top1']:.2f} |")
        else:
            like = nearest_resolution(trained, r)
            lines.append(f"| {r} | new (BN from {like}) | {acc_nearest[r]['top1']:.2f} | {acc_cal[r]['top1']:.2f} |")
    inner = [r for r in new if min(trained) < r < max(trained)]
    if inner:
        gaps = []
        for r in inner:
            below = max(k for k in trained if k < r)
            above = min(k for k in trained if k > r)
            interp = acc_cal[below]["top1"] + (acc_cal[above]["top1"] - acc_cal[below]["top1"]) * (r - below) / (above - below)
            gaps.append(acc_cal[r]["top1"] - interp)
        lines += ["", f"Calibrated in-between resolutions vs linear interpolation of their trained neighbours: "
                  f"mean {sum(gaps) / len(gaps):+.2f} points (range {min(gaps):+.2f} to {max(gaps):+.2f})."]
    write_outputs(args.out, lines, {"settings": vars(args), "nearest_bn": {str(k): v for k, v in acc_nearest.items()},
                                    "calibrated": {str(k): v for k, v in acc_cal.items()}})


if __name__ == "__main__":
    main()
