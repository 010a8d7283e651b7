"""Hashing networks: a backbone whose last layer maps to c tanh outputs in (-1, 1).

Pretrained weights are never downloaded: --pretrained takes a local torchvision state dict.
"""
from __future__ import annotations

from contextlib import nullcontext
from pathlib import Path
from typing import Optional

import torch
import torchvision
from torch import nn

ARCHITECTURES = ("alexnet", "resnet50", "small-cnn")
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SWITCHES = ("auto", "on", "off")

# What a user runs once on a machine with internet access to get a file for --pretrained.
WEIGHTS_HINT = {
    "alexnet": "torchvision.models.alexnet(weights='IMAGENET1K_V1')",
    "resnet50": "torchvision.models.resnet50(weights='IMAGENET1K_V2')",
}

# The input side each ImageNet architecture is built for, unless --resolution says otherwise.
DEFAULT_RESOLUTION = {"alexnet": 224, "resnet50": 224}


def binarize(outputs: torch.Tensor) -> torch.Tensor:
    """sign() as int8 +-1 codes; an output of exactly 0 becomes +1 (never a 0 bit)."""
    return torch.where(outputs >= 0, 1, -1).to(torch.int8)


def encode_batches(network: nn.Module, batches, autocast=None) -> Optional[torch.Tensor]:
    """int8 +-1 codes of every image of (images, ...) batches, in order, in eval mode; None if no batch.
    `autocast`: the training precision's autocast context factory, so queries are encoded as trained."""
    was_training = network.training
    network.eval()
    with torch.no_grad(), (autocast() if autocast else nullcontext()):
        codes = [binarize(network(batch[0]).float()) for batch in batches]
    network.train(was_training)
    return torch.cat(codes) if codes else None


def untrained_backbone_warning(arch: str, pretrained: Optional[str]) -> Optional[str]:
    """The warning for an ImageNet architecture trained from scratch (None when nothing is wrong)."""
    if arch not in WEIGHTS_HINT or pretrained not in (None, "", "none"):
        return None
    return (f"--arch {arch} without --pretrained: the backbone starts UNTRAINED (random weights). The published "
            f"DIHN/ADSH numbers assume ImageNet weights. Make the file once, on a machine with internet access: "
            f"python -c \"import torchvision; {WEIGHTS_HINT[arch]}\" (it lands in ~/.cache/torch/hub/checkpoints/), "
            f"then pass --pretrained PATH.")


def input_resolution(arch: str, configured: Optional[int], stored_size: int) -> int:
    """--resolution when given; else the stored image size for the small CNN (no upsampling of 28 px
    images), else the ImageNet architecture's 224."""
    if configured:
        return int(configured)
    return stored_size if arch == "small-cnn" else DEFAULT_RESOLUTION[arch]


class SmallCNN(nn.Module):
    """Two 5x5 conv blocks and two dense layers: trains from scratch on small images on a CPU.

    Leaky ReLUs, because stage 1 and the retrained baseline start from random codes. Against random codes
    the hash term is smallest for outputs near 0, and the first outer iteration gets there by driving
    units below zero for every input. A ReLU unit in that state gets no gradient again (and Adam's weight
    decay then shrinks it to nothing): with ReLUs, 56 of the 64 second-block channels were off for every
    query after iteration 1 and 61 after iteration 20, so stage 1 ended with 3 working channels. Leaky
    units keep a gradient and come back once the codes carry the classes (docs/quality.md).

    The second block's 7x7 grid (28 px after two 2x pools) goes to the dense layer as it is; other input
    sides are pooled to 7x7 (averaging it down to 4x4 blurred neighbouring cells together).

    5x5 kernels, because a unit of the second block then sees 14 px of the input (3x3: 8 px). On centred
    single-label images the dense layer can assemble an object from the grid, since it is always in the
    same place; with content anywhere in the frame (multi-label mosaics, 12-16 px objects at 32 px) it
    cannot: there 3x3 kernels cost stage 1 0.007 mAP and DIHN 0.025 (docs/quality.md, multi-label section).

    No dropout and no batch norm, so N processes x batch b follow exactly the trajectory of one process
    with batch N*b (the distributed equivalence test relies on it).
    """

    # Slope of the leaky units below zero: enough for Adam, which scales each weight's step by its own
    # gradient history, to move a unit that is below zero for every input.
    NEGATIVE_SLOPE = 0.01

    def __init__(self, code_length: int):
        super().__init__()
        self.features = nn.Sequential(
            nn.Conv2d(3, 32, 5, padding=2), nn.LeakyReLU(self.NEGATIVE_SLOPE, inplace=True), nn.MaxPool2d(2),
            nn.Conv2d(32, 64, 5, padding=2), nn.LeakyReLU(self.NEGATIVE_SLOPE, inplace=True), nn.MaxPool2d(2),
            nn.AdaptiveAvgPool2d(7),
        )
        self.hash_layer = nn.Sequential(
            nn.Flatten(), nn.Linear(64 * 7 * 7, 512), nn.LeakyReLU(self.NEGATIVE_SLOPE, inplace=True),
            nn.Linear(512, code_length),
        )

    def forward(self, images):
        return torch.tanh(self.hash_layer(self.features(images)))


class TorchvisionHashNet(nn.Module):
    """A torchvision backbone whose classifier's last layer is replaced by the hash layer."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images):
        return torch.tanh(self.backbone(images))


def _torchvision_backbone(arch: str) -> nn.Module:
    return getattr(torchvision.models, arch)(weights=None)


def _replace_head(arch: str, backbone: nn.Module, code_length: int) -> None:
    if arch == "alexnet":
        backbone.classifier[6] = nn.Linear(backbone.classifier[6].in_features, code_length)
    else:
        backbone.fc = nn.Linear(backbone.fc.in_features, code_length)


def load_pretrained(arch: str, backbone: nn.Module, path: Path) -> None:
    """Load a local torchvision state dict into the backbone before its head is replaced."""
    hint = (f"Get one on a machine with internet access: python -c \"import torchvision; "
            f"{WEIGHTS_HINT[arch]}\" saves it under ~/.cache/torch/hub/checkpoints/; copy that .pth "
            f"file here and pass its path.")
    if not path.is_file():
        raise FileNotFoundError(f"--pretrained {path}: no such file. {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt or non-torch file
        raise ValueError(f"--pretrained {path}: not a readable torch state dict ({error}). {hint}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"--pretrained {path}: does not fit --arch {arch}: {str(error)[:500]}. {hint}") from error


class MixedPrecision:
    """The forward pass under torch.autocast at the chosen precision, and the optimizer step (with a
    GradScaler for fp16, whose small range needs the loss scaled). Losses, DCC and mAP stay float32/64:
    the trainer casts the network's outputs to float32 before anything else uses them.

    auto = bf16 on a CUDA GPU that supports it (Ampere and later: about twice the fp32 speed for these
    CNNs, and bf16 keeps fp32's range, so no scaler), fp32 elsewhere (CPU autocast rarely pays off)."""

    def __init__(self, requested: str, device: torch.device):
        if requested not in PRECISIONS:
            raise ValueError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {requested!r}")
        if requested == "auto":
            requested = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        self.name = requested
        self.device_type = device.type
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]
        self.scaler = torch.amp.GradScaler(device.type) if requested == "fp16" else None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def step(self, loss: torch.Tensor, optimizer: torch.optim.Optimizer) -> None:
        optimizer.zero_grad(set_to_none=True)
        if self.scaler is None:
            loss.backward()
            optimizer.step()
        else:
            self.scaler.scale(loss).backward()
            self.scaler.step(optimizer)  # skipped when the scaled gradients overflowed
            self.scaler.update()


def use_channels_last(requested: str, device: torch.device) -> bool:
    """auto = on for CUDA (cuDNN's convolutions are fastest in NHWC, with bf16/fp16 above all), off on CPU."""
    if requested not in SWITCHES:
        raise ValueError(f"--channels-last: expected one of {', '.join(SWITCHES)}, got {requested!r}")
    return requested == "on" or (requested == "auto" and device.type == "cuda")


def build_model(arch: str, code_length: int, pretrained: Optional[str] = None) -> nn.Module:
    if arch not in ARCHITECTURES:
        raise ValueError(f"--arch: expected one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    if code_length <= 0:
        raise ValueError(f"--code-length: expected a positive number of bits, got {code_length}")
    if arch == "small-cnn":
        if pretrained not in (None, "", "none"):
            raise ValueError("--pretrained: the small-cnn trains from scratch; pass --pretrained none")
        return SmallCNN(code_length)
    backbone = _torchvision_backbone(arch)
    if pretrained not in (None, "", "none"):
        load_pretrained(arch, backbone, Path(pretrained))
    _replace_head(arch, backbone, code_length)
    return TorchvisionHashNet(backbone)
