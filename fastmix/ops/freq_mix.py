"""freq_mix family: the fused hybrid mask.

    Y[m, c, f, i, j] = keep[c*64+f] * (s(seed, m, c*64+f, i, j) * sum_t w[m, t, (c), f] * DCT8x8(x[index[m, t], c])[f, i, j]
                                       + scale[c*64+f] * q(noise_seed, m, c*64+f, i, j))

(the noise term only with ``noise=``: fastmix/ops/noise.py).

Read top to bottom: argument normalisation -> reference -> the resampling "geometry" shared with the
frontend -> op registration (fake + autograd for the C++ ops in csrc/cpu/mix.cpp) -> public function.

A partner whose weight is exactly zero (per image, or per frequency) is skipped: it contributes nothing
to the output or to any gradient, even when its pixels are NaN. This is how padded partners of a
per-sample k are ignored, and every backend, the reference included, implements it.
"""
from __future__ import annotations

import operator

import torch

from .. import _backend
from ._common import (
    check_autodiff_mode,
    check_float_tensor,
    check_multiple,
    check_same_device,
    compute_dtype,
    exact_under_autocast,
    is_compiling,
    tensor_cache,
    wants_index_check,
    zeros_result,
)
from .dct import block_dct_ref, block_idct_ref, dct_matrix, from_channels, to_channels
from .noise import check_noise, noise_ref
from .sign import MAX_BLOCKS, check_seed, sign_ref

BLOCK = 8
FREQS = BLOCK * BLOCK

# ----------------------------------------------------------------------------------------------------
# Argument normalisation (shared by every backend and by the frontend)
# ----------------------------------------------------------------------------------------------------


def normalize_keep(keep, channels: int, device: torch.device) -> tuple[int, ...]:
    """keep -> sorted tuple of kept channel ids in [0, channels).

    keep: None (all), bool mask (channels,) or (64,) (the same frequencies kept in every colour),
    a 1-D integer tensor of ids, or a sequence of ints (the form to use under torch.compile: a tensor's
    contents decide the output shape, which a compiled graph cannot know).
    """
    if keep is None:
        return tuple(range(channels))
    if isinstance(keep, torch.Tensor):
        if keep.device != device and keep.device.type != "cpu":
            raise ValueError(f"keep is on {keep.device} but x is on {device}; pass keep on {device} or the CPU")
        if keep.dtype == torch.bool:
            if keep.dim() != 1 or keep.numel() not in (channels, FREQS):
                raise ValueError(f"keep as a bool mask must have shape ({channels},) or ({FREQS},), got {tuple(keep.shape)}")
            mask = keep.detach().cpu()
            if mask.numel() == FREQS and channels != FREQS:
                mask = mask.repeat(channels // FREQS)
            ids = tuple(int(i) for i in mask.nonzero().flatten().tolist())
        elif keep.dtype in (torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8):
            if keep.dim() != 1:
                raise ValueError(f"keep as channel ids must be 1-D, got shape {tuple(keep.shape)}")
            ids = tuple(int(i) for i in keep.detach().cpu().tolist())
            ids = _check_ids(ids, channels)
        else:
            raise TypeError(f"keep must be None, a bool mask, an integer tensor of channel ids or a list of ints, got a {keep.dtype} tensor")
    else:
        try:
            items = list(keep)
            ids = tuple(operator.index(i) for i in items)
        except TypeError:
            raise TypeError(f"keep must be None, a bool mask, an integer tensor of channel ids or a list of ints, got {type(keep).__name__}") from None
        if any(isinstance(i, bool) or (isinstance(i, torch.Tensor) and i.dtype == torch.bool) for i in items):
            # read as ids, [True, False] would keep channels 1 and 0 (operator.index(True) == 1)
            raise TypeError("keep as a list holds channel ids (ints), got bools; pass a mask as a torch.bool tensor")
        ids = _check_ids(ids, channels)
    return ids


def _check_ids(ids, channels):
    for i in ids:
        if not 0 <= i < channels:
            raise IndexError(f"keep holds channel id {i}, outside [0, {channels})")
    s = tuple(sorted(set(ids)))
    if len(s) != len(ids):
        raise ValueError("keep holds duplicate channel ids")
    return s


def keep_positions(ids: tuple[int, ...], channels: int, device) -> torch.Tensor:
    """(channels,) int32: output slot of each channel id, -1 where removed (what the kernels read).

    Cached per (ids, channels, device): a call with the same keep set copies nothing from the host, so
    the ops can be captured in a CUDA graph once warm. In a compiled graph, an op's copy of it (below).
    """
    if is_compiling():
        return torch.ops.fastmix_const.keep_positions(list(ids), channels, torch.device(device))
    return _keep_positions(ids, channels, torch.device(device))


@tensor_cache(maxsize=256)
def _keep_positions(ids, channels, device):
    pos = [-1] * channels
    for slot, i in enumerate(ids):
        pos[i] = slot
    return torch.tensor(pos, dtype=torch.int32, device=device)


# Under torch.compile the cached constants (keep slots, transform geometry, colour matrices) enter the graph
# through these ops, which return copies of them: a few hundred bytes to a few kilobytes per call, next to
# megabytes of images. Baked in as constants instead (torch.compiler.assume_constant_result), Dynamo names
# each after its function, so a second keep set in one graph collided ("ConstantSource(source_name=
# 'keep_positions') already in seen_sources" in inductor), and a symbolic image size (a compiled function's
# second size) could not be passed at all. The eager path reads the caches directly.


@torch.library.custom_op("fastmix_const::keep_positions", mutates_args=())
def _keep_positions_op(ids: list[int], channels: int, device: torch.device) -> torch.Tensor:
    return _keep_positions(tuple(ids), channels, device).clone()


@_keep_positions_op.register_fake
def _(ids, channels, device):
    return torch.empty(channels, dtype=torch.int32, device=device)


def check_index(index, n: int, m_name: str = "index") -> torch.Tensor:
    if not isinstance(index, torch.Tensor):
        raise TypeError(f"{m_name} must be an int64 tensor of shape (M, k), got {type(index).__name__}")
    if index.dtype.is_floating_point or index.dtype.is_complex or index.dtype == torch.bool:
        raise TypeError(f"{m_name} must be an integer (int64) tensor, got {index.dtype}")
    if index.dim() != 2:
        raise ValueError(f"{m_name} must have shape (M, k), got {tuple(index.shape)}")
    if index.shape[1] == 0:
        raise ValueError(f"{m_name} must list k >= 1 partners per output, got k = 0")
    index = index.to(torch.int64)
    # A data-dependent check: on a GPU it syncs the stream (fastmix.set_index_checks turns it off there),
    # and it cannot run inside a compiled graph or a CUDA-graph capture, where the C++ kernels still
    # check the range themselves.
    if index.numel() and not is_compiling() and wants_index_check(index):
        lo, hi = int(index.min()), int(index.max())
        if lo < 0 or hi >= n:
            raise IndexError(f"{m_name} values must be in [0, {n}) (N = x.shape[0]), got values in [{lo}, {hi}]")
    return index


def check_weight(weight, m: int, k: int, c: int, name: str = "weight") -> torch.Tensor:
    """Validate and view weight as (M, k) (per image) or (M, k, Cw, 64) with Cw in {1, C}."""
    check_float_tensor(weight, name)
    shapes = f"(M, k) = ({m}, {k}), (M, k, 64) or (M, k, C, 64) = ({m}, {k}, {c}, 64)"
    if weight.dim() == 2 and tuple(weight.shape) == (m, k):
        return weight
    if weight.dim() == 3 and tuple(weight.shape) == (m, k, FREQS):
        return weight.unsqueeze(2)
    if weight.dim() == 4 and tuple(weight.shape) == (m, k, c, FREQS):
        return weight
    raise ValueError(f"{name} must have shape {shapes}, got {tuple(weight.shape)}")


def check_out(out: str) -> bool:
    if out not in ("channels", "pixels"):
        raise ValueError(f"out must be 'channels' or 'pixels', got {out!r}")
    return out == "pixels"


# ----------------------------------------------------------------------------------------------------
# Reference
# ----------------------------------------------------------------------------------------------------


def mix_channels_ref(ch: torch.Tensor, index, weight4, ids, seed, pixels: bool, out_dtype, noise=None):
    """Shared tail of the references: mix frequency channels (N, C*64, Hb, Wb) -> output.

    weight4: (M, k) or (M, k, Cw, 64). noise: None or check_noise's (kind, seed, scale, table). Computes in
    ch's dtype; returns out_dtype.
    """
    n, cc, hb, wb = ch.shape
    c = cc // FREQS
    m, k = index.shape
    g = ch[index]  # (M, k, C*64, Hb, Wb): the gather the kernels never materialise
    w = weight4.to(ch.dtype)
    if w.dim() == 2:
        w = w.view(m, k, 1, 1, 1)
    else:
        w = w.expand(m, k, c, FREQS).reshape(m, k, cc, 1, 1)
    # where() before the product: a skipped partner's NaN pixels must not reach the output, nor (through
    # 0 * NaN in the backward) the weight gradient.
    y = (w * torch.where(w != 0, g, torch.zeros((), dtype=ch.dtype, device=ch.device))).sum(1)
    if seed is not None:
        y = y * sign_ref(seed, m, cc, hb, wb, device=ch.device, dtype=ch.dtype)
    if noise is not None:
        # after the sign flip; float32 draws (the specification's bits), added in the compute dtype
        _, nseed, scale, table = noise
        y = y + noise_ref(nseed, m, cc, hb, wb, table, scale, device=ch.device).to(ch.dtype)
    if pixels:
        keepmask = torch.zeros(cc, dtype=torch.bool, device=ch.device)
        keepmask[list(ids)] = True
        y = torch.where(keepmask.view(1, cc, 1, 1), y, torch.zeros((), dtype=y.dtype, device=y.device))
        return block_idct_ref(from_channels(y)).to(out_dtype)
    return y[:, list(ids)].to(out_dtype)


@exact_under_autocast
def freq_mix_ref(x, index, weight, *, keep=None, seed=None, out="channels", noise=None, noise_seed=None,
                 noise_scale=None):
    """Pure-PyTorch reference of :func:`freq_mix` (materialises the gathered partners and the noise)."""
    pixels, index, weight4, ids, seed, nz = _validate(x, index, weight, keep, seed, out, noise, noise_seed, noise_scale)
    cd = compute_dtype(x.dtype)
    ch = to_channels(block_dct_ref(x.to(cd)))
    return mix_channels_ref(ch, index, weight4, ids, seed, pixels, x.dtype, nz)


# ----------------------------------------------------------------------------------------------------
# Geometry: the kernels compute every output block as  A_I @ X[r_I : r_I+R, s_J : s_J+R] @ B_J^T.
# For freq_mix A_I = B_J = D (the 8x8 DCT) at r_I = 8I; the frontend folds bilinear upsampling into A, B
# (fastmix/ops/frontend.py). One kernel serves both.
# ----------------------------------------------------------------------------------------------------

def dct_geometry(size: int, dtype: torch.dtype, device: torch.device):
    """(A, start) for the plain 8x8 block DCT along one axis of length ``size``: A (size/8, 8, 8).

    Cached per (size, dtype, device), so that warm calls copy nothing from the host; in a compiled graph,
    an op's copy of it (see keep_positions).
    """
    if is_compiling():
        return torch.ops.fastmix_const.dct_geometry(size, dtype, torch.device(device))
    return _dct_geometry(size, dtype, torch.device(device))


@torch.library.custom_op("fastmix_const::dct_geometry", mutates_args=())
def _dct_geometry_op(size: int, dtype: torch.dtype, device: torch.device) -> tuple[torch.Tensor, torch.Tensor]:
    return tuple(t.clone() for t in _dct_geometry(size, dtype, device))


@_dct_geometry_op.register_fake
def _(size, dtype, device):
    nb = size // BLOCK
    return torch.empty(nb, BLOCK, BLOCK, dtype=dtype, device=device), torch.empty(nb, dtype=torch.int64, device=device)


@tensor_cache(maxsize=64)
def _dct_geometry(size, dtype, device):
    nb = size // BLOCK
    a = dct_matrix(BLOCK, dtype, device).expand(nb, BLOCK, BLOCK).contiguous()
    start = torch.arange(0, size, BLOCK, dtype=torch.int64, device=device)
    return a, start


# ----------------------------------------------------------------------------------------------------
# Op registration. Schemas (csrc/fastmix.cpp):
#   mix_fwd(Tensor x, Tensor index, Tensor weight, Tensor pos, int n_kept, int seed, bool use_seed,
#           bool pixels, Tensor row_mat, Tensor row_start, Tensor col_mat, Tensor col_start,
#           ScalarType? out_dtype) -> Tensor
#   mix_bwd(Tensor grad, Tensor x, Tensor index, Tensor weight, Tensor pos, int seed, bool use_seed,
#           bool pixels, Tensor row_mat, Tensor row_start, Tensor col_mat, Tensor col_start,
#           bool need_x, bool need_w) -> (Tensor, Tensor)
# ----------------------------------------------------------------------------------------------------

_registered = False


def register_ops() -> None:
    """Fake and autograd registrations for fastmix::mix_fwd / mix_bwd (called by _backend once _C loads)."""
    global _registered
    if _registered:
        return

    torch.library.register_fake("fastmix::mix_fwd")(mix_fwd_fake)

    @torch.library.register_fake("fastmix::mix_bwd")
    def _(grad, x, index, weight, pos, seed, use_seed, pixels, row_mat, row_start, col_mat, col_start, need_x, need_w):
        gx = torch.empty_like(x, memory_format=torch.contiguous_format) if need_x else x.new_empty(0)
        gw = torch.empty_like(weight, memory_format=torch.contiguous_format) if need_w else weight.new_empty(0)
        return gx, gw

    backward, setup = mix_autograd(torch.ops.fastmix.mix_bwd)
    torch.library.register_autograd("fastmix::mix_fwd", backward, setup_context=setup)
    backward, setup = mix_bwd_autograd(torch.ops.fastmix.mix_fwd, torch.ops.fastmix.mix_bwd)
    torch.library.register_autograd("fastmix::mix_bwd", backward, setup_context=setup)
    _registered = True


def mix_fwd_fake(x, index, weight, pos, n_kept, seed, use_seed, pixels, row_mat, row_start, col_mat, col_start,
                 out_dtype, noise_scale=None, noise_table=None, noise_seed=0):
    """Output metadata of a mix_fwd op (the C++ ops and the Triton custom ops share it)."""
    dt = x.dtype if out_dtype is None else out_dtype
    m = index.shape[0]
    if pixels:
        return x.new_empty((m, x.shape[1], x.shape[2], x.shape[3]), dtype=dt)
    return x.new_empty((m, n_kept, row_mat.shape[0], col_mat.shape[0]), dtype=dt)


def mix_autograd(bwd_op):
    """(backward, setup_context) of a mix_fwd op whose gradients come from ``bwd_op`` (the arguments of
    fastmix::mix_bwd); shared by the C++ ops and the Triton custom ops. index, pos, seed, the geometry and
    the noise get no gradient; x and weight get theirs only when asked. The noise is an additive constant
    (independent of x and weight), so the backward of the op with noise is the backward without it."""

    def setup(ctx, inputs, output):
        x, index, weight, pos, n_kept, seed, use_seed, pixels, row_mat, row_start, col_mat, col_start = inputs[:12]
        ctx.save_for_backward(x, index, weight, pos, row_mat, row_start, col_mat, col_start)
        ctx.args = (seed, use_seed, pixels)
        ctx.n_inputs = len(inputs)

    def backward(ctx, grad):
        x, index, weight, pos, row_mat, row_start, col_mat, col_start = ctx.saved_tensors
        seed, use_seed, pixels = ctx.args
        need_x, need_w = ctx.needs_input_grad[0], ctx.needs_input_grad[2]
        gx, gw = bwd_op(grad, x, index, weight, pos, seed, use_seed, pixels, row_mat, row_start, col_mat, col_start,
                        need_x, need_w)
        return (gx if need_x else None, None, gw if need_w else None) + (None,) * (ctx.n_inputs - 3)

    return backward, setup


def mix_bwd_autograd(fwd_op, bwd_op):
    """(backward, setup_context) of a mix_bwd op: double backward (gradient penalties, Hessian-vector
    products), from the two ops themselves, so every order works.

    The output is bilinear in (x, weight): Y = F(x, w). Its backward gives gx = F_w^T g and gw = F_x^T g,
    both linear in g, so for incoming gradients (ggx, ggw) of (gx, gw):
        d/dg = F(ggx, w) + F(x, ggw)      (two forwards)
        d/dx = F_{ggw}^T g                (the x gradient of a backward with weights ggw)
        d/dw = F_{ggx}^T g                (the weight gradient of a backward with input ggx)
    A zero-weight partner is absent from the first-order gradients (skipped, NaN pixels included), so ggw
    is zeroed there first: the same derivatives as autograd through the reference."""

    def setup(ctx, inputs, output):
        grad, x, index, weight, pos, seed, use_seed, pixels, row_mat, row_start, col_mat, col_start, need_x, need_w = inputs
        ctx.save_for_backward(grad, x, index, weight, pos, row_mat, row_start, col_mat, col_start)
        ctx.args = (seed, use_seed, pixels, need_x, need_w)

    def backward(ctx, ggx, ggw):
        grad, x, index, weight, pos, row_mat, row_start, col_mat, col_start = ctx.saved_tensors
        seed, use_seed, pixels, need_x, need_w = ctx.args
        geom = (row_mat, row_start, col_mat, col_start)
        ggx = ggx if need_x else None  # a gradient that was not computed (an empty tensor) has no derivative
        ggw = torch.where(weight != 0, ggw, torch.zeros((), dtype=ggw.dtype, device=ggw.device)) if need_w and ggw is not None else None
        # mix_fwd's n_kept sizes the channels output (that of grad); "pixels" only checks pos against it.
        n_kept = pos.shape[0] if pixels else grad.shape[1]
        d_grad = d_x = d_w = None
        if ctx.needs_input_grad[0]:
            for inp, w in ((ggx, weight), (x, ggw)):
                if inp is not None and w is not None:
                    t = fwd_op(inp, index, w, pos, n_kept, seed, use_seed, pixels, *geom, grad.dtype)
                    d_grad = t if d_grad is None else d_grad + t
        if ctx.needs_input_grad[1] and ggw is not None:
            d_x = bwd_op(grad, x, index, ggw, pos, seed, use_seed, pixels, *geom, True, False)[0]
        if ctx.needs_input_grad[3] and ggx is not None:
            d_w = bwd_op(grad, ggx, index, weight, pos, seed, use_seed, pixels, *geom, False, True)[1]
        return (d_grad, d_x, None, d_w) + (None,) * 10

    return backward, setup


def mix_op(backend, x, index, weight4, ids, seed, pixels, rows, cols, out_dtype, op_name, noise=None):
    """Run the fused kernel of ``backend`` on validated arguments (noise: check_noise's tuple or None)."""
    c = x.shape[1]
    pos = keep_positions(ids, c * FREQS, x.device)
    use_seed = seed is not None
    args = (x, index, weight4, pos, len(ids), seed or 0, use_seed, pixels, rows[0], rows[1], cols[0], cols[1], out_dtype)
    if noise is not None:
        _, nseed, scale, table = noise
        args = args + (scale, table, nseed)
    if backend == "triton":
        from ._triton import mix as tmix

        return tmix.mix(*args)
    return torch.ops.fastmix.mix_fwd(*args)


# ----------------------------------------------------------------------------------------------------
# Public function
# ----------------------------------------------------------------------------------------------------


def _validate(x, index, weight, keep, seed, out, noise=None, noise_seed=None, noise_scale=None):
    check_float_tensor(x, "x", dims=4)
    pixels = check_out(out)
    n, c, h, w = x.shape
    check_multiple(h, BLOCK, "x's height (dim 2)")
    check_multiple(w, BLOCK, "x's width (dim 3)")
    if h // BLOCK >= MAX_BLOCKS or w // BLOCK >= MAX_BLOCKS:
        raise ValueError(f"x's height and width must be below {BLOCK * MAX_BLOCKS}, got {h}x{w}")
    check_same_device(x, "x", index=index, weight=weight)
    index = check_index(index, n)
    m, k = index.shape
    weight4 = check_weight(weight, m, k, c)
    ids = normalize_keep(keep, c * FREQS, x.device)
    seed = check_seed(seed)
    nz = check_noise(noise, noise_seed, noise_scale, c * FREQS, x.device)
    return pixels, index, weight4, ids, seed, nz


@exact_under_autocast
def freq_mix(x, index, weight, *, keep=None, seed=None, out="channels", noise=None, noise_seed=None,
             noise_scale=None):
    """Fused hybrid mask: block DCT, k-way weighted mixing, channel keep, sign flip, calibrated noise (and
    inverse DCT).

    Args:
        x: (N, C, H, W) float32 / float16 / bfloat16 (float64 for checks); H, W multiples of 8.
        index: (M, k) int64 in [0, N): row m lists the images mixed into output m.
        weight: (M, k) per image, (M, k, 64) per frequency (shared by colours) or (M, k, C, 64).
        keep: None (all C*64 channels), a bool mask (C*64,) or (64,), ids (1-D int tensor or list of ints).
        seed: None (no sign flip) or an int in [0, 2**63): the one-time sign key (see fastmix.ops.sign).
        noise: None, "gaussian" or "laplace": noise added to every kept coefficient after the sign flip,
            drawn inside the op from ``noise_seed`` (an int in [0, 2**63); no noise tensor is materialised;
            every backend draws the same bits: fastmix.ops.noise), with std (Gaussian) or scale b (Laplace)
            ``noise_scale``: a number, or a float tensor (64,) per frequency or (C*64,) per channel id,
            >= 0, a constant (no gradient). The gradient in x and weight is that without noise.
        out: "channels" -> (M, n_kept, H/8, W/8), kept channel ids ascending; "pixels" -> (M, C, H, W), the
            block inverse DCT of the masked, mixed, signed coefficients.

    Differentiable in x and weight. Example::

        idx = fastmix.sample_partners(64, 4)
        w = fastmix.sample_weights(64, 4)
        z = fastmix.freq_mix(x, idx, w, keep=list(range(1, 192)), seed=1234)   # (64, 191, 14, 14)
        z = fastmix.freq_mix(x, idx, w, seed=1234, noise="gaussian", noise_seed=99, noise_scale=0.5)
    """
    pixels, index, weight4, ids, seed, nz = _validate(x, index, weight, keep, seed, out, noise, noise_seed, noise_scale)
    backend = _backend.choose(x.device, "freq_mix")
    m = index.shape[0]
    n, c, h, w = x.shape
    if m == 0 or x.numel() == 0 or not ids:
        # Nothing to compute (removed channels are zero, so an empty keep gives zero pixels).
        shape = (m, c, h, w) if pixels else (m, len(ids), h // BLOCK, w // BLOCK)
        return zeros_result(shape, x.dtype, x, x, weight)
    if backend == "torch":
        cd = compute_dtype(x.dtype)
        ch = to_channels(block_dct_ref(x.to(cd)))
        return mix_channels_ref(ch, index, weight4, ids, seed, pixels, x.dtype, nz)
    check_autodiff_mode("freq_mix", x, weight)
    cd = compute_dtype(x.dtype)
    rows = dct_geometry(h, cd, x.device)
    cols = dct_geometry(w, cd, x.device)
    return mix_op(backend, x, index, weight4, ids, seed, pixels, rows, cols, None, "freq_mix", nz)
