"""Helpers of the core-op tests (imported by conftest.py and the test modules; a unique module name so
that other suites' conftest.py files cannot shadow it): backends, seeded inputs, the tolerance table.

Conventions
  * ``backend`` runs a test once per backend present for CPU tensors (torch, cpu, and triton when
    TRITON_INTERPRET=1 makes it usable); it sets FASTMIX_BACKEND, which the ops read at every call. A
    backend that is absent is skipped with the reason, never silently dropped.
  * ``gen`` is a torch.Generator seeded from the test id (so a failure reproduces) mixed with
    FASTMIX_TEST_SEED (set it to draw other inputs).
  * The oracle of every op is its ``*_ref`` function on float64 copies of the inputs.
  * Tolerances are data (TOLERANCES): an output may be at most ``k`` times as far from the oracle as
    PyTorch's own computation in the same dtype (the ``*_ref`` function run on the low-precision inputs),
    with a floor relative to the output's scale for when PyTorch happens to be exact.
"""
from __future__ import annotations

import os
import zlib
from dataclasses import dataclass

import torch

import fastmix
from fastmix import _backend

# ----------------------------------------------------------------------------------------------------
# Backends
# ----------------------------------------------------------------------------------------------------

_PRESENT = fastmix.available_backends("cpu")
# torch and cpu are always expected on CPU tensors; triton joins when the environment enables it.
BACKEND_PARAMS = ["torch", "cpu"] + [b for b in _PRESENT if b not in ("torch", "cpu")]


def absent_reason(name: str) -> str | None:
    if name in _PRESENT:
        return None
    if name == "cpu":
        return f"fastmix._C is not built{_backend.extension_error('fastmix._C')}: {_backend.BUILD_HINT}"
    return f"backend {name!r} is not available for CPU tensors"


def run_on(backend_name: str, fn, *args, **kwargs):
    """Call ``fn`` with FASTMIX_BACKEND=backend_name (restored afterwards)."""
    old = os.environ.get("FASTMIX_BACKEND")
    os.environ["FASTMIX_BACKEND"] = backend_name
    try:
        return fn(*args, **kwargs)
    finally:
        if old is None:
            del os.environ["FASTMIX_BACKEND"]
        else:
            os.environ["FASTMIX_BACKEND"] = old


# ----------------------------------------------------------------------------------------------------
# Random inputs
# ----------------------------------------------------------------------------------------------------


def generator_for(nodeid: str) -> torch.Generator:
    base = int(os.environ.get("FASTMIX_TEST_SEED", "0"))
    seed = (zlib.crc32(nodeid.encode()) + base) % 2**31
    return torch.Generator().manual_seed(seed)


def randn(gen, *shape, dtype=torch.float32):
    return torch.randn(*shape, generator=gen, dtype=torch.float64).to(dtype)


def rand_faces(gen, *shape, dtype=torch.float32):
    """Images in [-1, 1], as the frontend expects."""
    return (torch.rand(*shape, generator=gen, dtype=torch.float64) * 2 - 1).to(dtype)


def rand_index(gen, n, m, k):
    return torch.randint(0, n, (m, k), generator=gen)


def rand_weight(gen, kind: str, m: int, k: int, c: int, dtype=torch.float32):
    """Weights of shape kind: "img" (M, k), "freq" (M, k, 64), "cfreq" (M, k, C, 64); away from zero so
    that no partner is accidentally skipped (and gradcheck's finite differences stay off the w = 0 kink)."""
    shape = {"img": (m, k), "freq": (m, k, 64), "cfreq": (m, k, c, 64)}[kind]
    w = torch.rand(*shape, generator=gen, dtype=torch.float64) + 0.1
    sign = torch.where(torch.rand(*shape, generator=gen) < 0.2, -1.0, 1.0).to(torch.float64)
    return (w * sign).to(dtype)


def weight4(weight: torch.Tensor, c: int) -> torch.Tensor:
    """Any accepted weight shape as (M, k, C, 64) float64 (for building expectations)."""
    w = weight.double()
    m, k = w.shape[:2]
    if w.dim() == 2:
        return w.view(m, k, 1, 1).expand(m, k, c, 64)
    if w.dim() == 3:
        return w.view(m, k, 1, 64).expand(m, k, c, 64)
    return w


# ----------------------------------------------------------------------------------------------------
# Tolerances (data) and comparisons against the float64 oracle
# ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Tol:
    k: float  # allowed multiple of PyTorch's own error (the *_ref function in the same dtype)
    floor: float  # ... but never below floor * max(1, max|oracle|)


TOLERANCES = {
    # float64 runs the same math in the same precision: only summation order differs.
    torch.float64: Tol(k=8.0, floor=1e-12),
    # float32: the kernels accumulate in a different order than einsum (separable 8-tap sums).
    torch.float32: Tol(k=4.0, floor=4e-7),
    # half types: both sides accumulate in float32 and round once, so the error is the final rounding
    # (at most one ulp apart when the float32 sums straddle a rounding boundary).
    torch.float16: Tol(k=2.5, floor=2.0**-11),
    torch.bfloat16: Tol(k=2.5, floor=2.0**-8),
}

DTYPES = [torch.float32, torch.float16, torch.bfloat16, torch.float64]
DTYPE_IDS = {torch.float32: "f32", torch.float16: "f16", torch.bfloat16: "bf16", torch.float64: "f64"}


def dtype_id(dt) -> str:
    return DTYPE_IDS[dt]


def assert_matches_oracle(got: torch.Tensor, oracle: torch.Tensor, torch_own: torch.Tensor, dtype, what="output"):
    """|got - oracle| <= max(k * |torch_own - oracle|, floor * scale), both as max norms."""
    tol = TOLERANCES[dtype]
    assert got.shape == oracle.shape, f"{what}: shape {tuple(got.shape)} != oracle {tuple(oracle.shape)}"
    if oracle.numel() == 0:
        return
    o = oracle.double()
    assert torch.isfinite(o).all(), f"{what}: the oracle itself is not finite"
    assert torch.isfinite(got.double()).all(), f"{what}: non-finite values where the oracle is finite"
    scale = max(1.0, o.abs().max().item())
    own = (torch_own.double() - o).abs().max().item()
    err = (got.double() - o).abs().max().item()
    allowed = max(tol.k * own, tol.floor * scale)
    assert err <= allowed, (
        f"{what} ({dtype}): max error {err:.3e} vs float64 oracle exceeds {allowed:.3e} "
        f"(PyTorch's own error {own:.3e}, scale {scale:.3e}, tolerance {tol})"
    )


def assert_close_f64(got: torch.Tensor, oracle: torch.Tensor, what="output", rel=1e-10):
    """float64 results: equal to rounding, relative to the output's scale."""
    assert got.shape == oracle.shape, f"{what}: shape {tuple(got.shape)} != {tuple(oracle.shape)}"
    if oracle.numel() == 0:
        return
    scale = max(1.0, oracle.double().abs().max().item())
    err = (got.double() - oracle.double()).abs().max().item()
    assert err <= rel * scale, f"{what}: max error {err:.3e} > {rel * scale:.3e}"
