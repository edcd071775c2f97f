"""torch.autocast: every public op computes in the precision it promises, whatever autocast region it is
called in (autocast lowered the front-end's colour einsum to bfloat16: errors of 3.5-6 on values up to ~680
in a float32 result). Each op is run inside torch.autocast("cpu", torch.bfloat16) and outside it, on every
backend present, and the two results compared."""
from __future__ import annotations

import pytest
import torch

import fastmix
from fastmix.nn import HybridMask
from _fastmix_testing import rand_faces, rand_index, rand_weight, randn

# The same kernels on the same inputs, with autocast off inside the ops: the results must be identical.
# (Had autocast reached a matmul, the bfloat16 rounding would show at ~1e-2 relative.)
AUTOCAST_ATOL = 0.0
AUTOCAST_RTOL = 0.0
AUTOCAST_DTYPES = [torch.bfloat16, torch.float16]

_NO_DC = [ch for ch in range(192) if ch % 64]


def _cases(gen):
    """name -> (function of its differentiable inputs, the inputs)."""
    x = randn(gen, 4, 3, 16, 24)
    faces = rand_faces(gen, 4, 3, 8, 4)
    grey = rand_faces(gen, 3, 1, 8, 16)
    index = rand_index(gen, 4, 5, 3)
    w_img, w_cfreq = rand_weight(gen, "img", 5, 3, 3), rand_weight(gen, "cfreq", 5, 3, 3)
    z = fastmix.frontend_ref(faces, upsample=2, keep=_NO_DC)
    return {
        "block_dct": (lambda x: fastmix.block_dct(x), [x]),
        "block_idct": (lambda x: fastmix.block_idct(x), [x]),
        "block_dct_ref": (lambda x: fastmix.block_dct_ref(x), [x]),
        "freq_mix_channels": (lambda x, w: fastmix.freq_mix(x, index, w, keep=_NO_DC, seed=3), [x, w_img]),
        "freq_mix_pixels_cfreq": (lambda x, w: fastmix.freq_mix(x, index, w, seed=4, out="pixels"), [x, w_cfreq]),
        "freq_mix_ref": (lambda x, w: fastmix.freq_mix_ref(x, index, w, seed=3), [x, w_img]),
        "frontend_ycbcr_up2": (
            lambda f, w: fastmix.frontend(f, upsample=2, keep=_NO_DC, index=index, weight=w, seed=5), [faces, w_img]),
        "frontend_ycbcr_up8_bf16_out": (
            lambda f: fastmix.frontend(f, upsample=8, out_dtype=torch.bfloat16), [faces]),
        "frontend_grey_up1": (lambda g: fastmix.frontend(g, upsample=1, color="none"), [grey]),
        "frontend_ref": (lambda f: fastmix.frontend_ref(f, upsample=2, keep=_NO_DC), [faces]),
        "frontend_inverse": (lambda z: fastmix.frontend_inverse(z, upsample=2, keep=_NO_DC), [z]),
    }


CASES = [
    "block_dct", "block_idct", "block_dct_ref", "freq_mix_channels", "freq_mix_pixels_cfreq", "freq_mix_ref",
    "frontend_ycbcr_up2", "frontend_ycbcr_up8_bf16_out", "frontend_grey_up1", "frontend_ref", "frontend_inverse",
]


def _run(fn, inputs, grad_out=None, autocast_dtype=None, backward_inside=False):
    """fn's output and its inputs' gradients (for grad_out), with the forward (and, if asked, the backward)
    inside torch.autocast("cpu", autocast_dtype)."""
    leaves = [t.detach().clone().requires_grad_() for t in inputs]
    ctx = torch.autocast("cpu", autocast_dtype) if autocast_dtype else torch.autocast("cpu", enabled=False)
    with ctx:
        y = fn(*leaves)
        if backward_inside and grad_out is not None:
            grads = torch.autograd.grad(y, leaves, grad_out.to(y.dtype))
    if grad_out is not None and not backward_inside:
        grads = torch.autograd.grad(y, leaves, grad_out.to(y.dtype))
    return y, (grads if grad_out is not None else None)


def _assert_same(got, want, what):
    assert got.dtype == want.dtype, f"{what}: {got.dtype} under autocast, {want.dtype} without"
    torch.testing.assert_close(got, want, rtol=AUTOCAST_RTOL, atol=AUTOCAST_ATOL, msg=lambda m: f"{what}: {m}")


@pytest.mark.parametrize("dtype", AUTOCAST_DTYPES, ids=["bf16", "f16"])
@pytest.mark.parametrize("case", CASES)
def test_forward_and_backward_ignore_autocast(backend, gen, case, dtype):
    """Forward inside autocast, backward outside it (PyTorch's recommended pattern): both as without autocast."""
    cases = _cases(gen)
    assert set(cases) == set(CASES)
    fn, inputs = cases[case]
    y0 = fn(*inputs)
    g = torch.randn(y0.shape, generator=gen)
    want, want_grads = _run(fn, inputs, g)
    got, got_grads = _run(fn, inputs, g, autocast_dtype=dtype)
    _assert_same(got, want, f"{case} forward")
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        _assert_same(a, b, f"{case} gradient of input {i}")


FUSED_CASES = [c for c in CASES if not c.endswith("_ref") and c != "frontend_inverse"]


@pytest.mark.parametrize("case", FUSED_CASES)
def test_fused_backward_inside_autocast(backend, gen, case):
    """A backward called inside the autocast region (which PyTorch discourages, but training loops do): the
    fused backends' gradients are custom ops and multiply-adds, exact there too. (The torch backend's
    gradients come from torch's own einsum backward, which autocast lowers like any matmul's.)"""
    if backend == "torch":
        pytest.skip("the reference's backward is PyTorch's einsum backward: lowered inside autocast by design")
    fn, inputs = _cases(gen)[case]
    g = torch.randn(fn(*inputs).shape, generator=gen)
    want, want_grads = _run(fn, inputs, g)
    got, got_grads = _run(fn, inputs, g, autocast_dtype=torch.bfloat16, backward_inside=True)
    _assert_same(got, want, f"{case} forward")
    for i, (a, b) in enumerate(zip(got_grads, want_grads)):
        _assert_same(a, b, f"{case} gradient of input {i}")


def test_autocast_still_applies_around_the_ops(gen):
    """The ops switch autocast off for themselves only: the model code around them keeps it."""
    x = randn(gen, 2, 3, 8, 8)
    a = randn(gen, 4, 4)
    with torch.autocast("cpu", torch.bfloat16):
        y = fastmix.frontend(rand_faces(gen, 2, 3, 2, 2), upsample=4)
        assert torch.is_autocast_enabled("cpu")
        assert (a @ a).dtype == torch.bfloat16
        assert fastmix.block_dct(x).dtype == torch.float32 and y.dtype == torch.float32


def test_hybrid_mask_under_autocast(backend, gen):
    faces = rand_faces(gen, 4, 3, 4, 6)
    labels = torch.arange(4)
    mask = HybridMask(3, generator=torch.Generator().manual_seed(2))
    p = mask.plan(4)
    want = mask(faces, labels, plan=p)
    with torch.autocast("cpu", torch.bfloat16):
        got = mask(faces, labels, plan=p)
    for a, b, what in zip(got, want, ("masked", "partner labels", "weights")):
        _assert_same(a, b, what)


def test_compiled_op_under_autocast(gen):
    """Under torch.compile the autocast switch is traced into the graph (fullgraph: no break)."""
    torch._dynamo.reset()
    x = randn(gen, 3, 3, 8, 16)
    index, w = rand_index(gen, 3, 3, 2), rand_weight(gen, "img", 3, 2, 3)

    def f(x, w):
        return fastmix.frontend(x.clamp(-1, 1), upsample=2, index=index, weight=w, seed=9)

    want = f(x, w)
    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    with torch.autocast("cpu", torch.bfloat16):
        got = compiled(x, w)
    torch._dynamo.reset()
    _assert_same(got, want, "compiled frontend")
