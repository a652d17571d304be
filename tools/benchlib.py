"""Shared by the accuracy benchmarks: run `rsq train` in a subprocess, read its results."""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import time
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path


def run_train(name: str, flags: list[str], work: str, threads: int) -> dict:
    """One `rsq train` process with ``threads`` threads; returns its results.json (+ wall_s)."""
    out = Path(work) / name
    cmd = [sys.executable, "-m", "rsq.cli", "train", "--out", str(out), "--overwrite", *flags]
    env = {**os.environ, "OMP_NUM_THREADS": str(threads)}
    began = time.perf_counter()
    done = subprocess.run(cmd, env=env, capture_output=True, text=True)
    if done.returncode != 0:
        raise SystemExit(f"{name} failed ({' '.join(cmd)}):\n{done.stderr[-2000:]}")
    result = json.loads((out / "results.json").read_text())
    result["wall_s"] = round(time.perf_counter() - began, 1)
    print(f"{name}: {result['wall_s']} s", flush=True)
    return result


def finished_run(work: str, name: str) -> dict | None:
    """The results.json of a run that already finished in ``work``, or None."""
    path = Path(work) / name / "results.json"
    return json.loads(path.read_text()) if path.is_file() else None


def top1(result: dict, resolution: int) -> float:
    return next(row["top1"] for row in result["rows"] if row["resolution"] == resolution)


def write_outputs(out: str, lines: list[str], payload: dict) -> None:
    Path(out).parent.mkdir(parents=True, exist_ok=True)
    Path(out + ".md").write_text("\n".join(lines) + "\n")
    Path(out + ".json").write_text(json.dumps(payload, indent=1))
    print("\n".join(lines))


def run_configs(configs: dict[str, list[str]], common: list[str], work: str, threads: int, jobs: int,
                reuse: bool = False) -> dict[str, dict]:
    """Every config as `rsq train COMMON FLAGS`, ``jobs`` at a time; ``reuse`` keeps runs finished in ``work``."""
    def run(name: str) -> dict:
        done = finished_run(work, name) if reuse else None
        return done if done is not None else run_train(name, common + configs[name], work, threads)

    with ThreadPoolExecutor(jobs) as pool:
        return dict(zip(configs, pool.map(run, configs)))


def cpu_name() -> str:
    """lscpu's model name and the SIMD flags that decide CPU speed (AVX2, AVX-512, AMX)."""
    try:
        text = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    except OSError:
        return platform.processor() or "unknown CPU"
    fields = dict(line.split(":", 1) for line in text.splitlines() if ":" in line)
    flags = fields.get("Flags", "").split()
    simd = [f for f in flags if f.startswith(("avx", "amx")) or f in ("fma", "f16c")]
    return f"{fields.get('Model name', '?').strip()} ({', '.join(simd)})"
