"""The C++ extension as a distributed binary: the run-time choice of the CPU kernels' instruction set
(csrc/cpu/capability.h, csrc/cpu/dispatch.cpp) and the guard against loading it under another torch.

Each case runs in a fresh interpreter: the capability is chosen once per process, at the first CPU op, and
a forced capability the CPU lacks must come back as an error, never as a SIGILL that kills the process.
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import textwrap

import pytest
import torch

from fastmix import _backend

pytestmark = pytest.mark.skipif(
    _backend.cpu_extension() is None,
    reason=f"fastmix._C is not built{_backend.extension_error('fastmix._C')}: {_backend.BUILD_HINT}",
)

ENV_SWITCHES = ("FASTMIX_CPU_CAPABILITY", "FASTMIX_CPU_DISABLE", "FASTMIX_BACKEND")


def _python(code: str, **env: str) -> subprocess.CompletedProcess:
    full = {k: v for k, v in os.environ.items() if k not in ENV_SWITCHES}
    full.update(env)
    full["OMP_NUM_THREADS"] = "1"  # tiny problems; no thread wake-ups on the shared 2-core machine
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300,
                          env=full)


def _last_json(r: subprocess.CompletedProcess) -> dict:
    # A negative return code is a signal: -4 (SIGILL) is exactly what the dispatch must prevent.
    assert r.returncode == 0, f"exit {r.returncode}\n{r.stderr}"
    return json.loads(r.stdout.strip().splitlines()[-1])


# Every CPU op, forward and backward, against the pure-PyTorch reference, in float64 (v8<double> is a whole
# zmm register in the AVX-512 copy, two ymm in the AVX2 one) and float32; odd sizes on purpose (k = 3, C = 1
# for the frontend, H != W).
PROBE = """
    import json, os, torch, fastmix
    from fastmix import _backend
    torch.manual_seed(0)

    def run(backend, fn, *args):
        os.environ["FASTMIX_BACKEND"] = backend
        try:
            return fn(*args)
        finally:
            del os.environ["FASTMIX_BACKEND"]

    def mix(x, w, idx):
        y = fastmix.freq_mix(x, idx, w, keep=list(range(1, 64 * x.shape[1])), seed=123)
        gx, gw = torch.autograd.grad((y * y).sum(), (x, w))
        return [y, gx, gw]

    def front(x, w, idx):
        y = fastmix.frontend(x, upsample=3, color="none", index=idx, weight=w, seed=7)
        gx, gw = torch.autograd.grad((y * y).sum(), (x, w))
        return [y, gx, gw]

    errors = {}
    for dtype in (torch.float64, torch.float32):
        x = torch.rand(5, 3, 16, 24, dtype=dtype) * 2 - 1
        idx = torch.randint(0, 5, (4, 3))
        wi = torch.rand(4, 3, dtype=dtype)
        wf = torch.rand(4, 3, 64, dtype=dtype)
        xf = torch.rand(5, 1, 8, 16, dtype=dtype) * 2 - 1
        cases = {
            "block_dct": (lambda x: [fastmix.block_dct(x), fastmix.block_idct(x)], x),
            "freq_mix_image": (mix, x.requires_grad_(), wi.requires_grad_(), idx),
            "freq_mix_frequency": (mix, x, wf.requires_grad_(), idx),
            "frontend": (front, xf.requires_grad_(), wi, idx),
        }
        for name, (fn, *args) in cases.items():
            got, ref = run("cpu", fn, *args), run("torch", fn, *args)
            errors[f"{name}/{dtype}"] = max(
                ((g - r).abs().max() / r.abs().max().clamp_min(1e-30)).item() for g, r in zip(got, ref))
    print(json.dumps({"capability": fastmix.cpu_capability(), "errors": errors}))
"""

REFUSED = """
    import json, sys, torch, fastmix
    out = {"backends": fastmix.available_backends()}
    try:
        fastmix.cpu_capability()
    except RuntimeError as e:
        out["capability_error"] = str(e)
    try:
        fastmix.freq_mix(torch.rand(2, 1, 8, 8), torch.zeros(2, 1, dtype=torch.long), torch.ones(2, 1))
    except RuntimeError as e:
        out["op_error"] = str(e)
    try:
        torch.ops.fastmix.block_dct(torch.rand(1, 1, 8, 8), 8, False)  # the op itself, past fastmix's Python checks
    except RuntimeError as e:
        out["raw_op_error"] = str(e)
    print(json.dumps(out))
"""

CAPABILITIES = ("avx512", "avx2", "default")
TOLERANCE = {"torch.float64": 1e-12, "torch.float32": 1e-5}  # relative to the largest reference value


@pytest.fixture(scope="module")
def compiled() -> dict[str, bool]:
    """Capability -> usable on this CPU, for every copy compiled into this build (best first)."""
    r = _python("import json, fastmix; from fastmix import _backend; print(json.dumps(_backend.cpu_capabilities()))")
    return _last_json(r)


def test_a_x86_build_holds_every_capability(compiled):
    """A build for x86-64 always holds the AVX-512 copy, so every run of this suite on a CPU without AVX-512
    (this project's CI machines include AVX2-only EPYCs) loads a binary with AVX-512 code and must fall back."""
    if platform.machine().lower() not in ("x86_64", "amd64"):
        pytest.skip("the x86 capabilities are built on x86-64 only")
    assert list(compiled) == ["avx512", "avx2", "default"]
    assert compiled["default"]


def test_the_best_usable_capability_is_chosen(compiled):
    r = _python("import json, fastmix; print(json.dumps({'c': fastmix.cpu_capability(), 'b': fastmix.available_backends()}))")
    out = _last_json(r)
    assert out["c"] == next(name for name, ok in compiled.items() if ok)
    assert "cpu" in out["b"]


@pytest.mark.parametrize("cap", CAPABILITIES)
def test_forced_capability_matches_the_reference(cap, compiled):
    if cap not in compiled:
        pytest.skip(f"{cap} is not compiled for {platform.machine()}")
    if not compiled[cap]:
        pytest.skip(f"this CPU cannot run {cap} (test_forcing_a_capability_the_cpu_lacks_is_refused covers it)")
    out = _last_json(_python(PROBE, FASTMIX_CPU_CAPABILITY=cap))
    assert out["capability"] == cap
    for case, err in out["errors"].items():
        assert err <= TOLERANCE[case.split("/")[1]], f"{cap} {case}: relative error {err}"


def _lacking(compiled) -> list[tuple[str, dict]]:
    """(capability, env) pairs that this CPU cannot run: those it lacks, and the best it has, ruled out."""
    out = [(name, {}) for name, ok in compiled.items() if not ok]
    best = next(name for name, ok in compiled.items() if ok)
    if best != "default":
        out.append((best, {"FASTMIX_CPU_DISABLE": best}))
    return out


def test_forcing_a_capability_the_cpu_lacks_is_refused(compiled):
    cases = _lacking(compiled)
    if not cases:
        pytest.skip("only the default capability is compiled here")
    for cap, env in cases:
        out = _last_json(_python(REFUSED, FASTMIX_CPU_CAPABILITY=cap, **env))
        assert out["backends"] == ["torch"], (cap, out)
        for key in ("capability_error", "op_error", "raw_op_error"):
            assert f"FASTMIX_CPU_CAPABILITY={cap}" in out[key] and "This CPU runs:" in out[key], (cap, key, out)
        assert "FASTMIX_BACKEND=torch" in out["op_error"]


def test_disabling_the_best_falls_back_to_the_next(compiled):
    usable = [name for name, ok in compiled.items() if ok]
    if len(usable) < 2:
        pytest.skip("one capability runs here")
    r = _python("import fastmix; print(fastmix.cpu_capability())", FASTMIX_CPU_DISABLE=f" {usable[0].upper()} ,other")
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == usable[1]


def test_an_unknown_capability_is_refused():
    out = _last_json(_python(REFUSED, FASTMIX_CPU_CAPABILITY="sse9"))
    assert out["backends"] == ["torch"]
    assert "FASTMIX_CPU_CAPABILITY=sse9 is not a CPU capability of this fastmix build" in out["op_error"]


def test_extension_built_for_another_torch_is_not_loaded():
    """Built against one torch, imported under another: a clear error naming both versions and the rebuild
    command at call time; the import works, the reference backend works, and the mismatched binary is never
    loaded (loading it fails with an undefined symbol at best, crashes in a static initialiser at worst)."""
    try:
        from fastmix import _build_info  # noqa: F401
    except ImportError:
        pytest.skip("this build did not record its torch version (built by an older setup.py)")
    out = _last_json(_python(
        """
        import json, os, sys, torch
        import fastmix._build_info as info
        info.TORCH_VERSION = "2.4.1+cu121"           # as if built against another torch
        import fastmix
        out = {"backends": fastmix.available_backends(), "loaded": "fastmix._C" in sys.modules}
        x = torch.rand(2, 1, 8, 8)
        try:
            fastmix.block_dct(x)
        except RuntimeError as e:
            out["error"] = str(e)
        os.environ["FASTMIX_BACKEND"] = "torch"
        out["reference_ok"] = bool(torch.allclose(fastmix.block_dct(x), fastmix.block_dct_ref(x)))
        print(json.dumps(out))
        """
    ))
    assert out["backends"] == ["torch"] and out["loaded"] is False and out["reference_ok"]
    err = out["error"]
    assert "2.4.1+cu121" in err and torch.__version__ in err and "pip install --no-build-isolation" in err, err


def test_same_release_other_local_build_loads():
    """2.13.0+cpu and 2.13.0+cu128 share the C++ ABI: only the public version must match."""
    try:
        from fastmix import _build_info  # noqa: F401
    except ImportError:
        pytest.skip("this build did not record its torch version")
    r = _python(
        """
        import torch
        import fastmix._build_info as info
        info.TORCH_VERSION = torch.__version__.split("+")[0] + "+cu999"
        import fastmix
        print(fastmix.available_backends())
        """
    )
    assert r.returncode == 0, r.stderr
    assert "'cpu'" in r.stdout


def test_the_wide_copies_hold_wide_instructions(compiled):
    """Each x86 copy really is compiled for its instruction set: a copy built without its ISA flags would be
    SSE2 baseline code, about 2x slower, and every other test would still pass (capability.h also refuses
    to compile it). ymm registers come with AVX2, zmm with AVX-512."""
    if list(compiled) != ["avx512", "avx2", "default"]:
        pytest.skip("the x86 capabilities are built on x86-64 only")
    import shutil

    if shutil.which("objdump") is None:
        pytest.skip("objdump (binutils) is not installed")
    so = _backend.cpu_extension().__file__
    text = subprocess.run(["objdump", "-d", "--no-show-raw-insn", so], capture_output=True, text=True, timeout=300).stdout
    assert text.count("%zmm") > 1000, "no AVX-512 code in the avx512 copy"
    assert text.count("%ymm") > 1000, "no AVX2 code in the avx2 copy"
