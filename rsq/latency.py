"""CPU latency per resolution of a converted model or a finished run's checkpoint."""
from __future__ import annotations

import statistics
import time
from contextlib import contextmanager, nullcontext
from pathlib import Path
from typing import Callable, Iterable, Optional

import torch

from .errors import RsqError


@contextmanager
def torch_threads(threads: Optional[int]):
    """torch's intra-op thread count at ``threads`` for the block (None: as it is), the caller's after."""
    before = torch.get_num_threads()
    if threads is not None:
        torch.set_num_threads(threads)
    try:
        yield
    finally:
        torch.set_num_threads(before)


def median_ms(call: Callable[[], object], warmup: int = 1, min_calls: int = 3, budget_s: float = 0.0,
              max_calls: Optional[int] = None) -> float:
    """Median milliseconds of ``call()`` after ``warmup`` untimed calls (one-time work: sessions, compiles):
    ``min_calls`` timed calls, and more while the timed calls are within ``budget_s``, up to ``max_calls``."""
    for _ in range(warmup):
        call()
    times = []
    began = time.perf_counter()
    while len(times) < min_calls or (len(times) < (max_calls or min_calls)
                                     and time.perf_counter() - began < budget_s):
        start = time.perf_counter()
        call()
        times.append(time.perf_counter() - start)
    return 1000 * statistics.median(times)


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
    was_training = model.training
    model.eval()
    result = {}
    try:
        with torch_threads(threads):
            for resolution in resolutions:
                x = torch.randn(1, in_chans, resolution, resolution)
                with using_mode(model, resolution) if switchable else nullcontext():
                    result[int(resolution)] = median_ms(lambda: model(x), warmup=warmup, min_calls=repeats)
    finally:
        model.train(was_training)
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
