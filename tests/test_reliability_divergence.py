"""A NaN / infinite loss or non-finite weights stop the run, name the step, and keep the last good checkpoint.

The runs are in-process (rsq.cli.main) so the tests can watch every checkpoint write: each
``atomic_save`` is wrapped to record the bytes it left on disk, and after the failure the file
must be exactly the last one recorded.
"""
from __future__ import annotations

import hashlib

import pytest
import torch

import rsq.train
from rsq.cli import main

SMALL = ["--subset", "512", "--test-subset", "128", "--resolutions", "16,12", "--batch-size", "64", "--epochs", "2"]


pytestmark = pytest.mark.usefixtures("one_thread")


@pytest.fixture
def saved(monkeypatch) -> list[tuple[int, int, str]]:
    """(epoch, step, sha256 of the file) for every checkpoint the run writes."""
    writes = []
    real_save = rsq.train.atomic_save

    def recording_save(obj, path):
        real_save(obj, path)
        writes.append((obj["epoch"], obj["step"], hashlib.sha256(path.read_bytes()).hexdigest()))

    monkeypatch.setattr(rsq.train, "atomic_save", recording_save)
    return writes


def _run(capsys, *argv) -> tuple[int, list[str]]:
    code = main([str(a) for a in argv])
    return code, capsys.readouterr().err.strip().splitlines()


def _assert_last_good_intact(run, saved):
    ckpt_file = run / "checkpoint.pt"
    assert hashlib.sha256(ckpt_file.read_bytes()).hexdigest() == saved[-1][2]
    ckpt = torch.load(ckpt_file, weights_only=True)
    assert (ckpt["epoch"], ckpt["step"]) == saved[-1][:2]
    assert all(torch.isfinite(t).all() for t in ckpt["model"].values() if t.is_floating_point())


def test_absurd_lr_stops_with_the_step_and_keeps_the_checkpoint(tmp_path, capsys, saved):
    run = tmp_path / "run"
    code, err = _run(capsys, "train", *SMALL, "--checkpoint-every", "1", "--lr", "1e6", "--out", run)
    assert code == 2
    assert len(err) == 1, err
    # The loss turns NaN, or (caught first) the BN statistics of a blown-up forward turn inf.
    assert err[0].startswith(("rsq: error: loss became nan", "rsq: error: loss became inf",
                              "rsq: error: weights or BN statistics became non-finite"))
    assert "epoch 1, step " in err[0] and "is the last good checkpoint" in err[0]
    assert saved, "a checkpoint is written after step 1, before the loss can blow up"
    epoch, step, _ = saved[-1]
    assert f"(epoch {epoch + 1}, step {step}) is the last good checkpoint" in err[0]
    failed_step = int(err[0].split("epoch 1, step ")[1].split(" ")[0].rstrip(";"))
    assert failed_step == step + 1  # checkpoint every step: the last good one is just before
    _assert_last_good_intact(run, saved)
    assert not (run / "results.json").exists() and not (run / "metrics.csv").exists()


def test_nan_on_the_first_step_says_no_checkpoint_exists(tmp_path, capsys, monkeypatch, saved):
    real_loss = rsq.train.mred_loss

    def nan_loss(*args, **kwargs):
        parts = real_loss(*args, **kwargs)
        parts.total = parts.total * float("nan")
        return parts

    monkeypatch.setattr(rsq.train, "mred_loss", nan_loss)
    code, err = _run(capsys, "train", *SMALL, "--out", tmp_path / "run")
    assert code == 2 and len(err) == 1, err
    assert "loss became nan at epoch 1, step 1 (global step 1" in err[0]
    assert "no checkpoint had been written yet" in err[0]
    assert saved == [] and not (tmp_path / "run" / "checkpoint.pt").exists()


def test_non_finite_weights_are_never_checkpointed(tmp_path, capsys, monkeypatch, saved):
    """Weights that turn inf after the loss was checked (a huge gradient) must not reach the file."""
    calls = {"n": 0}
    real_step = torch.optim.SGD.step

    def poisoning_step(self, *args, **kwargs):
        out = real_step(self, *args, **kwargs)
        calls["n"] += 1
        if calls["n"] == 4:
            with torch.no_grad():
                # a model weight (the largest parameter), whichever group the recipe puts it in
                max((p for group in self.param_groups for p in group["params"]), key=torch.numel).fill_(float("inf"))
        return out

    monkeypatch.setattr(torch.optim.SGD, "step", poisoning_step)
    run = tmp_path / "run"
    code, err = _run(capsys, "train", *SMALL, "--checkpoint-every", "2", "--out", run)
    assert code == 2 and len(err) == 1, err
    assert "weights or BN statistics became non-finite by epoch 1, step 4" in err[0]
    assert "(epoch 1, step 2) is the last good checkpoint" in err[0]
    assert [(e, s) for e, s, _ in saved] == [(0, 2)]
    _assert_last_good_intact(run, saved)
