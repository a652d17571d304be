"""Training end to end on a Fashion-MNIST subset: it learns at every resolution, writes the run
files with the documented schema, and repeats exactly with the same seed on the CPU."""
import csv
import json
import math
import tomllib

import pytest
import torch

from rsq.checkpoint import build_model, load_checkpoint
from rsq.config import TrainConfig
from rsq.models import create_model
from rsq.runs import evaluate_checkpoint
from rsq.train import train

RES = [28, 20, 12]


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
    out = tmp_path_factory.mktemp("learn") / "run"
    # About 95 steps of three resolutions; ~20 s on 2 idle cores.
    config = TrainConfig(model="resnet20", subset=2000, test_subset=1000, resolutions=[12, 28, 20], epochs=3,
                         batch_size=64, lr=0.05, seed=0, workers=0, out=str(out))
    results = train(config)
    return config, results, out


def test_learns_well_above_chance_at_every_resolution(trained):
    _, results, _ = trained
    top1 = {row["resolution"]: row["top1"] for row in results["rows"]}
    assert list(top1) == RES  # largest first, whatever order the config listed
    for r, acc in top1.items():
        assert acc >= 50.0, f"{r}px: top-1 {acc:.1f}% (chance is 10%)"
    assert results["ensemble"]["top1"] >= 50.0
    for row in results["rows"]:
        assert row["top5"] >= row["top1"]


def _resnet20_macs(r, in_chans=1, classes=10, width=16):
    """conv + linear MACs of the CIFAR ResNet-20 with 1x1 projection shortcuts, by hand."""
    out = lambda size, stride: (size - 1) // stride + 1  # noqa: E731 (3x3 pad 1 and 1x1 pad 0 alike)
    macs, size, c_in = width * r * r * in_chans * 9, r, width
    for stage in range(3):
        c_out = width * 2**stage
        for block in range(3):
            stride = 2 if (stage > 0 and block == 0) else 1
            size_out = out(size, stride)
            macs += c_out * size_out**2 * c_in * 9 + c_out * size_out**2 * c_out * 9
            if stride != 1 or c_in != c_out:
                macs += c_out * size_out**2 * c_in
            size, c_in = size_out, c_out
    return macs + c_in * classes


def test_run_files_and_their_schema(trained):
    config, results, out = trained
    for name in ("results.json", "metrics.csv", "config.toml", "checkpoint.pt"):
        assert (out / name).is_file(), name

    on_disk = json.loads((out / "results.json").read_text())
    assert on_disk == json.loads(json.dumps(results))
    assert on_disk["kind"] == "rsq-results" and on_disk["format_version"] == 1
    assert (on_disk["model"], on_disk["data"], on_disk["num_classes"], on_disk["in_chans"]) == \
        ("resnet20", "fashion_mnist", 10, 1)
    assert (on_disk["epochs"], on_disk["distill"], on_disk["seed"]) == (3, "full", 0)
    assert on_disk["quant"] == {"label": "FP", "weight_bits": 32, "act_bits": 32, "bit_widths": [],
                                "quantizer": None, "first_last": None, "quantized_shortcut": False,
                                "residual_bits": 32, "left_full_precision": []}
    params = sum(p.numel() for p in create_model("resnet20", 10, 1).parameters())
    for row, r in zip(on_disk["rows"], RES):
        assert row["resolution"] == r
        assert (row["bits"], row["weight_bits"], row["act_bits"], row["calibrated"]) == ("FP", 32, 32, False)
        assert row["macs"] == _resnet20_macs(r)
        assert row["bitops"] == row["macs"] * 32 * 32
        assert row["params"] == params
        assert row["weight_size_bits"] == 32 * params
        assert 0 <= row["top1"] <= row["top5"] <= 100
    assert set(on_disk["ensemble"]) == {"top1", "top5"}
    weights = on_disk["alpha_weights"]
    assert set(weights) == {str(r) for r in RES}
    assert sum(weights.values()) == pytest.approx(1.0, abs=1e-3)
    assert on_disk["train_time_s"] > 0

    with open(out / "metrics.csv", newline="") as f:
        rows = list(csv.DictReader(f))
    assert [int(r["epoch"]) for r in rows] == [1, 2, 3]
    for column in ["loss", "loss_ce", "loss_ens", "loss_kd", "lr", "images_per_s", "top1_ensemble"] + \
            [f"top1_{r}" for r in RES]:
        assert column in rows[0], column
    for r, row in zip(RES, on_disk["rows"]):
        assert float(rows[-1][f"top1_{r}"]) == pytest.approx(row["top1"], abs=1e-3)
    for row in rows:  # the total is the sum of its parts
        parts = float(row["loss_ce"]) + float(row["loss_ens"]) + float(row["loss_kd"])
        assert float(row["loss"]) == pytest.approx(parts, rel=1e-3)
    assert float(rows[-1]["loss"]) < float(rows[0]["loss"])

    saved = tomllib.loads((out / "config.toml").read_text())
    assert saved == config.to_dict()
    assert saved["resolutions"] == RES

    ckpt = load_checkpoint(out / "checkpoint.pt")
    assert ckpt["format"] == "rsq-checkpoint" and ckpt["complete"] is True
    assert (ckpt["epoch"], ckpt["step"], ckpt["resolutions"]) == (3, 0, RES)
    assert (ckpt["num_classes"], ckpt["in_chans"]) == (10, 1)
    assert len(ckpt["history"]) == 3
    alpha = ckpt["ensemble"]["alpha"]
    assert alpha.shape == (3,)
    for r, w in zip(RES, torch.softmax(alpha, 0).tolist()):
        assert weights[str(r)] == pytest.approx(w, abs=1e-4)


def test_checkpoint_reproduces_the_reported_accuracy(trained, capsys):
    config, results, out = trained
    again = evaluate_checkpoint(out / "checkpoint.pt")
    for a, b in zip(again["rows"], results["rows"]):
        assert a["resolution"] == b["resolution"]
        assert a["top1"] == pytest.approx(b["top1"], abs=0.25)
    assert again["ensemble"]["top1"] == pytest.approx(results["ensemble"]["top1"], abs=0.25)
    table = capsys.readouterr().out
    assert "| 28 | FP |" in table and "| ensemble |" in table


def _short_run(out, seed):
    config = TrainConfig(model="resnet20", subset=256, test_subset=200, resolutions=[28, 16], epochs=1,
                         batch_size=64, seed=seed, workers=0, out=str(out))
    results = train(config)
    return results, load_checkpoint(out / "checkpoint.pt")


def test_same_seed_repeats_exactly_on_the_cpu(tmp_path):
    first, ckpt1 = _short_run(tmp_path / "a", seed=0)
    second, ckpt2 = _short_run(tmp_path / "b", seed=0)
    other, ckpt3 = _short_run(tmp_path / "c", seed=1)
    assert [r["top1"] for r in first["rows"]] == [r["top1"] for r in second["rows"]]
    assert first["ensemble"] == second["ensemble"]
    assert ckpt1["model"].keys() == ckpt2["model"].keys()
    for key, value in ckpt1["model"].items():
        assert torch.equal(value, ckpt2["model"][key]), key
    assert torch.equal(ckpt1["ensemble"]["alpha"], ckpt2["ensemble"]["alpha"])
    # another seed is another run: the comparison above is not vacuous
    assert not torch.equal(ckpt1["model"]["conv1.weight"], ckpt3["model"]["conv1.weight"])
    # and training moved the weights away from their initialisation
    torch.manual_seed(0)
    init = create_model("resnet20", 10, 1, resolutions=[28, 16]).state_dict()
    assert not torch.equal(init["fc.weight"], ckpt1["model"]["fc.weight"])
    # the ensemble weights were trained too (alpha starts at ones)
    assert not torch.equal(ckpt1["ensemble"]["alpha"], torch.ones(2))
    model = build_model(ckpt1)
    assert math.isfinite(sum(p.sum().item() for p in model.parameters()))
