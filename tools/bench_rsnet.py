"""RS-Net with MRED against the same network trained separately at each resolution.

Every configuration is one `rsq train` process on Fashion-MNIST with the same recipe and
epochs; the paper's claim is that the single RS-Net matches or beats the separate models at
every resolution. Runs go ``--jobs`` at a time, one thread each, so the figures are comparable.

    python tools/bench_rsnet.py                 # the committed setting
    python tools/bench_rsnet.py --quick         # a smoke run
"""
from __future__ import annotations

import argparse
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

    reused = []

    def run(name: str) -> dict:
        done = finished_run(args.work, name) if args.reuse else None
        if done is not None:
            reused.append(name)
            return done
        return run_train(name, common + configs[name], args.work, args.threads)

    with ThreadPoolExecutor(args.jobs) as pool:
        results = dict(zip(configs, pool.map(run, configs)))

    lines = [
        "# RS-Net vs separately trained models (Fashion-MNIST, ResNet-20)",
        "",
        f"Setting: {args.subset} training images, {args.epochs} epochs, batch 128, lr {args.lr:g} cosine with "
        f"0.2 epochs of warm-up, SGD, weight decay 5e-4, seed {args.seed}, full 10k test set; each run one process "
        f"({args.threads} thread(s), {args.jobs} at a time; threads change speed only). Last column: the RS-Net "
        f"with lr {scaled_lr:g} = lr / {len(RESOLUTIONS)}, because its summed loss gives the shared weights about "
        f"{len(RESOLUTIONS)}x the gradient.",
        "Command: `python tools/bench_rsnet.py" + (" --quick" if args.quick else "") + "`"
        + (f"; kept from an earlier invocation with the same settings (`--reuse`): {', '.join(sorted(reused))}"
           if reused else ""),
        "",
        "| resolution | separate models | RS-Net, no distillation | RS-Net, full MRED | MRED - separate "
        f"| RS-Net, full MRED, lr {scaled_lr:g} | - separate |",
        "|---:|---:|---:|---:|---:|---:|---:|",
    ]
    wins, wins_scaled = 0, 0
    for r in RESOLUTIONS:
        sep, none, full, scaled = (top1(results[name], r) for name in (f"separate_{r}", "rsnet_none", "rsnet_full",
                                                                       "rsnet_full_lr_scaled"))
        wins += full >= sep
        wins_scaled += scaled >= sep
        lines.append(f"| {r} | {sep:.2f} | {none:.2f} | {full:.2f} | {full - sep:+.2f} | {scaled:.2f} | "
                     f"{scaled - sep:+.2f} |")
    ens, ens_scaled = (results[name]["ensemble"]["top1"] for name in ("rsnet_full", "rsnet_full_lr_scaled"))
    lines += [
        "",
        f"RS-Net (full MRED) ensemble top-1: {ens:.2f} (lr {args.lr:g}), {ens_scaled:.2f} (lr {scaled_lr:g}). "
        f"The RS-Net matches or beats the separate model at {wins} of {len(RESOLUTIONS)} resolutions at the same lr, "
        f"at {wins_scaled} of {len(RESOLUTIONS)} with lr / {len(RESOLUTIONS)}.",
        "Training cost: see bench_step_speed.md (a 5-resolution step costs about the sum of the five single steps).",
    ]
    write_outputs(args.out, lines, {"settings": vars(args), "results": results})


if __name__ == "__main__":
    main()
