"""The switchable ONNX graph (onnx/model.onnx: every resolution, the input's size picks one) against the
per-resolution graphs (onnx/model_rR.onnx): time per call and bytes, in one process.

    .venv/bin/python tools/bench_onnx_switchable.py [--bits 4,8] [--resnet18] [--repeats 200]
        [--out tools/results/bench_onnx_switchable]

Models: the default Fashion-MNIST ResNet-20 RS-Net (28/24/20/16/12) trained 8 steps per bit width (timing
and size do not depend on how well it is trained), and with ``--resnet18`` the untrained,
quantizer-initialised ResNet-18 RS-Net at 224/192/160/128/96 of bench_export.py (batch 1 only: the exact
graph's int64 requantization makes batch 32 take seconds). ``--repeats`` timed calls at batch 1, an eighth as
many at batch 32 (at least 5). onnxruntime, one thread; at each resolution
and batch the per-resolution graph and the switchable one take turns, each call timed warm
(bench_export.median_ms). The switchable graph pays for gathering its tables (``Gather`` of the running
resolution's row) and for the requantization arithmetic on them that onnxruntime can no longer fold
when it loads the graph.
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

from bench_export import cpu_description, median_ms, save_results  # noqa: E402


def _session(path: Path):
    import onnxruntime as ort
    options = ort.SessionOptions()
    options.intra_op_num_threads = 1
    options.log_severity_level = 3
    return ort.InferenceSession(str(path), options, providers=["CPUExecutionProvider"])


def bench(name: str, checkpoint: Path, work: Path, batches, repeats: int) -> dict:
    from rsq.checkpoint import checkpoint_config
    from rsq.export import export_checkpoint
    export_checkpoint(checkpoint, "onnx", work / "export")
    folder = work / "export" / "onnx"
    config = checkpoint_config(torch.load(checkpoint if checkpoint.is_file() else checkpoint / "checkpoint.pt",
                                          map_location="cpu", weights_only=False))
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
                           dict.fromkeys(("one", "switchable"), repeats if batch == 1 else max(repeats // 8, 5)))
            rows.append({"resolution": r, "batch": batch, "one_ms": ms["one"], "switchable_ms": ms["switchable"],
                         "ratio": ms["switchable"] / ms["one"], "identical": same})
    weights = (folder / "weights.bin").stat().st_size
    per_resolution = sum((folder / f"model_r{r}.onnx").stat().st_size for r in config.resolutions)
    size = {"weights_bytes": weights, "one_graph_bytes": (folder / f"model_r{config.resolutions[0]}.onnx").stat().st_size,
            "all_graphs_bytes": per_resolution, "switchable_bytes": (folder / "model.onnx").stat().st_size}
    return {"model": name, "bits": f"W{config.weight_bits}A{config.act_bits}", "resolutions": config.resolutions,
            "rows": rows, "size": size}


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
            from rsq.config import TrainConfig
            from rsq.train import train
            run = work / f"fmnist_w{bits}"
            train(TrainConfig(weight_bits=bits, act_bits=bits, subset=512, test_subset=64, epochs=1, batch_size=64,
                              out=str(run), device="cpu"), overwrite=True)
            (work / f"w{bits}").mkdir()
            results.append(bench("resnet20", run, work / f"w{bits}", (1, 32), args.repeats))
        if args.resnet18:
            from bench_export_extra import R18_RESOLUTIONS, resnet18_checkpoint
            (work / "r18").mkdir()
            ckpt = resnet18_checkpoint(work / "r18" / "checkpoint.pt", R18_RESOLUTIONS, 4)
            results.append(bench("resnet18 (random weights)", ckpt, work / "r18", (1,), max(args.repeats // 10, 5)))
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(args, results)


def write_report(args, results) -> None:
    cpu = cpu_description()
    lines = ["# One switchable ONNX graph against one graph per resolution", "",
             f"`tools/bench_onnx_switchable.py {' '.join(sys.argv[1:])}`", "", f"CPU: {cpu}.", "",
             "onnxruntime CPU, one thread; per resolution and batch the two graphs take turns, each call timed warm "
             "(median ms). identical: the switchable graph's outputs (float and int32 logits) equal the "
             "per-resolution graph's on the timed input. Sizes: weights.bin is shared by every graph.", ""]
    for r in results:
        s = r["size"]
        one = s["weights_bytes"] + s["one_graph_bytes"]
        lines += [f"## {r['model']} {r['bits']}, resolutions {'/'.join(map(str, r['resolutions']))}", "",
                  f"Bytes: weights.bin {s['weights_bytes']}; one resolution's graph {s['one_graph_bytes']}; every "
                  f"per-resolution graph {s['all_graphs_bytes']}; the switchable graph {s['switchable_bytes']}. "
                  f"Every resolution against one (both with weights.bin): per-resolution graphs "
                  f"{(s['weights_bytes'] + s['all_graphs_bytes']) / one:.2f}x, switchable "
                  f"{(s['weights_bytes'] + s['switchable_bytes']) / one:.2f}x.", "",
                  "| resolution | batch | model_rR.onnx (ms) | model.onnx (ms) | switchable / one | identical |",
                  "|---:|---:|---:|---:|---:|:---|"]
        lines += [f"| {row['resolution']} | {row['batch']} | {row['one_ms']:.3f} | {row['switchable_ms']:.3f} | "
                  f"{row['ratio']:.2f}x | {'yes' if row['identical'] else 'NO'} |" for row in r["rows"]] + [""]
    save_results(args.out, lines, cpu, results=results)


if __name__ == "__main__":
    main()
