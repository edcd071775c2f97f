"""Triton block DCT: orthonormal 2-D DCT-II (inverse: DCT-III) of every 8x8 tile, op ``fastmix::block_dct_triton``.

Reference: fastmix.ops.dct.block_dct_ref / block_idct_ref (the executable spec; tests compare against it).

Kernel design. A program takes BL consecutive 8x8 tiles of one (H, W) plane (blocks numbered row-major)
and holds them as one [BL, 64] register tile, each row a tile in row-major order (a*8 + b). Row a of a
tile is 8 contiguous elements and neighbouring tiles of a block row are neighbours in memory, so the load
and the store are 32-byte runs that Triton vectorises. The 2-D transform D @ X @ D^T of every tile is one
matrix product with the 64x64 Kronecker matrix (D kron D): [BL, 64] @ [64, 64] through tl.dot, built in
registers from the 8x8 D once per program. That is 4x the multiply-adds of the separable form (which
Triton cannot express on register tiles without shuffles through shared memory, and whose K = 8 is below
tl.dot's minimum of 16), and it is regular code: 128 flops per 8 bytes moved, near an H100's fp32-FMA
balance point (about 20 flop/byte), hence the tensor-core option CONFIG["dot_precision_fp32_dct"] =
"tf32x3" that the GPU benchmark can time against exact "ieee" FMAs (on an H100 ieee measured faster here,
tf32x3 in the mix kernels). channels=True writes the coefficients directly in the to_channels layout (the
per-frequency freq_mix path transforms every image once this way).

Bytes moved: read x once, write y once (the floor). Block sizes other than 8, and float64 inputs, fall
back to the reference (a batched einsum through PyTorch): exact and differentiable, just not fused. (The
custom op itself, called directly on float64 data, computes in float32.)
"""
from __future__ import annotations

import os

import torch
import triton
import triton.language as tl

from ..dct import _block_transform_ref, register_block_dct_meta
from . import dot_precision, interpreter_compat, tile_config

BLOCK = 8

# ----------------------------------------------------------------------------------------------------
# Kernels
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _kron8(a_ptr, b_ptr, FORWARD: tl.constexpr):
    """The 64x64 Kronecker matrix of two 8x8 matrices A, B (row-major, A[u, a] at a_ptr + u*8 + a).

    FORWARD: rows are pixels g = a*8 + b, columns coefficients f = u*8 + v, entry A[u, a] * B[v, b], so a
    [BL, 64] tile of pixels times it gives the coefficients of A @ X @ B^T. Otherwise the transpose (rows
    coefficients, columns pixels): coefficients times it give A^T @ C @ B, the adjoint / inverse.
    Built from two 8x8 loads and a 4-D outer product (no gathers): once per program.
    """
    i = tl.arange(0, 8)
    if FORWARD:
        at = tl.load(a_ptr + i[None, :] * 8 + i[:, None])  # at[a, u] = A[u, a]
        bt = tl.load(b_ptr + i[None, :] * 8 + i[:, None])  # bt[b, v] = B[v, b]
        k4 = at[:, None, :, None] * bt[None, :, None, :]  # [a, b, u, v]
    else:
        am = tl.load(a_ptr + i[:, None] * 8 + i[None, :])  # am[u, a]
        bm = tl.load(b_ptr + i[:, None] * 8 + i[None, :])  # bm[v, b]
        k4 = am[:, None, :, None] * bm[None, :, None, :]  # [u, v, a, b]
    return tl.reshape(k4, (64, 64))


@triton.jit
def _cast_out(v, ptr, RNE_BF16: tl.constexpr):
    """v (float32) in the element type of ptr. With RNE_BF16 (set under TRITON_INTERPRET=1), bfloat16 is
    rounded to nearest even by hand: Triton's interpreter truncates fp32 -> bf16 where compiled code
    rounds to nearest (cvt.rn), which doubles the rounding error that CPU tests would see."""
    if RNE_BF16 and ptr.dtype.element_ty == tl.bfloat16:
        bits = v.to(tl.uint32, bitcast=True)
        bits = bits + 0x7FFF + ((bits >> 16) & 1)
        return (bits >> 16).to(tl.uint16).to(tl.bfloat16, bitcast=True)
    return v.to(ptr.dtype.element_ty)


@triton.jit
def _tile_coords(tile, W, Wb, HbWb, BL: tl.constexpr):
    """Block ids L of one tile, their mask, block row / column, and the [BL, 64] pixel offsets of the
    blocks' 8x8 tiles inside a plane (row a*8 + b of the tile = pixel (8I + a, 8J + b))."""
    L = tile * BL + tl.arange(0, BL)
    lmask = L < HbWb
    bi = L // Wb
    bj = L % Wb
    g = tl.arange(0, 64)
    poff = (bi * 8 * W + bj * 8)[:, None] + ((g // 8) * W + g % 8)[None, :]
    return L, lmask, bi, bj, g, poff


@triton.jit
def _block_dct_kernel(
    x_ptr, y_ptr, d_ptr,
    HW, W, Wb, HbWb, n_tiles,
    INVERSE: tl.constexpr, CHANNELS: tl.constexpr, RNE_BF16: tl.constexpr, BL: tl.constexpr, PREC: tl.constexpr,
):
    # One program: BL tiles of one (H, W) plane. The plane's base offset is an int64 scalar (planes * H * W
    # may pass 2**31); offsets inside a plane are int32 (the launcher checks H * W < 2**31), which keeps
    # the [BL, 64] offset tile at one register per element.
    pid = tl.program_id(0)
    tile = pid % n_tiles
    plane = (pid // n_tiles).to(tl.int64) * HW
    blk, bmask, _, _, g, offs = _tile_coords(tile, W, Wb, HbWb, BL)  # offs [BL, 64]
    mask = bmask[:, None]
    tile_in = tl.load(x_ptr + plane + offs, mask=mask, other=0.0).to(tl.float32)
    if INVERSE:
        kron = _kron8(d_ptr, d_ptr, False)
    else:
        kron = _kron8(d_ptr, d_ptr, True)
    out = tl.dot(tile_in, kron, input_precision=PREC)
    if CHANNELS:
        # to_channels layout fused: coefficient f of block L goes to channel f of the plane, i.e. offset
        # f * Hb * Wb + L: for a fixed f the BL blocks are contiguous (coalesced stores along L).
        offs = (g * HbWb)[None, :] + blk[:, None]
    tl.store(y_ptr + plane + offs, _cast_out(out, y_ptr, RNE_BF16), mask=mask)


# ----------------------------------------------------------------------------------------------------
# Launcher
# ----------------------------------------------------------------------------------------------------

_dct_cache: dict = {}


def rne_bf16() -> bool:
    """Round bf16 stores by hand (see _cast_out): only under Triton's interpreter."""
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def dct8(device: torch.device) -> torch.Tensor:
    """The 8x8 orthonormal DCT-II matrix in float32 on ``device``, made once per device.

    Cached so that a call never copies from the host (a host copy inside a captured CUDA graph is illegal);
    the first call on a device should happen before any capture, as with every lazily built constant.
    """
    key = str(device)
    d = _dct_cache.get(key)
    if d is None:
        from ..dct import dct_matrix

        d = dct_matrix(BLOCK, torch.float32, device).contiguous()
        _dct_cache[key] = d
    return d


def check_plane(h: int, w: int) -> None:
    if h * w >= 2**31:
        raise ValueError(f"the triton backend needs H * W < 2**31 per plane, got {h} x {w}")


def block_dct_forward(x: torch.Tensor, inverse: bool, channels: bool = False, out_dtype=None) -> torch.Tensor:
    """Launch _block_dct_kernel on x (..., H, W), H and W multiples of 8.

    Returns a new contiguous tensor of x's shape (or, with channels=True and x (N, C, H, W), the coefficients
    in the frequency-channel layout (N, C*64, H/8, W/8) of fastmix.to_channels), in out_dtype or x's dtype.
    """
    interpreter_compat()
    xc = x.contiguous()
    h, w = xc.shape[-2], xc.shape[-1]
    hb, wb = h // BLOCK, w // BLOCK
    dt = xc.dtype if out_dtype is None else out_dtype
    if channels:
        n, c = xc.shape[0], xc.shape[1]
        y = torch.empty((n, c * BLOCK * BLOCK, hb, wb), dtype=dt, device=xc.device)
    else:
        y = torch.empty(xc.shape, dtype=dt, device=xc.device)
    if xc.numel() == 0:
        return y
    check_plane(h, w)
    planes = xc.numel() // (h * w)
    prec = dot_precision(xc.dtype, "dct")
    bl, nw = tile_config("dct", prec)
    n_tiles = triton.cdiv(hb * wb, bl)
    _block_dct_kernel[(planes * n_tiles,)](
        xc, y, dct8(xc.device), h * w, w, wb, hb * wb, n_tiles,
        INVERSE=bool(inverse), CHANNELS=bool(channels), RNE_BF16=rne_bf16(), BL=bl, PREC=prec, num_warps=nw,
    )
    return y


# ----------------------------------------------------------------------------------------------------
# Op registration: custom op with fake and autograd (the DCT is orthonormal: the gradient of one
# direction is the other direction).
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastmix::block_dct_triton", mutates_args=())
def block_dct_triton(x: torch.Tensor, block: int, inverse: bool) -> torch.Tensor:
    if block != BLOCK:
        raise ValueError(f"fastmix::block_dct_triton supports block = {BLOCK} only, got {block}")
    return block_dct_forward(x, inverse)


register_block_dct_meta("fastmix::block_dct_triton")  # the same fake and autograd as the C++ op


# ----------------------------------------------------------------------------------------------------
# Entry point used by fastmix.ops.dct when the backend is "triton"
# ----------------------------------------------------------------------------------------------------


def block_transform(x: torch.Tensor, block: int, inverse: bool) -> torch.Tensor:
    """Block DCT (inverse: DCT-III) of validated x (..., H, W) through Triton.

    block == 8 runs the fused kernel; any other block size, and float64 data (checks, gradcheck: the kernel
    computes in float32), fall back to the pure-PyTorch reference (fastmix.ops.dct._block_transform_ref),
    which is exact and differentiable on every device.
    """
    if block != BLOCK or x.dtype == torch.float64:
        return _block_transform_ref(x, block, inverse)
    return torch.ops.fastmix.block_dct_triton(x, block, inverse)
