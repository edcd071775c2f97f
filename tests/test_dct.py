"""block_dct / block_idct and the frequency-channel layouts."""
from __future__ import annotations

import numpy as np
import pytest
import scipy.fft
import torch
from torch.autograd import gradcheck

import fastmix
from _fastmix_testing import DTYPES, assert_close_f64, assert_matches_oracle, dtype_id, randn

SHAPES = {
    "2d_16x24": (16, 24),
    "4d_C1_8x16": (2, 1, 8, 16),
    "4d_C3_24x8": (3, 3, 24, 8),
    "5d_C4": (2, 1, 4, 8, 16),
}


def scipy_block_dct(x: np.ndarray, block: int, inverse: bool = False) -> np.ndarray:
    """Independent oracle: scipy's orthonormal DCT-II (or its inverse) on every tile."""
    *lead, h, w = x.shape
    t = x.reshape(*lead, h // block, block, w // block, block)
    axes = (len(lead) + 1, len(lead) + 3)
    f = scipy.fft.idctn if inverse else scipy.fft.dctn
    return f(t, type=2, norm="ortho", axes=axes).reshape(x.shape)


@pytest.mark.parametrize("block", [8, 4, 16], ids=lambda b: f"block{b}")
@pytest.mark.parametrize("inverse", [False, True], ids=["dct", "idct"])
def test_matches_scipy(backend, gen, block, inverse):
    x = randn(gen, 2, 3, 2 * block, 3 * block, dtype=torch.float64)
    op = fastmix.block_idct if inverse else fastmix.block_dct
    got = op(x, block=block)
    want = torch.from_numpy(scipy_block_dct(x.numpy(), block, inverse))
    assert_close_f64(got, want, "block transform vs scipy", rel=1e-12)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
@pytest.mark.parametrize("shape", SHAPES.values(), ids=SHAPES.keys())
@pytest.mark.parametrize("inverse", [False, True], ids=["dct", "idct"])
def test_against_f64_oracle(backend, gen, dtype, shape, inverse):
    x = randn(gen, *shape, dtype=dtype)
    op, ref = (fastmix.block_idct, fastmix.block_idct_ref) if inverse else (fastmix.block_dct, fastmix.block_dct_ref)
    got = op(x)
    assert got.dtype == dtype and got.shape == x.shape
    assert_matches_oracle(got, ref(x.double()), ref(x), dtype)


@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_round_trip(backend, gen, dtype):
    x = randn(gen, 2, 3, 16, 24, dtype=dtype)
    back = fastmix.block_idct(fastmix.block_dct(x))
    # Two transforms, each rounding to dtype once.
    assert_matches_oracle(back, x.double(), fastmix.block_idct_ref(fastmix.block_dct_ref(x)), dtype, "round trip")
    if dtype == torch.float64:
        assert_close_f64(back, x, rel=1e-13)


def test_dc_and_layout(backend, gen):
    """Channel id c*64 + u*8 + v holds coefficient (u vertical, v horizontal) of colour c."""
    x = randn(gen, 2, 3, 16, 24, dtype=torch.float64)
    y = fastmix.block_dct(x)
    z = fastmix.to_channels(y)
    assert z.shape == (2, 192, 2, 3)
    # The DC of an orthonormal 8x8 DCT is 8 x the tile mean.
    tile_mean = x.reshape(2, 3, 2, 8, 3, 8).mean(dim=(3, 5))
    torch.testing.assert_close(z[:, [0, 64, 128]], 8 * tile_mean, rtol=0, atol=1e-12)
    for c, u, v, i, j in [(0, 0, 1, 0, 0), (1, 1, 0, 1, 2), (2, 7, 3, 1, 1), (2, 3, 7, 0, 2)]:
        assert z[1, c * 64 + u * 8 + v, i, j] == y[1, c, 8 * i + u, 8 * j + v]
    # A pure horizontal cosine of frequency v=2 lands in channel u=0, v=2 only.
    d = fastmix.dct_matrix(8)
    tile = d[0].view(8, 1) * d[2].view(1, 8)  # D^T e_0 e_2^T D: the basis image of (u=0, v=2)
    img = tile.repeat(2, 3).view(1, 1, 16, 24)
    zc = fastmix.to_channels(fastmix.block_dct(img))
    expect = torch.zeros(1, 64, 2, 3, dtype=torch.float64)
    expect[:, 2] = 1.0
    torch.testing.assert_close(zc, expect, rtol=0, atol=1e-12)


def test_channels_round_trip(gen):
    y = randn(gen, 2, 4, 24, 16)
    z = fastmix.to_channels(y)
    assert z.shape == (2, 256, 3, 2)
    assert torch.equal(fastmix.from_channels(z), y)
    y4 = randn(gen, 1, 2, 8, 12)
    assert torch.equal(fastmix.from_channels(fastmix.to_channels(y4, block=4), block=4), y4)


def test_non_contiguous(backend, gen):
    base = randn(gen, 2, 3, 32, 40, dtype=torch.float64)
    views = {
        "transposed": base.transpose(2, 3),
        "slice": base[:, 1:, 8:24, 16:40],
        "stride": base[::2, ::2],
        "channels_last": base.contiguous(memory_format=torch.channels_last),
    }
    for name, v in views.items():
        assert not v.is_contiguous(), name
        assert_close_f64(fastmix.block_dct(v), fastmix.block_dct(v.contiguous()), name, rel=1e-15)
        assert_close_f64(fastmix.block_idct(v), fastmix.block_idct(v.contiguous()), name, rel=1e-15)


@pytest.mark.parametrize("shape", [(0, 3, 8, 8), (2, 0, 8), (2, 3, 0, 16)], ids=str)
def test_empty(backend, shape):
    x = torch.randn(shape)
    for op in (fastmix.block_dct, fastmix.block_idct):
        y = op(x)
        assert y.shape == x.shape and y.dtype == x.dtype


HUGE_BLOCK = 8192  # its float64 matrix is 512 MB
SMALL_ALLOCATION = 1 << 20  # bytes: what an empty transform may allocate at most


def _largest_allocation(fn):
    with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
        y = fn()
    return max((e.cpu_memory_usage for e in prof.events()), default=0), y


@pytest.mark.parametrize("op", ["block_dct", "block_idct"])
def test_empty_input_with_a_huge_block_builds_no_matrix(backend, op):
    """An empty input has nothing to transform: the reference built (and cached for good) the 512 MB matrix
    of block 8192 for it. Every backend returns the empty result with no allocation of that size."""
    x = torch.empty(1, 0, 0)
    peak, y = _largest_allocation(lambda: getattr(fastmix, op)(x, block=HUGE_BLOCK))
    assert y.shape == x.shape and y.dtype == x.dtype
    assert peak <= SMALL_ALLOCATION, peak
    peak, y = _largest_allocation(lambda: getattr(fastmix, op + "_ref")(x, block=HUGE_BLOCK))
    assert y.shape == x.shape and peak <= SMALL_ALLOCATION, peak


def test_dct_matrix_cache_is_bounded():
    """Matrices of blocks up to CACHED_BLOCK_MAX are cached (<= 32 KB each, at most CACHED_BLOCK_MAX of them);
    a larger block's matrix is built per call and not kept (the cache had no bound: every size stayed)."""
    from fastmix.ops import dct

    info = dct._cached_dct_matrix_f64.cache_info()
    assert info.maxsize is not None and info.maxsize <= dct.CACHED_BLOCK_MAX
    before = info.currsize
    big = dct.CACHED_BLOCK_MAX * 2
    x = torch.randn(1, big, big, dtype=torch.float64)
    y = fastmix.block_dct_ref(x, block=big)
    assert dct._cached_dct_matrix_f64.cache_info().currsize == before
    torch.testing.assert_close(y.numpy(), scipy_block_dct(x.numpy(), big), rtol=0, atol=1e-10)
    d = fastmix.dct_matrix(big)
    torch.testing.assert_close(d @ d.T, torch.eye(big, dtype=torch.float64), rtol=0, atol=1e-12)
    assert dct._cached_dct_matrix_f64.cache_info().currsize == before


@pytest.mark.parametrize("inverse", [False, True], ids=["dct", "idct"])
@pytest.mark.parametrize(
    "shape,block,fast",
    [((8, 8), 8, False), ((1, 4, 8), 4, False), ((2, 3, 8, 16), 8, True)],
    ids=["b8-full", "b4-full", "b8-4d-fast"],
)
def test_gradcheck(backend, gen, one_thread, inverse, shape, block, fast):
    """Full Jacobians on one or two tiles; a random projection (fast mode) on a batch of tiles."""
    x = randn(gen, *shape, dtype=torch.float64).requires_grad_()
    op = fastmix.block_idct if inverse else fastmix.block_dct
    assert gradcheck(lambda t: op(t, block=block), (x,), fast_mode=fast)
