"""The published eager pipeline, re-written as the baseline that fastmix is measured against.

This is how users of frequency-domain privacy masking run it today (TFace-style frequency front-end,
torchjpeg-style block DCT, InstaHide-style mixing), step by step, every intermediate materialised:

    x in [-1, 1] -> [0, 255] -> F.interpolate(bilinear, x8, align_corners=True) -> YCbCr (JPEG full range)
      -> -128 -> unfold into 8x8 blocks -> D @ block @ D^T (matmul with the DCT matrix)
      -> channels (c*64 + u*8 + v) -> gather partners by index -> weighted sum -> keep -> sign mask

It is deliberately *not* built from fastmix's references (``fastmix.*_ref``): it is the independent,
published way of computing the same numbers, and benches/test_bench_cpu.py asserts that it agrees with
them. Only ``fastmix.dct_matrix`` (the orthonormal DCT-II matrix) is shared.

The sign flip is InstaHide's one-time key as users apply it: a materialised +-1 mask tensor
(M, C*64, H/8, W/8) multiplied into the output. fastmix generates the same key inside its kernels from a
hash (fastmix/ops/sign.py); to compare numbers, pass that key here as ``sign``.
"""
from __future__ import annotations

import torch
import torch.nn.functional as F

from fastmix import dct_matrix

BLOCK = 8


def to_255(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 255]."""
    return (x + 1.0) * 127.5


def rgb_to_ycbcr(img: torch.Tensor) -> torch.Tensor:
    """(N, 3, H, W) RGB in [0, 255] -> YCbCr, JPEG (JFIF) full range, Cb and Cr offset by +128."""
    r, g, b = img[:, 0], img[:, 1], img[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128.0 - 0.168735892 * r - 0.331264108 * g + 0.5 * b
    cr = 128.0 + 0.5 * r - 0.418687589 * g - 0.081312411 * b
    return torch.stack([y, cb, cr], dim=1)


def blockify(img: torch.Tensor, size: int = BLOCK) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, L, size, size) tiles in row-major order (torchjpeg.dct.blockify)."""
    n, c, h, w = img.shape
    t = F.unfold(img.reshape(n * c, 1, h, w), kernel_size=(size, size), stride=(size, size))
    return t.transpose(1, 2).reshape(n, c, -1, size, size)


def deblockify(blocks: torch.Tensor, size: tuple[int, int]) -> torch.Tensor:
    """Inverse of :func:`blockify`: (N, C, L, b, b) -> (N, C, H, W) (torchjpeg.dct.deblockify)."""
    n, c, l, b, _ = blocks.shape
    t = blocks.reshape(n * c, l, b * b).transpose(1, 2)
    return F.fold(t, output_size=size, kernel_size=(b, b), stride=(b, b)).reshape(n, c, *size)


def block_dct_blocks(blocks: torch.Tensor) -> torch.Tensor:
    """Orthonormal 2-D DCT-II of (..., 8, 8) tiles as two matmuls with the DCT matrix: D @ X @ D^T."""
    d = dct_matrix(blocks.shape[-1], dtype=blocks.dtype, device=blocks.device)
    return d @ blocks @ d.t()


def block_dct(img: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) -> (N, C, H, W): every 8x8 tile replaced by its DCT (blockify, matmul, deblockify)."""
    return deblockify(block_dct_blocks(blockify(img)), img.shape[-2:])


def blocks_to_channels(coef: torch.Tensor, hb: int, wb: int) -> torch.Tensor:
    """(N, C, Hb*Wb, 8, 8) DCT tiles -> (N, C*64, Hb, Wb) frequency channels, id c*64 + u*8 + v (TFace)."""
    n, c = coef.shape[:2]
    t = coef.reshape(n, c, hb, wb, BLOCK * BLOCK).permute(0, 1, 4, 2, 3)
    return t.reshape(n, c * BLOCK * BLOCK, hb, wb)


def dct_channels(img: torch.Tensor) -> torch.Tensor:
    """(N, C, H, W) level-shifted image -> (N, C*64, H/8, W/8) block-DCT frequency channels."""
    h, w = img.shape[-2:]
    return blocks_to_channels(block_dct_blocks(blockify(img)), h // BLOCK, w // BLOCK)


def mix(ch: torch.Tensor, index: torch.Tensor, weight: torch.Tensor) -> torch.Tensor:
    """Gather partners and take the weighted sum.

    ch (N, C*64, Hb, Wb); index (M, k); weight (M, k) per image, (M, k, 64) per frequency (the same for
    every colour) or (M, k, C, 64). Returns (M, C*64, Hb, Wb).
    """
    m, k = index.shape
    cc = ch.shape[1]
    parts = ch[index]  # (M, k, C*64, Hb, Wb): every partner copied
    w = weight.to(ch.dtype)
    if w.dim() == 2:
        w = w.reshape(m, k, 1, 1, 1)
    elif w.dim() == 3:
        w = w.repeat(1, 1, cc // (BLOCK * BLOCK)).reshape(m, k, cc, 1, 1)
    else:
        w = w.reshape(m, k, cc, 1, 1)
    return (parts * w).sum(dim=1)


def mask(y: torch.Tensor, keep=None, sign: torch.Tensor | None = None) -> torch.Tensor:
    """Apply the one-time sign mask (M, C*64, Hb, Wb) of +-1, then keep the listed channel ids."""
    if sign is not None:
        y = y * sign
    if keep is not None:
        y = y[:, torch.as_tensor(keep, dtype=torch.long, device=y.device)]
    return y


def freq_mix_baseline(x, index, weight, *, keep=None, sign=None):
    """Published pipeline of fastmix.freq_mix(..., out="channels"): (N, C, H, W) -> (M, n_kept, H/8, W/8)."""
    return mask(mix(dct_channels(x), index, weight), keep, sign)


def frontend_baseline(x, *, upsample=8, keep=None, index=None, weight=None, sign=None):
    """Published pipeline of fastmix.frontend (color="ycbcr"): (N, 3, h, w) in [-1, 1] ->
    (M, n_kept, h*upsample/8, w*upsample/8). Materialises the upsampled image and every step after it."""
    img = to_255(x)
    if upsample != 1:
        img = F.interpolate(img, scale_factor=upsample, mode="bilinear", align_corners=True)
    ycc = rgb_to_ycbcr(img) - 128.0
    ch = dct_channels(ycc)
    if index is None:
        y = ch
    else:
        y = mix(ch, index, weight)
    return mask(y, keep, sign)
