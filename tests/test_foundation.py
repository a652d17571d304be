"""The foundation's second pass: one config schema, the click CLI, packaging, and the defects found in review."""
import dataclasses
import json
import shutil
import subprocess
import sys
import tomllib
import warnings
import zipfile
from pathlib import Path

import pytest
import torch
from click.testing import CliRunner
from torch import nn

import rsq
from rsq.atomic import atomic_write, remove_stale_temporaries
from rsq.cli import cli
from rsq.config import TrainConfig, build_config, config_from_dict, load_recipe, recipe_names, schema
from rsq.errors import RsqError
from rsq.nn.quantizers import LQNetQuantizer, QuantizationWarning
from rsq.quantize import FIRST_LAST_POLICIES, QUANTIZERS, full_precision_layers
from rsq.train import train

REPO = Path(__file__).resolve().parents[1]
COMMANDS = ["train", "eval", "calibrate", "report", "compare", "export", "verify", "models", "fetch-data"]


def invoke(*argv):
    """(exit code, stdout, stderr lines) of ``rsq ARGV`` through click's test runner."""
    result = CliRunner().invoke(cli, [str(a) for a in argv])
    if result.exception is not None and not isinstance(result.exception, SystemExit):
        raise result.exception
    return result.exit_code, result.stdout, [ln for ln in result.stderr.splitlines() if ln.strip()]


# ----------------------------------------------------------------------------- one config schema
def test_default_config_is_the_embedded_default_recipe():
    assert build_config("fashion_mnist", {}) == TrainConfig()
    # The paper's training is the default recipe without the distillation ramp, with the summed loss's
    # gradient on the classifier, one model's decay on the convolutions and the BNs at the shared rate,
    # and nothing else.
    assert build_config("fashion_mnist_paper", {}) == TrainConfig(distill_ramp=0.0, head_grad="sum",
                                                                  conv_decay="single", norm_lr_factor=1.0,
                                                                  out="runs/fashion_mnist_paper")


def test_the_int8_recipes_are_the_w4a4_recipes_at_8_bits_with_quantized_shortcuts():
    w4 = build_config("fashion_mnist_w4a4", {})
    w8 = build_config("fashion_mnist_w8a8", {})
    assert w8 == dataclasses.replace(w4, weight_bits=8, act_bits=8, quantized_shortcut=True,
                                     out="runs/fashion_mnist_w8a8")
    assert build_config("fashion_mnist_w8a8", {"quantized_shortcut": False}).quantized_shortcut is False
    assert build_config("imagenet_resnet18_w8a8", {}) == dataclasses.replace(
        build_config("imagenet_resnet18_w4a4", {}), weight_bits=8, act_bits=8, quantized_shortcut=True,
        out="runs/imagenet_resnet18_w8a8")
    # The recipe's shortcut excludes --residual-bits; the one line names the switch that turns it off.
    code, _, err = invoke("train", "fashion_mnist_w8a8", "--residual-bits", "8")
    assert code == 2 and len(err) == 1 and "--no-quantized-shortcut" in err[0], err
    code, out, _ = invoke("train", "--help")
    assert "--quantized-shortcut / --no-quantized-shortcut" in out


def test_every_setting_is_a_train_option_with_its_help_and_choices():
    code, out, _ = invoke("train", "--help")
    assert code == 0
    flat = " ".join(out.split())
    for f in schema():
        if f.metadata["cli"] == "bits":  # set through --bits, which takes one bit width or a list
            assert "--bits BITS" in flat
            continue
        assert "--" + f.name.replace("_", "-") in flat, f.name
        assert " ".join(f.metadata["help"].split()) in flat, f.name
        for choice in f.metadata["choices"]:
            assert choice in flat
    # Choice lists come from the modules that implement them, not from a copy.
    meta = {f.name: f.metadata for f in schema()}
    assert meta["quantizer"]["choices"] == tuple(QUANTIZERS)
    assert meta["first_last"]["choices"] == FIRST_LAST_POLICIES


@pytest.mark.parametrize("key, value, words", [
    ("epochs", 0, "epochs must be at least 1, got 0"),
    ("lr", float("nan"), "lr must be a finite number"),
    ("momentum", 1.0, "momentum must be at most 0.999"),
    ("seed", 2**63, "seed must be at most"),
    ("workers", -1, "workers must not be negative"),
    ("distill", "kd", "unknown distill mode 'kd'; choose from: full, vanilla, none"),
    ("weight_bits", 1, "weight_bits 1 is not supported"),
])
def test_the_schema_validates_python_api_values_like_the_cli(key, value, words):
    with pytest.raises(RsqError, match=words.replace("(", r"\(")):
        TrainConfig(**{key: value})


def test_a_saved_config_with_an_unknown_key_is_an_error_naming_it():
    saved = {**TrainConfig().to_dict(), "learning_rate": 0.1}
    with pytest.raises(RsqError, match="unknown key in saved config: 'learning_rate'"):
        config_from_dict(saved)
    assert config_from_dict(TrainConfig().to_dict()) == TrainConfig()


def test_replace_validates_and_leaves_the_original_alone():
    config = TrainConfig()
    assert config.replace(epochs=3).epochs == 3 and config.epochs == 4
    with pytest.raises(RsqError):
        config.replace(epochs=0)


# ----------------------------------------------------------------------------- the click CLI
def test_version_and_the_command_list():
    code, out, _ = invoke("--version")
    assert code == 0 and out.strip() == f"rsq {rsq.__version__}"
    code, out, _ = invoke("--help")
    assert code == 0
    for name in COMMANDS:
        assert f"  {name}" in out


@pytest.mark.parametrize("command", COMMANDS)
def test_every_command_has_help_with_an_example(command):
    code, out, err = invoke(command, "--help")
    assert code == 0 and not err
    assert "Example" in out and f"rsq {command}" in out


@pytest.mark.parametrize("argv, words", [
    (["train", "--lr", "nan"], "argument --lr: 'nan' must be a finite number"),
    (["train", "--warmup-epochs", "-inf"], "argument --warmup-epochs: '-inf' must be a finite number"),
    (["train", "--learning-rate", "0.1"], "unrecognized arguments: --learning-rate"),
    (["train", "--lr"], "Option '--lr' requires an argument"),
    (["eval"], "Missing argument 'CHECKPOINT'"),
    (["calibrate", "run"], "Missing option '--resolution'"),
    (["compare"], "Missing argument 'RUN_DIRS...'"),
    (["eval", "x", "--batch-size", "0"], "argument --batch-size: '0' must be at least 1"),
    (["report", "x", "--repeats", "many"], "argument --repeats: 'many' is not a valid int"),
    (["trian"], "unknown command 'trian'; choose from: train, eval"),
])
def test_usage_errors_are_one_line_and_exit_2(argv, words):
    code, out, err = invoke(*argv)
    assert code == 2
    assert len(err) == 1, err
    assert err[0].startswith("rsq: error: ") and words in err[0], err[0]
    assert err[0].endswith("--help`)")


def test_installed_script_end_to_end(tmp_path):
    script = Path(sys.executable).parent / "rsq"
    done = subprocess.run([script, "--version"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 0 and done.stdout.strip() == f"rsq {rsq.__version__}"
    done = subprocess.run([script, "train", "--epochs", "0"], capture_output=True, text=True, cwd=tmp_path)
    assert done.returncode == 2
    assert done.stderr.strip() == "rsq: error: argument --epochs: '0' must be at least 1 (see `rsq train --help`)"
    assert not list(tmp_path.iterdir()), "a refused command writes nothing"


# ----------------------------------------------------------------------------- packaging
def test_shipped_recipes_are_the_repository_recipes():
    assert recipe_names() == sorted(p.stem for p in (REPO / "recipes").glob("*.toml"))


def test_a_recipes_folder_in_the_working_directory_does_not_shadow_a_shipped_recipe(tmp_path, monkeypatch):
    (tmp_path / "recipes").mkdir()
    (tmp_path / "recipes" / "fashion_mnist.toml").write_text("epochs = 99\n")
    monkeypatch.chdir(tmp_path)
    assert load_recipe("fashion_mnist")["epochs"] == TrainConfig().epochs
    assert load_recipe("recipes/fashion_mnist.toml") == {"epochs": 99}  # a path is read as given


def test_the_wheel_holds_every_recipe_and_every_package(tmp_path):
    source = tmp_path / "src"  # a copy, so the build leaves nothing in the repository
    source.mkdir()
    for name in ("pyproject.toml", "README.md"):
        shutil.copy(REPO / name, source / name)
    for folder in ("rsq", "recipes"):
        shutil.copytree(REPO / folder, source / folder, ignore=shutil.ignore_patterns("__pycache__"))
    done = subprocess.run([sys.executable, "-m", "pip", "wheel", "--no-deps", "--no-build-isolation", "-q",
                           "-w", str(tmp_path), str(source)], capture_output=True, text=True)
    if done.returncode != 0 and "No module named" in done.stderr:
        pytest.skip(f"cannot build a wheel here: {done.stderr.strip().splitlines()[-1]}")
    assert done.returncode == 0, done.stderr
    (wheel,) = tmp_path.glob("rsq-*.whl")
    names = set(zipfile.ZipFile(wheel).namelist())
    for recipe in (REPO / "recipes").glob("*.toml"):
        assert f"rsq/recipes/{recipe.name}" in names
    for init in (REPO / "rsq").rglob("__init__.py"):
        assert init.relative_to(REPO).as_posix() in names, init
    for source in (REPO / "rsq").rglob("*.c"):  # C sources built on the user's machine: the C runtime, fused BN
        assert source.relative_to(REPO).as_posix() in names, source


def test_top_level_api_names_resolve():
    for name in ("quantize_", "dequantize_", "QuantConfig", "convert", "create_model", "set_mode", "TrainConfig"):
        assert callable(getattr(rsq, name)), name
    with pytest.raises(AttributeError):
        rsq.no_such_thing  # noqa: B018


def test_every_citation_of_the_docs_resolves():
    import re

    text = (REPO / "docs" / "methods.md").read_text()
    outside = "REFERENCE" + ".md"  # the team's notes beside the repository: never cited by it
    cited = 0
    for path in [*(REPO / "rsq").rglob("*.py"), *(REPO / "tests").glob("*.py")]:
        source = path.read_text()
        assert outside not in source, path
        for section in re.findall(r"docs/methods\.md §(\d)", source):
            assert f"\n## {section}. " in text, (path, section)
            cited += 1
    assert cited >= 5


# ----------------------------------------------------------------------------- defects found in review
def test_register_model_refuses_a_taken_name():
    from rsq.models.registry import register_model

    def resnet20(num_classes=10, in_chans=3):
        return nn.Conv2d(in_chans, num_classes, 1)

    with pytest.raises(RsqError, match="model name 'resnet20' is already registered"):
        register_model(resnet20)
    assert rsq.create_model("resnet20", 10, 1).__class__.__name__ == "CifarResNet"


class StandardizedConv(nn.Conv2d):
    """A conv subclass with its own forward: quantize_ must not swap it."""

    def forward(self, x):
        w = self.weight - self.weight.mean(dim=(1, 2, 3), keepdim=True)
        return self._conv_forward(x, w, self.bias)


def test_quantize_names_the_subclasses_it_leaves_in_full_precision_and_takes_a_filter():
    model = nn.Sequential(nn.Conv2d(1, 4, 3), nn.ReLU(), StandardizedConv(4, 4, 3), nn.ReLU(), nn.Conv2d(4, 4, 3),
                          nn.Flatten(), nn.LazyLinear(3))
    model(torch.zeros(1, 1, 12, 12))
    with pytest.warns(QuantizationWarning, match=r"left 1 layer\(s\) in full precision .*: 2"):
        rsq.quantize_(model, rsq.QuantConfig(weight_bits=4, act_bits=4), example_input=torch.randn(1, 1, 12, 12),
                      filter_fn=lambda module, name: name != "4")
    assert full_precision_layers(model) == ["2", "4"]
    assert type(model[0]).__name__ == "QuantConv2d" and type(model[6]).__name__ == "QuantLinear"


def test_a_non_finite_qem_solve_is_counted_and_said(monkeypatch):
    quantizer = LQNetQuantizer(2, signed=True, per_channel=True, channels=3).train()
    x = torch.randn(3, 8)
    quantizer(x)  # initialises the basis
    basis = quantizer.basis.clone()
    monkeypatch.setattr(torch.linalg, "solve", lambda a, b: torch.full_like(b, float("nan")))
    with pytest.warns(QuantizationWarning, match="QEM solve was not finite"):
        quantizer(x)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # only the first skip is said; the rest are counted
        quantizer(x)
    assert int(quantizer.skipped_solves) == 2
    assert torch.equal(quantizer.basis, basis)
    state = quantizer.state_dict()
    assert int(state["skipped_solves"]) == 2
    del state["skipped_solves"]  # a checkpoint from before the counter existed still loads
    LQNetQuantizer(2, signed=True, per_channel=True, channels=3).load_state_dict(state)


def test_a_failed_atomic_write_leaves_no_temporary_and_stale_ones_are_cleaned(tmp_path):
    target = tmp_path / "results.json"
    target.write_text("old")

    def fail(f):
        f.write("half")
        raise OSError(28, "No space left on device")

    with pytest.raises(OSError):
        atomic_write(target, fail)
    assert target.read_text() == "old" and sorted(p.name for p in tmp_path.iterdir()) == ["results.json"]
    for name in ("results.json.ab12.tmp", "metrics.csv.x9.tmp", "config.toml.q.tmp", "checkpoint.pt.z.tmp",
                 "notes.tmp"):
        (tmp_path / name).write_text("left by a kill")
    remove_stale_temporaries(tmp_path, ("checkpoint.pt", "results.json", "config.toml", "metrics.csv"))
    assert sorted(p.name for p in tmp_path.iterdir()) == ["notes.tmp", "results.json"]


def test_a_run_cleans_the_temporaries_a_killed_run_left(tmp_path, one_thread):
    out = tmp_path / "run"
    out.mkdir()
    for name in ("results.json.k1.tmp", "metrics.csv.k2.tmp", "config.toml.k3.tmp"):
        (out / name).write_text("torn")
    train(TrainConfig(subset=128, test_subset=64, resolutions=[16, 12], epochs=1, batch_size=64, workers=0,
                      out=str(out)))
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "config.toml", "metrics.csv", "results.json"]
    saved = tomllib.loads((out / "config.toml").read_text())
    assert config_from_dict(saved).resolutions == [16, 12]
    results = json.loads((out / "results.json").read_text())
    assert list(results["alpha_weights"]) == ["16", "12"]
    assert results["quant"]["left_full_precision"] == []


def test_a_config_saved_before_a_setting_existed_resumes_the_old_way():
    from rsq.config import config_from_dict

    saved = dataclasses.asdict(TrainConfig())
    assert config_from_dict(saved) == TrainConfig()  # a config with every key is read as written
    for key in ("distill_ramp", "head_grad", "conv_decay", "norm_lr_factor"):
        del saved[key]
    old = config_from_dict(saved)
    assert (old.distill_ramp, old.head_grad, old.conv_decay, old.norm_lr_factor) == (0.0, "sum", "single", 1.0)


def test_rsq_recipes_lists_every_recipe_and_prints_one_that_trains_the_same(tmp_path):
    code, out, _ = invoke("recipes")
    assert code == 0
    lines = out.splitlines()
    assert [line.split()[0] for line in lines[1:]] == recipe_names()
    w8 = next(line for line in lines if line.startswith("fashion_mnist_w8a8 "))
    assert "W8A8" in w8 and "quantized shortcut" in w8
    assert "quantized shortcut" not in next(line for line in lines if line.startswith("fashion_mnist_w4a4 "))
    code, text, _ = invoke("recipes", "fashion_mnist_w8a8")
    assert code == 0 and text == (REPO / "recipes" / "fashion_mnist_w8a8.toml").read_text()
    (tmp_path / "mine.toml").write_text(text)
    assert build_config(str(tmp_path / "mine.toml"), {}) == build_config("fashion_mnist_w8a8", {})
    code, _, err = invoke("recipes", "nosuch")
    assert code == 2 and len(err) == 1 and err[0].startswith("rsq: error: unknown recipe 'nosuch'"), err


def test_bits_option_replaces_the_recipes_bits_of_the_other_kind(tmp_path):
    from rsq.cli import apply_bits_option

    def config(recipe, bits, **flags):
        settings = {"weight_bits": None, "act_bits": None, **flags}
        apply_bits_option(bits, settings)
        return build_config(recipe, settings)

    joint = config("fashion_mnist_w4a4", [2, 4, 8])  # the recipe's weight_bits = act_bits = 4 give way
    assert (joint.bit_widths, joint.weight_bits, joint.act_bits) == ([8, 4, 2], 32, 32)
    assert config("fashion_mnist_w8a8", [4, 8]).quantized_shortcut is True
    (tmp_path / "joint.toml").write_text("bit_widths = [2, 4, 8, 32]\n")
    single = config(str(tmp_path / "joint.toml"), 4)  # and a recipe's list gives way to one bit width
    assert (single.bit_widths, single.weight_bits, single.act_bits) == ([], 4, 4)
    with pytest.raises(RsqError, match="drop weight_bits/act_bits"):
        config("fashion_mnist_w4a4", [2, 4], weight_bits=4)  # flags given next to a list still conflict
