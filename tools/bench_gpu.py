"""Training throughput of the ResNet-18 RS-Net on one CUDA GPU: FP vs W4A4, and the quantizers' share.

Synthetic ImageNet-shaped data (no data set is read): a batch of B random images at 224 px and
random labels, already on the GPU. Each step is `rsq train`'s step itself (`rsq.train.train_step`
on a `TrainJob`): the batch downsampled on the GPU to all five resolutions (224, 192, 160, 128, 96),
bf16 autocast, channels_last, full MRED loss, the non-finite-loss check (one device sync), one
backward, one SGD step; optionally torch.compile (one static graph per resolution).
The input pipeline (DataLoader workers, pinned memory) is not part of the measurement.

Variants:
  fp        full precision
  w4a4      LSQ W4A4 (first conv / last FC 8-bit) from rsq.quantize.quantize_
  w4a4-noq  the same W4A4 model with every quantizer replaced by the identity
The quantizers' share of a W4A4 step is 1 - t(w4a4-noq) / t(w4a4): the time the quantizers
(forward and backward) add, as a fraction of the whole step.

    python tools/bench_gpu.py                       # eager, batch 128, 20 timed steps
    python tools/bench_gpu.py --compile             # the same under torch.compile
    python tools/bench_gpu.py --batch 256 --steps 50 --json tools/results/bench_gpu.json
    python tools/bench_gpu.py --profile             # also the top CUDA kernels of one W4A4 step

Without a CUDA device it prints why on stderr and exits with code 2 (nothing was measured).
`--smoke-cpu` instead runs every code path on the CPU at small sizes (batch 2, 64..32 px,
2 steps) to check the script works; its timings mean nothing.
"""
from __future__ import annotations

import argparse
import gc
import json
import platform
import statistics
import sys
import time
import types
from pathlib import Path

import torch
from torch import nn

from rsq.config import TrainConfig
from rsq.train import TrainJob, train_step
from rsq.train_setup import build_training_model

MODEL = "resnet18"
RESOLUTIONS = [224, 192, 160, 128, 96]
NUM_CLASSES = 1000
VARIANTS = ("fp", "w4a4", "w4a4-noq")
LR = 0.01


def _identity(self, x):
    return x


def disable_quantizers(model: nn.Module) -> int:
    """Replace every quantizer's forward with the identity; returns how many were replaced."""
    from rsq.nn.quantizers import LQNetQuantizer, LSQQuantizer, SwitchableQuantizer

    kinds = (LSQQuantizer, LQNetQuantizer, SwitchableQuantizer)
    count = 0
    for module in model.modules():
        if isinstance(module, kinds):
            module.forward = types.MethodType(_identity, module)
            count += 1
    return count


def config_for(variant: str, device: torch.device, resolutions: list[int], args) -> TrainConfig:
    """The `rsq train` settings of one variant: LSQ W4A4 (first conv / last FC 8-bit) or full precision."""
    bits = 32 if variant == "fp" else 4
    return TrainConfig(model=MODEL, resolutions=resolutions, batch_size=args.batch, lr=LR, momentum=0.9,
                       weight_decay=1e-4, distill="full", weight_bits=bits, act_bits=bits, quantizer="lsq",
                       first_last="8", channels_last=not args.no_channels_last, compile=args.compile, amp=args.amp,
                       device=device.type)


def build(variant: str, x: torch.Tensor, resolutions: list[int], args) -> tuple[TrainJob, str]:
    """The variant's model as `rsq train` builds it (quantizer steps set from the first batch,
    eagerly, before any compile) and its TrainJob (compiled per resolution under --compile)."""
    config = config_for(variant, x.device, resolutions, args)
    torch.manual_seed(0)
    model = build_training_model(config, NUM_CLASSES, 3, x, x.device)
    note = ""
    if variant == "w4a4-noq":
        note = f"{disable_quantizers(model)} quantizers replaced by the identity"
    return TrainJob.create(config, model, device=x.device), note


class Timer:
    """Seconds of one step: CUDA events on the GPU (the timer adds no host sync), else the wall clock."""

    def __init__(self, device: torch.device):
        self.cuda = device.type == "cuda"

    def __enter__(self):
        if self.cuda:
            self.start, self.end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            self.start.record()
        else:
            self.began = time.perf_counter()
        return self

    def __exit__(self, *exc):
        if self.cuda:
            self.end.record()
            self.end.synchronize()
            self.seconds = self.start.elapsed_time(self.end) / 1000.0
        else:
            self.seconds = time.perf_counter() - self.began


def measure(variant: str, device: torch.device, resolutions: list[int], args) -> dict:
    cuda = device.type == "cuda"
    x = torch.randn(args.batch, 3, resolutions[0], resolutions[0], device=device)
    y = torch.randint(0, NUM_CLASSES, (args.batch,), device=device)
    if args.compile:
        torch._dynamo.reset()  # drop the previous variant's graphs
    job, note = build(variant, x, resolutions, args)

    def step():
        train_step(job, x, y, LR)

    if cuda:
        torch.cuda.reset_peak_memory_stats()
    with Timer(device) as first:
        step()  # under --compile: traces and compiles every resolution's forward and backward
    for _ in range(args.warmup):
        step()
    times = []
    for _ in range(args.steps):
        with Timer(device) as timer:
            step()
        times.append(timer.seconds)
    profile = profile_step(step, cuda) if args.profile and variant == "w4a4" else None
    result = {
        "variant": variant, "step_ms": 1000 * statistics.median(times),
        "step_ms_min": 1000 * min(times), "images_per_s": args.batch / statistics.median(times),
        "peak_memory_gib": torch.cuda.max_memory_allocated() / 2**30 if cuda else float("nan"),
        "first_step_s": first.seconds, "note": note,
    }
    if profile:
        result["profile"] = profile
    return result  # the job (model, optimizer) goes with this frame; main() then empties the cache


def profile_step(step, cuda: bool) -> str:
    from torch.profiler import ProfilerActivity, profile

    activities = [ProfilerActivity.CPU] + ([ProfilerActivity.CUDA] if cuda else [])
    with profile(activities=activities) as prof:
        step()
        if cuda:
            torch.cuda.synchronize()
    return prof.key_averages().table(sort_by="cuda_time_total" if cuda else "cpu_time_total", row_limit=20)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch", type=int, default=128, help="images per step (each at all 5 resolutions)")
    parser.add_argument("--steps", type=int, default=20, help="timed steps per variant (median reported)")
    parser.add_argument("--warmup", type=int, default=5, help="untimed steps after the first")
    parser.add_argument("--variants", default=",".join(VARIANTS), help=f"comma list of {', '.join(VARIANTS)}")
    parser.add_argument("--compile", action="store_true", help="torch.compile, one static graph per resolution")
    parser.add_argument("--amp", default="bf16", choices=("bf16", "off"), help="bf16 autocast (as rsq train on CUDA)")
    parser.add_argument("--no-channels-last", action="store_true", help="keep NCHW")
    parser.add_argument("--profile", action="store_true", help="print the top CUDA kernels of one W4A4 step")
    parser.add_argument("--json", default=None, help="also write the results here")
    parser.add_argument("--smoke-cpu", action="store_true",
                        help="check the script on the CPU at tiny sizes (timings meaningless)")
    args = parser.parse_args()
    variants = [v.strip() for v in args.variants.split(",") if v.strip()]
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown or args.batch < 1 or args.steps < 1 or args.warmup < 0:
        parser.error(f"unknown variant(s) {unknown}" if unknown else "--batch and --steps must be >= 1")

    resolutions = RESOLUTIONS
    if args.smoke_cpu:
        device, resolutions = torch.device("cpu"), [64, 56, 48, 40, 32]
        args.batch, args.steps, args.warmup = min(args.batch, 2), min(args.steps, 2), 0
        where = "CPU smoke run: timings mean nothing"
    elif not torch.cuda.is_available():
        print(f"bench_gpu.py: error: this benchmark needs a CUDA GPU, and torch.cuda.is_available() is False "
              f"(torch {torch.__version__}, built for CUDA {torch.version.cuda or 'none'}); nothing was measured",
              file=sys.stderr)
        return 2
    else:
        device, where = torch.device("cuda"), torch.cuda.get_device_name()
        torch.backends.cudnn.benchmark = True  # as rsq train: five fixed shapes, one per resolution
        torch.set_float32_matmul_precision("high")

    header = (f"{MODEL} RS-Net, resolutions {resolutions}, batch {args.batch}, amp {args.amp}, "
              f"{'NCHW' if args.no_channels_last else 'channels_last'}, {'torch.compile' if args.compile else 'eager'}; "
              f"{where}, torch {torch.__version__}")
    print(header, flush=True)
    results, skipped = [], {}
    for variant in variants:
        try:
            results.append(measure(variant, device, resolutions, args))
        except torch.cuda.OutOfMemoryError:
            skipped[variant] = f"out of GPU memory at batch {args.batch}; try a smaller --batch"
        gc.collect()  # free this variant's model before the next one is built
        if device.type == "cuda":
            torch.cuda.empty_cache()
        if results and results[-1]["variant"] == variant:
            r = results[-1]
            print(f"  {variant}: {r['step_ms']:.1f} ms/step, {r['images_per_s']:.0f} images/s", flush=True)
        else:
            print(f"  {variant}: skipped ({skipped[variant]})", flush=True)

    print("\n| variant | step (ms, median) | images/s | peak memory | first step |")
    print("|:---|---:|---:|---:|---:|")
    for r in results:
        print(f"| {r['variant']} | {r['step_ms']:.1f} | {r['images_per_s']:.0f} | {r['peak_memory_gib']:.1f} GiB | "
              f"{r['first_step_s']:.1f} s |")
    by = {r["variant"]: r for r in results}
    summary = {}
    if "fp" in by and "w4a4" in by:
        summary["w4a4_over_fp"] = by["w4a4"]["step_ms"] / by["fp"]["step_ms"]
        print(f"\nW4A4 step / FP step: {summary['w4a4_over_fp']:.2f}x")
    if "w4a4" in by and "w4a4-noq" in by:
        summary["quantizer_share"] = 1 - by["w4a4-noq"]["step_ms"] / by["w4a4"]["step_ms"]
        print(f"quantizers' share of the W4A4 step: {100 * summary['quantizer_share']:.0f}% "
              f"(1 - t(w4a4-noq) / t(w4a4))")
    for variant, reason in skipped.items():
        print(f"{variant}: skipped: {reason}")
    for r in results:
        if r.get("profile"):
            print(f"\nTop CUDA kernels, one {r['variant']} step:\n{r['profile']}")
    if args.json:
        payload = {"header": header, "args": vars(args), "python": platform.python_version(), "results":
                   [{k: v for k, v in r.items() if k != "profile"} for r in results], "summary": summary,
                   "skipped": skipped}
        Path(args.json).write_text(json.dumps(payload, indent=2) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
