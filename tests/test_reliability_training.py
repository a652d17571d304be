"""Training reliability with real `rsq train` processes: DDP, kill + resume, agreed errors.

Every run is a subprocess with one thread per process (OMP_NUM_THREADS=1, as torchrun sets for
its workers), so runs compared for exact equality do the same arithmetic in the same order.

Measured tolerance, 2 gloo processes vs 1 process at the same global batch (64), on this file's
run (ResNet-20, 2048 images, 64 steps, lr 0.02), seeds 0-3: final top-1 per resolution differs by
1.0, 6.0, 1.3 and 3.9 points; epoch-mean losses by 0.3-2 % after epoch 1 and 1-4.5 % after
epoch 2. The cause is BN: each rank normalises with the statistics of its own 32 images, which
changes the path of this short, noisy run (its top-1 spreads over 62-72 % between seeds). On a
128-step run at batch 128 the top-1 gap was 0.5-0.75 points. The test allows 8 points of top-1,
5 % of loss after epoch 1 and 8 % after epoch 2 (README, "How close N processes are to one").
"""
from __future__ import annotations

import csv
import json
import os
import shutil
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch

ARGS = ["--subset", "2048", "--test-subset", "1000", "--resolutions", "16,12", "--batch-size", "64",
        "--epochs", "2", "--lr", "0.02", "--checkpoint-every", "5"]
RUN_FILES = {"checkpoint.pt", "config.toml", "metrics.csv", "results.json"}
TIMEOUT_S = 300  # per process; a hang fails the test instead of blocking the suite
TOP1_TOLERANCE = 8.0  # points, DDP vs one process (measured: at most 6.0 over 4 seeds)
LOSS_TOLERANCE = (0.05, 0.08)  # relative, epoch-mean losses after epochs 1 and 2 (measured: 2 %, 4.5 %)


def _env() -> dict:
    env = {k: v for k, v in os.environ.items() if k not in ("RANK", "WORLD_SIZE", "LOCAL_RANK", "MASTER_ADDR",
                                                              "MASTER_PORT")}
    env.update(OMP_NUM_THREADS="1", RSQ_DIST_TIMEOUT_S="120", PYTHONWARNINGS="ignore")
    return env


def _rsq(*argv, cwd: Path) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-m", "rsq.cli", *map(str, argv)], cwd=cwd, env=_env(),
                          capture_output=True, text=True, timeout=TIMEOUT_S)


def _torchrun(*argv, cwd: Path, nproc: int = 2) -> subprocess.CompletedProcess:
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", str(nproc), "--standalone",
               "-m", "rsq.cli", *map(str, argv)]
    return subprocess.run(command, cwd=cwd, env=_env(), capture_output=True, text=True, timeout=TIMEOUT_S)


def _results(run: Path) -> dict:
    return json.loads((run / "results.json").read_text())


def _metrics(run: Path) -> list[dict]:
    with open(run / "metrics.csv") as f:
        return list(csv.DictReader(f))


def _error_lines(stderr: str) -> list[str]:
    return [line for line in stderr.splitlines() if line.startswith("rsq: error:")]


@pytest.fixture(scope="module")
def reference(tmp_path_factory) -> Path:
    """One uninterrupted single-process run, the yardstick for DDP and for resume."""
    root = tmp_path_factory.mktemp("reference")
    proc = _rsq("train", *ARGS, "--out", "run", cwd=root)
    assert proc.returncode == 0, proc.stderr[-2000:]
    return root / "run"


def test_ddp_two_processes_match_one_process(reference, tmp_path):
    proc = _torchrun("train", *ARGS, "--out", "ddp", cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    ddp = tmp_path / "ddp"

    # Only rank 0 writes and prints: the run files once, each epoch line once.
    assert {p.name for p in ddp.iterdir()} == RUN_FILES
    assert proc.stdout.count("epoch 2/2:") == 1
    ckpt = torch.load(ddp / "checkpoint.pt", weights_only=True)
    assert ckpt["world_size"] == 2 and ckpt["complete"]

    one, two = _results(reference), _results(ddp)
    assert [row["resolution"] for row in one["rows"]] == [row["resolution"] for row in two["rows"]]
    for a, b in zip(one["rows"], two["rows"]):
        assert abs(a["top1"] - b["top1"]) <= TOP1_TOLERANCE, (a, b)
    assert abs(one["ensemble"]["top1"] - two["ensemble"]["top1"]) <= TOP1_TOLERANCE
    for a, b, tolerance in zip(_metrics(reference), _metrics(ddp), LOSS_TOLERANCE, strict=True):
        for key in ("loss", "loss_ce", "loss_ens"):
            assert abs(float(a[key]) - float(b[key])) <= tolerance * float(a[key]), (key, a, b)


def test_ddp_error_on_rank0_stops_every_rank(reference, tmp_path):
    """Rank 0 refuses the out folder; rank 1 must leave too (no hang), with one error line."""
    run = tmp_path / "run"
    shutil.copytree(reference, run)
    before = {p.name: p.read_bytes() for p in run.iterdir()}
    began = time.monotonic()
    proc = _torchrun("train", *ARGS, "--out", run, cwd=tmp_path)
    assert proc.returncode != 0
    assert time.monotonic() - began < 100  # far below the 120 s collective timeout set in _env
    lines = _error_lines(proc.stderr)
    assert len(lines) == 1 and "already holds a run" in lines[0], proc.stderr[-3000:]
    assert "exitcode  : 2" in proc.stderr  # the ranks ended through the CLI's error path
    assert {p.name: p.read_bytes() for p in run.iterdir()} == before


def test_sigkill_mid_epoch_then_resume_equals_uninterrupted(reference, tmp_path):
    run = tmp_path / "run"
    with open(tmp_path / "killed.log", "w") as log:
        proc = subprocess.Popen([sys.executable, "-m", "rsq.cli", "train", *ARGS, "--out", str(run)], cwd=tmp_path,
                                env=_env(), stdout=log, stderr=subprocess.STDOUT)
        try:
            deadline = time.monotonic() + TIMEOUT_S
            while True:
                assert proc.poll() is None, "the run ended before a mid-epoch checkpoint was seen"
                assert time.monotonic() < deadline, "no mid-epoch checkpoint appeared"
                if (run / "checkpoint.pt").exists():
                    # The file is replaced atomically, so a read sees one whole checkpoint.
                    if torch.load(run / "checkpoint.pt", weights_only=True)["step"] > 0:
                        break
                time.sleep(0.02)
            os.kill(proc.pid, signal.SIGKILL)
        finally:
            proc.kill()
            proc.wait()
    killed = torch.load(run / "checkpoint.pt", weights_only=True)
    assert killed["step"] > 0 and not killed["complete"]
    assert not (run / "results.json").exists()
    # A write that a SIGKILL interrupts leaves a temporary file; resume removes it.
    (run / "checkpoint.pt.zz_leftover.tmp").write_bytes(b"partial")

    proc = _rsq("train", "--resume", run, cwd=tmp_path)
    assert proc.returncode == 0, proc.stderr[-3000:]
    assert not (run / "checkpoint.pt.zz_leftover.tmp").exists()

    # Exactly equal on the CPU: results, every logged loss, and every tensor of the final state.
    one, two = _results(reference), _results(run)
    for key in ("rows", "ensemble", "alpha_weights"):
        assert one[key] == two[key], key
    for a, b in zip(_metrics(reference), _metrics(run), strict=True):
        a.pop("images_per_s"), b.pop("images_per_s")
        assert a == b
    ref_ckpt = torch.load(reference / "checkpoint.pt", weights_only=True)
    new_ckpt = torch.load(run / "checkpoint.pt", weights_only=True)
    for part in ("model", "ensemble"):
        assert ref_ckpt[part].keys() == new_ckpt[part].keys()
        for name, tensor in ref_ckpt[part].items():
            assert torch.equal(tensor, new_ckpt[part][name]), name
    for index, state in ref_ckpt["optimizer"]["state"].items():
        assert torch.equal(state["momentum_buffer"], new_ckpt["optimizer"]["state"][index]["momentum_buffer"])
