"""The training loop's main thread beside the mode threads: one intra-op thread or two.

`rsq train` runs an epoch's steps inside `TrainJob.main_thread_for_steps()`: with modes side by side,
the main thread, which only prepares the batch, sums the loss and steps the optimizer, works on
one intra-op thread. This probe times a loop of batch preparation (pad, crop, flip, normalise a
uint8 batch, as the in-memory data path does) + `train_step`, in blocks of steps that alternate
between the two settings (ABBA order), dropping each block's first step (it follows the other
setting). A round-robin of single steps cannot show this: there each step follows another variant.

    python tools/probe_step_loop.py [--blocks 10 --steps-per-block 6]
"""
from __future__ import annotations

import argparse
import contextlib
import statistics
import sys
import time

from benchlib import cpu_name, write_outputs

SETTINGS = {"one_main_thread": "main thread on one intra-op thread (the default)",
            "two_main_threads": "main thread on two intra-op threads (before)"}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--blocks", type=int, default=10, help="blocks per setting")
    parser.add_argument("--steps-per-block", type=int, default=6)
    parser.add_argument("--out", default="tools/results/probe_step_loop")
    args = parser.parse_args()
    import torch
    import torch.nn.functional as F

    import bench_step_speed
    from rsq.config import TrainConfig
    from rsq.train import TrainJob, train_step
    from rsq.train_setup import build_training_model

    torch.set_num_threads(2)
    raw = torch.randint(0, 256, (128, 1, 28, 28), dtype=torch.uint8, generator=torch.Generator().manual_seed(0))
    _, y = bench_step_speed.batch(128)

    def batch():
        x = F.pad(raw, (2, 2, 2, 2))[..., 1:29, 2:30].flip(-1).contiguous()
        return (x.float() / 255.0 - 0.286) / 0.353

    jobs = {}
    for name in SETTINGS:
        torch.manual_seed(0)
        config = TrainConfig(model="resnet20", resolutions=bench_step_speed.RESOLUTIONS, batch_size=128, lr=0.01,
                             momentum=0.9, device="cpu", amp="off")
        jobs[name] = TrainJob.create(config, build_training_model(config, 10, 1, batch(), torch.device("cpu")))
        assert jobs[name].mode_threads is not None

    def block(name: str, steps: int) -> list[float]:
        job = jobs[name]
        scope = job.main_thread_for_steps() if name == "one_main_thread" else contextlib.nullcontext()
        ms = []
        with scope:
            for _ in range(steps):
                began = time.perf_counter()
                train_step(job, batch(), y, 0.01)
                ms.append((time.perf_counter() - began) * 1000)
        return ms[1:]

    for name in SETTINGS:
        block(name, 3)
    ms = {name: [] for name in SETTINGS}
    names = list(SETTINGS)
    for i in range(args.blocks):
        for name in (names if i % 2 == 0 else names[::-1]):
            ms[name] += block(name, args.steps_per_block)
    base = statistics.median(ms["two_main_threads"])
    lines = ["# Training loop: the main thread beside the mode threads (probe)", "",
             f"CPU: {cpu_name()}. ResNet-20 RS-Net, resolutions {bench_step_speed.RESOLUTIONS}, batch 128, 2 torch "
             f"threads, modes side by side; each step = batch preparation + `train_step`. {args.blocks} blocks of "
             f"{args.steps_per_block} steps per setting, alternating, each block's first step dropped. Command: "
             f"`python tools/probe_step_loop.py {' '.join(sys.argv[1:])}`.", "",
             "| setting | ms / step, median | mean | vs two main threads (medians) |", "|:---|---:|---:|---:|"]
    for name, label in SETTINGS.items():
        lines.append(f"| {label} | {statistics.median(ms[name]):.1f} | {statistics.mean(ms[name]):.1f} | "
                     f"{statistics.median(ms[name]) / base:.3f} |")
    write_outputs(args.out, lines, {"settings": vars(args), "cpu": cpu_name(), "ms": ms})


if __name__ == "__main__":
    main()
