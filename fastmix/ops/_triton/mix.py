"""Triton kernels of the fused mix op (freq_mix and frontend), forward and backward.

The op is ``fastmix::mix_fwd`` of csrc/fastmix.cpp with the same arguments; its executable spec is the
float64 reference (fastmix.freq_mix_ref / fastmix.frontend_ref) and its exact CPU semantics are
csrc/cpu/mix.cpp. Every output block (m, c, I, J) is

    C = A_I @ P @ B_J^T,   P = sum_t w[m, t] X[index[m, t], c, r_I : r_I + RA, s_J : s_J + RB]    (per image)
    C = sum_t where(w[m, t, c, :] != 0, w[m, t, c, :] * (A_I @ P_t @ B_J^T), 0)                  (per frequency)

masked by ``pos`` (output slot per channel id, -1 = removed), signed by the counter hash of the seed, with
the seeded noise added after the sign (fastmix/ops/noise.py: a hash of the noise seed indexes the float32
table the op receives, times the channel's scale; ``USE_NOISE``), and written as channels (M, n_kept, Hb, Wb) or, for the plain DCT geometry only, as pixels A^T C B.
A partner whose weight is exactly zero is skipped (no read, no NaN leak, zero weight gradient).

Two geometries, two kernel families (chosen from shapes, no host sync):

* plain DCT geometry (freq_mix, frontend with upsample 1): RA = RB = 8, Hb * 8 = H, Wb * 8 = W; every
  block uses the same A = row_mat[0], B = col_mat[0] and starts at (8I, 8J). The ``*_dct`` kernels hold BL
  blocks of one plane as a [BL, 64] tile (one block per row, pixels or coefficients row-major) and do each
  8x8 transform of the tile as one [BL, 64] @ [64, 64] tl.dot with the Kronecker matrix A kron B. Pixel
  tiles load as 32-byte runs (vectorised); coefficient tiles of the channel layout load and store along
  the block axis L (coalesced: the (Hb, Wb) plane of one channel is contiguous).
* resampling geometry (frontend with upsample > 1): per-block matrices A_I (8, RA), B_J (8, RB) with small
  patches (RA = RB = 3 for upsample 8) that overlap between neighbouring blocks. The kernels hold BL blocks
  as [BL, 8, 8] tiles and apply the separable transform with broadcast FMAs in registers, statically
  unrolled over the RA x RB patch (8 * RA * RB + 64 * RA multiply-adds per block: 264 for upsample 8).
  The upsampled image never exists. Patch pixels whose coefficients are all zero for a block (patches
  have one width R for every block) are masked off, so NaN / Inf reach exactly the blocks they touch.
  32 * num_warps blocks per program puts one block per thread: all 8x8 math stays in its registers.

Backward (x gradient, deterministic by default). The partner list is inverted on the device (torch.sort
and searchsorted of the flattened index: no host sync): for image n, the pairs e = m * k + t with
index[e] == n. Then
* plain DCT geometry: one kernel, one program per (n, c, block tile), gathers the coefficient gradients of
  every pair of n (reading grad k times in all, the same bytes as the forward), sums them in registers
  with the weights and applies one inverse transform; the weight gradient comes out of the same pass
  (<G_m, DCT(x_n)>, with x_n read once).
* resampling geometry: the incoming gradient is about upsample^2 times larger than x (63x at upsample 8
  with the DCs dropped), so it is read once: (1) per output m, the adjoint of every block, A_I^T G B_J, goes to a
  patch buffer T (M, C, RA * RB, Hb * Wb); (2) a fold gathers, for every source pixel, the patches that
  cover it (row/column ranges from searchsorted on the block starts) into Z_m (M, C, H, W); (3) per image
  n, Z of its pairs are summed with the weights (and <Z_m, x_n> gives the per-image weight gradient).
  Per-frequency weights are applied in (1), so T and Z are per pair (M * k, ...).
An atomic-add variant of the x gradient exists for the plain DCT geometry (CONFIG["bwd_x_mode"] =
"atomic": reads grad once, fp32 atomics, run-to-run rounding differences); "gather" is the default.

Numerics: fp32 / fp16 / bf16 inputs, fp32 accumulation, outputs in out_dtype (forward) or the input's
dtype (gradients). float64 inputs: the entry point ``mix`` runs ``mix_reference`` (exact float64 PyTorch,
differentiable); called directly, the custom ops compute float64 data in float32.
tl.dot runs with CONFIG's precision (fp32 data: "tf32x3", three tensor-core products, error ~2e-7,
measured faster on an H100 than exact "ieee" FMAs).
Offsets: plane bases and every index that scales with N, M or C are int64; offsets inside one (H, W)
plane are int32 (the launchers check H * W < 2**31).

Bytes moved (fp32, the issue's shapes): freq_mix reads each partner tile once per output and writes the
output once: the read-k-write-once floor (539 MB for N=512, 3x112x112, k=6, 191 channels). Per-frequency
weights with CONFIG["fwd_per_freq"] = "precompute" add one read and one write of x (693 MB, 1.29x the
floor) to avoid k transforms per tile. The frontend reads 1/63 of what it writes: its floor is writing
the output (4.85 GB for N=512, 189 x 112 x 112). Backward: plain DCT geometry reads grad k times and
writes gx once (the forward's bytes); resampling reads grad once, writes and reads T (RA*RB*Hb*Wb per
plane: 9/63 of grad at upsample 8) and Z (k reads), about 1.4x the forward's bytes.
No host syncs in the ops: the inverse index, cover tables and used-pixel masks are device tensors.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from . import CONFIG, dot_precision, interpreter_compat, option, row_fastest, tile_config
from .dct import _cast_out, _kron8, _tile_coords, block_dct_forward, check_plane, rne_bf16
from ..freq_mix import mix_autograd, mix_bwd_autograd, mix_fwd_fake
from .noise import _noise, noise_kernel_key, table_shift
from .sign import _apply_sign, _apply_sign_premixed, _plane_hash, kernel_key, sign_planes

BLOCK = 8
FREQS = 64

# ----------------------------------------------------------------------------------------------------
# Reference at the op's level (geometry tensors in, like the kernels): the readable twin of the kernels,
# and what the entry point runs for float64 inputs (exact float64, differentiable through autograd).
# ----------------------------------------------------------------------------------------------------


def mix_reference(x, index, weight, pos, n_kept, seed, use_seed, pixels, row_mat, row_start, col_mat, col_start,
                  out_dtype=None, noise_scale=None, noise_table=None, noise_seed=0):
    """fastmix::mix_fwd in plain PyTorch, computing in x's dtype (float64 checks). Materialises every patch
    and the noise."""
    from ..noise import noise_ref
    from ..sign import sign_ref

    n, c, h, w = x.shape
    m, k = index.shape
    a, b = row_mat.to(x.dtype), col_mat.to(x.dtype)
    hb, ra = a.shape[0], a.shape[2]
    wb, rb = b.shape[0], b.shape[2]
    rows = (row_start.view(-1, 1) + torch.arange(ra, device=x.device)).reshape(-1)
    cols = (col_start.view(-1, 1) + torch.arange(rb, device=x.device)).reshape(-1)
    patches = x[:, :, rows][:, :, :, cols].reshape(n, c, hb, ra, wb, rb)
    # pixels of a patch that the block's rows / columns never touch are dropped, not multiplied by 0
    used = (a != 0).any(1).view(1, 1, hb, ra, 1, 1) & (b != 0).any(1).view(1, 1, 1, 1, wb, rb)
    patches = torch.where(used, patches, torch.zeros((), dtype=x.dtype, device=x.device))
    coef = torch.einsum("jua,ncjakb,kvb->ncuvjk", a, patches, b).reshape(n, c * FREQS, hb, wb)
    g = coef[index]  # (M, k, C*64, Hb, Wb)
    wt = weight.to(x.dtype)
    wt = wt.view(m, k, 1, 1, 1) if wt.dim() == 2 else wt.expand(m, k, c, FREQS).reshape(m, k, c * FREQS, 1, 1)
    # where() before the product, as in freq_mix_ref: a skipped partner's NaN pixels must not reach the
    # weight gradient through 0 * NaN (wt * g inside the where gives d/dwt = g there)
    y = (wt * torch.where(wt != 0, g, torch.zeros((), dtype=x.dtype, device=x.device))).sum(1)
    if use_seed:
        y = y * sign_ref(seed, m, c * FREQS, hb, wb, device=x.device, dtype=x.dtype)
    if noise_table is not None:
        y = y + noise_ref(noise_seed, m, c * FREQS, hb, wb, noise_table, noise_scale, device=x.device).to(x.dtype)
    keep = pos >= 0
    od = x.dtype if out_dtype is None else out_dtype
    if pixels:
        y = torch.where(keep.view(1, -1, 1, 1), y, torch.zeros((), dtype=x.dtype, device=x.device))
        px = torch.einsum("jua,mcuvjk,kvb->mcjakb", a, y.reshape(m, c, BLOCK, BLOCK, hb, wb), b)
        return px.reshape(m, c, hb * ra, wb * rb).to(od)
    # kept channel ids in slot order, without a host sync: removed channels sort after every slot
    order = torch.argsort(torch.where(keep, pos.long(), c * FREQS + torch.arange(c * FREQS, device=x.device)))
    return y.index_select(1, order[:n_kept]).to(od)

# ----------------------------------------------------------------------------------------------------
# Kernels: plain DCT geometry ([BL, 64] tiles, tl.dot with the Kronecker matrix)
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _nonzero(w):
    """w != 0 for float32 w, as an integer test on the bits (sign bit shifted out: -0.0 counts as zero,
    NaN as nonzero, exactly like !=). Used on scalars that mask block loads: Triton 3.6's interpreter
    broadcasts a scalar *float* comparison to a block with float data, which then fails in `&`."""
    return (w.to(tl.uint32, bitcast=True) << 1) != 0


@triton.jit
def _masked_if(mask, pred):
    """mask where the scalar pred holds, else all False. Written as a select rather than `mask & pred`:
    Triton's interpreter (3.6 and 3.9 both, differently) broadcasts some scalar predicates to a block with
    non-bool data, which `&` or tl.load's mask then rejects; compiled code is the same either way."""
    return tl.where(pred, mask, False)


@triton.jit
def _program_tile(n_tiles, C, ROWS, ROW_FASTEST: tl.constexpr):
    """The (tile, colour, row) a program of the mix kernels works on; row (an output m, or an input image n,
    of ROWS) is int64 for the offsets built from it.

    Programs run over (row, colour, tile) with the tile fastest, or with ROW_FASTEST over (tile, colour,
    row) with the row fastest. Rows share data: every image is a partner of about k outputs (forward) and
    every output gradient is read by its k partners (backward), at the same tile. Row fastest puts those
    reads into the same few waves of programs, so after the first one they hit L2 (the working set of one
    (colour, tile) over all rows is a few MB); tile fastest spreads them over the whole launch (benches/
    l2_model.py).
    """
    pid = tl.program_id(0)
    if ROW_FASTEST:
        row = pid % ROWS
        tc = pid // ROWS
        return tc // C, tc % C, row.to(tl.int64)
    tile = pid % n_tiles
    rc = pid // n_tiles
    return tile, rc % C, (rc // C).to(tl.int64)


@triton.jit
def _signed(coef, key, m, ch, bi, bj):
    """coef [BL, 64] negated where the hash of (seed, m, channel ch [64], block (bi, bj) [BL]) says so."""
    plane = _plane_hash(key, m, ch)
    return _apply_sign(coef, plane[None, :], bi[:, None], bj[:, None])


@triton.jit
def _static_partners(src_ptr, idx_ptr, w_ptr, m, c, N, C, HW, KS: tl.constexpr):
    """The KS partners of output m as tuples: weights, plane base pointers (colour c) and liveness (non-zero
    weight, index in range). Loaded before any pixel, so the pixel loads that follow wait on none of them
    in turn (a run-time partner loop chains index load -> pixel load per partner)."""
    ws = ()
    planes = ()
    lives = ()
    for t in tl.static_range(KS):
        wt = tl.load(w_ptr + m * KS + t)
        n = tl.load(idx_ptr + m * KS + t)
        ws = ws + (wt,)
        planes = planes + (src_ptr + (n * C + c) * HW,)
        lives = lives + (_nonzero(wt) & (n >= 0) & (n < N),)
    return ws, planes, lives


@triton.jit
def _mix_fwd_dct_kernel(
    src_ptr, idx_ptr, w_ptr, pos_ptr, a_ptr, b_ptr, out_ptr, nscale_ptr, ntable_ptr,
    N, C, HW, W, Wb, HbWb, K, CW, n_kept, n_tiles, key, M, nkey,
    PER_IMAGE: tl.constexpr, PIXELS: tl.constexpr, USE_SEED: tl.constexpr, COEF_IN: tl.constexpr,
    KS: tl.constexpr, ROW_FASTEST: tl.constexpr, RNE_BF16: tl.constexpr, BL: tl.constexpr, PREC: tl.constexpr,
    USE_NOISE: tl.constexpr = False, NSHIFT: tl.constexpr = 16,
):
    # One program: output m, colour c, BL blocks. src is x (N, C, H, W), or with COEF_IN its block DCT in
    # the channel layout (N, C*64, Hb, Wb) (per-frequency weights: transforming every partner of every
    # output costs k tl.dot per tile; transforming each image once costs one extra pass over x instead).
    # KS > 0: per-image weights with K == KS partners, unrolled (see below).
    tile, c, m = _program_tile(n_tiles, C, M, ROW_FASTEST)
    L, lmask, bi, bj, g, poff = _tile_coords(tile, W, Wb, HbWb, BL)
    pmask = lmask[:, None]
    if COEF_IN:
        soff = (g * HbWb)[None, :] + L[:, None]  # [BL, 64]: coefficient f of block L
    else:
        soff = poff
    acc = tl.zeros([BL, 64], dtype=tl.float32)
    if PER_IMAGE:
        # The transform is linear: mix the k partner tiles first, transform once.
        # Zero-weight (padded) partners are masked off, not branched around: a masked load reads no memory
        # (and no NaN).
        if KS > 0:
            # Static partner count: the KS weights and partner bases first, then the KS tile loads, which
            # no longer wait on each other's address loads, so all of them are in flight together. The
            # run-time loop below compiles (sm_90) to rounds of 4 and then 2 partners for k = 6, each round
            # a dependent chain index load -> tile load: two such latencies per program where one suffices.
            ws, srcs, lives = _static_partners(src_ptr, idx_ptr, w_ptr, m, c, N, C, HW, KS)
            for t in tl.static_range(KS):
                v = tl.load(srcs[t] + soff, mask=_masked_if(pmask, lives[t]), other=0.0)
                acc += ws[t] * v.to(tl.float32)
        else:
            for t in range(K):
                wt = tl.load(w_ptr + m * K + t)
                n = tl.load(idx_ptr + m * K + t)
                live = _nonzero(wt) & (n >= 0) & (n < N)
                v = tl.load(src_ptr + (n * C + c) * HW + soff, mask=_masked_if(pmask, live), other=0.0)
                acc += wt * v.to(tl.float32)
        if COEF_IN:
            coef = acc
        else:
            coef = tl.dot(acc, _kron8(a_ptr, b_ptr, True), input_precision=PREC)
    else:
        cw = tl.where(CW == 1, 0, c)
        if not COEF_IN:
            kt = _kron8(a_ptr, b_ptr, True)
        for t in range(K):
            wr = tl.load(w_ptr + ((m * K + t) * CW + cw) * 64 + g)  # [64]
            n = tl.load(idx_ptr + m * K + t)
            live = (tl.max((wr != 0).to(tl.int32), axis=0) > 0) & (n >= 0) & (n < N)
            v = tl.load(src_ptr + (n * C + c) * HW + soff, mask=_masked_if(pmask, live), other=0.0).to(tl.float32)
            if not COEF_IN:
                v = tl.dot(v, kt, input_precision=PREC)
            acc += tl.where(wr[None, :] != 0, wr[None, :] * v, 0.0)
        coef = acc
    slot = tl.load(pos_ptr + c * 64 + g)  # [64] output slot of each channel id, -1 = removed
    if USE_SEED:
        coef = _signed(coef, key, m, c * 64 + g, bi, bj)
    if USE_NOISE:  # after the sign flip (fastmix/ops/noise.py)
        coef = coef + _noise(nkey, m, (c * 64 + g)[None, :], bi[:, None], bj[:, None], nscale_ptr, ntable_ptr, NSHIFT)
    if PIXELS:
        coef = tl.where(slot[None, :] >= 0, coef, 0.0)
        px = tl.dot(coef, _kron8(a_ptr, b_ptr, False), input_precision=PREC)
        tl.store(out_ptr + (m * C + c) * HW + poff, _cast_out(px, out_ptr, RNE_BF16), mask=pmask)
    else:
        optr = out_ptr + (m * n_kept + slot[None, :]) * HbWb + L[:, None]
        tl.store(optr, _cast_out(coef, out_ptr, RNE_BF16), mask=pmask & (slot[None, :] >= 0))


@triton.jit
def _gather_pair_load(grad_ptr, w_ptr, e, ok, K, CW, cw, n_kept, HbWb, slot, L, tmask, g, PER_IMAGE: tl.constexpr):
    """Pair e = m*k + t of the gather backward (ok: a real pair, not the tail of a chunk): its weight (scalar,
    or the [64] row of per-frequency weights), whether it is live (non-zero weight) and output m's gradient
    tile in the channel layout, masked by keep (tmask); a zero-weight pair is masked off (no read; its
    gradient terms are exact zeros), as in the forward."""
    m = e // K
    if PER_IMAGE:
        w = tl.load(w_ptr + e, mask=ok, other=0.0)
        live = _nonzero(w)
    else:
        w = tl.load(w_ptr + (e * CW + cw) * 64 + g, mask=ok, other=0.0)
        live = tl.max((w != 0).to(tl.int32), axis=0) > 0
    gptr = grad_ptr + (m * n_kept + slot[None, :]) * HbWb + L[:, None]
    gm = tl.load(gptr, mask=_masked_if(tmask, live), other=0.0).to(tl.float32)
    return w, live, gm


@triton.jit
def _gather_pair_sum(gs, gm, w, live, ok, e, xc, gwp_ptr, key, K, C, c, g, bi, bj, tile, n_tiles,
                     PER_IMAGE: tl.constexpr, USE_SEED: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr):
    """Adds pair e's term to the x-gradient tile gs (returned) and stores its weight-gradient partial."""
    if USE_SEED:
        gm = _signed(gm, key, e // K, c * 64 + g, bi, bj)
    if PER_IMAGE:
        if NEED_X:
            gs += w * gm
        if NEED_W:
            # zero weight: exactly zero gradient, even where x_n holds NaN (0 * NaN would leak)
            part = tl.sum(tl.sum(gm * xc, axis=1), axis=0)
            tl.store(gwp_ptr + (e * C + c) * n_tiles + tile, tl.where(live, part, 0.0), mask=ok)
    else:
        nz = w[None, :] != 0
        if NEED_X:
            gs += tl.where(nz, w[None, :] * gm, 0.0)
        if NEED_W:
            part = tl.sum(tl.where(nz, gm * xc, 0.0), axis=0)  # [64]
            tl.store(gwp_ptr + ((e * C + c) * n_tiles + tile) * 64 + g, part, mask=ok)
    return gs


@triton.jit
def _mix_bwd_dct_kernel(
    grad_ptr, x_ptr, w_ptr, order_ptr, offs_ptr, pos_ptr, a_ptr, b_ptr, gx_ptr, gwp_ptr,
    C, HW, W, Wb, HbWb, K, CW, n_kept, n_tiles, key, N,
    PER_IMAGE: tl.constexpr, USE_SEED: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr,
    ROW_FASTEST: tl.constexpr, CHUNK: tl.constexpr, RNE_BF16: tl.constexpr, BL: tl.constexpr, PREC: tl.constexpr,
):
    # One program: image n, colour c, BL blocks. Gathers the gradient of every output that reads n (pairs
    # e = m*k + t from the inverse index, in ascending e: a fixed summation order), so no two programs
    # write the same element: deterministic, no atomics. grad is in the channel layout (M, n_kept, Hb, Wb);
    # a pixels gradient is transformed to it by the launcher (a tl.dot inside this loop made the fp32
    # "ieee" product spill registers).
    tile, c, n = _program_tile(n_tiles, C, N, ROW_FASTEST)
    L, lmask, bi, bj, g, poff = _tile_coords(tile, W, Wb, HbWb, BL)
    pmask = lmask[:, None]
    slot = tl.load(pos_ptr + c * 64 + g)
    keep = slot[None, :] >= 0
    if NEED_W:
        # d loss / d w[m, t] = <G_m, DCT(x_n)> over the blocks: transform this tile of x_n once.
        xt = tl.load(x_ptr + (n * C + c) * HW + poff, mask=pmask, other=0.0).to(tl.float32)
        xc = tl.dot(xt, _kron8(a_ptr, b_ptr, True), input_precision=PREC)
    else:
        xc = 0.0  # never read without NEED_W
    cw = tl.where(CW == 1, 0, c)
    gs = tl.zeros([BL, 64], dtype=tl.float32)
    q0 = tl.load(offs_ptr + n)
    q1 = tl.load(offs_ptr + n + 1)
    tmask = pmask & keep
    if CHUNK > 0:
        # CHUNK pairs at a time, each phase for all of them before the next: their order entries, then their
        # weights and gradient tiles (in flight together), then the sums in ascending e as the loop below.
        # That loop is a dependent chain per pair (sm_90 SASS: order entry -> weight -> gradient tile, whose
        # mask is the weight's), about 3k memory round trips per program; a chunk takes 3. The stores of the
        # weight-gradient partials would also keep the compiler from moving later pairs' loads above them.
        for q in range(q0, q1, CHUNK):
            es = ()
            oks = ()
            for u in tl.static_range(CHUNK):
                ok = q + u < q1
                es = es + (tl.load(order_ptr + q + u, mask=ok, other=0),)
                oks = oks + (ok,)
            ws = ()
            lives = ()
            gms = ()
            for u in tl.static_range(CHUNK):
                w, live, gm = _gather_pair_load(grad_ptr, w_ptr, es[u], oks[u], K, CW, cw, n_kept, HbWb, slot, L,
                                                tmask, g, PER_IMAGE)
                ws = ws + (w,)
                lives = lives + (live,)
                gms = gms + (gm,)
            for u in tl.static_range(CHUNK):
                gs = _gather_pair_sum(gs, gms[u], ws[u], lives[u], oks[u], es[u], xc, gwp_ptr, key, K, C, c, g, bi,
                                      bj, tile, n_tiles, PER_IMAGE, USE_SEED, NEED_X, NEED_W)
    else:
        for q in range(q0, q1):
            e = tl.load(order_ptr + q)
            w, live, gm = _gather_pair_load(grad_ptr, w_ptr, e, True, K, CW, cw, n_kept, HbWb, slot, L, tmask, g,
                                            PER_IMAGE)
            gs = _gather_pair_sum(gs, gm, w, live, True, e, xc, gwp_ptr, key, K, C, c, g, bi, bj, tile, n_tiles,
                                  PER_IMAGE, USE_SEED, NEED_X, NEED_W)
    if NEED_X:
        dx = tl.dot(gs, _kron8(a_ptr, b_ptr, False), input_precision=PREC)
        tl.store(gx_ptr + (n * C + c) * HW + poff, _cast_out(dx, gx_ptr, RNE_BF16), mask=pmask)


@triton.jit
def _mix_bwd_x_atomic_kernel(
    grad_ptr, idx_ptr, w_ptr, pos_ptr, a_ptr, b_ptr, gx_ptr,
    N, C, HW, W, Wb, HbWb, K, CW, n_kept, n_tiles, key, M,
    PER_IMAGE: tl.constexpr, USE_SEED: tl.constexpr, ROW_FASTEST: tl.constexpr,
    BL: tl.constexpr, PREC: tl.constexpr,
):
    # Atomic variant of the x gradient (plain DCT geometry): one program per output m reads G_m once and
    # adds w * A^T G B into the fp32 gradient of each partner with atomics. Fewer bytes read than the
    # gather (grad once instead of k times) but the summation order varies from run to run.
    tile, c, m = _program_tile(n_tiles, C, M, ROW_FASTEST)
    L, lmask, bi, bj, g, poff = _tile_coords(tile, W, Wb, HbWb, BL)
    pmask = lmask[:, None]
    slot = tl.load(pos_ptr + c * 64 + g)
    gptr = grad_ptr + (m * n_kept + slot[None, :]) * HbWb + L[:, None]
    gm = tl.load(gptr, mask=pmask & (slot[None, :] >= 0), other=0.0).to(tl.float32)
    if USE_SEED:
        gm = _signed(gm, key, m, c * 64 + g, bi, bj)
    kinv = _kron8(a_ptr, b_ptr, False)
    if PER_IMAGE:
        dp = tl.dot(gm, kinv, input_precision=PREC)
        for t in range(K):
            wt = tl.load(w_ptr + m * K + t)
            n = tl.load(idx_ptr + m * K + t)
            live = _nonzero(wt) & (n >= 0) & (n < N)
            tl.atomic_add(gx_ptr + (n * C + c) * HW + poff, wt * dp, mask=_masked_if(pmask, live), sem="relaxed")
    else:
        cw = tl.where(CW == 1, 0, c)
        for t in range(K):
            wr = tl.load(w_ptr + ((m * K + t) * CW + cw) * 64 + g)
            n = tl.load(idx_ptr + m * K + t)
            live = (tl.max((wr != 0).to(tl.int32), axis=0) > 0) & (n >= 0) & (n < N)
            dp = tl.dot(tl.where(wr[None, :] != 0, wr[None, :] * gm, 0.0), kinv, input_precision=PREC)
            tl.atomic_add(gx_ptr + (n * C + c) * HW + poff, dp, mask=_masked_if(pmask, live), sem="relaxed")


# ----------------------------------------------------------------------------------------------------
# Kernels: resampling geometry ([BL, 8, 8] tiles, separable broadcast FMAs)
# ----------------------------------------------------------------------------------------------------


@triton.jit
def _block_coords(tile, Wb, HbWb, rs_ptr, cs_ptr, W, BL: tl.constexpr):
    """Per-block values of one tile as [BL, 1, 1] tensors: block id, mask, block row / column, patch
    origin in the plane; and the rows 8I + u [BL, 8, 1] / 8J + v [BL, 1, 8] of the geometry matrices.

    Everything in the resampling kernels is a 3-D tensor that broadcasts against the [BL, 8, 8]
    coefficient tile, so Triton gives all of them one parent layout: a [BL] or [BL, 8] intermediate
    would be converted between layouts through shared memory at every step of the unrolled loops
    (15 conversions per program in the compiled sm_90 code before this was 3-D).
    """
    L = tile * BL + tl.arange(0, BL)[:, None, None]
    lmask = L < HbWb
    bi = L // Wb
    bj = L % Wb
    r0 = tl.load(rs_ptr + bi, mask=lmask, other=0).to(tl.int32)
    s0 = tl.load(cs_ptr + bj, mask=lmask, other=0).to(tl.int32)
    k8 = tl.arange(0, 8)
    arow = bi * 8 + k8[None, :, None]
    brow = bj * 8 + k8[None, None, :]
    return L, lmask, bi, bj, r0 * W + s0, arow, brow


@triton.jit
def _used(ru_ptr, cu_ptr, bi, bj, lmask, a, b, RA: tl.constexpr, RB: tl.constexpr):
    """[BL, 1, 1]: patch pixel (a, b) has a non-zero coefficient in block (bi, bj). Patches are R wide for
    every block, so some blocks' patches hold pixels their bilinear rows never touch (all-zero columns of
    A_I / B_J); those are masked off, never multiplied by zero, so NaN / Inf reach exactly the blocks
    they touch (0 * NaN would spread them)."""
    ua = tl.load(ru_ptr + bi * RA + a, mask=lmask, other=0) != 0
    ub = tl.load(cu_ptr + bj * RB + b, mask=lmask, other=0) != 0
    return ua & ub


@triton.jit
def _patch_transform(src_ptr, porg, W, lmask, arow, brow, a_ptr, b_ptr, ru_ptr, cu_ptr, bi, bj,
                     RA: tl.constexpr, RB: tl.constexpr, BL: tl.constexpr):
    """A_I @ P @ B_J^T for the BL patches at src_ptr + porg: [BL, 8, 8] (u, v), float32.

    Separable: T_a[L, v] = sum_b P[L, a, b] B[v, b], then C[L, u, v] += A[u, a] T_a[L, v], statically
    unrolled over the patch so that every operand is a register vector (patch values are loaded one
    (a, b) at a time: for upsample 8 neighbouring blocks read neighbouring pixels, so these loads coalesce).
    """
    ct = tl.zeros([BL, 8, 8], dtype=tl.float32)
    for a in tl.static_range(RA):
        ta = tl.zeros([BL, 1, 8], dtype=tl.float32)
        for b in tl.static_range(RB):
            used = _used(ru_ptr, cu_ptr, bi, bj, lmask, a, b, RA, RB)
            p = tl.load(src_ptr + porg + (a * W + b), mask=lmask & used, other=0.0).to(tl.float32)  # [BL, 1, 1]
            bb = tl.load(b_ptr + brow * RB + b, mask=lmask, other=0.0)  # [BL, 1, 8] B[J, v, b]
            ta += p * bb
        aa = tl.load(a_ptr + arow * RA + a, mask=lmask, other=0.0)  # [BL, 8, 1] A[I, u, a]
        ct += aa * ta
    return ct


@triton.jit
def _mixed_patch_transform(x_ptr, idx_ptr, w_ptr, m, c, N, C, HW, W, porg, lmask, arow, brow, a_ptr, b_ptr,
                           ru_ptr, cu_ptr, bi, bj, RA: tl.constexpr, RB: tl.constexpr, KS: tl.constexpr,
                           BL: tl.constexpr):
    """A_I @ (sum_t w_t P_t) @ B_J^T for per-image weights and a static partner count KS: [BL, 8, 8].

    Everything that does not depend on the patch pixel is read once: the KS weights, partner bases and
    liveness (uniform scalars and one [BL, 1, 1] offset each), the used-pixel masks and the B_J rows. The
    RA * RB * KS pixel loads are then independent of each other (no load -> address -> load chains as in a
    run-time partner loop), so they are all in flight together.
    """
    ws, planes, lives = _static_partners(x_ptr, idx_ptr, w_ptr, m, c, N, C, HW, KS)
    ua = ()
    for a in tl.static_range(RA):
        ua = ua + (tl.load(ru_ptr + bi * RA + a, mask=lmask, other=0) != 0,)
    ubs = ()
    bbs = ()
    for b in tl.static_range(RB):
        ubs = ubs + (tl.load(cu_ptr + bj * RB + b, mask=lmask, other=0) != 0,)
        bbs = bbs + (tl.load(b_ptr + brow * RB + b, mask=lmask, other=0.0),)  # [BL, 1, 8] B[J, v, b]
    acc = tl.zeros([BL, 8, 8], dtype=tl.float32)
    for a in tl.static_range(RA):
        ta = tl.zeros([BL, 1, 8], dtype=tl.float32)
        for b in tl.static_range(RB):
            used = lmask & ua[a] & ubs[b]
            p = tl.zeros([BL, 1, 1], dtype=tl.float32)
            for t in tl.static_range(KS):
                v = tl.load(planes[t] + porg + (a * W + b), mask=_masked_if(used, lives[t]), other=0.0)
                p += ws[t] * v.to(tl.float32)
            ta += p * bbs[b]
        aa = tl.load(a_ptr + arow * RA + a, mask=lmask, other=0.0)  # [BL, 8, 1] A[I, u, a]
        acc += aa * ta
    return acc


@triton.jit
def _mix_fwd_kernel(
    x_ptr, idx_ptr, w_ptr, pos_ptr, a_ptr, rs_ptr, b_ptr, cs_ptr, ru_ptr, cu_ptr, plane_ptr, out_ptr,
    nscale_ptr, ntable_ptr,
    N, C, HW, W, Wb, HbWb, K, CW, n_kept, n_tiles, key, nkey,
    RA: tl.constexpr, RB: tl.constexpr, PER_IMAGE: tl.constexpr, USE_SEED: tl.constexpr,
    KS: tl.constexpr, PLANES: tl.constexpr, PREMIXED: tl.constexpr, RNE_BF16: tl.constexpr, BL: tl.constexpr,
    USE_NOISE: tl.constexpr = False, NSHIFT: tl.constexpr = 16,
):
    # One program: output m, colour c, BL blocks (consecutive along the (Hb, Wb) plane, so each channel's
    # store is a contiguous run of BL values). KS > 0: per-image weights with K == KS partners, unrolled
    # (_mixed_patch_transform); KS == 0: a run-time loop over the K partners. PLANES: the 64 per-(m, channel)
    # hash words of this program are read from plane_ptr (sign_planes) instead of being hashed again by
    # every thread (each thread holds all 64 coefficients of its block, so each would hash all 64).
    tile, c, m = _program_tile(n_tiles, C, 0, False)  # tile fastest: see CONFIG['dct_order']
    L, lmask, bi, bj, porg, arow, brow = _block_coords(tile, Wb, HbWb, rs_ptr, cs_ptr, W, BL)
    k8 = tl.arange(0, 8)
    f3 = k8[None, :, None] * 8 + k8[None, None, :]  # [1, 8, 8] coefficient id u*8 + v
    if PER_IMAGE and KS > 0:
        acc = _mixed_patch_transform(x_ptr, idx_ptr, w_ptr, m, c, N, C, HW, W, porg, lmask, arow, brow, a_ptr,
                                     b_ptr, ru_ptr, cu_ptr, bi, bj, RA, RB, KS, BL)
    elif PER_IMAGE:
        acc = tl.zeros([BL, 8, 8], dtype=tl.float32)
        # Mix the k patches first (per pixel of the patch), transform once.
        for a in tl.static_range(RA):
            ta = tl.zeros([BL, 1, 8], dtype=tl.float32)
            for b in tl.static_range(RB):
                p = tl.zeros([BL, 1, 1], dtype=tl.float32)
                used = _used(ru_ptr, cu_ptr, bi, bj, lmask, a, b, RA, RB)
                for t in range(K):
                    wt = tl.load(w_ptr + m * K + t)
                    n = tl.load(idx_ptr + m * K + t)
                    live = _nonzero(wt) & (n >= 0) & (n < N)
                    v = tl.load(x_ptr + (n * C + c) * HW + porg + (a * W + b), mask=_masked_if(lmask & used, live), other=0.0)
                    p += wt * v.to(tl.float32)
                bb = tl.load(b_ptr + brow * RB + b, mask=lmask, other=0.0)
                ta += p * bb
            aa = tl.load(a_ptr + arow * RA + a, mask=lmask, other=0.0)
            acc += aa * ta
    else:
        acc = tl.zeros([BL, 8, 8], dtype=tl.float32)
        cw = tl.where(CW == 1, 0, c)
        for t in range(K):
            w3 = tl.load(w_ptr + ((m * K + t) * CW + cw) * 64 + f3)  # [1, 8, 8]
            n = tl.load(idx_ptr + m * K + t)
            live = (tl.max(tl.max(tl.max((w3 != 0).to(tl.int32), axis=2), axis=1), axis=0) > 0) & (n >= 0) & (n < N)
            ct = _patch_transform(x_ptr + (n * C + c) * HW, porg, W, _masked_if(lmask, live), arow, brow, a_ptr, b_ptr,
                                  ru_ptr, cu_ptr, bi, bj, RA, RB, BL)
            acc += tl.where(w3 != 0, w3 * ct, 0.0)
    slot3 = tl.load(pos_ptr + c * 64 + f3)  # [1, 8, 8]
    if USE_SEED:
        if PLANES:
            word = tl.load(plane_ptr + m * (C * 64) + c * 64 + f3).to(tl.uint32, bitcast=True)
            if PREMIXED:
                acc = _apply_sign_premixed(acc, word, bi, bj)
            else:
                acc = _apply_sign(acc, word, bi, bj)
        else:
            acc = _apply_sign(acc, _plane_hash(key, m, c * 64 + f3), bi, bj)
    if USE_NOISE:  # after the sign flip (fastmix/ops/noise.py)
        acc = acc + _noise(nkey, m, c * 64 + f3, bi, bj, nscale_ptr, ntable_ptr, NSHIFT)
    optr = out_ptr + (m * n_kept + slot3) * HbWb + L
    tl.store(optr, _cast_out(acc, out_ptr, RNE_BF16), mask=lmask & (slot3 >= 0))


@triton.jit
def _adjoint_store(g3, dst_ptr, L, lmask, arow, brow, a_ptr, b_ptr, ru_ptr, cu_ptr, bi, bj, HbWb,
                   RA: tl.constexpr, RB: tl.constexpr):
    """dP[L, a, b] = sum_{u, v} A_I[u, a] G[L, u, v] B_J[v, b], stored at dst + (a*RB + b) * HbWb + L.

    3-D throughout (see _block_coords); the block axis L is the one spread over threads, so the two
    reductions over u and v stay inside a thread's registers."""
    for b in tl.static_range(RB):
        bb = tl.load(b_ptr + brow * RB + b, mask=lmask, other=0.0)  # [BL, 1, 8] B[J, v, b]
        wu = tl.sum(g3 * bb, axis=2, keep_dims=True)  # [BL, 8, 1] (u)
        for a in tl.static_range(RA):
            aa = tl.load(a_ptr + arow * RA + a, mask=lmask, other=0.0)  # [BL, 8, 1] A[I, u, a]
            dp = tl.sum(wu * aa, axis=1, keep_dims=True)  # [BL, 1, 1]
            dp = tl.where(_used(ru_ptr, cu_ptr, bi, bj, lmask, a, b, RA, RB), dp, 0.0)  # untouched pixel: exact 0
            tl.store(dst_ptr + (a * RB + b) * HbWb + L, dp, mask=lmask)


@triton.jit
def _mix_bwd_adj_kernel(
    grad_ptr, x_ptr, idx_ptr, w_ptr, pos_ptr, a_ptr, rs_ptr, b_ptr, cs_ptr, ru_ptr, cu_ptr, t_ptr, gwp_ptr,
    N, C, HW, W, Wb, HbWb, K, CW, n_kept, n_tiles, key,
    RA: tl.constexpr, RB: tl.constexpr, PER_IMAGE: tl.constexpr, USE_SEED: tl.constexpr,
    WRITE_T: tl.constexpr, NEED_W: tl.constexpr, BL: tl.constexpr,
):
    # Pass 1 of the resampling backward. One program: output m, colour c, BL blocks. Reads the channel
    # gradient once (the dominant traffic of the whole backward) and writes each block's patch gradient
    # A_I^T G B_J (RA x RB values) to T[(m or m*k+t), c, a*RB + b, L] (contiguous along L).
    tile, c, m = _program_tile(n_tiles, C, 0, False)  # tile fastest: see CONFIG['dct_order']
    L, lmask, bi, bj, porg, arow, brow = _block_coords(tile, Wb, HbWb, rs_ptr, cs_ptr, W, BL)
    k8 = tl.arange(0, 8)
    f3 = k8[None, :, None] * 8 + k8[None, None, :]
    slot3 = tl.load(pos_ptr + c * 64 + f3)
    gptr = grad_ptr + (m * n_kept + slot3) * HbWb + L
    g3 = tl.load(gptr, mask=lmask & (slot3 >= 0), other=0.0).to(tl.float32)  # [BL, 8, 8]
    if USE_SEED:
        g3 = _apply_sign(g3, _plane_hash(key, m, c * 64 + f3), bi, bj)
    tsz = RA * RB * HbWb
    if PER_IMAGE:
        _adjoint_store(g3, t_ptr + (m * C + c) * tsz, L, lmask, arow, brow, a_ptr, b_ptr, ru_ptr, cu_ptr, bi, bj,
                       HbWb, RA, RB)
    else:
        cw = tl.where(CW == 1, 0, c)
        for t in range(K):
            e = m * K + t
            w3 = tl.load(w_ptr + (e * CW + cw) * 64 + f3)
            nz = w3 != 0
            if WRITE_T:
                gt = tl.where(nz, w3 * g3, 0.0)
                _adjoint_store(gt, t_ptr + (e * C + c) * tsz, L, lmask, arow, brow, a_ptr, b_ptr, ru_ptr, cu_ptr,
                               bi, bj, HbWb, RA, RB)
            if NEED_W:
                n = tl.load(idx_ptr + e)
                live = (n >= 0) & (n < N)
                ct = _patch_transform(x_ptr + (n * C + c) * HW, porg, W, _masked_if(lmask, live), arow, brow, a_ptr,
                                      b_ptr, ru_ptr, cu_ptr, bi, bj, RA, RB, BL)
                part = tl.sum(tl.where(nz, g3 * ct, 0.0), axis=0)  # [8, 8]
                tl.store(gwp_ptr + ((e * C + c) * n_tiles + tile) * 64 + k8[:, None] * 8 + k8[None, :], part)


@triton.jit
def _mix_bwd_fold_kernel(
    t_ptr, z_ptr, rs_ptr, cs_ptr, ilo_ptr, ihi_ptr, jlo_ptr, jhi_ptr, span_ptr,
    H, W, Wb, HbWb, n_ytiles, n_xtiles,
    RA: tl.constexpr, RB: tl.constexpr, BY: tl.constexpr, BX: tl.constexpr,
):
    # Pass 2: Z[p, y, x] = sum of the patch gradients of the blocks whose patch covers (y, x). Blocks
    # covering row y are I in [ilo[y], ihi[y]] (block starts are nondecreasing), likewise for columns;
    # span = (max rows count, max columns count) bounds the two loops. A gather: deterministic, and each
    # patch value is read once.
    pid = tl.program_id(0)
    xt = pid % n_xtiles
    rest = pid // n_xtiles
    yt = rest % n_ytiles
    p = (rest // n_ytiles).to(tl.int64)  # plane (e, c)
    y = yt * BY + tl.arange(0, BY)
    x = xt * BX + tl.arange(0, BX)
    ym = y < H
    xm = x < W
    ilo = tl.load(ilo_ptr + y, mask=ym, other=0)
    ihi = tl.load(ihi_ptr + y, mask=ym, other=-1)
    jlo = tl.load(jlo_ptr + x, mask=xm, other=0)
    jhi = tl.load(jhi_ptr + x, mask=xm, other=-1)
    nspan_i = tl.load(span_ptr)
    nspan_j = tl.load(span_ptr + 1)
    src = t_ptr + p * (RA * RB * HbWb)
    acc = tl.zeros([BY, BX], dtype=tl.float32)
    for i in range(0, nspan_i):
        bi = ilo + i
        iv = ym & (bi <= ihi)
        ra = y - tl.load(rs_ptr + bi, mask=iv, other=0).to(tl.int32)
        iv = iv & (ra >= 0) & (ra < RA)
        for j in range(0, nspan_j):
            bj = jlo + j
            jv = xm & (bj <= jhi)
            sb = x - tl.load(cs_ptr + bj, mask=jv, other=0).to(tl.int32)
            jv = jv & (sb >= 0) & (sb < RB)
            off = (ra[:, None] * RB + sb[None, :]) * HbWb + (bi * Wb)[:, None] + bj[None, :]
            acc += tl.load(src + off, mask=iv[:, None] & jv[None, :], other=0.0)
    tl.store(z_ptr + p * (H * W) + y[:, None] * W + x[None, :], acc, mask=ym[:, None] & xm[None, :])


@triton.jit
def _mix_bwd_x_kernel(
    z_ptr, x_ptr, w_ptr, order_ptr, offs_ptr, gx_ptr, gwp_ptr,
    C, HW, K, n_ptiles,
    PER_IMAGE: tl.constexpr, NEED_X: tl.constexpr, NEED_W: tl.constexpr, RNE_BF16: tl.constexpr, BP: tl.constexpr,
):
    # Pass 3: image n, colour c, BP pixels: gx = sum over the pairs of n of w * Z_m (per image) or Z_e
    # (per frequency: weights applied in pass 1). Per-image weight gradient: <Z_m, x_n>.
    pid = tl.program_id(0)
    pt = pid % n_ptiles
    nc = pid // n_ptiles
    c = nc % C
    n = (nc // C).to(tl.int64)
    pix = pt * BP + tl.arange(0, BP)
    pm = pix < HW
    if NEED_W:
        xv = tl.load(x_ptr + (n * C + c) * HW + pix, mask=pm, other=0.0).to(tl.float32)
    acc = tl.zeros([BP], dtype=tl.float32)
    q0 = tl.load(offs_ptr + n)
    q1 = tl.load(offs_ptr + n + 1)
    for q in range(q0, q1):
        e = tl.load(order_ptr + q)
        if PER_IMAGE:
            wt = tl.load(w_ptr + e)
            zv = tl.load(z_ptr + ((e // K) * C + c) * HW + pix, mask=_masked_if(pm, _nonzero(wt)), other=0.0)
            if NEED_X:
                acc += wt * zv
            if NEED_W:  # zero weight: exactly zero gradient, even where x_n holds NaN
                part = tl.sum(zv * xv, axis=0)
                tl.store(gwp_ptr + (e * C + c) * n_ptiles + pt, tl.where(_nonzero(wt), part, 0.0))
        else:
            acc += tl.load(z_ptr + (e * C + c) * HW + pix, mask=pm, other=0.0)
    if NEED_X:
        tl.store(gx_ptr + (n * C + c) * HW + pix, _cast_out(acc, gx_ptr, RNE_BF16), mask=pm)


# ----------------------------------------------------------------------------------------------------
# Launchers
# ----------------------------------------------------------------------------------------------------


def is_dct_geometry(h: int, w: int, row_mat: torch.Tensor, col_mat: torch.Tensor) -> bool:
    """True for the plain 8x8 DCT geometry, decided from shapes alone (no host sync).

    8x8 patches on an (H/8, W/8) grid of blocks is what fastmix builds for freq_mix and for the frontend
    with upsample 1 (fastmix.ops.freq_mix.dct_geometry: A_I = B_J = D, starts 8I, 8J); the ``*_dct``
    kernels then use row_mat[0] and col_mat[0] for every block. Any other geometry (the frontend's
    resampling) takes the per-block kernels.
    """
    return (row_mat.shape[2] == BLOCK and col_mat.shape[2] == BLOCK
            and row_mat.shape[0] * BLOCK == h and col_mat.shape[0] * BLOCK == w)


def _check_geometry(x, row_mat, row_start, col_mat, col_start):
    h, w = x.shape[2], x.shape[3]
    for mat, start, extent, what in ((row_mat, row_start, h, "row"), (col_mat, col_start, w, "col")):
        if mat.dim() != 3 or mat.shape[1] != BLOCK or not 1 <= mat.shape[2] <= BLOCK:
            raise ValueError(f"mix: {what} matrix must be (nb, 8, R) with 1 <= R <= 8, got {tuple(mat.shape)}")
        if start.dim() != 1 or start.shape[0] != mat.shape[0]:
            raise ValueError(f"mix: {what} start must be ({mat.shape[0]},), got {tuple(start.shape)}")
        if mat.shape[2] > extent:
            raise ValueError(f"mix: {what} patches of {mat.shape[2]} pixels do not fit an image of {extent}")
    check_plane(h, w)
    check_plane(row_mat.shape[0], col_mat.shape[0])


def _weights(weight: torch.Tensor, m: int, k: int):
    """fp32 contiguous weights, per-image flag and Cw (colours of per-frequency weights)."""
    per_image = weight.dim() == 2
    cw = 1 if per_image else weight.shape[2]
    return weight.to(torch.float32).contiguous(), per_image, cw


def _f32(t: torch.Tensor) -> torch.Tensor:
    return t.to(torch.float32).contiguous()


def _used_pixels(mat: torch.Tensor) -> torch.Tensor:
    """(nb * R,) int8: patch pixel a of block i has a non-zero coefficient (column a of mat[i] != 0)."""
    return (mat != 0).any(dim=1).to(torch.int8).reshape(-1).contiguous()


MAX_STATIC_K = 8  # partner counts up to this are unrolled in the forward (fwd_static_k, fwd_dct_static_k)


def mix_forward(x, index, weight, pos, n_kept, seed, use_seed, pixels, row_mat, row_start, col_mat, col_start,
                out_dtype=None, noise_scale=None, noise_table=None, noise_seed=0):
    """Launch the forward kernel of the geometry. Arguments as fastmix::mix_fwd (csrc/fastmix.cpp)."""
    interpreter_compat()
    n, c, h, w = x.shape
    m, k = index.shape
    hb, wb = row_mat.shape[0], col_mat.shape[0]
    od = x.dtype if out_dtype is None else out_dtype
    shape = (m, c, h, w) if pixels else (m, n_kept, hb, wb)
    _check_geometry(x, row_mat, row_start, col_mat, col_start)
    dct = is_dct_geometry(h, w, row_mat, col_mat)
    if pixels and not dct:
        raise ValueError("mix: the pixels output needs the plain 8x8 DCT geometry")
    if m == 0 or n == 0 or c == 0 or h == 0 or w == 0 or (not pixels and n_kept == 0):
        return torch.zeros(shape, dtype=od, device=x.device)
    out = torch.empty(shape, dtype=od, device=x.device)
    w32, per_image, cw = _weights(weight, m, k)
    idx = index.contiguous()
    posc = pos.to(torch.int32).contiguous()
    key = kernel_key(seed) if use_seed else 0
    use_noise = noise_table is not None
    if use_noise:
        _check_noise_args(noise_scale, noise_table, noise_seed, c)
        nscale, ntable = noise_scale.to(torch.float32).contiguous(), noise_table.contiguous()
        nkey, nshift = noise_kernel_key(noise_seed), table_shift(noise_table)
    else:
        nscale = ntable = posc  # unread placeholders
        nkey, nshift = 0, 16
    xc = x.contiguous()
    # freq_mix with per-image weights and a channels output can also run on the resampling kernel (its
    # geometry is then A_I = B_J = D, R = 8): one block per thread, the transform as FMAs in registers.
    route_dot = not (option("fwd_dct_route") == "resampling" and per_image and not pixels)
    if dct and route_dot:
        prec = dot_precision(x.dtype)
        coef_in = (not per_image) and option("fwd_per_freq") == "precompute"
        fused_pf = not per_image and not coef_in
        bl, nw = tile_config("fwd_dct_fused_pf" if fused_pf else "fwd_dct", prec)
        n_tiles = triton.cdiv(hb * wb, bl)
        # Per-frequency weights: transform each image once (one pass over x, written in the channel layout)
        # instead of every partner of every output (k tl.dot per tile).
        src = block_dct_forward(xc, False, channels=True, out_dtype=torch.float32) if coef_in else xc
        ks = k if per_image and CONFIG["fwd_dct_static_k"] and k <= MAX_STATIC_K else 0
        _mix_fwd_dct_kernel[(m * c * n_tiles,)](
            src, idx, w32, posc, _f32(row_mat[0]), _f32(col_mat[0]), out, nscale, ntable,
            n, c, h * w, w, wb, hb * wb, k, cw, n_kept, n_tiles, key, m, nkey,
            PER_IMAGE=per_image, PIXELS=bool(pixels), USE_SEED=bool(use_seed), COEF_IN=coef_in, KS=ks,
            ROW_FASTEST=row_fastest(), RNE_BF16=rne_bf16(), BL=bl, PREC=prec, USE_NOISE=use_noise, NSHIFT=nshift,
            num_warps=nw,
        )
    else:
        bl = CONFIG["fwd_blocks"]
        n_tiles = triton.cdiv(hb * wb, bl)
        ru, cu = _used_pixels(row_mat), _used_pixels(col_mat)
        # One compiled variant per partner count (k is 1 without mixing, 2..6 for the hybrid mask).
        ks = k if per_image and CONFIG["fwd_static_k"] and k <= MAX_STATIC_K else 0
        planes = bool(use_seed) and CONFIG["fwd_sign_table"]
        premixed = CONFIG["fwd_sign_premixed"]
        plane_t = sign_planes(key, m, c * 64, x.device, premixed) if planes else posc  # posc: an unread placeholder
        _mix_fwd_kernel[(m * c * n_tiles,)](
            xc, idx, w32, posc, _f32(row_mat), row_start.contiguous(), _f32(col_mat), col_start.contiguous(), ru, cu,
            plane_t, out, nscale, ntable, n, c, h * w, w, wb, hb * wb, k, cw, n_kept, n_tiles, key, nkey,
            RA=row_mat.shape[2], RB=col_mat.shape[2], PER_IMAGE=per_image, USE_SEED=bool(use_seed),
            KS=ks, PLANES=planes, PREMIXED=premixed, RNE_BF16=rne_bf16(), BL=bl, USE_NOISE=use_noise, NSHIFT=nshift,
            num_warps=CONFIG["fwd_warps"],
        )
    return out


def _check_noise_args(scale, table, seed, c):
    """The C++ op's checks of the noise arguments (fastmix.ops.noise.check_noise gives users friendlier ones)."""
    size = table.numel()
    bits = size.bit_length() - 1
    if table.dtype != torch.float32 or table.dim() != 1 or size != 1 << bits or not 1 <= bits <= 16:
        raise ValueError(f"mix: noise_table must be float32 (2^B,) with 1 <= B <= 16, got {table.dtype} {tuple(table.shape)}")
    if scale is None or scale.dtype != torch.float32 or tuple(scale.shape) != (c * FREQS,):
        raise ValueError(f"mix: noise_scale must be float32 ({c * FREQS},)")
    if seed < 0:
        raise ValueError("mix: noise_seed must be >= 0")


def inverse_index(index: torch.Tensor, n: int):
    """(order, offs): the pairs e = m*k + t reading image i are order[offs[i]:offs[i+1]], ascending in e.

    torch.sort (stable) and searchsorted run on index's device: no host sync, CUDA-graph capturable.
    Values outside [0, n) fall outside every range (ignored).
    """
    flat = index.reshape(-1)
    vals, order = torch.sort(flat, stable=True)
    offs = torch.searchsorted(vals, torch.arange(n + 1, device=index.device, dtype=vals.dtype))
    return order, offs


def _cover(start: torch.Tensor, r: int, extent: int):
    """For every pixel p in [0, extent): the first and last block whose patch [start, start + r) covers p,
    and the largest count; from searchsorted on the (nondecreasing) block starts, on the device."""
    s = start.to(torch.int64)
    p = torch.arange(extent, device=s.device, dtype=torch.int64)
    lo = torch.searchsorted(s + r, p, right=True)  # blocks with start + r <= p lie before
    hi = torch.searchsorted(s, p, right=True) - 1  # blocks with start <= p end here
    span = (hi - lo + 1).clamp(min=0).max().reshape(1)
    return lo.to(torch.int32), hi.to(torch.int32), span


def mix_backward(grad, x, index, weight, pos, seed, use_seed, pixels, row_mat, row_start, col_mat, col_start,
                 need_x, need_w):
    """Gradients (gx, gw) of mix_forward; empty tensors for those not asked for."""
    interpreter_compat()
    n, c, h, w = x.shape
    m, k = index.shape
    hb, wb = row_mat.shape[0], col_mat.shape[0]
    _check_geometry(x, row_mat, row_start, col_mat, col_start)
    dct = is_dct_geometry(h, w, row_mat, col_mat)
    if pixels and not dct:
        raise ValueError("mix: the pixels output needs the plain 8x8 DCT geometry")
    gx = torch.empty((n, c, h, w), dtype=x.dtype, device=x.device) if need_x else x.new_empty(0)
    gw = x.new_empty(0, dtype=weight.dtype)
    if not (need_x or need_w):
        return gx, gw
    if m == 0 or n == 0 or c == 0 or h == 0 or w == 0 or grad.numel() == 0:
        if need_x:
            gx.zero_()
        if need_w:
            gw = torch.zeros_like(weight, memory_format=torch.contiguous_format)
        return gx, gw
    w32, per_image, cw = _weights(weight, m, k)
    idx = index.contiguous()
    posc = pos.to(torch.int32).contiguous()
    key = kernel_key(seed) if use_seed else 0
    xc = x.contiguous()
    gc = grad.contiguous()
    n_kept = 0 if pixels else gc.shape[1]
    prec = dot_precision(x.dtype)
    gwp = None
    if dct:
        a0, b0 = _f32(row_mat[0]), _f32(col_mat[0])
        if pixels:
            # d pixels / d coefficients is the block inverse, whose adjoint is the block DCT: transform the
            # gradient once into the channel layout (all C*64 channels, removed ones masked through pos) and
            # run the channels path.
            gc = block_dct_forward(gc, False, channels=True, out_dtype=torch.float32)
            ids = torch.arange(c * FREQS, dtype=torch.int32, device=x.device)
            posc = torch.where(posc >= 0, ids, torch.full_like(ids, -1))
            n_kept = c * FREQS
        atomic = need_x and option("bwd_x_mode") == "atomic"
        if atomic:
            bl, nw = tile_config("bwd_x_atomic", prec)
            n_tiles = triton.cdiv(hb * wb, bl)
            gx32 = torch.zeros((n, c, h, w), dtype=torch.float32, device=x.device)
            _mix_bwd_x_atomic_kernel[(m * c * n_tiles,)](
                gc, idx, w32, posc, a0, b0, gx32,
                n, c, h * w, w, wb, hb * wb, k, cw, n_kept, n_tiles, key, m,
                PER_IMAGE=per_image, USE_SEED=bool(use_seed), ROW_FASTEST=row_fastest(),
                BL=bl, PREC=prec, num_warps=nw,
            )
            gx.copy_(gx32)
        if need_w or not atomic:
            bl, nw = tile_config("bwd_dct", prec)
            n_tiles = triton.cdiv(hb * wb, bl)
            order, offs = inverse_index(idx, n)
            if need_w:
                gwp = torch.zeros((m * k, c, n_tiles) if per_image else (m * k, c, n_tiles, FREQS),
                                  dtype=torch.float32, device=x.device)
            _mix_bwd_dct_kernel[(n * c * n_tiles,)](
                gc, xc, w32, order, offs, posc, a0, b0, gx, gwp if gwp is not None else w32,
                c, h * w, w, wb, hb * wb, k, cw, n_kept, n_tiles, key, n,
                PER_IMAGE=per_image, USE_SEED=bool(use_seed), NEED_X=bool(need_x and not atomic),
                NEED_W=bool(need_w), ROW_FASTEST=row_fastest(), CHUNK=CONFIG["bwd_gather_chunk"], RNE_BF16=rne_bf16(),
                BL=bl, PREC=prec, num_warps=nw,
            )
    else:
        ra, rb = row_mat.shape[2], col_mat.shape[2]
        am, bm = _f32(row_mat), _f32(col_mat)
        rs, cs = row_start.contiguous(), col_start.contiguous()
        bl = CONFIG["bwd_adj_blocks"]
        n_tiles = triton.cdiv(hb * wb, bl)
        # Per image, Z_m serves every partner of m: planes per output. Per frequency: planes per pair.
        planes = m if per_image else m * k
        write_t = need_x or (need_w and per_image)
        tbuf = torch.empty((planes, c, ra * rb, hb * wb), dtype=torch.float32, device=x.device) if write_t else w32
        if need_w and not per_image:
            gwp = torch.zeros((m * k, c, n_tiles, FREQS), dtype=torch.float32, device=x.device)
        ru, cu = _used_pixels(row_mat), _used_pixels(col_mat)
        _mix_bwd_adj_kernel[(m * c * n_tiles,)](
            gc, xc, idx, w32, posc, am, rs, bm, cs, ru, cu, tbuf, gwp if gwp is not None else w32,
            n, c, h * w, w, wb, hb * wb, k, cw, n_kept, n_tiles, key,
            RA=ra, RB=rb, PER_IMAGE=per_image, USE_SEED=bool(use_seed),
            WRITE_T=bool(write_t), NEED_W=bool(need_w and not per_image),
            BL=bl, num_warps=CONFIG["bwd_adj_warps"],
        )
        if write_t:
            ilo, ihi, spi = _cover(rs, ra, h)
            jlo, jhi, spj = _cover(cs, rb, w)
            span = torch.cat([spi, spj]).to(torch.int32)
            z = torch.empty((planes, c, h, w), dtype=torch.float32, device=x.device)
            by, bx = CONFIG["bwd_fold_rows"], CONFIG["bwd_fold_cols"]
            nyt, nxt = triton.cdiv(h, by), triton.cdiv(w, bx)
            _mix_bwd_fold_kernel[(planes * c * nyt * nxt,)](
                tbuf, z, rs, cs, ilo, ihi, jlo, jhi, span,
                h, w, wb, hb * wb, nyt, nxt,
                RA=ra, RB=rb, BY=by, BX=bx, num_warps=CONFIG["bwd_fold_warps"],
            )
            del tbuf
            order, offs = inverse_index(idx, n)
            bp = CONFIG["bwd_x_pixels"]
            n_pt = triton.cdiv(h * w, bp)
            gwi = need_w and per_image
            if gwi:
                gwp = torch.zeros((m * k, c, n_pt), dtype=torch.float32, device=x.device)
            _mix_bwd_x_kernel[(n * c * n_pt,)](
                z, xc, w32, order, offs, gx, gwp if gwi else w32,
                c, h * w, k, n_pt,
                PER_IMAGE=per_image, NEED_X=bool(need_x), NEED_W=bool(gwi), RNE_BF16=rne_bf16(), BP=bp,
                num_warps=CONFIG["bwd_x_warps"],
            )
    if need_w:
        if per_image:
            gw = gwp.sum(dim=(1, 2), dtype=torch.float64).reshape(m, k)
        else:
            part = gwp.sum(dim=2, dtype=torch.float64).reshape(m, k, c, FREQS)
            gw = part.sum(dim=2, keepdim=True) if cw == 1 else part
        gw = gw.to(weight.dtype)
    return gx, gw


# ----------------------------------------------------------------------------------------------------
# Op registration: custom ops with fake and autograd, so torch.compile(fullgraph=True) sees one opaque
# call per op and opcheck can test the registrations.
# ----------------------------------------------------------------------------------------------------


@torch.library.custom_op("fastmix::mix_fwd_triton", mutates_args=())
def mix_fwd_triton(
    x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor, n_kept: int, seed: int,
    use_seed: bool, pixels: bool, row_mat: torch.Tensor, row_start: torch.Tensor, col_mat: torch.Tensor,
    col_start: torch.Tensor, out_dtype: Optional[torch.dtype], noise_scale: Optional[torch.Tensor] = None,
    noise_table: Optional[torch.Tensor] = None, noise_seed: int = 0,
) -> torch.Tensor:
    return mix_forward(x, index, weight, pos, n_kept, seed, use_seed, pixels, row_mat, row_start, col_mat,
                       col_start, out_dtype, noise_scale, noise_table, noise_seed)


mix_fwd_triton.register_fake(mix_fwd_fake)


@torch.library.custom_op("fastmix::mix_bwd_triton", mutates_args=())
def mix_bwd_triton(
    grad: torch.Tensor, x: torch.Tensor, index: torch.Tensor, weight: torch.Tensor, pos: torch.Tensor, seed: int,
    use_seed: bool, pixels: bool, row_mat: torch.Tensor, row_start: torch.Tensor, col_mat: torch.Tensor,
    col_start: torch.Tensor, need_x: bool, need_w: bool,
) -> tuple[torch.Tensor, torch.Tensor]:
    return mix_backward(grad, x, index, weight, pos, seed, use_seed, pixels, row_mat, row_start, col_mat,
                        col_start, need_x, need_w)


@mix_bwd_triton.register_fake
def _(grad, x, index, weight, pos, seed, use_seed, pixels, row_mat, row_start, col_mat, col_start, need_x, need_w):
    gx = x.new_empty(x.shape) if need_x else x.new_empty(0)
    gw = weight.new_empty(weight.shape) if need_w else weight.new_empty(0)
    return gx, gw


_backward, _setup = mix_autograd(torch.ops.fastmix.mix_bwd_triton)
mix_fwd_triton.register_autograd(_backward, setup_context=_setup)
_backward, _setup = mix_bwd_autograd(torch.ops.fastmix.mix_fwd_triton, torch.ops.fastmix.mix_bwd_triton)
mix_bwd_triton.register_autograd(_backward, setup_context=_setup)


# ----------------------------------------------------------------------------------------------------
# Entry point used by fastmix.ops.freq_mix.mix_op when the backend is "triton"
# ----------------------------------------------------------------------------------------------------


def mix(x, index, weight4, pos, n_kept, seed, use_seed, pixels, row_mat, row_start, col_mat, col_start, out_dtype,
        noise_scale=None, noise_table=None, noise_seed=0):
    """The fused mix through Triton; arguments exactly those of fastmix::mix_fwd (validated by the caller).

    float64 inputs (checks, gradcheck) run mix_reference instead: exact float64 and differentiable, where
    the kernels would compute in float32.
    """
    if x.dtype == torch.float64:
        return mix_reference(x, index, weight4, pos, n_kept, seed, use_seed, pixels, row_mat, row_start, col_mat,
                             col_start, out_dtype, noise_scale, noise_table, noise_seed)
    return torch.ops.fastmix.mix_fwd_triton(
        x, index, weight4, pos, n_kept, seed, use_seed, pixels, row_mat, row_start, col_mat, col_start, out_dtype,
        noise_scale, noise_table, noise_seed,
    )
