"""Data sets small enough to hold as one uint8 tensor (Fashion-MNIST), augmented per batch.

Crop, flip, normalisation and resizing run on whole batch tensors on the training device, and
every random draw comes from a generator seeded by (seed, epoch, step), so a resumed run sees
exactly the batches an uninterrupted one would have seen. Draws are made for the global batch and
each DDP rank takes its slice, so N processes see the same images as one process.
"""
from __future__ import annotations

from typing import Iterator

import torch
import torch.nn.functional as F

from ..errors import RsqError
from .multires import resize_batch


def seeded_generator(*seeds: int) -> torch.Generator:
    value = 0
    for s in seeds:
        value = (value * 1_000_003 + int(s)) % (2**63 - 1)
    return torch.Generator().manual_seed(value)


def draw_crop_flip(n: int, pad: int, gen: torch.Generator) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """Crop offsets (dy, dx) and flip flags for ``n`` images."""
    dy = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    dx = torch.randint(0, 2 * pad + 1, (n,), generator=gen)
    return dy, dx, torch.rand(n, generator=gen) < 0.5


def crop_flip(x: torch.Tensor, pad: int, dy: torch.Tensor, dx: torch.Tensor, flip: torch.Tensor) -> torch.Tensor:
    """One crop (after zero padding) and one optional horizontal flip per image."""
    n, _, h, w = x.shape
    dy, dx, flip = dy.to(x.device), dx.to(x.device), flip.to(x.device)
    if pad > 0:
        padded = F.pad(x, (pad, pad, pad, pad))
        rows = (dy[:, None] + torch.arange(h, device=x.device))[:, :, None]
        cols = (dx[:, None] + torch.arange(w, device=x.device))[:, None, :]
        batch = torch.arange(n, device=x.device)[:, None, None]
        x = padded.permute(0, 2, 3, 1)[batch, rows, cols].permute(0, 3, 1, 2)
    return torch.where(flip[:, None, None, None], x.flip(-1), x)


def augment_batch(x: torch.Tensor, pad: int, flip: bool, seed: int, epoch: int, step: int, global_batch: int,
                  mine: slice) -> torch.Tensor:
    """This rank's slice ``mine`` of step ``step``'s crops and flips, drawn for the whole global batch
    from (seed, epoch, step): N processes see what one process would, and a resumed run what an
    uninterrupted one would. The flips are drawn even when off, so the crops stay the same."""
    dy, dx, flips = draw_crop_flip(global_batch, pad, seeded_generator(seed, epoch, step, 7))
    flips = flips if flip else torch.zeros_like(flips)
    return crop_flip(x, pad, dy[mine], dx[mine], flips[mine])


class _Normalizer:
    def __init__(self, mean, std, device):
        self.mean = torch.tensor(mean, device=device).view(1, -1, 1, 1)
        self.std = torch.tensor(std, device=device).view(1, -1, 1, 1)

    def __call__(self, images_uint8: torch.Tensor) -> torch.Tensor:
        return (images_uint8.float() / 255.0 - self.mean) / self.std


class TensorTrainData:
    """Shuffled, augmented training batches at the largest resolution."""

    def __init__(self, images, labels, batch_size, resolution, mean, std, seed=0, pad=2, flip=True,
                 rank=0, world_size=1, device="cpu"):
        self.images = images.to(device)
        self.labels = labels.to(device)
        self.batch_size, self.resolution, self.pad, self.seed, self.flip = batch_size, resolution, pad, seed, flip
        self.rank, self.world_size, self.device = rank, world_size, device
        self.normalize = _Normalizer(mean, std, device)
        global_batch = batch_size * world_size
        self.steps_per_epoch = len(self.images) // global_batch  # drop the last partial batch
        if self.steps_per_epoch == 0:
            raise RsqError(f"batch size {global_batch} is larger than the {len(self.images)} training images")

    def __len__(self) -> int:
        return self.steps_per_epoch

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        order = torch.randperm(len(self.images), generator=seeded_generator(self.seed, epoch)).to(self.device)
        global_batch = self.batch_size * self.world_size
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for step in range(start_step, self.steps_per_epoch):
            idx = order[step * global_batch:(step + 1) * global_batch][mine]
            x = augment_batch(self.normalize(self.images[idx]), self.pad, self.flip, self.seed, epoch, step,
                              global_batch, mine)
            yield resize_batch(x, self.resolution), self.labels[idx]


class TensorEvalData:
    """Test batches: the whole image resized to each resolution (no crop)."""

    def __init__(self, images, labels, batch_size, resolutions, mean, std, rank=0, world_size=1,
                 device="cpu"):
        # Each rank takes a contiguous slice; results are summed across ranks.
        per_rank = -(-len(images) // world_size)
        sl = slice(rank * per_rank, (rank + 1) * per_rank)
        self.images, self.labels = images[sl].to(device), labels[sl].to(device)
        self.batch_size, self.resolutions = batch_size, resolutions
        self.normalize = _Normalizer(mean, std, device)

    def __len__(self) -> int:
        return -(-len(self.images) // self.batch_size)

    def batches(self) -> Iterator[tuple[dict[int, torch.Tensor], torch.Tensor]]:
        for start in range(0, len(self.images), self.batch_size):
            x = self.normalize(self.images[start:start + self.batch_size])
            yield {r: resize_batch(x, r) for r in self.resolutions}, self.labels[start:start + self.batch_size]
