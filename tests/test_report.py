"""rsq.report / rsq.plots on fabricated run folders."""
import io
import json
import sys
import types

import pandas as pd
import pytest
import torch
from click.testing import CliRunner

from rsq.errors import RsqError
from rsq.plots import plot_runs
from rsq.latency import measure_latency
from rsq.cli import cli
from rsq.report import compare_table, format_table, load_run, run_table

FP = {"label": "FP", "weight_bits": 32, "act_bits": 32, "quantizer": None, "first_last": None}
W4 = {"label": "W4A4", "weight_bits": 4, "act_bits": 4, "quantizer": "lsq", "first_last": "8"}
W8 = {"label": "W8A8", "weight_bits": 8, "act_bits": 8, "quantizer": "lsq", "first_last": "8"}
MACS = {28: 31021952, 24: 22791638, 20: 15827526, 32: 40518467}


def _rows(quant, top1s, calibrated=()):
    bits = quant["weight_bits"] * quant["act_bits"]
    return [{"resolution": r, "bits": quant["label"], "weight_bits": quant["weight_bits"],
             "act_bits": quant["act_bits"], "top1": t, "top5": t + 5, "macs": MACS[r],
             "bitops": MACS[r] * bits, "weight_size_bits": 272186 * quant["weight_bits"],
             "params": 272186, "calibrated": r in calibrated} for r, t in top1s.items()]


def make_run(root, name, rows, quant=W4, data="fashion_mnist", ensemble=(91.5, 99.9)):
    folder = root / name
    folder.mkdir()
    results = {"kind": "rsq-results", "format_version": 1, "run": name, "model": "resnet20",
               "data": data, "num_classes": 10, "in_chans": 1, "epochs": 5, "distill": "full",
               "seed": 0, "quant": quant, "rows": rows,
               "ensemble": dict(zip(("top1", "top5"), ensemble)) if ensemble else None,
               "alpha_weights": {"28": 0.5, "24": 0.5}, "train_time_s": 812.3}
    (folder / "config.toml").write_text("[train]\n")
    (folder / "results.json").write_text(json.dumps(results))
    return folder


@pytest.fixture
def fp_run(tmp_path):
    return make_run(tmp_path, "fp", _rows(FP, {24: 91.0, 28: 92.0}), quant=FP,
                    ensemble=(92.5, 99.9))


@pytest.fixture
def w4_run(tmp_path):
    return make_run(tmp_path, "w4", _rows(W4, {28: 91.25, 24: 90.5, 32: 89.0}, calibrated=(32,)))


# --- loading -----------------------------------------------------------------------------------

def test_load_run_adds_run_dir(w4_run):
    run = load_run(w4_run)
    assert run["run"] == "w4" and run["run_dir"] == str(w4_run) and len(run["rows"]) == 3


def test_folder_without_results_or_config_is_not_a_run(tmp_path):
    with pytest.raises(RsqError, match="is not an rsq run folder \\(no results.json\\)"):
        load_run(tmp_path)


def test_missing_folder_is_named(tmp_path):
    with pytest.raises(RsqError, match="nowhere.*does not exist"):
        load_run(tmp_path / "nowhere")


def test_run_without_results_is_unfinished(tmp_path):
    (tmp_path / "config.toml").write_text("[train]\n")
    with pytest.raises(RsqError, match="has no results yet \\(training not finished\\?\\)"):
        load_run(tmp_path)


@pytest.mark.parametrize("text, message", [
    ("{not json", "is not valid JSON"),
    ('{"kind": "something-else", "format_version": 1, "rows": []}', "not an rsq results file"),
    ("[1, 2]", "not an rsq results file"),
    ('{"kind": "rsq-results", "format_version": 2, "rows": []}', "format_version 2"),
    ('{"kind": "rsq-results", "format_version": 1, "rows": []}', "no result rows"),
    ('{"kind": "rsq-results", "format_version": 1, "rows": [{"resolution": 28, "bits": "FP"}]}',
     "row 0 lacks 'top1'"),
    ('{"kind": "rsq-results", "format_version": 1,'
     ' "rows": [{"resolution": "big", "bits": "FP", "top1": 1.0}]}', "resolution 'big'"),
])
def test_bad_results_files(tmp_path, text, message):
    (tmp_path / "results.json").write_text(text)
    with pytest.raises(RsqError, match=message):
        load_run(tmp_path)


# --- tables ------------------------------------------------------------------------------------

def test_run_table_rows_ensemble_and_raw_numbers(w4_run):
    df = run_table(load_run(w4_run))
    assert df["resolution"].tolist() == [32, 28, 24, "ensemble"]
    assert df["top1"].tolist() == [89.0, 91.25, 90.5, 91.5]
    assert df["macs"].iloc[1] == MACS[28] and pd.isna(df["macs"].iloc[3])
    assert df["calibrated"].iloc[0] and not df["calibrated"].iloc[1]
    assert list(df.columns[:4]) == ["resolution", "bits", "top1", "top5"]


def test_run_table_keeps_every_bits_of_a_run(tmp_path):
    rows = _rows(W4, {28: 90.0, 24: 89.0}) + _rows(W8, {28: 91.0, 24: 90.0})
    df = run_table(load_run(make_run(tmp_path, "multi", rows)))
    pairs = list(zip(df["resolution"], df["bits"]))[:4]
    assert pairs == [(28, "W8A8"), (24, "W8A8"), (28, "W4A4"), (24, "W4A4")]


def test_run_table_latency_column(w4_run):
    df = run_table(load_run(w4_run), latency={28: 1.5, 24: 1.0})
    assert df["latency_ms"].tolist()[1:3] == [1.5, 1.0] and pd.isna(df["latency_ms"].iloc[0])
    assert "latency (ms)" in format_table(df) and "batch 1" in format_table(df)


def _row(df, run, resolution, bits=None):
    hit = df[(df["run"] == run) & (df["resolution"] == resolution)]
    return hit[hit["bits"] == bits].iloc[0] if bits else hit.iloc[0]


def test_compare_deltas_fall_back_to_resolution(fp_run, w4_run):
    df = compare_table([load_run(fp_run), load_run(w4_run)])
    row = _row(df, "w4", 28)
    assert row["d_top1"] == pytest.approx(-0.75) and row["vs"] == "FP"
    assert pd.isna(_row(df, "fp", 28)["d_top1"])  # the reference has no delta
    assert pd.isna(_row(df, "w4", 32)["d_top1"])  # no 32 px in the reference
    ens = _row(df, "w4", "ensemble")
    assert ens["d_top1"] == pytest.approx(-1.0) and ens["d_top5"] == pytest.approx(0.0)
    assert df["resolution"].tolist()[:3] == [32, 28, 28]  # grouped by resolution
    assert not any("different data sets" in n for n in df.attrs["notes"])


def test_compare_prefers_same_bits(tmp_path, w4_run):
    rows = _rows(W8, {28: 95.0, 24: 94.0}) + _rows(W4, {28: 93.0, 24: 92.0})
    multi = make_run(tmp_path, "multi", rows)
    df = compare_table([load_run(multi), load_run(w4_run)])
    row = _row(df, "w4", 28)
    assert row["vs"] == "W4A4" and row["d_top1"] == pytest.approx(91.25 - 93.0)
    assert row["d_top5"] == pytest.approx(91.25 - 93.0)


def test_compare_flags_mixed_data_sets(tmp_path, fp_run):
    other = make_run(tmp_path, "c10", _rows(W4, {28: 80.0}), data="cifar10")
    df = compare_table([load_run(fp_run), load_run(other)])
    assert set(df["data"]) == {"fashion_mnist", "cifar10"}
    text = format_table(df)
    assert "runs use different data sets" in text and "cifar10: c10" in text


def test_compare_tells_same_named_runs_apart(tmp_path):
    folders = []
    for name, top1 in (("a", 90.0), ("b", 91.0)):
        folder = make_run(tmp_path, name, _rows(W4, {28: top1}))
        data = json.loads((folder / "results.json").read_text())
        (folder / "results.json").write_text(json.dumps(dict(data, run="same")))
        folders.append(folder)
    df = compare_table([load_run(f) for f in folders])
    assert sorted(set(df["run"])) == ["a", "b"]


# --- formats -----------------------------------------------------------------------------------

def test_markdown_is_human_readable(fp_run, w4_run):
    text = format_table(run_table(load_run(fp_run)))
    assert "**run fp: resnet20 on fashion_mnist, FP" in text
    assert "31.02 M" in text and "31.77 G" in text  # MACs and BitOPs of 28 px
    assert "1.04 MiB" in text and "calibrated" not in text  # no calibrated rows here
    compared = format_table(compare_table([load_run(fp_run), load_run(w4_run)]))
    assert "-0.75" in compared and "Δ top-1" in compared and "| yes" in compared  # 32 px


def test_csv_and_json_keep_raw_numbers(w4_run):
    df = run_table(load_run(w4_run))
    back = pd.read_csv(io.StringIO(format_table(df, "csv")))
    assert back["macs"].iloc[1] == MACS[28] and back["resolution"].iloc[3] == "ensemble"
    records = json.loads(format_table(df, "json"))
    assert records[1]["macs"] == MACS[28] and records[1]["weight_size_bits"] == 272186 * 4
    assert records[3]["macs"] is None and records[0]["calibrated"] is True


def test_unknown_format_is_a_choices_error(w4_run):
    with pytest.raises(RsqError, match="unknown format 'xml'; choose from: md, csv, json"):
        format_table(run_table(load_run(w4_run)), "xml")


# --- plots -------------------------------------------------------------------------------------

def test_plot_writes_png(tmp_path, fp_run, w4_run):
    path = plot_runs([load_run(fp_run), load_run(w4_run)], tmp_path / "cmp.png")
    data = path.read_bytes()
    assert data.startswith(b"\x89PNG\r\n\x1a\n") and len(data) > 10_000


@pytest.mark.parametrize("name, message", [("plot.jpg", "unknown plot file type '.jpg'"),
                                           ("missing/plot.png", "does not exist")])
def test_plot_bad_paths(tmp_path, w4_run, name, message):
    with pytest.raises(RsqError, match=message):
        plot_runs([load_run(w4_run)], tmp_path / name)


# --- latency and command line ------------------------------------------------------------------

def test_measure_latency_per_resolution():
    from rsq.models import create_model

    model = create_model("resnet20", 10, 1, [28, 16]).train()
    threads = torch.get_num_threads()
    latency = measure_latency(model, [28, 16], 1, repeats=3, threads=threads + 1)
    assert set(latency) == {28, 16} and all(v > 0 for v in latency.values())
    assert model.training and torch.get_num_threads() == threads  # both restored
    with pytest.raises(RsqError, match="repeats must be at least 1, not 0"):
        measure_latency(model, [28], 1, repeats=0)
    with pytest.raises(RsqError, match="threads must be at least 1, not 0"):
        measure_latency(model, [28], 1, threads=0)


def _cli(argv):
    result = CliRunner().invoke(cli, argv)
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    print(result.stdout, end="")
    return result.exit_code


def test_cli_report_with_latency_out_and_plot(tmp_path, w4_run, monkeypatch):
    from rsq.models import create_model

    (w4_run / "checkpoint.pt").write_bytes(b"stand-in")
    fake = types.ModuleType("rsq.checkpoint")
    fake.load_model = lambda path: (create_model("resnet20", 10, 1, [28, 24]), {})
    monkeypatch.setitem(sys.modules, "rsq.checkpoint", fake)
    out, png = tmp_path / "table.csv", tmp_path / "run.png"
    argv = ["report", str(w4_run), "--latency", "--repeats", "2", "--format", "csv",
            "--out", str(out), "--plot", str(png)]
    assert _cli(argv) == 0
    table = pd.read_csv(out)
    assert table["latency_ms"].iloc[1] > 0 and pd.isna(table["latency_ms"].iloc[0])  # 32 unknown
    assert table["latency_ms"].notna().sum() == 2
    assert png.stat().st_size > 0


def test_cli_compare_prints_markdown(capsys, fp_run, w4_run):
    assert _cli(["compare", str(fp_run), str(w4_run)]) == 0
    assert "deltas against fp" in capsys.readouterr().out


def test_cli_checks_format_before_work(tmp_path, w4_run):
    result = CliRunner().invoke(cli, ["report", str(w4_run), "--format", "tex", "--plot", str(tmp_path / "x.png")])
    assert result.exit_code == 2
    assert result.stderr.strip().splitlines() == ["rsq: error: unknown format 'tex'; choose from: md, csv, json"]
    assert not (tmp_path / "x.png").exists()


@pytest.mark.parametrize("command", ["report", "compare"])
def test_report_without_pandas_says_what_to_install(command, w4_run, monkeypatch):
    monkeypatch.setitem(sys.modules, "pandas", None)  # what a failed import looks like
    result = CliRunner().invoke(cli, [command, str(w4_run)])
    assert result.exit_code == 2
    (line,) = result.stderr.strip().splitlines()
    assert line.startswith(f"rsq: error: rsq {command} needs the Python package 'pandas'")
    assert line.endswith("pip install pandas")
