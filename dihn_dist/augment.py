"""Seeded training augmentation on the device: random resized crop and horizontal flip.

FFCV's own random decoders draw from numba's unseeded per-thread generators, so a run could not be
reproduced from its seed nor resumed exactly. Here the parameters come from a torch generator seeded by
(seed, stage, iteration, epoch) and are drawn per *sampled item*, so the result does not depend on how
the subset is split across ranks or batches. One grid_sample call applies a whole batch.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

AUGMENTATIONS = ("crop-flip", "flip", "none")


def draw_params(generator: torch.Generator, count: int, mode: str,
                scale=(0.35, 1.0), ratio=(3 / 4, 4 / 3)) -> torch.Tensor:
    """(count, 5) float32 rows: crop width, crop height (fractions of the side), centre x, centre y, flip sign."""
    if mode not in AUGMENTATIONS:
        raise ValueError(f"--augment: expected one of {', '.join(AUGMENTATIONS)}, got {mode!r}")
    uniform = torch.rand(count, 5, generator=generator)
    params = torch.empty(count, 5)
    if mode == "crop-flip":
        area = scale[0] + (scale[1] - scale[0]) * uniform[:, 0]
        log_ratio = math.log(ratio[0]) + (math.log(ratio[1]) - math.log(ratio[0])) * uniform[:, 1]
        aspect = torch.exp(log_ratio)
        width = torch.sqrt(area * aspect).clamp(max=1.0)
        height = torch.sqrt(area / aspect).clamp(max=1.0)
        params[:, 0], params[:, 1] = width, height
        # Centres keep the crop inside the image (normalised coordinates span [-1, 1]).
        params[:, 2] = (1 - width) * (2 * uniform[:, 2] - 1)
        params[:, 3] = (1 - height) * (2 * uniform[:, 3] - 1)
    else:
        params[:, :2], params[:, 2:4] = 1.0, 0.0
    params[:, 4] = torch.where((uniform[:, 4] < 0.5) & (mode != "none"), -1.0, 1.0)
    return params


def apply(images: torch.Tensor, params: torch.Tensor) -> torch.Tensor:
    """Crop, resize back to the input size and flip every image of the batch by its own parameters.
    (With --augment none the trainer does not call it: identity parameters would only cost a resample.)"""
    params = params.to(device=images.device, dtype=images.dtype)
    theta = torch.zeros(images.shape[0], 2, 3, device=images.device, dtype=images.dtype)
    theta[:, 0, 0] = params[:, 0] * params[:, 4]
    theta[:, 0, 2] = params[:, 2]
    theta[:, 1, 1] = params[:, 1]
    theta[:, 1, 2] = params[:, 3]
    grid = F.affine_grid(theta, list(images.shape), align_corners=False)
    return F.grid_sample(images, grid, mode="bilinear", padding_mode="border", align_corners=False)
