"""Where a quantized (W4A4) training step spends its time in fp32 and under `--amp bf16`, one thread.

Three settings of the same 5-resolution ResNet-20 W4A4 step (`rsq.train.train_step`, channels_last,
the modes in turn on one thread, LSQ, CE + full MRED, batch 128):
- fp32;
- bf16 autocast, as rsq runs it: LSQ's step gradient takes its dot products in float32
  (`rsq.nn.quantizers._dot`);
- bf16 autocast with a plain bf16 `torch.dot` there instead: what rsq did before, kept to show why.
For each: the median step time, and the self time of `aten::dot` under torch.profiler (one step).

    python tools/probe_bf16_quant.py [--steps 3] [--out tools/results/probe_bf16_quant]
"""
from __future__ import annotations

import argparse
import statistics
import time

import torch

from benchlib import cpu_name, write_outputs

RESOLUTIONS = [28, 24, 20, 16, 12]


def make_step(amp: str, batch: int):
    from rsq.config import TrainConfig
    from rsq.train import TrainJob, train_step
    from rsq.train_setup import build_training_model

    g = torch.Generator().manual_seed(0)
    x, y = torch.randn(batch, 1, 28, 28, generator=g), torch.randint(0, 10, (batch,), generator=g)
    config = TrainConfig(model="resnet20", resolutions=RESOLUTIONS, batch_size=batch, lr=0.01, momentum=0.9,
                         distill="full", device="cpu", amp=amp, channels_last=True, mode_threads=False,
                         weight_bits=4, act_bits=4)
    torch.manual_seed(0)
    job = TrainJob.create(config, build_training_model(config, 10, 1, x, torch.device("cpu")))
    return lambda: train_step(job, x, y, 0.01)


def plain_bf16_dot(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """rsq's `_dot` before it took bf16 factors to float32: torch.dot (or a sum) in the factors' dtype."""
    from rsq.nn.quantizers import _flat

    if a.stride() == b.stride():
        fa, fb = _flat(a), _flat(b)
        if fa is not None and fb is not None:
            return torch.dot(fa, fb)
    return (a * b).sum()


def measure(amp: str, steps: int, batch: int) -> dict:
    step = make_step(amp, batch)
    step()
    step()
    times = []
    for _ in range(steps):
        began = time.perf_counter()
        step()
        times.append((time.perf_counter() - began) * 1000)
    with torch.profiler.profile() as prof:
        step()
    dot_ms = sum(e.self_cpu_time_total for e in prof.key_averages() if e.key == "aten::dot") / 1000
    return {"step_ms": statistics.median(times), "dot_ms": dot_ms}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--batch", type=int, default=128)
    parser.add_argument("--out", default="tools/results/probe_bf16_quant")
    args = parser.parse_args()
    torch.set_num_threads(1)
    import rsq.nn.quantizers as quantizers

    results = {"fp32": measure("off", args.steps, args.batch), "bf16": measure("bf16", args.steps, args.batch)}
    rsq_dot = quantizers._dot
    quantizers._dot = plain_bf16_dot
    try:
        results["bf16, plain bf16 dot"] = measure("bf16", args.steps, args.batch)
    finally:
        quantizers._dot = rsq_dot
    base = results["fp32"]["step_ms"]
    lines = ["# A W4A4 training step in fp32 and in bf16 autocast, one thread", "",
             f"CPU: {cpu_name()}", "",
             f"`python tools/probe_bf16_quant.py --steps {args.steps} --batch {args.batch}`: ResNet-20 RS-Net at "
             f"{RESOLUTIONS} px, W4A4 (LSQ, first/last 8 bits), batch {args.batch}, CE + full MRED, channels_last, "
             f"the modes in turn on one thread; median of {args.steps} steps after two warm-up steps; "
             "`aten::dot` self time from torch.profiler over one more step.", "",
             "| setting | ms / step | vs fp32 | aten::dot (ms) |", "|:---|---:|---:|---:|"]
    for name, r in results.items():
        lines.append(f"| {name} | {r['step_ms']:.0f} | {r['step_ms'] / base:.2f}x | {r['dot_ms']:.1f} |")
    write_outputs(args.out, lines, {"cpu": cpu_name(), "settings": vars(args), "results": results})


if __name__ == "__main__":
    main()
