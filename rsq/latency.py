"""CPU latency per resolution of a converted model or a finished run's checkpoint."""
from __future__ import annotations

import statistics
import time
from contextlib import nullcontext
from pathlib import Path
from typing import Iterable, Optional

import torch

from .errors import RsqError


@torch.inference_mode()
def measure_latency(model: torch.nn.Module, resolutions: Iterable[int], in_chans: int,
                    repeats: int = 30, warmup: int = 5,
                    threads: Optional[int] = 1) -> dict[int, float]:
    """Median CPU milliseconds per image at batch 1 for each resolution, after warm-up.

    One thread by default: at batch 1 more threads gain little, and they make the numbers
    collapse (100x slower) when other jobs share the cores. ``threads=None`` keeps torch's.
    """
    from .convert import mode_state, using_mode

    if repeats < 1:
        raise RsqError(f"latency repeats must be at least 1, not {repeats}")
    if threads is not None and threads < 1:
        raise RsqError(f"latency threads must be at least 1, not {threads}")
    try:
        mode_state(model)
        switchable = True
    except RsqError:
        switchable = False
    was_training, old_threads = model.training, torch.get_num_threads()
    model.eval()
    torch.set_num_threads(threads or old_threads)
    result = {}
    try:
        for resolution in resolutions:
            x = torch.randn(1, in_chans, resolution, resolution)
            with using_mode(model, resolution) if switchable else nullcontext():
                for _ in range(warmup):
                    model(x)
                times = []
                for _ in range(repeats):
                    start = time.perf_counter()
                    model(x)
                    times.append(time.perf_counter() - start)
            result[int(resolution)] = statistics.median(times) * 1000
    finally:
        model.train(was_training)
        torch.set_num_threads(old_threads)
    return result


def run_latency(run: dict, repeats: int = 30, threads: Optional[int] = 1) -> dict[int, float]:
    """Latency of every resolution of ``run`` that its checkpoint's model knows."""
    from .checkpoint import load_model
    from .convert import resolutions_of

    checkpoint = Path(run["run_dir"]) / "checkpoint.pt"
    if not checkpoint.is_file():
        raise RsqError(f"run {run['run']!r} has no checkpoint.pt, which --latency needs")
    model, _meta = load_model(checkpoint)
    known = set(resolutions_of(model))
    wanted = sorted({int(r["resolution"]) for r in run["rows"]} & known, reverse=True)
    return measure_latency(model, wanted, int(run.get("in_chans", 3)), repeats=repeats,
                           threads=threads)
