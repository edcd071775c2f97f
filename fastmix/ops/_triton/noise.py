"""The seeded noise draw of fastmix/ops/noise.py (the specification) as a Triton device function.

The hash is the sign key's (fastmix/ops/_triton/sign.py, uint32 arithmetic, bit-identical to csrc/sign.h)
with the noise key; the draw is a read of the float32 table the op receives (the same bytes as every other
backend's), times the channel's scale: no transcendental function in the kernel.
"""
from __future__ import annotations

import triton
import triton.language as tl

from ..noise import noise_key
from .sign import _mix32, _plane_hash


def noise_kernel_key(seed: int) -> int:
    """seed -> nkey(seed) as a signed 32-bit int (a Triton i32 argument; bitcast back in the kernel)."""
    k = noise_key(int(seed))
    return k - (1 << 32) if k >= (1 << 31) else k


def table_shift(table) -> int:
    """32 - B for a table of 2**B entries: the right shift that turns the hash into an index."""
    return 32 - (table.numel().bit_length() - 1)


@triton.jit
def _noise(key, m, ch, bi, bj, scale_ptr, table_ptr, SHIFT: tl.constexpr):
    """scale[ch] * TABLE[mix32(plane(nkey, m, ch) ^ (bi << 16 | bj)) >> SHIFT] (float32); shapes broadcast.

    key: the noise key as an i32 scalar (bitcast); ch: channel ids; bi, bj: block row / column."""
    plane = _plane_hash(key, m, ch)
    pos = (bi.to(tl.uint32) << 16) | bj.to(tl.uint32)
    h = _mix32(plane ^ pos)
    q = tl.load(table_ptr + (h >> SHIFT).to(tl.int32))
    s = tl.load(scale_ptr + ch)
    return q * s
