"""Pool the RS-Net's per-seed gaps to separate models from several `bench_rsnet.py` outputs.

Each output pairs an RS-Net run with the separate models of the same seed, trained on one machine.
Runs repeat bit for bit only on one kind of CPU, so the same seed on another CPU is another sample:
the paired gaps of all files are pooled into one mean and Student-t 95 % interval per resolution.

    python tools/pool_rsnet.py tools/results/bench_rsnet_6seeds.json tools/results/bench_rsnet_6seeds_amd.json \
        --epochs 2 --out tools/results/bench_rsnet_pooled_2ep
    python tools/pool_rsnet.py tools/results/bench_rsnet_bnlr5_xeon.json tools/results/bench_rsnet_bnlr5_amd.json:bnlr5 \
        --epochs 2 --out tools/results/bench_rsnet_bnlr5_pooled_2ep   # FILE:SIDE when a file names the side otherwise
"""
from __future__ import annotations

import argparse
import json
import statistics
from pathlib import Path

from bench_rsnet import RESOLUTIONS, ci95, run_key
from benchlib import top1, write_outputs


def paired_gaps(results: dict, epochs: int, side: str, seen: set) -> dict[int, list[float]]:
    """Per resolution, the side's top-1 minus the separate model's, for every seed the file has both.

    A pair already in ``seen`` (the same runs copied into two outputs) is counted once.
    """
    seeds = sorted({int(key.split("/")[0].split("_s")[1]) for key in results if key.startswith(f"e{epochs}_")})
    gaps = {r: [] for r in RESOLUTIONS}
    for seed in seeds:
        mine = results.get(run_key(epochs, seed, side))
        if mine is None:
            continue
        separate = {r: results[run_key(epochs, seed, f"separate_{r}")] for r in RESOLUTIONS}
        fingerprint = json.dumps([mine["rows"]] + [separate[r]["rows"] for r in RESOLUTIONS], sort_keys=True)
        if fingerprint in seen:
            continue
        seen.add(fingerprint)
        for r in RESOLUTIONS:
            gaps[r].append(top1(mine, r) - top1(separate[r], r))
    return gaps


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("files", nargs="+", help="bench_rsnet.py outputs (.json), each optionally FILE:SIDE to compare "
                                                 "that file's side SIDE instead of --side")
    parser.add_argument("--epochs", type=int, default=2)
    parser.add_argument("--side", default="rsnet", help="the RS-Net side to compare (default: the recipe)")
    parser.add_argument("--out", required=True)
    args = parser.parse_args()

    per_file, seen, sides = [], set(), set()
    for spec in args.files:
        path, _, side = spec.partition(".json:")
        side = side or args.side
        sides.add(side)
        saved = json.loads(Path(path if path.endswith(".json") else path + ".json").read_text())
        per_file.append((spec, saved["cpu"], paired_gaps(saved["results"], args.epochs, side, seen)))
    sides = sorted(sides)
    lines = [f"# RS-Net ({', '.join(f'`{s}`' for s in sides)}) minus separate models, {args.epochs} epochs, pooled over files", "",
             "Each file's gaps are paired by seed within that file (one machine); the pooled column puts all "
             "pairs together. Command: `python tools/pool_rsnet.py " + " ".join(args.files)
             + f" --epochs {args.epochs} --side {args.side} --out {args.out}`", ""]
    for name, cpu, gaps in per_file:
        lines.append(f"- `{name}`: {len(gaps[RESOLUTIONS[0]])} seeds not in an earlier file, CPU: {cpu}")
    lines += ["", "| resolution | " + " | ".join(f"`{Path(n).name.replace('.json', '')}`" for n, _, _ in per_file) + " | pooled |",
              "|---:|" + "---:|" * (len(per_file) + 1)]

    def cell(values: list[float]) -> str:
        if not values:
            return "-"
        half = ci95(values)
        return f"{statistics.mean(values):+.2f}" + (f" ± {half:.2f}" if half is not None else "") + f" (n={len(values)})"

    pooled = {}
    for r in RESOLUTIONS:
        pooled[r] = [g for _, _, gaps in per_file for g in gaps[r]]
        lines.append(f"| {r} | " + " | ".join(cell(gaps[r]) for _, _, gaps in per_file) + f" | {cell(pooled[r])} |")
    lines += ["", "Mean ± half-width of the Student-t 95 % interval of the mean gap (top-1 points)."]
    write_outputs(args.out, lines, {"settings": vars(args), "per_file": [{"file": n, "cpu": c, "gaps": g}
                                                                          for n, c, g in per_file],
                                    "pooled": pooled})


if __name__ == "__main__":
    main()
