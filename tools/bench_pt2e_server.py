"""The server CPU path (`rsq export --format pt2e`, compiled by Inductor) against eager fp32, beside
torchao's own int8 recipe on a stock ResNet-18, with glibc's default allocator and with the one
`rsq.export.pt2e.load_pt2e` sets (rsq/allocator.py).

Models (random weights: speed does not depend on their values), batch 32, 224..96 px:
- rsq ResNet-18 RS-Net W8A8 and W4A4 (first/last 8): rsq's PT2E program of each resolution, saved and
  loaded as a user would; eager fp32 = the dequantized RS-Net at that resolution.
- stock torchvision ResNet-18 quantized by torchao's X86InductorQuantizer (default config, calibrated
  on one random batch; one ReLU per use, which that quantizer needs); eager fp32 = the float model.
Each allocator setting runs in a fresh process (mallopt cannot be undone); within it, every model's
eager and compiled times come from the same process: blocks of --repeats calls in a row, eager,
compiled, compiled, eager, each after a warm-up call; the median of both blocks.

    python tools/bench_pt2e_server.py [--threads 1] [--repeats 5] [--quick] [--isa avx2]

--isa avx2 limits oneDNN (ONEDNN_MAX_CPU_ISA=AVX2) and ATen / Inductor's vector code
(ATEN_CPU_CAPABILITY=avx2) to AVX2 in the timed processes: a proxy, on an AVX-512/AMX machine, for
an AVX2-only CPU's instruction set (not for its cores, caches or memory).
"""
from __future__ import annotations

import argparse
import json
import os
import shutil
import statistics
import subprocess
import sys
import tempfile
import time
import types
from pathlib import Path

from benchlib import cpu_name, write_outputs

RESOLUTIONS = [224, 192, 160, 128, 96]
MODELS = ["rsq R18 W8A8", "rsq R18 W4A4", "rsq R18 W8A8, quantized shortcut", "rsq R18 W4A4, quantized shortcut",
          "stock R18 (torchao x86 int8)"]
ALLOCATORS = {"default": "glibc's default", "kept": "freed memory kept (rsq/allocator.py)"}
ISA_LIMITS = {"native": {}, "avx2": {"ONEDNN_MAX_CPU_ISA": "AVX2", "ATEN_CPU_CAPABILITY": "avx2"}}


def median_pair(eager, compiled, x, repeats: int) -> tuple[float, float]:
    """Median ms of eager and compiled on ``x``: two blocks each (eager, compiled, compiled, eager), each
    block one warm-up call and ``repeats`` timed calls in a row, as a server calls one model again and
    again (interleaving single calls of the two would time each against the other's heap)."""
    import torch

    times = {"eager": [], "compiled": []}
    engines = [("eager", eager), ("compiled", compiled)]
    with torch.no_grad():
        for name, fn in engines + engines[::-1]:
            fn(x)
            for _ in range(repeats):
                began = time.perf_counter()
                fn(x)
                times[name].append((time.perf_counter() - began) * 1000)
    return statistics.median(times["eager"]), statistics.median(times["compiled"])


def rsq_pairs(bits: int, resolutions, work: Path, shortcut: bool = False):
    """(resolution, eager, compiled) for rsq's PT2E programs of a W{bits}A{bits} ResNet-18 RS-Net (``shortcut``:
    trained with --quantized-shortcut)."""
    import copy

    import torch
    from bench_export_extra import resnet18_checkpoint

    from rsq.checkpoint import load_model
    from rsq.convert import using_mode
    from rsq.export.pt2e import load_pt2e, write_pt2e
    from rsq.quantize import dequantize_

    folder = work / f"w{bits}{'_shortcut' if shortcut else ''}"
    model, _ = load_model(resnet18_checkpoint(folder / "checkpoint.pt", resolutions, bits, shortcut))
    float_model = dequantize_(copy.deepcopy(model)).eval()
    for r in resolutions:
        path = write_pt2e(model, r, 3, folder / f"r{r}.pt2")

        def eager(x, r=r):
            with using_mode(float_model, r):
                return float_model(x)

        yield r, eager, load_pt2e(path, keep_memory=False)  # the process's allocator is this run's variable
        torch._dynamo.reset()


def stock_pairs(resolutions):
    """(resolution, eager, compiled) for torchvision's ResNet-18 through torchao's x86 int8 PT2E recipe."""
    import torch
    import torch._inductor.config as inductor_config
    import torch.nn.functional as F
    import torchvision
    from torchao.quantization.pt2e.quantize_pt2e import convert_pt2e, prepare_pt2e
    from torchao.quantization.pt2e.quantizer import x86_inductor_quantizer as xiq

    def block_forward(self, x):  # torchvision's block calls one ReLU module twice; the quantizer needs two
        identity = x if self.downsample is None else self.downsample(x)
        out = F.relu(self.bn1(self.conv1(x)))
        return F.relu(self.bn2(self.conv2(out)) + identity)

    torch.manual_seed(0)
    model = torchvision.models.resnet18().eval()
    for layer in (model.layer1, model.layer2, model.layer3, model.layer4):
        for block in layer:
            block.forward = types.MethodType(block_forward, block)
    inductor_config.freezing = True
    for r in resolutions:
        x = torch.randn(32, 3, r, r)
        quantizer = xiq.X86InductorQuantizer().set_global(xiq.get_default_x86_inductor_quantization_config())
        with torch.no_grad():
            prepared = prepare_pt2e(torch.export.export(model, (x,)).module(), quantizer)
            prepared(x)
            compiled = torch.compile(convert_pt2e(prepared), dynamic=False)
        yield r, model, compiled
        torch._dynamo.reset()


def child(allocator: str, threads: int, repeats: int, resolutions, models) -> None:
    """One allocator setting: print one JSON row per model and resolution."""
    import torch

    from rsq.allocator import keep_freed_memory

    torch.set_num_threads(threads)
    if allocator == "kept" and not keep_freed_memory():
        raise SystemExit("could not set glibc's allocator (not Linux/glibc, or MALLOC_*_ already set)")
    work = Path(tempfile.mkdtemp(prefix="bench_pt2e_server."))
    sources = {MODELS[0]: lambda: rsq_pairs(8, resolutions, work), MODELS[1]: lambda: rsq_pairs(4, resolutions, work),
               MODELS[2]: lambda: rsq_pairs(8, resolutions, work, shortcut=True),
               MODELS[3]: lambda: rsq_pairs(4, resolutions, work, shortcut=True),
               MODELS[4]: lambda: stock_pairs(resolutions)}
    try:
        for model in models:
            for r, eager, compiled in sources[model]():
                x = torch.randn(32, 3, r, r)
                eager_ms, compiled_ms = median_pair(eager, compiled, x, repeats)
                print(json.dumps({"model": model, "allocator": allocator, "resolution": r, "eager_ms": eager_ms,
                                  "compiled_ms": compiled_ms,
                                  "capability": torch.backends.cpu.get_cpu_capability()}), flush=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)  # two ResNet-18 checkpoints and ten programs


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--threads", type=int, default=1)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--resolutions", default=",".join(map(str, RESOLUTIONS)))
    parser.add_argument("--out", default="tools/results/bench_pt2e_server")
    parser.add_argument("--quick", action="store_true")
    parser.add_argument("--models", default=",".join(str(i) for i in range(len(MODELS))),
                        help="which models, by index: " + "; ".join(f"{i} {m}" for i, m in enumerate(MODELS)))
    parser.add_argument("--isa", choices=list(ISA_LIMITS), default="native",
                        help="avx2: limit oneDNN and ATen/Inductor to AVX2 (a proxy for an AVX2-only CPU)")
    parser.add_argument("--child", choices=list(ALLOCATORS), help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.quick:
        args.repeats, args.resolutions, args.out = 1, "96", args.out + "_quick"
    resolutions = [int(r) for r in args.resolutions.split(",")]
    models = [MODELS[int(i)] for i in args.models.split(",")]
    if args.child:
        child(args.child, args.threads, args.repeats, resolutions, models)
        return
    rows = []
    for allocator in ALLOCATORS:
        cmd = [sys.executable, __file__, "--child", allocator, "--threads", str(args.threads),
               "--repeats", str(args.repeats), "--resolutions", args.resolutions, "--models", args.models]
        done = subprocess.run(cmd, capture_output=True, text=True, env={**os.environ, **ISA_LIMITS[args.isa]})
        if done.returncode != 0:
            raise SystemExit(f"{allocator}: {(done.stderr.strip().splitlines() or ['failed'])[-1]}")
        rows += [json.loads(line) for line in done.stdout.splitlines() if line.startswith("{")]
        print(f"{allocator}: {len(rows)} rows so far", flush=True)
    at = {(row["model"], row["allocator"], row["resolution"]): row for row in rows}
    capability = sorted({row["capability"] for row in rows})
    isa = ("native" if args.isa == "native" else
           f"limited to AVX2 ({', '.join(f'{k}={v}' for k, v in ISA_LIMITS[args.isa].items())}): a proxy on this CPU "
           f"for an AVX2-only one's instruction set, not for its cores, caches or memory")
    lines = ["# PT2E + Inductor (the server CPU path) vs eager fp32, ResNet-18 at batch 32", "",
             f"CPU: {cpu_name()}. {args.threads} thread(s); median of 2 blocks of {args.repeats} calls in a row per "
             f"engine (eager, compiled, compiled, eager; a warm-up call before each block) in one process; one "
             f"process per allocator setting. ISA: {isa}; torch's CPU capability in the timed processes: "
             f"{', '.join(capability)}. "
             f"Command: `python tools/bench_pt2e_server.py {' '.join(sys.argv[1:])}`.", "",
             "| model | px | eager fp32, default (ms) | PT2E, default (ms) | speed-up | eager fp32, kept (ms) | "
             "PT2E, kept (ms) | speed-up |", "|:---|---:|---:|---:|---:|---:|---:|---:|"]
    for model in models:
        for r in resolutions:
            d, k = at[model, "default", r], at[model, "kept", r]
            lines.append(f"| {model} | {r} | {d['eager_ms']:.1f} | {d['compiled_ms']:.1f} | "
                         f"{d['eager_ms'] / d['compiled_ms']:.2f}x | {k['eager_ms']:.1f} | {k['compiled_ms']:.1f} | "
                         f"{k['eager_ms'] / k['compiled_ms']:.2f}x |")
    lines += ["", "Speed-up of PT2E + Inductor over eager fp32 (range over resolutions; goal on AMX/VNNI CPUs: 8x):", ""]
    for model in models:
        for allocator, label in ALLOCATORS.items():
            ups = [at[model, allocator, r]["eager_ms"] / at[model, allocator, r]["compiled_ms"] for r in resolutions]
            lines.append(f"- {model}, {label}: {min(ups):.2f}-{max(ups):.2f}x")
    write_outputs(args.out, lines, {"settings": vars(args), "cpu": cpu_name(), "rows": rows})


if __name__ == "__main__":
    main()
