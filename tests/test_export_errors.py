"""Every bad input to integer export is a one-line RsqError, and a failed export leaves nothing behind."""
import sys

import pytest
import torch

import rsq
from rsq.checkpoint import FORMAT, VERSION
from rsq.config import TrainConfig
from rsq.errors import RsqError
from rsq.export import export_checkpoint
from rsq.export.lower import lower
from rsq.quantize import QuantConfig, quantize_

pytestmark = pytest.mark.usefixtures("one_thread")
RESOLUTIONS = [16, 12]


def quick_model(bits=4, quantizer="lsq", first_last="8"):
    """An untrained RS-Net whose quantizers and BN statistics were initialised on random images."""
    torch.manual_seed(0)
    model = rsq.create_model("resnet20", num_classes=10, in_chans=1)
    rsq.convert(model, RESOLUTIONS)
    if bits != 32:
        quantize_(model, QuantConfig(bits, bits, quantizer=quantizer, first_last=first_last))
    model.train()
    with torch.no_grad():
        for r in RESOLUTIONS:
            model(torch.randn(8, 1, r, r))
    return model.eval()


def save_checkpoint(path, bits=4, quantizer="lsq", first_last="8"):
    model = quick_model(bits, quantizer, first_last)
    config = TrainConfig(weight_bits=bits, act_bits=bits, quantizer=quantizer, first_last=first_last,
                         resolutions=RESOLUTIONS)
    torch.save({"format": FORMAT, "version": VERSION, "config": config.to_dict(), "num_classes": 10, "in_chans": 1,
                "resolutions": RESOLUTIONS, "calibrated": {}, "model": model.state_dict()}, path)
    return path


@pytest.fixture(scope="module")
def checkpoint(tmp_path_factory):
    return save_checkpoint(tmp_path_factory.mktemp("ckpt") / "checkpoint.pt")


def one_line(error) -> str:
    text = str(error.value)
    assert "\n" not in text
    return text


def test_missing_truncated_and_foreign_checkpoints(tmp_path, checkpoint):
    with pytest.raises(RsqError, match="does not exist") as error:
        export_checkpoint(tmp_path / "nope.pt", "packed", tmp_path / "out")
    one_line(error)
    truncated = tmp_path / "truncated.pt"
    truncated.write_bytes(checkpoint.read_bytes()[:5000])
    with pytest.raises(RsqError, match="not a readable rsq checkpoint"):
        export_checkpoint(truncated, "packed", tmp_path / "out")
    foreign = tmp_path / "foreign.pt"
    torch.save({"weights": torch.zeros(3)}, foreign)
    with pytest.raises(RsqError, match="not an rsq checkpoint"):
        export_checkpoint(foreign, "packed", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_unknown_format_and_resolution(tmp_path, checkpoint):
    with pytest.raises(RsqError, match="unknown export format 'tflite'"):
        export_checkpoint(checkpoint, "tflite", tmp_path / "out")
    with pytest.raises(RsqError, match=r"resolution\(s\) \[20\] unknown") as error:
        export_checkpoint(checkpoint, "packed", tmp_path / "out", resolutions=[20])
    one_line(error)
    assert not (tmp_path / "out").exists()


@pytest.mark.parametrize("bits, quantizer, first_last, message", [
    (32, "lsq", "8", "full-precision checkpoint"),
    (4, "lqnet", "8", "lqnet quantizer"),
    (4, "lsq", "fp", "layer conv1 has full-precision activation"),
])
def test_checkpoints_without_an_integer_form(tmp_path, bits, quantizer, first_last, message):
    path = save_checkpoint(tmp_path / "checkpoint.pt", bits, quantizer, first_last)
    with pytest.raises(RsqError, match=message) as error:
        export_checkpoint(path, "packed", tmp_path / "out")
    one_line(error)
    assert sorted(p.name for p in tmp_path.iterdir()) == ["checkpoint.pt"]


def test_lower_names_lqnet_and_unsupported_layers():
    with pytest.raises(RsqError, match="layer conv1 uses LQ-Nets"):
        lower(quick_model(4, "lqnet"))
    model = rsq.create_model("resnet18", num_classes=10)
    rsq.convert(model, [32])
    quantize_(model, QuantConfig(4, 4))
    model.maxpool.ceil_mode = True
    with pytest.raises(RsqError, match="max pooling maxpool with dilation, ceil_mode"):
        lower(model)
    model.maxpool = torch.nn.AvgPool2d(3, 2, 1)  # max pooling is supported; other poolings are named
    with pytest.raises(RsqError, match=r"does not support layer maxpool \(AvgPool2d\)"):
        lower(model)


def test_missing_onnx_package_names_what_to_install(tmp_path, checkpoint, monkeypatch):
    monkeypatch.setitem(sys.modules, "onnx", None)
    with pytest.raises(RsqError, match="pip install onnx"):
        export_checkpoint(checkpoint, "onnx", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_existing_exports_are_refused_unless_overwrite(tmp_path, checkpoint):
    out = tmp_path / "out"
    export_checkpoint(checkpoint, "packed", out)
    with pytest.raises(RsqError, match="already holds a packed export"):
        export_checkpoint(checkpoint, "packed", out)
    assert export_checkpoint(checkpoint, "packed", out, overwrite=True) == out / "packed"
    other = tmp_path / "other"
    other.mkdir()
    (other / "notes.txt").write_text("mine")
    with pytest.raises(RsqError, match="not an rsq export"):
        export_checkpoint(checkpoint, "packed", other, overwrite=True)
    assert (other / "notes.txt").read_text() == "mine"
    assert sorted(p.name for p in tmp_path.iterdir() if p.name.startswith(".")) == []


def test_failed_export_leaves_nothing(tmp_path, checkpoint, monkeypatch):
    import rsq.export.packed

    def broken(model, folder):
        folder.mkdir(parents=True)
        (folder / "weights.bin").write_bytes(b"partial")
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(rsq.export.packed, "write_packed", broken)
    with pytest.raises(RsqError, match="No space left on device"):
        export_checkpoint(checkpoint, "packed", tmp_path / "out")
    assert sorted(p.name for p in tmp_path.iterdir()) == []


def test_damaged_packed_exports_are_one_line_errors(tmp_path, checkpoint):
    from rsq.runtime import load

    with pytest.raises(RsqError, match="not a packed rsq export"):
        load(tmp_path)
    packed = export_checkpoint(checkpoint, "packed", tmp_path / "out")
    weights = packed / "weights.bin"
    weights.write_bytes(weights.read_bytes()[:100])
    with pytest.raises(RsqError, match="truncated") as error:
        load(packed)
    one_line(error)
    (packed / "manifest.json").write_text('{"format": "rsq-packed", "version": 99}')
    with pytest.raises(RsqError, match="newer rsq"):
        load(packed)


def test_a_second_format_must_share_the_resolutions(tmp_path, checkpoint):
    out = tmp_path / "out"
    export_checkpoint(checkpoint, "packed", out, resolutions=[16])
    with pytest.raises(RsqError, match=r"resolutions \[16\], not \[16, 12\]"):
        export_checkpoint(checkpoint, "onnx", out)
    export_checkpoint(checkpoint, "onnx", out, resolutions=[16])
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "export.json", "onnx", "packed"]
    export_checkpoint(checkpoint, "onnx", out, overwrite=True)  # another resolution set: a fresh folder
    assert sorted(p.name for p in out.iterdir()) == ["checkpoint.pt", "export.json", "onnx"]


def test_export_snaps_biases_unless_told_not_to_and_keeps_one_kind_per_folder(tmp_path, checkpoint, capsys):
    """The export's checkpoint.pt is the model as exported: its BN shifts snapped (rsq.export.snap) by default,
    the checkpoint's own with --no-snap; a folder holds one kind, and mixing them is one clear line."""
    import json

    from rsq.cli import main

    source = torch.load(checkpoint, weights_only=False)["model"]
    snapped, plain = tmp_path / "snapped", tmp_path / "plain"
    export_checkpoint(checkpoint, "packed", snapped)
    info = json.loads((snapped / "export.json").read_text())["bias_snap"]
    assert info["snapped"] and info["convs"] > 0 and 0 < info["largest_move"] <= 0.5
    stored = torch.load(snapped / "checkpoint.pt", weights_only=False)["model"]
    changed = sorted(k for k in source if not torch.equal(source[k], stored[k]))
    assert changed and all(k.endswith(".bias") and ".bn" in k.replace("downsample.1", "bn") for k in changed)
    with pytest.raises(RsqError, match="holds an export with snapped biases") as error:
        export_checkpoint(checkpoint, "onnx", snapped, snap=False)
    one_line(error)
    assert main(["export", str(checkpoint), "--format", "packed", "--out", str(plain), "--no-snap"]) == 0
    stored = torch.load(plain / "checkpoint.pt", weights_only=False)["model"]
    assert all(torch.equal(source[k], stored[k]) for k in source)
    assert not json.loads((plain / "export.json").read_text())["bias_snap"]["snapped"]
    assert main(["export", str(checkpoint), "--format", "onnx", "--out", str(plain)]) == 2
    assert "holds an export without snapped biases" in capsys.readouterr().err
    export_checkpoint(checkpoint, "onnx", plain, overwrite=True)  # replaced whole: snapped now
    assert sorted(p.name for p in plain.iterdir()) == ["checkpoint.pt", "export.json", "onnx"]
