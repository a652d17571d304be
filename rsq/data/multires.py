"""Multi-resolution batches: the same images, downsampled on the batch tensor."""
from __future__ import annotations

import torch
import torch.nn.functional as F


def resize_batch(x: torch.Tensor, resolution: int) -> torch.Tensor:
    """Bilinear, antialiased resize of a whole batch (identity at its own size)."""
    if x.shape[-1] == resolution and x.shape[-2] == resolution:
        return x
    antialias = resolution < x.shape[-1]
    return F.interpolate(x, size=(resolution, resolution), mode="bilinear",
                         align_corners=False, antialias=antialias)


def multi_resolution(x: torch.Tensor, resolutions: list[int]) -> dict[int, torch.Tensor]:
    """{resolution: batch}; ``x`` is at the largest resolution already (one crop, one flip)."""
    return {r: resize_batch(x, r) for r in resolutions}
