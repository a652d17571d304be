"""Training-step speed on CPU: FP eager vs rsq W4A4 LSQ (eager, channels_last, compiled) vs brevitas.

One step = the batch resized to 32/28/24/20/16 px, forward + backward of a ResNet-20 RS-Net
(1 channel, 10 classes) at each with the summed cross-entropy, then one SGD step. Every rsq variant
is `rsq train`'s own step (`rsq.train.train_step` on a `TrainJob`, distill "none"); brevitas, the
baseline, runs the same work in a loop of its own. The variants run round-robin, one step each
per round, so load from other processes on a shared machine hits all of them alike.

    python tools/bench_quant_speed.py            # full run, writes tools/results/bench_quant_speed.{md,json}
    python tools/bench_quant_speed.py --quick    # smoke run: small batch, 2 rounds, no torch.compile
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import tempfile
import time
from pathlib import Path

import torch
import torch.nn.functional as F
from torch import nn

from rsq.config import TrainConfig
from rsq.convert import convert
from rsq.data.multires import resize_batch
from rsq.train import TrainJob, train_step
from rsq.train_setup import build_training_model

RESOLUTIONS = [32, 28, 24, 20, 16]
NUM_CLASSES = 10
LR = 0.01
VARIANTS = {
    "a": "FP32 eager (NCHW)",
    "b": "rsq W4A4 LSQ eager",
    "c": "rsq W4A4 LSQ channels_last",
    "d": "rsq W4A4 LSQ torch.compile (static per resolution)",
    "e": "brevitas W4A4 learned scales eager",
    "f": "rsq W4A4 LSQ torch.compile + channels_last (what `rsq train --compile` runs)",
}


def brevitas_resnet20() -> nn.Module:
    """ResNet-20 (as rsq's, option-B shortcuts) from brevitas layers: 4-bit inside, 8-bit first/last."""
    from brevitas.inject.enum import ScalingImplType
    from brevitas.nn import QuantConv2d, QuantIdentity, QuantLinear, QuantReLU
    from brevitas.quant.scaled_int import (Int8ActPerTensorFloatMinMaxInit, Int8WeightPerChannelFloat,
                                           Uint8ActPerTensorFloatMaxInit)

    class LearnedWeight(Int8WeightPerChannelFloat):  # learned per-channel scale, init from max|w|
        scaling_impl_type = ScalingImplType.PARAMETER_FROM_STATS

    def conv(cin, cout, k, stride, bits=4):
        return QuantConv2d(cin, cout, k, stride, k // 2, bias=False, weight_quant=LearnedWeight, weight_bit_width=bits)

    def relu(bits=4):
        return QuantReLU(act_quant=Uint8ActPerTensorFloatMaxInit, bit_width=bits, max_val=4.0)

    class Block(nn.Module):
        def __init__(self, cin, cout, stride):
            super().__init__()
            self.conv1, self.bn1, self.relu1 = conv(cin, cout, 3, stride), nn.BatchNorm2d(cout), relu()
            self.conv2, self.bn2, self.relu2 = conv(cout, cout, 3, 1), nn.BatchNorm2d(cout), relu()
            self.downsample = None
            if stride != 1 or cin != cout:
                self.downsample = nn.Sequential(conv(cin, cout, 1, stride), nn.BatchNorm2d(cout))

        def forward(self, x):
            identity = x if self.downsample is None else self.downsample(x)
            out = self.bn2(self.conv2(self.relu1(self.bn1(self.conv1(x)))))
            return self.relu2(out + identity)

    class Net(nn.Module):
        def __init__(self):
            super().__init__()
            self.quant_in = QuantIdentity(act_quant=Int8ActPerTensorFloatMinMaxInit, bit_width=8,
                                          min_val=-4.0, max_val=4.0)
            self.conv1, self.bn1, self.relu = conv(1, 16, 3, 1, bits=8), nn.BatchNorm2d(16), relu()
            blocks, cin = [], 16
            for stage, cout in enumerate((16, 32, 64)):
                for i in range(3):
                    blocks.append(Block(cin, cout, 2 if stage > 0 and i == 0 else 1))
                    cin = cout
            self.blocks = nn.Sequential(*blocks)
            self.quant_fc = QuantIdentity(act_quant=Uint8ActPerTensorFloatMaxInit, bit_width=8, max_val=4.0)
            self.fc = QuantLinear(64, NUM_CLASSES, bias=True, weight_quant=LearnedWeight, weight_bit_width=8)

        def forward(self, x):
            x = self.blocks(self.relu(self.bn1(self.conv1(self.quant_in(x)))))
            return self.fc(self.quant_fc(F.adaptive_avg_pool2d(x, 1).flatten(1)))

    return convert(Net(), RESOLUTIONS)


# The rsq variants' settings: (weight and activation bits, channels_last, torch.compile).
RSQ_SETTINGS = {"a": (32, False, False), "b": (4, False, False), "c": (4, True, False), "d": (4, False, True),
                "f": (4, True, True)}


class Runner:
    """One variant: a closure that runs one training step, and its step times."""

    def __init__(self, run_step):
        self.run_step = run_step
        self.times: list[float] = []

    def step(self) -> float:
        start = time.perf_counter()
        self.run_step()
        return time.perf_counter() - start


def rsq_runner(variant: str, images: torch.Tensor, labels: torch.Tensor) -> Runner:
    """`rsq train`'s step for the variant's settings: LSQ W4A4 (first conv / last FC 8-bit) or FP32.

    The quantizer steps are set from the batch, eagerly, when the model is built (outside any graph).
    """
    bits, channels_last, compile = RSQ_SETTINGS[variant]
    config = TrainConfig(model="resnet20", resolutions=RESOLUTIONS, batch_size=len(images), lr=LR, momentum=0.9,
                         distill="none", weight_bits=bits, act_bits=bits, quantizer="lsq", first_last="8",
                         channels_last=channels_last, compile=compile, amp="off", device="cpu")
    torch.manual_seed(0)
    model = build_training_model(config, NUM_CLASSES, 1, images, torch.device("cpu"))
    job = TrainJob.create(config, model)
    return Runner(lambda: train_step(job, images, labels, LR))


def brevitas_runner(images: torch.Tensor, labels: torch.Tensor) -> Runner:
    """The baseline's own step: the same resizing, summed cross-entropy and SGD, no rsq step."""
    torch.manual_seed(0)
    model = brevitas_resnet20()
    optimizer = torch.optim.SGD(model.parameters(), lr=LR, momentum=0.9)

    def step():
        optimizer.zero_grad(set_to_none=True)
        loss = sum(F.cross_entropy(model(resize_batch(images, r)), labels) for r in RESOLUTIONS)
        loss.backward()
        optimizer.step()

    return Runner(step)


def build(variant: str, images: torch.Tensor, labels: torch.Tensor, notes: dict) -> Runner:
    if variant == "e":
        return brevitas_runner(images, labels)
    if variant not in RSQ_SETTINGS:
        raise ValueError(variant)
    if not RSQ_SETTINGS[variant][2]:
        return rsq_runner(variant, images, labels)
    # A fresh Inductor cache, so the compile time below is a cold compile. TrainJob compiles one
    # static graph per resolution (and raises Dynamo's cache limit to hold them all).
    os.environ["TORCHINDUCTOR_CACHE_DIR"] = tempfile.mkdtemp(prefix="rsq_bench_inductor_")
    runner = rsq_runner(variant, images, labels)
    start = time.perf_counter()
    runner.step()  # compiles the forward and backward graph of every resolution
    notes[variant] = f"compile (first compiled step) {time.perf_counter() - start:.1f} s"
    return runner


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--quick", action="store_true", help="batch 16, 2 timed rounds, 1 warm-up, no compile")
    parser.add_argument("--batch", type=int, default=None)
    parser.add_argument("--rounds", type=int, default=None, help="timed steps per variant")
    parser.add_argument("--warmup", type=int, default=None, help="untimed steps per variant")
    parser.add_argument("--variants", default=None, help="subset of a-f (default: all; --quick: no compile, d and f)")
    parser.add_argument("--out", type=Path, default=None, help="write <out>.md and <out>.json")
    args = parser.parse_args()
    batch = args.batch or (16 if args.quick else 128)
    rounds = args.rounds or (2 if args.quick else 10)
    warmup = args.warmup if args.warmup is not None else (1 if args.quick else 2)
    variants = (args.variants or ("a,b,c,e" if args.quick else "a,b,c,d,e,f")).split(",")
    unknown = [v for v in variants if v not in VARIANTS]
    if unknown:
        parser.error(f"unknown variants {unknown}; choose from {','.join(VARIANTS)}")
    torch.set_num_threads(2)

    generator = torch.Generator().manual_seed(0)
    images = torch.randn(batch, 1, RESOLUTIONS[0], RESOLUTIONS[0], generator=generator)
    labels = torch.randint(0, NUM_CLASSES, (batch,), generator=generator)

    notes: dict[str, str] = {}
    runners: dict[str, Runner] = {}
    load_before = os.getloadavg()[0]
    for v in variants:
        try:
            runners[v] = build(v, images, labels, notes)
            for _ in range(warmup):
                runners[v].step()
        except Exception as error:  # report a failed variant (e.g. compile) instead of dying
            notes[v] = f"FAILED: {type(error).__name__}: {str(error).splitlines()[0][:200]}"
            runners.pop(v, None)
        print(f"built {v}: {VARIANTS[v]} {notes.get(v, '')}", flush=True)
    for _ in range(rounds):
        for v, runner in runners.items():
            runner.times.append(runner.step())
    load = (load_before, os.getloadavg()[0])
    report(variants, runners, notes, batch, rounds, warmup, load, args.out or (None if args.quick else
           Path(__file__).parent / "results" / "bench_quant_speed"))


def ratio(runners: dict, v: str, base: str):
    """Median over rounds of this round's time ratio: steps of one round ran back to back,
    so this is steadier than a ratio of medians when the machine's load drifts."""
    if v not in runners or base not in runners:
        return None
    return statistics.median(t / b for t, b in zip(runners[v].times, runners[base].times))


def report(variants, runners, notes, batch, rounds, warmup, load, out) -> None:
    median = {v: statistics.median(r.times) * 1000 for v, r in runners.items()}
    rows = []
    for v in variants:
        ms, vs_a, vs_e = median.get(v), ratio(runners, v, "a"), ratio(runners, v, "e")
        rows.append({
            "variant": v, "name": VARIANTS[v], "median_ms": None if ms is None else round(ms, 1),
            "vs_fp_eager": None if vs_a is None else round(vs_a, 3),
            "vs_brevitas": None if vs_e is None else round(vs_e, 3),
            "note": notes.get(v, ""),
        })
    goals = []
    for v in ("b", "c", "d", "f"):
        r = ratio(runners, v, "a")
        if r is not None:
            goals.append(f"W4A4 step <= 1.0x eager FP, {VARIANTS[v]}: {r:.2f}x -> {'met' if r <= 1.0 else 'NOT met'}")
    for v in ("b", "c", "d", "f"):
        r = ratio(runners, v, "e")
        if r is not None:
            goals.append(f">= 2x faster than brevitas, {VARIANTS[v]}: {1 / r:.2f}x -> "
                         f"{'met' if r <= 0.5 else 'NOT met'}")
    setup = (f"ResNet-20 RS-Net, in_chans 1, 10 classes, resolutions {RESOLUTIONS}, batch {batch}; "
             f"step = resize + fwd+bwd at all 5 resolutions (summed CE) + SGD, rsq variants via "
             f"rsq.train.train_step; torch {torch.__version__}, "
             f"{torch.get_num_threads()} threads, {os.cpu_count()} CPUs ({platform.machine()}); "
             f"{rounds} round-robin rounds after {warmup} warm-up steps; ms = median step time, "
             f"ratios = median of per-round ratios; 1-min load average {load[0]:.1f} at start, "
             f"{load[1]:.1f} at end (other processes share this machine)")
    lines = ["# Quantized training-step speed (CPU)", "", setup, "",
             "| variant | median ms/step | vs (a) FP eager | vs (e) brevitas | note |", "|---|---|---|---|---|"]
    for r in rows:
        fmt = lambda x, suffix="": "-" if x is None else f"{x}{suffix}"  # noqa: E731
        lines.append(f"| ({r['variant']}) {r['name']} | {fmt(r['median_ms'])} | {fmt(r['vs_fp_eager'], 'x')} "
                     f"| {fmt(r['vs_brevitas'], 'x')} | {r['note']} |")
    lines += ["", "Goals:", ""] + [f"- {g}" for g in goals]
    text = "\n".join(lines) + "\n"
    print(text)
    if out is not None:
        out.parent.mkdir(parents=True, exist_ok=True)
        out.with_suffix(".md").write_text(text)
        out.with_suffix(".json").write_text(json.dumps({"setup": setup, "rows": rows, "goals": goals}, indent=2) + "\n")


if __name__ == "__main__":
    main()
