"""Data the user brings: Fashion-MNIST written out as PNG folders against rsq's in-memory path.

Writes the Fashion-MNIST training and test images as ``ROOT/train/CLASS/*.png`` and
``ROOT/val/CLASS/*.png`` (grayscale, 28x28), then trains the same recipe twice: once on the
embedded in-memory data set, once through the image-folder path with its automatic choices
(small-image augmentation, one channel, statistics estimated from the training images). The
goal: the folder path within 1 point of the in-memory path at every resolution.

    python tools/bench_folder.py                # the committed setting
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
    parser.add_argument("--train-images", type=int, default=20000, help="training images for both paths")
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--work", default="runs/bench_folder")
    parser.add_argument("--out", default="tools/results/bench_folder")
    parser.add_argument("--reuse", action="store_true")
    parser.add_argument("--quick", action="store_true")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.train_images, args.out, args.work = 1, 512, args.out + "_quick", args.work + "_quick"
    root = Path(args.work) / "fashion_mnist_png"
    write_png_folders(root, args.train_images)
    common = ["fashion_mnist", "--epochs", str(args.epochs), "--seed", str(args.seed), "--workers", "0"]
    # Both see N training images: the folder the first N in file order, the in-memory run N of a fixed
    # shuffle. Fashion-MNIST's file order is itself shuffled, so both are random samples of that size.
    configs = {"in_memory": ["--subset", str(args.train_images)],
               "image_folder": ["--data", "imagefolder", "--data-dir", str(root)]}
    if args.quick:
        for flags in configs.values():
            flags += ["--test-subset", "512"]

    results = run_configs(configs, common, args.work, args.threads, args.jobs, args.reuse)
    memory, folder = results["in_memory"], results["image_folder"]
    lines = ["# Fashion-MNIST as PNG folders vs the in-memory path (same recipe)", "",
             f"CPU: {cpu_name()}. `rsq train {' '.join(common)}` with `--subset {args.train_images}` (in memory) or "
             f"`--data imagefolder --data-dir ROOT` (ROOT holds {args.train_images or 60000} training PNGs and the "
             f"10,000 test PNGs); {args.threads} thread(s) each.", "",
             "| resolution | in memory | image folder | folder - memory |", "|---:|---:|---:|---:|"]
    worst = 0.0
    for r in RESOLUTIONS:
        m, f = top1(memory, r), top1(folder, r)
        worst = min(worst, f - m)
        lines.append(f"| {r} | {m:.2f} | {f:.2f} | {f - m:+.2f} |")
    lines += ["", f"- Training time: in memory {memory['train_time_s']:.0f} s, image folder "
              f"{folder['train_time_s']:.0f} s.",
              f"- Largest shortfall of the folder path: {worst:+.2f} points (goal: within 1)."]
    write_outputs(args.out, lines, {"settings": vars(args), "cpu": cpu_name(),
                                    "results": {k: v["rows"] for k, v in results.items()}})


if __name__ == "__main__":
    main()
