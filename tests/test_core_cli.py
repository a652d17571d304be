"""The `rsq` command through rsq.cli.main: calibrate, eval, and one-line errors for bad input."""
import json
import os
import re
import shutil
from pathlib import Path

import pytest
import torch

import rsq
from rsq.checkpoint import build_model, load_checkpoint
from rsq.cli import main
from rsq.config import TrainConfig
from rsq.errors import RsqError
from rsq.models import list_models
from rsq.nn.switchable_bn import SwitchableBatchNorm2d
from rsq.train import train

RUN_FILES = ("checkpoint.pt", "results.json", "config.toml", "metrics.csv")
# A small, fast training on top of which every command runs.
QUICK = ["--subset", "128", "--test-subset", "64", "--epochs", "1", "--batch-size", "64", "--workers", "0"]


def run(argv, capsys):
    """(exit code, stdout, stderr) of ``rsq ARGV``; argparse's exits are caught too."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code if isinstance(exc.code, int) else 1
    captured = capsys.readouterr()
    return code, captured.out, captured.err


def assert_one_error_line(code, err):
    assert code != 0
    assert "Traceback" not in err
    lines = [line for line in err.splitlines() if line.strip()]
    errors = [line for line in lines if "error:" in line]
    assert len(errors) == 1, err
    assert re.match(r"^rsq( [\w-]+)?: error: \S", errors[0]), errors[0]
    # anything else may only be argparse's usage text
    for line in lines:
        if line is not errors[0]:
            assert line.startswith("usage:") or line.startswith(" "), line
    return errors[0]


@pytest.fixture(scope="module")
def tiny_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("tiny") / "run"
    train(TrainConfig(model="resnet20", subset=256, test_subset=100, resolutions=[28, 20], epochs=1, batch_size=64,
                      seed=0, workers=0, out=str(out)))
    return out


def _snapshot(folder: Path):
    return {p.name: (p.read_bytes(), p.stat().st_mtime_ns) for p in sorted(folder.iterdir())}


# ----------------------------------------------------------------------------- calibrate and eval
def test_calibrate_adds_a_resolution_with_its_own_statistics(tiny_run, tmp_path, capsys):
    source = tiny_run / "checkpoint.pt"
    before = source.read_bytes()
    model = build_model(load_checkpoint(source))
    with pytest.raises(RsqError, match="28"):
        model.eval()(torch.zeros(1, 1, 24, 24))

    target = tmp_path / "calibrated.pt"
    code, out, err = run(["calibrate", tiny_run, "--resolution", "24", "--images", "128", "--test-subset", "64",
                          "--out", target], capsys)
    assert code == 0, err
    assert "Traceback" not in err
    assert source.read_bytes() == before, "--out leaves the source checkpoint untouched"
    assert re.search(r"\| 24 \(calibrated\) \|", out), out

    ckpt = load_checkpoint(target)
    like = int(ckpt["calibrated"]["24"])
    assert like in (28, 20)
    model = build_model(ckpt).eval()
    assert rsq.mode_state(model).resolutions == [28, 24, 20]
    assert model(torch.randn(2, 1, 24, 24)).shape == (2, 10)
    switchables = [m for m in model.modules() if isinstance(m, SwitchableBatchNorm2d)]
    assert switchables
    for sw in switchables:
        new, src = sw.bns["r24"], sw.bns[f"r{like}"]
        # affine parameters come from the source BN; the statistics are re-estimated
        assert torch.equal(new.weight, src.weight) and torch.equal(new.bias, src.bias)
        assert not torch.allclose(new.running_mean, src.running_mean)
        assert not torch.allclose(new.running_var, src.running_var)
        for other in ("r28", "r20"):
            assert not torch.equal(new.running_mean, sw.bns[other].running_mean)
    # trained BNs are kept as they were
    original = build_model(load_checkpoint(source))
    for key, value in original.state_dict().items():
        assert torch.equal(value, model.state_dict()[key]), key

    results_path = tmp_path / "eval.json"
    code, out, err = run(["eval", target, "--test-subset", "64", "--out", results_path], capsys)
    assert code == 0, err
    for r in ("28", "20"):
        assert re.search(rf"^\| {r} \| FP \| \d+\.\d\d \| \d+\.\d\d \|", out, re.M), out
    assert re.search(r"^\| 24 \(calibrated\) \| FP \|", out, re.M)
    assert re.search(r"^\| ensemble \| \| \d+\.\d\d \|", out, re.M)
    results = json.loads(results_path.read_text())
    assert [row["resolution"] for row in results["rows"]] == [28, 20, 24]
    assert [row["calibrated"] for row in results["rows"]] == [False, False, True]


def test_calibrate_errors(tiny_run, tmp_path, capsys):
    run_copy = tmp_path / "run"
    shutil.copytree(tiny_run, run_copy)
    snapshot = _snapshot(run_copy)
    for argv in (["calibrate", run_copy, "--resolution", "20", "--images", "64"],
                 ["calibrate", run_copy, "--resolution", "24", "--images", "64", "--like", "16"],
                 ["calibrate", tmp_path / "missing.pt", "--resolution", "24"]):
        code, _, err = run(argv, capsys)
        assert_one_error_line(code, err)
    assert _snapshot(run_copy) == snapshot


def test_eval_prints_the_table_and_refuses_unknown_resolutions(tiny_run, capsys):
    code, out, err = run(["eval", tiny_run, "--test-subset", "64"], capsys)
    assert code == 0, err
    assert out.splitlines()[0].startswith("| resolution | bits | top-1 | top-5 |")
    assert re.search(r"^\| 28 \| FP \|", out, re.M) and re.search(r"^\| 20 \| FP \|", out, re.M)
    code, _, err = run(["eval", tiny_run, "--resolutions", "24"], capsys)
    line = assert_one_error_line(code, err)
    assert "24" in line and "calibrate" in line


# ----------------------------------------------------------------------------- flag errors
@pytest.mark.parametrize("value", ["", "a,b", "-3", "0", "28,x", "28,28"])
def test_bad_resolutions(value, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["train", f"--resolutions={value}", "--out", out] + QUICK, capsys)
    assert_one_error_line(code, err)
    assert not out.exists()


@pytest.mark.parametrize("flag", ["--bits", "--weight-bits", "--act-bits"])
@pytest.mark.parametrize("value", ["0", "1", "9", "33", "four", ""])
def test_bad_bits(flag, value, tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["train", f"{flag}={value}", "--out", out] + QUICK, capsys)
    assert_one_error_line(code, err)
    assert not out.exists()


def test_unknown_model_lists_the_known_ones(tmp_path, capsys):
    out = tmp_path / "out"
    code, _, err = run(["train", "--model", "resnet7", "--out", out] + QUICK, capsys)
    line = assert_one_error_line(code, err)
    assert "resnet7" in line
    for name in list_models():
        assert name in line
    assert not any((out / name).exists() for name in RUN_FILES)


def test_unknown_distill_mode(tmp_path, capsys):
    code, _, err = run(["train", "--distill", "teacherless", "--out", tmp_path / "out"] + QUICK, capsys)
    line = assert_one_error_line(code, err)
    assert "teacherless" in line and all(mode in line for mode in ("full", "vanilla", "none"))


def test_unknown_recipe(tmp_path, capsys):
    code, _, err = run(["train", "no_such_recipe", "--out", tmp_path / "out"], capsys)
    line = assert_one_error_line(code, err)
    assert "no_such_recipe" in line and "fashion_mnist" in line
    code, _, err = run(["train", str(tmp_path / "missing.toml"), "--out", tmp_path / "out"], capsys)
    assert "missing.toml" in assert_one_error_line(code, err)


@pytest.mark.parametrize("body, words", [
    ('model = "resnet20"\nepochz = 3\n', ["epochz"]),
    ('epochs = "three"\n', ["epochs"]),
    ('resolutions = [28, "x"]\n', ["resolutions"]),
    ('resolutions = 28\n', ["resolutions"]),
    ('lr = true\n', ["lr"]),
    ('epochs = 3\nepochs = [\n', ["toml"]),
])
def test_bad_recipe_file(body, words, tmp_path, capsys):
    recipe = tmp_path / "recipe.toml"
    recipe.write_text(body)
    out = tmp_path / "out"
    code, _, err = run(["train", recipe, "--out", out], capsys)
    line = assert_one_error_line(code, err)
    for word in words:
        assert word.lower() in line.lower()
    assert not out.exists()


def test_imagefolder_with_a_missing_folder(tmp_path, capsys):
    missing = tmp_path / "no_images_here"
    code, _, err = run(["train", "--data", "imagefolder", "--data-dir", missing, "--out", tmp_path / "out"] + QUICK,
                       capsys)
    assert "no_images_here" in assert_one_error_line(code, err)
    code, _, err = run(["train", "--data", "imagefolder", "--out", tmp_path / "out2"] + QUICK, capsys)
    assert_one_error_line(code, err)


def test_corrupt_image_read_in_a_worker_is_one_line(tmp_path, capsys):
    """A broken file found by a DataLoader worker process still ends as one line naming it."""
    from PIL import Image
    import numpy as np

    rng = np.random.default_rng(0)
    root = tmp_path / "images"
    for split in ("train", "val"):
        for c in ("a", "b"):
            folder = root / split / c
            folder.mkdir(parents=True)
            for i in range(2):
                Image.fromarray(rng.integers(0, 256, (20, 20, 3), dtype=np.uint8)).save(folder / f"{i}.png")
    for c in ("a", "b"):
        for i in range(2):
            (root / "train" / c / f"bad{i}.jpg").write_bytes(b"not a jpeg")
    code, _, err = run(["train", "--data", "imagefolder", "--data-dir", root, "--resolutions", "16",
                        "--model", "resnet20", "--subset", "0", "--epochs", "1", "--batch-size", "8",
                        "--workers", "1", "--out", tmp_path / "out"], capsys)
    line = assert_one_error_line(code, err)
    assert re.search(r"bad\d\.jpg", line), line


# ----------------------------------------------------------------------------- checkpoint errors
def _truncated(tiny_run, tmp_path):
    path = tmp_path / "truncated.pt"
    data = (tiny_run / "checkpoint.pt").read_bytes()
    path.write_bytes(data[: len(data) // 2])
    return path


def _foreign_dict(tiny_run, tmp_path):
    path = tmp_path / "foreign.pt"
    torch.save({"a": 1}, path)
    return path


def _random_bytes(tiny_run, tmp_path):
    path = tmp_path / "random.pt"
    path.write_bytes(os.urandom(4096))
    return path


def _plain_tensor(tiny_run, tmp_path):
    path = tmp_path / "tensor.pt"
    torch.save(torch.zeros(3), path)
    return path


def _missing(tiny_run, tmp_path):
    return tmp_path / "does_not_exist.pt"


def _empty_folder(tiny_run, tmp_path):
    folder = tmp_path / "empty_run"
    folder.mkdir()
    return folder


def _marker_only(tiny_run, tmp_path):
    path = tmp_path / "marker.pt"
    torch.save({"format": "rsq-checkpoint", "version": 1}, path)
    return path


@pytest.mark.parametrize("make", [_missing, _empty_folder, _truncated, _foreign_dict, _random_bytes, _plain_tensor,
                                  _marker_only])
def test_eval_on_a_bad_checkpoint(make, tiny_run, tmp_path, capsys):
    path = make(tiny_run, tmp_path)
    code, out, err = run(["eval", path], capsys)
    line = assert_one_error_line(code, err)
    assert path.name in line
    assert "|" not in out  # no table


# ----------------------------------------------------------------------------- existing runs
def test_existing_run_is_refused_unless_overwrite(tiny_run, tmp_path, capsys):
    run_copy = tmp_path / "run"
    shutil.copytree(tiny_run, run_copy)
    snapshot = _snapshot(run_copy)
    argv = ["train", "--out", run_copy, "--resolutions", "16"] + QUICK
    code, _, err = run(argv, capsys)
    line = assert_one_error_line(code, err)
    assert "--overwrite" in line
    assert _snapshot(run_copy) == snapshot, "a refused run must not touch the existing files"

    # only one of the run files is enough to refuse
    partial = tmp_path / "partial"
    partial.mkdir()
    (partial / "metrics.csv").write_text("epoch\n1\n")
    code, _, err = run(["train", "--out", partial, "--resolutions", "16"] + QUICK, capsys)
    assert_one_error_line(code, err)
    assert (partial / "metrics.csv").read_text() == "epoch\n1\n"

    code, out, err = run(argv + ["--overwrite"], capsys)
    assert code == 0, err
    results = json.loads((run_copy / "results.json").read_text())
    assert [row["resolution"] for row in results["rows"]] == [16]
    assert load_checkpoint(run_copy)["resolutions"] == [16]


# ----------------------------------------------------------------------------- calibrate/eval, like training
def test_calibrate_pairs_alpha_with_the_trained_resolutions_and_evaluates_in_memory(tiny_run, tmp_path, capsys,
                                                                                   monkeypatch):
    import rsq.runs

    reads = []
    real_load = rsq.runs.load_checkpoint
    monkeypatch.setattr(rsq.runs, "load_checkpoint", lambda path: reads.append(path) or real_load(path))
    target = tmp_path / "cal.pt"
    results = rsq.runs.calibrate_checkpoint(tiny_run, [24], images=64, out=target, test_subset=64, device="cpu")
    assert len(reads) == 1, "calibrate evaluates the model it has, not the file it wrote"
    alpha = torch.softmax(load_checkpoint(tiny_run)["ensemble"]["alpha"], 0).tolist()
    assert list(results["alpha_weights"]) == ["28", "20"]  # not 24: it has no alpha
    assert list(results["alpha_weights"].values()) == pytest.approx(alpha, abs=1e-4)
    assert [row["resolution"] for row in results["rows"]] == [28, 20, 24]


def test_eval_takes_a_device_and_leaves_the_saved_config_alone(tiny_run, capsys, monkeypatch):
    import rsq.runs

    configs = []
    real = rsq.runs.checkpoint_config
    monkeypatch.setattr(rsq.runs, "checkpoint_config", lambda ckpt: configs.append(real(ckpt)) or configs[-1])
    code, out, err = run(["eval", tiny_run, "--test-subset", "32", "--batch-size", "16", "--device", "cpu"], capsys)
    assert code == 0, err
    saved = load_checkpoint(tiny_run)["config"]
    assert configs and all(c.to_dict() == saved for c in configs)
    code, _, err = run(["eval", tiny_run, "--device", "tpu"], capsys)
    assert "unknown device 'tpu'; choose from: auto, cpu, cuda" in assert_one_error_line(code, err)
