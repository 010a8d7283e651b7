"""--precision and --channels-last on the CPU: bf16 runs and stays close to fp32; fp16's gradient scaler skips
overflowing steps; channels-last changes the memory format only; the codes stay exact +-1. (fp16 autocast
is slow on CPUs and --compile takes minutes: launch/gpu_check.sh exercises both on a GPU.)"""
from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from conftest import TINY_TRAIN_ARGS as TINY

from dihn_dist import train
from dihn_dist.models.networks import MixedPrecision, SmallCNN, use_channels_last

pytestmark = pytest.mark.filterwarnings("ignore::pytest.PytestUnraisableExceptionWarning")  # numba finalizers

CPU = torch.device("cpu")


def losses(run, stage="original"):
    history = json.loads((run / "metrics.json").read_text())["stages"][stage]["iterations"]
    return np.array([it["loss_total"] for it in history])


@pytest.fixture(scope="module")
def fp32_run(tiny_prepared, tmp_path_factory):
    out = tmp_path_factory.mktemp("precision") / "fp32"
    assert train.main(["--data", str(tiny_prepared), "--out", str(out), *TINY, "--max-iter", "3",
                       "--stage", "original", "--precision", "fp32"]) == 0
    return out


def test_bf16_runs_and_stays_close_to_fp32(fp32_run, tiny_prepared, tmp_path):
    out = tmp_path / "bf16"
    assert train.main(["--data", str(tiny_prepared), "--out", str(out), *TINY, "--max-iter", "3",
                       "--stage", "original", "--precision", "bf16"]) == 0
    assert np.allclose(losses(out), losses(fp32_run), rtol=0.02)
    assert not np.array_equal(losses(out), losses(fp32_run)), "bf16 autocast did not change anything"
    codes = np.load(out / "original" / "database_codes.npy")
    assert set(np.unique(codes)) == {-1, 1}
    reference = np.load(fp32_run / "original" / "database_codes.npy")
    assert (codes == reference).mean() > 0.8
    for run in (out, fp32_run):  # every metric is computed in float32/64 from the codes
        row = json.loads((run / "metrics.json").read_text())["rows"][0]
        assert 0 <= row["map_all"] <= 1


def test_channels_last_changes_the_layout_not_the_result(fp32_run, tiny_prepared, tmp_path):
    out = tmp_path / "nhwc"
    assert train.main(["--data", str(tiny_prepared), "--out", str(out), *TINY, "--max-iter", "3",
                       "--stage", "original", "--precision", "fp32", "--channels-last", "on"]) == 0
    assert np.allclose(losses(out), losses(fp32_run), rtol=1e-4)
    assert use_channels_last("auto", CPU) is False and use_channels_last("auto", torch.device("cuda")) is True


def test_fp16_scaler_steps_and_skips_overflowing_steps():
    precision = MixedPrecision("fp16", CPU)
    assert precision.scaler is not None and precision.name == "fp16"
    model = SmallCNN(8)
    optimizer = torch.optim.Adam(model.parameters(), lr=1e-3)
    before = [p.detach().clone() for p in model.parameters()]
    for _ in range(20):  # a step whose scaled gradients overflow is skipped and the scale halved
        with precision.autocast():
            outputs = model(torch.randn(4, 3, 28, 28)).float()
        precision.step((outputs ** 2).sum(), optimizer)
    assert any(not torch.equal(a, b) for a, b in zip(before, model.parameters()))
    assert all(torch.isfinite(p).all() for p in model.parameters())
    state = precision.scaler.state_dict()  # what the trainer's checkpoint keeps for an exact resume
    assert 0 < state["scale"] < 65536.0, "no overflow ever lowered the scale"


def test_auto_precision_is_fp32_on_cpu_and_bad_values_are_refused():
    assert MixedPrecision("auto", CPU).name == "fp32" and MixedPrecision("auto", CPU).scaler is None
    with pytest.raises(ValueError, match="--precision: expected one of auto, fp32, bf16, fp16"):
        MixedPrecision("fp8", CPU)


@pytest.mark.parametrize("arch", ["small-cnn", "alexnet"])
def test_hash_layer_and_tanh_stay_float32_under_bf16_autocast(arch):
    """Under bf16 autocast the backbone runs in bf16, but the hash layer and tanh run in float32: the outputs
    are float32 and equal the fp32 head applied to the same features (in bf16 tanh saturates to exactly +-1
    from |x| ~ 3.5 on, where its gradient is exactly 0)."""
    from dihn_dist.models.networks import build_model
    torch.manual_seed(0)
    model = build_model(arch, 12)
    head = model.hash_layer[-1] if arch == "small-cnn" else model.backbone.classifier[6]
    seen = {}
    head.register_forward_pre_hook(lambda module, inputs: seen.update(features=inputs[0]))
    images = torch.randn(4, 3, 32 if arch == "small-cnn" else 64, 32 if arch == "small-cnn" else 64)
    with MixedPrecision("bf16", CPU).autocast():
        outputs = model(images)
    assert seen["features"].dtype == torch.bfloat16, "the backbone did not run in bf16"
    assert outputs.dtype == torch.float32
    expected = torch.tanh(torch.nn.functional.linear(seen["features"].float(), head.weight, head.bias))
    assert torch.equal(outputs, expected)


def test_fp16_scaler_step_reads_nothing_on_the_host(monkeypatch):
    """The fp16 scaler's inf check stays on the device (fused Adam takes it as a tensor): no .item() per step."""
    precision = MixedPrecision("fp16", CPU)
    model = SmallCNN(8)
    optimizer = precision.optimizer(model.parameters(), 1e-3, 1e-5)
    reads = []
    real_item = torch.Tensor.item
    monkeypatch.setattr(torch.Tensor, "item", lambda self: reads.append(1) or real_item(self))
    for _ in range(3):
        with precision.autocast():
            outputs = model(torch.randn(4, 3, 28, 28))
        precision.step((outputs ** 2).sum(), optimizer)
    assert reads == []
    assert all(torch.isfinite(p).all() for p in model.parameters())


def test_encoding_feeds_a_channels_last_network_channels_last_inputs():
    from dihn_dist.models.networks import encode_batches
    torch.manual_seed(0)
    model = SmallCNN(8).to(memory_format=torch.channels_last)
    formats = []
    model.features[0].register_forward_pre_hook(
        lambda module, inputs: formats.append(inputs[0].is_contiguous(memory_format=torch.channels_last)))
    batches = [(torch.randn(3, 3, 28, 28),), (torch.randn(2, 3, 28, 28),)]
    nhwc = encode_batches(model, batches, channels_last=True)
    assert formats == [True, True]
    assert torch.equal(nhwc, encode_batches(model, batches))
