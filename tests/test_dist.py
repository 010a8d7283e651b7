"""Single-process behaviour of the communication module (the multi-process tests live in test_distributed.py)."""
import numpy as np
import pytest
import torch

from dihn_dist.common.codes import pack_codes, unpack_codes
from dihn_dist.distributed import comm, machine


@pytest.mark.parametrize("bits", [1, 7, 8, 12, 48, 65])
def test_pack_matches_numpy_packbits_and_round_trips(bits):
    codes = torch.randint(0, 2, (37, bits)) * 2 - 1
    packed = pack_codes(codes)
    assert packed.dtype == torch.uint8
    assert np.array_equal(packed.numpy(), np.packbits(codes.numpy() > 0, axis=1))
    assert torch.equal(unpack_codes(packed, bits), codes.to(torch.int8))


def test_single_process_collectives_are_identities():
    comm.init("cpu")
    rows = torch.arange(6.0).reshape(3, 2)
    assert torch.equal(comm.gather_rows(rows), rows)
    assert torch.equal(comm.all_reduce_sum(rows), rows)
    codes = torch.tensor([[1, -1, 1], [-1, -1, 1]], dtype=torch.int8)
    received, sent = comm.broadcast_codes(codes, 2, 3)
    assert torch.equal(received, codes) and sent == 2


def test_device_selection_errors():
    with pytest.raises(ValueError, match="--device"):
        machine.select_device("tpu", 0)
    if not torch.cuda.is_available():
        with pytest.raises(ValueError, match="CUDA is not available"):
            machine.select_device("cuda", 0)
    assert machine.select_device("cpu", 3) == torch.device("cpu")


def test_forward_passes_use_small_batches_on_a_cpu_and_large_ones_on_a_gpu():
    cpu, gpu = torch.device("cpu"), torch.device("cuda", 0)
    assert [machine.inference_batch_size(b, cpu) for b in (8, 32, 64, 512)] == [8, 32, 32, 32]
    assert [machine.inference_batch_size(b, gpu) for b in (8, 64, 512)] == [256, 256, 512]
