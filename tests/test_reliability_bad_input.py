"""The bad-input table of the README ("Bad input"), through the real CLI.

Every row runs ``rsq.cli.main`` in a folder that holds a finished run, hand-made broken and
foreign checkpoints, recipes and image folders, and checks: exit code 2, exactly one stderr
line ``rsq: error: ...`` containing the expected text, and no file that was there before is
changed or gone. A few rows run as real processes to show there is no traceback.
"""
from __future__ import annotations

import hashlib
import os
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from rsq.cli import main

SMALL = ["--subset", "128", "--test-subset", "64", "--resolutions", "16,12", "--batch-size", "64", "--epochs", "1"]


def T(*args) -> list[str]:
    """A train command that would be a few seconds long if it did not fail (last flag wins)."""
    return ["train", *SMALL, *args]


def IMG(folder: str, *args) -> list[str]:
    return ["train", "--data", "imagefolder", "--data-dir", folder, "--resolutions", "16", "--batch-size", "4",
            "--epochs", "1", "--workers", "0", "--out", f"out_{folder}", *args]


# (id, argv, text the single error line must contain)
TABLE = [
    # --- train: flag values
    ("epochs-zero", T("--epochs", "0"), "argument --epochs: '0' must be at least 1"),
    ("epochs-text", T("--epochs", "two"), "argument --epochs: 'two' is not a valid int"),
    ("batch-zero", T("--batch-size", "0"), "argument --batch-size: '0' must be at least 1"),
    ("batch-over-images", T("--batch-size", "4096"), "batch size 4096 is larger than the 128 training images"),
    ("lr-zero", T("--lr", "0"), "argument --lr: '0' must be greater than 0"),
    ("lr-negative", T("--lr", "-1"), "argument --lr: '-1' must be greater than 0"),
    ("lr-nan", T("--lr", "nan"), "argument --lr: 'nan' must be a finite number"),
    ("lr-inf", T("--lr", "inf"), "argument --lr: 'inf' must be a finite number"),
    ("weight-decay-negative", T("--weight-decay", "-0.1"), "argument --weight-decay: '-0.1' must not be negative"),
    ("warmup-inf", T("--warmup-epochs", "inf"), "argument --warmup-epochs: 'inf' must be a finite number"),
    ("label-smoothing-one", T("--label-smoothing", "1"), "argument --label-smoothing: '1' must be at most 0.999"),
    ("distill-unknown", T("--distill", "bogus"), "unknown distill mode 'bogus'; choose from: full, vanilla, none"),
    ("data-unknown", T("--data", "bogus"), "unknown data set 'bogus'; choose from: fashion_mnist, imagefolder"),
    ("seed-negative", T("--seed", "-1"), "argument --seed: '-1' must not be negative"),
    ("seed-too-big", T("--seed", str(2**64)), "must be at most 9223372036854775807"),
    ("subset-negative", T("--subset", "-5"), "argument --subset: '-5' must not be negative"),
    ("test-subset-text", T("--test-subset", "all"), "argument --test-subset: 'all' is not a valid int"),
    ("workers-negative", T("--workers", "-1"), "argument --workers: '-1' must not be negative"),
    ("checkpoint-every-negative", T("--checkpoint-every", "-2"), "argument --checkpoint-every: '-2' must not be"),
    ("quantizer-unknown", T("--bits", "4", "--quantizer", "bogus"), "unknown quantizer 'bogus'; choose from: lsq"),
    ("first-last-unknown", T("--first-last", "16"), "unknown first/last layer policy '16'"),
    ("shortcut-without-bits", T("--quantized-shortcut"),
     "quantized_shortcut needs quantized activations: add --bits"),
    ("shortcut-without-blocks", T("--model", "mobilenet_v2", "--bits", "4", "--quantized-shortcut"),
     "quantized_shortcut needs residual blocks"),
    ("residual-without-bits", T("--residual-bits", "8"),
     "residual_bits needs quantized activations of one bit width: add --bits B"),
    ("residual-and-shortcut", T("--bits", "4", "--residual-bits", "8", "--quantized-shortcut"),
     "residual_bits and quantized_shortcut are two ways to put the residual stream on a grid; pick one"),
    ("bits-one", T("--bits", "1"), "1 bits is not supported; use 2-8, or 32"),
    ("bits-duplicate", T("--bits", "4,4"), "argument --bits: '4,4' names a bit width twice"),
    ("bits-list-text", T("--bits", "4,x"), "argument --bits: '4,x' is not an integer bit width"),
    ("bits-list-33", T("--bits", "2,33"), "argument --bits: 33 bits is not supported"),
    ("bits-empty", T("--bits", ""), "argument --bits: needs a bit width"),
    ("bits-list-and-weight-bits", T("--bits", "2,4", "--weight-bits", "4"), "drop weight_bits/act_bits (4/32)"),
    ("weight-bits-list", T("--weight-bits", "4,2"), "argument --weight-bits: '4,2': one bit width here"),
    ("weight-bits-nine", T("--weight-bits", "9"), "argument --weight-bits: 9 bits is not supported"),
    ("act-bits-text", T("--act-bits", "four"), "'four' is not an integer bit width"),
    ("resolutions-empty", T("--resolutions", ""), "needs at least one resolution"),
    ("resolutions-text", T("--resolutions", "16,abc"), "'16,abc' is not a comma-separated list of integers"),
    ("resolutions-zero", T("--resolutions", "16,0"), "resolutions must be positive"),
    ("resolutions-duplicate", T("--resolutions", "16,16"), "resolutions [16, 16] must be distinct positive"),
    ("device-unknown", T("--device", "gpu"), "unknown device 'gpu'; choose from: auto, cpu, cuda"),
    ("amp-unknown", T("--amp", "fp8"), "unknown amp setting 'fp8'; choose from: auto, bf16, off"),
    ("flag-unknown", T("--learning-rate", "0.1"), "unrecognized arguments: --learning-rate"),
    ("command-unknown", ["trian"], "unknown command 'trian'; choose from: train, eval, calibrate"),
    ("option-missing", ["calibrate", "run"], "Missing option '--resolution'"),
    # --- train: data paths
    ("fashion-dir-missing", T("--data-dir", "nowhere"), "data folder nowhere does not hold the four Fashion-MNIST"),
    ("imagefolder-no-dir", T("--data", "imagefolder"), "--data imagefolder needs --data-dir ROOT"),
    ("imagefolder-dir-missing", T("--data", "imagefolder", "--data-dir", "nowhere"), "data folder nowhere does not exist"),
    ("imagefolder-one-class", IMG("img_one"), "has 1 class folder(s); classification needs at least 2"),
    ("imagefolder-no-val", IMG("img_noval"), "img_noval has no 'val' sub-folder"),
    ("imagefolder-class-without-images", IMG("img_empty_class"), "Found no valid file for the classes b"),
    ("imagefolder-classes-differ", IMG("img_mismatch"), "img_mismatch: train and val class folders differ"),
    ("imagefolder-broken-image", IMG("img_broken"), "cannot read image"),
    # --- train: --init / --teacher checkpoints
    ("init-missing", T("--init", "missing.pt"), "--init: checkpoint missing.pt does not exist"),
    ("init-not-a-checkpoint", T("--init", "text.pt"), "--init: text.pt is not a readable rsq checkpoint"),
    ("init-other-resolutions", T("--resolutions", "20,16", "--init", "run"),
     "--init run was trained for resolutions [16, 12], not [20]"),
    ("init-other-model", T("--init", "resnet18.pt"), "--init resnet18.pt is a resnet18 checkpoint; this run trains resnet20"),
    ("init-quantized", T("--init", "w4a4.pt"), "--init w4a4.pt is a W4A4 checkpoint; --init takes a full-precision one"),
    ("init-other-classes", T("--init", "classes5.pt"), "--init classes5.pt has 5 classes / 1 channels; the data has 10 / 1"),
    ("teacher-missing", T("--teacher", "missing.pt"), "--teacher: checkpoint missing.pt does not exist"),
    ("teacher-other-resolutions", T("--resolutions", "20,16", "--teacher", "run"),
     "--teacher run was trained for resolutions [16, 12], not [20]"),
    ("teacher-quantized", T("--teacher", "w4a4.pt"), "--teacher w4a4.pt is a W4A4 checkpoint"),
    # --- train: the output folder, --resume and --overwrite
    ("out-is-a-file", T("--out", "afile"), "output path afile exists and is not a folder"),
    ("out-under-a-file", T("--out", "afile/sub"), "cannot create output folder afile/sub: afile is a file"),
    ("out-holds-a-run", T("--out", "run"),
     "output folder run already holds a run; pass --resume run to continue it or --overwrite to replace it"),
    ("overwrite-but-setup-fails", T("--out", "run", "--overwrite", "--data-dir", "nowhere"),
     "data folder nowhere does not hold"),
    ("resume-no-folder", ["train", "--resume", "nowhere"], "--resume nowhere: no checkpoint.pt there to resume from"),
    ("resume-a-file", ["train", "--resume", "run/checkpoint.pt"], "--resume takes the run folder, not a file"),
    ("resume-and-overwrite", ["train", "--resume", "run", "--overwrite"],
     "--resume continues a run and --overwrite replaces it; pass one of them"),
    ("resume-other-flags", ["train", "--resume", "run", "--lr", "0.5"],
     "--resume continues the saved config; drop lr=0.5 (run has 0.1)"),
    ("resume-other-out", ["train", "--resume", "run", "--out", "elsewhere"], "--resume continues run in place; drop --out"),
    ("resume-with-recipe", ["train", "fashion_mnist", "--resume", "run"], "drop the recipe 'fashion_mnist'"),
    ("resume-finished-run", ["train", "--resume", "run"], "run run already finished (1 epochs); nothing to resume"),
    ("resume-truncated", ["train", "--resume", "truncated_run"], "is not a readable rsq checkpoint"),
    # --- train: recipes
    ("recipe-unknown", ["train", "nosuch", *SMALL], "unknown recipe 'nosuch'; choose from:"),
    ("recipes-unknown", ["recipes", "nosuch"], "unknown recipe 'nosuch'; choose from:"),
    ("recipes-file-missing", ["recipes", "missing.toml"], "recipe file missing.toml does not exist"),
    ("recipe-file-missing", ["train", "missing.toml", *SMALL], "recipe file missing.toml does not exist"),
    ("recipe-invalid-toml", ["train", "broken.toml", *SMALL], "recipe broken.toml is not valid TOML"),
    ("recipe-unknown-key", ["train", "unknown_key.toml", *SMALL], "unknown key in recipe unknown_key.toml: 'learning_rate'"),
    ("recipe-wrong-type", ["train", "wrong_type.toml", *SMALL], "recipe key 'resolutions' must be of type list[int]"),
    ("recipe-infinite-lr", ["train", "inf_lr.toml", *SMALL], "lr must be a finite number, got inf"),
    ("recipe-bad-device", ["train", "gpu_device.toml", *SMALL], "unknown device 'gpu'"),
    # --- export and verify
    ("export-full-precision", ["export", "run", "--out", "e_fp"], "is a full-precision checkpoint; integer export"),
    ("export-missing", ["export", "missing.pt", "--out", "e_missing"], "checkpoint missing.pt does not exist"),
    ("export-truncated", ["export", "truncated.pt", "--out", "e_trunc"], "truncated.pt is not a readable rsq checkpoint"),
    ("export-foreign", ["export", "foreign.pt", "--out", "e_foreign"], "foreign.pt is not an rsq checkpoint"),
    ("export-format-unknown", ["export", "qrun", "--format", "tflite", "--out", "e_fmt"],
     "unknown export format 'tflite'; choose from: onnx, packed, qlinear, c, qonnx, pt2e, executorch, executorch-exact"),
    ("export-resolution-unknown", ["export", "qrun", "--format", "packed", "--resolution", "20", "--out", "e_res"],
     "resolution(s) [20] unknown to this model (known: 16, 12)"),
    ("export-qlinear-no-data", ["export", "qmoved.pt", "--format", "qlinear", "--out", "e_ql"],
     "the qlinear format calibrates its 8-bit grids on the run's training images: "),
    ("export-lq-nets", ["export", "lqrun", "--format", "packed", "--out", "e_lq"], "uses the lqnet quantizer"),
    ("export-out-holds-an-export", ["export", "qrun", "--format", "packed", "--out", "exp"],
     "exp already holds a packed export; pass overwrite=True (--overwrite) to replace it"),
    ("export-snap-mismatch", ["export", "qrun", "--format", "onnx", "--out", "exp", "--no-snap"],
     "exp holds an export with snapped biases; add this format the same way (without --no-snap), or pass --overwrite"),
    ("export-out-is-a-file", ["export", "qrun", "--out", "afile"], "export target afile is a file, not a folder"),
    ("export-bits-of-a-single-run", ["export", "qrun", "--bits", "2", "--out", "e_bits"],
     "is a one-bit-width checkpoint (W4A4); drop --bits 2"),
    ("verify-not-an-export", ["verify", "run"], "run is not an rsq export (no export.json)"),
    ("verify-threads-0", ["verify", "exp", "--threads", "0"], "argument --threads: '0' must be at least 1"),
    # --- eval
    ("eval-missing", ["eval", "missing.pt"], "checkpoint missing.pt does not exist"),
    ("eval-empty-file", ["eval", "empty.pt"], "empty.pt is not a readable rsq checkpoint"),
    ("eval-truncated", ["eval", "truncated.pt"], "truncated.pt is not a readable rsq checkpoint"),
    ("eval-text-file", ["eval", "text.pt"], "text.pt is not a readable rsq checkpoint"),
    ("eval-foreign-torch-file", ["eval", "foreign.pt"], "foreign.pt is not an rsq checkpoint (no 'rsq-checkpoint' marker)"),
    ("eval-damaged", ["eval", "damaged.pt"], "damaged.pt is a damaged rsq checkpoint: it lacks"),
    ("eval-newer-format", ["eval", "newer.pt"], "newer.pt was written by a newer rsq"),
    ("eval-unknown-resolution", ["eval", "run", "--resolutions", "20"],
     "resolution(s) [20] unknown to this checkpoint (known: [16, 12]); add them with `rsq calibrate`"),
    ("eval-batch-zero", ["eval", "run", "--batch-size", "0"], "argument --batch-size: '0' must be at least 1"),
    ("eval-data-unknown", ["eval", "run", "--data", "bogus"], "unknown data set 'bogus'"),
    ("eval-imagefolder-no-dir", ["eval", "run", "--data", "imagefolder"], "--data imagefolder needs --data-dir"),
    ("eval-data-other-classes", ["eval", "run", "--data", "imagefolder", "--data-dir", "img_ok"],
     "data set imagefolder has 2 classes / 3 channels; the checkpoint expects 10 / 1"),
    ("eval-out-folder", ["eval", "run", "--out", "run"], "--out run is a folder"),
    ("eval-out-is-a-checkpoint", ["eval", "run", "--out", "run/checkpoint.pt"],
     "--out run/checkpoint.pt exists and is not an rsq results file; refusing to overwrite it"),
    ("eval-out-folder-missing", ["eval", "run", "--out", "nowhere/r.json"], "folder nowhere does not exist"),
    # --- calibrate
    ("calibrate-missing", ["calibrate", "missing.pt", "--resolution", "20"], "checkpoint missing.pt does not exist"),
    ("calibrate-known-resolution", ["calibrate", "run", "--resolution", "16"], "resolution 16 is already known"),
    ("calibrate-like-unknown", ["calibrate", "run", "--resolution", "20", "--like", "99"],
     "--like 99 is not a resolution of this checkpoint (known: [16, 12])"),
    ("calibrate-images-zero", ["calibrate", "run", "--resolution", "20", "--images", "0"], "'0' must be at least 1"),
    ("calibrate-resolution-text", ["calibrate", "run", "--resolution", "big"], "'big' is not a comma-separated list"),
    ("calibrate-out-exists", ["calibrate", "run", "--resolution", "20", "--out", "w4a4.pt"],
     "--out w4a4.pt already exists; give a new path"),
]


def _png(path: Path, shade: int) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    Image.new("RGB", (8, 8), (shade, 255 - shade, shade // 2)).save(path)


def _image_tree(root: Path, classes: dict[str, int], val_classes: dict[str, int] | None | str = "same") -> None:
    """ROOT/train/CLASS/*.png (and ROOT/val, unless val_classes is None) of tiny solid images."""
    for split, spec in (("train", classes), ("val", classes if val_classes == "same" else val_classes)):
        if spec is None:
            continue
        for i, (name, count) in enumerate(spec.items()):
            (root / split / name).mkdir(parents=True, exist_ok=True)
            for j in range(count):
                _png(root / split / name / f"{j}.png", 40 * i + 10 * j)


@pytest.fixture(scope="module")
def world(tmp_path_factory) -> Path:
    """A folder with one finished run and every kind of bad file the table needs."""
    root = tmp_path_factory.mktemp("world")
    cwd = os.getcwd()
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    try:
        os.chdir(root)
        assert main(T("--out", "run")) == 0
        assert main(T("--bits", "4", "--out", "qrun")) == 0
        assert main(T("--bits", "2", "--quantizer", "lqnet", "--out", "lqrun")) == 0
        assert main(["export", "qrun", "--format", "packed", "--out", "exp"]) == 0
    finally:
        os.chdir(cwd)
        torch.set_num_threads(threads)
    ckpt = torch.load(root / "run" / "checkpoint.pt", weights_only=True)

    def variant(name, **changes):
        copy = dict(ckpt, config=dict(ckpt["config"]))
        for key, value in changes.items():
            if key in copy["config"]:
                copy["config"][key] = value
            else:
                copy[key] = value
        torch.save(copy, root / name)

    variant("w4a4.pt", weight_bits=4, act_bits=4)
    moved = torch.load(root / "qrun" / "checkpoint.pt", weights_only=True)
    torch.save(dict(moved, config=dict(moved["config"], data_dir="nodata")), root / "qmoved.pt")  # data gone
    variant("resnet18.pt", model="resnet18")
    variant("classes5.pt", num_classes=5)
    variant("newer.pt", version=99)
    torch.save({"format": "rsq-checkpoint", "version": 1, "epoch": 3}, root / "damaged.pt")
    torch.save({"conv1.weight": torch.ones(3)}, root / "foreign.pt")
    raw = (root / "run" / "checkpoint.pt").read_bytes()
    (root / "truncated.pt").write_bytes(raw[: len(raw) // 2])
    (root / "empty.pt").write_bytes(b"")
    (root / "text.pt").write_text("not a checkpoint\n")
    (root / "truncated_run").mkdir()
    (root / "truncated_run" / "checkpoint.pt").write_bytes(raw[:1000])
    (root / "afile").write_text("a file, not a folder\n")
    (root / "broken.toml").write_text("epochs = [\n")
    (root / "unknown_key.toml").write_text("learning_rate = 0.1\n")
    (root / "wrong_type.toml").write_text('resolutions = "28,16"\n')
    (root / "inf_lr.toml").write_text("lr = inf\n")
    (root / "gpu_device.toml").write_text('device = "gpu"\n')

    _image_tree(root / "img_ok", {"a": 8, "b": 8}, {"a": 2, "b": 2})
    for junk in ("img_ok/train/a/notes.txt", "img_ok/train/b/.DS_Store", "img_ok/val/a/labels.csv"):
        (root / junk).write_text("not an image\n")
    _image_tree(root / "img_one", {"a": 4})
    _image_tree(root / "img_noval", {"a": 4, "b": 4}, None)
    _image_tree(root / "img_mismatch", {"a": 4, "b": 4}, {"a": 2, "c": 2})
    _image_tree(root / "img_empty_class", {"a": 4, "b": 0})
    (root / "img_empty_class" / "train" / "b" / "readme.txt").write_text("no images here\n")
    _image_tree(root / "img_broken", {"a": 4, "b": 8}, {"a": 2, "b": 2})
    for j in range(4):  # every image is used each epoch, so one of these is always read
        (root / "img_broken" / "train" / "a" / f"broken{j}.jpg").write_text("this is not a JPEG\n")
    return root


pytestmark = pytest.mark.usefixtures("one_thread")


def _snapshot(root: Path) -> dict[str, str]:
    return {str(p.relative_to(root)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(root.rglob("*")) if p.is_file()}


def _run(capsys, argv) -> tuple[int, list[str]]:
    try:
        code = main(list(argv))
    except SystemExit as exit_:  # argparse errors leave through SystemExit
        code = exit_.code
    captured = capsys.readouterr()
    return code, [line for line in captured.err.splitlines() if line.strip()]


@pytest.mark.parametrize("argv, expected", [pytest.param(argv, text, id=name) for name, argv, text in TABLE])
def test_bad_input_gives_one_line_and_exit_2(world, monkeypatch, capsys, argv, expected):
    if "cuda" in argv and torch.cuda.is_available():
        pytest.skip("a CUDA device is present")
    monkeypatch.chdir(world)
    before = _snapshot(world)
    code, err = _run(capsys, argv)
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("rsq: error: "), err
    assert expected in err[0], err[0]
    after = _snapshot(world)
    assert {k: v for k, v in after.items() if k in before} == before  # nothing that was there changed
    assert set(after) >= set(before)  # and nothing is gone


def test_no_cuda_gives_one_line(world, monkeypatch, capsys):
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    monkeypatch.chdir(world)
    code, err = _run(capsys, T("--device", "cuda", "--out", "cuda_run"))
    assert (code, err) == (2, ["rsq: error: --device cuda was asked for but no CUDA device is available"])
    assert not (world / "cuda_run").exists()


def test_overwrite_replaces_only_the_run_files(world, monkeypatch, capsys):
    """--overwrite removes the old run's four files (after set-up succeeded), never other files."""
    monkeypatch.chdir(world)
    shutil.copytree(world / "run", world / "again")
    (world / "again" / "my_notes.txt").write_text("keep me\n")
    (world / "again" / "results.json").write_text('{"kind": "rsq-results", "stale": true}\n')
    code, err = _run(capsys, T("--out", "again", "--overwrite", "--epochs", "1"))
    assert code == 0, err
    assert (world / "again" / "my_notes.txt").read_text() == "keep me\n"
    assert "stale" not in (world / "again" / "results.json").read_text()


def test_imagefolder_skips_non_image_files(world, monkeypatch, capsys):
    """notes.txt, .DS_Store and labels.csv next to the images are not samples; training runs."""
    monkeypatch.chdir(world)
    code, err = _run(capsys, IMG("img_ok"))
    assert code == 0, err
    assert (world / "out_img_ok" / "results.json").exists()


def _process(world: Path, *argv) -> subprocess.CompletedProcess:
    env = dict(os.environ, OMP_NUM_THREADS="1")
    return subprocess.run([sys.executable, "-m", "rsq.cli", *argv], cwd=world, env=env, capture_output=True,
                          text=True, timeout=180)


@pytest.mark.parametrize("argv, expected", [
    pytest.param(T("--out", "run"), "already holds a run", id="out-holds-a-run"),
    # The image is read in a DataLoader worker process: its traceback must not leak either.
    pytest.param(IMG("img_broken", "--workers", "2", "--out", "out_workers"), "cannot read image",
                 id="broken-image-in-worker"),
])
def test_real_process_prints_no_traceback(world, argv, expected):
    proc = _process(world, *argv)
    assert proc.returncode == 2
    lines = [line for line in proc.stderr.splitlines() if line.strip()]
    assert len(lines) == 1 and lines[0].startswith("rsq: error: ") and expected in lines[0], proc.stderr
    assert "Traceback" not in proc.stderr + proc.stdout
