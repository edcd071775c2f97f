"""freq_mix: every option against the float64 reference, its semantics from first principles, NaN/Inf
propagation, zero-weight skipping, views, empty batches and gradients."""
from __future__ import annotations

import itertools

import pytest
import torch
from torch.autograd import gradcheck, gradgradcheck

import fastmix
from fastmix.ops.freq_mix import freq_mix_ref
from _fastmix_testing import (
    DTYPES,
    assert_close_f64,
    assert_matches_oracle,
    dtype_id,
    rand_index,
    rand_weight,
    randn,
    run_on,
    weight4,
)

WEIGHT_KINDS = ["img", "freq", "cfreq"]
KEEP_KINDS = ["none", "bool_C64", "bool_64", "ids_tensor", "ids_list"]


def make_keep(kind: str, c: int, gen):
    if kind == "none":
        return None
    if kind == "bool_C64":
        return torch.rand(c * 64, generator=gen) < 0.4
    if kind == "bool_64":
        return torch.rand(64, generator=gen) < 0.4
    ids = torch.randperm(c * 64, generator=gen)[: max(1, c * 64 // 5)]  # unsorted on purpose
    return ids if kind == "ids_tensor" else [int(i) for i in ids]


def kept_ids(keep, c: int) -> list[int]:
    """The spec of keep, independently of fastmix: sorted kept channel ids."""
    if keep is None:
        return list(range(c * 64))
    if isinstance(keep, torch.Tensor) and keep.dtype == torch.bool:
        mask = keep.repeat(c) if keep.numel() == 64 else keep
        return mask.nonzero().flatten().tolist()
    return sorted(int(i) for i in keep)


# ----------------------------------------------------------------------------------------------------
# Against the float64 reference
# ----------------------------------------------------------------------------------------------------

_OPTION_CASES = list(itertools.product([1, 3, 4], WEIGHT_KINDS, KEEP_KINDS, [None, 987654321], ["channels", "pixels"]))


@pytest.mark.parametrize(
    "c,wkind,keepkind,seed,out",
    _OPTION_CASES,
    ids=[f"C{c}-w_{w}-keep_{kp}-seed_{s is not None}-{o}" for c, w, kp, s, o in _OPTION_CASES],
)
def test_options_against_f64_oracle(backend, gen, c, wkind, keepkind, seed, out):
    case = _OPTION_CASES.index((c, wkind, keepkind, seed, out))
    k = 1 + case % 6  # every k in 1..6 meets every option family
    h, w = [(16, 24), (24, 8), (8, 16)][case % 3]  # H != W
    n, m = 5, 7  # M != N, so some images repeat across rows (and within rows for k > 1)
    x = randn(gen, n, c, h, w, dtype=torch.float64)
    index = rand_index(gen, n, m, k)
    weight = rand_weight(gen, wkind, m, k, c, dtype=torch.float64)
    keep = make_keep(keepkind, c, gen)
    got = fastmix.freq_mix(x, index, weight, keep=keep, seed=seed, out=out)
    want = freq_mix_ref(x, index, weight, keep=keep, seed=seed, out=out)
    n_kept = len(kept_ids(keep, c))
    assert got.shape == ((m, c, h, w) if out == "pixels" else (m, n_kept, h // 8, w // 8))
    assert got.dtype == torch.float64
    assert_close_f64(got, want)


@pytest.mark.parametrize("out", ["channels", "pixels"])
@pytest.mark.parametrize("wkind", WEIGHT_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dtypes_against_f64_oracle(backend, gen, dtype, wkind, out):
    n, c, h, w, m, k = 6, 3, 16, 24, 5, 4
    x = randn(gen, n, c, h, w, dtype=dtype)
    index = rand_index(gen, n, m, k)
    weight = rand_weight(gen, wkind, m, k, c, dtype=dtype)
    keep = list(range(1, 192, 2))
    kw = dict(keep=keep, seed=5, out=out)
    got = fastmix.freq_mix(x, index, weight, **kw)
    assert got.dtype == dtype
    oracle = freq_mix_ref(x.double(), index, weight.double(), **kw)
    assert_matches_oracle(got, oracle, freq_mix_ref(x, index, weight, **kw), dtype)


@pytest.mark.parametrize("wkind", WEIGHT_KINDS)
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_gradients_against_f64_oracle(backend, gen, dtype, wkind):
    """Backward in every dtype: x.grad and weight.grad against the float64 oracle's."""
    n, c, h, w, m, k = 4, 3, 8, 16, 6, 3
    x0 = randn(gen, n, c, h, w, dtype=dtype)
    w0 = rand_weight(gen, wkind, m, k, c, dtype=dtype)
    index = rand_index(gen, n, m, k)
    kw = dict(keep=[0, 5, 64, 70, 191], seed=3)
    g = randn(gen, m, 5, h // 8, w // 8, dtype=torch.float64)

    def grads(fn, xx, ww):
        xx = xx.clone().requires_grad_()
        ww = ww.clone().requires_grad_()
        y = fn(xx, index, ww, **kw)
        (y * g.to(y.dtype)).sum().backward()
        return xx.grad, ww.grad

    gx, gw = grads(fastmix.freq_mix, x0, w0)
    assert gx.dtype == dtype and gw.dtype == dtype
    ox, ow = grads(freq_mix_ref, x0.double(), w0.double())
    tx, tw = grads(freq_mix_ref, x0, w0)
    assert_matches_oracle(gx, ox, tx, dtype, "x.grad")
    assert_matches_oracle(gw, ow, tw, dtype, "weight.grad")


# ----------------------------------------------------------------------------------------------------
# Semantics from first principles (not through freq_mix_ref)
# ----------------------------------------------------------------------------------------------------


def test_identity_mix_is_the_block_dct(backend, gen):
    x = randn(gen, 3, 2, 16, 8, dtype=torch.float64)
    index = torch.arange(3).view(3, 1)
    one = torch.ones(3, 1, dtype=torch.float64)
    z = fastmix.freq_mix(x, index, one)
    assert_close_f64(z, fastmix.to_channels(fastmix.block_dct_ref(x)), rel=1e-13)
    # pixels: the inverse of the untouched coefficients is the image itself
    assert_close_f64(fastmix.freq_mix(x, index, one, out="pixels"), x, rel=1e-13)


def test_linear_mixing_and_repeated_partners(backend, gen):
    x = randn(gen, 4, 3, 8, 16, dtype=torch.float64)
    ch = fastmix.to_channels(fastmix.block_dct_ref(x))
    index = torch.tensor([[2, 0, 3], [1, 1, 1], [3, 3, 0]])  # repeated partners; M = 3 != N = 4
    weight = torch.tensor([[0.5, -0.25, 2.0], [0.2, 0.3, 0.5], [1.0, 1.0, -3.0]], dtype=torch.float64)
    z = fastmix.freq_mix(x, index, weight)
    want = torch.stack([sum(weight[m, t] * ch[index[m, t]] for t in range(3)) for m in range(3)])
    assert_close_f64(z, want, rel=1e-13)
    # per-frequency weights: frequency f of colour c is scaled by w[m, t, c, f]
    wf = randn(torch.Generator().manual_seed(1), 3, 3, 3, 64, dtype=torch.float64)
    zf = fastmix.freq_mix(x, index, wf)
    wch = wf.reshape(3, 3, 192, 1, 1)
    want_f = torch.stack([sum(wch[m, t] * ch[index[m, t]] for t in range(3)) for m in range(3)])
    assert_close_f64(zf, want_f, rel=1e-13)


@pytest.mark.parametrize("wkind", WEIGHT_KINDS)
def test_weight_shapes_agree(backend, gen, wkind):
    """(M, k), (M, k, 64) and (M, k, C, 64) holding the same numbers give the same output."""
    x = randn(gen, 3, 3, 8, 16, dtype=torch.float64)
    index = rand_index(gen, 3, 4, 2)
    w2 = rand_weight(gen, "img", 4, 2, 3, dtype=torch.float64)
    w = {"img": w2, "freq": w2[..., None].expand(4, 2, 64), "cfreq": w2[..., None, None].expand(4, 2, 3, 64)}[wkind]
    assert_close_f64(fastmix.freq_mix(x, index, w, seed=1), fastmix.freq_mix(x, index, w2, seed=1), rel=1e-13)


def test_keep_forms(backend, gen):
    c = 3
    x = randn(gen, 4, c, 16, 8, dtype=torch.float64)
    index, weight = rand_index(gen, 4, 5, 3), rand_weight(gen, "freq", 5, 3, c, dtype=torch.float64)
    full = fastmix.freq_mix(x, index, weight, seed=9)
    ids = [130, 5, 64, 0, 191, 63]  # unsorted: outputs come in ascending id order
    got = fastmix.freq_mix(x, index, weight, keep=ids, seed=9)
    assert torch.equal(got, full[:, sorted(ids)])
    assert torch.equal(fastmix.freq_mix(x, index, weight, keep=torch.tensor(ids), seed=9), got)
    mask = torch.zeros(192, dtype=torch.bool)
    mask[ids] = True
    assert torch.equal(fastmix.freq_mix(x, index, weight, keep=mask, seed=9), got)
    # a (64,) mask keeps the same frequencies in every colour
    m64 = torch.zeros(64, dtype=torch.bool)
    m64[[0, 9, 63]] = True
    assert torch.equal(fastmix.freq_mix(x, index, weight, keep=m64, seed=9), full[:, [0, 9, 63, 64, 73, 127, 128, 137, 191]])
    # pixels: removed channels are zero before the inverse transform
    px = fastmix.freq_mix(x, index, weight, keep=ids, seed=9, out="pixels")
    masked = torch.zeros_like(full)
    masked[:, ids] = full[:, ids]
    assert_close_f64(px, fastmix.block_idct_ref(fastmix.from_channels(masked)), rel=1e-13)
    # nothing kept
    assert fastmix.freq_mix(x, index, weight, keep=[]).shape == (5, 0, 2, 1)
    assert torch.equal(fastmix.freq_mix(x, index, weight, keep=[], out="pixels"), torch.zeros(5, c, 16, 8, dtype=torch.float64))


# ----------------------------------------------------------------------------------------------------
# Zero weights, NaN and Inf
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wkind", WEIGHT_KINDS)
@pytest.mark.parametrize("out", ["channels", "pixels"])
def test_zero_weight_partner_is_skipped(backend, gen, wkind, out):
    """A NaN image at weight exactly 0 (a padded partner) reaches neither the output nor any gradient."""
    n, c, m, k = 4, 3, 5, 3
    x0 = randn(gen, n, c, 8, 16)
    x0[3] = float("nan")
    index = torch.tensor([[0, 1, 3], [1, 3, 3], [2, 0, 3], [3, 1, 0], [0, 0, 3]])
    weight = rand_weight(gen, wkind, m, k, c)
    zero = index == 3  # every appearance of image 3 gets weight 0 ...
    zero[3, 0] = False  # ... except row 3, which mixes it for real: its output is NaN
    weight[zero] = 0.0
    x = x0.clone().requires_grad_()
    wt = weight.clone().requires_grad_()
    y = fastmix.freq_mix(x, index, wt, seed=4, out=out)
    rows = [0, 1, 2, 4]
    assert torch.isfinite(y[rows]).all()
    assert torch.isnan(y[3]).any()
    # those rows equal the same mix with any finite image 3
    clean = x0.clone()
    clean[3] = 1e6
    y_clean = fastmix.freq_mix(clean, index, weight, seed=4, out=out)
    assert torch.equal(y[rows], y_clean[rows])
    # gradients of a loss over those rows
    g = randn(gen, *y.shape)
    g[3] = 0.0
    (y[rows] * g[rows]).sum().backward()
    assert torch.isfinite(x.grad).all(), "a skipped NaN partner leaked into x.grad"
    assert torch.equal(x.grad[3], torch.zeros_like(x.grad[3])), "image 3 appears at weight 0 only in the loss's rows"
    assert torch.isfinite(wt.grad[rows]).all(), "a skipped NaN partner leaked into weight.grad"
    assert (wt.grad[zero] == 0).all(), "a skipped partner has a non-zero weight gradient"
    # and the other entries are the gradients of the clean problem
    wc = weight.clone().requires_grad_()
    (fastmix.freq_mix(clean, index, wc, seed=4, out=out)[rows] * g[rows]).sum().backward()
    torch.testing.assert_close(wt.grad[rows], wc.grad[rows], rtol=1e-5, atol=1e-4)


def test_zero_frequency_weights_skip_only_those_frequencies(backend, gen):
    x = randn(gen, 2, 1, 8, 8)
    x[1] = float("nan")
    index = torch.tensor([[0, 1]])
    weight = torch.ones(1, 2, 64)
    zero_f = [0, 5, 17, 63]
    weight[0, 1, zero_f] = 0.0
    y = fastmix.freq_mix(x, index, weight)
    finite = torch.isfinite(y[0, :, 0, 0])
    assert finite.nonzero().flatten().tolist() == zero_f


def expected_nonfinite(index, weight, c, n0, c0, i0, j0, shape_cf, keep_ids_, out, hw):
    """Which outputs a non-finite pixel at (image n0, colour c0, block (i0, j0)) touches, from the spec."""
    m = index.shape[0]
    w4 = weight4(weight, c)
    touched = ((index == n0).unsqueeze(-1) & (w4[:, :, c0, :] != 0)).any(1)  # (M, 64)
    if out == "channels":
        full = torch.zeros(m, c * 64, *shape_cf, dtype=torch.bool)
        full[:, c0 * 64 : (c0 + 1) * 64, i0, j0] = touched
        return full[:, keep_ids_]
    kept = torch.zeros(c * 64, dtype=torch.bool)
    kept[keep_ids_] = True
    any_kept = (touched & kept[c0 * 64 : (c0 + 1) * 64]).any(1)  # (M,)
    px = torch.zeros(m, c, *hw, dtype=torch.bool)
    px[:, c0, 8 * i0 : 8 * i0 + 8, 8 * j0 : 8 * j0 + 8] = any_kept.view(m, 1, 1)
    return px


@pytest.mark.parametrize("bad", ["nan", "inf", "-inf"])
@pytest.mark.parametrize("wkind", WEIGHT_KINDS)
@pytest.mark.parametrize("out", ["channels", "pixels"])
def test_nonfinite_propagates_exactly(backend, gen, bad, wkind, out):
    n, c, h, w, m, k = 4, 3, 16, 24, 6, 3
    x = randn(gen, n, c, h, w)
    n0, c0, py, px = 2, 1, 11, 20  # block (1, 2)
    x[n0, c0, py, px] = float(bad)
    index = torch.tensor([[0, 1, 2], [2, 2, 3], [3, 0, 1], [1, 2, 0], [0, 3, 3], [2, 1, 0]])
    weight = rand_weight(gen, wkind, m, k, c)
    weight[5, 0] = 0.0  # row 5 mixes image 2 at weight 0 only
    if wkind != "img":
        weight[3, 1, ..., :32] = 0.0  # row 3 mixes image 2 in the upper 32 frequencies only
    keep = list(range(0, 192, 3))
    y = fastmix.freq_mix(x, index, weight, keep=keep, seed=12, out=out)
    want = expected_nonfinite(index, weight, c, n0, c0, py // 8, px // 8, (h // 8, w // 8), keep, out, (h, w))
    got = ~torch.isfinite(y)
    assert want.any() and not want.all()
    assert torch.equal(got, want), f"{int((got != want).sum())} outputs disagree on finiteness"


# ----------------------------------------------------------------------------------------------------
# Views, empty batches
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("out", ["channels", "pixels"])
def test_non_contiguous_inputs(backend, gen, out):
    base = randn(gen, 10, 3, 32, 40)
    x = base[::2, :, 4:28, 8:24]  # (5, 3, 24, 16) strided slice
    xt = randn(gen, 5, 3, 16, 24).transpose(2, 3)  # (5, 3, 24, 16) transposed view
    index_t = rand_index(gen, 5, 3, 4).t()  # (4, 3): a transposed view
    weight_t = randn(gen, 64, 3, 4).permute(2, 1, 0)  # (4, 3, 64): a permuted view
    keep = torch.arange(0, 192, 2)[::2]  # strided id tensor: 0, 4, ..., 188
    for name, xv in {"slice": x, "transposed": xt, "channels_last": x.contiguous(memory_format=torch.channels_last)}.items():
        assert not xv.is_contiguous() and not index_t.is_contiguous() and not weight_t.is_contiguous()
        got = fastmix.freq_mix(xv, index_t, weight_t, keep=keep, seed=77, out=out)
        want = fastmix.freq_mix(xv.contiguous(), index_t.contiguous(), weight_t.contiguous(), keep=keep.contiguous(), seed=77, out=out)
        # same numbers (a kernel that ignored strides would be off by O(1), not by rounding)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-5, msg=name)
    # gradients through views: the saved view is read correctly in the backward
    g = randn(gen, *want.shape)
    xv = base.clone().requires_grad_()
    wv = weight_t.detach().clone().requires_grad_()
    (fastmix.freq_mix(xv[::2, :, 4:28, 8:24], index_t, wv.transpose(0, 1).contiguous().transpose(0, 1), keep=keep, seed=77, out=out) * g).sum().backward()
    xc = x.contiguous().requires_grad_()
    wc = weight_t.contiguous().requires_grad_()
    (fastmix.freq_mix(xc, index_t.contiguous(), wc, keep=keep, seed=77, out=out) * g).sum().backward()
    torch.testing.assert_close(xv.grad[::2, :, 4:28, 8:24], xc.grad, rtol=1e-5, atol=1e-5)
    assert (xv.grad[1::2] == 0).all()
    torch.testing.assert_close(wv.grad, wc.grad, rtol=1e-5, atol=1e-4)


def test_empty_batches(backend, gen):
    c, h, w = 3, 16, 8
    empty_index = torch.zeros(0, 2, dtype=torch.int64)
    for wk, wshape in {"img": (0, 2), "freq": (0, 2, 64), "cfreq": (0, 2, c, 64)}.items():
        # N = 0 (then M = 0 too: no index value is valid)
        x0 = torch.randn(0, c, h, w)
        z = fastmix.freq_mix(x0, empty_index, torch.zeros(wshape), keep=[1, 2])
        assert z.shape == (0, 2, 2, 1), wk
        assert fastmix.freq_mix(x0, empty_index, torch.zeros(wshape), out="pixels").shape == (0, c, h, w)
        # M = 0 with N > 0
        x = randn(gen, 3, c, h, w, dtype=torch.float16)
        z = fastmix.freq_mix(x, empty_index, torch.zeros(wshape), seed=3)
        assert z.shape == (0, 192, 2, 1) and z.dtype == torch.float16
    # empty images (H = 0)
    z = fastmix.freq_mix(torch.randn(2, c, 0, 8), torch.zeros(2, 1, dtype=torch.int64), torch.ones(2, 1))
    assert z.shape == (2, 192, 0, 1)


def test_empty_results_stay_in_the_graph(backend):
    # an empty batch or keep set computes nothing, but backward must still work (zero gradients)
    x = torch.randn(3, 3, 16, 8, requires_grad=True)
    w = torch.rand(0, 2, requires_grad=True)
    z = fastmix.freq_mix(x, torch.zeros(0, 2, dtype=torch.int64), w)
    assert z.shape == (0, 192, 2, 1) and z.requires_grad
    z.sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and w.grad.shape == (0, 2)
    # empty keep with a NaN in x: zeros out (the NaN cannot leak in), zero gradients back
    x = torch.randn(2, 3, 8, 8)
    x[0, 0, 0, 0] = float("nan")
    x.requires_grad_()
    w = torch.rand(2, 2, requires_grad=True)
    z = fastmix.freq_mix(x, torch.tensor([[0, 1], [1, 0]]), w, keep=[], out="pixels")
    assert torch.equal(z, torch.zeros(2, 3, 8, 8)) and z.requires_grad
    (z * 2).sum().backward()
    assert torch.equal(x.grad, torch.zeros_like(x)) and torch.equal(w.grad, torch.zeros_like(w))
    with torch.no_grad():
        assert not fastmix.freq_mix(x, torch.tensor([[0, 1]]), w[:1], keep=[]).requires_grad


# ----------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------

_GRAD_CASES = list(itertools.product(WEIGHT_KINDS, ["channels", "pixels"], [None, 2**40 + 3], [None, [0, 3, 64, 100, 127]]))


@pytest.mark.parametrize(
    "wkind,out,seed,keep",
    _GRAD_CASES,
    ids=[f"w_{w}-{o}-seed_{s is not None}-keep_{kp is not None}" for w, o, s, kp in _GRAD_CASES],
)
def test_gradcheck(backend, gen, one_thread, wkind, out, seed, keep):
    """Both inputs, both outputs, every weight shape, with seeds and keep; repeated partners (fast mode:
    a random projection of the Jacobian, so every case stays cheap)."""
    n, c, h, w, m, k = 3, 2, 8, 16, 4, 3
    x = randn(gen, n, c, h, w, dtype=torch.float64).requires_grad_()
    index = torch.tensor([[0, 1, 1], [2, 2, 0], [1, 0, 2], [0, 0, 0]])
    wt = rand_weight(gen, wkind, m, k, c, dtype=torch.float64).requires_grad_()
    fn = lambda x, wt: fastmix.freq_mix(x, index, wt, keep=keep, seed=seed, out=out)  # noqa: E731
    assert gradcheck(fn, (x, wt), fast_mode=True)


@pytest.mark.parametrize(
    "c,wkind,out",
    [(2, "img", "channels"), (1, "freq", "pixels")],
    ids=lambda v: str(v),
)
def test_gradcheck_full_jacobian(backend, gen, one_thread, c, wkind, out):
    """The full Jacobian on a tiny problem (slow mode: one finite difference per input element)."""
    x = randn(gen, 2, c, 8, 8, dtype=torch.float64).requires_grad_()
    index = torch.tensor([[0, 1], [1, 1], [0, 0]])[: 3 if wkind == "img" else 2]  # repeated partners
    wt = rand_weight(gen, wkind, index.shape[0], 2, c, dtype=torch.float64).requires_grad_()
    keep = [0, 1, 9, 63] + ([64, 70, 127] if c == 2 else [])
    fn = lambda x, wt: fastmix.freq_mix(x, index, wt, keep=keep, seed=6, out=out)  # noqa: E731
    assert gradcheck(fn, (x, wt))


def test_gradient_of_one_input_only(backend, gen):
    x = randn(gen, 3, 3, 8, 16, dtype=torch.float64)
    index = rand_index(gen, 3, 4, 2)
    w = rand_weight(gen, "freq", 4, 2, 3, dtype=torch.float64)
    g = randn(gen, 4, 192, 1, 2, dtype=torch.float64)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    (fastmix.freq_mix(xr, index, wr, seed=1) * g).sum().backward()
    x1 = x.clone().requires_grad_()
    (gx,) = torch.autograd.grad((fastmix.freq_mix(x1, index, w, seed=1) * g).sum(), [x1])
    w1 = w.clone().requires_grad_()
    (gw,) = torch.autograd.grad((fastmix.freq_mix(x, index, w1, seed=1) * g).sum(), [w1])
    assert_close_f64(gx, xr.grad, rel=1e-13)
    assert_close_f64(gw, wr.grad, rel=1e-13)


def test_expanded_and_strided_output_gradients(backend, gen):
    """Autograd hands the op stride-0 (from .sum()) and transposed gradients: same result as dense ones."""
    x = randn(gen, 3, 1, 16, 8, dtype=torch.float64).requires_grad_()
    index = rand_index(gen, 3, 2, 2)
    w = rand_weight(gen, "img", 2, 2, 1, dtype=torch.float64).requires_grad_()
    y = fastmix.freq_mix(x, index, w, seed=2)
    gx, gw = torch.autograd.grad(y.sum(), [x, w], retain_graph=True)
    gx1, gw1 = torch.autograd.grad(y, [x, w], torch.ones_like(y))
    assert_close_f64(gx, gx1, rel=1e-14)
    assert_close_f64(gw, gw1, rel=1e-14)
    g = randn(gen, 2, 64, 1, 2, dtype=torch.float64)
    y = fastmix.freq_mix(x, index, w, seed=2)
    gx2, gw2 = torch.autograd.grad((y.transpose(2, 3) * g.transpose(2, 3)).sum(), [x, w], retain_graph=True)
    gx3, gw3 = torch.autograd.grad((y * g).sum(), [x, w])
    assert_close_f64(gx2, gx3, rel=1e-13)
    assert_close_f64(gw2, gw3, rel=1e-13)


@pytest.mark.parametrize("wkind,out", [("img", "channels"), ("cfreq", "pixels")])
def test_double_backward(backend, gen, one_thread, wkind, out):
    """Second-order gradients (gradient penalties, Hessian-vector products) through the op. The C++ and
    Triton backward ops have their own autograd (built from the forward and backward ops: the output is
    bilinear in x and weight); without it they came back as zeros with only a once-shown warning."""
    x = randn(gen, 3, 2, 8, 16, dtype=torch.float64).requires_grad_()
    index = torch.tensor([[0, 1, 1], [2, 2, 0], [1, 0, 2]])
    wt = rand_weight(gen, wkind, 3, 3, 2, dtype=torch.float64).requires_grad_()
    fn = lambda x, wt: fastmix.freq_mix(x, index, wt, keep=[0, 3, 64, 100], seed=11, out=out)  # noqa: E731
    assert gradgradcheck(fn, (x, wt), fast_mode=True)


@pytest.mark.parametrize("out", ["channels", "pixels"])
def test_double_backward_matches_reference_with_skipped_partners(backend, gen, out):
    """A zero-weight partner is absent from every derivative, second order included, as in autograd through
    the reference (its NaN pixels never reach them)."""
    x = randn(gen, 3, 2, 8, 16, dtype=torch.float64)
    x[2, 0, 0, 0] = float("nan")
    index = torch.tensor([[0, 1, 2], [2, 0, 1], [1, 1, 0]])
    wt = rand_weight(gen, "freq", 3, 3, 2, dtype=torch.float64)
    wt[0, 2] = 0.0  # row 0 skips image 2 (the NaN), every frequency
    wt[1, 0] = 0.0
    index2 = index.clone()
    index2[1, 0] = 1  # row 1 must not reach the NaN either

    def second_order(run):
        xr, wr = x[:2].clone().requires_grad_(), wt.clone().requires_grad_()
        xs = torch.cat([xr, x[2:]])  # the NaN image takes no gradient

        def go():
            y = fastmix.freq_mix(xs, index2, wr, keep=[0, 5, 64, 127], seed=4, out=out)
            gx, gw = torch.autograd.grad((y**2).sum(), (xr, wr), create_graph=True)
            return torch.autograd.grad((gx**3).sum() + (gw**2).sum(), (xr, wr))

        return run(go)

    got = second_order(lambda f: f())
    want = second_order(lambda f: run_on("torch", f))
    for a, b in zip(got, want):
        assert torch.isfinite(a).all() and b.abs().max() > 0
        assert_close_f64(a, b, rel=1e-12)


def test_forward_mode_and_func_transforms_are_refused_not_zero(backend, gen):
    """The fused kernels have reverse-mode autograd only: forward-mode AD gave no tangent (zeros, silently)
    and torch.func.grad failed inside torch. The torch backend (pure PyTorch) supports both."""
    import torch.autograd.forward_ad as fwad
    from torch.func import grad, jvp, vmap

    x = randn(gen, 3, 2, 8, 8)
    index = torch.tensor([[0, 1], [2, 0]])
    w = rand_weight(gen, "img", 2, 2, 2)
    calls = {
        "freq_mix": lambda x, w: fastmix.freq_mix(x, index, w, seed=3),
        "frontend": lambda x, w: fastmix.frontend(x[:, :1, :2, :2], color="none", index=index, weight=w),
        "block_dct": lambda x, w: fastmix.block_dct(x) * w.sum(),
    }
    for name, f in calls.items():
        if backend == "torch":
            _, t = jvp(lambda w: f(x, w), (w,), (torch.ones_like(w),))
            assert t.abs().max() > 0
            assert grad(lambda w: f(x, w).sum())(w).shape == w.shape
            continue
        with pytest.raises(NotImplementedError, match=f"fastmix.{name}: .*forward-mode AD"):
            with fwad.dual_level():
                f(fwad.make_dual(x, torch.ones_like(x)), w)
        with pytest.raises(NotImplementedError, match=f"fastmix.{name}: torch.func.grad / jvp"):
            jvp(lambda x: f(x, w), (x,), (torch.ones_like(x),))
        with pytest.raises(NotImplementedError, match=f"fastmix.{name}: torch.func.grad / jvp"):
            grad(lambda x: f(x, w).sum())(x)
    # vmap alone runs (PyTorch's per-sample fallback) and agrees with a loop
    ws = rand_weight(gen, "img", 3, 2, 2).view(3, 1, 2).expand(3, 2, 2).contiguous()
    got = vmap(lambda w: fastmix.freq_mix(x, index, w))(ws)
    assert_close_f64(got, torch.stack([fastmix.freq_mix(x, index, w) for w in ws]), rel=1e-6)


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=dtype_id)
def test_an_inference_mode_call_first_does_not_break_training(backend, gen, dtype):
    """The ops cache constant tensors (transform matrices, geometry, keep slots). Built under
    torch.inference_mode() (an evaluation pass that runs first), they were inference tensors, and every later
    call that needs a gradient failed: "Inference tensors cannot be saved for backward"."""
    x = randn(gen, 4, 3, 16, 24, dtype=dtype)
    index = torch.tensor([[0, 1], [1, 2]])
    w = rand_weight(gen, "img", 2, 2, 3, dtype=dtype)
    faces = x[:, :, :3, :2].clamp(-1, 1)
    keep = [2, 7, 77]  # a keep set and sizes no other test uses: the caches are filled here first
    with torch.inference_mode():
        fastmix.freq_mix(x, index, w, keep=keep)
        fastmix.frontend(faces, upsample=8, keep=keep)
        fastmix.block_dct(x)
    xr, wr = x.clone().requires_grad_(), w.clone().requires_grad_()
    fastmix.freq_mix(xr, index, wr, keep=keep).sum().backward()
    fr = faces.clone().requires_grad_()
    fastmix.frontend(fr, upsample=8, keep=keep).sum().backward()
    fastmix.block_dct(xr).sum().backward()
    assert xr.grad is not None and wr.grad is not None and fr.grad is not None


def test_dct_matrix_is_a_copy():
    """Writing to the matrix fastmix.dct_matrix() returns must not change later transforms (it returned the
    cached float64 tensor itself)."""
    x = torch.randn(1, 1, 8, 8, dtype=torch.float64)
    before = fastmix.block_dct(x)
    fastmix.dct_matrix().mul_(2)
    fastmix.dct_matrix(8, torch.float32).mul_(2)
    torch.testing.assert_close(fastmix.block_dct(x), before, rtol=0, atol=0)
