"""Cost of one 5-resolution RS-Net training step on the CPU, side by side in one run.

Compares, for the same model (ResNet-20 RS-Net, 1 channel) and the same batch:
- the five single-resolution steps (their sum is the reference for the 5-resolution step);
- a plain eager PyTorch loop over the resolutions (NCHW, no compile): the baseline;
- rsq's step as `rsq train` runs it (`rsq.train.train_step` on a `TrainJob`, the single-resolution
  ones too): eager NCHW and channels_last with every mode on all threads, the default (channels_last,
  the modes side by side on two threads: rsq/mode_threads.py, each BatchNorm fused with its ReLU:
  rsq/nn/fused_bn.py), the default without that fusion (`--no-fused-bn`), torch.compile with one
  static graph per resolution (+ channels_last, as `rsq train --compile`), and bf16 autocast
  (`--amp bf16`: a different arithmetic, for CPUs with AMX or AVX-512 BF16) side by side and in turn;
  the default's step quantized at W4A4 (LSQ, first/last 8 bits), in fp32 and in bf16;
- the default's arithmetic on ONE thread (`rsq_one_thread`: channels_last, fused, no second thread):
  half its time is what a perfect split over two cores would give, so default / (one thread / 2) is
  the side-by-side modes' parallel efficiency, and (one thread / 2) / plain loop the best ratio
  that any split of today's per-thread work could reach.
The loss is CE + full MRED everywhere (CE alone for a single resolution). Timing is round-robin in
one process: every round runs one step of every variant, and ratios are taken within a round,
because this machine's speed drifts over minutes, which made ratios of separate processes run one
after another unreliable.
Peak memory comes from one short process per variant (its peak resident set, VmHWM).

    python tools/bench_step_speed.py [--quick] [--variants plain_eager,rsq_default,rsq_one_thread]
"""
from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
from pathlib import Path

from benchlib import cpu_name, write_outputs

RESOLUTIONS = [28, 24, 20, 16, 12]
VARIANTS = [f"single_{r}" for r in RESOLUTIONS] + ["plain_eager", "rsq_eager", "rsq_channels_last", "rsq_default",
                                                   "rsq_default_unfused", "rsq_compile", "rsq_one_thread",
                                                   "rsq_bf16", "rsq_bf16_in_turn", "rsq_w4a4", "rsq_w4a4_bf16"]
LR = 0.01


def make_step(variant: str, x, y, fused: bool = True):
    """One variant's training step as a closure, with its own model and optimizer.

    Every rsq variant is `rsq.train.train_step` on a `TrainJob` (the step `rsq train` runs);
    only plain_eager, the baseline, has a loop of its own here. ``fused=False``: `--no-fused-bn`.
    """
    import torch
    import torch.nn.functional as F

    import rsq
    from rsq.config import TrainConfig
    from rsq.nn import fused_bn
    from rsq.train import TrainJob, train_step
    from rsq.train_setup import build_training_model

    torch.manual_seed(0)
    if variant == "plain_eager":
        from rsq.distill import EnsembleWeights, mred_loss

        model = rsq.create_model("resnet20", 10, 1, resolutions=RESOLUTIONS)
        ensemble = EnsembleWeights(len(RESOLUTIONS))
        opt = torch.optim.SGD(list(model.parameters()) + list(ensemble.parameters()), lr=LR, momentum=0.9)

        def step():
            logits = []
            for r in RESOLUTIONS:
                xr = x if r == x.shape[-1] else F.interpolate(x, size=(r, r), mode="bilinear", antialias=True)
                rsq.set_mode(model, r)
                logits.append(model(xr))
            parts = mred_loss(logits, y, ensemble, "full")
            opt.zero_grad(set_to_none=True)
            parts.total.backward()
            opt.step()

        return step

    single = variant.startswith("single_")
    bits = 4 if variant.startswith("rsq_w4a4") else 32
    config = TrainConfig(
        model="resnet20", resolutions=[int(variant.split("_")[1])] if single else RESOLUTIONS,
        batch_size=len(x), lr=LR, momentum=0.9, distill="none" if single else "full", device="cpu",
        channels_last=variant in ("rsq_channels_last", "rsq_default", "rsq_default_unfused", "rsq_compile",
                                  "rsq_one_thread", "rsq_bf16", "rsq_bf16_in_turn", "rsq_w4a4", "rsq_w4a4_bf16"),
        compile=variant == "rsq_compile",
        mode_threads=variant.startswith(("rsq_default", "rsq_w4a4")) or variant == "rsq_bf16",
        amp="bf16" if "bf16" in variant else "off", weight_bits=bits, act_bits=bits,
        fused_bn=fused and variant != "rsq_default_unfused")
    model = build_training_model(config, 10, 1, x, torch.device("cpu"))
    job = TrainJob.create(config, model)

    def step():
        fused_bn.set_enabled(config.fused_bn)  # a process-wide switch, and the variants take turns
        threads = torch.get_num_threads()
        if variant == "rsq_one_thread":
            torch.set_num_threads(1)
        try:
            with job.main_thread_for_steps():  # as rsq train's epoch loop runs its steps
                train_step(job, x, y, LR)
        finally:
            torch.set_num_threads(threads)

    return step


def batch(size: int):
    import torch

    generator = torch.Generator().manual_seed(0)
    return torch.randn(size, 1, 28, 28, generator=generator), torch.randint(0, 10, (size,), generator=generator)


def time_round_robin(args) -> dict:
    import torch

    torch.set_num_threads(args.threads)
    x, y = batch(args.batch)
    steps, compile_s = {}, {}
    for variant in args.variants:
        steps[variant] = make_step(variant, x, y)
        began = time.perf_counter()
        steps[variant]()
        compile_s[variant] = round(time.perf_counter() - began, 1) if variant == "rsq_compile" else 0.0
        for _ in range(args.warmup):
            steps[variant]()
        print(f"ready: {variant}", flush=True)
    times = {v: [] for v in args.variants}
    for i in range(args.steps):
        for variant in args.variants:
            began = time.perf_counter()
            steps[variant]()
            times[variant].append((time.perf_counter() - began) * 1000)
        print(f"round {i + 1}/{args.steps}: plain_eager {times['plain_eager'][-1]:.0f} ms", flush=True)
    return {"ms": times, "compile_s": compile_s}


def peak_rss(variant: str, args) -> float:
    """Peak resident set (MiB) of a fresh process that runs two steps of one variant."""
    cmd = [sys.executable, __file__, "--memory-of", variant, "--batch", str(args.batch), "--threads", str(args.threads)]
    done = subprocess.run(cmd, capture_output=True, text=True, env=os.environ)
    if done.returncode != 0:
        raise SystemExit(f"{variant}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
    return float(done.stdout.strip().splitlines()[-1])


def spread(values: list[float], fmt: str = "{:.2f}") -> str:
    """The median and the range over rounds: `0.79 (0.77-0.81)`."""
    text = fmt.format(statistics.median(values))
    return text if len(values) == 1 else f"{text} ({fmt.format(min(values))}-{fmt.format(max(values))})"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--steps", type=int, default=30, help="timed rounds (one step of every variant each)")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", default="tools/results/bench_step_speed")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset (plain_eager, the baseline, is always timed)")
    parser.add_argument("--memory-of", help=argparse.SUPPRESS)  # internal: peak RSS of one variant
    args = parser.parse_args()
    if args.memory_of:
        import torch

        torch.set_num_threads(args.threads)
        step = make_step(args.memory_of, *batch(args.batch))
        step()
        step()
        # VmHWM, not ru_maxrss: the latter survives exec, so it would report the parent's peak.
        status = Path("/proc/self/status").read_text()
        print(int(next(line.split()[1] for line in status.splitlines() if line.startswith("VmHWM:"))) / 1024)
        return
    args.variants = [v for v in dict.fromkeys(args.variants.split(",")) if v]
    if "plain_eager" not in args.variants:
        args.variants.insert(0, "plain_eager")
    unknown = [v for v in args.variants if v not in VARIANTS]
    if unknown:
        raise SystemExit(f"unknown variant {unknown[0]!r}; choose from {', '.join(VARIANTS)}")
    if args.quick:
        args.steps, args.warmup, args.out = 3, 1, args.out + "_quick"
    # One Inductor cache, empty at the start: the timed compile is cold, the memory run's warm.
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="rsq_bench_inductor_")
    timed = time_round_robin(args)
    rss = {variant: peak_rss(variant, args) for variant in args.variants}
    ms = timed["ms"]
    rounds = range(args.steps)
    ratio = {v: [ms[v][i] / ms["plain_eager"][i] for i in rounds] for v in args.variants}

    lines = [
        "# 5-resolution training step cost (CPU)",
        "",
        f"ResNet-20 RS-Net, 1x28x28 input, resolutions {RESOLUTIONS}, batch {args.batch}, loss CE + full MRED, "
        f"SGD, {args.threads} threads. Round-robin in one process: {args.steps} rounds, each one step of every "
        f"variant, after {args.warmup} warm-up steps; ms = median over rounds (range), ratios = median of the "
        f"per-round ratios (range). Peak RSS: a fresh process per variant running two steps. "
        f"Command: `python {' '.join(sys.argv)}`. Every rsq variant runs `rsq.train.train_step`.",
        "",
        f"CPU: {cpu_name()}.",
        "",
        "| variant | ms / step | images / s | vs plain eager | peak RSS (MiB) | compile, cold (s) |",
        "|:---|---:|---:|---:|---:|---:|",
    ]
    for v in args.variants:
        ips = [args.batch / t * 1000 for t in ms[v]]
        lines.append(f"| {v} | {spread(ms[v], '{:.1f}')} | {spread(ips, '{:.0f}')} | {spread(ratio[v])}x | "
                     f"{rss[v]:.0f} | {timed['compile_s'][v] or ''} |")
    lines.append("")
    if {f"single_{r}" for r in RESOLUTIONS} | {"rsq_eager"} <= set(args.variants):
        sums = [sum(ms[f"single_{r}"][i] for r in RESOLUTIONS) for i in rounds]
        vs_sum = [ms["rsq_eager"][i] / sums[i] for i in rounds]
        lines += [f"Sum of the five single-resolution steps: {spread(sums, '{:.1f}')} ms.",
                  f"rsq 5-resolution eager step / sum of the singles (both NCHW): {spread(vs_sum, '{:.3f}')} "
                  f"(goal <= 1.05)."]
    for v in ("rsq_channels_last", "rsq_default", "rsq_default_unfused", "rsq_compile"):
        if v in args.variants:
            lines.append(f"{v} / plain eager loop: {spread(ratio[v])}x (goal <= 0.7).")
    if {"rsq_default", "rsq_one_thread"} <= set(args.variants):
        efficiency = [ms["rsq_one_thread"][i] / 2 / ms["rsq_default"][i] for i in rounds]
        bound = [ms["rsq_one_thread"][i] / 2 / ms["plain_eager"][i] for i in rounds]
        lines += [f"Parallel efficiency of the default, (one-thread step / 2) / default step: {spread(efficiency)}.",
                  f"A perfect two-core split of the one-thread step, (one-thread step / 2) / plain eager loop: "
                  f"{spread(bound)}x: no scheduling of today's per-thread work does better."]
    write_outputs(args.out, lines, {"settings": vars(args), "ms": ms, "peak_rss_mib": rss,
                                    "compile_s": timed["compile_s"]})


if __name__ == "__main__":
    main()
