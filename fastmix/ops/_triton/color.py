"""The frontend's colour pass as one Triton kernel: [-1, 1] RGB -> level-shifted YCbCr, per pixel.

    src[n, d, p] = sum_c A[d, c] * x[n, c, p] + b[d],   A = 127.5 * YCBCR,  b = 127.5 * YCBCR @ 1 + (-128, 0, 0)

which is ``color_transform(to_255(x), "ycbcr")`` (fastmix/ops/frontend.py, the reference) folded into one
affine map. Through torch that pass is about five kernels (scale, shift, an einsum with its layout copies,
the offset). On an H100 at N = 512, 3x112x112 the public frontend took 0.47 ms more than its fused kernel
alone (2.75 vs 2.27 ms); by a byte count (about six passes over 154 MB) most of it is this pass, not
profiled. One pass reads x once and writes src once (about 0.05 ms there at the card's copy bandwidth).
CONFIG["color_pass"] selects it; the gradient is the same kernel with A^T and no offset.
"""
from __future__ import annotations

import torch
import triton
import triton.language as tl

from .._common import tensor_cache
from . import interpreter_compat

BLOCK_PIXELS = 1024


@triton.jit
def _color_affine_kernel(x_ptr, a_ptr, b_ptr, out_ptr, HW, n_tiles, BP: tl.constexpr):
    # One program: image n, BP pixels of its 3 planes. int64 plane offsets (N * 3 * HW can pass 2**31).
    pid = tl.program_id(0)
    n = (pid // n_tiles).to(tl.int64)
    p = (pid % n_tiles) * BP + tl.arange(0, BP)
    mask = p < HW
    base = n * 3 * HW
    r = tl.load(x_ptr + base + p, mask=mask, other=0.0).to(tl.float32)
    g = tl.load(x_ptr + base + HW + p, mask=mask, other=0.0).to(tl.float32)
    b = tl.load(x_ptr + base + 2 * HW + p, mask=mask, other=0.0).to(tl.float32)
    for d in tl.static_range(3):
        v = tl.load(a_ptr + d * 3) * r + tl.load(a_ptr + d * 3 + 1) * g + tl.load(a_ptr + d * 3 + 2) * b
        tl.store(out_ptr + base + d * HW + p, v + tl.load(b_ptr + d), mask=mask)


def _launch(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    interpreter_compat()
    n, c, h, w = x.shape
    xc = x.contiguous()
    out = torch.empty((n, c, h, w), dtype=torch.float32, device=x.device)
    if out.numel():
        n_tiles = triton.cdiv(h * w, BLOCK_PIXELS)
        _color_affine_kernel[(n * n_tiles,)](xc, a, b, out, h * w, n_tiles, BP=BLOCK_PIXELS, num_warps=4)
    return out


@tensor_cache(maxsize=16)
def _constants(device: torch.device):
    """(A, b, A^T, zeros) in float32 on ``device``, folded in float64 once (no host copy on warm calls)."""
    from ..frontend import YCBCR, YCBCR_SHIFT

    a = 127.5 * YCBCR
    b = a.sum(1) + YCBCR_SHIFT
    f32 = dict(dtype=torch.float32, device=device)
    return a.to(**f32).contiguous(), b.to(**f32), a.t().to(**f32).contiguous(), torch.zeros(3, **f32)


@torch.library.custom_op("fastmix::ycbcr_triton", mutates_args=())
def ycbcr_triton(x: torch.Tensor, adjoint: bool) -> torch.Tensor:
    """adjoint=False: (N, 3, h, w) in [-1, 1], any float dtype -> float32 level-shifted YCbCr.
    adjoint=True: the map's gradient, A^T applied per pixel (no offset)."""
    a, b, at, zeros = _constants(x.device)
    return _launch(x, at, zeros) if adjoint else _launch(x, a, b)


@ycbcr_triton.register_fake
def _(x, adjoint):
    return x.new_empty(x.shape, dtype=torch.float32)


def _setup(ctx, inputs, output):
    ctx.dtype, ctx.adjoint = inputs[0].dtype, inputs[1]


def _backward(ctx, grad):
    if ctx.adjoint:
        # The adjoint's own gradient (double backward) is the map's linear part, A per pixel: in torch (not
        # a hot path), differentiable in turn; as multiply-adds (frontend._affine3), not an einsum, which a
        # backward run inside torch.autocast would compute in bfloat16 / float16.
        from ..frontend import YCBCR, _affine3

        return _affine3(grad.float(), (127.5 * YCBCR).tolist(), (0.0, 0.0, 0.0)).to(ctx.dtype), None
    return torch.ops.fastmix.ycbcr_triton(grad, True).to(ctx.dtype), None


ycbcr_triton.register_autograd(_backward, setup_context=_setup)


def ycbcr(x: torch.Tensor) -> torch.Tensor:
    """color_transform(to_255(x), "ycbcr") in one pass (float32 out); x (N, 3, h, w), validated by the caller."""
    return torch.ops.fastmix.ycbcr_triton(x, False)
