"""Accuracy-vs-cost figures of finished runs (`rsq report/compare --plot`)."""
from __future__ import annotations

from pathlib import Path

from .errors import RsqError, choices_error
from .report import run_labels

PLOT_SUFFIXES = (".png", ".pdf", ".svg")
_MARKERS = ("o", "s", "^", "D", "v", "P")
_LINESTYLES = ("-", "--", ":", "-.")


def check_plot_path(path) -> Path:
    path = Path(path)
    if path.suffix.lower() not in PLOT_SUFFIXES:
        raise choices_error("plot file type", path.suffix or str(path), PLOT_SUFFIXES)
    if not path.parent.is_dir():
        raise RsqError(f"cannot write plot {str(path)!r}: "
                       f"folder {str(path.parent)!r} does not exist")
    return path


def _curves(runs: list[dict]):
    """(label, colour index, bits index, rows sorted by resolution) per (run, bits)."""
    for i, (run, name) in enumerate(zip(runs, run_labels(runs))):
        by_bits: dict[str, list[dict]] = {}
        for row in run["rows"]:
            by_bits.setdefault(row["bits"], []).append(row)
        for j, (bits, rows) in enumerate(by_bits.items()):
            rows = sorted(rows, key=lambda r: int(r["resolution"]))
            yield f"{name} {bits}", i, j, rows


def plot_runs(runs: list[dict], path) -> Path:
    """Two panels: top-1 vs BitOPs (log x, points labelled by resolution), top-1 vs resolution."""
    # The Figure API (no pyplot) renders with Agg and leaves the caller's backend alone.
    from matplotlib import colormaps
    from matplotlib.figure import Figure

    path = check_plot_path(path)
    if not runs:
        raise RsqError("plotting needs at least one run")
    fig = Figure(figsize=(13, 5.5), layout="constrained")
    ax_ops, ax_res = fig.subplots(1, 2)
    colours = colormaps["tab10"].colors
    any_calibrated = False
    for label, i, j, rows in _curves(runs):
        style = dict(color=colours[i % len(colours)], linestyle=_LINESTYLES[j % len(_LINESTYLES)],
                     marker=_MARKERS[j % len(_MARKERS)], markersize=6, label=label)
        res = [int(r["resolution"]) for r in rows]
        top1 = [float(r["top1"]) for r in rows]
        ax_res.plot(res, top1, **style)
        costed = [r for r in rows if r.get("bitops")]
        ax_ops.plot([r["bitops"] for r in costed], [float(r["top1"]) for r in costed], **style)
        for r in costed:
            ax_ops.annotate(str(r["resolution"]), (r["bitops"], float(r["top1"])),
                            textcoords="offset points", xytext=(5, 5), fontsize=8,
                            color=style["color"])
        for ax, xs in ((ax_res, rows), (ax_ops, costed)):
            hollow = [r for r in xs if r.get("calibrated")]
            any_calibrated |= bool(hollow)
            ax.scatter([int(r["resolution"]) if ax is ax_res else r["bitops"] for r in hollow],
                       [float(r["top1"]) for r in hollow], s=60, marker=style["marker"],
                       facecolors="white", edgecolors=style["color"], zorder=3)
    ax_ops.set_xscale("log")
    ax_ops.set(title="Top-1 accuracy vs. compute (labels: input resolution)",
               xlabel="BitOPs (log scale)", ylabel="top-1 (%)")
    all_res = sorted({int(r["resolution"]) for run in runs for r in run["rows"]})
    ax_res.set_xticks(all_res)
    ax_res.set(title="Top-1 accuracy vs. input resolution", xlabel="input resolution (px)",
               ylabel="top-1 (%)")
    for ax in (ax_ops, ax_res):
        ax.grid(True, which="major", alpha=0.3)
        ax.legend(fontsize=8, loc="best", title="run, bits", title_fontsize=8)
    data_sets = sorted({str(run.get("data")) for run in runs})
    title = f"data: {', '.join(data_sets)}"
    if len(data_sets) > 1:
        title = f"WARNING: runs use different data sets ({', '.join(data_sets)})"
    if any_calibrated:
        title += "  |  open markers: resolutions calibrated after training"
    fig.suptitle(title, fontsize=11, color="firebrick" if len(data_sets) > 1 else "black")
    try:
        fig.savefig(path, dpi=120)
    except OSError as exc:
        raise RsqError(f"cannot write plot {str(path)!r}: {exc.strerror or exc}") from None
    return path
