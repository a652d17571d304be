"""How the images a user brings are augmented and normalised, chosen from the data when asked to.

The choices are recipe settings (``augment``, ``crop_pad``, ``crop_scale``, ``flip``,
``in_chans``, ``normalize``); ``auto`` values are resolved here from a look at the training
folder, and ``describe`` says what was chosen, so a run prints it.

- small-image augmentation (images at most SMALL_IMAGE px on the short side, e.g. 28x28 or
  32x32): after normalisation, zero-pad by ``crop_pad`` (the data's mean) and crop back to the
  image size, optional horizontal flip, run on the batch by the in-memory path's own code; the
  test images are resized whole (no crop), as the in-memory Fashion-MNIST path does;
- ImageNet augmentation (larger images): RandomResizedCrop with area scale (``crop_scale``, 1)
  and optional flip; the test images are resized to s/0.875 on the short side and centre-cropped.
- channels: a folder of grayscale images stays one channel (``in_chans`` 0 = as the images are).
- normalisation: ``estimate`` measures the per-channel mean and standard deviation on a fixed
  sample of the training images; ``imagenet`` uses ImageNet's; ``auto`` is ``imagenet`` for
  large RGB images (ImageNet-like data, as the paper's recipes) and ``estimate`` otherwise.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Sequence

import torch

SMALL_IMAGE = 64          # px, short side: at most this gets small-image augmentation
STATS_SAMPLE = 512        # training images the normalisation statistics are estimated from
IMAGENET_MEAN, IMAGENET_STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)
GRAY_MODES = ("1", "L", "LA", "I", "I;16", "F")


@dataclass(frozen=True)
class FolderPolicy:
    """The resolved choices for one image folder."""

    augment: str                # "small" or "imagenet"
    in_chans: int               # 1 or 3
    mean: tuple[float, ...]
    std: tuple[float, ...]
    crop_pad: int
    crop_scale: float
    flip: bool
    image_size: tuple[int, int]  # (width, height) of the first training image
    normalize: str              # "estimate" or "imagenet"

    def describe(self) -> str:
        if self.augment == "small":
            train = f"pad {self.crop_pad} + crop to the image size"
            test = "the whole image resized"
        else:
            train = f"random resized crop (area {self.crop_scale:g}-1)"
            test = "resize to s/0.875, centre crop"
        stats = ", ".join(f"{m:.4f}/{s:.4f}" for m, s in zip(self.mean, self.std))
        return (f"images {self.image_size[0]}x{self.image_size[1]}, {self.in_chans} channel(s); "
                f"{'small-image' if self.augment == 'small' else 'ImageNet'} augmentation: {train}"
                f"{', horizontal flip' if self.flip else ', no flip'}; test: {test}; "
                f"normalisation mean/std {stats} ({'estimated from the training images' if self.normalize == 'estimate' else 'ImageNet'})")


def resolve(config, first_image, sample_images) -> FolderPolicy:
    """Resolve ``auto`` settings from the first training image (a PIL image) and, for estimated
    statistics, ``sample_images(in_chans)``: [C, H, W] tensors in 0..1 of a fixed sample."""
    width, height = first_image.size
    augment = config.augment
    if augment == "auto":
        augment = "small" if min(width, height) <= SMALL_IMAGE else "imagenet"
    in_chans = config.in_chans or (1 if first_image.mode in GRAY_MODES else 3)
    normalize = config.normalize
    if normalize == "auto":
        normalize = "imagenet" if augment == "imagenet" and in_chans == 3 else "estimate"
    if normalize == "imagenet" and in_chans == 3:
        mean, std = IMAGENET_MEAN, IMAGENET_STD
    elif normalize == "imagenet":
        mean, std = (sum(IMAGENET_MEAN) / 3,), (sum(IMAGENET_STD) / 3,)
    else:
        mean, std = channel_stats(sample_images(in_chans))
    return FolderPolicy(augment, in_chans, mean, std, config.crop_pad, config.crop_scale, config.flip,
                        (width, height), normalize)


def channel_stats(images: Sequence[torch.Tensor]) -> tuple[Sequence[float], Sequence[float]]:
    """Per-channel mean and standard deviation over every pixel of ``images`` (each [C, H, W], any size)."""
    flat = torch.cat([image.reshape(image.shape[0], -1).double() for image in images], dim=1)
    mean = flat.mean(1)
    std = flat.std(1).clamp_min(1e-6)
    return tuple(round(v, 6) for v in mean.tolist()), tuple(round(v, 6) for v in std.tolist())
