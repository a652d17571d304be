"""Training throughput of the ResNet-18 RS-Net on one CUDA GPU: FP vs W4A4, and the quantizers' share.

Synthetic ImageNet-shaped data (no data set is read): a batch of B random images at 224 px and
random labels, already on the GPU. Each step is `rsq train`'s CUDA step: the batch downsampled
on the GPU to all five resolutions (224, 192, 160, 128, 96), bf16 autocast, channels_last, full
MRED loss, one backward, one SGD step; optionally torch.compile (one static graph per resolution).
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

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import rsq  # noqa: E402
from rsq.distill import EnsembleWeights, mred_loss  # noqa: E402
from rsq.evaluate import autocast_for  # noqa: E402
from rsq.train import AllResolutions, initialize_quantizers, param_groups  # noqa: E402

MODEL = "resnet18"
RESOLUTIONS = [224, 192, 160, 128, 96]
NUM_CLASSES = 1000
VARIANTS = ("fp", "w4a4", "w4a4-noq")


def quantizer_api():
    """(quantize_, QuantConfig), or the reason they cannot be imported."""
    try:
        from rsq.quantize import QuantConfig, quantize_
    except Exception as exc:  # noqa: BLE001 - report whatever stops the import
        return None, f"cannot import rsq.quantize: {exc.__class__.__name__}: {exc}"
    return (quantize_, QuantConfig), None


def _identity(self, x):
    return x


def disable_quantizers(model: nn.Module) -> int:
    """Replace every quantizer's forward with the identity; returns how many were replaced."""
    try:
        from rsq.nn.quantizers import LQNetQuantizer, LSQQuantizer, SwitchableQuantizer
        kinds = (LSQQuantizer, LQNetQuantizer, SwitchableQuantizer)
    except ImportError:
        kinds = ()
    count = 0
    for module in model.modules():
        if isinstance(module, kinds) or (not kinds and type(module).__name__.endswith("Quantizer")):
            module.forward = types.MethodType(_identity, module)
            count += 1
    return count


def build(variant: str, x: torch.Tensor, resolutions: list[int], args) -> tuple[nn.Module, str]:
    torch.manual_seed(0)
    model = rsq.create_model(MODEL, NUM_CLASSES, 3, resolutions=resolutions).to(x.device)
    note = ""
    if variant != "fp":
        api, error = quantizer_api()
        if api is None:
            raise RuntimeError(error)
        quantize_, QuantConfig = api
        quantize_(model, QuantConfig(weight_bits=4, act_bits=4))
        model.to(x.device)
        # As `rsq train` does: quantizer steps from the first batch, eagerly, before compile.
        initialize_quantizers(model, x, resolutions)
        if variant == "w4a4-noq":
            note = f"{disable_quantizers(model)} quantizers replaced by the identity"
    if not args.no_channels_last:
        model.to(memory_format=torch.channels_last)
    return model, note


class Timer:
    """Seconds of one step: CUDA events on the GPU (no host sync inside the step), else the wall clock."""

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
    model, note = build(variant, x, resolutions, args)
    runner = AllResolutions(model, resolutions, channels_last=not args.no_channels_last)
    if args.compile:
        import torch._dynamo as dynamo

        dynamo.reset()
        dynamo.config.cache_size_limit = 64  # one graph per resolution (the default 8 falls back to eager)
        runner.compiled = torch.compile(model, dynamic=False)
    ensemble = EnsembleWeights(len(resolutions)).to(device)
    optimizer = torch.optim.SGD(param_groups([model, ensemble], 1e-4), lr=0.01, momentum=0.9)

    def step():
        with autocast_for(device, args.amp):
            logits = runner(x)
        parts = mred_loss(logits, y, ensemble, "full")
        optimizer.zero_grad(set_to_none=True)
        parts.total.backward()
        optimizer.step()

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
    return result  # the model and optimizer go with this frame; main() then empties the cache


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
        except RuntimeError as exc:
            if "rsq.quantize" not in str(exc):
                raise
            skipped[variant] = str(exc)
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
