"""Tables of finished runs (`rsq report`, `rsq compare`) from their results.json files."""
from __future__ import annotations

import json
import math
from pathlib import Path
from typing import Optional

import pandas as pd

from .errors import RsqError, choices_error
from .evaluate import quant_text
from .latency import run_latency

FORMATS = ("md", "csv", "json")
RESULTS_KIND = "rsq-results"
FORMAT_VERSION = 1
_INT_COLUMNS = ("macs", "bitops", "weight_size_bits", "params")


# --- loading -----------------------------------------------------------------------------------

def _is_number(value, types) -> bool:
    return isinstance(value, types) and not isinstance(value, bool)


def load_run(path) -> dict:
    """The results of one run folder, validated; ``run_dir`` is added for later look-ups."""
    folder = Path(path)
    if not folder.exists():
        raise RsqError(f"run folder {str(folder)!r} does not exist")
    results = folder / "results.json"
    if not results.is_file():
        if (folder / "config.toml").is_file():
            raise RsqError(f"run {str(folder)!r} has no results yet (training not finished?)")
        raise RsqError(f"{str(folder)!r} is not an rsq run folder (no results.json)")
    try:
        run = json.loads(results.read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as exc:
        raise RsqError(f"{results} is not valid JSON: {exc}") from None
    if not isinstance(run, dict) or run.get("kind") != RESULTS_KIND:
        raise RsqError(f"{results} is not an rsq results file (no \"kind\": \"{RESULTS_KIND}\")")
    if run.get("format_version") != FORMAT_VERSION:
        raise RsqError(f"{results} has format_version {run.get('format_version')!r}; "
                       f"this rsq reads version {FORMAT_VERSION}")
    rows = run.get("rows")
    if not isinstance(rows, list) or not rows:
        raise RsqError(f"{results} has no result rows")
    for i, row in enumerate(rows):
        for key in ("resolution", "bits", "top1"):
            if not isinstance(row, dict) or row.get(key) is None:
                raise RsqError(f"{results}: row {i} lacks {key!r}")
        if not _is_number(row["resolution"], int) or not _is_number(row["top1"], (int, float)):
            raise RsqError(f"{results}: row {i} has resolution {row['resolution']!r} and top1 "
                           f"{row['top1']!r}; both must be numbers")
    run["run_dir"] = str(folder)
    run.setdefault("run", folder.resolve().name)
    return run


# --- tables ------------------------------------------------------------------------------------

def _sorted_rows(run: dict) -> list[dict]:
    # Highest precision first, then largest resolution: the order the paper's tables use.
    return sorted(run["rows"], key=lambda r: (-(r.get("weight_bits") or 0),
                                              -(r.get("act_bits") or 0), -int(r["resolution"])))


def _frame(records: list[dict], columns: list[str]) -> pd.DataFrame:
    data = {}
    for col in columns:
        values = [rec.get(col) for rec in records]
        if col in _INT_COLUMNS:
            data[col] = pd.array(values, dtype="Int64")
        elif col == "calibrated":
            data[col] = pd.array(values, dtype="boolean")
        elif col in ("resolution", "bits", "run", "data", "vs"):
            data[col] = pd.Series(values, dtype=object)
        else:
            data[col] = pd.array([math.nan if v is None else float(v) for v in values],
                                 dtype="float64")
    df = pd.DataFrame(data, columns=columns)
    df.attrs["notes"] = []
    return df


def run_table(run: dict, latency: Optional[dict] = None) -> pd.DataFrame:
    """One row per (resolution, bits) plus an "ensemble" row; ``latency`` maps resolution to ms."""
    columns = ["resolution", "bits", "top1", "top5", "macs", "bitops", "weight_size_bits",
               "params", "calibrated"] + (["latency_ms"] if latency is not None else [])
    records = [dict(row, latency_ms=(latency or {}).get(int(row["resolution"])))
               for row in _sorted_rows(run)]
    if run.get("ensembles"):  # a joint model: one ensemble per bit width
        records += [{"resolution": "ensemble", "bits": label, **metrics} for label, metrics in run["ensembles"].items()]
    elif run.get("ensemble"):
        records.append({"resolution": "ensemble", **run["ensemble"]})
    df = _frame(records, columns)
    df.attrs["title"] = (f"run {run['run']}: {run.get('model', '?')} on {run.get('data', '?')}, "
                         f"{quant_text(run.get('quant') or {})}, {run.get('epochs', '?')} epochs, "
                         f"distill {run.get('distill', '?')}")
    if latency is not None:
        df.attrs["notes"].append("latency: CPU, batch 1, median ms per image after warm-up")
    return df


def run_labels(runs: list[dict]) -> list[str]:
    # Two folders may hold runs of the same name; their folder names tell them apart.
    names = [r["run"] for r in runs]
    if len(set(names)) == len(names):
        return names
    names = [Path(r["run_dir"]).resolve().name for r in runs]
    return [n if names.count(n) == 1 else f"{n} ({i + 1})" for i, n in enumerate(names)]


def _reference(ref_rows: list[dict], row: dict) -> Optional[dict]:
    same_res = [r for r in ref_rows if int(r["resolution"]) == int(row["resolution"])]
    exact = [r for r in same_res if r["bits"] == row["bits"]]
    return (exact or same_res or [None])[0]


def _delta(value, ref) -> Optional[float]:
    if value is None or ref is None:
        return None
    return round(float(value) - float(ref), 4)  # drop float noise such as 0.5199999


def compare_table(runs: list[dict]) -> pd.DataFrame:
    """Runs side by side, grouped by resolution, with top-1/top-5 deltas against the first run."""
    if not runs:
        raise RsqError("compare needs at least one run folder")
    labels = run_labels(runs)
    ref_rows = _sorted_rows(runs[0])
    ref_ens = runs[0].get("ensemble") or {}
    records = []
    for i, (run, label) in enumerate(zip(runs, labels)):
        for row in _sorted_rows(run):
            ref = _reference(ref_rows, row) if i else None
            records.append(dict(row, run=label, data=run.get("data"), order=i,
                                vs=ref["bits"] if ref else None,
                                d_top1=_delta(row["top1"], ref and ref["top1"]),
                                d_top5=_delta(row.get("top5"), ref and ref.get("top5"))))
        ens = run.get("ensemble")
        if ens:
            ref = ref_ens if i and ref_ens else {}
            records.append(dict(ens, resolution="ensemble", run=label, data=run.get("data"),
                                order=i, vs="ensemble" if ref else None,
                                d_top1=_delta(ens.get("top1"), ref.get("top1")),
                                d_top5=_delta(ens.get("top5"), ref.get("top5"))))
    # Group by resolution (largest first, ensembles last) so matching rows sit together.
    records.sort(key=lambda r: (r["resolution"] == "ensemble",
                                -int(r["resolution"]) if r["resolution"] != "ensemble" else 0,
                                r["order"]))
    columns = ["run", "data", "resolution", "bits", "top1", "top5", "d_top1", "d_top5", "vs",
               "macs", "bitops", "weight_size_bits", "calibrated"]
    df = _frame(records, columns)
    df.attrs["title"] = f"{len(runs)} runs; deltas against {labels[0]}"
    df.attrs["notes"].append(f"d_top1/d_top5: against {labels[0]} at the same resolution, "
                             "with the same bits where it has them (bits in column vs)")
    data_sets = {}
    for run, label in zip(runs, labels):
        data_sets.setdefault(run.get("data"), []).append(label)
    if len(data_sets) > 1:
        listing = "; ".join(f"{d}: {', '.join(names)}" for d, names in data_sets.items())
        df.attrs["notes"].append(f"WARNING: runs use different data sets ({listing}); "
                                 "their accuracies are not comparable")
    return df


# --- formatting --------------------------------------------------------------------------------

_MD_NAMES = {"resolution": "res (px)", "top1": "top-1 (%)", "top5": "top-5 (%)",
             "d_top1": "Δ top-1", "d_top5": "Δ top-5", "macs": "MACs", "bitops": "BitOPs",
             "weight_size_bits": "weight size", "latency_ms": "latency (ms)"}


def _si(value: float) -> str:
    for scale, suffix in ((1e12, "T"), (1e9, "G"), (1e6, "M"), (1e3, "K")):
        if abs(value) >= scale:
            return f"{value / scale:.2f} {suffix}"
    return f"{value:.0f}"


def _size(bits: float) -> str:
    size = bits / 8
    for scale, suffix in ((1024 ** 3, "GiB"), (1024 ** 2, "MiB"), (1024, "KiB")):
        if size >= scale:
            return f"{size / scale:.2f} {suffix}"
    return f"{size:.0f} B"


def _md_cell(col: str, value) -> str:
    if value is None or value is pd.NA or (isinstance(value, float) and math.isnan(value)):
        return ""
    if col in ("macs", "bitops", "params"):
        return _si(value)
    if col == "weight_size_bits":
        return _size(value)
    if col in ("d_top1", "d_top5"):
        return f"{value:+.2f}"
    if col in ("top1", "top5", "latency_ms"):
        return f"{value:.2f}"
    if col == "calibrated":
        return "yes" if value else ""
    return str(value)


def check_format(fmt: str) -> str:
    if fmt not in FORMATS:
        raise choices_error("format", fmt, FORMATS)
    return fmt


def format_table(df: pd.DataFrame, fmt: str = "md") -> str:
    """The table as markdown (human units, title and notes), csv or json (raw numbers)."""
    check_format(fmt)
    if fmt == "csv":
        return df.to_csv(index=False)
    if fmt == "json":
        # Round-trip through json so the output is indented the way Python tools expect.
        return json.dumps(json.loads(df.to_json(orient="records")), indent=2) + "\n"
    shown = df
    if "calibrated" in df and not df["calibrated"].fillna(False).any():
        shown = df.drop(columns="calibrated")  # an all-blank column is noise
    cells = pd.DataFrame({col: [_md_cell(col, v) for v in shown[col].tolist()]
                          for col in shown.columns})
    align = ["left" if col in ("run", "data", "bits", "vs", "calibrated") else "right"
             for col in shown.columns]
    table = cells.rename(columns=_MD_NAMES).to_markdown(index=False, disable_numparse=True,
                                                        colalign=align)
    lines = ([f"**{df.attrs['title']}**", ""] if df.attrs.get("title") else []) + [table]
    notes = df.attrs.get("notes") or []
    return "\n".join(lines + ([""] + [f"- {n}" for n in notes] if notes else [])) + "\n"


# --- command line ------------------------------------------------------------------------------

def _emit(text: str, out: Optional[str]) -> None:
    if out is None:
        print(text, end="")
        return
    try:
        Path(out).write_text(text, encoding="utf-8")
    except OSError as exc:
        raise RsqError(f"cannot write {out!r}: {exc.strerror or exc}") from None


def report_run(run_dir, fmt: str = "md", plot: Optional[str] = None, out: Optional[str] = None,
               latency: bool = False, repeats: int = 30, threads: int = 1) -> None:
    """`rsq report`: one run's table (optionally with measured latency) and figure."""
    from .plots import check_plot_path, plot_runs

    check_format(fmt)
    if plot:
        check_plot_path(plot)
    run = load_run(run_dir)
    measured = run_latency(run, repeats, threads) if latency else None
    table = run_table(run, measured)
    if measured is not None:
        table.attrs["notes"][-1] += f", {threads} thread(s), {repeats} timed runs"
    _emit(format_table(table, fmt), out)
    if plot:
        plot_runs([run], plot)


def compare_runs(run_dirs: list[str], fmt: str = "md", plot: Optional[str] = None, out: Optional[str] = None) -> None:
    """`rsq compare`: runs side by side, deltas against the first."""
    from .plots import check_plot_path, plot_runs

    check_format(fmt)
    if plot:
        check_plot_path(plot)
    runs = [load_run(d) for d in run_dirs]
    _emit(format_table(compare_table(runs), fmt), out)
    if plot:
        plot_runs(runs, plot)
