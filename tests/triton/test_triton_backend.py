"""The Triton backend (fastmix/ops/_triton) against the float64 references, under Triton's interpreter.

Runs only where triton imports and TRITON_INTERPRET=1 is set (then the kernels run on CPU tensors; the
interpreter is slow, so shapes are tiny); otherwise every test here is skipped with the reason printed by
pytest -ra. Importing this module changes nothing global: the backend switch (FASTMIX_BACKEND=triton) lives
in a fixture and is undone after each test.

What a GPU-less run cannot check (the GPU benchmark does): real-compiler numerics of tl.dot ("tf32x3"),
timing, and launch limits. ``test_kernels_compile_for_sm90_and_sm80`` compiles every kernel for Hopper and
Ampere with the real compiler (no GPU needed) so that code the interpreter accepts but the compiler would not,
or that spills or overflows shared memory, fails here too.
"""
from __future__ import annotations

import importlib.util
import os
import subprocess
import sys

import pytest
import torch

import fastmix
from fastmix.ops.sign import sign_ref

HAVE_TRITON = importlib.util.find_spec("triton") is not None
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") == "1"
pytestmark = pytest.mark.skipif(
    not (HAVE_TRITON and INTERPRET),
    reason="triton backend tests need `pip install triton` and TRITON_INTERPRET=1 "
    f"(triton importable: {HAVE_TRITON}, TRITON_INTERPRET=1: {INTERPRET})",
)

# Tolerances are data: ||out - ref|| / ||ref|| against the float64 reference (fp32 arithmetic lands near
# 1e-7; the bound is 1e-5).
RTOL = {torch.float32: 1e-5, torch.bfloat16: 8e-3, torch.float16: 2e-3}


def rel_err(out: torch.Tensor, ref: torch.Tensor) -> float:
    out, ref = out.double(), ref.double()
    assert out.shape == ref.shape, (out.shape, ref.shape)
    assert not torch.isnan(out).any(), "NaN in the output"
    den = ref.norm().item()
    return (out - ref).norm().item() / (den if den > 0 else 1.0)


@pytest.fixture(autouse=True)
def triton_backend(monkeypatch):
    """FASTMIX_BACKEND=triton for the test (restored by monkeypatch). Triton 3.6's interpreter with
    numpy >= 2.4 is made to work by fastmix.ops._triton.interpreter_compat, which the launchers call."""
    monkeypatch.setenv("FASTMIX_BACKEND", "triton")
    yield


@pytest.fixture
def config(monkeypatch):
    """A per-test copy of the Triton CONFIG (tests may switch modes; restored afterwards)."""
    from fastmix.ops import _triton

    cfg = {k: (dict(v) if isinstance(v, dict) else v) for k, v in _triton.CONFIG.items()}
    monkeypatch.setattr(_triton, "CONFIG", cfg)
    for mod in ("fastmix.ops._triton.mix", "fastmix.ops._triton.dct"):
        if mod in sys.modules:
            monkeypatch.setattr(sys.modules[mod], "CONFIG", cfg, raising=False)
    return cfg


def _gen(seed=0):
    return torch.Generator().manual_seed(seed)


def _weights(kind: str, m: int, k: int, c: int, g: torch.Generator) -> torch.Tensor:
    shape = {"image": (m, k), "freq": (m, k, 64), "freq_c": (m, k, c, 64)}[kind]
    w = torch.randn(shape, generator=g)
    w.view(m, k, -1)[0, -1] = 0.0  # a padded partner: zero weight, skipped
    return w


def _grads(fn, x, w, gout):
    x = x.detach().clone().requires_grad_()
    w = w.detach().clone().requires_grad_()
    y = fn(x, w)
    y.backward(gout.to(y.dtype))
    return y.detach(), x.grad, w.grad


# ----------------------------------------------------------------------------------------------------
# block DCT
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("shape", [(8, 8), (2, 3, 16, 24), (1, 40, 8)], ids=["8x8", "2x3x16x24", "1x40x8"])
def test_block_dct_matches_reference(shape):
    x = torch.randn(shape, generator=_gen(1))
    y = fastmix.block_dct(x)
    assert rel_err(y, fastmix.block_dct_ref(x.double())) < RTOL[torch.float32]
    assert rel_err(fastmix.block_idct(y), x) < RTOL[torch.float32]
    assert rel_err(fastmix.block_idct(x), fastmix.block_idct_ref(x.double())) < RTOL[torch.float32]


def test_block_dct_gradient_and_noncontiguous():
    x = torch.randn(2, 24, 16, generator=_gen(2)).transpose(1, 2)  # non-contiguous view
    xr = x.detach().double().requires_grad_()
    xt = x.detach().clone().requires_grad_()
    g = torch.randn(2, 16, 24, generator=_gen(3))
    fastmix.block_dct(xt).backward(g)
    fastmix.block_dct_ref(xr).backward(g.double())
    assert rel_err(fastmix.block_dct(x), fastmix.block_dct_ref(x.double())) < RTOL[torch.float32]
    assert rel_err(xt.grad, xr.grad) < RTOL[torch.float32]


def test_block_dct_channels_layout_and_fallback():
    from fastmix.ops._triton.dct import block_dct_forward

    x = torch.randn(2, 3, 16, 8, generator=_gen(4))
    ch = block_dct_forward(x, False, channels=True, out_dtype=torch.float32)
    assert rel_err(ch, fastmix.to_channels(fastmix.block_dct_ref(x.double()))) < RTOL[torch.float32]
    # block != 8: documented fallback to the reference
    z = torch.randn(4, 12, generator=_gen(5))
    assert rel_err(fastmix.block_dct(z, block=4), fastmix.block_dct_ref(z.double(), block=4)) < RTOL[torch.float32]


# ----------------------------------------------------------------------------------------------------
# freq_mix: every option against the reference, forward and gradients
# ----------------------------------------------------------------------------------------------------

FREQ_CASES = [
    # (weight kind, out, keep, seed)
    ("image", "channels", "no_dc", 1234),
    ("image", "pixels", "mask64", None),
    ("freq", "channels", None, 7),
    ("freq", "pixels", "ids", 2**63 - 1),
    ("freq_c", "channels", "ids", None),
    ("freq_c", "pixels", "no_dc", 99),
]


def _keep(kind, c):
    if kind is None:
        return None
    if kind == "no_dc":
        return [i for i in range(c * 64) if i % 64 != 0]
    if kind == "mask64":
        m = torch.ones(64, dtype=torch.bool)
        m[[0, 1, 8, 9]] = False
        return m
    return torch.tensor([1, 5, 64 * c - 1, 17, 2], dtype=torch.int64)


@pytest.mark.parametrize("wkind,out,keep,seed", FREQ_CASES, ids=[f"{a}-{b}-{c}-seed{d}" for a, b, c, d in FREQ_CASES])
def test_freq_mix_forward_and_gradients(wkind, out, keep, seed):
    g = _gen(10)
    n, c, h, w, m, k = 3, 2, 16, 24, 4, 3  # H != W, partners repeat
    x = torch.randn(n, c, h, w, generator=g)
    index = torch.randint(0, n, (m, k), generator=g)
    wt = _weights(wkind, m, k, c, g)
    kp = _keep(keep, c)

    def tri(xx, ww):
        return fastmix.freq_mix(xx, index, ww, keep=kp, seed=seed, out=out)

    def ref(xx, ww):
        return fastmix.freq_mix_ref(xx, index, ww, keep=kp, seed=seed, out=out)

    gout = torch.randn(ref(x.double(), wt.double()).shape, generator=g, dtype=torch.float64)
    y, gx, gw = _grads(tri, x, wt, gout)
    yr, gxr, gwr = _grads(ref, x.double(), wt.double(), gout)
    assert rel_err(y, yr) < RTOL[torch.float32]
    assert rel_err(gx, gxr) < RTOL[torch.float32]
    assert rel_err(gw, gwr) < RTOL[torch.float32]


@pytest.mark.parametrize("c,k", [(1, 1), (4, 6)], ids=["C1-k1", "C4-k6"])
def test_freq_mix_odd_shapes(c, k):
    g = _gen(11)
    n = 1 if k == 1 else 5
    x = torch.randn(n, c, 8, 32, generator=g)[:, :, :, ::2]  # non-contiguous, 8 x 16
    index = torch.randint(0, n, (n, k), generator=g)
    wt = torch.rand(n, k, generator=g)
    y = fastmix.freq_mix(x, index, wt, seed=5)
    assert rel_err(y, fastmix.freq_mix_ref(x.double(), index, wt.double(), seed=5)) < RTOL[torch.float32]


@pytest.mark.parametrize("mode", ["atomic", "fused", "resampling"])
def test_freq_mix_alternative_paths(config, mode):
    """The non-default variants the GPU benchmark times: atomic x gradient, fused per-frequency forward,
    per-image forward on the resampling kernel."""
    if mode == "atomic":
        config["bwd_x_mode"] = "atomic"
    elif mode == "fused":
        config["fwd_per_freq"] = "fused"
    else:
        config["fwd_dct_route"] = "resampling"
    g = _gen(12)
    x = torch.randn(3, 2, 8, 16, generator=g)
    index = torch.randint(0, 3, (4, 3), generator=g)
    for wkind in ("image", "freq_c"):
        wt = _weights(wkind, 4, 3, 2, g)
        gout = torch.randn(4, 127, 1, 2, generator=g, dtype=torch.float64)
        keep = list(range(1, 128))
        y, gx, gw = _grads(lambda a, b: fastmix.freq_mix(a, index, b, keep=keep, seed=3), x, wt, gout)
        yr, gxr, gwr = _grads(lambda a, b: fastmix.freq_mix_ref(a, index, b, keep=keep, seed=3), x.double(), wt.double(), gout)
        for a, b in ((y, yr), (gx, gxr), (gw, gwr)):
            assert rel_err(a, b) < RTOL[torch.float32]


@pytest.mark.parametrize("static_k,order,bwd_x,chunk", [(True, "tile", "gather", 0), (False, "row", "gather", 4),
                                                        (True, "row", "atomic", 0), (False, "tile", "gather", 2)])
def test_freq_mix_program_order_and_static_k(config, static_k, order, bwd_x, chunk):
    """CONFIG["fwd_dct_static_k"] (unrolled partners), CONFIG["dct_order"] = "row" (programs row fastest)
    and CONFIG["bwd_gather_chunk"] (the gather's pairs in chunks) in the plain-DCT kernels, on a launch of
    several tiles per plane (16-block tiles, 20 blocks), 3 colours and more rows than colours, so a wrong
    (row, colour, tile) decoding reads or writes the wrong place; images are used by 1 to 7 pairs, so
    chunks end part-full; a zero-weight NaN partner must stay unread."""
    config["fwd_dct_static_k"] = static_k
    config["dct_order"] = order
    config["bwd_x_mode"] = bwd_x
    config["bwd_gather_chunk"] = chunk
    config["tiles"] = {kern: {p: (16, 4) for p in v} for kern, v in config["tiles"].items()}
    g = _gen(15)
    n, c, m, k = 5, 3, 7, 3
    x = torch.randn(n, c, 32, 40, generator=g)
    index = torch.randint(0, n, (m, k), generator=g)
    index[0, -1] = 4
    x[4, 1, 3, 5] = float("nan")  # read only through index[0, -1], whose weight _weights sets to zero
    index[1:, :][index[1:, :] == 4] = 3
    keep = [i for i in range(c * 64) if i % 64 != 0]
    for wkind in ("image", "freq_c"):
        wt = _weights(wkind, m, k, c, g)
        gout = torch.randn(m, len(keep), 4, 5, generator=g, dtype=torch.float64)
        y, gx, gw = _grads(lambda a, b: fastmix.freq_mix(a, index, b, keep=keep, seed=3), x, wt, gout)
        yr, gxr, gwr = _grads(lambda a, b: fastmix.freq_mix_ref(a, index, b, keep=keep, seed=3), x.double(),
                              wt.double(), gout)
        for a, b in ((y, yr), (gx, gxr), (gw, gwr)):
            assert rel_err(a, b) < RTOL[torch.float32]
        if chunk and bwd_x == "gather":  # chunks sum in the same order as the one-pair loop: the same values
            config["bwd_gather_chunk"] = 0
            _, gx0, gw0 = _grads(lambda a, b: fastmix.freq_mix(a, index, b, keep=keep, seed=3), x, wt, gout)
            config["bwd_gather_chunk"] = chunk
            assert torch.equal(gx, gx0) and torch.equal(gw, gw0)


@pytest.mark.parametrize("key", ["dct_order", "bwd_x_mode", "fwd_per_freq", "fwd_dct_route", "dot_precision_fp32",
                                 "dot_precision_fp32_dct", "color_pass"])
def test_config_rejects_unknown_mode(config, key):
    """A misspelt CONFIG mode is an error naming the entry, not silently the other mode."""
    config[key] = "Tile-ish"
    g = _gen(16)
    x = torch.rand(2, 3, 8, 8, generator=g, requires_grad=True)
    index = torch.tensor([[0, 1], [1, 0]])
    with pytest.raises(ValueError, match=key):
        if key == "color_pass":
            fastmix.frontend(x, upsample=1, index=index, weight=torch.rand(2, 2, generator=g))
        elif key == "dot_precision_fp32_dct":
            fastmix.block_dct(x)
        else:
            w = torch.rand(2, 2, 64, generator=g) if key == "fwd_per_freq" else torch.rand(2, 2, generator=g)
            fastmix.freq_mix(x, index, w).sum().backward()


def test_zero_weight_skips_nan_partner():
    """A zero-weight partner is never read: its NaNs reach no output and no gradient."""
    g = _gen(13)
    x = torch.randn(3, 1, 8, 8, generator=g)
    x[2] = float("nan")
    index = torch.tensor([[0, 2], [1, 2], [2, 0]])
    wt = torch.tensor([[0.7, 0.0], [0.5, 0.0], [0.0, 1.0]])
    xg = x.clone().requires_grad_()
    y = fastmix.freq_mix(xg, index, wt)
    assert torch.isfinite(y).all()
    y.sum().backward()
    assert torch.isfinite(xg.grad[:2]).all() and (xg.grad[2] == 0).all()
    # the same in float64 (the exact reference path): the weight gradient too
    x64, w64 = x.double(), wt.double().requires_grad_()
    fastmix.freq_mix(x64, index, w64).sum().backward()
    assert torch.isfinite(w64.grad).all() and w64.grad[0, 1] == 0 and w64.grad[1, 1] == 0
    # and NaN does propagate through a nonzero weight, to exactly that output
    y2 = fastmix.freq_mix(x, index, torch.tensor([[0.7, 0.1], [0.5, 0.0], [0.0, 1.0]]))
    assert torch.isnan(y2[0]).all() and torch.isfinite(y2[1:]).all()


def test_gradients_are_deterministic():
    g = _gen(14)
    x = torch.randn(4, 2, 8, 16, generator=g)
    index = torch.randint(0, 4, (6, 3), generator=g)
    wt = torch.rand(6, 3, 64, generator=g)
    grads = []
    for _ in range(2):
        xg = x.clone().requires_grad_()
        (fastmix.freq_mix(xg, index, wt, seed=1) ** 2).sum().backward()
        grads.append(xg.grad)
    assert torch.equal(grads[0], grads[1])


@pytest.mark.parametrize("out", ["channels", "pixels"])
def test_double_backward_through_the_kernels(out):
    """Second-order gradients of fp32 inputs go through the Triton ops (the backward op's autograd is
    built from the forward and backward ops) and match autograd through the float64 reference, skipped
    (zero-weight) partners included."""
    g = _gen(15)
    x = torch.randn(3, 2, 8, 16, generator=g)
    index = torch.tensor([[0, 1, 2], [2, 0, 1], [1, 1, 0]])
    wt = torch.rand(3, 3, 64, generator=g) + 0.1
    wt[0, 2] = 0.0

    def second_order(x, wt):
        xr, wr = x.clone().requires_grad_(), wt.clone().requires_grad_()
        y = fastmix.freq_mix(xr, index, wr, keep=[0, 5, 64, 127], seed=4, out=out)
        gx, gw = torch.autograd.grad((y**2).sum(), (xr, wr), create_graph=True)
        return torch.autograd.grad((gx**3).sum() + (gw**2).sum(), (xr, wr))

    got = second_order(x, wt)
    os.environ["FASTMIX_BACKEND"] = "torch"  # the fixture's monkeypatch restores "triton" afterwards
    want = second_order(x.double(), wt.double())
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5


@pytest.mark.parametrize("color_pass", ["triton", "torch"])
def test_frontend_double_backward(config, color_pass):
    """Second-order gradients through the front-end's kernels: the colour pass (its adjoint has a gradient
    of its own, the linear part of the colour map) and the mix."""
    config["color_pass"] = color_pass
    g = _gen(16)
    x = torch.rand(2, 3, 2, 3, generator=g) * 2 - 1
    index = torch.tensor([[0, 1], [1, 1], [1, 0]])
    wt = torch.rand(3, 2, generator=g) + 0.1

    def second_order(x, wt):
        xr, wr = x.clone().requires_grad_(), wt.clone().requires_grad_()
        y = fastmix.frontend(xr, index=index, weight=wr, keep=[1, 8, 70, 150], seed=2)
        gx, gw = torch.autograd.grad((y**2).sum() / 1e4, (xr, wr), create_graph=True)
        return torch.autograd.grad((gx**2).sum() + (gw**2).sum(), (xr, wr))

    got = second_order(x, wt)
    os.environ["FASTMIX_BACKEND"] = "torch"
    want = second_order(x.double(), wt.double())
    for a, b in zip(got, want):
        assert rel_err(a, b) <= 1e-5


# ----------------------------------------------------------------------------------------------------
# Signs: bit-identical to the specification and to the CPU backend
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("seed", [0, 1, 2**32 + 5, 2**63 - 1])
def test_signs_match_spec_and_cpu(seed, monkeypatch):
    g = _gen(15)
    n, c, h, w = 2, 2, 16, 24
    x = torch.randn(n, c, h, w, generator=g)
    index = torch.arange(n).view(n, 1)
    wt = torch.ones(n, 1)
    plain = fastmix.freq_mix(x, index, wt)
    signed = fastmix.freq_mix(x, index, wt, seed=seed)
    ratio = torch.where(plain != 0, signed / plain, torch.ones_like(plain))
    expect = sign_ref(seed, n, c * 64, h // 8, w // 8)
    assert torch.equal(ratio, expect), "Triton signs differ from fastmix.ops.sign (the specification)"
    if "cpu" in fastmix.available_backends("cpu"):
        monkeypatch.setenv("FASTMIX_BACKEND", "cpu")
        cpu = fastmix.freq_mix(x, index, wt, seed=seed)
        assert torch.equal(torch.sign(cpu), torch.sign(signed)), "Triton and CPU signs differ"


# ----------------------------------------------------------------------------------------------------
# frontend: upsample 1 / 2 / 8, mixing, colour, out_dtype, gradients
# ----------------------------------------------------------------------------------------------------

FRONT_CASES = [
    # (upsample, (h, w), C, color, weights, seed)
    (1, (8, 16), 3, "ycbcr", "image", 3),
    (2, (4, 8), 3, "ycbcr", "freq", None),
    (8, (3, 5), 3, "ycbcr", "image", 11),
    (8, (2, 3), 3, "ycbcr", "freq_c", 4),
    (8, (3, 2), 1, "none", None, 8),
]


@pytest.mark.parametrize("up,hw,c,color,wkind,seed", FRONT_CASES,
                         ids=[f"up{u}-{h}x{w}-C{c}-{col}-{wk}" for u, (h, w), c, col, wk, _ in FRONT_CASES])
def test_frontend_forward_and_gradients(up, hw, c, color, wkind, seed):
    g = _gen(20)
    n, m, k = 2, 3, 2
    x = torch.rand(n, c, *hw, generator=g) * 2 - 1
    keep = [i for i in range(c * 64) if i % 64 != 0]
    if wkind is None:
        index, wt = None, torch.zeros(0)
        mm = n
    else:
        index = torch.randint(0, n, (m, k), generator=g)
        wt = _weights(wkind, m, k, c, g)
        mm = m

    def tri(xx, ww):
        return fastmix.frontend(xx, upsample=up, color=color, keep=keep, index=index,
                                weight=ww if index is not None else None, seed=seed)

    def ref(xx, ww):
        return fastmix.frontend_ref(xx, upsample=up, color=color, keep=keep, index=index,
                                    weight=ww if index is not None else None, seed=seed)

    shape = (mm, len(keep), hw[0] * up // 8, hw[1] * up // 8)
    gout = torch.randn(shape, generator=g, dtype=torch.float64)
    if index is None:
        xt = x.clone().requires_grad_()
        xr = x.double().requires_grad_()
        y, yr = tri(xt, None), ref(xr, None)
        y.backward(gout.float())
        yr.backward(gout)
        assert rel_err(y, yr) < RTOL[torch.float32]
        assert rel_err(xt.grad, xr.grad) < RTOL[torch.float32]
        return
    y, gx, gw = _grads(tri, x, wt, gout)
    yr, gxr, gwr = _grads(ref, x.double(), wt.double(), gout)
    assert rel_err(y, yr) < RTOL[torch.float32]
    assert rel_err(gx, gxr) < RTOL[torch.float32]
    assert rel_err(gw, gwr) < RTOL[torch.float32]


@pytest.mark.parametrize("static_k,table,premixed", [(False, False, True), (True, False, True), (False, True, True),
                                                     (True, True, False)],
                         ids=["loop-hash", "unrolled-hash", "loop-table", "unrolled-table-unpremixed"])
def test_frontend_forward_alternative_paths(config, static_k, table, premixed):
    """The resampling forward's partner loop (unrolled per k or a run-time loop), sign source (a plane
    table or hashing in the kernel) and table words (pre-mixed or not) are switches the GPU benchmark
    times: every combination is exact."""
    config["fwd_static_k"], config["fwd_sign_table"], config["fwd_sign_premixed"] = static_k, table, premixed
    g = _gen(23)
    x = torch.rand(3, 3, 3, 2, generator=g) * 2 - 1
    index = torch.randint(0, 3, (4, 3), generator=g)
    wt = _weights("image", 4, 3, 3, g)
    keep = [i for i in range(192) if i % 64 != 0]
    y = fastmix.frontend(x, upsample=8, keep=keep, index=index, weight=wt, seed=7)
    yr = fastmix.frontend_ref(x.double(), upsample=8, keep=keep, index=index, weight=wt.double(), seed=7)
    assert rel_err(y, yr) < RTOL[torch.float32]


@pytest.mark.parametrize("color_pass", ["triton", "torch"])
def test_frontend_color_pass(config, color_pass):
    """CONFIG["color_pass"]: "triton" (the default) runs the [0, 255] scaling and YCbCr transform as one
    kernel (folded affine map), with its gradient; "torch" as torch ops. Both are the reference's
    function, forward and both gradients."""
    config["color_pass"] = color_pass
    g = _gen(24)
    x = torch.rand(3, 3, 3, 2, generator=g) * 2 - 1
    index = torch.randint(0, 3, (4, 2), generator=g)
    wt = _weights("image", 4, 2, 3, g)
    keep = [i for i in range(192) if i % 64 != 0]
    gout = torch.randn(4, 189, 3, 2, generator=g, dtype=torch.float64)

    def run(fn):
        return lambda a, b: fn(a, upsample=8, keep=keep, index=index, weight=b, seed=5)

    y, gx, gw = _grads(run(fastmix.frontend), x, wt, gout)
    yr, gxr, gwr = _grads(run(fastmix.frontend_ref), x.double(), wt.double(), gout)
    for a, b in ((y, yr), (gx, gxr), (gw, gwr)):
        assert rel_err(a, b) < RTOL[torch.float32]
    from fastmix.ops._triton.color import ycbcr
    from fastmix.ops.frontend import color_transform, to_255

    xs = torch.rand(2, 3, 5, 7, generator=g) * 2 - 1  # odd plane: the masked tail of the pixel tile
    assert rel_err(ycbcr(xs), color_transform(to_255(xs.double()), "ycbcr")) < RTOL[torch.float32]
    torch.library.opcheck(torch.ops.fastmix.ycbcr_triton, (xs.requires_grad_(), False))


def test_sign_planes_match_the_spec():
    from fastmix.ops._triton.sign import kernel_key, sign_planes
    from fastmix.ops.sign import mix32_tensor, seed_key

    seed, m, ch = 2**40 + 3, 5, 192
    mm = torch.arange(m).view(m, 1)
    plane = mix32_tensor(mix32_tensor(seed_key(seed) ^ mm) ^ torch.arange(ch).view(1, ch))
    got = sign_planes(kernel_key(seed), m, ch, "cpu", premixed=False).to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(got, plane)
    got = sign_planes(kernel_key(seed), m, ch, "cpu").to(torch.int64) & 0xFFFFFFFF
    assert torch.equal(got, plane ^ (plane >> 16))  # pre-mixed for _apply_sign_premixed


if HAVE_TRITON and INTERPRET:  # a test kernel (the jit resolves the helper among this module's globals)
    import triton
    import triton.language as tl

    from fastmix.ops._triton.sign import _apply_sign_premixed

    @triton.jit
    def _premixed_sign_kernel(pm_ptr, i_ptr, j_ptr, out_ptr, BLOCK: tl.constexpr):
        o = tl.arange(0, BLOCK)
        pm = tl.load(pm_ptr + o).to(tl.uint32, bitcast=True)
        r = _apply_sign_premixed(tl.full([BLOCK], 1.0, tl.float32), pm, tl.load(i_ptr + o), tl.load(j_ptr + o))
        tl.store(out_ptr + o, r)


def test_premixed_sign_is_the_spec_bit_for_bit():
    """_apply_sign_premixed(v, premix(plane), i, j) negates exactly where the spec's hash says, over random
    words and block coordinates up to 2**16 - 1 (the identity the shortcut relies on needs i, j < 2**16)."""
    from fastmix.ops.sign import mix32_tensor

    g = torch.Generator().manual_seed(9)
    n = 4096
    plane = torch.randint(0, 2**32, (n,), generator=g, dtype=torch.int64)
    i = torch.randint(0, 2**16, (n,), generator=g, dtype=torch.int64)
    j = torch.randint(0, 2**16, (n,), generator=g, dtype=torch.int64)
    i[:4], j[:4] = torch.tensor([0, 2**16 - 1, 0, 2**16 - 1]), torch.tensor([0, 0, 2**16 - 1, 2**16 - 1])
    pm = plane ^ (plane >> 16)
    pm32 = torch.where(pm >= 2**31, pm - 2**32, pm).to(torch.int32)
    out = torch.empty(n)
    _premixed_sign_kernel[(1,)](pm32, i.to(torch.int32), j.to(torch.int32), out, BLOCK=n)
    want = 1.0 - 2.0 * (mix32_tensor(plane ^ ((i << 16) | j)) >> 31).float()
    assert torch.equal(out, want)


def test_frontend_nan_reaches_exactly_the_blocks_it_touches():
    """Patches are R wide for every block, so some hold pixels with all-zero coefficients: those must be
    skipped, not multiplied by 0 (0 * NaN), in the forward and in the gradient."""
    from fastmix.ops.frontend import upsample_matrix

    h, w, up, y0, x0 = 6, 4, 4, 2, 1
    x = torch.rand(2, 1, h, w, generator=_gen(22)) * 2 - 1
    x[0, 0, y0, x0] = float("nan")
    index, weight = torch.tensor([[0, 1], [1, 1], [1, 0]]), torch.tensor([[0.5, 0.5], [0.3, 0.7], [1.0, 0.0]])
    xg = x.clone().requires_grad_()
    z = fastmix.frontend(xg, upsample=up, color="none", index=index, weight=weight)
    rows = (upsample_matrix(h, up)[:, y0] != 0).view(-1, 8).any(1)
    cols = (upsample_matrix(w, up)[:, x0] != 0).view(-1, 8).any(1)
    want = torch.zeros(3, 64, h * up // 8, w * up // 8, dtype=torch.bool)
    want[0] = (rows.view(-1, 1) & cols.view(1, -1)).expand(64, -1, -1)
    assert not want[0].all()
    assert torch.equal(~torch.isfinite(z), want)
    # NaN gradients on the block rows that do not touch the pixel must not reach its gradient
    g = torch.zeros(z.shape)
    g[0, :, ~rows, :] = float("nan")
    z.backward(g)
    assert torch.isfinite(xg.grad[0, 0, y0, x0])


def test_float64_runs_the_exact_reference():
    g = _gen(23)
    x = torch.randn(3, 2, 8, 16, generator=g, dtype=torch.float64)
    index = torch.randint(0, 3, (3, 2), generator=g)
    wt = torch.rand(3, 2, 2, 64, generator=g, dtype=torch.float64)
    for out in ("channels", "pixels"):
        got = fastmix.freq_mix(x, index, wt, keep=[3, 1, 100], seed=6, out=out)
        want = fastmix.freq_mix_ref(x, index, wt, keep=[3, 1, 100], seed=6, out=out)
        assert (got - want).abs().max().item() <= 1e-12 * max(1.0, want.abs().max().item())
    xs = (torch.rand(1, 3, 3, 2, generator=g, dtype=torch.float64) * 2 - 1).requires_grad_()
    assert torch.autograd.gradcheck(lambda t: fastmix.frontend(t, upsample=8, seed=1), (xs,))
    assert rel_err(fastmix.block_dct(x), fastmix.block_dct_ref(x)) < 1e-14


def test_frontend_bf16_output():
    x = torch.rand(2, 3, 2, 3, generator=_gen(21)) * 2 - 1
    y = fastmix.frontend(x, upsample=8, seed=5, out_dtype=torch.bfloat16)
    assert y.dtype == torch.bfloat16
    yr = fastmix.frontend_ref(x.double(), upsample=8, seed=5)
    assert rel_err(y, yr) < RTOL[torch.bfloat16]


# ----------------------------------------------------------------------------------------------------
# Registration: opcheck on the custom ops, torch.compile(fullgraph=True)
# ----------------------------------------------------------------------------------------------------


def _mix_args(pixels: bool, per_image: bool):
    from fastmix.ops.freq_mix import dct_geometry, keep_positions

    g = _gen(30)
    n, c, h, w, m, k = 2, 1, 8, 16, 3, 2
    x = torch.randn(n, c, h, w, generator=g, requires_grad=True)
    index = torch.randint(0, n, (m, k), generator=g)
    wt = (torch.rand(m, k, generator=g) if per_image else torch.rand(m, k, 1, 64, generator=g)).requires_grad_()
    ids = tuple(range(1, 64))
    pos = keep_positions(ids, c * 64, x.device)
    rows, cols = dct_geometry(h, torch.float32, x.device), dct_geometry(w, torch.float32, x.device)
    return (x, index, wt, pos, len(ids), 77, True, pixels, rows[0], rows[1], cols[0], cols[1], None)


@pytest.mark.parametrize("pixels,per_image", [(False, True), (True, False)], ids=["channels-image", "pixels-freq"])
def test_opcheck_mix(pixels, per_image):
    import fastmix.ops._triton.mix  # noqa: F401  (registers the ops)

    args = _mix_args(pixels, per_image)
    torch.library.opcheck(torch.ops.fastmix.mix_fwd_triton.default, args)
    x, index, wt, pos, n_kept, seed, use_seed, px, rm, rs, cm, cs, _ = args
    y = torch.ops.fastmix.mix_fwd_triton(*args)
    grad = torch.randn(y.shape, generator=_gen(31))
    bargs = (grad, x.detach(), index, wt.detach(), pos, seed, use_seed, px, rm, rs, cm, cs, True, True)
    torch.library.opcheck(torch.ops.fastmix.mix_bwd_triton.default, bargs,
                          test_utils=("test_schema", "test_faketensor", "test_autograd_registration"))


def test_opcheck_block_dct():
    import fastmix.ops._triton.dct  # noqa: F401

    x = torch.randn(2, 8, 16, generator=_gen(32), requires_grad=True)
    torch.library.opcheck(torch.ops.fastmix.block_dct_triton.default, (x, 8, False))


def test_torch_compile_fullgraph():
    g = _gen(33)
    x = torch.randn(2, 1, 8, 16, generator=g, requires_grad=True)
    index = torch.tensor([[0, 1], [1, 0]])
    wt = torch.rand(2, 2, generator=g)
    keep = list(range(1, 64))

    def f(xx):
        return fastmix.freq_mix(xx, index, wt, keep=keep, seed=9).square().sum()

    torch._dynamo.reset()
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    out.backward()
    ref = fastmix.freq_mix_ref(x.detach().double(), index, wt.double(), keep=keep, seed=9).square().sum()
    assert abs(out.item() - ref.item()) <= 1e-5 * abs(ref.item())
    assert torch.isfinite(x.grad).all()
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------
# The real compiler, no GPU: every kernel compiles for sm_90 and sm_80 without register spills
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("arch", [90, 80])
def test_kernels_compile_for_sm90_and_sm80(arch):
    """Hopper (wgmma) and Ampere (mma.sync, 163 KB of shared memory per block) take different code paths in
    Triton's backend; a kernel that compiles for one may fail or spill on the other."""
    script = os.path.join(os.path.dirname(os.path.abspath(__file__)), "compile_sm90.py")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    proc = subprocess.run([sys.executable, script, "--quick", "--arch", str(arch)], env=env, capture_output=True,
                          text=True, timeout=600)
    print(proc.stdout[-4000:])
    if proc.returncode != 0 and "No module named" in proc.stderr:
        pytest.skip(f"triton's compiler is not usable here: {proc.stderr.strip().splitlines()[-1]}")
    assert proc.returncode == 0, proc.stdout[-4000:] + proc.stderr[-4000:]


def _l2_model():
    path = os.path.join(os.path.dirname(__file__), "..", "..", "benches", "l2_model.py")
    spec = importlib.util.spec_from_file_location("l2_model", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_l2_model_of_the_program_orders():
    """benches/l2_model.py, behind the CONFIG["dct_order"] comment: both orders visit every program once;
    with an L2 larger than the data every image is fetched once (compulsory misses only); with a small one
    the row-fastest order fetches fewer bytes from DRAM in the forward and the backward."""
    lm = _l2_model()
    for order in ("tile", "row"):
        progs = list(lm.program_order(order, 5, 3, 4))
        assert sorted(progs) == [(r, c, t) for r in range(5) for c in range(3) for t in range(4)]
    n, k, h, w = 64, 6, 32, 32
    plane = h * w * 4
    big = {o: lm.simulate(n, 3, h, w, k, 8, 1 << 30, o) for o in ("tile", "row")}
    for o in big:
        assert big[o]["fwd"][1] == pytest.approx(n * 3 * plane / 1e6)
        assert big[o]["fwd"][0] == pytest.approx(n * k * 3 * plane / 1e6)  # whole 8x8 tiles: no partial lines
    small = {o: lm.simulate(n, 3, h, w, k, 8, 256 << 10, o) for o in ("tile", "row")}
    assert small["row"]["fwd"][1] < 0.5 * small["tile"]["fwd"][1]
    assert small["row"]["bwd"][1] < small["tile"]["bwd"][1]
