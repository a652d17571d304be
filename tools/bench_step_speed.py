"""Cost of one 5-resolution RS-Net training step on the CPU, side by side in one run.

Compares, for the same model (ResNet-20 RS-Net, 1 channel) and the same batch:
- the five single-resolution steps, timed one by one (their sum is the reference);
- a plain eager PyTorch loop over the resolutions (NCHW, no compile): the baseline;
- rsq's step as `rsq train` runs it: eager NCHW, channels_last, and torch.compile with one static
  graph per resolution (+ channels_last).
Every variant runs in its own process (peak memory = that process's max RSS), with the same
threads; the loss is CE + full MRED in all of them.

    python tools/bench_step_speed.py [--quick]
"""
from __future__ import annotations

import argparse
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

RESOLUTIONS = [28, 24, 20, 16, 12]


def measure(variant: str, batch: int, steps: int, warmup: int, threads: int) -> dict:
    import torch
    import torch.nn.functional as F

    import rsq
    from rsq.distill import EnsembleWeights, mred_loss
    from rsq.train import AllResolutions

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    resolutions = RESOLUTIONS
    if variant.startswith("single_"):
        resolutions = [int(variant.split("_")[1])]
    model = rsq.create_model("resnet20", 10, 1, resolutions=RESOLUTIONS)
    ensemble = EnsembleWeights(len(resolutions))
    opt = torch.optim.SGD(list(model.parameters()) + list(ensemble.parameters()), lr=0.01, momentum=0.9)
    x = torch.randn(batch, 1, 28, 28)
    y = torch.randint(0, 10, (batch,))
    compile_s = 0.0

    if variant == "plain_eager":
        def forward():
            logits = []
            for r in resolutions:
                xr = x if r == 28 else F.interpolate(x, size=(r, r), mode="bilinear", antialias=True)
                rsq.set_mode(model, r)
                logits.append(model(xr))
            return logits
    else:
        channels_last = variant in ("rsq_channels_last", "rsq_compile")
        if channels_last:
            model.to(memory_format=torch.channels_last)
        runner = AllResolutions(model, resolutions, channels_last)
        if variant == "rsq_compile":
            import torch._dynamo as dynamo

            dynamo.config.cache_size_limit = 64
            runner.compiled = torch.compile(model, dynamic=False)
        forward = lambda: runner(x)  # noqa: E731

    def step():
        parts = mred_loss(forward(), y, ensemble, "full" if len(resolutions) > 1 else "none")
        opt.zero_grad(set_to_none=True)
        parts.total.backward()
        opt.step()

    began = time.perf_counter()
    step()
    if variant == "rsq_compile":
        compile_s = time.perf_counter() - began
    for _ in range(warmup):
        step()
    times = []
    for _ in range(steps):
        t = time.perf_counter()
        step()
        times.append(time.perf_counter() - t)
    ms = statistics.median(times) * 1000
    return {"variant": variant, "ms_per_step": round(ms, 2), "images_per_s": round(batch / ms * 1000, 1),
            "peak_rss_mib": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024, 1),
            "compile_s": round(compile_s, 1)}


def run_variant(variant: str, args: argparse.Namespace) -> dict:
    cmd = [sys.executable, __file__, "--variant", variant, "--batch", str(args.batch), "--steps", str(args.steps),
           "--warmup", str(args.warmup), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if done.returncode != 0:
        return {"variant": variant, "error": (done.stderr.strip().splitlines() or ["no output"])[-1]}
    return json.loads(done.stdout.strip().splitlines()[-1])


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """The median and, over several rounds, the range: `0.79 (0.77-0.81)`."""
    text = fmt.format(statistics.median(values))
    return text if len(values) == 1 else f"{text} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--rounds", type=int, default=3,
                        help="every round runs every variant once; ratios are taken within a round")
    parser.add_argument("--out", default="tools/results/bench_step_speed")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant here
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.rounds, args.out = 3, 1, 1, args.out + "_quick"
    if args.variant:
        print(json.dumps(measure(args.variant, args.batch, args.steps, args.warmup, args.threads)))
        return
    # One Inductor cache for the whole run, empty at the start: round 1 compiles cold, later rounds warm.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="rsq_bench_inductor_")
    variants = [f"single_{r}" for r in RESOLUTIONS] + ["plain_eager", "rsq_eager", "rsq_channels_last",
                                                       "rsq_compile"]
    rounds = []
    for i in range(args.rounds):
        rows = {}
        for variant in variants:
            rows[variant] = run_variant(variant, args)
            print(f"round {i + 1}/{args.rounds}", rows[variant], flush=True)
        rounds.append(rows)

    def ms(rows: dict, variant: str) -> float | None:
        return rows[variant].get("ms_per_step")

    ok = lambda v: all(ms(rows, v) is not None for rows in rounds)  # noqa: E731
    lines = [
        "# 5-resolution training step cost (CPU)",
        "",
        f"ResNet-20 RS-Net, 1x28x28 input, resolutions {RESOLUTIONS}, batch {args.batch}, loss CE + full MRED, "
        f"SGD; per variant the median of {args.steps} steps after {args.warmup} warm-up steps, each variant in its "
        f"own process with {args.threads} threads; {args.rounds} rounds, every round runs every variant once "
        f"(the machine's speed drifts by up to 20% over minutes, so ratios are taken within a round: median "
        f"(range) over rounds). Command: `python tools/bench_step_speed.py --rounds {args.rounds}`",
        "",
        "| variant | ms / step | images / s | vs plain eager | peak RSS (MiB) | compile, cold (s) |",
        "|:---|---:|---:|---:|---:|---:|",
    ]
    for variant in variants:
        if not ok(variant):
            error = next(rows[variant]["error"] for rows in rounds if "error" in rows[variant])
            lines.append(f"| {variant} | failed: {error} | | | | |")
            continue
        steps = [ms(rows, variant) for rows in rounds]
        ips = [args.batch / t * 1000 for t in steps]
        ratio = [ms(rows, variant) / ms(rows, "plain_eager") for rows in rounds] if ok("plain_eager") else [0.0]
        rss = max(rows[variant]["peak_rss_mib"] for rows in rounds)
        compile_s = rounds[0][variant]["compile_s"]
        lines.append(f"| {variant} | {spread(steps, '{:.1f}')} | {spread(ips, '{:.0f}')} | {spread(ratio)}x | "
                     f"{rss:.0f} | {compile_s or ''} |")
    singles_ok = all(ok(f"single_{r}") for r in RESOLUTIONS)
    if singles_ok and ok("rsq_eager"):
        sums = [sum(ms(rows, f"single_{r}") for r in RESOLUTIONS) for rows in rounds]
        vs_sum = [ms(rows, "rsq_eager") / total for rows, total in zip(rounds, sums)]
        lines += ["", f"Sum of the five single-resolution steps: {spread(sums, '{:.1f}')} ms.",
                  f"rsq 5-resolution eager step / sum of the singles (both NCHW): {spread(vs_sum, '{:.3f}')} "
                  f"(goal <= 1.05)."]
    for variant in ("rsq_channels_last", "rsq_compile"):
        if ok(variant) and ok("plain_eager"):
            ratio = [ms(rows, variant) / ms(rows, "plain_eager") for rows in rounds]
            lines.append(f"{variant} / plain eager loop: {spread(ratio)}x (goal <= 0.8).")
    write = {"settings": vars(args), "rounds": rounds}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps(write, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
