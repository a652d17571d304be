"""The C export (`rsq export --format c`): latency of one image, RAM (arena) and flash per resolution.

    .venv/bin/python tools/bench_c_export.py [--resnet18] [--repeats 30] [--out tools/results/bench_c_export]

Models: the Fashion-MNIST ResNet-20 RS-Net (28/24/20/16/12 px) at W8A8, W4A4 and W2A2, each trained 8 steps
(latency and memory do not depend on how well a model is trained), and with --resnet18 a ResNet-18 RS-Net
at W4A4, 224/192/160/128/96 px (untrained, quantizers and BN initialised). Per resolution, one image per
call, one thread, the engines taking turns (median ms):
  C -O3                 the C runtime, compiled for any x86-64 (the compiler's baseline instruction set)
  C -O3 -march=native   the same sources compiled for this CPU
  rsq.runtime           the numpy reference runtime (exact float32 GEMM where provably exact)
  torch fp32            PyTorch eager on the float (dequantized) model
The C runtime's integer logits are checked identical to rsq.runtime's on the timed images. Memory: the arena
(activations, planned by lifetime, plus scratch for one conv's unpacked weights) per resolution, and flash:
the compiled model object's text + data (`size`), the runtime's object, and the weights bit-packed.
"""
from __future__ import annotations

import argparse
import copy
import os
import subprocess
import sys
import tempfile
import time
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parent))
from bench_export import cpu_description, median_ms, save_results  # noqa: E402
from bench_export_extra import fashion_mnist_checkpoint, resnet18_checkpoint  # noqa: E402

NATIVE = ("-march=native",)


def object_bytes(source: Path, work: Path) -> int:
    """text + data of ``source`` compiled with the runtime's flags: what it puts in flash."""
    from rsq.runtime.native import CFLAGS, require_compiler
    obj = work / (source.stem + ".o")
    subprocess.run([require_compiler(), *CFLAGS, "-c", "-o", str(obj), str(source)], check=True)
    fields = subprocess.run(["size", str(obj)], capture_output=True, text=True, check=True).stdout.splitlines()[1]
    text, data = (int(v) for v in fields.split()[:2])
    return text + data


def bench_checkpoint(checkpoint: Path, label: str, images, work: Path, repeats: int) -> dict:
    import json

    from rsq.checkpoint import load_model
    from rsq.convert import using_mode
    from rsq.data.multires import resize_batch
    from rsq.export import export_checkpoint
    from rsq.quantize import dequantize_
    from rsq.runtime import Runtime, load
    from rsq.runtime.native import NativeRuntime

    model, _ = load_model(checkpoint)
    export = work / "export"
    start = time.perf_counter()
    export_checkpoint(checkpoint, "c", export)
    export_s = time.perf_counter() - start
    export_checkpoint(checkpoint, "packed", export)
    start = time.perf_counter()
    engines = {"C -O3": NativeRuntime(export / "c"), "C -O3 -march=native": NativeRuntime(export / "c", NATIVE)}
    compile_s = (time.perf_counter() - start) / 2
    runtime = Runtime(load(export / "packed"), gemm="float")
    float_model = dequantize_(copy.deepcopy(model)).eval()
    memory = json.loads((export / "c" / "memory.json").read_text())
    flash = {"model object (text + data)": object_bytes(export / "c" / "rsq_model.c", work),
             "runtime object (text + data)": object_bytes(export / "c" / "rsq_runtime.c", work),
             "weights, bit-packed": memory["weight_bytes"]}
    rows = []
    for r in runtime.model.resolutions:
        x = resize_batch(images, r).numpy()[:1]
        reference = runtime.run(x, r)
        for name, engine in engines.items():
            if not np.array_equal(engine.run(x, r), reference):
                raise SystemExit(f"{label} at {r} px: {name} logits differ from rsq.runtime's")

        def eager(r=r, xt=torch.from_numpy(x)):
            with torch.no_grad(), using_mode(float_model, r):
                return float_model(xt)
        calls = {name: (lambda e=e, r=r: e.run(x, r)) for name, e in engines.items()}
        calls["rsq.runtime"] = lambda r=r: runtime.run(x, r)
        calls["torch fp32"] = eager
        ms = median_ms(calls, dict.fromkeys(calls, repeats))
        rows.append({"resolution": r, "ms": ms, **memory["resolutions"][str(r)]})
        print(label, r, {k: round(v, 3) for k, v in ms.items()}, memory["resolutions"][str(r)], flush=True)
    return {"label": label, "rows": rows, "flash": flash, "export_s": export_s, "compile_s": compile_s}


def report(args, cpu: str, results: list[dict]) -> list[str]:
    engines = list(results[0]["rows"][0]["ms"])
    lines = ["# The C export: latency, RAM and flash per resolution", "",
             f"`tools/bench_c_export.py{' --resnet18' if args.resnet18 else ''} --repeats {args.repeats}`", "",
             f"CPU: {cpu}.", "",
             f"Settings: one image per call, one thread (torch.set_num_threads(1), BLAS threads 1), the engines taking "
             f"turns, each timed warm; median of {args.repeats} timed calls per engine "
             f"({args.r18_repeats} for ResNet-18). gcc flags: {' '.join(_cflags())} (+ -march=native where named). "
             f"torch {torch.__version__}. The C runtime's integer logits equal rsq.runtime's on every timed image "
             "(checked before timing).", ""]
    for result in results:
        lines += [f"## {result['label']}", "",
                  "| resolution | " + " | ".join(f"{e} (ms)" for e in engines)
                  + " | C -O3 -march=native speed-up over torch fp32 | arena bytes (activations + scratch) |",
                  "|---:|" + "---:|" * (len(engines) + 2)]
        for row in result["rows"]:
            ms = row["ms"]
            lines.append(f"| {row['resolution']} | " + " | ".join(f"{ms[e]:.3f}" for e in engines)
                         + f" | {ms['torch fp32'] / ms['C -O3 -march=native']:.2f}x"
                         + f" | {row['arena_bytes']} ({row['activation_bytes']} + {row['scratch_bytes']}) |")
        lines += ["", "| flash | bytes |", "|:---|---:|"]
        lines += [f"| {k} | {v} |" for k, v in result["flash"].items()]
        lines += ["", f"Export (C source written): {result['export_s']:.1f} s; compile (gcc, shared library): "
                      f"{result['compile_s']:.1f} s.", ""]
    return lines


def _cflags():
    from rsq.runtime.native import CFLAGS
    return CFLAGS


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--resnet18", action="store_true")
    parser.add_argument("--repeats", type=int, default=30)
    parser.add_argument("--r18-repeats", type=int, default=5)
    parser.add_argument("--out", default="tools/results/bench_c_export")
    args = parser.parse_args()
    torch.set_num_threads(1)
    cpu = cpu_description()
    from rsq.data import fashion_mnist
    x, _ = fashion_mnist.load("test", None)
    images = (x[:8].float() / 255 - fashion_mnist.MEAN[0]) / fashion_mnist.STD[0]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        for bits in (8, 4, 2):
            run = fashion_mnist_checkpoint(work / f"w{bits}" / "run", bits)
            results.append(bench_checkpoint(run, f"Fashion-MNIST ResNet-20, W{bits}A{bits} (first/last 8)", images,
                                            work / f"w{bits}" / "bench", args.repeats))
        if args.resnet18:
            ckpt = resnet18_checkpoint(work / "r18" / "checkpoint.pt")
            torch.manual_seed(0)
            results.append(bench_checkpoint(ckpt, "ResNet-18 RS-Net, W4A4 (first/last 8), random images",
                                            torch.randn(1, 3, 224, 224), work / "r18" / "bench", args.r18_repeats))
    save_results(args.out, report(args, cpu, results), cpu, settings=vars(args), results=results)


if __name__ == "__main__":
    main()
