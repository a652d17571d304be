"""A training step's modes on two CPU threads, each mode whole on one thread.

On a 2-core CPU the step of a small network (ResNet-20 at 12-28 px, 16-64 channels) uses two
intra-op threads poorly: each convolution, BatchNorm and ReLU is split in two, and most of them
are too small for the halves to pay for the split. Running whole modes side by side instead,
each on one thread with one intra-op thread, keeps both cores busy with serial kernels.

What the step computes does not change: the forward of every mode, the loss on the main thread,
then the gradient of the loss with respect to each mode's logits, and each mode's backward from
there. Because every MRED teacher is detached, the loss's gradient with respect to the weights is
exactly the sum over modes of those per-mode backwards. The per-mode gradients are summed in mode
order, so a run repeats exactly whatever thread finished first.

Used for one process on the CPU (no DDP, no torch.compile), with at least two torch threads, once
every lazily initialised quantizer has seen its first batch, and not with LQ-Nets quantizers, whose
training forward refits levels shared by all modes (they must take turns). With `--amp bf16` each
mode thread enters the caller's autocast (autocast is per thread).
"""
from __future__ import annotations

from concurrent.futures import ThreadPoolExecutor
from typing import Any, Callable, Sequence

import torch
from torch import nn

THREADS = 2


def _one_intra_op_thread() -> None:
    # OpenMP's thread count is per calling thread: this leaves the main thread's setting alone.
    torch.set_num_threads(1)


class ModeThreads:
    """A pool of two threads that run forwards and backwards of whole modes."""

    def __init__(self, threads: int = THREADS):
        self.threads = threads
        self.pool = ThreadPoolExecutor(threads, initializer=_one_intra_op_thread,
                                       thread_name_prefix="rsq-mode")

    def _map(self, fn: Callable[[int], Any], costs: Sequence[float]) -> list:
        """[fn(i) for every mode i], in mode order; the costliest modes start first, so the threads end together."""
        order = sorted(range(len(costs)), key=lambda i: -costs[i])
        done = dict(zip(order, self.pool.map(fn, order)))
        return [done[i] for i in range(len(costs))]

    def forward(self, run_mode: Callable[[int], torch.Tensor], costs: Sequence[float]) -> list[torch.Tensor]:
        """[run_mode(i) for every mode i], the modes side by side."""
        return self._map(run_mode, costs)

    def backward(self, loss: torch.Tensor, outputs: list[torch.Tensor], costs: Sequence[float],
                 params: list[nn.Parameter], extra: list[nn.Parameter]) -> None:
        """Set ``.grad`` of ``params`` (through ``outputs``) and ``extra`` (reached from ``loss``
        directly, e.g. MRED's alpha) to d loss / d p, as ``loss.backward()`` would."""
        first = torch.autograd.grad(loss, list(outputs) + list(extra), allow_unused=True)
        grad_outputs, grad_extra = first[:len(outputs)], first[len(outputs):]
        for p, g in zip(extra, grad_extra):
            _accumulate(p, g)

        def mode_backward(i: int):
            if grad_outputs[i] is None:
                return [None] * len(params)
            return torch.autograd.grad(outputs[i], params, grad_outputs[i], allow_unused=True)

        per_mode = self._map(mode_backward, costs)
        for j, p in enumerate(params):
            for i in range(len(outputs)):  # mode order: the same sum every run
                _accumulate(p, per_mode[i][j])


def _accumulate(p: torch.Tensor, g) -> None:
    if g is None:
        return
    p.grad = g.detach().clone() if p.grad is None else p.grad.add_(g)


def quantizers_ready(model: nn.Module) -> bool:
    """Every lazily initialised quantizer has taken its first batch (its init reads that batch)."""
    return all(bool(b) for name, b in model.named_buffers() if name.endswith("initialized"))
