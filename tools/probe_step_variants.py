"""Step-speed candidates that `bench_step_speed.py` does not carry, round-robin against its plain loop.

- ``default``: `rsq.train.train_step` called on its own (channels_last, modes side by side on two
  threads; the main thread keeps its two intra-op threads, as every step did before `rsq train`'s
  epoch loop ran them inside `TrainJob.main_thread_for_steps`);
- ``main_one_thread``: the same inside `TrainJob.main_thread_for_steps` (the main thread's own work,
  loss, gradient sums and optimizer, on one intra-op thread): how `rsq train` runs it now;
- ``pinned``: the default with each pool thread kept on its own core (os.sched_setaffinity);
- ``inplace_add``: the same with each block's residual add in place (``out += identity``);
- ``nchw``: modes side by side without channels_last;
- ``compiled``: torch.compile'd modes side by side, compiled inside the two pool threads with
  Dynamo's cache limit set in each thread (its settings are per thread).
Every variant runs `rsq.train.train_step`; the ratio is to the plain eager loop within each round.
The order of the variants rotates from round to round: a step that follows the plain loop (two
OpenMP threads on the main thread, whose second thread spins on after each parallel region) was
slower than the same step in another position.

    python tools/probe_step_variants.py [--steps 10]
"""
from __future__ import annotations

import argparse
import itertools
import os
import statistics
import sys
import tempfile
import time
from concurrent.futures import ThreadPoolExecutor

from benchlib import cpu_name, write_outputs

VARIANTS = ["plain_eager", "default", "main_one_thread", "pinned", "inplace_add", "nchw", "compiled"]


def _pinned_thread_setup(cores: list[int], counter) -> None:
    import torch

    torch.set_num_threads(1)
    os.sched_setaffinity(0, {cores[next(counter) % len(cores)]})  # pid 0: this thread only


def _compiled_thread_setup() -> None:
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
    if variant in ("pinned", "compiled"):
        job.mode_threads.pool.shutdown()
        setup = ((_compiled_thread_setup, ()) if variant == "compiled" else
                 (_pinned_thread_setup, (sorted(os.sched_getaffinity(0))[:2], itertools.count())))
        job.mode_threads.pool = ThreadPoolExecutor(2, initializer=setup[0], initargs=setup[1])
    if variant == "main_one_thread":
        def step():
            with job.main_thread_for_steps():
                train_step(job, x, y, 0.01)
        return step
    return lambda: train_step(job, x, y, 0.01)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=10)
    parser.add_argument("--variants", default=",".join(VARIANTS),
                        help="comma-separated subset (plain_eager, the reference, is always run)")
    parser.add_argument("--out", default="tools/results/probe_step_variants")
    args = parser.parse_args()
    variants = ["plain_eager"] + [v for v in args.variants.split(",") if v != "plain_eager"]
    unknown = sorted(set(variants) - set(VARIANTS))
    if unknown:
        raise SystemExit(f"unknown variant(s) {', '.join(unknown)}; known: {', '.join(VARIANTS)}")
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
    for v in variants:
        use_block(v)
        steps[v] = make_step(v, x, y)
        began = time.perf_counter()
        steps[v]()
        first[v] = time.perf_counter() - began
        for _ in range(3):
            steps[v]()
    ms = {v: [] for v in variants}
    for i in range(args.steps):
        for v in variants[i % len(variants):] + variants[:i % len(variants)]:
            use_block(v)
            began = time.perf_counter()
            steps[v]()
            ms[v].append((time.perf_counter() - began) * 1000)
    use_block("plain_eager")
    lines = ["# 5-resolution step: candidates beside the default (probe)", "",
             f"CPU: {cpu_name()}. ResNet-20 RS-Net, 1x28x28, resolutions {bench_step_speed.RESOLUTIONS}, batch 128, "
             f"2 torch threads; {args.steps} round-robin rounds (the order rotating) after 3 warm-up steps, "
             f"median (range) of per-round ratios. Command: `python tools/probe_step_variants.py {' '.join(sys.argv[1:])}`.", "",
             "| variant | ms / step | vs plain eager loop | first step (s) |", "|:---|---:|---:|---:|"]
    for v in variants:
        r = [ms[v][i] / ms["plain_eager"][i] for i in range(args.steps)]
        lines.append(f"| {v} | {statistics.median(ms[v]):.1f} | {statistics.median(r):.3f} "
                     f"({min(r):.2f}-{max(r):.2f}) | {first[v]:.1f} |")
    write_outputs(args.out, lines, {"settings": vars(args), "cpu": cpu_name(), "ms": ms, "first_step_s": first})


if __name__ == "__main__":
    main()
