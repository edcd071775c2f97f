"""The CUDA kernels' logic, run on the CPU: csrc/cuda/mix_kernels.cuh through tests/cuda/emulate.cpp.

The CUDA backend's kernels are functors run once per CUDA thread id (no shared memory, barriers or atomics),
so a CPU loop over the thread ids computes exactly what the GPU computes, up to the order of float
operations inside the compiler's fused multiply-adds. emulate.cpp registers that loop as
fastmix_cuda_emu::mix_fwd / mix_bwd (the schemas of fastmix::mix_fwd / mix_bwd); these tests compare it with
the CPU backend's C++ ops (themselves checked against the float64 references by the core tests) on every
code path: DCT geometry (freq_mix, both outputs), resampling geometry with the compile-time extent R = 3
(frontend at upsample 8) and a run-time extent, per-image and per-frequency weights, zero-weight partners,
NaN inputs, signs, keep subsets, and the input / output dtypes.

What this cannot check (benches/gpu_bench.py on a GPU does): the nvcc build for the device, races, launch
limits, speed. The extension is compiled here with the host compiler (about 15 s); it is not part of the
package.
"""
from __future__ import annotations

import os

import pytest
import torch

from fastmix.ops.freq_mix import dct_geometry, keep_positions
from fastmix.ops.frontend import upsample_geometry
from fastmix.ops.sign import sign_ref

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

# Tolerances are data: |emulated - cpu| <= atol * max(1, max|cpu|) (elementwise, NaN positions equal).
# float64 and float32 differ only in summation order; half-type outputs may straddle one rounding step.
ATOL = {torch.float64: 1e-12, torch.float32: 2e-6, torch.float16: 2.0**-10, torch.bfloat16: 2.0**-7}
# Weight gradients are sums over every pixel of a plane (hundreds of terms that cancel), summed in another
# order by each backend: their float32 difference scales with the terms, not with the (smaller) result.
ATOL_SUM = {torch.float64: 1e-11, torch.float32: 2e-5}


@pytest.fixture(scope="module")
def emu(tmp_path_factory):
    from torch.utils.cpp_extension import load

    import fastmix

    assert fastmix._backend.cpu_extension() is not None, "fastmix._C must be built (pip install --no-build-isolation -e .)"
    build = tmp_path_factory.mktemp("cuda_emu")
    load(
        name="fastmix_cuda_emu",
        sources=[os.path.join(ROOT, "tests", "cuda", "emulate.cpp")],
        extra_include_paths=[os.path.join(ROOT, "csrc")],
        extra_cflags=["-O1", "-std=c++17"],
        build_directory=str(build),
        is_python_module=False,
    )
    return torch.ops.fastmix_cuda_emu


def _close(got, want, dtype, what, atol=ATOL):
    assert got.shape == want.shape, f"{what}: shape {tuple(got.shape)} != {tuple(want.shape)}"
    assert got.dtype == want.dtype, f"{what}: dtype {got.dtype} != {want.dtype}"
    if want.numel() == 0:
        return
    g, w = got.double(), want.double()
    assert torch.equal(torch.isnan(g), torch.isnan(w)), f"{what}: NaN at different positions"
    fin = torch.isfinite(w)
    scale = max(1.0, w[fin].abs().max().item()) if fin.any() else 1.0
    err = (g[fin] - w[fin]).abs().max().item() if fin.any() else 0.0
    assert err <= atol[dtype] * scale, f"{what}: max |emulated - cpu| = {err:.3e} > {atol[dtype] * scale:.3e}"


# (image height, width, upsample): the plain DCT (R = 8), upsample 8 (R = 3: the compile-time extent),
# upsample 4 (R = 4) and 2 (R = 6): extents read at run time.
GEOMETRIES = {"dct": (16, 24, 1), "x8": (5, 7, 8), "x4": (6, 4, 4), "x2": (4, 12, 2)}
INDEX = [[0, 1, 2], [1, 0, 3], [3, 3, 0], [2, 1, 0]]  # partners repeat; image 4 is read by no output


def _args(geo, wkind, seed, pixels, dtype, out_dtype=None, keep="subset", gen_seed=0):
    g = torch.Generator().manual_seed(gen_seed)
    h, w, up = GEOMETRIES[geo]
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    cpu = torch.device("cpu")
    if up == 1:
        rows, cols = dct_geometry(h, cd, cpu), dct_geometry(w, cd, cpu)
    else:
        rows, cols = upsample_geometry(h, up, cd, cpu), upsample_geometry(w, up, cd, cpu)
    n, c = 5, 3
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64).to(dtype)
    index = torch.tensor(INDEX)
    m, k = index.shape
    shape = {"img": (m, k), "freq": (m, k, 1, 64), "cfreq": (m, k, c, 64)}[wkind]
    weight = torch.randn(shape, generator=g, dtype=torch.float64).to(cd)
    weight[0, 2] = 0.0  # a padded partner: skipped everywhere
    if wkind != "img":
        weight[1, 0, :, 5] = 0.0  # one frequency of one partner removed
    ids = [i for i in range(c * 64) if i % 5 != 1] if keep == "subset" else list(range(c * 64))
    pos = keep_positions(tuple(ids), c * 64, cpu)
    return (x, index, weight, pos, len(ids), 0 if seed is None else seed, seed is not None, pixels,
            rows[0], rows[1], cols[0], cols[1], out_dtype)


def _fwd_both(emu, args):
    return emu.mix_fwd(*args), torch.ops.fastmix.mix_fwd(*args)


def _bwd_both(emu, args, grad, need_x, need_w):
    x, index, weight, pos, _, seed, use_seed, pixels, rm, rs, cm, cs, _ = args
    bargs = (grad, x, index, weight, pos, seed, use_seed, pixels, rm, rs, cm, cs, need_x, need_w)
    return emu.mix_bwd(*bargs), torch.ops.fastmix.mix_bwd(*bargs)


CASES = [
    # (geometry, weights, seed, pixels)
    ("dct", "img", 7, False),
    ("dct", "img", None, True),
    ("dct", "freq", 7, True),
    ("dct", "cfreq", None, False),
    ("x8", "img", 7, False),
    ("x8", "freq", None, False),
    ("x8", "cfreq", 11, False),
    ("x4", "img", 7, False),
    ("x2", "img", None, False),
    ("x2", "cfreq", 3, False),
]


@pytest.mark.parametrize("dtype", [torch.float64, torch.float32], ids=["f64", "f32"])
@pytest.mark.parametrize("geo,wkind,seed,pixels", CASES)
def test_forward_and_backward_match_cpu_backend(emu, geo, wkind, seed, pixels, dtype):
    args = _args(geo, wkind, seed, pixels, dtype)
    got, want = _fwd_both(emu, args)
    _close(got, want, dtype, "forward")
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(1), dtype=torch.float64).to(want.dtype)
    for need_x, need_w in ((True, True), (True, False), (False, True)):
        (gx, gw), (cx, cw) = _bwd_both(emu, args, grad, need_x, need_w)
        if need_x:
            _close(gx, cx, dtype, f"grad x (need_w={need_w})")
            assert torch.count_nonzero(gx[4]) == 0, "image 4 is read by no output: its gradient must be exactly 0"
        else:
            assert gx.numel() == 0
        if need_w:
            _close(gw, cw, dtype, f"grad weight (need_x={need_x})", atol=ATOL_SUM)
            assert torch.count_nonzero(gw[0, 2]) == 0, "a zero-weight partner gets an exactly zero weight gradient"
        else:
            assert gw.numel() == 0


@pytest.mark.parametrize("geo", ["dct", "x8"])
@pytest.mark.parametrize("in_dtype,out_dtype", [(torch.bfloat16, None), (torch.float16, torch.float32),
                                                (torch.float32, torch.bfloat16)], ids=["bf16", "f16-f32", "f32-bf16"])
def test_half_types_match_cpu_backend(emu, geo, in_dtype, out_dtype):
    args = _args(geo, "img", 5, False, in_dtype, out_dtype=out_dtype)
    got, want = _fwd_both(emu, args)
    od = out_dtype or in_dtype
    _close(got, want, od, "forward")
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(2)).to(want.dtype)
    (gx, gw), (cx, cw) = _bwd_both(emu, args, grad, True, True)
    assert gx.dtype == in_dtype
    # grad_x rounds once to the input dtype; grad_w is float32, summed in another order.
    _close(gx, cx, in_dtype, "grad x")
    _close(gw, cw, torch.float32, "grad weight", atol=ATOL_SUM)


@pytest.mark.parametrize("geo", ["dct", "x8", "x2"])
def test_nan_reaches_exactly_the_blocks_that_read_it(emu, geo):
    args = list(_args(geo, "img", 7, False, torch.float32, keep="all"))
    x = args[0].clone()
    x[3, 1, 2, 3] = float("nan")  # read by outputs 1 and 2 (nonzero weights)
    x[2, 0, 0, 0] = float("nan")  # image 2 is output 0's zero-weight partner (index[0, 2] = 2), and output 3's
    args[0] = x
    got, want = _fwd_both(emu, tuple(args))
    assert torch.isnan(want).any() and not torch.isnan(want).all()
    _close(got, want, torch.float32, "forward with NaN pixels")
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(3))
    (gx, gw), (cx, cw) = _bwd_both(emu, tuple(args), grad, True, True)
    _close(gx, cx, torch.float32, "grad x with NaN pixels")
    _close(gw, cw, torch.float32, "grad weight with NaN pixels", atol=ATOL_SUM)


def test_signs_are_the_cpu_hash_bit_for_bit(emu):
    # One partner of weight 1 per output: every coefficient is +-|coef| and its sign is the hash's.
    args = list(_args("x8", "img", 123456789, False, torch.float64, keep="all"))
    args[1] = torch.tensor([[0], [1], [2]])
    args[2] = torch.ones(3, 1, dtype=torch.float64)
    signed, _ = _fwd_both(emu, tuple(args))
    args[6] = False
    plain, _ = _fwd_both(emu, tuple(args))
    want = torch.ops.fastmix.mix_fwd(*args[:6], True, *args[7:])
    nz = plain.abs() > 1e-9
    assert torch.equal(torch.sign(signed[nz]), torch.sign(want[nz]))
    # ... and the specification's signs (fastmix/ops/sign.py), directly: signed = plain * s.
    spec = sign_ref(123456789, 3, 192, plain.shape[2], plain.shape[3], dtype=torch.float64)
    assert torch.equal((torch.sign(signed) * torch.sign(plain))[nz], spec[nz])
    assert (torch.sign(signed[nz]) != torch.sign(plain[nz])).any(), "the seed flipped no sign"


def test_empty_and_out_of_range(emu):
    args = list(_args("dct", "img", None, False, torch.float32))
    args[1] = args[1][:0]
    args[2] = args[2][:0]
    out = emu.mix_fwd(*args)
    assert out.shape == (0, args[4], 2, 3)
    args = list(_args("dct", "img", None, False, torch.float32))
    args[1] = torch.tensor(INDEX) + 10
    with pytest.raises(RuntimeError, match="outside"):
        emu.mix_fwd(*args)


@pytest.mark.parametrize("geo,wkind", [("dct", "img"), ("x8", "img"), ("x8", "cfreq")])
def test_nan_gradient_reaches_what_the_cpu_backend_reaches(emu, geo, wkind):
    # A NaN in the output gradient of block (0, 0) of output 0: the patch pixels that block never reads (at
    # upsample 8 its patch's third row and column; other blocks read them) and output 0's zero-weight
    # partner (image 2 at t = 2) must get exact zeros from it, not 0 * NaN.
    args = _args(geo, wkind, 7, False, torch.float32, keep="all")
    got, want = _fwd_both(emu, args)
    grad = torch.randn(want.shape, generator=torch.Generator().manual_seed(4))
    grad[0, 10, 0, 0] = float("nan")
    (gx, gw), (cx, cw) = _bwd_both(emu, args, grad, True, True)
    assert torch.isnan(cx).any() and not torch.isnan(cx).all()
    _close(gx, cx, torch.float32, "grad x with a NaN gradient")
    _close(gw, cw, torch.float32, "grad weight with a NaN gradient", atol=ATOL_SUM)


@pytest.mark.parametrize("k", [1, 8, 10])
def test_partner_counts_around_the_register_slots(emu, k):
    # The resampling forward keeps up to 8 partners in registers (kMaxHoistedK) and loops beyond that.
    args = list(_args("x8", "img", 7, False, torch.float32))
    g = torch.Generator().manual_seed(k)
    args[1] = torch.randint(0, 5, (4, k), generator=g)
    args[2] = torch.randn(4, k, generator=g)
    args[2][1, k // 2] = 0.0
    got, want = _fwd_both(emu, tuple(args))
    _close(got, want, torch.float32, f"forward, k = {k}")
    (gx, gw), (cx, cw) = _bwd_both(emu, tuple(args), torch.randn(want.shape, generator=g), True, True)
    _close(gx, cx, torch.float32, f"grad x, k = {k}")
    _close(gw, cw, torch.float32, f"grad weight, k = {k}", atol=ATOL_SUM)


@pytest.mark.parametrize("case", range(100))
def test_random_configurations_match_cpu_backend(emu, case):
    # A differential sweep over shapes the fixed cases above do not reach: grey (C = 1) and odd-sized
    # images, upsample 16 (R = 3 again) and 4, M != N, random keep sets and partner counts.
    g = torch.Generator().manual_seed(1000 + case)
    pick = lambda seq: seq[int(torch.randint(len(seq), (1,), generator=g))]  # noqa: E731
    up = pick([1, 4, 8, 16])
    if up == 1:
        h, w = 8 * pick([1, 2, 3]), 8 * pick([1, 2, 5])
    else:
        h, w = pick([2, 3, 6, 13]), pick([2, 4, 9])
        if (h * up) % 8 or (w * up) % 8:
            h, w = 2 * h, 2 * w
    c, n, m, k = pick([1, 3]), pick([1, 2, 5]), pick([1, 3, 6]), pick([1, 2, 4, 6])
    wkind = pick(["img", "freq", "cfreq"])
    cpu = torch.device("cpu")
    rows = dct_geometry(h, torch.float32, cpu) if up == 1 else upsample_geometry(h, up, torch.float32, cpu)
    cols = dct_geometry(w, torch.float32, cpu) if up == 1 else upsample_geometry(w, up, torch.float32, cpu)
    x = torch.randn(n, c, h, w, generator=g)
    index = torch.randint(0, n, (m, k), generator=g)
    shape = {"img": (m, k), "freq": (m, k, 1, 64), "cfreq": (m, k, c, 64)}[wkind]
    weight = torch.randn(shape, generator=g) * (torch.rand(shape, generator=g) > 0.15)  # some exact zeros
    ids = sorted(set(torch.randint(0, c * 64, (int(torch.randint(1, c * 64 + 1, (1,), generator=g)),), generator=g).tolist()))
    pos = keep_positions(tuple(ids), c * 64, cpu)
    seed = pick([None, 5, 2**40 + 1])
    pixels = up == 1 and pick([False, True])
    args = (x, index, weight, pos, len(ids), seed or 0, seed is not None, pixels, rows[0], rows[1], cols[0], cols[1], None)
    got, want = _fwd_both(emu, args)
    what = f"up={up} {h}x{w} C={c} N={n} M={m} k={k} {wkind} seed={seed} pixels={pixels} kept={len(ids)}"
    _close(got, want, torch.float32, f"forward ({what})")
    (gx, gw), (cx, cw) = _bwd_both(emu, args, torch.randn(want.shape, generator=g), True, True)
    _close(gx, cx, torch.float32, f"grad x ({what})")
    _close(gw, cw, torch.float32, f"grad weight ({what})", atol=ATOL_SUM)


@pytest.mark.parametrize("geo,wkind,seed,pixels", [("dct", "img", 7, False), ("dct", "freq", None, True),
                                                   ("x8", "img", 7, False), ("x4", "cfreq", 3, False)])
@pytest.mark.parametrize("kind", ["gaussian", "laplace"])
def test_noise_matches_cpu_backend_and_the_specification(emu, geo, wkind, seed, pixels, kind):
    """The seeded noise (csrc/noise.h): the same output as the CPU backend, and on zero images (channels
    output) exactly the specification's bits (fastmix/ops/noise.py)."""
    from fastmix.ops.noise import noise_ref, noise_table

    args = _args(geo, wkind, seed, pixels, torch.float32)
    table = noise_table(kind)
    scale = torch.rand(192, generator=torch.Generator().manual_seed(4)) * 3
    noisy = args + (scale, table, 2**45 + 9)
    got, want = _fwd_both(emu, noisy)
    _close(got, want, torch.float32, f"noise {geo}/{wkind}")
    plain, _ = _fwd_both(emu, args)
    assert (got - plain).abs().max() > 0.1
    if not pixels:
        zero = (torch.zeros_like(args[0]),) + noisy[1:]
        got, want = _fwd_both(emu, zero)
        spec = noise_ref(2**45 + 9, 4, 192, got.shape[2], got.shape[3], table, scale)
        kept = (args[3] >= 0).nonzero().flatten()
        assert torch.equal(got, spec[:, kept]) and torch.equal(want, got)
