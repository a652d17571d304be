"""Where one 5-resolution training step spends its time, by kind of kernel (one thread, channels_last).

The step is `rsq.train.train_step` as `tools/bench_step_speed.py` builds it (ResNet-20 RS-Net, 28..12 px,
batch 128, CE + full MRED, channels_last, every mode on the one thread), timed, then run under
torch.profiler. Self CPU time per step is split into convolutions (forward; backward), BatchNorm
(forward; backward), ReLU (forward; backward), adds, and the rest; with the convolutions' MACs from
rsq's counter it also gives their throughput, against which the rest is what fusing elementwise work
could still take.

    python tools/probe_step_profile.py [--steps 3] [--unfused] [--out tools/results/probe_step_profile]

With the fused kernel (rsq/nn/fused_bn.py, the default), its forward counts as "BN forward" and its backward
as "BN backward": there they include the ReLU and the block's add.
"""
from __future__ import annotations

import argparse
import time

from benchlib import cpu_name, write_outputs

PARTS = {
    "conv forward": ("aten::mkldnn_convolution", "aten::convolution_overrideable"),
    "conv backward": ("aten::convolution_backward",),
    "BN forward": ("aten::native_batch_norm", "aten::_native_batch_norm_legit", "_BatchNormReLU"),
    "BN backward": ("aten::native_batch_norm_backward", "_BatchNormReLUBackward"),
    "ReLU forward": ("aten::relu_", "aten::relu", "aten::clamp_min_", "aten::clamp_min"),
    "ReLU backward": ("aten::threshold_backward",),
    "adds": ("aten::add", "aten::add_"),
}


def part_of(key: str) -> str:
    return next((part for part, names in PARTS.items() if key in names), "other")


def matmul_gmacs() -> float:
    """One thread's fp32 GMAC/s on a 2048 x 2048 matrix product: the reference the convolutions are held to."""
    import torch

    a, b = torch.randn(2048, 2048), torch.randn(2048, 2048)
    for _ in range(3):
        a @ b
    began = time.perf_counter()
    for _ in range(10):
        a @ b
    return 2048 ** 3 * 10 / (time.perf_counter() - began) / 1e9


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=3)
    parser.add_argument("--unfused", action="store_true", help="without the fused BatchNorm + ReLU kernel "
                        "(--no-fused-bn), as the step ran before it")
    parser.add_argument("--out", default="tools/results/probe_step_profile")
    args = parser.parse_args()
    import torch
    from bench_step_speed import RESOLUTIONS, batch, make_step

    import rsq
    from rsq.counting import layer_costs

    torch.set_num_threads(1)
    x, y = batch(128)
    step = make_step("rsq_channels_last", x, y, fused=not args.unfused)
    for _ in range(3):
        step()
    began = time.perf_counter()
    for _ in range(args.steps):
        step()
    step_ms = (time.perf_counter() - began) / args.steps * 1000
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU]) as profile:
        for _ in range(args.steps):
            step()
    parts = dict.fromkeys([*PARTS, "other"], 0.0)
    others = {}
    for event in profile.key_averages():
        ms = event.self_cpu_time_total / 1000 / args.steps
        parts[part_of(event.key)] += ms
        if part_of(event.key) == "other":
            others[event.key] = others.get(event.key, 0.0) + ms
    top_others = sorted(others.items(), key=lambda kv: -kv[1])[:8]
    total = sum(parts.values())

    model = rsq.create_model("resnet20", 10, 1, resolutions=RESOLUTIONS)
    convs = {name for name, m in model.named_modules() if isinstance(m, torch.nn.Conv2d)}
    conv_macs = sum(c.macs for r in RESOLUTIONS for c in layer_costs(model, r, 1) if c.name in convs) * len(x)
    conv_ms = parts["conv forward"] + parts["conv backward"]
    # backward = input gradient + weight gradient, each the forward's MACs (the first conv has no input gradient)
    gmacs = conv_macs * 3 / conv_ms / 1e6
    peak = matmul_gmacs()
    lines = ["# One 5-resolution training step, by kind of kernel (one thread, channels_last)", "",
             f"CPU: {cpu_name()}.", "",
             f"`python tools/probe_step_profile.py --steps {args.steps}{' --unfused' if args.unfused else ''}`: "
             f"{'without' if args.unfused else 'with'} the fused BatchNorm + ReLU kernel; ResNet-20 RS-Net, "
             f"{RESOLUTIONS} px, batch 128, CE + full MRED, `rsq.train.train_step` with channels_last and every "
             f"mode on one thread. Timed: {step_ms:.0f} ms per step; profiled (self CPU time per step, the "
             f"profiler adds its own): {total:.0f} ms.",
             "", "| part | ms per step | share |", "|:---|---:|---:|"]
    lines += [f"| {part} | {ms:.1f} | {ms / total:.1%} |" for part, ms in parts.items()]
    elementwise = sum(parts[p] for p in ("BN forward", "BN backward", "ReLU forward", "ReLU backward", "adds"))
    lines += ["", f"Convolutions: {conv_ms / total:.0%} of the step, about {gmacs:.0f} GMAC/s "
              f"({conv_macs / 1e9:.2f} G forward MACs a step, counted three times for forward + backward), "
              f"{gmacs / peak:.0%} of a 2048 x 2048 fp32 matrix product on the same thread ({peak:.0f} GMAC/s). "
              f"BatchNorm, ReLU and adds: {elementwise:.0f} ms, {elementwise / total:.0%}.",
              "", "The largest parts of \"other\" (ms per step): "
              + ", ".join(f"`{name}` {ms:.1f}" for name, ms in top_others) + "."]
    write_outputs(args.out, lines, {"cpu": cpu_name(), "step_ms": step_ms, "parts_ms": parts,
                                    "conv_forward_macs": conv_macs, "conv_gmac_per_s": gmacs,
                                    "matmul_gmac_per_s": peak, "top_other_ms": dict(top_others)})


if __name__ == "__main__":
    main()
