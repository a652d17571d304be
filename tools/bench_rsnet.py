"""The RS-Net against the same network trained separately at each resolution, over seeds.

The RS-Nets paper's claim: one RS-Net (shared weights, private BNs, MRED) matches or beats
separately trained models at every resolution. For each number of epochs and each seed this
trains, each as one `rsq train` process on Fashion-MNIST:
- ``rsnet``: the shipped recipe (``--recipe``, default ``fashion_mnist``) as it stands;
- ``separate_R`` for every resolution R: the same recipe at R alone, without distillation
  (a single model's loss is its cross-entropy; every other setting is the recipe's);
- ``paper`` (with ``--paper``): the RS-Net trained as the paper does (recipe
  ``fashion_mnist_paper``: MRED at full weight from the first step, the summed gradient);
- any ``--extra NAME=RECIPE FLAGS``: another RS-Net variant (a recipe setting under test).
The tables give each side's mean over seeds with its range, the RS-Net's gap per seed, and the
training time of each side (the RS-Net's one run against the sum of the five separate runs).

    python tools/bench_rsnet.py --epochs 2 --seeds 0,1,2,3 --extra 'head_sum=fashion_mnist --head-grad sum'
    python tools/bench_rsnet.py --epochs 2 --seeds 0,1 --paper --extra 'head_sum=fashion_mnist --head-grad sum' \
        --out tools/results/bench_rsnet_paper
    python tools/bench_rsnet.py --epochs 4 --seeds 0,1 --out tools/results/bench_rsnet_4ep
    python tools/bench_rsnet.py --epochs 2 --seeds 0,1 --extra 'kd2=fashion_mnist --distill-weight 2' \
        --baseline tools/results/bench_rsnet_6seeds.json    # only kd2 trained; the rest read from that file
    python tools/bench_rsnet.py --epochs 2 --seeds 0,1,2,3,4,5 --baseline tools/results/bench_rsnet_6seeds.json \
        --retrain rsnet --extra 'bn_lr1=fashion_mnist --norm-lr-factor 1' --baseline-side bn_lr1=rsnet
        # the recipe changed: train today's rsnet; the file's rsnet runs stand in as the side bn_lr1
    python tools/bench_rsnet.py --quick                      # a smoke run
"""
from __future__ import annotations

import argparse
import json
import shlex
import statistics
import sys
from pathlib import Path

from benchlib import cpu_name, finished_run, run_configs, top1, write_outputs

RESOLUTIONS = [28, 24, 20, 16, 12]
LABELS = {"rsnet": "RS-Net (recipe)", "paper": "RS-Net, paper's MRED", "ramp_all": "RS-Net, ramp over all steps",
          "paper_lr005": "RS-Net, paper's MRED, lr 0.05", "head_sum": "RS-Net, summed classifier gradient",
          "kd2": "RS-Net, MRED weight 2", "conv_sum": "RS-Net, conv decay x n modes",
          "conv_single": "RS-Net, conv decay single (the recipe before conv_decay)",
          "nokd": "RS-Net without MRED (distill none)", "decay2n": "RS-Net, conv decay x 2n (conv_decay_factor 2)",
          "bnlr5": "RS-Net, BNs at 5x lr (norm_lr_factor 5)",
          "bn_lr1": "RS-Net, BNs at 1x lr (recipe before)",
          "rsnet_unfused": "RS-Net without the fused BN kernel (--no-fused-bn)",
          "rsnet_bf16": "RS-Net in bf16 autocast (--amp bf16)"}


def configs_for(args) -> dict[str, list[str]]:
    runs = {"rsnet": [args.recipe]}
    runs.update({f"separate_{r}": [args.recipe, "--resolutions", str(r), "--distill", "none"] for r in RESOLUTIONS})
    if args.paper:
        runs["paper"] = ["fashion_mnist_paper"]
    for spec in args.extra:
        name, _, argv = spec.partition("=")
        runs[name] = shlex.split(argv)
    return runs


def name_pair(spec: str) -> tuple[str, str]:
    """``NAME=SAVED`` as a pair; argparse turns the error into one line and exit code 2."""
    name, eq, saved = spec.partition("=")
    if not (eq and name and saved):
        raise argparse.ArgumentTypeError(f"expected NAME=SAVED, got {spec!r}")
    return name, saved


def run_key(epochs: int, seed: int, name: str) -> str:
    """The run's folder under --work."""
    return f"e{epochs}_s{seed}/{name}"


# Student's t, two-sided 95 %, by degrees of freedom (seeds - 1): the paired gap's confidence interval.
T95 = {1: 12.706, 2: 4.303, 3: 3.182, 4: 2.776, 5: 2.571, 6: 2.447, 7: 2.365, 8: 2.306, 9: 2.262, 10: 2.228}


def ci95(values: list[float]) -> float | None:
    """Half-width of the 95 % confidence interval of the mean (None for one value)."""
    if len(values) < 2:
        return None
    t = T95.get(len(values) - 1, 1.96 + 2.4 / (len(values) - 1))  # the normal limit beyond the table
    return t * statistics.stdev(values) / len(values) ** 0.5


def mean_range(values: list[float], fmt: str = "{:.2f}") -> str:
    if len(values) == 1:
        return fmt.format(values[0])
    return f"{fmt.format(statistics.mean(values))} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def table(epochs: int, results: dict, seeds: list[int], sides: list[str]) -> list[str]:
    """Per resolution: separate and each RS-Net side, mean (range) over seeds, and the gaps."""
    def acc(name, seed, r):
        return top1(results[(epochs, seed, name)], r)

    header = "| resolution | separate models |" + "".join(f" {LABELS.get(s, s)} | - separate: mean ± 95% CI (per seed) |"
                                                        for s in sides)
    lines = [header, "|---:|---:|" + "---:|---:|" * len(sides)]
    wins = {s: 0 for s in sides}
    behind = {s: 0 for s in sides}  # the whole interval below zero: behind beyond the seeds' noise
    ahead = {s: 0 for s in sides}  # the whole interval above zero
    for r in RESOLUTIONS:
        sep = [acc(f"separate_{r}", s, r) for s in seeds]
        row = f"| {r} | {mean_range(sep)} |"
        for side in sides:
            mine = [acc(side, s, r) for s in seeds]
            gaps = [m - p for m, p in zip(mine, sep)]
            mean, half = statistics.mean(gaps), ci95(gaps)
            wins[side] += mean >= 0
            behind[side] += half is not None and mean + half < 0
            ahead[side] += half is not None and mean - half > 0
            spread = f" ± {half:.2f}" if half is not None else ""
            row += f" {mean_range(mine)} | {mean:+.2f}{spread} ({', '.join(f'{g:+.2f}' for g in gaps)}) |"
        lines.append(row)
    lines.append("")
    sep_time = [sum(results[(epochs, s, f"separate_{r}")]["train_time_s"] for r in RESOLUTIONS) for s in seeds]
    lines.append(f"- Training time, mean over seeds: five separate models {statistics.mean(sep_time):.0f} s in all.")
    for side in sides:
        t = [results[(epochs, s, side)]["train_time_s"] for s in seeds]
        ens = [results[(epochs, s, side)]["ensemble"]["top1"] for s in seeds]
        lines.append(f"- {LABELS.get(side, side)}: {statistics.mean(t):.0f} s ({statistics.mean(t) / statistics.mean(sep_time):.2f}x); "
                     f"ensemble top-1 {mean_range(ens)}; mean gap >= 0 at {wins[side]} of {len(RESOLUTIONS)} "
                     f"resolutions" + (f"; beyond the 95% interval ahead at {ahead[side]}, behind at {behind[side]}"
                                       if len(seeds) > 1 else "")
                     + ".")
    return lines


def plot(results: dict, epochs_list: list[int], seeds: list[int], sides: list[str], path: Path) -> None:
    from matplotlib.figure import Figure

    fig = Figure(figsize=(5 * len(epochs_list), 4), layout="constrained")
    for i, epochs in enumerate(epochs_list):
        ax = fig.add_subplot(1, len(epochs_list), i + 1)
        curves = [("separate models", lambda s, r: f"separate_{r}")] + [(LABELS.get(side, side), lambda s, r, x=side: x)
                                                                        for side in sides]
        for label, name in curves:
            per_seed = [[top1(results[(epochs, s, name(s, r))], r) for s in seeds] for r in RESOLUTIONS]
            means = [statistics.mean(v) for v in per_seed]
            low = [m - min(v) for m, v in zip(means, per_seed)]
            high = [max(v) - m for m, v in zip(means, per_seed)]
            ax.errorbar(RESOLUTIONS, means, yerr=[low, high], marker="o", capsize=3, label=label)
        ax.set_title(f"{epochs} epochs, {len(seeds)} seed(s) (mean, range)")
        ax.set_xlabel("resolution (px)")
        ax.set_ylabel("top-1 (%)")
        ax.grid(alpha=0.3)
        ax.legend(fontsize="small", loc="lower right")  # the curves rise to the right: that corner is free
    fig.savefig(path, dpi=110)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--epochs", default="2,4", help="comma-separated epoch counts")
    parser.add_argument("--seeds", default="0,1", help="comma-separated seeds")
    parser.add_argument("--recipe", default="fashion_mnist")
    parser.add_argument("--subset", type=int, default=0, help="training images (0 = all 60000)")
    parser.add_argument("--paper", action="store_true", help="also the paper's MRED (recipe fashion_mnist_paper)")
    parser.add_argument("--extra", action="append", default=[], metavar="NAME=RECIPE [FLAGS]",
                        help="another RS-Net side, e.g. 'ramp_all=fashion_mnist --distill-ramp 1' (repeatable)")
    parser.add_argument("--jobs", type=int, default=2)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--work", default="runs/bench_rsnet")
    parser.add_argument("--out", default="tools/results/bench_rsnet")
    parser.add_argument("--reuse", action="store_true",
                        help="keep finished runs in --work (same settings) and train only the missing ones")
    parser.add_argument("--baseline", metavar="JSON",
                        help="a committed output of this script: runs missing from --work are read from it instead of "
                             "trained (the table says which, and on which CPU they ran)")
    parser.add_argument("--retrain", action="append", default=[], metavar="SIDE",
                        help="never read SIDE from --baseline (its recipe changed since that file): train it")
    parser.add_argument("--baseline-side", action="append", default=[], metavar="NAME=SAVED", type=name_pair,
                        help="read this run's side NAME from the --baseline file's side SAVED (e.g. the file's "
                             "'rsnet' as 'bn_lr1' when the recipe has changed since)")
    parser.add_argument("--quick", action="store_true", help="tiny setting, to check the script runs")
    args = parser.parse_args()
    epochs_list = [int(e) for e in args.epochs.split(",")]
    seeds = [int(s) for s in args.seeds.split(",")]
    if args.quick:
        epochs_list, seeds, args.subset = [1], [0], 1024
        args.out, args.work = args.out + "_quick", args.work + "_quick"
    runs = configs_for(args)
    sides = ["rsnet"] + (["paper"] if args.paper else []) + [spec.partition("=")[0] for spec in args.extra]
    extra = ["--subset", str(args.subset)] + (["--test-subset", "1000"] if args.quick else [])
    # Each run in WORK/e{epochs}_s{seed}/NAME; the longest first, so the pool's last minutes are not
    # one long run alone.
    todo = sorted(((e, s, name) for e in epochs_list for s in seeds for name in runs),
                  key=lambda k: (-k[0], k[2] not in sides, k[1]))
    configs = {run_key(*key): runs[key[2]] + ["--epochs", str(key[0]), "--seed", str(key[1]), *extra] for key in todo}
    borrowed, baseline_cpu = {}, None
    if args.baseline:
        saved = json.loads(Path(args.baseline).read_text())
        baseline_cpu = saved["cpu"]
        renamed = dict(args.baseline_side)

        def saved_name(name: str) -> str:  # e2_s0/bn_lr1 -> e2_s0/rsnet
            run, side = name.split("/", 1)
            return f"{run}/{renamed.get(side, side)}"

        borrowed = {name: saved["results"][saved_name(name)] for name in configs
                    if name.split("/", 1)[1] not in args.retrain and saved_name(name) in saved["results"]
                    and finished_run(args.work, name) is None}
    # Borrowed runs stand in for runs of this machine only if training repeats bit for bit here: the
    # cheapest of them (a separate model at the smallest resolution) is retrained and compared.
    check = min(borrowed, key=lambda name: borrowed[name]["train_time_s"]) if borrowed else None
    todo_now = {k: v for k, v in configs.items() if k not in borrowed}
    if check:
        todo_now[check + "_recheck"] = configs[check]
    trained = run_configs(todo_now, [], args.work, args.threads, args.jobs, args.reuse)
    finished = {**borrowed, **trained}
    results = {key: finished[run_key(*key)] for key in todo}

    lines = ["# RS-Net vs separately trained models (Fashion-MNIST, ResNet-20)", "",
             f"CPU: {cpu_name()}. Recipe `{args.recipe}` ({args.subset or 'all 60000'} training images, full 10k "
             f"test set); separate models: the same recipe at one resolution with `--distill none`. Seeds "
             f"{', '.join(map(str, seeds))}; each run one process, {args.threads} thread(s), {args.jobs} at a time "
             f"(times are comparable within this table only).",
             "Command: `" + "python tools/bench_rsnet.py " + shlex.join(sys.argv[1:]) + "`", ""]
    if borrowed:
        sides_borrowed = sorted({name.split("/", 1)[1] for name in borrowed})
        again = [row["top1"] for row in trained[check + "_recheck"]["rows"]]
        saved_top1 = [row["top1"] for row in borrowed[check]["rows"]]
        verdict = ("the same top-1, so these runs repeat here" if again == saved_top1 else
                   "a DIFFERENT top-1: the borrowed runs do not repeat on this machine, compare with care")
        as_named = "".join(f" (its side `{renamed[side]}` read as `{side}`)" for side in sides_borrowed if side in renamed)
        lines += [f"Read from `{args.baseline}`, not trained in this run ({len(borrowed)} runs: "
                  f"{', '.join(sides_borrowed)}){as_named}, trained on: {baseline_cpu}. Spot check: `{check}` retrained here "
                  f"gave {again} against the file's {saved_top1}: {verdict}.", ""]
    for epochs in epochs_list:
        lines += [f"## {epochs} epochs", ""] + table(epochs, results, seeds, sides) + [""]
    plot(results, epochs_list, seeds, sides, Path(args.out + ".png"))
    lines.append(f"Plot: `{Path(args.out).name}.png`.")
    payload = {"settings": vars(args), "cpu": cpu_name(), "results": {run_key(*key): v for key, v in results.items()}}
    if borrowed:
        payload["borrowed"] = {"from": args.baseline, "cpu": baseline_cpu, "runs": sorted(borrowed),
                               "spot_check": {"run": check, "here": trained[check + "_recheck"]}}
    write_outputs(args.out, lines, payload)


if __name__ == "__main__":
    main()
