"""One model switchable in resolution AND bit width against an RS-Net trained separately per bit width.

Every configuration is one `rsq train` process on Fashion-MNIST, all from the same full-precision
RS-Net (``--init``), with the same recipe, steps and seed, so each bit width gets exactly as many
training steps in the joint model as in its own RS-Net:

- joint:          --bits 2,4,8,32 (bit-width distillation on, the default)
- joint_no_bitkd: --bits 2,4,8,32 --no-bit-distill (the alternative the default is measured against)
- separate_bB:    --bits B, one RS-Net per bit width (B = 32: the full-precision RS-Net trained on)

The table gives top-1 in every (resolution, bits) cell, the training time of both sides, and the
stored weights: the joint checkpoint's model tensors against the four separate checkpoints'.

    python tools/bench_joint.py --init runs/fashion_mnist       # the committed setting
    python tools/bench_joint.py --init runs/fashion_mnist --quick
"""
from __future__ import annotations

import argparse
from pathlib import Path

import torch

from benchlib import cpu_name, run_configs, write_outputs

RESOLUTIONS = [28, 24, 20, 16, 12]
BITS = [32, 8, 4, 2]


def label(bits: int) -> str:
    return "FP" if bits == 32 else f"W{bits}A{bits}"


def stored_model_bytes(run_dir: Path) -> int:
    """Bytes of the model tensors a run's checkpoint stores (weights, BNs, quantizer steps)."""
    ckpt = torch.load(run_dir / "checkpoint.pt", map_location="cpu", weights_only=True)
    return sum(t.numel() * t.element_size() for t in ckpt["model"].values())


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--init", required=True, help="full-precision RS-Net at 28..12 px (the main job's run)")
    parser.add_argument("--epochs", type=int, default=1)
    parser.add_argument("--subset", type=int, default=12800)
    parser.add_argument("--lr", type=float, default=0.02)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="runs/bench_joint")
    parser.add_argument("--out", default="tools/results/bench_joint")
    parser.add_argument("--reuse", action="store_true", help="keep finished runs in --work")
    parser.add_argument("--quick", action="store_true", help="tiny setting, to check the script runs")
    args = parser.parse_args()
    if args.quick:
        args.subset, args.out, args.work = 512, args.out + "_quick", args.work + "_quick"
    bits_flag = ",".join(map(str, BITS))
    configs = {"joint": ["--bits", bits_flag], "joint_no_bitkd": ["--bits", bits_flag, "--no-bit-distill"]}
    configs.update({f"separate_b{b}": ["--bits", str(b)] for b in BITS})
    common = ["fashion_mnist", "--resolutions", ",".join(map(str, RESOLUTIONS)), "--init", args.init,
              "--epochs", str(args.epochs), "--subset", str(args.subset), "--seed", str(args.seed),
              "--lr", str(args.lr), "--weight-decay", "1e-4", "--warmup-epochs", "0"]
    if args.quick:
        common += ["--test-subset", "512"]

    # The joint runs first: they are the longest, so the separate ones fill the other slot.
    results = run_configs(configs, common, args.work, args.threads, args.jobs, args.reuse)

    def cell(result: dict, r: int, bits: int) -> float:
        return next(row["top1"] for row in result["rows"] if row["resolution"] == r and row["bits"] == label(bits))

    lines = ["# Joint resolution x bit-width model vs separate RS-Nets per bit width (Fashion-MNIST)", "",
             f"CPU: {cpu_name()}. Every run: `rsq train {' '.join(common)}` plus its own flags, "
             f"{args.threads} thread(s), {args.jobs} runs at a time; top-1 on the "
             f"{'first 512' if args.quick else 'full 10,000'} test images.", "",
             "| resolution | bits | separate | joint | joint - separate | joint, no bit-width KD |",
             "|---:|:---|---:|---:|---:|---:|"]
    misses = []
    for bits in BITS:
        separate = results[f"separate_b{bits}"]
        for r in RESOLUTIONS:
            s, j, n = cell(separate, r, bits), cell(results["joint"], r, bits), cell(results["joint_no_bitkd"], r, bits)
            lines.append(f"| {r} | {label(bits)} | {s:.2f} | {j:.2f} | {j - s:+.2f} | {n:.2f} |")
            if j - s < -0.5:
                misses.append(f"{r} px {label(bits)} ({j - s:+.2f})")
    separate_time = sum(results[f"separate_b{b}"]["train_time_s"] for b in BITS)
    joint_bytes = stored_model_bytes(Path(args.work) / "joint")
    separate_bytes = sum(stored_model_bytes(Path(args.work) / f"separate_b{b}") for b in BITS)
    lines += ["", f"- Training time (train_time_s, 1 thread each): joint {results['joint']['train_time_s']:.0f} s, "
              f"joint without bit-width KD {results['joint_no_bitkd']['train_time_s']:.0f} s, the four separate "
              f"RS-Nets together {separate_time:.0f} s.",
              f"- Stored model tensors: joint {joint_bytes / 1024:.0f} KiB, the four separate checkpoints "
              f"{separate_bytes / 1024:.0f} KiB ({joint_bytes / separate_bytes:.2f}x).",
              f"- Cells more than 0.5 points below the separate model: {', '.join(misses) if misses else 'none'}."]
    payload = {"settings": vars(args), "common_flags": common, "cpu": cpu_name(),
               "results": {name: {"rows": res["rows"], "train_time_s": res["train_time_s"]}
                           for name, res in results.items()},
               "stored_bytes": {"joint": joint_bytes, "separate": separate_bytes}}
    write_outputs(args.out, lines, payload)


if __name__ == "__main__":
    main()
