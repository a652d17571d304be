"""ImageNet-layout folders: ROOT/train/CLASS/*.jpg and ROOT/val/CLASS/*.jpg."""
from __future__ import annotations

import math
from pathlib import Path
from typing import Iterator

import torch
import torchvision.transforms as T
from PIL import Image
from torchvision.datasets import ImageFolder

from ..errors import RsqError
from .multires import resize_batch

IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
CROP_FRACTION = 0.875  # test: resize the short side to s/0.875, centre crop s


def _open_rgb(path: str) -> Image.Image:
    try:
        with open(path, "rb") as f:
            return Image.open(f).convert("RGB")
    except Exception as exc:  # PIL raises many types for broken files
        raise RsqError(f"cannot read image {path}: {exc.__class__.__name__}: {exc}") from None


def open_split(root: str, split: str) -> ImageFolder:
    folder = Path(root) / split
    if not Path(root).is_dir():
        raise RsqError(f"data folder {root} does not exist")
    if not folder.is_dir():
        raise RsqError(f"data folder {root} has no '{split}' sub-folder (expected ROOT/{split}/CLASS/images)")
    try:
        dataset = ImageFolder(str(folder), loader=_open_rgb)
    except (FileNotFoundError, OSError) as exc:
        raise RsqError(f"{folder}: {exc}") from None
    if len(dataset.classes) < 2:
        raise RsqError(f"{folder} has {len(dataset.classes)} class folder(s); classification needs at least 2")
    return dataset


class _PerResolution(torch.utils.data.Dataset):
    """Each test image once, through each resolution's own test transform."""

    def __init__(self, base: ImageFolder, resolutions, mean, std):
        self.base = base
        self.transforms = {
            r: T.Compose([T.Resize(int(r / CROP_FRACTION)), T.CenterCrop(r), T.ToTensor(), T.Normalize(mean, std)])
            for r in resolutions
        }

    def __len__(self):
        return len(self.base)

    def __getitem__(self, i):
        path, label = self.base.samples[i]
        image = self.base.loader(path)
        return {r: t(image) for r, t in self.transforms.items()}, label


class _EpochSampler(torch.utils.data.Sampler):
    """A seeded permutation per epoch, sharded by rank, that can start mid-epoch (resume)."""

    def __init__(self, n, batch_size, seed, rank, world_size):
        self.n, self.batch_size, self.seed, self.rank, self.world = n, batch_size, seed, rank, world_size
        self.epoch, self.start_step = 0, 0
        self.per_rank = (n // world_size) // batch_size * batch_size

    def __iter__(self):
        order = torch.randperm(self.n, generator=torch.Generator().manual_seed(self.seed * 1009 + self.epoch))
        mine = order[self.rank * self.per_rank:(self.rank + 1) * self.per_rank]
        return iter(mine[self.start_step * self.batch_size:].tolist())

    def __len__(self):
        return self.per_rank - self.start_step * self.batch_size


class FolderTrainData:
    def __init__(self, dataset, batch_size, resolution, mean, std, seed=0, rank=0, world_size=1,
                 workers=4, device="cpu"):
        dataset.transform = T.Compose([
            T.RandomResizedCrop(resolution), T.RandomHorizontalFlip(), T.ToTensor(), T.Normalize(mean, std)
        ])
        self.sampler = _EpochSampler(len(dataset), batch_size, seed, rank, world_size)
        self.steps_per_epoch = self.sampler.per_rank // batch_size
        if self.steps_per_epoch == 0:
            raise RsqError(f"batch size {batch_size * world_size} is larger than the {len(dataset)} training images")
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers, drop_last=True,
            pin_memory=str(device).startswith("cuda"), persistent_workers=workers > 0,
        )
        self.device, self.resolution = device, resolution

    def __len__(self):
        return self.steps_per_epoch

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.epoch, self.sampler.start_step = epoch, start_step
        for x, y in self.loader:
            x = x.to(self.device, non_blocking=True)
            yield resize_batch(x, self.resolution), y.to(self.device, non_blocking=True)


class FolderEvalData:
    def __init__(self, dataset, batch_size, resolutions, mean, std, rank=0, world_size=1, workers=4, device="cpu"):
        per_rank = math.ceil(len(dataset) / world_size)
        indices = list(range(rank * per_rank, min(len(dataset), (rank + 1) * per_rank)))
        wrapped = torch.utils.data.Subset(_PerResolution(dataset, resolutions, mean, std), indices)
        self.loader = torch.utils.data.DataLoader(
            wrapped, batch_size=batch_size, num_workers=workers, pin_memory=str(device).startswith("cuda")
        )
        self.device = device

    def __len__(self):
        return len(self.loader)

    def batches(self):
        for xs, y in self.loader:
            yield {r: x.to(self.device, non_blocking=True) for r, x in xs.items()}, y.to(self.device)
