"""Data sets and multi-resolution batching."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import torch

from . import fashion_mnist
from . import policy
from ..errors import RsqError
from .folder import FolderEvalData, FolderTrainData, ImageLoader, first_image, open_split, sample_images
from .memory import TensorEvalData, TensorTrainData, seeded_generator
from .multires import multi_resolution, resize_batch

__all__ = ["DataBundle", "build_data", "dataset_info", "folder_policy", "input_normalization", "multi_resolution",
           "resize_batch"]


@dataclass
class DataBundle:
    train: Any
    test: Any
    num_classes: int
    in_chans: int


def _subset_indices(n: int, keep: int, seed: int) -> torch.Tensor:
    # A fixed shuffle (independent of the training seed's epochs) so subsets are comparable.
    return torch.randperm(n, generator=seeded_generator(seed, 12345))[:keep] if 0 < keep < n else torch.arange(n)


def folder_policy(config):
    """The resolved augmentation and normalisation of an image-folder run (see rsq/data/policy.py)."""
    train = open_split(config.data_dir, "train")
    return policy.resolve(config, first_image(train), lambda in_chans: sample_images(train, in_chans))


def input_normalization(config) -> tuple[tuple[float, ...], tuple[float, ...]]:
    """(mean, std) the model's inputs are normalised with: what an exported model must be fed."""
    if config.data == "fashion_mnist":
        return fashion_mnist.MEAN, fashion_mnist.STD
    resolved = folder_policy(config)
    return resolved.mean, resolved.std


def dataset_info(config) -> tuple[int, int]:
    """(num_classes, in_chans), from one look at the data."""
    if config.data == "fashion_mnist":
        return fashion_mnist.NUM_CLASSES, 1
    return len(open_split(config.data_dir, "train").classes), folder_policy(config).in_chans


def build_data(config, rank: int = 0, world_size: int = 1, device="cpu", train: bool = True) -> DataBundle:
    local_batch = max(1, config.batch_size // world_size)
    largest = config.resolutions[0]
    if config.data == "fashion_mnist":
        mean, std = fashion_mnist.MEAN, fashion_mnist.STD
        test_x, test_y = fashion_mnist.load("test", config.data_dir or None)
        keep = _subset_indices(len(test_x), config.test_subset, 0)
        test = TensorEvalData(test_x[keep], test_y[keep], 2 * local_batch, config.resolutions, mean, std,
                              rank, world_size, device)
        train_data = None
        if train:
            x, y = fashion_mnist.load("train", config.data_dir or None)
            keep = _subset_indices(len(x), config.subset, config.seed)
            train_data = TensorTrainData(x[keep], y[keep], local_batch, largest, mean, std, config.seed,
                                         pad=config.crop_pad, flip=config.flip, rank=rank, world_size=world_size,
                                         device=device)
        return DataBundle(train_data, test, fashion_mnist.NUM_CLASSES, 1)

    resolved = folder_policy(config)
    if train and rank == 0:
        print(f"data: {config.data_dir}: {resolved.describe()}", flush=True)
    mode = "L" if resolved.in_chans == 1 else "RGB"
    val = open_split(config.data_dir, "val")
    val.loader = ImageLoader(mode)
    if config.test_subset:
        val.samples = [val.samples[i] for i in _subset_indices(len(val), config.test_subset, 0).tolist()]
    test = FolderEvalData(val, local_batch, config.resolutions, resolved, rank, world_size, config.workers, device)
    train_data = None
    if train:
        tr = open_split(config.data_dir, "train")
        tr.loader = ImageLoader(mode)
        if tr.classes != val.classes:
            raise RsqError(f"{config.data_dir}: train and val class folders differ")
        if config.subset:
            tr.samples = [tr.samples[i] for i in _subset_indices(len(tr), config.subset, config.seed).tolist()]
        train_data = FolderTrainData(tr, local_batch, largest, resolved, config.seed, rank, world_size,
                                     config.workers, device)
    return DataBundle(train_data, test, len(val.classes), resolved.in_chans)
