"""The seeded device augmentation: what --augment auto picks, the drawn parameters, and what apply does."""
import pytest
import torch

from dihn_dist.models import augment
from dihn_dist.training.config import parse_config


def test_auto_flips_tiny_images_and_crops_imagenet_inputs():
    assert augment.resolve("auto", "small-cnn", "fashion-mnist") == "flip"
    assert augment.resolve("auto", "alexnet", "fashion-mnist") == "crop-flip"
    assert augment.resolve("auto", "resnet50", "cifar-10") == "crop-flip"
    assert augment.resolve("none", "small-cnn", "fashion-mnist") == "none"
    # auto waits for the data (the trainer resolves it once it has loaded the manifest); a mode stays
    assert parse_config(["--arch", "small-cnn"]).augment == "auto"
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


# --augment auto and the dataset: flips only where mirror images are known to be the same classes


def test_auto_does_not_flip_data_not_known_to_be_mirror_symmetric():
    for dataset in ("nus-wide-tc21", "image-list"):
        assert augment.resolve("auto", "small-cnn", dataset) == "none"
        assert augment.resolve("auto", "alexnet", dataset) == "crop"
        assert augment.resolve("auto", "resnet50", dataset) == "crop"
        assert augment.resolve("flip", "small-cnn", dataset) == "flip"  # asked for: kept


def test_crop_draws_crop_flips_crops_without_the_flips():
    draw = lambda mode: augment.draw_params(torch.Generator().manual_seed(5), 500, mode)  # noqa: E731
    crops, crop_flips = draw("crop"), draw("crop-flip")
    assert torch.equal(crops[:, :4], crop_flips[:, :4]) and (crops[:, :4] != draw("flip")[:, :4]).any()
    assert (crops[:, 4] == 1).all() and (crop_flips[:, 4] < 0).any()


def nus_command(data, out, *extra):
    from conftest import TINY_TRAIN_ARGS
    return ["--data", str(data), "--out", str(out), *TINY_TRAIN_ARGS, "--num-samples", "40", "--max-iter", "2",
            "--stage", "original", *extra]


def test_trainer_resolves_auto_from_the_prepared_dataset(tiny_nus, tiny_prepared, tmp_path):
    import json

    from dihn_dist import train
    from dihn_dist.training import loop
    resolved = lambda *argv: loop.check_inputs(parse_config([*argv, "--num-samples", "20"]))[0].augment  # noqa: E731
    assert resolved("--data", str(tiny_prepared), "--out", str(tmp_path / "a"), "--arch", "small-cnn") == "flip"
    assert resolved("--data", str(tiny_nus), "--out", str(tmp_path / "a"), "--arch", "small-cnn") == "none"
    assert resolved("--data", str(tiny_nus), "--out", str(tmp_path / "a"), "--arch", "resnet50") == "crop"
    assert resolved("--data", str(tiny_nus), "--out", str(tmp_path / "a"), "--arch", "small-cnn",
                    "--augment", "flip") == "flip"
    assert train.main(nus_command(tiny_nus, tmp_path / "run")) == 0
    assert json.loads((tmp_path / "run" / "config.json").read_text())["augment"] == "none"  # what ran


def test_a_resumed_run_keeps_the_augmentation_it_started_with(tiny_nus, tmp_path, monkeypatch):
    """A run that recorded flip (e.g. started by a version whose auto meant flip for small-cnn) resumes under
    auto with flip: auto means what the run resolved it to when it began, so it ends as it would have."""
    import json

    from dihn_dist import train
    out = tmp_path / "run"
    monkeypatch.setenv("DIHN_FAIL_AT", "rank=0,iteration=2")
    assert train.main(nus_command(tiny_nus, out, "--augment", "flip")) == 1
    monkeypatch.delenv("DIHN_FAIL_AT")
    assert train.main(nus_command(tiny_nus, out, "--resume")) == 0
    assert json.loads((out / "config.json").read_text())["augment"] == "flip"
    uninterrupted = tmp_path / "uninterrupted"
    assert train.main(nus_command(tiny_nus, uninterrupted, "--augment", "flip")) == 0
    codes = lambda run: (run / "original" / "database_codes.npy").read_bytes()  # noqa: E731
    assert codes(out) == codes(uninterrupted)
    # a mode other than the recorded one is still refused
    assert train.main(nus_command(tiny_nus, out, "--resume", "--augment", "none")) == 2
