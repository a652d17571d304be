"""Bytes on disk of every integer export format: all resolutions together against one resolution.

    .venv/bin/python tools/bench_export_sizes.py [CKPT ...] [--fmnist-bits 4,8] [--resnet18]
        [--out tools/results/bench_export_sizes]

Sizes do not depend on how well a model is trained, only on its layers, bit widths and resolutions, so
briefly trained checkpoints do: ``--fmnist-bits`` trains the default Fashion-MNIST ResNet-20 RS-Net
(28/24/20/16/12) for 8 steps per bit width, ``--resnet18`` adds the untrained, quantizer-initialised
ResNet-18 RS-Net of bench_export.py. Per checkpoint and format (onnx, qlinear, packed): the folder with every resolution;
one resolution as a device would ship it (its graph, or its tables, plus the shared weights); the
ratio of the two (the export issue's goal: five resolutions at most 1.2x one). The onnx folder is
counted twice: its per-resolution graphs with weights.bin ("onnx"), and its switchable graph
model.onnx (every resolution in one graph) with weights.bin ("onnx switchable"); the qlinear folder
likewise. Then the floor of that
ratio for int8-container weights: what the per-resolution tables weigh at their least (int32 bias
and m0 and an 8-bit shift per channel, and the scalars), which no format with int8 weights and
one set of tables per resolution can go below.
"""
from __future__ import annotations

import argparse
import os
import shutil
import tempfile
from pathlib import Path

os.environ.setdefault("OMP_NUM_THREADS", "1")

import torch  # noqa: E402

from bench_export import cpu_description, folder_size, onnx_folder_bytes, save_results  # noqa: E402

FORMATS = ("onnx", "qlinear", "packed")
SHARED = {"onnx": ["weights.bin"], "qlinear": ["weights.bin", "ranges.json"], "packed": ["weights.bin", "manifest.json"]}


def one_resolution_bytes(folder: Path, fmt: str, resolution: int, resolutions: int) -> int:
    """What one resolution needs: its graph and the shared files (onnx, qlinear), or for the packed
    folder (one tables.bin for all) the shared files plus its share of the tables."""
    shared = sum((folder / name).stat().st_size for name in SHARED[fmt] if (folder / name).exists())
    if fmt == "packed":
        return shared + (folder_size(folder) - shared) // resolutions
    return shared + (folder / f"model_r{resolution}.onnx").stat().st_size


def table_bytes(integer_model, resolution: int) -> int:
    """A resolution's tables at their least: 4 bytes per int32 entry (bias, m0, clamps), 1 per shift
    (they span -30..31)."""
    return sum(a.size * (1 if key.startswith("shift") else 4)
               for entries in integer_model.tables[resolution].values() for key, a in entries.items())


def sizes_of(checkpoint: Path, work: Path, synthetic: bool) -> dict:
    from rsq.checkpoint import checkpoint_config, load_model
    from rsq.export import export_checkpoint, lower_checkpoint_model

    model, ckpt = load_model(checkpoint)
    config = checkpoint_config(ckpt)
    integer_model = lower_checkpoint_model(model, config)
    resolutions = integer_model.resolutions
    weights = sum(w.values.size for w in integer_model.weights.values())  # int8 containers: one byte each
    rows = []
    for fmt in FORMATS:
        if fmt == "qlinear" and synthetic:  # no data set to calibrate on: random images, as bench_export does
            from bench_export import write_synthetic_qlinear
            write_synthetic_qlinear(model, config, None, work / fmt)
        else:
            export_checkpoint(checkpoint, fmt, work / "export")
            shutil.move(work / "export" / fmt, work / fmt)
        one = one_resolution_bytes(work / fmt, fmt, resolutions[0], len(resolutions))
        totals = {fmt: folder_size(work / fmt)}
        if fmt in ("onnx", "qlinear"):
            size = onnx_folder_bytes(work / fmt)
            totals = {fmt: size["shared"] + size["graphs"], f"{fmt} switchable": size["shared"] + size["switchable"]}
        rows += [{"format": name, "all_bytes": total, "one_bytes": one, "ratio": total / one}
                 for name, total in totals.items()]
    tables = table_bytes(integer_model, resolutions[0])
    floor = (weights + len(resolutions) * tables) / (weights + tables)
    return {"checkpoint": str(checkpoint), "model": config.model, "bits": f"W{config.weight_bits}A{config.act_bits}",
            "resolutions": resolutions, "int8_weight_bytes": weights, "table_bytes_per_resolution": tables,
            "floor_ratio": floor, "rows": rows}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("checkpoints", nargs="*", help="trained checkpoints or run folders")
    parser.add_argument("--fmnist-bits", default="", help="e.g. 4,8: briefly trained Fashion-MNIST ResNet-20s")
    parser.add_argument("--resnet18", action="store_true", help="also the ResNet-18 RS-Net at 224..96 (random weights)")
    parser.add_argument("--r18-bits", type=int, default=4)
    parser.add_argument("--out", default="tools/results/bench_export_sizes")
    args = parser.parse_args()
    torch.set_num_threads(1)
    work = Path(tempfile.mkdtemp(prefix="bench_export_sizes."))
    results = []
    try:
        checkpoints = list(args.checkpoints)
        for bits in [int(b) for b in args.fmnist_bits.split(",") if b]:
            from bench_export_extra import fashion_mnist_checkpoint
            run = fashion_mnist_checkpoint(work / f"fmnist_w{bits}", bits)
            checkpoints.append(run)
        for i, ckpt in enumerate(checkpoints):
            (work / str(i)).mkdir()
            results.append(sizes_of(Path(ckpt), work / str(i), synthetic=False))
            if i >= len(args.checkpoints):
                results[-1]["checkpoint"] = "trained 8 steps on 512 images, --fmnist-bits"
        if args.resnet18:
            from bench_export_extra import R18_RESOLUTIONS, resnet18_checkpoint
            (work / "r18").mkdir()
            ckpt = resnet18_checkpoint(work / "r18" / "checkpoint.pt", R18_RESOLUTIONS, args.r18_bits)
            (work / "r18" / "sizes").mkdir()
            result = sizes_of(ckpt, work / "r18" / "sizes", synthetic=True)
            result["checkpoint"] = "resnet18 (random weights)"
            results.append(result)
    finally:
        shutil.rmtree(work, ignore_errors=True)
    write_report(args, results)


def write_report(args, results) -> None:
    import sys
    cpu = cpu_description()
    lines = ["# Export sizes: all resolutions against one", "", f"`tools/bench_export_sizes.py {' '.join(sys.argv[1:])}`",
             "", f"CPU: {cpu} (sizes do not depend on it).", "",
             "one resolution = its graph plus the shared weights.bin (and ranges.json for qlinear); for packed, the "
             "shared files plus its share of tables.bin. all resolutions: onnx = every model_rR.onnx + weights.bin; "
             "onnx switchable = model.onnx (one graph, every resolution, the input's size picks it) + weights.bin; "
             "qlinear and qlinear switchable likewise (with ranges.json). "
             "floor = (int8 weights + N x tables) / (int8 weights + tables), "
             "with the tables at their least (9 bytes per channel: int32 bias and m0, 8-bit shift; 4 per scalar) and "
             "no graph: the least a format with int8 weights and one graph per resolution can reach (packed weights "
             "at 4 bits or fewer make one resolution smaller, so its ratio larger; one graph for every resolution "
             "counts its nodes once and can go below it).", ""]
    for r in results:
        lines += [f"## {r['model']} {r['bits']}, {len(r['resolutions'])} resolutions ({r['checkpoint']})", "",
                  f"int8 weights {r['int8_weight_bytes']} bytes; tables {r['table_bytes_per_resolution']} bytes per "
                  f"resolution; floor {r['floor_ratio']:.2f}x", "",
                  "| format | all resolutions (bytes) | one resolution (bytes) | all / one |", "|:---|---:|---:|---:|"]
        lines += [f"| {row['format']} | {row['all_bytes']} | {row['one_bytes']} | {row['ratio']:.2f}x |"
                  for row in r["rows"]] + [""]
    save_results(args.out, lines, cpu, results=results)


if __name__ == "__main__":
    main()
