"""Why an RS-Net trails a separate model at some resolutions: fitting, or generalising?

Reads finished runs of `tools/bench_rsnet.py` (its ``--work`` folder) and, for the RS-Net and the
separately trained model at every resolution, measures the cross-entropy and top-1 on a fixed
slice of the *training* set (unaugmented, the first ``--train-images``) beside the test set. A
side whose training loss is higher has not fitted the data as far (the shared weights, pulled by
every mode, serve this resolution less); a side with the same training loss but a higher test
loss generalises worse. Prints the RS-Net minus separate differences, mean and per seed.

    python tools/fit_gap.py --work runs/bench_rsnet --epochs 2 --seeds 0,1,2,3
    python tools/fit_gap.py --work runs/bench_rsnet --epochs 2 --seeds 0,1 --side edge2
"""
from __future__ import annotations

import argparse
import statistics
import sys
from pathlib import Path

from benchlib import cpu_name, write_outputs

RESOLUTIONS = [28, 24, 20, 16, 12]


def measure(run: Path, sets: dict, resolutions: list[int]) -> dict[str, dict[int, tuple[float, float]]]:
    """{split: {resolution: (mean cross-entropy, top-1 %)}} of a finished run, loaded once, on every
    ``sets[split] = (images, labels)``."""
    import torch
    import torch.nn.functional as F

    import rsq
    from rsq.checkpoint import checkpoint_config, load_model
    from rsq.data import input_normalization
    from rsq.data.multires import resize_batch

    model, ckpt = load_model(run)
    model.eval()
    mean, std = (torch.tensor(v).view(1, -1, 1, 1) for v in input_normalization(checkpoint_config(ckpt)))
    out = {split: {} for split in sets}
    with torch.no_grad():
        for r in resolutions:
            rsq.set_mode(model, r)
            for split, (images, labels) in sets.items():
                loss = correct = 0.0
                for i in range(0, len(images), 500):
                    x = (images[i:i + 500].float() / 255.0 - mean) / std
                    z = model(resize_batch(x, r))
                    y = labels[i:i + 500]
                    loss += F.cross_entropy(z, y, reduction="sum").item()
                    correct += (z.argmax(1) == y).sum().item()
                out[split][r] = (loss / len(images), 100.0 * correct / len(images))
    return out


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--work", default="runs/bench_rsnet")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--seeds", default="0,1,2,3")
    parser.add_argument("--side", default="rsnet", help="the RS-Net run's name in each seed's folder")
    parser.add_argument("--train-images", type=int, default=10000)
    parser.add_argument("--out", default="tools/results/fit_gap")
    args = parser.parse_args()
    import torch

    from rsq.data import fashion_mnist

    torch.set_num_threads(1)
    seeds = [int(s) for s in args.seeds.split(",")]
    train_x, train_y = fashion_mnist.load("train")
    test_x, test_y = fashion_mnist.load("test")
    sets = {"train": (train_x[:args.train_images], train_y[:args.train_images]), "test": (test_x, test_y)}
    rows = {}  # (seed, side, split) -> {r: (ce, top1)}
    for seed in seeds:
        folder = Path(args.work) / f"e{args.epochs}_s{seed}"
        rsnet = measure(folder / args.side, sets, RESOLUTIONS)
        separate = {r: measure(folder / f"separate_{r}", sets, [r]) for r in RESOLUTIONS}
        for split in sets:
            rows[(seed, "rsnet", split)] = rsnet[split]
            rows[(seed, "separate", split)] = {r: separate[r][split][r] for r in RESOLUTIONS}
        print(f"seed {seed} measured", file=sys.stderr, flush=True)

    def column(side: str, split: str, r: int, k: int) -> list[float]:
        return [rows[(s, side, split)][r][k] for s in seeds]

    lines = ["# Fitting or generalising: the RS-Net against separate models, on training and test data", "",
             f"CPU: {cpu_name()}. Runs: `{args.work}`, {args.epochs} epochs, seeds {args.seeds}, RS-Net side "
             f"`{args.side}`. Training data: the first {args.train_images} training images, unaugmented; test: all "
             f"10000. Cross-entropy (CE) and top-1 per resolution, mean over seeds; the RS-Net minus separate "
             f"difference with its per-seed values. Command: `python tools/fit_gap.py {' '.join(sys.argv[1:])}`.", "",
             "| resolution | train CE separate | train CE RS-Net | diff (per seed) | train top-1 diff | "
             "test CE separate | test CE RS-Net | diff | test top-1 diff |", "|---:|---:|---:|---:|---:|---:|---:|---:|---:|"]
    payload = {"settings": vars(args), "cpu": cpu_name(), "rows": []}
    for r in RESOLUTIONS:
        cells = [str(r)]
        for split in ("train", "test"):
            sep_ce, rs_ce = column("separate", split, r, 0), column("rsnet", split, r, 0)
            diff = [a - b for a, b in zip(rs_ce, sep_ce)]
            acc_diff = [a - b for a, b in zip(column("rsnet", split, r, 1), column("separate", split, r, 1))]
            per_seed = ", ".join(f"{d:+.3f}" for d in diff)
            cells += [f"{statistics.mean(sep_ce):.3f}", f"{statistics.mean(rs_ce):.3f}",
                      f"{statistics.mean(diff):+.3f}" + (f" ({per_seed})" if split == "train" else ""),
                      f"{statistics.mean(acc_diff):+.2f}"]
            payload["rows"].append({"resolution": r, "split": split, "separate_ce": sep_ce, "rsnet_ce": rs_ce,
                                    "top1_diff": acc_diff})
        lines.append("| " + " | ".join(cells) + " |")
    write_outputs(args.out, lines, payload)


if __name__ == "__main__":
    main()
