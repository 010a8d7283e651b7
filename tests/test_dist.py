"""Single-process behaviour of the communication module (the multi-process tests live in test_distributed.py)."""
import numpy as np
import pytest
import torch

from dihn_dist import dist


@pytest.mark.parametrize("bits", [1, 7, 8, 12, 48, 65])
def test_pack_matches_numpy_packbits_and_round_trips(bits):
    codes = torch.randint(0, 2, (37, bits)) * 2 - 1
    packed = dist.pack_codes(codes)
    assert packed.dtype == torch.uint8
    assert np.array_equal(packed.numpy(), np.packbits(codes.numpy() > 0, axis=1))
    assert torch.equal(dist.unpack_codes(packed, bits), codes.to(torch.int8))


def test_single_process_collectives_are_identities():
    dist.init("cpu")
    rows = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(dist.gather_rows(rows), rows)
    assert torch.equal(dist.all_reduce_sum(rows), rows)
    codes = torch.tensor([[1, -1, 1], [-1, -1, 1]], dtype=torch.int8)
    received, sent = dist.broadcast_codes(codes, 3)
    assert torch.equal(received, codes) and sent == 2


def test_device_selection_errors():
    with pytest.raises(ValueError, match="--device"):
        dist.select_device("tpu", 0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            dist.select_device("cuda", 0)
    assert dist.select_device("cpu", 3) == torch.device("cpu")
