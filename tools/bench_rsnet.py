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

from benchlib import run_train, top1, write_outputs

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
    parser.add_argument("--quick", action="store_true", help="tiny setting, to check the script runs")
    args = parser.parse_args()
    if args.quick:
        args.epochs, args.subset, args.out = 1, 1024, args.out + "_quick"
    res_flag = ",".join(map(str, RESOLUTIONS))
    configs = {"rsnet_full": ["--resolutions", res_flag, "--distill", "full"],
               "rsnet_none": ["--resolutions", res_flag, "--distill", "none"]}
    configs.update({f"separate_{r}": ["--resolutions", str(r), "--distill", "none"] for r in RESOLUTIONS})
    common = ["fashion_mnist", "--epochs", str(args.epochs), "--subset", str(args.subset), "--seed", str(args.seed)]
    with ThreadPoolExecutor(args.jobs) as pool:
        runs = pool.map(lambda kv: run_train(kv[0], common + kv[1], args.work, args.threads), configs.items())
        results = dict(zip(configs, runs))

    lines = [
        "# RS-Net vs separately trained models (Fashion-MNIST, ResNet-20)",
        "",
        f"Setting: {args.subset} training images, {args.epochs} epochs, batch 128, lr 0.1 cosine, SGD, "
        f"seed {args.seed}, full 10k test set; each run one process with {args.threads} thread(s), {args.jobs} at a time.",
        "Command: `python tools/bench_rsnet.py" + (" --quick" if args.quick else "") + "`",
        "",
        "| resolution | separate models | RS-Net, no distillation | RS-Net, full MRED | MRED - separate |",
        "|---:|---:|---:|---:|---:|",
    ]
    wins = 0
    for r in RESOLUTIONS:
        sep, none, full = (top1(results[name], r) for name in (f"separate_{r}", "rsnet_none", "rsnet_full"))
        wins += full >= sep
        lines.append(f"| {r} | {sep:.2f} | {none:.2f} | {full:.2f} | {full - sep:+.2f} |")
    ens = results["rsnet_full"]["ensemble"]["top1"]
    lines += [
        "",
        f"RS-Net (full MRED) ensemble top-1: {ens:.2f}. RS-Net matches or beats the separate model at "
        f"{wins} of {len(RESOLUTIONS)} resolutions.",
        "Training cost: see bench_step_speed.md (a 5-resolution step costs about the sum of the five single steps).",
    ]
    write_outputs(args.out, lines, {"settings": vars(args), "results": results})


if __name__ == "__main__":
    main()
