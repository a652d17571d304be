"""Distributed plumbing for training: the rank layout, the process group, agreed errors.

``torchrun`` puts RANK / WORLD_SIZE / LOCAL_RANK in the environment; gloo runs on the CPU and
NCCL on CUDA. ``agreed`` makes an error on any rank an error on every rank, so that no rank is
left waiting in a collective.
"""
from __future__ import annotations

import contextlib
import os
from dataclasses import dataclass
from datetime import timedelta
from typing import Optional

import torch
import torch.distributed as dist
from torch import nn

from .errors import RsqError

# How long a rank waits in a collective (and at start-up for the others) before giving up.
DEFAULT_DIST_TIMEOUT_S = 1800

@dataclass
class Dist:
    rank: int = 0
    world_size: int = 1
    local_rank: int = 0

    @property
    def main(self) -> bool:
        return self.rank == 0


def world_from_env() -> Dist:
    """The rank layout torchrun puts in the environment; one process when it is absent."""
    try:
        info = Dist(int(os.environ.get("RANK", "0")), int(os.environ.get("WORLD_SIZE", "1")),
                    int(os.environ.get("LOCAL_RANK", "0")))
    except ValueError:
        raise RsqError("RANK, WORLD_SIZE and LOCAL_RANK must be integers (torchrun sets them)") from None
    if info.world_size < 1 or not 0 <= info.rank < info.world_size or info.local_rank < 0:
        raise RsqError(f"bad process layout from the environment: RANK={info.rank}, WORLD_SIZE={info.world_size}, "
                       f"LOCAL_RANK={info.local_rank}")
    return info


def wants_cuda(device_flag: str) -> bool:
    return device_flag in ("auto", "cuda") and torch.cuda.is_available()


def resolve_device(device_flag: str) -> torch.device:
    """One process's device for "auto", "cpu" or "cuda"; asking for a missing GPU is an error."""
    if device_flag == "cuda" and not torch.cuda.is_available():
        raise RsqError("--device cuda was asked for but no CUDA device is available")
    return torch.device("cuda") if wants_cuda(device_flag) else torch.device("cpu")


def setup_distributed(info: Dist, device_flag: str) -> torch.device:
    """gloo on the CPU, NCCL on CUDA; each rank drives the GPU numbered by its LOCAL_RANK."""
    cuda = resolve_device(device_flag).type == "cuda"
    device = torch.device("cuda", info.local_rank if info.world_size > 1 else torch.cuda.current_device()) \
        if cuda else torch.device("cpu")
    if cuda:
        torch.cuda.set_device(device)  # before NCCL starts, so each rank binds its own GPU
    if info.world_size > 1 and not dist.is_initialized():
        try:
            timeout = float(os.environ.get("RSQ_DIST_TIMEOUT_S", DEFAULT_DIST_TIMEOUT_S))
        except ValueError:
            raise RsqError("RSQ_DIST_TIMEOUT_S must be a number of seconds") from None
        dist.init_process_group("nccl" if cuda else "gloo", timeout=timedelta(seconds=timeout))
    return device


def shutdown_distributed(info: Dist) -> None:
    if info.world_size > 1 and dist.is_initialized():
        dist.destroy_process_group()


@contextlib.contextmanager
def agreed(info: Dist):
    """``with agreed(info): ...``: an RsqError raised inside on any rank is raised on every rank.

    Without this a rank that fails alone (rank 0 refusing the out folder, a missing file on one
    node) would leave the others waiting in their next collective until the timeout. The
    exception carries ``all_ranks = True`` so the CLI prints it once (on rank 0).
    """
    error: Optional[RsqError] = None
    try:
        yield
    except RsqError as exc:
        error = exc
    if info.world_size > 1:
        messages: list[Optional[str]] = [None] * info.world_size
        dist.all_gather_object(messages, None if error is None else str(error))
        failed = [(rank, text) for rank, text in enumerate(messages) if text is not None]
        if failed and error is None:
            rank, text = failed[0]
            error = RsqError(f"rank {rank}: {text}" if rank != 0 else text)
        if error is not None:
            error.all_ranks = True
    if error is not None:
        raise error


def all_finite(model: nn.Module, info: Dist) -> bool:
    """Every parameter and floating buffer finite, agreed by all ranks (one reduction, one sync).

    Buffers count: a blown-up forward leaves inf/NaN in BN running statistics while the loss
    and the weights are still finite.
    """
    tensors = [t for t in model.state_dict().values() if t.is_floating_point()]
    flags = torch.stack([torch.isfinite(t).all() for t in tensors]).all().float()
    if info.world_size > 1:
        dist.all_reduce(flags, op=dist.ReduceOp.MIN)
    return bool(flags.item())


def sync_buffers(model: nn.Module, info: Dist) -> None:
    """Rank 0's BN statistics (and quantizer buffers) to every rank.

    DDP broadcasts buffers at the start of each forward, but each rank then updates its BN
    statistics from its own slice: after the last step they differ, and evaluation and the
    checkpoint must use one model.
    """
    if info.world_size > 1:
        for buffer in model.buffers():
            dist.broadcast(buffer, src=0)
