"""Block DCT family: orthonormal 2-D DCT-II / DCT-III on every block x block tile, and the
coefficient <-> frequency-channel layouts.

Read top to bottom: reference -> op registration (C++ kernels in csrc/cpu/dct.cpp) -> public functions.
"""
from __future__ import annotations

import math

import torch

from .. import _backend
from ._common import (
    check_autodiff_mode,
    check_block,
    check_float_tensor,
    check_multiple,
    compute_dtype,
    exact_under_autocast,
    tensor_cache,
)

# ----------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------


# Matrices of blocks up to this size are cached (64: 32 KB in float64; the ops use 8). A larger block's
# matrix is rebuilt per call: it is block^2 * 8 bytes (512 MB at block = 8192), and an unbounded cache kept
# every one ever asked for; rebuilding costs O(block^2), less than the O(block^3) transform that uses it.
CACHED_BLOCK_MAX = 64


def _build_dct_matrix_f64(block: int) -> torch.Tensor:
    u = torch.arange(block, dtype=torch.float64).view(-1, 1)
    x = torch.arange(block, dtype=torch.float64).view(1, -1)
    d = torch.cos((2 * x + 1) * u * math.pi / (2 * block)) * math.sqrt(2.0 / block)
    d[0] = math.sqrt(1.0 / block)
    return d


_cached_dct_matrix_f64 = tensor_cache(maxsize=CACHED_BLOCK_MAX)(_build_dct_matrix_f64)


def _dct_matrix_f64(block: int) -> torch.Tensor:
    """D (block, block) in float64; callers must not modify it (it may be the cached tensor)."""
    if block <= CACHED_BLOCK_MAX:
        return _cached_dct_matrix_f64(block)
    with torch.inference_mode(False):  # as tensor_cache: usable by a later backward
        return _build_dct_matrix_f64(block)


def dct_matrix(block: int = 8, dtype=torch.float64, device=None) -> torch.Tensor:
    """The orthonormal DCT-II matrix D (block, block): D[u, x] = a(u) cos((2x+1) u pi / (2 block)).

    A tile X transforms as D @ X @ D.T (u vertical, v horizontal frequency); the inverse is D.T @ Y @ D.
    """
    return _dct_matrix_f64(block).to(dtype=dtype, device=device, copy=True)  # never the cached tensor itself


def _tiles(x: torch.Tensor, block: int) -> torch.Tensor:
    *lead, h, w = x.shape
    return x.reshape(*lead, h // block, block, w // block, block)


def _untile(t: torch.Tensor) -> torch.Tensor:
    *lead, hb, b, wb, b2 = t.shape
    return t.reshape(*lead, hb * b, wb * b2)


def _block_transform_ref(x: torch.Tensor, block: int, inverse: bool) -> torch.Tensor:
    block = check_block(block)
    if x.numel() == 0:
        # nothing to transform: no block x block matrix (512 MB for block = 8192) for an empty input
        return x.clone(memory_format=torch.contiguous_format)
    cd = compute_dtype(x.dtype)
    d = dct_matrix(block, cd, x.device)
    if inverse:
        d = d.t()
    t = _tiles(x.to(cd), block)
    y = torch.einsum("ux,...ixjy,vy->...iujv", d, t, d)
    return _untile(y).to(x.dtype)


@exact_under_autocast
def block_dct_ref(x: torch.Tensor, block: int = 8) -> torch.Tensor:
    """Reference block DCT-II: (..., H, W) -> (..., H, W), each tile replaced by D @ tile @ D.T."""
    return _block_transform_ref(x, block, inverse=False)


@exact_under_autocast
def block_idct_ref(y: torch.Tensor, block: int = 8) -> torch.Tensor:
    """Reference block DCT-III (the inverse): each tile replaced by D.T @ tile @ D."""
    return _block_transform_ref(y, block, inverse=True)


# ----------------------------------------------------------------------------------------------------
# Layouts (pure reshapes; every backend shares them)
# ----------------------------------------------------------------------------------------------------


def to_channels(y: torch.Tensor, block: int = 8) -> torch.Tensor:
    """(N, C, H, W) block coefficients -> (N, C*block*block, H/block, W/block) frequency channels.

    Channel id = c*block*block + u*block + v (u vertical, v horizontal frequency; row-major, the TFace
    layout). Example: ``to_channels(block_dct(x))[:, 0]`` is the DC of colour 0.
    """
    check_float_tensor(y, "y", dims=4)
    block = check_block(block)
    n, c, h, w = y.shape
    check_multiple(h, block, "y's height")
    check_multiple(w, block, "y's width")
    t = y.reshape(n, c, h // block, block, w // block, block).permute(0, 1, 3, 5, 2, 4)
    return t.reshape(n, c * block * block, h // block, w // block)


def from_channels(z: torch.Tensor, block: int = 8) -> torch.Tensor:
    """(N, C*block*block, Hb, Wb) frequency channels -> (N, C, Hb*block, Wb*block) block coefficients."""
    check_float_tensor(z, "z", dims=4)
    block = check_block(block)
    n, cc, hb, wb = z.shape
    if cc % (block * block) != 0:
        raise ValueError(f"z must have a multiple of {block * block} channels, got {cc}")
    c = cc // (block * block)
    t = z.reshape(n, c, block, block, hb, wb).permute(0, 1, 4, 2, 5, 3)
    return t.reshape(n, c, hb * block, wb * block)


# ----------------------------------------------------------------------------------------------------
# Op registration: fastmix::block_dct(Tensor x, int block, bool inverse) -> Tensor, schema in
# csrc/fastmix.cpp. The DCT is orthonormal, so the gradient of either direction is the other one.
# ----------------------------------------------------------------------------------------------------

_registered = False


def register_block_dct_meta(qualname: str) -> None:
    """Fake (shape) and autograd registrations of a block-DCT custom op ``qualname`` with the schema
    (x, block, inverse) -> y: the C++ op fastmix::block_dct and the Triton op fastmix::block_dct_triton share
    them. The transform is orthonormal, so its gradient is the inverse transform of the gradient."""
    name = qualname.split("::", 1)[1]

    def _fake(x, block, inverse):
        return torch.empty_like(x, memory_format=torch.contiguous_format)

    def _setup(ctx, inputs, output):
        ctx.block, ctx.inverse = inputs[1], inputs[2]

    def _bwd(ctx, grad):
        return getattr(torch.ops.fastmix, name)(grad, ctx.block, not ctx.inverse), None, None

    torch.library.register_fake(qualname)(_fake)
    torch.library.register_autograd(qualname, _bwd, setup_context=_setup)


def register_ops() -> None:
    """Fake and autograd registrations for fastmix::block_dct (called by _backend once _C loads)."""
    global _registered
    if _registered:
        return
    register_block_dct_meta("fastmix::block_dct")
    _registered = True


def _block_transform(x: torch.Tensor, block: int, inverse: bool, name: str) -> torch.Tensor:
    arg = "y" if inverse else "x"
    check_float_tensor(x, arg, min_dims=2)
    block = check_block(block)
    check_multiple(x.shape[-2], block, f"{arg}'s height (dim -2)")
    check_multiple(x.shape[-1], block, f"{arg}'s width (dim -1)")
    backend = _backend.choose(x.device, name)
    if backend != "torch":
        check_autodiff_mode(name, x)
    if backend == "cpu" or backend == "cuda":
        return torch.ops.fastmix.block_dct(x, block, inverse)
    if backend == "triton":
        from ._triton import dct as tdct

        return tdct.block_transform(x, block, inverse)
    return _block_transform_ref(x, block, inverse)


@exact_under_autocast
def block_dct(x: torch.Tensor, block: int = 8) -> torch.Tensor:
    """Orthonormal 2-D DCT-II of every block x block tile.

    x: (..., H, W) float, H and W multiples of ``block``. Returns the same shape and dtype.
    Example: ``block_idct(block_dct(x))`` equals ``x`` to rounding.
    """
    return _block_transform(x, block, False, "block_dct")


@exact_under_autocast
def block_idct(y: torch.Tensor, block: int = 8) -> torch.Tensor:
    """Inverse of :func:`block_dct` (DCT-III of every tile). y: (..., H, W) float."""
    return _block_transform(y, block, True, "block_idct")
