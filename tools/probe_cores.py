"""How much a second core buys on this machine: the plain 5-resolution step at 1 and 2 threads.

rsq's default step on a 2-core CPU runs whole modes side by side, one per core, each with one
intra-op thread (rsq/mode_threads.py). That pays when two intra-op threads split small kernels
poorly; it cannot pay when the two cores do not run two serial streams at twice the speed of one
(two hyperthreads of one physical core, or a shared memory bus that one stream already fills).
This probe measures both on the plain eager NCHW loop of `tools/bench_step_speed.py` (its `plain_eager` step: ResNet-20
RS-Net, 28/24/20/16/12 px, batch 128, CE + full MRED, SGD), each setting in its own process:
- ``one_thread``: one process, one thread, alone on the machine;
- ``two_threads``: one process, two intra-op threads;
- ``two_processes``: two one-thread processes at once (what side-by-side modes can at best reach).
Rounds alternate the settings; every figure is the median step time of a round's process, and the
ratios are taken within a round.

    python tools/probe_cores.py [--rounds 3] [--steps 12] [--out tools/results/probe_cores_amd]
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import time

from bench_step_speed import RESOLUTIONS, make_step
from benchlib import cpu_name, write_outputs


def worker(threads: int, steps: int) -> None:
    """Print the median ms of ``steps`` plain-loop steps after 2 warm-up steps, as JSON."""
    import torch

    torch.set_num_threads(threads)
    torch.manual_seed(0)
    x, y = torch.randn(128, 1, 28, 28), torch.randint(0, 10, (128,))
    step = make_step("plain_eager", x, y)
    times = []
    for i in range(steps + 2):
        t0 = time.perf_counter()
        step()
        if i >= 2:
            times.append((time.perf_counter() - t0) * 1e3)
    print(json.dumps({"ms": statistics.median(times)}))


def spawn(threads: int, steps: int) -> subprocess.Popen:
    env = dict(os.environ, OMP_NUM_THREADS=str(threads))
    return subprocess.Popen([sys.executable, __file__, "--worker", str(threads), "--steps", str(steps)],
                            stdout=subprocess.PIPE, text=True, env=env)


def median_ms(procs: list[subprocess.Popen]) -> list[float]:
    return [json.loads(p.communicate()[0])["ms"] for p in procs]


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--steps", type=int, default=12)
    ap.add_argument("--out", default="tools/results/probe_cores")
    ap.add_argument("--worker", type=int, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.worker:
        worker(args.worker, args.steps)
        return

    rows = []
    for _ in range(args.rounds):
        one = median_ms([spawn(1, args.steps)])[0]
        two = median_ms([spawn(2, args.steps)])[0]
        pair = median_ms([spawn(1, args.steps), spawn(1, args.steps)])
        rows.append({"one_thread": one, "two_threads": two, "two_processes": pair})
        print(rows[-1], flush=True)

    med = statistics.median
    speedup_threads = med([r["one_thread"] / r["two_threads"] for r in rows])
    throughput_pair = med([2 * r["one_thread"] / max(r["two_processes"]) for r in rows])
    slowdown_pair = med([statistics.mean(r["two_processes"]) / r["one_thread"] for r in rows])
    cpu = cpu_name()
    lines = [
        "# How much a second core buys: the plain 5-resolution step at 1 and 2 threads (probe)",
        "",
        f"CPU: {cpu}. ResNet-20 RS-Net, 1x28x28, resolutions {RESOLUTIONS}, batch 128, CE + full MRED, SGD, "
        f"plain eager NCHW loop; each figure the median of {args.steps} steps (after 2 warm-up steps) in a fresh "
        f"process, {args.rounds} rounds. Command: `python tools/probe_cores.py --rounds {args.rounds} "
        f"--steps {args.steps} --out {args.out}`.",
        "",
        "| round | one thread, alone (ms) | two threads (ms) | two one-thread processes at once (ms each) |",
        "|---:|---:|---:|---:|",
    ]
    for i, r in enumerate(rows):
        pair = ", ".join(f"{v:.0f}" for v in r["two_processes"])
        lines.append(f"| {i + 1} | {r['one_thread']:.0f} | {r['two_threads']:.0f} | {pair} |")
    lines += [
        "",
        f"- A second intra-op thread: the step {speedup_threads:.2f}x as fast (one-thread time / two-thread time).",
        f"- Two one-thread processes at once: each step {slowdown_pair:.2f}x its time alone; together "
        f"{throughput_pair:.2f}x the work of one thread alone in the same time (the most that whole modes "
        f"side by side could give: with two fully independent cores, 2.00x).",
        f"- So side-by-side modes can beat two intra-op threads by at most "
        f"{throughput_pair / speedup_threads:.2f}x on this CPU.",
    ]
    write_outputs(args.out, lines, {"cpu": cpu, "rounds": rows, "steps": args.steps,
                                    "two_threads_speedup": speedup_threads, "pair_throughput": throughput_pair,
                                    "pair_slowdown": slowdown_pair})


if __name__ == "__main__":
    main()
