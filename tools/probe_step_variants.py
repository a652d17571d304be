"""Step-speed candidates that `bench_step_speed.py` does not carry, round-robin against its plain loop.

- ``default``: rsq's default step (channels_last, modes side by side on two threads);
- ``inplace_add``: the same with each block's residual add in place (``out += identity``);
- ``nchw``: modes side by side without channels_last;
- ``compiled``: torch.compile'd modes side by side, compiled inside the two pool threads with
  Dynamo's cache limit set in each thread (its settings are per thread).
Every variant runs `rsq.train.train_step`; the ratio is to the plain eager loop within each round.

    python tools/probe_step_variants.py [--steps 10]
"""
from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from benchlib import cpu_name, write_outputs

VARIANTS = ["plain_eager", "default", "inplace_add", "nchw", "compiled"]


def _pool_thread_setup() -> None:
    import torch
    import torch._dynamo as dynamo

    torch.set_num_threads(1)
    dynamo.config.cache_size_limit = 64


def _inplace_forward(self, x):
    identity = x if self.downsample is None else self.downsample(x)
    out = self.bn2(self.conv2(self.relu(self.bn1(self.conv1(x)))))
    out += identity
    return self.relu(out)


def make_step(variant: str, x, y):
    import torch

    import bench_step_speed
    from rsq.config import TrainConfig
    from rsq.mode_threads import ModeThreads
    from rsq.train import TrainJob, train_step
    from rsq.train_setup import build_training_model

    torch.manual_seed(0)
    if variant == "plain_eager":
        return bench_step_speed.make_step("plain_eager", x, y)
    config = TrainConfig(model="resnet20", resolutions=bench_step_speed.RESOLUTIONS, batch_size=len(x), lr=0.01,
                         momentum=0.9, device="cpu", amp="off", channels_last=variant != "nchw",
                         compile=variant == "compiled", mode_threads=False)
    job = TrainJob.create(config, build_training_model(config, 10, 1, x, torch.device("cpu")))
    job.mode_threads = ModeThreads()
    job.mode_threads.pool.shutdown()
    job.mode_threads.pool = ThreadPoolExecutor(2, initializer=_pool_thread_setup)
    return lambda: train_step(job, x, y, 0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--out", default="tools/results/probe_step_variants")
    args = parser.parse_args()
    os.environ.setdefault("TORCHINDUCTOR_CACHE_DIR", tempfile.mkdtemp(prefix="probe_step_inductor_"))
    import torch

    import bench_step_speed
    from rsq.models import resnet_cifar

    torch.set_num_threads(2)
    x, y = bench_step_speed.batch(128)
    plain_forward = resnet_cifar.BasicBlock.forward

    def use_block(variant: str) -> None:
        resnet_cifar.BasicBlock.forward = _inplace_forward if variant == "inplace_add" else plain_forward

    steps, first = {}, {}
    for v in VARIANTS:
        use_block(v)
        steps[v] = make_step(v, x, y)
        began = time.perf_counter()
        steps[v]()
        first[v] = time.perf_counter() - began
        for _ in range(3):
            steps[v]()
    ms = {v: [] for v in VARIANTS}
    for _ in range(args.steps):
        for v in VARIANTS:
            use_block(v)
            began = time.perf_counter()
            steps[v]()
            ms[v].append((time.perf_counter() - began) * 1000)
    use_block("plain_eager")
    lines = ["# 5-resolution step: candidates beside the default (probe)", "",
             f"CPU: {cpu_name()}. ResNet-20 RS-Net, 1x28x28, resolutions {bench_step_speed.RESOLUTIONS}, batch 128, "
             f"2 torch threads; {args.steps} round-robin rounds after 3 warm-up steps, median (range) of per-round "
             f"ratios. Command: `python tools/probe_step_variants.py {' '.join(sys.argv[1:])}`.", "",
             "| variant | ms / step | vs plain eager loop | first step (s) |", "|:---|---:|---:|---:|"]
    for v in VARIANTS:
        r = [ms[v][i] / ms["plain_eager"][i] for i in range(args.steps)]
        lines.append(f"| {v} | {statistics.median(ms[v]):.1f} | {statistics.median(r):.3f} "
                     f"({min(r):.2f}-{max(r):.2f}) | {first[v]:.1f} |")
    write_outputs(args.out, lines, {"settings": vars(args), "cpu": cpu_name(), "ms": ms, "first_step_s": first})


if __name__ == "__main__":
    main()
