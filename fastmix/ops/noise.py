"""Calibrated noise drawn inside the fused op from a seed: Gaussian or Laplace per coefficient, scale per channel.

freq_mix / frontend with ``noise=`` add to every released coefficient, after mixing and the sign flip,

    Y[m, ch, i, j] += scale[ch] * q(noise_seed, m, ch, i, j)

with q a draw of the unit distribution (Gaussian: std 1; Laplace: scale b = 1, std sqrt(2)). As the sign key
(fastmix/ops/sign.py), q is a pure function of its coordinates computed inside the kernels: no noise tensor
ever exists, and every backend (torch reference, C++, Triton, CUDA) draws the same bits. Its C++ twin is
``csrc/noise.h``; the Triton twin is fastmix/ops/_triton/noise.py.

Specification (32-bit words as in sign.py; mix32 and plane_hash are the sign key's):

    nkey(seed)  = mix32(mix32(seed_hi ^ 0x7F4A7C15) ^ seed_lo)        seed in [0, 2**63)
    plane       = mix32(mix32(nkey ^ m) ^ ch)                          m = output row, ch = c*64 + u*8 + v
    h           = mix32(plane ^ ((i << 16) | j))                      i, j = block row and column
    q           = TABLE[h >> (32 - B)]                                 TABLE: 2**B float32 atoms (below)
    noise       = float32(scale[ch] * q)                               one float32 rounding

and the output coefficient is (signed mix) + noise in the op's compute dtype (float32; float64 for float64
inputs, the float32 noise converted exactly). The noise is additive and independent of x and the weights,
so the op's gradient in x and weight is that of the op without noise (the backward never sees it), and the
scale is a constant: a noise_scale that requires grad is refused.

Why a table: log / cos / erfinv differ by ulps between std::, CUDA's libdevice and Triton, so an inverse CDF
evaluated in each kernel would not give the same bits. TABLE is built once here, in float64 and rounded to
float32, and passed to every kernel (the same bytes everywhere); a kernel pays one integer hash (the sign
key's, 5 operations from a pre-mixed plane word) and one table read per coefficient. Exactness: the table
read is exact, the product scale * q is one IEEE float32 rounding; a backend may fuse the add that follows
into a multiply-add (CPU capabilities with FMA, CUDA, Triton), so a coefficient that is exactly 0 receives
the specification's bits on every backend (the tests check that), and any other coefficient is within the
add's rounding of (mix + noise), like the rest of the op's float arithmetic.

TABLE: the 2**B cells of equal probability 2**-B of the distribution, each replaced by its conditional
mean (atom i = E[Z | F^-1(i/2**B) < Z < F^-1((i+1)/2**B)]), antisymmetric (atom 2**B-1-i = -atom i), so the
mean is exactly 0; B = TABLE_BITS = 12 (16 KB: an L1-resident table on a CPU core and in a GPU SM; with a
2**16 table, 256 KB, one run on this project's loaded CPU measured the noise's overhead on freq_mix at 36%
against 26% for 2**12, and on a GPU every lane's read would go to L2).
Measured against the continuous law (``table_stats``, exact over the atoms, not sampled):

    B = 12   gaussian: KS distance 1.5e-4, variance 0.99997 (1), kurtosis 2.997 (3), largest |atom| 3.74
             laplace:  KS distance 1.5e-4, variance 1.99947 (2), kurtosis 5.937 (6), largest |atom| 8.62
    B = 16   gaussian: KS 9.5e-6, variance 0.999999, kurtosis 2.9998, largest |atom| 4.39
             laplace:  KS 9.6e-6, variance 1.99997, kurtosis 5.993, largest |atom| 11.40

(the KS distance is about half an atom's mass, 2**-(B+1): a discrete law is that far from a continuous one
at its jumps); tests/test_noise.py also checks a sample the op draws (196,608 draws per law: KS below the
1% critical value, variance within 2%).

Privacy. The ideal mechanisms: one face replaced by any other moves each released coefficient by at most its
sensitivity D_ch; with Gaussian noise of std scale_ch (and the sensitivities of n released coefficients
combined, sqrt(sum (D_ch / scale_ch)**2) = mu), each release is mu-GDP (Dong, Roth, Su 2019), i.e.
(eps, delta)-DP on the GDP curve; with Laplace noise of scale b_ch, eps = sum D_ch / b_ch per release (no
delta). training/defences.py (``dp_bound``) computes these for its calibration. Said plainly, the sampler
here does NOT carry those guarantees formally: (1) it draws from 2**B atoms, so the noise has bounded
support (|q| <= 3.74 Gaussian, 8.62 Laplace, for B = 12) and, given two candidate inputs, the sets of outputs each can
produce are finite and generically disjoint: the worst-case privacy loss of the implemented mechanism is
unbounded. (2) Even a continuous sampler in floating point has this defect (Mironov 2012, "On significance
of the least significant bits for differential privacy"); the usual remedy (the snapping mechanism, or a
discrete Gaussian on a grid with clamped outputs) is not implemented. The bounds above are therefore those of
the continuous mechanism that this noise approximates to a KS distance of 1.5e-4; they describe how much
noise is added, and are a sound estimate only against attacks that do not exploit the atoms' lattice.
"""
from __future__ import annotations

import math

import torch

from ._common import FLOAT_DTYPES, is_compiling, tensor_cache
from .sign import MASK32, check_seed, mix32, mix32_tensor

NOISES = ("gaussian", "laplace")
NOISE_GOLDEN = 0x7F4A7C15  # the low word of the 64-bit golden ratio 0x9E3779B97F4A7C15 (sign.py uses the high)
TABLE_BITS = 12  # 2**12 atoms: 16 KB of float32, L1-resident on a CPU core and in a GPU SM's L1 (csrc/noise.h allows 1..16)
FREQS = 64


def noise_key(seed: int) -> int:
    return mix32(mix32((seed >> 32) ^ NOISE_GOLDEN) ^ (seed & MASK32))


# ----------------------------------------------------------------------------------------------------
# The table (the executable definition of the distributions)
# ----------------------------------------------------------------------------------------------------


def _gaussian_atoms(t: int) -> torch.Tensor:
    """Conditional means of the t equal-probability cells of N(0, 1), float64, lower half (t/2,)."""
    i = torch.arange(t // 2 + 1, dtype=torch.float64)
    edge = torch.special.ndtri(i / t)  # edge[0] = -inf, edge[t/2] = 0
    phi = torch.exp(-0.5 * edge * edge) / math.sqrt(2 * math.pi)  # phi(-inf) = 0
    a, b = edge[:-1], edge[1:]
    # t * (phi(a) - phi(b)), without the cancellation near the centre: phi(a) (1 - exp(-(b - a)(b + a) / 2))
    mean = -t * phi[:-1] * torch.expm1(-0.5 * (b - a) * (b + a))
    mean[0] = -t * phi[1]  # the tail cell (-inf, edge[1]): t * (0 - phi(b))
    return mean


def _laplace_atoms(t: int) -> torch.Tensor:
    """Conditional means of the t equal-probability cells of Laplace(0, 1), float64, lower half (t/2,).

    Cell i (< t/2) is [ln(2i/t), ln(2(i+1)/t)]; with density e^x / 2 there, its mean is
    (i+1)(b-1) - i(a-1) = b + i * ln(1 + 1/i) - 1 (i >= 1), and b - 1 for the tail cell i = 0."""
    i = torch.arange(t // 2, dtype=torch.float64)
    b = torch.log(2 * (i + 1) / t)
    mean = b + i * torch.log1p(1 / i.clamp_min(1)) - 1
    mean[0] = b[0] - 1
    return mean


def _atoms64(kind: str, bits: int) -> torch.Tensor:
    t = 1 << bits
    low = (_gaussian_atoms if kind == "gaussian" else _laplace_atoms)(t)
    low32 = low.to(torch.float32).to(torch.float64)
    return torch.cat([low32, -low32.flip(0)])  # antisymmetric in float32: the mean is exactly 0


@tensor_cache(maxsize=16)
def _table(kind: str, bits: int, device: torch.device) -> torch.Tensor:
    return _atoms64(kind, bits).to(torch.float32).to(device)


def noise_table(kind: str, device=None, bits: int = TABLE_BITS) -> torch.Tensor:
    """(2**bits,) float32: the atoms of the unit ``kind`` distribution, the TABLE of the specification.

    Cached per (kind, bits, device); in a compiled graph an op's copy of it (see freq_mix.keep_positions)."""
    if kind not in NOISES:
        raise ValueError(f"noise must be one of {NOISES}, got {kind!r}")
    dev = torch.device("cpu" if device is None else device)
    if is_compiling():
        return torch.ops.fastmix_const.noise_table(kind, bits, dev)
    return _table(kind, bits, dev)


@torch.library.custom_op("fastmix_const::noise_table", mutates_args=())
def _noise_table_op(kind: str, bits: int, device: torch.device) -> torch.Tensor:
    return _table(kind, bits, device).clone()


@_noise_table_op.register_fake
def _(kind, bits, device):
    return torch.empty(1 << bits, dtype=torch.float32, device=device)


def table_stats(kind: str, bits: int = TABLE_BITS) -> dict:
    """Exact moments of the table's atoms and their KS distance to the continuous unit law (float64)."""
    q = _atoms64(kind, bits)
    t = q.numel()
    if kind == "gaussian":
        cdf = torch.special.ndtr(q)
        var, kurt = 1.0, 3.0
    else:
        cdf = torch.where(q < 0, 0.5 * torch.exp(q), 1 - 0.5 * torch.exp(-q))
        var, kurt = 2.0, 6.0
    i = torch.arange(t, dtype=torch.float64)
    ks = torch.maximum((cdf - i / t).abs(), (cdf - (i + 1) / t).abs()).max().item()
    m2 = (q * q).mean().item()
    return {"kind": kind, "bits": bits, "ks": ks, "mean": q.mean().item(), "variance": m2, "variance_law": var,
            "kurtosis": (q ** 4).mean().item() / m2 ** 2, "kurtosis_law": kurt, "max_abs": q.abs().max().item()}


# ----------------------------------------------------------------------------------------------------
# Arguments
# ----------------------------------------------------------------------------------------------------


@tensor_cache(maxsize=64)
def _full_scale(value: float, channels: int, device: torch.device) -> torch.Tensor:
    return torch.full((channels,), value, dtype=torch.float32, device=device)


def check_noise(noise, noise_seed, noise_scale, channels: int, device: torch.device):
    """Validate the noise arguments of freq_mix / frontend.

    Returns None (no noise) or (kind, seed, scale (channels,) float32 on ``device``, table on ``device``).
    noise_scale: a Python number (every channel), or a float tensor of shape (), (64,) (per frequency, every
    colour) or (C*64,) (per channel id), >= 0 and finite, without gradient."""
    if noise is None:
        for value, name in ((noise_seed, "noise_seed"), (noise_scale, "noise_scale")):
            if value is not None:
                raise ValueError(f"{name} is given but noise is None; pass noise='gaussian' or 'laplace'")
        return None
    if not isinstance(noise, str) or noise not in NOISES:
        raise ValueError(f"noise must be None or one of {NOISES}, got {noise!r}")
    if noise_seed is None:
        raise ValueError(f"noise={noise!r} needs noise_seed (an int in [0, 2**63)): the noise is drawn from it")
    seed = check_seed(noise_seed, "noise_seed")
    if noise_scale is None:
        raise ValueError(f"noise={noise!r} needs noise_scale (a number, or a tensor of shape (64,) or ({channels},))")
    if isinstance(noise_scale, torch.Tensor):
        if not noise_scale.dtype.is_floating_point or noise_scale.dtype not in FLOAT_DTYPES:
            raise TypeError(f"noise_scale must be a float tensor, got {noise_scale.dtype}")
        if noise_scale.requires_grad:
            raise ValueError("noise_scale does not take a gradient (the scale is a constant of the op); "
                             "pass noise_scale.detach()")
        if noise_scale.device != device and noise_scale.device.type != "cpu":
            raise ValueError(f"noise_scale is on {noise_scale.device} but x is on {device}")
        shape = tuple(noise_scale.shape)
        if shape not in ((), (1,), (FREQS,), (channels,)):
            raise ValueError(f"noise_scale must have shape (), (64,) or ({channels},) (C*64 channel ids), got {shape}")
        scale = noise_scale.detach().to(device=device, dtype=torch.float32)
        if not is_compiling():
            bad = ~torch.isfinite(scale) | (scale < 0)
            if bool(bad.any()):  # a data-dependent check (a sync on a GPU), as keep's
                raise ValueError("noise_scale must be finite and >= 0 everywhere")
        scale = scale.reshape(-1).expand(channels) if scale.numel() == 1 else scale.repeat(channels // scale.numel())
        scale = scale.contiguous()
    else:
        if isinstance(noise_scale, bool) or not isinstance(noise_scale, (int, float)):
            raise TypeError(f"noise_scale must be a number or a float tensor, got {type(noise_scale).__name__}")
        value = float(noise_scale)
        if not math.isfinite(value) or value < 0:
            raise ValueError(f"noise_scale must be finite and >= 0, got {noise_scale}")
        scale = torch.full((channels,), value, dtype=torch.float32, device=device) if is_compiling() \
            else _full_scale(value, channels, torch.device(device))
    return noise, seed, scale, noise_table(noise, device)


# ----------------------------------------------------------------------------------------------------
# Reference (materialised)
# ----------------------------------------------------------------------------------------------------


def noise_ref(seed: int, m: int, channels: int, hb: int, wb: int, table: torch.Tensor, scale: torch.Tensor,
              device=None) -> torch.Tensor:
    """The noise of output rows 0..m-1 as an (m, channels, hb, wb) float32 tensor (materialised; the kernels
    never build it). table: (2**B,) float32; scale: (channels,) float32. Hashed a few rows at a time (see
    sign_ref)."""
    bits = table.numel().bit_length() - 1
    if table.numel() != 1 << bits or not 1 <= bits <= 16:
        raise ValueError(f"noise table must hold 2**B entries with 1 <= B <= 16, got {table.numel()}")
    key = noise_key(seed)
    dev = torch.device("cpu") if device is None else torch.device(device)
    table = table.to(device=dev, dtype=torch.float32)
    scale = scale.to(device=dev, dtype=torch.float32).view(1, channels, 1, 1)
    out = torch.empty((m, channels, hb, wb), dtype=torch.float32, device=dev)
    ch = torch.arange(channels, dtype=torch.int64, device=dev).view(1, channels, 1, 1)
    ii = torch.arange(hb, dtype=torch.int64, device=dev).view(1, 1, hb, 1)
    jj = torch.arange(wb, dtype=torch.int64, device=dev).view(1, 1, 1, wb)
    pos = (ii << 16) | jj
    rows = max(1, (1 << 24) // max(1, channels * hb * wb))
    for r0 in range(0, m, rows):
        r1 = min(m, r0 + rows)
        mm = torch.arange(r0, r1, dtype=torch.int64, device=dev).view(r1 - r0, 1, 1, 1)
        plane = mix32_tensor(mix32_tensor(key ^ mm) ^ ch)
        h = mix32_tensor(plane ^ pos)
        out[r0:r1] = table[h >> (32 - bits)] * scale  # one float32 product, as the kernels
    return out
