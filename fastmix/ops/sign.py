"""The sign-flip key: a +-1 per coefficient that is a pure function of (seed, m, channel, block row, block col).

InstaHide draws a random sign mask per mixed image as a one-time key. fastmix generates it inside the
kernels from a counter-based hash instead, so no mask tensor ever exists in memory and every backend
(torch, C++, Triton, CUDA) produces the same bits. The hash is specified here once; the C++ twin is
``csrc/sign.h`` and the Triton twin lives next to the Triton kernels.

Specification (all arithmetic on unsigned 32-bit words, wrapping):

    mix32(h):  h ^= h >> 16; h *= 0x7FEB352D; h ^= h >> 15; h *= 0x846CA68B; h ^= h >> 16
               (Wellons' "lowbias32" finaliser: a bijection on 32-bit words with good avalanche)
    key(seed)        = mix32(mix32(seed_hi ^ 0x9E3779B9) ^ seed_lo)   seed in [0, 2**63), split in 32-bit halves
    plane(seed,m,ch) = mix32(mix32(key(seed) ^ m) ^ ch)               m = output row, ch = c*64 + u*8 + v
    h                = mix32(plane ^ ((i << 16) | j))                 i, j = block row and column (< 2**16)
    sign             = -1 if (h >> 31) == 1 else +1

The per-(m, ch) word ``plane`` is computed once per plane by the kernels; each coefficient then costs
one mix32.
"""
from __future__ import annotations

import torch

MASK32 = 0xFFFFFFFF
GOLDEN = 0x9E3779B9
MUL1 = 0x7FEB352D
MUL2 = 0x846CA68B
MAX_SEED = 2**63  # seeds travel through int64 op schemas
MAX_BLOCKS = 2**16  # block row / column must fit in 16 bits of the hash input


def mix32(h: int) -> int:
    """Scalar reference of the finaliser (Python ints)."""
    h &= MASK32
    h ^= h >> 16
    h = (h * MUL1) & MASK32
    h ^= h >> 15
    h = (h * MUL2) & MASK32
    h ^= h >> 16
    return h


def seed_key(seed: int) -> int:
    return mix32(mix32((seed >> 32) ^ GOLDEN) ^ (seed & MASK32))


def _mul32(h: torch.Tensor, c: int) -> torch.Tensor:
    # h holds uint32 values in int64. A plain h * c can exceed 2**63 (signed overflow), so multiply by
    # the two 16-bit halves of c: both partial products stay below 2**48 and the sum is exact mod 2**32.
    lo = h * (c & 0xFFFF)
    hi = ((h * (c >> 16)) & 0xFFFF) << 16
    return (lo + hi) & MASK32


def mix32_tensor(h: torch.Tensor) -> torch.Tensor:
    """mix32 on an int64 tensor holding uint32 values."""
    h = h & MASK32
    h = h ^ (h >> 16)
    h = _mul32(h, MUL1)
    h = h ^ (h >> 15)
    h = _mul32(h, MUL2)
    h = h ^ (h >> 16)
    return h


def check_seed(seed, name: str = "seed") -> int | None:
    """Validate a user seed: None or an int in [0, 2**63). ``name``: the argument, for the messages."""
    if seed is None:
        return None
    if isinstance(seed, bool) or not isinstance(seed, int):
        # numpy / torch integer scalars are accepted through __index__; bools are not seeds, in any wrapper
        # (operator.index(torch.tensor(True)) is 1)
        try:
            import operator

            if isinstance(seed, bool) or type(seed).__name__ == "bool_" or (isinstance(seed, torch.Tensor) and seed.dtype == torch.bool):
                raise TypeError
            seed = operator.index(seed)
        except TypeError:
            raise TypeError(f"{name} must be None or an int, got {type(seed).__name__}") from None
    if not 0 <= seed < MAX_SEED:
        raise ValueError(f"{name} must be in [0, 2**63), got {seed}")
    return int(seed)


def sign_ref(seed: int, m: int, channels: int, hb: int, wb: int, device=None, dtype=torch.float32) -> torch.Tensor:
    """The signs for output rows 0..m-1 as a (m, channels, hb, wb) tensor of +-1 (reference; materialised).

    Hashed a few rows at a time: the int64 intermediates are 2x the output's float32 bytes each and several
    are alive at once (at the frontend's 512 x 192 x 112 x 112, 9.9 GB each; the first GPU run's
    out-of-memory error, with most of the card still held by an earlier failed call, was raised here)."""
    key = seed_key(seed)
    dev = torch.device("cpu") if device is None else torch.device(device)
    out = torch.empty((m, channels, hb, wb), dtype=dtype, device=dev)
    ch = torch.arange(channels, dtype=torch.int64, device=dev).view(1, channels, 1, 1)
    ii = torch.arange(hb, dtype=torch.int64, device=dev).view(1, 1, hb, 1)
    jj = torch.arange(wb, dtype=torch.int64, device=dev).view(1, 1, 1, wb)
    pos = (ii << 16) | jj
    rows = max(1, (1 << 24) // max(1, channels * hb * wb))  # about 16 M elements per chunk
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        mm = torch.arange(r0, r1, dtype=torch.int64, device=dev).view(r1 - r0, 1, 1, 1)
        plane = mix32_tensor(mix32_tensor(key ^ mm) ^ ch)
        h = mix32_tensor(plane ^ pos)
        out[r0:r1] = (1 - 2 * (h >> 31)).to(dtype)
    return out
