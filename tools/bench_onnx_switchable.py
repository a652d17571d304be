"""The switchable ONNX models (model.onnx: every resolution, the input's size picks one) against the
per-resolution graphs (model_rR.onnx), for the exact `onnx` and the fast `qlinear` format: time per call and
bytes, in one process.

    .venv/bin/python tools/bench_onnx_switchable.py [--bits 4,8] [--resnet18] [--repeats 200]
        [--out tools/results/bench_onnx_switchable]

Models: the default Fashion-MNIST ResNet-20 RS-Net (28/24/20/16/12) trained 8 steps per bit width (timing
and size do not depend on how well it is trained), and with ``--resnet18`` the untrained,
quantizer-initialised ResNet-18 RS-Net at 224/192/160/128/96 of bench_export.py (its exact graph at batch
1 only: the int64 requantization makes batch 32 take seconds). ``--repeats`` timed calls at batch 1, an
eighth as many at batch 32 (at least 5); for ResNet-18 a tenth as many at either batch. onnxruntime, one thread; at each
resolution and batch the per-resolution graph and the switchable one take turns, each call timed warm
(bench_export.median_ms). The exact switchable graph pays for gathering its tables (``Gather`` of the
running resolution's row) and for the requantization arithmetic on them that onnxruntime can no longer
fold when it loads the graph; the QLinear one (an If per resolution) for choosing its branch.
"""
from __future__ import annotations

import argparse
import os
import shutil
import sys
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import numpy as np  # noqa: E402
import torch  # noqa: E402

from bench_export import cpu_description, median_ms, onnx_folder_bytes, save_results  # noqa: E402


def _session(path: Path):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench(name: str, checkpoint: Path, work: Path, batches: dict, repeats: dict, synthetic: bool) -> list[dict]:
    """One result per format (onnx, qlinear) of ``checkpoint``; ``batches[fmt]``: the batch sizes to time,
    ``repeats[batch]``: the timed calls of each graph at that batch."""
    from rsq.checkpoint import checkpoint_config, load_model
    from rsq.export import export_checkpoint
    model, ckpt = load_model(checkpoint)
    config = checkpoint_config(ckpt)
    export_checkpoint(checkpoint, "onnx", work / "export")
    if synthetic:  # no data set to calibrate the QLinear grids on: random images, as bench_export does
        from bench_export import write_synthetic_qlinear
        write_synthetic_qlinear(model, config, None, work / "export" / "qlinear")
    else:
        export_checkpoint(checkpoint, "qlinear", work / "export")
    return [bench_format(name, config, work / "export" / fmt, fmt, batches[fmt], repeats) for fmt in ("onnx", "qlinear")]


def bench_format(name: str, config, folder: Path, fmt: str, batches, repeats: dict) -> dict:
    switchable = _session(folder / "model.onnx")
    in_chans = switchable.get_inputs()[0].shape[1]
    rng = np.random.default_rng(0)
    rows = []
    for r in config.resolutions:
        one = _session(folder / f"model_r{r}.onnx")
        for batch in batches:
            x = rng.standard_normal((batch, in_chans, r, r)).astype(np.float32)
            same = all(np.array_equal(a, b) for a, b in zip(one.run(None, {"input": x}), switchable.run(None, {"input": x})))
            ms = median_ms({"one": lambda: one.run(None, {"input": x}),
                            "switchable": lambda: switchable.run(None, {"input": x})},
                           dict.fromkeys(("one", "switchable"), repeats[batch]))
            rows.append({"resolution": r, "batch": batch, "one_ms": ms["one"], "switchable_ms": ms["switchable"],
                         "ratio": ms["switchable"] / ms["one"], "identical": same})
    stored = onnx_folder_bytes(folder)
    size = {"shared_bytes": stored["shared"], "all_graphs_bytes": stored["graphs"],
            "switchable_bytes": stored["switchable"],
            "one_graph_bytes": (folder / f"model_r{config.resolutions[0]}.onnx").stat().st_size}
    return {"model": name, "format": fmt, "bits": f"W{config.weight_bits}A{config.act_bits}",
            "resolutions": config.resolutions, "rows": rows, "size": size}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--bits", default="4,8")
    parser.add_argument("--resnet18", action="store_true")
    parser.add_argument("--repeats", type=int, default=200)
    parser.add_argument("--out", default="tools/results/bench_onnx_switchable")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_onnx_switchable."))
    results = []
    try:
        for bits in [int(b) for b in args.bits.split(",") if b]:
            from bench_export_extra import fashion_mnist_checkpoint
            run = fashion_mnist_checkpoint(work / f"fmnist_w{bits}", bits)
            (work / f"w{bits}").mkdir()
            results += bench("resnet20", run, work / f"w{bits}", {"onnx": (1, 32), "qlinear": (1, 32)},
                             {1: args.repeats, 32: max(args.repeats // 8, 5)}, synthetic=False)
        if args.resnet18:
            from bench_export_extra import R18_RESOLUTIONS, resnet18_checkpoint
            (work / "r18").mkdir()
            ckpt = resnet18_checkpoint(work / "r18" / "checkpoint.pt", R18_RESOLUTIONS, 4)
            results += bench("resnet18 (random weights)", ckpt, work / "r18", {"onnx": (1,), "qlinear": (1, 32)},
                             dict.fromkeys((1, 32), max(args.repeats // 10, 5)), synthetic=True)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(args, results)


def write_report(args, results) -> None:
    cpu = cpu_description()
    lines = ["# One switchable ONNX model against one graph per resolution", "",
             f"`tools/bench_onnx_switchable.py {' '.join(sys.argv[1:])}`", "", f"CPU: {cpu}.", "",
             "onnxruntime CPU, one thread; per resolution and batch the two graphs take turns, each call timed warm "
             "(median ms). identical: the switchable model's outputs (both of them) equal the "
             "per-resolution graph's on the timed input. Sizes: the shared files (weights.bin, and ranges.json "
             "for qlinear) serve every graph. onnx/model.onnx holds every resolution's tables stacked and "
             "gathers the running one's; qlinear/model.onnx holds every resolution's graph as an If branch.", ""]
    for r in results:
        s = r["size"]
        one = s["shared_bytes"] + s["one_graph_bytes"]
        lines += [f"## {r['format']}: {r['model']} {r['bits']}, resolutions {'/'.join(map(str, r['resolutions']))}", "",
                  f"Bytes: shared files {s['shared_bytes']}; one resolution's graph {s['one_graph_bytes']}; every "
                  f"per-resolution graph {s['all_graphs_bytes']}; model.onnx {s['switchable_bytes']}. "
                  f"Every resolution against one (all with the shared files): per-resolution graphs "
                  f"{(s['shared_bytes'] + s['all_graphs_bytes']) / one:.2f}x, model.onnx "
                  f"{(s['shared_bytes'] + s['switchable_bytes']) / one:.2f}x.", "",
                  "| resolution | batch | model_rR.onnx (ms) | model.onnx (ms) | switchable / one | identical |",
                  "|---:|---:|---:|---:|---:|:---|"]
        lines += [f"| {row['resolution']} | {row['batch']} | {row['one_ms']:.3f} | {row['switchable_ms']:.3f} | "
                  f"{row['ratio']:.2f}x | {'yes' if row['identical'] else 'NO'} |" for row in r["rows"]] + [""]
    save_results(args.out, lines, cpu, results=results)


if __name__ == "__main__":
    main()
