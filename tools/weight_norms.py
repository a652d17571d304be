"""How large the shared convolutions grow: the RS-Net's conv weight norms against a separate model's.

A convolution followed by BN computes the same function at any scale of its weights, but its
effective learning rate falls as 1 / ||w||^2: the gradient of such a weight is perpendicular to it and
shrinks as 1 / ||w||, so a step turns it by about lr * |grad| / ||w||. Weight decay and the gradient
steps set ||w||. The RS-Net's summed loss gives every convolution about n modes' gradient with one
model's decay; this prints, for finished runs of `tools/bench_rsnet.py`, each convolution's ||w|| in
every RS-Net side over the separate 28 px model's (mean over convolutions and seeds, and the range
over convolutions), so the norm growth and what `conv_decay` does to it can be read off.

    python tools/weight_norms.py --work runs/bench_rsnet --epochs 2 --seeds 0,1,2,3 --sides rsnet,conv_single
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from benchlib import cpu_name, write_outputs


def conv_norms(run: Path) -> dict[str, float]:
    """{conv name: ||weight||} of a finished run's checkpoint (the 4-D weights: every convolution)."""
    from rsq.checkpoint import load_checkpoint
    ckpt = load_checkpoint(run)
    return {k: v.norm().item() for k, v in ckpt["model"].items() if k.endswith(".weight") and v.dim() == 4}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench_rsnet")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--sides", default="rsnet", help="comma-separated RS-Net run names in each seed's folder")
    parser.add_argument("--reference", type=int, default=28, help="the separate model compared with")
    parser.add_argument("--out", default="tools/results/weight_norms")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    sides = args.sides.split(",")
    ratios = {side: {} for side in sides}  # side -> conv -> [ratio per seed]
    for seed in seeds:
        folder = Path(args.work) / f"e{args.epochs}_s{seed}"
        reference = conv_norms(folder / f"separate_{args.reference}")
        for side in sides:
            for name, norm in conv_norms(folder / side).items():
                ratios[side].setdefault(name, []).append(norm / reference[name])
    lines = [f"# Conv weight norms: RS-Net over a separate {args.reference} px model ({args.epochs} epochs)", "",
             f"CPU: {cpu_name()} (the runs' own; this script only reads checkpoints). Seeds "
             f"{', '.join(map(str, seeds))}; runs in `{args.work}`.",
             "Command: `python tools/weight_norms.py " + " ".join(sys.argv[1:]) + "`", "",
             "| side | stem conv | every conv: mean | range over convs |", "|:---|---:|---:|---:|"]
    summary = {}
    for side, by_conv in ratios.items():
        means = {name: statistics.mean(v) for name, v in by_conv.items()}
        stem = means[next(iter(means))]
        summary[side] = {"stem": stem, "mean": statistics.mean(means.values()), "min": min(means.values()),
                         "max": max(means.values()), "per_conv": means}
        s = summary[side]
        lines.append(f"| {side} | {stem:.2f}x | {s['mean']:.2f}x | {s['min']:.2f}-{s['max']:.2f}x |")
    write_outputs(args.out, lines, {"settings": vars(args), "cpu": cpu_name(), "ratios": summary})


if __name__ == "__main__":
    main()
