"""Calibrated noise drawn inside the fused op (fastmix/ops/noise.py): the table, the specification's bits on
every backend and CPU capability, the reference, gradients, opcheck / compile, the distribution, bad inputs."""
from __future__ import annotations

import json
import math
import os
import subprocess
import sys
import textwrap

import pytest
import torch

import fastmix
from fastmix import _backend
from fastmix.ops.freq_mix import dct_geometry, keep_positions
from fastmix.ops.noise import NOISES, TABLE_BITS, check_noise, noise_key, noise_ref, noise_table, table_stats
from fastmix.ops.sign import MASK32, mix32, sign_ref
from _fastmix_testing import rand_faces, rand_index, rand_weight, randn, run_on

CPU = torch.device("cpu")
C3 = 3 * 64
NO_DC = [ch for ch in range(C3) if ch % 64]


def _noisy(x, index, weight, kind="gaussian", nseed=77, scale=0.5, **kw):
    return fastmix.freq_mix(x, index, weight, noise=kind, noise_seed=nseed, noise_scale=scale, **kw)


# ----------------------------------------------------------------------------------------------------
# The table and the specification
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", NOISES)
def test_table_is_antisymmetric_with_the_law_s_moments(kind):
    t = noise_table(kind)
    assert t.dtype == torch.float32 and t.numel() == 2**TABLE_BITS
    assert torch.equal(t, -t.flip(0))  # exactly: the mean is 0
    assert bool((t[1:] >= t[:-1]).all())
    s = table_stats(kind)
    assert s["mean"] == 0.0
    assert s["ks"] < 2.0 ** -TABLE_BITS  # about half an atom's mass, 2**-(B+1)
    assert abs(s["variance"] / s["variance_law"] - 1) < 1e-3
    assert abs(s["kurtosis"] / s["kurtosis_law"] - 1) < 2e-2


def test_reference_is_the_specification_bit_for_bit():
    """noise_ref against a scalar transcription of the docstring's specification, at corner coordinates."""
    table = noise_table("laplace")
    scale = torch.rand(C3, generator=torch.Generator().manual_seed(0), dtype=torch.float32) * 3
    seed, m, hb, wb = 2**62 + 12345, 3, 5, 7
    ref = noise_ref(seed, m, C3, hb, wb, table, scale)
    key = mix32(mix32((seed >> 32) ^ 0x7F4A7C15) ^ (seed & MASK32))
    assert key == noise_key(seed)
    for mm, ch, i, j in [(0, 0, 0, 0), (2, 191, 4, 6), (1, 64, 0, 6), (2, 5, 3, 0)]:
        h = mix32(mix32(mix32(key ^ mm) ^ ch) ^ ((i << 16) | j))
        q = table[h >> (32 - TABLE_BITS)]
        want = (q * scale[ch]).item()  # one float32 product
        assert ref[mm, ch, i, j].item() == want


# ----------------------------------------------------------------------------------------------------
# Every backend draws the specification's bits
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", NOISES)
@pytest.mark.parametrize("with_sign", [False, True], ids=["nosign", "sign"])
def test_zero_input_gives_the_noise_bits(backend, gen, kind, with_sign):
    """x = 0: the output is exactly the noise (a fused multiply-add of 0 rounds as the product does)."""
    n, m, k, h, w = 3, 4, 2, 16, 24
    x = torch.zeros(n, 3, h, w)
    index, weight = rand_index(gen, n, m, k), rand_weight(gen, "img", m, k, 3)
    scale = torch.rand(64, generator=gen) * 4
    got = fastmix.freq_mix(x, index, weight, keep=NO_DC, seed=11 if with_sign else None, noise=kind,
                           noise_seed=2**40 + 3, noise_scale=scale)
    want = noise_ref(2**40 + 3, m, C3, h // 8, w // 8, noise_table(kind), scale.repeat(3))[:, NO_DC]
    assert torch.equal(got, want)


@pytest.mark.parametrize("wkind", ["img", "freq"])
@pytest.mark.parametrize("out", ["channels", "pixels"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.float64], ids=["f32", "f64"])
def test_freq_mix_with_noise_matches_reference(backend, gen, wkind, out, dtype):
    if backend == "triton" and dtype == torch.float64:
        pytest.skip("float64 on the triton backend runs the reference itself")
    n, m, k = 4, 5, 3
    x = randn(gen, n, 3, 16, 8, dtype=dtype)
    index, weight = rand_index(gen, n, m, k), rand_weight(gen, wkind, m, k, 3, dtype=dtype)
    scale = torch.rand(C3, generator=gen, dtype=torch.float64) * 2
    kw = dict(keep=NO_DC, seed=5, out=out, noise="laplace", noise_seed=9, noise_scale=scale)
    got = fastmix.freq_mix(x, index, weight, **kw)
    want = fastmix.freq_mix_ref(x.double(), index, weight.double(), **kw)
    tol = 1e-10 if dtype == torch.float64 else 2e-5
    torch.testing.assert_close(got.double(), want, rtol=tol, atol=tol * want.abs().max().item())
    clean = fastmix.freq_mix(x, index, weight, keep=NO_DC, seed=5, out=out)
    assert (got - clean).abs().max() > 0.1  # the noise is there


def test_frontend_with_noise_matches_reference(backend, gen):
    n, m, k = 3, 4, 2
    x = rand_faces(gen, n, 3, 4, 6)
    index, weight = rand_index(gen, n, m, k), rand_weight(gen, "img", m, k, 3)
    kw = dict(upsample=4, keep=NO_DC, index=index, weight=weight, seed=3, noise="gaussian", noise_seed=4,
              noise_scale=10.0)
    got = fastmix.frontend(x, **kw)
    want = fastmix.frontend_ref(x.double(), **{**kw, "weight": weight.double()}).float()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=2e-3)
    # what the noise adds is the specification's noise, up to the rounding of the add
    clean = fastmix.frontend(x, **{k_: v for k_, v in kw.items() if not k_.startswith("noise")})
    nz = noise_ref(4, m, C3, got.shape[2], got.shape[3], noise_table("gaussian"), torch.full((C3,), 10.0))[:, NO_DC]
    torch.testing.assert_close(got - clean, nz, rtol=0, atol=1e-3)


def test_noise_is_deterministic_and_keyed_by_noise_seed_only(gen):
    x = randn(gen, 3, 3, 16, 16)
    index, weight = rand_index(gen, 3, 3, 2), rand_weight(gen, "img", 3, 2, 3)
    a = _noisy(x, index, weight, seed=1)
    assert torch.equal(a, _noisy(x, index, weight, seed=1))
    assert not torch.equal(a, _noisy(x, index, weight, seed=1, nseed=78))
    # the noise does not depend on the sign seed, nor on the partners or weights
    z = torch.zeros_like(x)
    n1 = _noisy(z, index, weight, seed=1)
    n2 = _noisy(z, index.flip(0), weight * 2)
    assert torch.equal(n1, n2)


def test_noise_and_sign_streams_are_unrelated_for_equal_seeds():
    """noise_seed == seed: the noise key uses another domain constant, so sign bits and noise signs agree
    half the time (a shared stream would agree always)."""
    m, hb, wb = 8, 16, 16
    s = sign_ref(42, m, C3, hb, wb)
    q = noise_ref(42, m, C3, hb, wb, noise_table("gaussian"), torch.ones(C3))
    agree = ((q > 0) == (s > 0)).double().mean().item()
    assert abs(agree - 0.5) < 0.01


def test_noise_scale_forms_and_zero_scale(gen):
    x = randn(gen, 2, 3, 8, 8)
    index, weight = rand_index(gen, 2, 2, 2), rand_weight(gen, "img", 2, 2, 3)
    per_freq = torch.rand(64, generator=gen)
    a = _noisy(x, index, weight, scale=per_freq)
    b = _noisy(x, index, weight, scale=per_freq.repeat(3))
    assert torch.equal(a, b)
    assert torch.equal(_noisy(x, index, weight, scale=0.25), _noisy(x, index, weight, scale=torch.tensor(0.25)))
    assert torch.equal(_noisy(x, index, weight, scale=0.0), fastmix.freq_mix(x, index, weight))


# ----------------------------------------------------------------------------------------------------
# Distribution of what the op adds
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("kind", NOISES)
def test_drawn_noise_has_the_law_s_distribution(kind):
    m, h, w = 16, 64, 64  # 16 x 192 x 64 = 196,608 draws
    x = torch.zeros(m, 3, h, w)
    index, weight = torch.arange(m).view(m, 1), torch.ones(m, 1)
    z = _noisy(x, index, weight, kind=kind, nseed=5, scale=1.0).double().flatten()
    n = z.numel()
    var = 1.0 if kind == "gaussian" else 2.0
    assert abs(z.mean().item()) < 4 * math.sqrt(var / n)
    assert abs(z.var().item() / var - 1) < 0.02
    zs = z.sort().values
    cdf = torch.special.ndtr(zs) if kind == "gaussian" else torch.where(zs < 0, 0.5 * zs.exp(), 1 - 0.5 * (-zs).exp())
    i = torch.arange(n, dtype=torch.float64)
    ks = torch.maximum((cdf - i / n).abs(), (cdf - (i + 1) / n).abs()).max().item()
    assert ks < 1.63 / math.sqrt(n)  # the KS test's 1% critical value


# ----------------------------------------------------------------------------------------------------
# Gradients: the noise is additive, so they are those without noise
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("wkind", ["img", "freq"])
def test_gradients_are_those_without_noise(backend, gen, wkind):
    x = randn(gen, 4, 3, 8, 16).requires_grad_()
    index = rand_index(gen, 4, 3, 2)
    weight = rand_weight(gen, wkind, 3, 2, 3).requires_grad_()
    g = None
    grads = []
    for noisy in (False, True):
        kw = dict(noise="gaussian", noise_seed=1, noise_scale=3.0) if noisy else {}
        y = fastmix.freq_mix(x, index, weight, keep=NO_DC, seed=2, **kw)
        g = torch.randn(y.shape, generator=gen) if g is None else g
        grads.append(torch.autograd.grad((y * g).sum(), (x, weight)))
    for a, b in zip(*grads):
        assert torch.equal(a, b)


def test_gradcheck_with_noise(gen, one_thread):
    if _backend.cpu_extension() is None:
        pytest.skip("fastmix._C is not built")
    x = randn(gen, 2, 1, 8, 8, dtype=torch.float64).requires_grad_()
    index = torch.tensor([[0, 1], [1, 1]])
    weight = rand_weight(gen, "img", 2, 2, 1, dtype=torch.float64).requires_grad_()

    def f(x, w):
        return run_on("cpu", fastmix.freq_mix, x, index, w, keep=[1, 5, 63], seed=4, noise="laplace",
                      noise_seed=6, noise_scale=2.0)

    assert torch.autograd.gradcheck(f, (x, weight))
    assert torch.autograd.gradgradcheck(f, (x, weight))


# ----------------------------------------------------------------------------------------------------
# opcheck and torch.compile
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize("pixels", [False, True], ids=["channels", "pixels"])
def test_opcheck_mix_fwd_with_noise(gen, pixels):
    if _backend.cpu_extension() is None:
        pytest.skip("fastmix._C is not built")
    x = randn(gen, 3, 2, 8, 16, dtype=torch.float64).requires_grad_()
    index = torch.tensor([[0, 1], [2, 2], [1, 0]])
    weight = rand_weight(gen, "img", 3, 2, 2, dtype=torch.float64).requires_grad_()
    rows, cols = dct_geometry(8, torch.float64, CPU), dct_geometry(16, torch.float64, CPU)
    ids = [0, 3, 64, 100]
    pos = keep_positions(tuple(ids), 128, CPU)
    scale = torch.rand(128, generator=gen)
    args = (x, index, weight, pos, len(ids), 5, True, pixels, *rows, *cols, None, scale, noise_table("gaussian"), 2**33)
    torch.library.opcheck(torch.ops.fastmix.mix_fwd.default, args)


def test_compile_with_noise_fresh_noise_seed_does_not_recompile(backend, gen):
    import torch._dynamo

    torch._dynamo.reset()
    x = randn(gen, 4, 3, 8, 8)
    index, weight = rand_index(gen, 4, 4, 2), rand_weight(gen, "img", 4, 2, 3)
    scale = torch.rand(64, generator=gen)

    def f(x, nseed):
        return fastmix.freq_mix(x, index, weight, keep=NO_DC, seed=3, noise="gaussian", noise_seed=nseed,
                                noise_scale=scale)

    compiled = torch.compile(f, fullgraph=True, backend="aot_eager")
    for s in range(100, 112):  # more distinct seeds than dynamo's recompile limit (8)
        torch.testing.assert_close(compiled(x, s), f(x, s), rtol=0, atol=0)
    if backend != "torch":
        xi = x.clone().requires_grad_()
        comp = torch.compile(f, fullgraph=True, backend="inductor")
        y = comp(xi, 5)
        torch.testing.assert_close(y, f(x, 5), rtol=1e-5, atol=1e-5)
        y.sum().backward()
        assert xi.grad is not None
    torch._dynamo.reset()


# ----------------------------------------------------------------------------------------------------
# Bad inputs: errors that name the argument
# ----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    "kw,err,match",
    [
        (dict(noise="uniform", noise_seed=1, noise_scale=1.0), ValueError, "noise must be None or one of"),
        (dict(noise="gaussian", noise_scale=1.0), ValueError, "needs noise_seed"),
        (dict(noise="gaussian", noise_seed=1), ValueError, "needs noise_scale"),
        (dict(noise_seed=1), ValueError, "noise_seed is given but noise is None"),
        (dict(noise_scale=1.0), ValueError, "noise_scale is given but noise is None"),
        (dict(noise="laplace", noise_seed=-1, noise_scale=1.0), ValueError, r"noise_seed must be in \[0, 2\*\*63\)"),
        (dict(noise="laplace", noise_seed=True, noise_scale=1.0), TypeError, "noise_seed must be None or an int"),
        (dict(noise="laplace", noise_seed=1.5, noise_scale=1.0), TypeError, "noise_seed must be None or an int"),
        (dict(noise="laplace", noise_seed=1, noise_scale=-0.5), ValueError, "noise_scale must be finite and >= 0"),
        (dict(noise="laplace", noise_seed=1, noise_scale=float("nan")), ValueError, "noise_scale must be finite"),
        (dict(noise="laplace", noise_seed=1, noise_scale=True), TypeError, "noise_scale must be a number"),
        (dict(noise="laplace", noise_seed=1, noise_scale="1"), TypeError, "noise_scale must be a number"),
        (dict(noise="laplace", noise_seed=1, noise_scale=torch.ones(65)), ValueError, r"noise_scale must have shape"),
        (dict(noise="laplace", noise_seed=1, noise_scale=torch.ones(3, 64)), ValueError, r"noise_scale must have shape"),
        (dict(noise="laplace", noise_seed=1, noise_scale=torch.ones(64, dtype=torch.int64)), TypeError, "noise_scale must be a float tensor"),
        (dict(noise="laplace", noise_seed=1, noise_scale=-torch.ones(192)), ValueError, "noise_scale must be finite and >= 0"),
        (dict(noise="laplace", noise_seed=1, noise_scale=torch.ones(64, requires_grad=True)), ValueError, "noise_scale does not take a gradient"),
    ],
    ids=["bad-kind", "no-seed", "no-scale", "seed-without-noise", "scale-without-noise", "negative-seed", "bool-seed",
         "float-seed", "negative-scale", "nan-scale", "bool-scale", "str-scale", "scale-65", "scale-2d", "int-scale",
         "negative-scale-tensor", "scale-requires-grad"],
)
@pytest.mark.parametrize("op", ["freq_mix", "frontend", "freq_mix_ref"])
def test_bad_noise_arguments(kw, err, match, op):
    x = torch.rand(2, 3, 8, 8) * 2 - 1
    index, weight = torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1)
    with pytest.raises(err, match=match):
        if op == "frontend":
            fastmix.frontend(x, upsample=1, **kw)
        else:
            getattr(fastmix, op)(x, index, weight, **kw)


def test_raw_op_refuses_bad_noise_tensors():
    if _backend.cpu_extension() is None:
        pytest.skip("fastmix._C is not built")
    x = torch.rand(2, 1, 8, 8)
    rows = cols = dct_geometry(8, torch.float32, CPU)
    pos = keep_positions(tuple(range(64)), 64, CPU)
    base = (x, torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1), pos, 64, 0, False, False, *rows, *cols, None)
    t = noise_table("gaussian")
    for scale, table, nseed, match in [
        (torch.ones(64), torch.ones(3), 0, "2\\^B entries"),
        (torch.ones(64), t.double(), 0, "noise_table must be float32"),
        (torch.ones(63), t, 0, "noise_scale must be float32"),
        (torch.ones(64), t, -1, "noise_seed must be >= 0"),
        (None, t, 0, "noise_table needs noise_scale"),
        (torch.ones(64), None, 0, "noise_scale needs noise_table"),
    ]:
        with pytest.raises(RuntimeError, match=match):
            torch.ops.fastmix.mix_fwd(*base, scale, table, nseed)


# ----------------------------------------------------------------------------------------------------
# Every CPU capability's copy draws the same bits
# ----------------------------------------------------------------------------------------------------

CAP_PROBE = """
    import json, torch, fastmix
    from fastmix.ops.noise import noise_ref, noise_table
    x = torch.zeros(3, 3, 16, 24)
    idx = torch.tensor([[0, 1], [2, 0], [1, 1], [0, 2]])
    w = torch.rand(4, 2, generator=torch.Generator().manual_seed(0))
    scale = torch.rand(192, generator=torch.Generator().manual_seed(1)) * 5
    out = {"capability": fastmix.cpu_capability()}
    for kind in ("gaussian", "laplace"):
        got = fastmix.freq_mix(x, idx, w, seed=8, noise=kind, noise_seed=12345, noise_scale=scale)
        want = noise_ref(12345, 4, 192, 2, 3, noise_table(kind), scale)
        out[kind] = bool(torch.equal(got, want))
        xr = torch.rand(3, 3, 16, 24, generator=torch.Generator().manual_seed(2))
        got = fastmix.freq_mix(xr, idx, w, seed=8, noise=kind, noise_seed=12345, noise_scale=scale)
        ref = fastmix.freq_mix_ref(xr.double(), idx, w.double(), seed=8, noise=kind, noise_seed=12345, noise_scale=scale)
        out[kind + "_err"] = (got.double() - ref).abs().max().item()
    print(json.dumps(out))
"""


@pytest.mark.parametrize("cap", ("avx512", "avx2", "default"))
def test_every_cpu_capability_draws_the_same_bits(cap):
    if _backend.cpu_extension() is None:
        pytest.skip("fastmix._C is not built")
    caps = dict(_backend.cpu_capabilities())
    if cap not in caps:
        pytest.skip(f"{cap} is not compiled in this build")
    if not caps[cap]:
        pytest.skip(f"this CPU cannot run {cap}")
    env = {k: v for k, v in os.environ.items() if k not in ("FASTMIX_CPU_CAPABILITY", "FASTMIX_CPU_DISABLE")}
    env.update(FASTMIX_CPU_CAPABILITY=cap, FASTMIX_BACKEND="cpu", OMP_NUM_THREADS="1")
    r = subprocess.run([sys.executable, "-c", textwrap.dedent(CAP_PROBE)], capture_output=True, text=True,
                       timeout=300, env=env)
    assert r.returncode == 0, r.stderr
    out = json.loads(r.stdout.strip().splitlines()[-1])
    assert out["capability"] == cap
    assert out["gaussian"] and out["laplace"], out
    assert out["gaussian_err"] < 1e-4 and out["laplace_err"] < 1e-4, out
