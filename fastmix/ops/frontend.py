"""frontend family: the published frequency front-end of frequency-domain FR, fused.

    x in [-1, 1] -> [0, 255] -> bilinear x`upsample` (align_corners=True) -> YCbCr (JPEG full range) - 128
      -> 8x8 block DCT -> frequency channels, optionally mixed, masked and signed exactly as freq_mix.

Why it is cheap: the colour transform is affine per pixel, so it commutes with bilinear interpolation
(whose weights sum to 1) and runs at the source resolution. The upsampling along each axis is a matrix
U (h*s, h) with two non-zeros per row, so block I of the upsampled, transformed image is
D @ U[8I:8I+8] @ X @ U[8J:8J+8]^T @ D^T, and U[8I:8I+8] touches only R (<= 3 for s = 8) source rows.
The kernels therefore use the freq_mix machinery with A_I = D @ U[8I:8I+8, r_I:r_I+R]: the upsampled
image is never materialised.

Read top to bottom: reference (materialising, the executable spec) -> geometry -> public functions.
"""
from __future__ import annotations

import math

import torch
import torch.nn.functional as F

from .. import _backend
from ._common import (
    check_autodiff_mode,
    check_float_tensor,
    check_same_device,
    compute_dtype,
    exact_under_autocast,
    is_compiling,
    tensor_cache,
    zeros_result,
)
from .dct import block_dct_ref, block_idct_ref, dct_matrix, from_channels, to_channels
from .freq_mix import (
    BLOCK,
    FREQS,
    check_index,
    check_weight,
    mix_channels_ref,
    mix_op,
    normalize_keep,
)
from .noise import check_noise
from .sign import MAX_BLOCKS, check_seed

# JPEG (JFIF) full-range RGB -> YCbCr; Cb and Cr are offset by +128, then every channel is level-shifted
# by -128 before the DCT, so the affine map applied to [0, 255] RGB is  YCC = RGB @ M^T + (-128, 0, 0).
YCBCR = torch.tensor(
    [
        [0.299, 0.587, 0.114],
        [-0.168735892, -0.331264108, 0.5],
        [0.5, -0.418687589, -0.081312411],
    ],
    dtype=torch.float64,
)
YCBCR_SHIFT = torch.tensor([-128.0, 0.0, 0.0], dtype=torch.float64)
COLORS = ("ycbcr", "none")

# ----------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------


def to_255(x: torch.Tensor) -> torch.Tensor:
    """[-1, 1] -> [0, 255]."""
    return (x + 1.0) * 127.5


def _affine3(v: torch.Tensor, m, shift) -> torch.Tensor:
    """out[:, d] = sum_c m[d][c] * v[:, c] + shift[d] for 3 channels, with m and shift Python floats.

    Elementwise on purpose, not a (3x3) @ pixels einsum: einsum is a matmul, which torch.autocast runs in
    bfloat16 / float16 (under autocast("cpu", torch.bfloat16) the float32 front-end carried bf16 rounding,
    errors of 3.5-6 on values up to ~680), in the forward and in a backward called inside the autocast
    region; multiply-adds are never autocast. Bit-identical to the float32 einsum it replaces (checked at
    16 x 3 x 112 x 112; three products summed in order, the shift last) and no slower (1.4 vs 2.2 ms there,
    one thread). Python-float constants are kernel arguments: no constant tensor to cache per device, no
    host-to-device copy."""
    r, g, b = v.unbind(1)
    out = []
    for row, sh in zip(m, shift):
        o = r.mul(row[0]).add_(g, alpha=row[1]).add_(b, alpha=row[2])
        out.append(o.add_(sh) if sh else o)
    return torch.stack(out, 1)


_YCBCR_ROWS = YCBCR.tolist()
_YCBCR_SHIFTS = YCBCR_SHIFT.tolist()
_YCBCR_INV_ROWS = torch.linalg.inv(YCBCR).tolist()


def color_transform(v: torch.Tensor, color: str) -> torch.Tensor:
    """[0, 255] images -> level-shifted YCbCr (or level-shifted channels as they are, for color='none')."""
    if color == "none":
        return v - 128.0
    return _affine3(v, _YCBCR_ROWS, _YCBCR_SHIFTS)


def inverse_color_transform(y: torch.Tensor, color: str) -> torch.Tensor:
    """Inverse of ``color_transform(to_255(x))``: level-shifted YCbCr -> [-1, 1] images."""
    if color == "none":
        v = y + 128.0
    else:
        unshifted = y - y.new_tensor(_YCBCR_SHIFTS).view(1, 3, 1, 1)
        v = _affine3(unshifted, _YCBCR_INV_ROWS, (0.0, 0.0, 0.0))
    return v / 127.5 - 1.0


def upsample_ref(v: torch.Tensor, upsample: int) -> torch.Tensor:
    if upsample == 1:
        return v
    return F.interpolate(v, scale_factor=upsample, mode="bilinear", align_corners=True)


@exact_under_autocast
def frontend_ref(x, *, upsample=8, color="ycbcr", keep=None, index=None, weight=None, seed=None, out_dtype=None,
                 noise=None, noise_seed=None, noise_scale=None):
    """Pure-PyTorch reference of :func:`frontend`: materialises the upsampled image (what users run today)."""
    args = _validate(x, upsample, color, keep, index, weight, seed, out_dtype, noise, noise_seed, noise_scale)
    index, weight4, ids, seed, out_dtype, nz = args
    cd = compute_dtype(x.dtype)
    u = color_transform(upsample_ref(to_255(x.to(cd)), upsample), color)
    ch = to_channels(block_dct_ref(u))
    return mix_channels_ref(ch, index, weight4, ids, seed, False, out_dtype, nz)


# ----------------------------------------------------------------------------------------------------
# Geometry: A_I = D @ U[8I:8I+8, r_I:r_I+R] along each axis.
# ----------------------------------------------------------------------------------------------------


def _bilinear_taps(size: int, upsample: int) -> list[tuple[int, int, float]]:
    """(i0, i1, lam) per output pixel of bilinear x``upsample`` with align_corners=True, as F.interpolate:
    output p = (1 - lam) * x[i0] + lam * x[i1]."""
    out = size * upsample
    if size == 1 or out == 1:
        return [(0, 0, 0.0)] * out
    scale = (size - 1) / (out - 1)
    taps = []
    for p in range(out):
        src = p * scale
        i0 = min(int(math.floor(src)), size - 1)
        taps.append((i0, min(i0 + 1, size - 1), src - i0))
    return taps


def upsample_matrix(size: int, upsample: int) -> torch.Tensor:
    """U (size*upsample, size), float64: bilinear interpolation with align_corners=True, as F.interpolate.

    Dense, so quadratic in the side: for checks on small sizes only. The kernels' geometry is built from
    the taps directly (_upsample_geometry_f64), in memory linear in the output."""
    u = torch.zeros(size * upsample, size, dtype=torch.float64)
    for p, (i0, i1, lam) in enumerate(_bilinear_taps(size, upsample)):
        u[p, i0] += 1.0 - lam
        u[p, i1] += lam
    return u


def _patch_spans(size: int, upsample: int) -> tuple[list[tuple[int, int]], int]:
    """The source pixels each output block reads ((first, last) per block) and the patch width R: the
    nonzero columns of upsample_matrix's 8-row bands, in plain Python (the compiled graph's shape function
    needs R without running tensor code)."""
    taps = _bilinear_taps(size, upsample)
    spans = []
    for i in range(size * upsample // BLOCK):
        cols = set()
        for i0, i1, lam in taps[BLOCK * i : BLOCK * (i + 1)]:
            if lam != 1.0:
                cols.add(i0)
            if lam != 0.0:
                cols.add(i1)
        spans.append((min(cols), max(cols)))
    return spans, max((hi - lo + 1 for lo, hi in spans), default=1)


@tensor_cache(maxsize=64)
def _upsample_geometry_f64(size: int, upsample: int):
    """A (nb, 8, R) = D @ U[8I:8I+8, s_I:s_I+R] per output block I, and start s (nb,).

    Built from the bilinear taps (two per output pixel) straight into the 8 x R bands, never through the
    dense U (size*upsample x size): that matrix made a wide image's memory quadratic in its side (a
    1 x 8192 face at upsample=8 peaked at 4.3 GB for a 6 MiB output; 8 x 65536 at upsample=1 asked for
    34 GB). The bands hold the same values as U's slices, accumulated in the same order (an edge pixel's
    two taps hit one column: (1 - lam) then lam), so the geometry is unchanged bit for bit."""
    taps = _bilinear_taps(size, upsample)
    nb = size * upsample // BLOCK
    spans, r = _patch_spans(size, upsample)
    if nb == 0:  # an empty side (no blocks): the shapes the kernels expect
        return torch.zeros(0, BLOCK, r, dtype=torch.float64), torch.zeros(0, dtype=torch.int64)
    # keep each patch inside the image; its extra columns carry zeros
    start = torch.tensor([min(lo, size - r) for lo, _ in spans], dtype=torch.int64)
    i0, i1, lam = (torch.tensor(v, dtype=dt) for v, dt in zip(zip(*taps), (torch.int64, torch.int64, torch.float64)))
    p = torch.arange(nb * BLOCK)
    s = start.repeat_interleave(BLOCK)
    band = torch.zeros(nb * BLOCK, r, dtype=torch.float64)
    # a tap of weight exactly 0 may lie outside the patch (_patch_spans leaves it out): it is not written
    for col, wt in ((i0, 1.0 - lam), (i1, lam)):
        nz = wt != 0
        band.index_put_((p[nz], col[nz] - s[nz]), wt[nz], accumulate=True)
    d = dct_matrix(BLOCK)
    # one 8x8 @ 8xR product per block, as before: a batched matmul sums in another order (differences of
    # 1e-16 in 207 of 228 sizes checked), and the geometry is meant to stay bit-identical
    a = torch.stack([d @ b for b in band.view(nb, BLOCK, r)])
    return a, start


def upsample_geometry(size: int, upsample: int, dtype: torch.dtype, device: torch.device):
    """(A (size*upsample/8, 8, R), start (size*upsample/8,)) for one axis, cached per device so that warm
    calls copy nothing from the host; in a compiled graph, an op's copy (see freq_mix.keep_positions)."""
    if is_compiling():
        return torch.ops.fastmix_const.upsample_geometry(size, upsample, dtype, torch.device(device))
    return _upsample_geometry(size, upsample, dtype, torch.device(device))


@torch.library.custom_op("fastmix_const::upsample_geometry", mutates_args=())
def _upsample_geometry_op(size: int, upsample: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.clone() for t in _upsample_geometry(size, upsample, dtype, device))


@_upsample_geometry_op.register_fake
def _(size, upsample, dtype, device):
    # R, the source patch per block, depends on the size through the resampling: specialise a symbolic size
    # (one graph per image size, as without dynamic shapes)
    r = _patch_spans(int(size), upsample)[1]
    nb = size * upsample // BLOCK
    return torch.empty(nb, BLOCK, r, dtype=dtype, device=device), torch.empty(nb, dtype=torch.int64, device=device)


@tensor_cache(maxsize=64)
def _upsample_geometry(size, upsample, dtype, device):
    a, start = _upsample_geometry_f64(size, upsample)
    return a.to(dtype=dtype, device=device), start.to(device)


# ----------------------------------------------------------------------------------------------------
# Public functions
# ----------------------------------------------------------------------------------------------------


def _validate(x, upsample, color, keep, index, weight, seed, out_dtype, noise=None, noise_seed=None, noise_scale=None):
    check_float_tensor(x, "x", dims=4)
    if isinstance(upsample, bool) or not isinstance(upsample, int):
        raise TypeError(f"upsample must be an int, got {type(upsample).__name__}")
    if upsample < 1:
        raise ValueError(f"upsample must be >= 1, got {upsample}")
    if color not in COLORS:
        raise ValueError(f"color must be one of {COLORS}, got {color!r}")
    n, c, h, w = x.shape
    if color == "ycbcr" and c != 3:
        raise ValueError(f"color='ycbcr' needs x with 3 channels (RGB), got {c}; use color='none' for grey faces")
    for size, name in ((h, "height"), (w, "width")):
        if (size * upsample) % BLOCK != 0:
            raise ValueError(f"x's {name} * upsample must be a multiple of {BLOCK}, got {size} * {upsample}")
        if size * upsample // BLOCK >= MAX_BLOCKS:
            raise ValueError(f"x's {name} * upsample must be below {BLOCK * MAX_BLOCKS}")
    if out_dtype is not None and out_dtype not in (torch.float32, torch.float16, torch.bfloat16, torch.float64):
        raise TypeError(f"out_dtype must be None or a float dtype, got {out_dtype}")
    if (index is None) != (weight is None):
        raise ValueError("index and weight must be given together (or neither, for no mixing)")
    check_same_device(x, "x", index=index, weight=weight)
    if index is None:
        index = torch.arange(n, device=x.device).view(n, 1)
        weight4 = torch.ones(n, 1, dtype=compute_dtype(x.dtype), device=x.device)
    else:
        index = check_index(index, n)
        weight4 = check_weight(weight, index.shape[0], index.shape[1], c)
    ids = normalize_keep(keep, c * FREQS, x.device)
    nz = check_noise(noise, noise_seed, noise_scale, c * FREQS, x.device)
    return index, weight4, ids, check_seed(seed), x.dtype if out_dtype is None else out_dtype, nz


@exact_under_autocast
def frontend(x, *, upsample=8, color="ycbcr", keep=None, index=None, weight=None, seed=None, out_dtype=None,
             noise=None, noise_seed=None, noise_scale=None):
    """Fused frequency front-end: images -> (masked, mixed, signed) DCT channels of the upsampled image.

    Args:
        x: (N, C, h, w) in [-1, 1]; C = 3 for color="ycbcr", any C for color="none" (grey faces: C = 1).
        upsample: integer bilinear factor (align_corners=True); h*upsample and w*upsample multiples of 8.
        keep, index, weight, seed: as :func:`fastmix.freq_mix` (index/weight None: no mixing, M = N).
        noise, noise_seed, noise_scale: calibrated noise on the released coefficients, as :func:`fastmix.freq_mix`.
        out_dtype: output dtype (default x.dtype), e.g. torch.bfloat16 to halve the written bytes.

    Returns (M, n_kept, h*upsample/8, w*upsample/8); differentiable in x and weight. Example::

        z = fastmix.frontend(faces, keep=list(range(1, 64)) + list(range(65, 128)) + list(range(129, 192)))
        # faces (B, 3, 112, 112) -> z (B, 189, 112, 112)
    """
    index, weight4, ids, seed, out_dtype, nz = _validate(x, upsample, color, keep, index, weight, seed, out_dtype, noise,
                                                         noise_seed, noise_scale)
    n, c, h, w = x.shape
    m = index.shape[0]
    hb, wb = h * upsample // BLOCK, w * upsample // BLOCK
    if m == 0 or x.numel() == 0 or not ids:
        return zeros_result((m, len(ids), hb, wb), out_dtype, x, x, weight)
    backend = _backend.choose(x.device, "frontend")
    cd = compute_dtype(x.dtype)
    if backend == "torch":
        u = color_transform(upsample_ref(to_255(x.to(cd)), upsample), color)
        return mix_channels_ref(to_channels(block_dct_ref(u)), index, weight4, ids, seed, False, out_dtype, nz)
    check_autodiff_mode("frontend", x, weight)
    # The colour transform runs at source resolution (1/upsample^2 of the work), as its own pass with its
    # own gradient (torch ops, or one Triton kernel: CONFIG["color_pass"]); the fused kernel does
    # upsampling, DCT, mixing, keep and signs.
    src = _color_pass(x, color, cd, backend)
    rows = upsample_geometry(h, upsample, cd, x.device)
    cols = upsample_geometry(w, upsample, cd, x.device)
    return mix_op(backend, src, index, weight4, ids, seed, False, rows, cols, out_dtype, "frontend", nz)


def _color_pass(x, color, cd, backend):
    if backend == "triton" and color == "ycbcr" and cd == torch.float32:
        from ._triton import option

        if option("color_pass") == "triton":
            from ._triton.color import ycbcr

            return ycbcr(x)
    return color_transform(to_255(x.to(cd)), color)


@exact_under_autocast
def frontend_inverse(z, *, upsample=8, color="ycbcr", keep=None, channels=None, size=None):
    """Map frontend channels back to images in [-1, 1] (for visualisation).

    z: (M, n_kept, Hb, Wb) with the channels of ``keep`` (as given to :func:`frontend`); removed channels
    are filled with zeros (for YCbCr, removing the DC leaves a mid-grey level). ``channels`` is the number of
    colour channels (3 for ycbcr; needed for color='none' with a keep set). Returns (M, C, Hb*8/upsample,
    Wb*8/upsample): the reconstruction resampled to the source grid (bilinear, align_corners=True; an
    unmasked output comes back close to its input, exactly for upsample=1), or the full (M, C, Hb*8, Wb*8)
    image with size='upsampled'. (Averaging 8x8 squares instead would keep only each block's DC.)
    """
    check_float_tensor(z, "z", dims=4)
    if color not in COLORS:
        raise ValueError(f"color must be one of {COLORS}, got {color!r}")
    if isinstance(upsample, bool) or not isinstance(upsample, int) or upsample < 1:
        raise ValueError(f"upsample must be an int >= 1, got {upsample!r}")
    if size not in (None, "upsampled"):
        raise ValueError(f"size must be None or 'upsampled', got {size!r}")
    m, nk, hb, wb = z.shape
    if channels is not None:
        if isinstance(channels, bool) or not isinstance(channels, int) or channels < 1:
            raise ValueError(f"channels must be an int >= 1, got {channels!r}")
        if color == "ycbcr" and channels != 3:
            raise ValueError(f"channels must be 3 for color='ycbcr', got {channels}")
    if color == "ycbcr":
        c = 3
    elif channels is not None:
        c = channels
    elif keep is None and nk % FREQS == 0:
        c = nk // FREQS
    else:
        raise ValueError("frontend_inverse: pass channels= for color='none' with a keep set")
    if (hb * BLOCK) % upsample or (wb * BLOCK) % upsample:
        raise ValueError(f"z's block grid {hb}x{wb} is not a frontend output for upsample={upsample}")
    ids = normalize_keep(keep, c * FREQS, z.device)
    if len(ids) != nk:
        raise ValueError(f"z has {nk} channels but keep selects {len(ids)}")
    cd = compute_dtype(z.dtype)
    full = z.new_zeros((m, c * FREQS, hb, wb), dtype=cd)
    full[:, list(ids)] = z.to(cd)
    img = inverse_color_transform(block_idct_ref(from_channels(full)), color)
    if size != "upsampled" and upsample != 1:
        h, w = hb * BLOCK // upsample, wb * BLOCK // upsample
        # interpolate refuses empty images; an empty one needs no resampling
        img = F.interpolate(img, size=(h, w), mode="bilinear", align_corners=True) if img.numel() else img.new_zeros((m, c, h, w))
    return img.to(z.dtype)  # computed in float32 for 16-bit z, returned in z's dtype like the other ops
