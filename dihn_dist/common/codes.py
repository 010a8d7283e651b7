"""The code format, written down once.

Codes are +-1 rows (int8 at rest, one row per database item or query). Packed, a row is
numpy.packbits(codes > 0): bit j of a code is bit 7 - j % 8 of byte j // 8 (the most significant bit
first), 1 means +1, and the padding bits of the last byte are 0. Run folders store codes both ways, FAISS
indexes hold the packed rows, and rank 0 broadcasts packed rows.

`pack_codes` and `unpack_codes` take numpy arrays (torch-free readers, export, FAISS) or torch tensors
(packed on the tensor's own device) and return the same kind.
"""
from __future__ import annotations

import numpy as np

BIT_ORDER = ("numpy.packbits(codes > 0, axis=1): bit j of a code is bit 7 - j % 8 of byte j // 8, 1 = +1; "
             "padding bits and bytes up to index_bits are 0")
BYTE_WEIGHTS = (128, 64, 32, 16, 8, 4, 2, 1)


def packed_width(code_length: int) -> int:
    """Bytes per packed row."""
    return -(-code_length // 8)


def pack_codes(codes):
    """+-1 codes (n x c) -> uint8 (n x ceil(c/8)) in the bit order above."""
    if isinstance(codes, np.ndarray):
        return np.packbits(codes > 0, axis=1)
    import torch  # a tensor came in, so torch is loaded already
    bits = (codes > 0).to(torch.uint8)
    pad = (-bits.shape[1]) % 8
    if pad:
        bits = torch.nn.functional.pad(bits, (0, pad))
    weights = torch.tensor(BYTE_WEIGHTS, dtype=torch.uint8, device=codes.device)
    return (bits.view(bits.shape[0], -1, 8) * weights).sum(dim=2, dtype=torch.uint8)


def unpack_codes(packed, code_length: int):
    """Inverse of pack_codes: int8 +-1 codes (n x code_length)."""
    if isinstance(packed, np.ndarray):
        bits = np.unpackbits(packed, axis=1, count=code_length)
        return (bits.astype(np.int8) * 2 - 1).astype(np.int8)
    import torch
    shifts = torch.arange(7, -1, -1, dtype=torch.uint8, device=packed.device)
    bits = (packed.unsqueeze(2) >> shifts) & 1
    bits = bits.reshape(packed.shape[0], packed.shape[1] * 8)[:, :code_length]
    return bits.to(torch.int8) * 2 - 1
