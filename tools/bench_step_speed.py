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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=15)
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="tools/results/bench_step_speed")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variant", help=argparse.SUPPRESS)  # internal: run one variant here
    args = parser.parse_args()
    if args.quick:
        args.steps, args.warmup, args.out = 3, 1, args.out + "_quick"
    if args.variant:
        print(json.dumps(measure(args.variant, args.batch, args.steps, args.warmup, args.threads)))
        return
    variants = [f"single_{r}" for r in RESOLUTIONS] + ["plain_eager", "rsq_eager", "rsq_channels_last",
                                                       "rsq_compile"]
    rows = {}
    for variant in variants:
        cmd = [sys.executable, __file__, "--variant", variant, "--batch", str(args.batch), "--steps",
               str(args.steps), "--warmup", str(args.warmup), "--threads", str(args.threads)]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ})
        if done.returncode != 0:
            rows[variant] = {"variant": variant, "error": done.stderr.strip().splitlines()[-1]}
        else:
            rows[variant] = json.loads(done.stdout.strip().splitlines()[-1])
        print(rows[variant], flush=True)

    singles = sum(rows[f"single_{r}"]["ms_per_step"] for r in RESOLUTIONS)
    base = rows["plain_eager"]["ms_per_step"]
    lines = [
        "# 5-resolution training step cost (CPU)",
        "",
        f"ResNet-20 RS-Net, 1x28x28 input, resolutions {RESOLUTIONS}, batch {args.batch}, loss CE + full MRED, "
        f"SGD; median of {args.steps} steps after {args.warmup} warm-up steps; {args.threads} threads; "
        f"each variant in its own process. Command: `python tools/bench_step_speed.py`",
        "",
        "| variant | ms / step | images / s | vs plain eager | peak RSS (MiB) | compile (s) |",
        "|:---|---:|---:|---:|---:|---:|",
    ]
    for variant in variants:
        row = rows[variant]
        if "error" in row:
            lines.append(f"| {variant} | failed: {row['error']} | | | | |")
            continue
        ratio = row["ms_per_step"] / base
        lines.append(f"| {variant} | {row['ms_per_step']:.1f} | {row['images_per_s']:.0f} | "
                     f"{ratio:.2f}x | {row['peak_rss_mib']:.0f} | {row['compile_s'] or ''} |")
    eager = rows["rsq_eager"].get("ms_per_step")
    lines += ["", f"Sum of the five single-resolution steps: {singles:.1f} ms.",
              f"rsq 5-resolution eager step / sum of singles: {eager / singles:.3f} (goal <= 1.05)." if eager else ""]
    best = min((rows[v] for v in ("rsq_channels_last", "rsq_compile") if "error" not in rows[v]),
               key=lambda r: r["ms_per_step"], default=None)
    if best:
        lines.append(f"Fastest rsq step ({best['variant']}) / plain eager loop: {best['ms_per_step'] / base:.2f}x "
                     f"(goal <= 0.8).")
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    Path(args.out + ".md").write_text("\n".join(lines) + "\n")
    Path(args.out + ".json").write_text(json.dumps({"settings": vars(args), "rows": rows}, indent=1))
    print("\n".join(lines))


if __name__ == "__main__":
    main()
