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

# What runs; --augment also takes "auto", which the trainer resolves from --arch and the dataset (resolve).
MODES = ("crop-flip", "crop", "flip", "none")
AUGMENTATIONS = ("auto",) + MODES

# Datasets whose mirror image is another plausible item of the same classes: garments, CIFAR's objects.
# Image lists and NUS-WIDE may hold text, digits, or labels that depend on where things are in the frame.
MIRROR_SYMMETRIC = ("fashion-mnist", "cifar-10")

# crop-flip, crop: a crop of 35-100% of the image's area, aspect 3:4 to 4:3, resized back to the input size.
CROP_SCALE = (0.35, 1.0)
CROP_RATIO = (3 / 4, 4 / 3)


def resolve(mode: str, arch: str, dataset: str) -> str:
    """--augment auto: flip only for the small CNN, crops for the ImageNet architectures, and flips only
    where the dataset is known to be mirror-symmetric (MIRROR_SYMMETRIC); any other value is kept.

    The small CNN trains on the stored images of tiny datasets (28 px Fashion-MNIST): a crop of 35% of
    such an image keeps a 17 px piece of the garment, zoomed 1.7x, which the centred test images never
    look like. At the demo's budget, flips alone gave the stage-1 codes 0.64 where crops gave 0.61
    (docs/quality.md). Crops of 224 px inputs are the usual ImageNet-style training. A flip teaches the
    network that an image and its mirror image are the same, which is wrong for text, digits, or tags
    that depend on the side of the frame (on a multi-label check with such tags, flips cost the small
    CNN's stage 1 0.028 mAP; docs/quality.md), so data not known to be symmetric is not flipped unless
    asked for."""
    if mode != "auto":
        return mode
    crops = arch != "small-cnn"
    if dataset in MIRROR_SYMMETRIC:
        return "crop-flip" if crops else "flip"
    return "crop" if crops else "none"


def draw_params(generator: torch.Generator, count: int, mode: str,
                scale=CROP_SCALE, ratio=CROP_RATIO) -> torch.Tensor:
    """(count, 5) float32 rows: crop width, crop height (fractions of the side), centre x, centre y, flip sign.
    Every mode draws the same uniforms, so a mode changes what is applied, not the draws that follow."""
    if mode not in MODES:
        raise ValueError(f"--augment: expected one of {', '.join(MODES)} (auto is resolved by the "
                         f"trainer once it has read the data), got {mode!r}")
    uniform = torch.rand(count, 5, generator=generator)
    params = torch.empty(count, 5)
    if mode.startswith("crop"):
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
    params[:, 4] = torch.where((uniform[:, 4] < 0.5) & mode.endswith("flip"), -1.0, 1.0)
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
