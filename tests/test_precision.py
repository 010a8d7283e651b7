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
