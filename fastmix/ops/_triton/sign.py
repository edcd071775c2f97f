"""The sign-flip hash of fastmix/ops/sign.py (the specification) as Triton device functions.

All arithmetic is on uint32 tensors: Triton lowers ``*`` on uint32 to a wrapping 32-bit multiply and ``>>``
to a logical shift, exactly the C++ twin in csrc/cpu/sign.h, so the signs are bit-identical on every backend.
Integer literals combine with uint32 tensors as uint32 (checked in the generated TTIR: ``arith.muli`` /
``arith.shrui`` on i32). The per-(m, channel) word is computed once per tile of coefficients; each
coefficient then costs one finaliser, which on the frontend's 1.2e9 coefficients per batch is as much
integer work as the GPU's store bandwidth allows time for, hence the shortcuts in ``_apply_sign_premixed``
(which ``_apply_sign`` calls too).
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from ..sign import seed_key


def kernel_key(seed: int) -> int:
    """seed -> key(seed) as a *signed* 32-bit int, the form a Triton i32 argument takes (bitcast back in-kernel)."""
    k = seed_key(int(seed))
    return k - (1 << 32) if k >= (1 << 31) else k


@triton.jit
def _mix32(h):
    # Wellons' lowbias32 finaliser; h is a uint32 tensor.
    h ^= h >> 16
    h *= 0x7FEB352D
    h ^= h >> 15
    h *= 0x846CA68B
    h ^= h >> 16
    return h


@triton.jit
def _plane_hash(key, m, ch):
    """plane(seed, m, ch) = mix32(mix32(key ^ m) ^ ch). key: i32 scalar (bitcast), m: scalar, ch: int tensor."""
    k = key.to(tl.uint32, bitcast=True)
    mu = m.to(tl.uint32)
    return _mix32(_mix32(k ^ mu) ^ ch.to(tl.uint32))


@triton.jit
def _sign_flip(plane, i, j):
    """True where the coefficient at block (i, j) of that plane is negated: mix32(plane ^ (i << 16 | j)) >> 31."""
    pos = (i.to(tl.uint32) << 16) | j.to(tl.uint32)
    return (_mix32(plane ^ pos) >> 31) != 0


@triton.jit
def _apply_sign_premixed(val, premixed, i, j):
    """val (float32) negated where _sign_flip(plane, i, j), given premixed = plane ^ (plane >> 16) (what
    sign_planes stores); shapes broadcast.

    Same bits as _sign_flip, cheaper: mix32's first step distributes over the xor, since
    (plane ^ (i << 16 | j)) >> 16 = (plane >> 16) ^ i for i, j < 2**16, so it splits into the per-channel
    word and a per-block word (i << 16) | (j ^ i) computed once per block (csrc/sign.h: sign_flip_premixed);
    mix32's last step (h ^= h >> 16) never changes bit 31, so it is skipped; and the sign bit of the hash
    is xor-ed into the float's sign bit (one LOP3 instead of a compare and a select). -0.0 / NaN payloads
    behave as a negation does.
    """
    iu = i.to(tl.uint32)
    h = premixed ^ ((iu << 16) | (j.to(tl.uint32) ^ iu))
    h *= 0x7FEB352D
    h ^= h >> 15
    h *= 0x846CA68B
    bits = val.to(tl.uint32, bitcast=True) ^ ((h >> 31) << 31)  # the compiler folds this to a mask
    return bits.to(tl.float32, bitcast=True)


@triton.jit
def _apply_sign(val, plane, i, j):
    """_apply_sign_premixed for a plain hash word (hashed in the kernel, or a table made with
    premixed=False): the pre-mixing costs the per-coefficient shift and xor it saves there."""
    return _apply_sign_premixed(val, plane ^ (plane >> 16), i, j)


@triton.jit
def _sign_planes_kernel(out_ptr, key, total, CH, PREMIX: tl.constexpr, BLOCK: tl.constexpr):
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    plane = _plane_hash(key, offs // CH, offs % CH)
    if PREMIX:
        plane = plane ^ (plane >> 16)
    tl.store(out_ptr + offs, plane.to(tl.int32, bitcast=True), mask=offs < total)


def sign_planes(key: int, m: int, channels: int, device, premixed: bool = True) -> torch.Tensor:
    """(m, channels) int32: the hash word plane(seed, m, ch) of every output row and channel, pre-mixed
    (plane ^ (plane >> 16), for _apply_sign_premixed) unless premixed=False (for _apply_sign); the bit
    pattern of the uint32. For kernels whose threads each need all 64 words of a channel block.

    One small launch (m * channels words: 0.4 MB at m = 512, 192 channels) on the current stream; no host
    sync, so the forward stays CUDA-graph capturable.
    """
    out = torch.empty((m, channels), dtype=torch.int32, device=device)
    total = m * channels
    if total:
        block = 1024
        _sign_planes_kernel[(triton.cdiv(total, block),)](out, key, total, channels, PREMIX=premixed, BLOCK=block)
    return out
