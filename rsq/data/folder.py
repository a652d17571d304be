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
from .memory import augment_batch
from .multires import resize_batch
from .policy import IMAGENET_MEAN, IMAGENET_STD, STATS_SAMPLE  # noqa: F401 - the names export reads

CROP_FRACTION = 0.875  # test: resize the short side to s/0.875, centre crop s


class ImageLoader:
    """Open an image as RGB or as one gray channel (a class, so DataLoader workers can pickle it)."""

    def __init__(self, mode: str = "RGB"):
        self.mode = mode

    def __call__(self, path: str) -> Image.Image:
        try:
            with open(path, "rb") as f:
                return Image.open(f).convert(self.mode)
        except Exception as exc:  # PIL raises many types for broken files
            raise RsqError(f"cannot read image {path}: {exc.__class__.__name__}: {exc}") from None


def first_image(dataset: ImageFolder) -> Image.Image:
    """The first training image as stored (its size and mode choose the ``auto`` settings)."""
    path = dataset.samples[0][0]
    try:
        with open(path, "rb") as f:
            image = Image.open(f)
            image.load()
            return image
    except Exception as exc:  # noqa: BLE001 - PIL raises many types for broken files
        raise RsqError(f"cannot read image {path}: {exc.__class__.__name__}: {exc}") from None


def sample_images(dataset: ImageFolder, in_chans: int) -> list[torch.Tensor]:
    """A fixed sample of training images as [C, H, W] tensors in 0..1 (for the normalisation statistics)."""
    loader = ImageLoader("L" if in_chans == 1 else "RGB")
    order = torch.randperm(len(dataset), generator=torch.Generator().manual_seed(12345))[:STATS_SAMPLE]
    return [T.functional.to_tensor(loader(dataset.samples[i][0])) for i in order.tolist()]


def test_transform(resolution: int, policy) -> T.Compose:
    """Small images are resized whole (as the in-memory path does); larger ones resized and centre-cropped."""
    if policy.augment == "small":
        head = [T.Resize((resolution, resolution))]
    else:
        head = [T.Resize(int(resolution / CROP_FRACTION)), T.CenterCrop(resolution)]
    return T.Compose(head + [T.ToTensor(), T.Normalize(policy.mean, policy.std)])


def train_transform(resolution: int, policy) -> T.Compose:
    """Per image: ImageNet augmentation; small images are only resized here, because their pad,
    crop and flip run on the batch (``FolderTrainData.batches``) with the in-memory path's code."""
    if policy.augment == "small":
        return T.Compose([T.Resize((resolution, resolution)), T.ToTensor(), T.Normalize(policy.mean, policy.std)])
    steps = [T.RandomResizedCrop(resolution, scale=(policy.crop_scale, 1.0))]
    if policy.flip:
        steps.append(T.RandomHorizontalFlip())
    return T.Compose(steps + [T.ToTensor(), T.Normalize(policy.mean, policy.std)])


def open_split(root: str, split: str) -> ImageFolder:
    folder = Path(root) / split
    if not Path(root).is_dir():
        raise RsqError(f"data folder {root} does not exist")
    if not folder.is_dir():
        raise RsqError(f"data folder {root} has no '{split}' sub-folder (expected ROOT/{split}/CLASS/images)")
    try:
        dataset = ImageFolder(str(folder), loader=ImageLoader("RGB"))
    except (FileNotFoundError, OSError) as exc:
        raise RsqError(f"{folder}: {exc}") from None
    if len(dataset.classes) < 2:
        raise RsqError(f"{folder} has {len(dataset.classes)} class folder(s); classification needs at least 2")
    return dataset


class _PerResolution(torch.utils.data.Dataset):
    """Each test image once, through each resolution's own test transform."""

    def __init__(self, base: ImageFolder, resolutions, policy):
        self.base = base
        self.transforms = {r: test_transform(r, policy) for r in resolutions}

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
    def __init__(self, dataset, batch_size, resolution, policy, seed=0, rank=0, world_size=1,
                 workers=4, device="cpu"):
        dataset.transform = train_transform(resolution, policy)
        self.sampler = _EpochSampler(len(dataset), batch_size, seed, rank, world_size)
        self.steps_per_epoch = self.sampler.per_rank // batch_size
        if self.steps_per_epoch == 0:
            raise RsqError(f"batch size {batch_size * world_size} is larger than the {len(dataset)} training images")
        self.loader = torch.utils.data.DataLoader(
            dataset, batch_size=batch_size, sampler=self.sampler, num_workers=workers, drop_last=True,
            pin_memory=str(device).startswith("cuda"), persistent_workers=workers > 0,
        )
        self.device, self.resolution = device, resolution
        self.batch_augment = policy.augment == "small"
        self.pad, self.flip, self.seed = policy.crop_pad, policy.flip, seed
        self.rank, self.world_size, self.batch_size = rank, world_size, batch_size

    def __len__(self):
        return self.steps_per_epoch

    def batches(self, epoch: int, start_step: int = 0) -> Iterator[tuple[torch.Tensor, torch.Tensor]]:
        self.sampler.epoch, self.sampler.start_step = epoch, start_step
        global_batch = self.batch_size * self.world_size
        mine = slice(self.rank * self.batch_size, (self.rank + 1) * self.batch_size)
        for step, (x, y) in enumerate(self.loader, start=start_step):
            x = x.to(self.device, non_blocking=True)
            if self.batch_augment:
                # The in-memory path's augmentation, draws included: padding with zeros after
                # normalisation (the data's mean), so the two paths differ only in their images.
                x = augment_batch(x, self.pad, self.flip, self.seed, epoch, step, global_batch, mine)
            yield resize_batch(x, self.resolution), y.to(self.device, non_blocking=True)


class FolderEvalData:
    def __init__(self, dataset, batch_size, resolutions, policy, rank=0, world_size=1, workers=4, device="cpu"):
        per_rank = math.ceil(len(dataset) / world_size)
        indices = list(range(rank * per_rank, min(len(dataset), (rank + 1) * per_rank)))
        wrapped = torch.utils.data.Subset(_PerResolution(dataset, resolutions, policy), indices)
        self.loader = torch.utils.data.DataLoader(
            wrapped, batch_size=batch_size, num_workers=workers, pin_memory=str(device).startswith("cuda")
        )
        self.device = device

    def __len__(self):
        return len(self.loader)

    def batches(self):
        for xs, y in self.loader:
            yield {r: x.to(self.device, non_blocking=True) for r, x in xs.items()}, y.to(self.device)
