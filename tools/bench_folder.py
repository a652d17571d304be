"""Data the user brings: Fashion-MNIST written out as PNG folders against rsq's in-memory path.

Writes the Fashion-MNIST training and test images as ``ROOT/train/CLASS/*.png`` and
``ROOT/val/CLASS/*.png`` (grayscale, 28x28), then trains the same recipe twice: once on the
embedded in-memory data set, once through the image-folder path with its automatic choices
(small-image augmentation, one channel, statistics estimated from the training images). The
goal: the folder path within 1 point of the in-memory path at every resolution.

    python tools/bench_folder.py --reuse        # the committed setting (all 60k images, seeds 0 and 1)
    python tools/bench_folder.py --quick
"""
from __future__ import annotations

import argparse
from pathlib import Path

from PIL import Image

from benchlib import cpu_name, run_configs, top1, write_outputs
from rsq.data import fashion_mnist

RESOLUTIONS = [28, 24, 20, 16, 12]


def write_png_folders(root: Path, limit_train: int) -> None:
    """The data set as PNG files; the first ``limit_train`` training images of a fixed order (0 = all)."""
    if (root / "done").is_file():
        return
    for split, folder in (("train", "train"), ("test", "val")):
        images, labels = fashion_mnist.load(split)
        count = len(images) if split == "test" or not limit_train else min(limit_train, len(images))
        for i in range(count):
            target = root / folder / f"class_{int(labels[i])}"
            target.mkdir(parents=True, exist_ok=True)
            Image.fromarray(images[i, 0].numpy(), mode="L").save(target / f"{i:05d}.png")
    (root / "done").write_text("complete\n")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--train-images", type=int, default=0, help="training images for both paths (0 = all)")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work", default="runs/bench_folder")
    parser.add_argument("--out", default="tools/results/bench_folder")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        args.epochs, args.train_images, seeds = 1, 512, [0]
        args.out, args.work = args.out + "_quick", args.work + "_quick"
    root = Path(args.work) / "fashion_mnist_png"
    write_png_folders(root, args.train_images)
    common = ["fashion_mnist", "--epochs", str(args.epochs), "--workers", "0"]
    # With all 60000 both paths train on the same images. With N < 60000 the folder holds the first N
    # in file order and the in-memory run takes N of a fixed shuffle: two random samples of that size
    # (Fashion-MNIST's file order is itself shuffled).
    memory_flags = ["--subset", str(args.train_images)]
    configs = {}
    for seed in seeds:
        configs[f"in_memory_s{seed}"] = memory_flags + ["--seed", str(seed)]
        configs[f"image_folder_s{seed}"] = ["--data", "imagefolder", "--data-dir", str(root), "--seed", str(seed)]
    if args.quick:
        for flags in configs.values():
            flags += ["--test-subset", "512"]

    results = run_configs(configs, common, args.work, args.threads, args.jobs, args.reuse)
    lines = ["# Fashion-MNIST as PNG folders vs the in-memory path (same recipe)", "",
             f"CPU: {cpu_name()}. `rsq train {' '.join(common)} --seed S` with `{' '.join(memory_flags)}` (in memory) or "
             f"`--data imagefolder --data-dir ROOT` (ROOT holds {args.train_images or 60000} training PNGs and the "
             f"10,000 test PNGs; the folder path chose small-image augmentation, one channel and estimated "
             f"statistics by itself); {args.threads} thread(s) each, {args.jobs} at a time. Seeds: "
             f"{', '.join(map(str, seeds))}.", "",
             "| resolution | in memory (mean) | image folder (mean) | folder - memory, per seed | mean |",
             "|---:|---:|---:|---:|---:|"]
    worst = 0.0
    for r in RESOLUTIONS:
        m = [top1(results[f"in_memory_s{s}"], r) for s in seeds]
        f = [top1(results[f"image_folder_s{s}"], r) for s in seeds]
        gaps = [b - a for a, b in zip(m, f)]
        worst = min(worst, sum(gaps) / len(gaps))
        lines.append(f"| {r} | {sum(m) / len(m):.2f} | {sum(f) / len(f):.2f} | "
                     f"{', '.join(f'{g:+.2f}' for g in gaps)} | {sum(gaps) / len(gaps):+.2f} |")
    times = {side: sum(results[f"{side}_s{s}"]["train_time_s"] for s in seeds) / len(seeds)
             for side in ("in_memory", "image_folder")}
    lines += ["", f"- Training time, mean over seeds: in memory {times['in_memory']:.0f} s, image folder "
              f"{times['image_folder']:.0f} s.",
              f"- Largest mean shortfall of the folder path: {worst:+.2f} points (goal: within 1)."]
    write_outputs(args.out, lines, {"settings": vars(args), "cpu": cpu_name(),
                                    "results": {k: v["rows"] for k, v in results.items()}})


if __name__ == "__main__":
    main()
