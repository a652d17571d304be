"""One ExecuTorch program for every resolution: bytes and batch-1 latency with the weights shared or folded.

    .venv/bin/python tools/bench_executorch_sharing.py [--out tools/results/bench_executorch_sharing]

Two .pte layouts of the same RS-Net, each with one method per resolution:
  shared   float-weight convs keep rsq's weight and apply their BN after it (a 1x1 depthwise conv),
           so every method reads the same constants, which ExecuTorch stores once (the default);
  folded   each resolution's BN folded into those weights: every method carries its own float32 copy.
Sizes: one method alone, all methods shared, all methods folded (each also for `executorch-exact`, every
conv a float op). Latency: batch 1, one XNNPACK thread, shared, folded and exact (shared) taking turns in
each round, with PyTorch eager fp32 (the dequantized model) beside them. Models: the Fashion-MNIST ResNet-20 RS-Net (28..12, W4A4, trained 8 steps on 512 images: size and
speed do not depend on the weights' values) and the ResNet-18 RS-Net of bench_export.py (224..96,
W4A4, untrained). Writes OUT.md and OUT.json, naming the CPU.
"""
from __future__ import annotations

import argparse
import copy
import os
import shutil
import tempfile
import time
from pathlib import Path

for _name in ("OMP_NUM_THREADS", "OPENBLAS_NUM_THREADS", "MKL_NUM_THREADS"):
    os.environ[_name] = "1"

import torch  # noqa: E402

from bench_export import cpu_description, median_ms, save_results  # noqa: E402
from bench_export_extra import (R18_RESOLUTIONS, executorch_engine, fashion_mnist_checkpoint,  # noqa: E402
                                one_xnnpack_thread, resnet18_checkpoint)


def bench(label: str, checkpoint: Path, in_chans: int, work: Path, repeats: int) -> dict:
    from rsq.checkpoint import load_model
    from rsq.convert import using_mode
    from rsq.export.executorch import _runtime, write_executorch
    from rsq.quantize import dequantize_

    model, ckpt = load_model(checkpoint)
    resolutions = [int(r) for r in ckpt["resolutions"]]
    sizes, build_s, paths = {}, {}, {}
    for name, kwargs, methods in (("one method (shared layout)", {}, resolutions[:1]),
                                  ("all methods, shared", {}, resolutions),
                                  ("all methods, folded", {"share_weights": False}, resolutions),
                                  ("exact: one method", {"int8_gemms": False}, resolutions[:1]),
                                  ("exact: all methods, shared", {"int8_gemms": False}, resolutions),
                                  ("exact: all methods, folded", {"int8_gemms": False, "share_weights": False},
                                   resolutions)):
        start = time.perf_counter()
        paths[name] = write_executorch(model, methods, in_chans, work / f"{len(paths)}.pte", **kwargs)
        build_s[name] = time.perf_counter() - start
        sizes[name] = paths[name].stat().st_size
    programs = {"shared": _runtime().load_program(paths["all methods, shared"]),
                "folded": _runtime().load_program(paths["all methods, folded"]),
                "exact": _runtime().load_program(paths["exact: all methods, shared"])}
    float_model = dequantize_(copy.deepcopy(model)).eval()
    rows = []
    for r in resolutions:
        x = torch.randn(1, in_chans, r, r).numpy()
        engines = {name: executorch_engine(program, r, x) for name, program in programs.items()}

        def eager(r=r, image=torch.from_numpy(x)):
            with torch.no_grad(), using_mode(float_model, r):
                return float_model(image)
        engines["torch fp32"] = eager
        rows.append({"resolution": r, "ms": median_ms(engines, dict.fromkeys(engines, repeats))})
    return {"label": label, "sizes": sizes, "build_s": build_s, "rows": rows, "repeats": repeats}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--out", default="tools/results/bench_executorch_sharing")
    parser.add_argument("--repeats", type=int, default=60, help="timed calls per engine (ResNet-18: a quarter)")
    args = parser.parse_args()
    torch.set_num_threads(1)
    one_xnnpack_thread()
    work = Path(tempfile.mkdtemp(prefix="bench_executorch_sharing."))
    try:
        (work / "a").mkdir()
        fmnist = fashion_mnist_checkpoint(work / "a" / "fmnist", 4, lr=0.05)
        results = [bench("resnet20 W4A4 (Fashion-MNIST, 28..12)", fmnist, 1, work / "a", args.repeats)]
        (work / "b").mkdir()
        ckpt = resnet18_checkpoint(work / "b" / "checkpoint.pt", R18_RESOLUTIONS, 4)
        results.append(bench("resnet18 W4A4 (random weights, 224..96)", ckpt, 3, work / "b",
                             max(5, args.repeats // 4)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(args, results)


def write_report(args, results) -> None:
    import sys
    cpu = cpu_description()
    lines = ["# ExecuTorch: one program, weights shared by every resolution's method", "",
             f"`tools/bench_executorch_sharing.py {' '.join(sys.argv[1:])}`", "", f"CPU: {cpu}.", "",
             "Settings: batch 1; one thread (XNNPACK threadpool 1, torch 1); the engines take turns within each "
             "round, median of the timed calls, each timed call after an untimed one of the same engine "
             "(bench_export.median_ms); shared = float-weight convs apply their BN "
             "after rsq's weight as a 1x1 depthwise conv (the default), folded = BN folded into them per method; "
             "exact = `executorch-exact` (every conv a float op).", ""]
    for m in results:
        one = m["sizes"]["one method (shared layout)"]
        lines += [f"## {m['label']}", "", "| program | bytes | / one method |", "|:---|---:|---:|"]
        for name, size in m["sizes"].items():
            base = m["sizes"]["exact: one method"] if name.startswith("exact") else one
            lines.append(f"| {name} | {size} | {size / base:.2f}x |")
        lines += ["", f"{m['repeats']} timed calls per engine; ms per image:", "",
                  "| resolution | shared | folded | exact (shared) | torch fp32 | shared / folded | torch fp32 / shared "
                  "| torch fp32 / exact |",
                  "|---:|---:|---:|---:|---:|---:|---:|---:|"]
        for row in m["rows"]:
            ms = row["ms"]
            lines.append(f"| {row['resolution']} | {ms['shared']:.3f} | {ms['folded']:.3f} | {ms['exact']:.3f} | "
                         f"{ms['torch fp32']:.3f} | {ms['shared'] / ms['folded']:.2f}x | "
                         f"{ms['torch fp32'] / ms['shared']:.2f}x | {ms['torch fp32'] / ms['exact']:.2f}x |")
        lines.append("")
    save_results(args.out, lines, cpu, results=results)


if __name__ == "__main__":
    main()
