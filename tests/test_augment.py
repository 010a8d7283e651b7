"""The seeded device augmentation: what --augment auto picks, the drawn parameters, and what apply does."""
import pytest
import torch

from dihn_dist.models import augment
from dihn_dist.training.config import parse_config


def test_auto_flips_tiny_images_and_crops_imagenet_inputs():
    assert augment.resolve("auto", "small-cnn") == "flip"
    assert augment.resolve("auto", "alexnet") == "crop-flip"
    assert augment.resolve("auto", "resnet50") == "crop-flip"
    assert augment.resolve("none", "small-cnn") == "none"
    assert parse_config(["--arch", "small-cnn"]).augment == "flip"  # config.json records what ran
    assert parse_config(["--arch", "small-cnn", "--augment", "crop-flip"]).augment == "crop-flip"


def test_unresolved_or_unknown_modes_are_refused():
    generator = torch.Generator().manual_seed(0)
    for mode in ("auto", "shift-flip"):
        with pytest.raises(ValueError, match="--augment"):
            augment.draw_params(generator, 4, mode)


def test_parameters_repeat_from_the_seed_and_respect_the_mode():
    draw = lambda mode: augment.draw_params(torch.Generator().manual_seed(3), 2000, mode)  # noqa: E731
    crops = draw("crop-flip")
    assert torch.equal(crops, draw("crop-flip"))
    width, height, cx, cy, sign = crops.T
    assert (width <= 1).all() and (height <= 1).all()
    assert (width * height).min() >= augment.CROP_SCALE[0] - 1e-6  # a side clamped to 1 only adds area
    assert ((cx.abs() <= 1 - width + 1e-6) & (cy.abs() <= 1 - height + 1e-6)).all()  # inside the image
    assert set(sign.tolist()) == {-1.0, 1.0} and 0.45 < (sign < 0).float().mean() < 0.55
    flips = draw("flip")
    assert (flips[:, :2] == 1).all() and (flips[:, 2:4] == 0).all() and (flips[:, 4] < 0).any()
    assert (draw("none")[:, 4] == 1).all()


def test_apply_flips_exactly_and_keeps_the_whole_image_without_a_crop():
    images = torch.rand(3, 3, 28, 28)
    identity = torch.tensor([[1.0, 1.0, 0.0, 0.0, 1.0]]).repeat(3, 1)
    mirrored = identity.clone()
    mirrored[:, 4] = -1.0
    assert torch.allclose(augment.apply(images, identity), images, atol=1e-5)
    assert torch.allclose(augment.apply(images, mirrored), images.flip(-1), atol=1e-5)
