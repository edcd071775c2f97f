"""torch.library.opcheck of the registered ops, and torch.compile(fullgraph=True) of the public ops."""
from __future__ import annotations

import pytest
import torch
import torch._dynamo

import fastmix
from fastmix import _backend
from fastmix.ops.freq_mix import dct_geometry, keep_positions
from fastmix.ops.frontend import upsample_geometry
from _fastmix_testing import rand_faces, rand_index, rand_weight, randn

CPU = torch.device("cpu")


@pytest.fixture
def ext():
    """The C++ extension with its fake and autograd registrations attached (skipped, with the fix, if absent)."""
    if _backend.cpu_extension() is None:
        pytest.skip(f"fastmix._C is not built{_backend.extension_error('fastmix._C')}: {_backend.BUILD_HINT}")
    return torch.ops.fastmix


# ----------------------------------------------------------------------------------------------------
# opcheck: schema, fake (meta) kernel, autograd registration, AOT dispatch with dynamic shapes
# ----------------------------------------------------------------------------------------------------


def _mix_args(gen, *, dtype, wkind, ids, seed, pixels, geometry, out_dtype, requires_grad):
    n, c, m, k = 3, 2, 4, 2
    if geometry == "dct":
        h, w = 8, 16
        x = randn(gen, n, c, h, w, dtype=dtype)
        cd = torch.float64 if dtype == torch.float64 else torch.float32
        rows, cols = dct_geometry(h, cd, CPU), dct_geometry(w, cd, CPU)
    else:  # the frontend's: bilinear x4 folded into the row/column matrices (patch extent R < 8)
        h, w = 4, 6
        x = randn(gen, n, c, h, w, dtype=dtype)
        rows, cols = upsample_geometry(h, 4, dtype, CPU), upsample_geometry(w, 4, dtype, CPU)
    index = torch.tensor([[0, 1], [2, 2], [1, 0], [0, 0]])
    weight = rand_weight(gen, wkind, m, k, c, dtype=dtype)
    if weight.dim() == 3:
        weight = weight.unsqueeze(2)  # the op takes (M, k) or (M, k, Cw, 64)
    x.requires_grad_(requires_grad)
    weight.requires_grad_(requires_grad)
    pos = keep_positions(tuple(ids), c * 64, CPU)
    return (x, index, weight, pos, len(ids), seed or 0, seed is not None, pixels, *rows, *cols, out_dtype)


_FWD = {
    "img-channels-seed": dict(dtype=torch.float64, wkind="img", ids=[0, 3, 64, 100], seed=5, pixels=False, geometry="dct", out_dtype=None),
    "freq-pixels": dict(dtype=torch.float32, wkind="freq", ids=list(range(1, 128)), seed=None, pixels=True, geometry="dct", out_dtype=None),
    "cfreq-channels-f16": dict(dtype=torch.float16, wkind="cfreq", ids=list(range(0, 128, 3)), seed=2**40, pixels=False, geometry="dct", out_dtype=None),
    "frontend-geometry-bf16-out": dict(dtype=torch.float32, wkind="freq", ids=[1, 2, 65], seed=9, pixels=False, geometry="upsample", out_dtype=torch.bfloat16),
}


@pytest.mark.parametrize("case", list(_FWD))
def test_opcheck_mix_fwd(ext, gen, case):
    kw = _FWD[case]
    args = _mix_args(gen, **kw, requires_grad=kw["dtype"] != torch.float16)
    torch.library.opcheck(ext.mix_fwd.default, args)


@pytest.mark.parametrize("need_x,need_w", [(True, True), (True, False), (False, True)], ids=["x_w", "x_only", "w_only"])
@pytest.mark.parametrize("pixels", [False, True], ids=["channels", "pixels"])
def test_opcheck_mix_bwd(ext, gen, need_x, need_w, pixels):
    x, index, weight, pos, n_kept, seed, use_seed, _, rm, rs, cm, cs, _ = _mix_args(
        gen, dtype=torch.float64, wkind="freq", ids=[0, 5, 64, 127], seed=3, pixels=pixels, geometry="dct",
        out_dtype=None, requires_grad=False,
    )
    y = ext.mix_fwd(x, index, weight, pos, n_kept, seed, True, pixels, rm, rs, cm, cs, None)
    grad = torch.randn_like(y)
    torch.library.opcheck(
        ext.mix_bwd.default, (grad, x, index, weight, pos, seed, True, pixels, rm, rs, cm, cs, need_x, need_w)
    )


@pytest.mark.parametrize(
    "shape,block,inverse",
    [((2, 3, 8, 16), 8, False), ((2, 3, 8, 16), 8, True), ((3, 4, 8), 4, False), ((16, 8), 8, True)],
    ids=["4d-dct", "4d-idct", "3d-block4", "2d-idct"],
)
def test_opcheck_block_dct(ext, gen, shape, block, inverse):
    x = randn(gen, *shape, dtype=torch.float64).requires_grad_()
    torch.library.opcheck(ext.block_dct.default, (x, block, inverse))


# ----------------------------------------------------------------------------------------------------
# torch.compile(fullgraph=True): no graph break, the same numbers as eager, forward and backward
# ----------------------------------------------------------------------------------------------------


@pytest.fixture
def fresh_dynamo():
    torch._dynamo.reset()
    yield
    torch._dynamo.reset()


def _compare_compiled(fn, inputs, op_backend, rtol=1e-5, atol=1e-5):
    # Inductor for the C++ ops (what users run); the torch backend is the reference, whose Inductor
    # codegen (int64 hash arithmetic, einsums) takes minutes on 2 cores and tests PyTorch more than
    # fastmix: for it, aot_eager checks the full-graph trace and the AOT-autograd backward.
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager" if op_backend == "torch" else "inductor")
    eager_in = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    comp_in = [t.clone().requires_grad_(t.is_floating_point()) for t in inputs]
    ye, yc = fn(*eager_in), compiled(*comp_in)
    torch.testing.assert_close(yc, ye, rtol=rtol, atol=atol)
    g = torch.randn_like(ye)
    (ye * g).sum().backward()
    (yc * g).sum().backward()
    for a, b in zip(eager_in, comp_in):
        if a.is_floating_point():
            torch.testing.assert_close(b.grad, a.grad, rtol=rtol, atol=atol)
    return yc


_NO_DC = [ch for ch in range(192) if ch % 64]


def test_compile_freq_mix_channels(backend, gen, fresh_dynamo):
    x = randn(gen, 4, 3, 16, 24)
    index, weight = rand_index(gen, 4, 5, 3), rand_weight(gen, "img", 5, 3, 3)

    def f(x, weight):
        return fastmix.freq_mix(x, index, weight, keep=_NO_DC, seed=11)

    y = _compare_compiled(f, [x, weight], backend)
    assert y.shape == (5, 189, 2, 3)


def test_compile_freq_mix_pixels_per_frequency(backend, gen, fresh_dynamo):
    x = randn(gen, 3, 1, 8, 16)
    index, weight = rand_index(gen, 3, 3, 2), rand_weight(gen, "freq", 3, 2, 1)

    def f(x, weight):
        return fastmix.freq_mix(x, index, weight, keep=[1, 2, 3, 9, 10], out="pixels")

    _compare_compiled(f, [x, weight], backend)


def test_compile_frontend(backend, gen, fresh_dynamo):
    x = rand_faces(gen, 3, 3, 4, 6)
    index, weight = rand_index(gen, 3, 4, 2), rand_weight(gen, "cfreq", 4, 2, 3)

    def f(x, weight):
        return fastmix.frontend(x, upsample=8, keep=_NO_DC, index=index, weight=weight, seed=3)

    y = _compare_compiled(f, [x, weight], backend, rtol=1e-4, atol=1e-3)  # values ~1e3: float32 colour transform reordered
    assert y.shape == (4, 189, 4, 6)


def test_compile_frontend_grey_no_mixing(backend, gen, fresh_dynamo):
    x = rand_faces(gen, 2, 1, 8, 16)

    def f(x):
        return fastmix.frontend(x, upsample=1, color="none", keep=list(range(1, 64)), out_dtype=torch.float32)

    _compare_compiled(f, [x], backend, rtol=1e-4, atol=1e-3)


def test_compile_fresh_seed_per_call_does_not_recompile(backend, gen, fresh_dynamo):
    """The seed stays symbolic (a SymInt in the op schema): a fresh seed per step does not recompile."""
    x = randn(gen, 4, 3, 8, 8)
    index, weight = rand_index(gen, 4, 4, 2), rand_weight(gen, "img", 4, 2, 3)

    def f(x, seed):
        return fastmix.freq_mix(x, index, weight, keep=_NO_DC, seed=seed)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for seed in range(100, 112):  # more distinct seeds than dynamo's recompile limit (8)
        torch.testing.assert_close(compiled(x, seed), f(x, seed))


def test_compile_two_keep_sets_in_one_graph(backend, gen, fresh_dynamo):
    """Two keep sets (and the frontend's default next to an explicit one) in one graph: baked in as
    constants named after their function, they collided in Inductor ("ConstantSource(source_name=
    'keep_positions') already in seen_sources"); they come from ops now."""
    x = randn(gen, 4, 3, 8, 16)
    faces = rand_faces(gen, 4, 3, 1, 2)
    index, weight = rand_index(gen, 4, 3, 2), rand_weight(gen, "img", 3, 2, 3)

    def f(x, weight):
        a = fastmix.freq_mix(x, index, weight, keep=[1, 2, 70])
        b = fastmix.freq_mix(x, index, weight, keep=[3, 4])
        c = fastmix.frontend(faces, upsample=8, index=index, weight=weight)
        return torch.cat([a.flatten(1), b.flatten(1), c.flatten(1) / 100], 1)

    _compare_compiled(f, [x, weight], backend, rtol=1e-4, atol=1e-3)


def test_compile_image_size_changes(backend, gen, fresh_dynamo):
    """ORL (112x92) then LFW-sized (112x112) faces through one compiled function: the second size made
    Dynamo pass a symbolic size to the geometry, which fullgraph refused; each size gets its geometry."""
    index, weight = rand_index(gen, 2, 2, 2), rand_weight(gen, "img", 2, 2, 1)

    def f(x, weight):
        return fastmix.frontend(x, upsample=2, color="none", index=index, weight=weight, seed=5)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager" if backend == "torch" else "inductor")
    for h, w in [(8, 12), (8, 16), (12, 20)]:  # three sizes: Dynamo turns to dynamic shapes after the second
        x = rand_faces(gen, 2, 1, h, w)
        torch.testing.assert_close(compiled(x, weight), f(x, weight), rtol=1e-4, atol=1e-3)
    y = randn(gen, 2, 1, 16, 24)
    g = torch.compile(lambda y: fastmix.freq_mix(y, index, weight), fullgraph=True, backend="aot_eager")
    for hw in [(16, 24), (8, 16), (24, 8)]:
        y = randn(gen, 2, 1, *hw)
        torch.testing.assert_close(g(y), fastmix.freq_mix(y, index, weight))
