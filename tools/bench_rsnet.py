"""RS-Net with MRED against the same network trained separately at each resolution.

Every configuration is one `rsq train` process on Fashion-MNIST with the same recipe and
epochs; the paper's claim is that the single RS-Net matches or beats the separate models at
every resolution. Runs go ``--jobs`` at a time, one thread each, so the figures are comparable.

    python tools/bench_rsnet.py                 # the committed setting
    python tools/bench_rsnet.py --quick         # a smoke run
"""
from __future__ import annotations

import argparse
import sys
from concurrent.futures import ThreadPoolExecutor

from benchlib import finished_run, run_train, top1, write_outputs

RESOLUTIONS = [28, 24, 20, 16, 12]


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", type=int, default=3)
    parser.add_argument("--subset", type=int, default=20000)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="runs/bench_rsnet")
    parser.add_argument("--out", default="tools/results/bench_rsnet")
    parser.add_argument("--lr", type=float, default=0.1)
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs in --work (same settings) and train only the missing ones")
    parser.add_argument("--only", help="comma-separated configs to train (default: all); the others come from "
                                       "--work if they finished there, else their cells say 'not run'")
    parser.add_argument("--quick", action="store_true", help="tiny setting, to check the script runs")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.subset, args.out = 1, 1024, args.out + "_quick"
    res_flag = ",".join(map(str, RESOLUTIONS))
    # The RS-Net's loss sums five cross-entropies (+ KD), so at the same lr its shared weights get
    # about five times the gradient of a separate model's: the last column divides lr by that.
    scaled_lr = args.lr / len(RESOLUTIONS)
    configs = {"rsnet_full": ["--resolutions", res_flag, "--distill", "full"],
               "rsnet_none": ["--resolutions", res_flag, "--distill", "none"],
               "rsnet_full_lr_scaled": ["--resolutions", res_flag, "--distill", "full", "--lr", f"{scaled_lr:g}"]}
    configs.update({f"separate_{r}": ["--resolutions", str(r), "--distill", "none"] for r in RESOLUTIONS})
    common = ["fashion_mnist", "--epochs", str(args.epochs), "--subset", str(args.subset), "--seed", str(args.seed),
              "--lr", str(args.lr)]  # a config's own --lr comes later and wins

    chosen = args.only.split(",") if args.only else list(configs)
    if set(chosen) - set(configs):
        parser.error(f"--only: unknown configs {sorted(set(chosen) - set(configs))}; choose from {', '.join(configs)}")
    reused = []

    def run(name: str) -> dict | None:
        done = finished_run(args.work, name) if args.reuse or name not in chosen else None
        if done is not None:
            reused.append(name)
            return done
        return run_train(name, common + configs[name], args.work, args.threads) if name in chosen else None

    with ThreadPoolExecutor(args.jobs) as pool:
        results = {name: done for name, done in zip(configs, pool.map(run, configs)) if done is not None}

    def cell(name: str, r: int) -> str:
        return f"{top1(results[name], r):.2f}" if name in results else "not run"

    def gap(name: str, r: int) -> str:
        both = name in results and f"separate_{r}" in results
        return f"{top1(results[name], r) - top1(results[f'separate_{r}'], r):+.2f}" if both else ""

    def wins(name: str) -> int:
        return sum(top1(results[name], r) >= top1(results[f"separate_{r}"], r)
                   for r in RESOLUTIONS if f"separate_{r}" in results)

    lines = [
        "# RS-Net vs separately trained models (Fashion-MNIST, ResNet-20)",
        "",
        f"Setting: {args.subset or 'all 60000'} training images, {args.epochs} epochs, batch 128, lr {args.lr:g} "
        f"cosine with 0.2 epochs of warm-up, SGD, weight decay 5e-4, seed {args.seed}, full 10k test set; each run one process "
        f"({args.threads} thread(s), {args.jobs} at a time; threads change speed only). Last column: the RS-Net "
        f"with lr {scaled_lr:g} = lr / {len(RESOLUTIONS)}, because its summed loss gives the shared weights about "
        f"{len(RESOLUTIONS)}x the gradient.",
        "Command: `" + " ".join(["python tools/bench_rsnet.py", *sys.argv[1:]]) + "`"
        + (f"; tabulated from finished runs already in --work: {', '.join(sorted(reused))}" if reused else ""),
        "",
        "| resolution | separate models | RS-Net, no distillation | RS-Net, full MRED | MRED - separate "
        f"| RS-Net, full MRED, lr {scaled_lr:g} | - separate |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in RESOLUTIONS:
        lines.append(f"| {r} | {cell(f'separate_{r}', r)} | {cell('rsnet_none', r)} | {cell('rsnet_full', r)} | "
                     f"{gap('rsnet_full', r)} | {cell('rsnet_full_lr_scaled', r)} | {gap('rsnet_full_lr_scaled', r)} |")
    lines.append("")
    for name, lr in (("rsnet_full", args.lr), ("rsnet_full_lr_scaled", scaled_lr)):
        if name in results:
            lines.append(f"RS-Net (full MRED, lr {lr:g}): ensemble top-1 {results[name]['ensemble']['top1']:.2f}; "
                         f"matches or beats the separate model at {wins(name)} of {len(RESOLUTIONS)} resolutions.")
    lines += [
        "Training cost: see bench_step_speed.md (a 5-resolution step costs about the sum of the five single steps).",
    ]
    write_outputs(args.out, lines, {"settings": vars(args), "results": results})


if __name__ == "__main__":
    main()
