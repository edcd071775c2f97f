"""frontend / frontend_inverse: the fused frequency front-end against the float64 reference and an
independent re-implementation of the published pipeline; memory, NaN, views, empty batches, gradients."""
from __future__ import annotations

import itertools
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import scipy.fft
import torch
import torch.nn.functional as F
from torch.autograd import gradcheck, gradgradcheck
from torch.profiler import ProfilerActivity, profile

import fastmix
from fastmix.ops.sign import sign_ref
from _fastmix_testing import (
    DTYPES,
    assert_close_f64,
    assert_matches_oracle,
    dtype_id,
    rand_faces,
    rand_index,
    rand_weight,
    run_on,
)

NO_DC = [ch for ch in range(192) if ch % 64 != 0]

# ----------------------------------------------------------------------------------------------------
# Against the float64 reference
# ----------------------------------------------------------------------------------------------------

_CASES = [
    # upsample, (h, w), color, C, mix, keep, seed
    (u, hw, color, c, mix, keep, seed)
    for (u, hw), (color, c), mix, keep, seed in itertools.product(
        [(1, (16, 24)), (2, (4, 12)), (8, (3, 2)), (3, (8, 16))],
        [("ycbcr", 3), ("none", 1), ("none", 4)],
        ["none", "img", "freq", "cfreq"],
        ["none", "no_dc_list", "bool_64"],
        [None, 2**45 + 1],
    )
]
# Keep every (upsample, colour, mix) meeting, but thin the keep x seed grid by half to stay fast.
_CASES = [case for i, case in enumerate(_CASES) if (i // 2 + i) % 2 == 0 or case[5] == "none"]


def _keep(kind, c):
    if kind == "none":
        return None
    if kind == "no_dc_list":
        return [ch for ch in range(c * 64) if ch % 64 != 0]
    m = torch.zeros(64, dtype=torch.bool)
    m[[1, 2, 8, 9, 30, 63]] = True
    return m


@pytest.mark.parametrize(
    "upsample,hw,color,c,mix,keep,seed",
    _CASES,
    ids=[f"up{u}-{h}x{w}-{col}-C{c}-mix_{mx}-keep_{kp}-seed_{s is not None}" for u, (h, w), col, c, mx, kp, s in _CASES],
)
def test_against_f64_oracle(backend, gen, upsample, hw, color, c, mix, keep, seed):
    n, m, k = 3, 4, 3
    h, w = hw
    x = rand_faces(gen, n, c, h, w, dtype=torch.float64)
    kw = dict(upsample=upsample, color=color, keep=_keep(keep, c), seed=seed)
    if mix != "none":
        kw.update(index=rand_index(gen, n, m, k), weight=rand_weight(gen, mix, m, k, c, dtype=torch.float64))
    got = fastmix.frontend(x, **kw)
    want = fastmix.frontend_ref(x, **kw)
    n_kept = {"none": c * 64, "no_dc_list": c * 63, "bool_64": c * 6}[keep]
    assert got.shape == (m if mix != "none" else n, n_kept, h * upsample // 8, w * upsample // 8)
    assert_close_f64(got, want, rel=1e-11)


@pytest.mark.parametrize("out_dtype", [None] + DTYPES, ids=lambda d: "out_default" if d is None else f"out_{dtype_id(d)}")
@pytest.mark.parametrize("dtype", DTYPES, ids=dtype_id)
def test_dtypes_against_f64_oracle(backend, gen, dtype, out_dtype):
    x = rand_faces(gen, 3, 3, 4, 6, dtype=dtype)
    index, weight = rand_index(gen, 3, 4, 2), rand_weight(gen, "freq", 4, 2, 3)
    kw = dict(upsample=4, keep=NO_DC, index=index, weight=weight, seed=8, out_dtype=out_dtype)
    got = fastmix.frontend(x, **kw)
    want_dtype = dtype if out_dtype is None else out_dtype
    assert got.dtype == want_dtype
    oracle = fastmix.frontend_ref(x.double(), **{**kw, "weight": weight.double(), "out_dtype": torch.float64})
    # The unavoidable error: the pipeline in float32 (or float64) rounded once to the output dtype.
    own = fastmix.frontend_ref(x, **kw)
    assert_matches_oracle(got, oracle, own, want_dtype)


def test_published_pipeline_independently(gen):
    """frontend_ref itself against a from-scratch pipeline: [-1,1] -> [0,255] -> bilinear (align_corners)
    -> JFIF YCbCr - 128 (the published constants) -> scipy's orthonormal 8x8 DCT -> channels c*64+u*8+v."""
    x = rand_faces(gen, 2, 3, 6, 5, dtype=torch.float64)
    v = (x + 1) * 127.5
    v = F.interpolate(v, scale_factor=8, mode="bilinear", align_corners=True).numpy()
    r, g, b = v[:, 0], v[:, 1], v[:, 2]
    y = 0.299 * r + 0.587 * g + 0.114 * b
    cb = 128 - 0.168736 * r - 0.331264 * g + 0.5 * b
    cr = 128 + 0.5 * r - 0.418688 * g - 0.081312 * b
    ycc = np.stack([y, cb, cr], 1) - 128.0  # (2, 3, 48, 40)
    t = ycc.reshape(2, 3, 6, 8, 5, 8)
    coef = scipy.fft.dctn(t, type=2, norm="ortho", axes=(3, 5))  # (n, c, i, u, j, v)
    want = torch.from_numpy(coef.transpose(0, 1, 3, 5, 2, 4).reshape(2, 192, 6, 5))
    got = fastmix.frontend_ref(x)
    # the JFIF constants are quoted to 6 digits: 255 * 1e-6 of slack per channel
    torch.testing.assert_close(got, want, rtol=0, atol=2e-3)
    for name in fastmix.available_backends("cpu"):
        torch.testing.assert_close(run_on(name, fastmix.frontend, x), want, rtol=0, atol=2e-3)


def test_no_mixing_equals_identity_mixing(backend, gen):
    x = rand_faces(gen, 3, 1, 8, 4, dtype=torch.float64)
    a = fastmix.frontend(x, upsample=2, color="none", seed=4)
    b = fastmix.frontend(x, upsample=2, color="none", seed=4, index=torch.arange(3).view(3, 1), weight=torch.ones(3, 1))
    assert_close_f64(a, b, rel=1e-14)
    # frontend with mixing == freq_mix of the (materialised) upsampled, level-shifted image
    idx, w = rand_index(gen, 3, 5, 2), rand_weight(gen, "freq", 5, 2, 1, dtype=torch.float64)
    up = F.interpolate((x + 1) * 127.5, scale_factor=2, mode="bilinear", align_corners=True) - 128
    want = fastmix.freq_mix(up, idx, w, keep=[3, 4, 60], seed=4)
    assert_close_f64(fastmix.frontend(x, upsample=2, color="none", index=idx, weight=w, keep=[3, 4, 60], seed=4), want)


def test_published_shape_and_sign_key(backend, gen):
    """A 14x14 face at upsample 8 with the DC dropped: 189 channels at 14x14 (112x112 -> 112x112 likewise)."""
    x = rand_faces(gen, 2, 3, 14, 14)
    z = fastmix.frontend(x, keep=NO_DC)
    assert z.shape == (2, 189, 14, 14) and z.dtype == torch.float32
    zs = fastmix.frontend(x, keep=NO_DC, seed=2024)
    assert torch.equal(zs, z * sign_ref(2024, 2, 192, 14, 14)[:, NO_DC])


def test_never_materialises_the_upsampled_image(gen):
    """No allocation during the fused op is as large as the upsampled image (profiler memory events:
    deterministic, no timing). The reference, which does materialise it, shows that the probe works."""
    x = rand_faces(gen, 2, 3, 32, 24)
    keep = list(range(1, 11))  # 10 channels: the output is 10/192 of the upsampled image
    upsampled_bytes = 2 * 3 * 256 * 192 * 4
    out_bytes = 2 * 10 * 32 * 24 * 4

    def peak_alloc(fn):
        fn()  # warm caches (geometry)
        with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
            y = fn()
        return max(e.cpu_memory_usage for e in prof.events()), y

    ref_peak, _ = peak_alloc(lambda: fastmix.frontend_ref(x, keep=keep))
    assert ref_peak >= upsampled_bytes
    for name in [b for b in fastmix.available_backends("cpu") if b != "torch"]:
        peak, y = peak_alloc(lambda: run_on(name, fastmix.frontend, x, keep=keep))
        assert y.numel() * 4 == out_bytes
        assert peak <= 2 * out_bytes, f"{name}: an allocation of {peak} bytes (upsampled image: {upsampled_bytes})"


_WIDE_SCRIPT = r"""
import resource, sys
import torch, fastmix

def vm_bytes():
    for line in open("/proc/self/status"):
        if line.startswith("VmSize:"):
            return int(line.split()[1]) * 1024

# the address space the process has now (torch's libraries, thread stacks) plus LIMIT: an allocation of the
# dense upsampling matrix (4.3 GB / 34 GB) fails, the output-sized buffers (a few MB) fit
limit = vm_bytes() + int(sys.argv[1])
resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
torch.manual_seed(0)
z = fastmix.frontend(torch.rand(1, 3, 1, 8192) * 2 - 1, upsample=8)
assert z.shape == (1, 192, 1, 8192), z.shape
x = torch.rand(1, 1, 8, 65536) * 2 - 1
z = fastmix.frontend(x, upsample=1, color="none")
torch.testing.assert_close(z, fastmix.frontend_ref(x, upsample=1, color="none"), rtol=1e-5, atol=1e-3)
print("ok")
"""


@pytest.mark.skipif(not Path("/proc/self/status").exists(), reason="reads the address space from /proc (Linux)")
def test_wide_images_memory_scales_with_the_output(tmp_path):
    """A 1 x 8192 face at upsample=8 (6 MiB out) and an 8 x 65536 strip at upsample=1 (2 MiB out) run in an
    address space 1 GiB above what the process holds after import. The dense float64 upsampling matrix
    (side * upsample x side) that built the geometry needed 4.3 GB and 34 GB for them: the allocation failed."""
    script = tmp_path / "wide.py"
    script.write_text(_WIDE_SCRIPT)
    env = dict(os.environ, OMP_NUM_THREADS="1", FASTMIX_BACKEND="cpu")
    if "cpu" not in fastmix.available_backends("cpu"):
        env["FASTMIX_BACKEND"] = "torch"
    r = subprocess.run([sys.executable, str(script), str(WIDE_HEADROOM)], capture_output=True, text=True, env=env,
                       timeout=300)
    assert r.returncode == 0 and "ok" in r.stdout, r.stderr[-2000:]


WIDE_HEADROOM = 1 << 30  # bytes of address space above the post-import size; see the test above


_GEOMETRY_SIZES = [(size, up) for size in (1, 2, 3, 7, 8, 13, 92, 112, 250) for up in (1, 2, 3, 5, 8, 16) if size * up % 8 == 0]


@pytest.mark.parametrize("size,up", _GEOMETRY_SIZES, ids=[f"{s}x{u}" for s, u in _GEOMETRY_SIZES])
def test_geometry_is_the_dense_matrix_banded(size, up):
    """The tap-built geometry equals D @ U[8I:8I+8, s_I:s_I+R] cut from the dense matrix, bit for bit."""
    from fastmix.ops.frontend import BLOCK, _patch_spans, _upsample_geometry_f64, upsample_matrix

    a, start = _upsample_geometry_f64(size, up)
    u = upsample_matrix(size, up)
    r = _patch_spans(size, up)[1]
    d = fastmix.dct_matrix(BLOCK)
    assert a.shape == (size * up // BLOCK, BLOCK, r)
    for i, s in enumerate(start.tolist()):
        assert 0 <= s <= size - r
        assert torch.equal(a[i], d @ u[BLOCK * i : BLOCK * (i + 1), s : s + r])
        # nothing of the band outside the patch
        assert not u[BLOCK * i : BLOCK * (i + 1), :s].any() and not u[BLOCK * i : BLOCK * (i + 1), s + r :].any()


# ----------------------------------------------------------------------------------------------------
# frontend_inverse
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("color,c", [("ycbcr", 3), ("none", 1)])
def test_inverse_round_trip(backend, gen, color, c):
    x = rand_faces(gen, 2, c, 16, 8, dtype=torch.float64)
    z = fastmix.frontend(x, upsample=1, color=color)
    assert_close_f64(fastmix.frontend_inverse(z, upsample=1, color=color), x, rel=1e-12)
    # upsampled: the full bilinear image; by default, that image resampled (bilinear, align_corners=True)
    # to the source grid, which keeps the four corner pixels exactly
    xs = x[:, :, :4, :6]
    z8 = fastmix.frontend(xs, upsample=8, color=color)
    up = F.interpolate(xs, scale_factor=8, mode="bilinear", align_corners=True)
    assert_close_f64(fastmix.frontend_inverse(z8, upsample=8, color=color, size="upsampled"), up, rel=1e-12)
    back = fastmix.frontend_inverse(z8, upsample=8, color=color)
    assert back.shape == xs.shape
    assert_close_f64(back, F.interpolate(up, size=(4, 6), mode="bilinear", align_corners=True), rel=1e-12)
    corners = (slice(None), slice(None), [0, 0, -1, -1], [0, -1, 0, -1])
    assert_close_f64(back[corners], xs[corners], rel=1e-12)


def test_inverse_with_keep(gen):
    x = rand_faces(gen, 2, 3, 8, 16, dtype=torch.float64)
    z = fastmix.frontend(x, upsample=1, keep=NO_DC)
    img = fastmix.frontend_inverse(z, upsample=1, keep=NO_DC)
    # dropping the DC of YCbCr removes each tile's mean: Y -> 0 after the level shift (mid grey), Cb/Cr -> 0
    full = fastmix.frontend(x, upsample=1)
    full[:, [0, 64, 128]] = 0
    assert_close_f64(img, fastmix.frontend_inverse(full, upsample=1), rel=1e-12)
    # grey faces with a keep set need the colour count
    zg = fastmix.frontend(x[:, :1], upsample=1, color="none", keep=[1, 2, 3])
    assert fastmix.frontend_inverse(zg, upsample=1, color="none", keep=[1, 2, 3], channels=1).shape == (2, 1, 8, 16)
    with pytest.raises(ValueError, match="channels"):
        fastmix.frontend_inverse(zg, upsample=1, color="none", keep=[1, 2, 3])
    with pytest.raises(ValueError, match="keep selects"):
        fastmix.frontend_inverse(z, upsample=1, keep=[1, 2])
    with pytest.raises(ValueError, match="size"):
        fastmix.frontend_inverse(z, upsample=1, keep=NO_DC, size="huge")
    with pytest.raises(ValueError, match="upsample"):
        fastmix.frontend_inverse(z, upsample=0, keep=NO_DC)
    with pytest.raises(ValueError, match="color"):
        fastmix.frontend_inverse(z, color="rgb")
    for bad in (2.5, "1", -1, True):
        with pytest.raises(ValueError, match="channels must be an int >= 1"):
            fastmix.frontend_inverse(zg, upsample=1, color="none", keep=[1, 2, 3], channels=bad)
    with pytest.raises(ValueError, match="channels must be 3 for color='ycbcr'"):
        fastmix.frontend_inverse(z, upsample=1, keep=NO_DC, channels=1)  # was silently ignored


def test_inverse_dtype_and_empty(gen):
    """The image comes back in z's dtype (16-bit z gave float32), and an empty block grid (a frontend of an
    empty image) gives an empty image instead of an error from the resampling."""
    x = rand_faces(gen, 2, 3, 4, 4)
    z = fastmix.frontend(x, upsample=2)
    for dt in (torch.float16, torch.bfloat16, torch.float32):
        assert fastmix.frontend_inverse(z.to(dt), upsample=2).dtype == dt
    z0 = fastmix.frontend(rand_faces(gen, 2, 3, 0, 4), upsample=2)
    assert fastmix.frontend_inverse(z0, upsample=2).shape == (2, 3, 0, 4)


# ----------------------------------------------------------------------------------------------------
# NaN / Inf, zero weights, views, empty batches
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nonfinite_propagates_exactly_upsample_1(backend, gen, bad):
    """At upsample 1 a bad pixel of image n touches every YCbCr channel (the colour transform mixes
    R, G, B) of its block, in the outputs that mix n with a non-zero weight, and nothing else."""
    x = rand_faces(gen, 3, 3, 16, 24)
    x[1, 2, 9, 3] = float(bad)  # image 1, blue, block (1, 0)
    index = torch.tensor([[0, 1], [2, 2], [1, 1], [0, 2], [1, 0]])
    weight = torch.rand(5, 2, generator=gen) + 0.1
    weight[4, 0] = 0.0
    keep = NO_DC[::5]
    z = fastmix.frontend(x, upsample=1, index=index, weight=weight, keep=keep, seed=3)
    want = torch.zeros(5, 192, 2, 3, dtype=torch.bool)
    want[[0, 2], :, 1, 0] = True
    assert torch.equal(~torch.isfinite(z), want[:, keep])


@pytest.mark.parametrize("bad", ["nan", "inf"])
def test_nonfinite_propagates_exactly_upsampled(backend, gen, bad):
    """At upsample > 1 a bad pixel touches the blocks whose bilinear rows/columns give it a non-zero
    coefficient (from the interpolation matrix of the spec, align_corners=True)."""
    from fastmix.ops.frontend import upsample_matrix

    h, w, up, y0, x0 = 6, 4, 4, 2, 1
    x = rand_faces(gen, 2, 1, h, w, dtype=torch.float64)
    x[0, 0, y0, x0] = float(bad)
    index, weight = torch.tensor([[0, 1], [1, 1], [1, 0]]), torch.tensor([[0.5, 0.5], [0.3, 0.7], [1.0, 0.0]])
    z = fastmix.frontend(x, upsample=up, color="none", index=index, weight=weight)
    rows = (upsample_matrix(h, up)[:, y0] != 0).view(-1, 8).any(1)  # block rows touched
    cols = (upsample_matrix(w, up)[:, x0] != 0).view(-1, 8).any(1)
    want = torch.zeros(3, 64, h * up // 8, w * up // 8, dtype=torch.bool)
    want[0] = (rows.view(-1, 1) & cols.view(1, -1)).expand(64, -1, -1)
    assert not want[0].all()  # some blocks of row 0 are untouched
    assert torch.equal(~torch.isfinite(fastmix.frontend_ref(x, upsample=up, color="none", index=index, weight=weight)), want)
    assert torch.equal(~torch.isfinite(z), want)


@pytest.mark.parametrize("up", [4, 8])
def test_nonfinite_gradient_reaches_exactly_the_touched_pixels(backend, gen, up):
    """A NaN in the gradient of one output block reaches the source pixels that block's bilinear rows and
    columns touch, in the partners mixed with a non-zero weight, and nothing else: the patch pixels the
    block does not touch and the zero-weight partner get exact zeros (0 * NaN would spread it)."""
    from fastmix.ops.frontend import upsample_matrix

    h, w = 6, 4
    x = rand_faces(gen, 3, 1, h, w, dtype=torch.float64).requires_grad_()
    index = torch.tensor([[0, 1], [1, 2], [2, 0]])
    weight = torch.tensor([[0.5, 0.0], [0.3, 0.7], [1.0, 0.4]], dtype=torch.float64, requires_grad=True)
    z = fastmix.frontend(x, upsample=up, color="none", index=index, weight=weight, seed=2)
    grad = torch.ones_like(z)
    grad[0, 5, 0, 0] = float("nan")  # output 0 = 0.5 * image 0 + 0 * image 1; block (0, 0)
    z.backward(grad)
    rows = upsample_matrix(h, up)[:8].abs().sum(0) != 0  # source rows block row 0 touches
    cols = upsample_matrix(w, up)[:8].abs().sum(0) != 0
    want = torch.zeros(3, 1, h, w, dtype=torch.bool)
    want[0, 0] = rows.view(-1, 1) & cols.view(1, -1)
    assert torch.equal(torch.isnan(x.grad), want)
    # (The zero weight's own gradient, <NaN gradient, partner coefficients>, is NaN in the reference and 0
    # in the kernels, which treat a zero weight as padding; not pinned here.)
    assert torch.isnan(weight.grad[0, 0]) and torch.isfinite(weight.grad[1:]).all()


def test_zero_weight_partner_is_skipped(backend, gen):
    x = rand_faces(gen, 3, 3, 4, 4)
    x[2] = float("nan")
    index = torch.tensor([[0, 2], [1, 2], [2, 0]])
    weight = torch.tensor([[1.0, 0.0], [0.6, 0.0], [0.0, 1.0]])
    xr = x.clone().requires_grad_()
    z = fastmix.frontend(xr, upsample=2, index=index, weight=weight, keep=NO_DC, seed=1)
    assert torch.isfinite(z).all()
    clean = x.clone()
    clean[2] = 0.25
    assert torch.equal(z, fastmix.frontend(clean, upsample=2, index=index, weight=weight, keep=NO_DC, seed=1))
    z.sum().backward()
    assert torch.isfinite(xr.grad).all() and (xr.grad[2] == 0).all()


def test_non_contiguous(backend, gen):
    base = rand_faces(gen, 6, 3, 12, 20)
    views = {"slice": base[::2, :, 2:10, 4:16], "transposed": base[:3, :, :12, :8].transpose(2, 3)}
    index = rand_index(gen, 3, 4, 3).t().contiguous().t()
    weight = torch.rand(64, 3, 4, generator=gen).permute(2, 1, 0)
    for name, v in views.items():
        assert not v.is_contiguous()
        got = fastmix.frontend(v, upsample=2, index=index, weight=weight, keep=torch.arange(1, 192, 3), seed=5)
        want = fastmix.frontend(v.contiguous(), upsample=2, index=index.contiguous(), weight=weight.contiguous(), keep=torch.arange(1, 192, 3), seed=5)
        torch.testing.assert_close(got, want, rtol=1e-6, atol=1e-4, msg=name)


def test_empty_batches(backend):
    assert fastmix.frontend(torch.zeros(0, 3, 4, 4), keep=NO_DC).shape == (0, 189, 4, 4)
    z = fastmix.frontend(torch.zeros(0, 1, 8, 16), upsample=1, color="none")
    assert z.shape == (0, 64, 1, 2)
    z = fastmix.frontend(
        torch.zeros(2, 3, 4, 4), index=torch.zeros(0, 2, dtype=torch.int64), weight=torch.zeros(0, 2), out_dtype=torch.bfloat16
    )
    assert z.shape == (0, 192, 4, 4) and z.dtype == torch.bfloat16
    x = torch.rand(2, 3, 4, 4, requires_grad=True)
    w = torch.zeros(0, 2, requires_grad=True)
    z = fastmix.frontend(x, index=torch.zeros(0, 2, dtype=torch.int64), weight=w, out_dtype=torch.bfloat16)
    assert z.requires_grad and z.dtype == torch.bfloat16
    z.float().sum().backward()  # an empty batch still backpropagates (zero gradients)
    assert torch.equal(x.grad, torch.zeros_like(x)) and w.grad.shape == (0, 2)


# ----------------------------------------------------------------------------------------------------
# Gradients
# ----------------------------------------------------------------------------------------------------

_GRAD_CASES = [(1, "ycbcr", 3, "img"), (2, "none", 1, "freq"), (8, "ycbcr", 3, "cfreq"), (3, "none", 4, "img")]


@pytest.mark.parametrize("upsample,color,c,wkind", _GRAD_CASES, ids=[f"up{u}-{col}-C{c}-w_{w}" for u, col, c, w in _GRAD_CASES])
def test_gradcheck(backend, gen, one_thread, upsample, color, c, wkind):
    h, w = {1: (8, 16), 2: (4, 8), 8: (2, 3), 3: (8, 8)}[upsample]
    x = rand_faces(gen, 2, c, h, w, dtype=torch.float64).requires_grad_()
    index = torch.tensor([[0, 1], [1, 1], [1, 0]])
    wt = rand_weight(gen, wkind, 3, 2, c, dtype=torch.float64).requires_grad_()
    keep = [1, 2, 9, 63] + ([64, 130] if c > 1 else [])
    fn = lambda x, wt: fastmix.frontend(x, upsample=upsample, color=color, index=index, weight=wt, keep=keep, seed=7)  # noqa: E731
    assert gradcheck(fn, (x, wt), fast_mode=True)


def test_gradcheck_full_jacobian(backend, gen, one_thread):
    x = rand_faces(gen, 2, 3, 2, 3, dtype=torch.float64).requires_grad_()
    index = torch.tensor([[0, 1], [1, 1], [1, 0]])
    wt = (torch.rand(3, 2, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    fn = lambda x, wt: fastmix.frontend(x, index=index, weight=wt, keep=[1, 8, 70, 150], seed=2)  # noqa: E731
    assert gradcheck(fn, (x, wt))
    fx = lambda x: fastmix.frontend(x, upsample=2, color="ycbcr", keep=[1, 9, 64, 66, 129, 191])  # noqa: E731
    assert gradcheck(fx, (rand_faces(gen, 1, 3, 4, 4, dtype=torch.float64).requires_grad_(),))


def test_double_backward(backend, gen, one_thread):
    """Second-order gradients through the front-end (its mix op has a differentiable backward)."""
    x = rand_faces(gen, 2, 3, 2, 3, dtype=torch.float64).requires_grad_()
    index = torch.tensor([[0, 1], [1, 1], [1, 0]])
    wt = (torch.rand(3, 2, generator=gen, dtype=torch.float64) + 0.1).requires_grad_()
    fn = lambda x, wt: fastmix.frontend(x, upsample=8, index=index, weight=wt, keep=[1, 8, 70, 150], seed=2)  # noqa: E731
    assert gradgradcheck(fn, (x, wt), fast_mode=True)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16], ids=dtype_id)
def test_gradients_against_f64_oracle(backend, gen, dtype):
    x0 = rand_faces(gen, 3, 3, 4, 6, dtype=dtype)
    w0 = rand_weight(gen, "img", 4, 2, 3)
    index = rand_index(gen, 3, 4, 2)
    g = torch.randn(4, 189, 2, 3, generator=gen, dtype=torch.float64)

    def grads(fn, xx, ww):
        xx, ww = xx.clone().requires_grad_(), ww.clone().requires_grad_()
        (fn(xx, upsample=4, index=index, weight=ww, keep=NO_DC, seed=1).double() * g).sum().backward()
        return xx.grad, ww.grad

    gx, gw = grads(fastmix.frontend, x0, w0)
    ox, ow = grads(fastmix.frontend_ref, x0.double(), w0.double())
    tx, tw = grads(fastmix.frontend_ref, x0, w0)
    assert_matches_oracle(gx, ox, tx, dtype, "x.grad")
    assert_matches_oracle(gw, ow, tw, torch.float32, "weight.grad")


@pytest.mark.parametrize("out_dtype", [torch.bfloat16, torch.float16, torch.float64], ids=dtype_id)
def test_out_dtype_backward(backend, gen, out_dtype):
    """A low-precision output receives a low-precision gradient: x.grad and weight.grad keep their own
    dtypes and equal the float32-output gradients for the same (exactly representable) upstream gradient."""
    x0 = rand_faces(gen, 3, 3, 4, 6)
    w0 = rand_weight(gen, "freq", 3, 2, 3)
    index = torch.tensor([[0, 1], [2, 2], [1, 0]])
    g = torch.where(torch.rand(3, 189, 2, 3, generator=gen) < 0.5, -1.0, 1.0)

    def grads(od):
        xx, ww = x0.clone().requires_grad_(), w0.clone().requires_grad_()
        y = fastmix.frontend(xx, upsample=4, keep=NO_DC, index=index, weight=ww, seed=2, out_dtype=od)
        assert y.dtype == (od or torch.float32)
        (y * g.to(y.dtype)).sum().backward()
        return xx.grad, ww.grad

    gx, gw = grads(out_dtype)
    rx, rw = grads(None)
    assert gx.dtype == torch.float32 and gw.dtype == torch.float32
    torch.testing.assert_close(gx, rx, rtol=1e-5, atol=1e-3)
    torch.testing.assert_close(gw, rw, rtol=1e-5, atol=1e-2)
