"""Malformed calls raise TypeError / ValueError / IndexError naming the argument, before any kernel runs;
backend selection errors say what to do. Every case runs on every backend."""
from __future__ import annotations

import importlib.util
import json
import subprocess
import sys
import textwrap
import types

import numpy as np
import pytest
import torch

import fastmix
from fastmix import _backend

X = torch.randn(4, 3, 16, 8)  # N=4, C=3, 16x8
IDX = torch.tensor([[0, 1], [2, 3], [1, 1]])  # M=3, k=2
W = torch.rand(3, 2)
FACES = torch.rand(2, 3, 4, 6) * 2 - 1
META = "meta"  # a second device on a CPU-only machine


def fm(x=X, index=IDX, weight=W, **kw):
    return fastmix.freq_mix(x, index, weight, **kw)


def fe(x=FACES, **kw):
    return fastmix.frontend(x, **kw)


CASES = {
    # --- x ---------------------------------------------------------------------------------------
    "x_int": (lambda: fm(x=torch.ones(4, 3, 16, 8, dtype=torch.int64)), TypeError, r"x must be float"),
    "x_uint8": (lambda: fm(x=torch.ones(4, 3, 16, 8, dtype=torch.uint8)), TypeError, r"x must be float"),
    "x_not_tensor": (lambda: fm(x=np.zeros((4, 3, 16, 8), np.float32)), TypeError, r"x must be a torch.Tensor"),
    "x_3d": (lambda: fm(x=torch.randn(3, 16, 8)), ValueError, r"x must have 4 dims"),
    "x_height_not_8k": (lambda: fm(x=torch.randn(4, 3, 12, 8)), ValueError, r"x's height .*multiple of 8"),
    "x_width_not_8k": (lambda: fm(x=torch.randn(4, 3, 16, 20)), ValueError, r"x's width .*multiple of 8"),
    "x_too_tall": (
        lambda: fm(x=torch.zeros(1, 1, 1, 1).expand(4, 1, 8 * 2**16, 8), weight=torch.rand(3, 2)),
        ValueError,
        r"x's height and width must be below",
    ),
    # --- index -----------------------------------------------------------------------------------
    "index_too_big": (lambda: fm(index=torch.tensor([[0, 1], [2, 4], [1, 1]])), IndexError, r"index values must be in \[0, 4\)"),
    "index_negative": (lambda: fm(index=torch.tensor([[0, 1], [-1, 3], [1, 1]])), IndexError, r"index values must be in"),
    "index_float": (lambda: fm(index=IDX.double()), TypeError, r"index must be an integer"),
    "index_bool": (lambda: fm(index=IDX > 0), TypeError, r"index must be an integer"),
    "index_list": (lambda: fm(index=[[0, 1], [2, 3], [1, 1]]), TypeError, r"index must be an int64 tensor"),
    "index_1d": (lambda: fm(index=torch.tensor([0, 1, 2]), weight=torch.rand(3, 1)), ValueError, r"index must have shape \(M, k\)"),
    "index_3d": (lambda: fm(index=IDX.view(3, 2, 1)), ValueError, r"index must have shape \(M, k\)"),
    "k_zero": (lambda: fm(index=torch.zeros(3, 0, dtype=torch.int64), weight=torch.rand(3, 0)), ValueError, r"k >= 1"),
    # --- weight ----------------------------------------------------------------------------------
    "weight_rows": (lambda: fm(weight=torch.rand(4, 2)), ValueError, r"weight must have shape"),
    "weight_k": (lambda: fm(weight=torch.rand(3, 3)), ValueError, r"weight must have shape"),
    "weight_freqs": (lambda: fm(weight=torch.rand(3, 2, 63)), ValueError, r"weight must have shape"),
    "weight_colours": (lambda: fm(weight=torch.rand(3, 2, 2, 64)), ValueError, r"weight must have shape"),
    "weight_1d": (lambda: fm(weight=torch.rand(6)), ValueError, r"weight must have shape"),
    "weight_int": (lambda: fm(weight=torch.ones(3, 2, dtype=torch.int64)), TypeError, r"weight must be float"),
    "weight_not_tensor": (lambda: fm(weight=[[0.5, 0.5]] * 3), TypeError, r"weight must be a torch.Tensor"),
    # --- keep ------------------------------------------------------------------------------------
    "keep_id_too_big": (lambda: fm(keep=[0, 192]), IndexError, r"keep holds channel id 192, outside \[0, 192\)"),
    "keep_id_negative": (lambda: fm(keep=torch.tensor([-1, 3])), IndexError, r"keep holds channel id -1"),
    "keep_duplicate": (lambda: fm(keep=[3, 5, 3]), ValueError, r"keep holds duplicate"),
    "keep_duplicate_tensor": (lambda: fm(keep=torch.tensor([7, 7])), ValueError, r"keep holds duplicate"),
    "keep_bool_shape": (lambda: fm(keep=torch.ones(128, dtype=torch.bool)), ValueError, r"keep as a bool mask must have shape"),
    "keep_bool_2d": (lambda: fm(keep=torch.ones(3, 64, dtype=torch.bool)), ValueError, r"keep as a bool mask"),
    "keep_ids_2d": (lambda: fm(keep=torch.tensor([[1, 2]])), ValueError, r"keep as channel ids must be 1-D"),
    "keep_float_tensor": (lambda: fm(keep=torch.tensor([1.0, 2.0])), TypeError, r"keep must be None, a bool mask"),
    "keep_float_list": (lambda: fm(keep=[1, 2.5]), TypeError, r"keep must be None"),
    "keep_int": (lambda: fm(keep=5), TypeError, r"keep must be None"),
    "keep_bool_list": (lambda: fm(keep=[False, True]), TypeError, r"keep as a list holds channel ids \(ints\), got bools"),
    "keep_string": (lambda: fm(keep="no_dc"), TypeError, r"keep must be None"),
    # --- seed ------------------------------------------------------------------------------------
    "seed_negative": (lambda: fm(seed=-1), ValueError, r"seed must be in \[0, 2\*\*63\)"),
    "seed_2_63": (lambda: fm(seed=2**63), ValueError, r"seed must be in \[0, 2\*\*63\)"),
    "seed_huge": (lambda: fm(seed=2**80), ValueError, r"seed must be in"),
    "seed_float": (lambda: fm(seed=1.0), TypeError, r"seed must be None or an int"),
    "seed_bool": (lambda: fm(seed=True), TypeError, r"seed must be None or an int"),
    "seed_bool_tensor": (lambda: fm(seed=torch.tensor(True)), TypeError, r"seed must be None or an int"),
    "seed_string": (lambda: fm(seed="42"), TypeError, r"seed must be None or an int"),
    "seed_tensor_float": (lambda: fm(seed=torch.tensor(1.5)), TypeError, r"seed must be None or an int"),
    # --- out -------------------------------------------------------------------------------------
    "out_unknown": (lambda: fm(out="coefficients"), ValueError, r"out must be 'channels' or 'pixels'"),
    "out_none": (lambda: fm(out=None), ValueError, r"out must be"),
    # --- devices (meta stands in for a second device) --------------------------------------------
    "index_other_device": (lambda: fm(index=IDX.to(META)), ValueError, r"index is on meta but x is on cpu"),
    "weight_other_device": (lambda: fm(weight=W.to(META)), ValueError, r"weight is on meta but x is on cpu"),
    "keep_other_device": (lambda: fm(keep=torch.tensor([1, 2], device=META)), ValueError, r"keep is on meta"),
    "x_other_device": (lambda: fm(x=X.to(META)), ValueError, r"is on cpu but x is on meta"),
    # --- frontend --------------------------------------------------------------------------------
    "fe_upsample_0": (lambda: fe(upsample=0), ValueError, r"upsample must be >= 1"),
    "fe_upsample_negative": (lambda: fe(upsample=-8), ValueError, r"upsample must be >= 1"),
    "fe_upsample_float": (lambda: fe(upsample=8.0), TypeError, r"upsample must be an int"),
    "fe_upsample_bool": (lambda: fe(upsample=True), TypeError, r"upsample must be an int"),
    "fe_height_not_8k": (lambda: fe(x=torch.rand(2, 3, 3, 4), upsample=2), ValueError, r"x's height \* upsample must be a multiple of 8"),
    "fe_width_not_8k": (lambda: fe(x=torch.rand(2, 3, 8, 5) * 2 - 1, upsample=1), ValueError, r"x's width \* upsample"),
    "fe_color_unknown": (lambda: fe(color="rgb"), ValueError, r"color must be one of"),
    "fe_ycbcr_grey": (lambda: fe(x=FACES[:, :1]), ValueError, r"color='ycbcr' needs x with 3 channels"),
    "fe_x_int": (lambda: fe(x=torch.zeros(2, 3, 4, 4, dtype=torch.int32)), TypeError, r"x must be float"),
    "fe_x_3d": (lambda: fe(x=FACES[0]), ValueError, r"x must have 4 dims"),
    "fe_out_dtype_int": (lambda: fe(out_dtype=torch.int32), TypeError, r"out_dtype must be None or a float dtype"),
    "fe_index_without_weight": (lambda: fe(index=torch.tensor([[0, 1]])), ValueError, r"index and weight must be given together"),
    "fe_weight_without_index": (lambda: fe(weight=torch.rand(1, 2)), ValueError, r"index and weight must be given together"),
    "fe_index_out_of_range": (lambda: fe(index=torch.tensor([[0, 2]]), weight=torch.rand(1, 2)), IndexError, r"index values"),
    "fe_weight_shape": (lambda: fe(index=torch.tensor([[0, 1]]), weight=torch.rand(1, 3)), ValueError, r"weight must have shape"),
    "fe_keep_out_of_range": (lambda: fe(keep=[192]), IndexError, r"keep holds channel id 192"),
    "fe_seed_negative": (lambda: fe(seed=-5), ValueError, r"seed must be in"),
    "fe_weight_other_device": (
        lambda: fe(index=torch.tensor([[0, 1]]), weight=torch.rand(1, 2, device=META)),
        ValueError,
        r"weight is on meta",
    ),
    "fe_too_large": (
        lambda: fe(x=torch.zeros(1, 1, 1, 1).expand(1, 3, 2**16, 8), upsample=8),
        ValueError,
        r"x's height \* upsample must be below",
    ),
    # --- block DCT and layouts -------------------------------------------------------------------
    "dct_height": (lambda: fastmix.block_dct(torch.randn(2, 12, 8)), ValueError, r"x's height \(dim -2\) must be a multiple of 8"),
    "dct_width": (lambda: fastmix.block_dct(torch.randn(2, 8, 9)), ValueError, r"x's width \(dim -1\) must be a multiple of 8"),
    "idct_height": (lambda: fastmix.block_idct(torch.randn(4, 8)), ValueError, r"y's height"),
    "dct_int": (lambda: fastmix.block_dct(torch.ones(8, 8, dtype=torch.int64)), TypeError, r"x must be float"),
    "idct_int": (lambda: fastmix.block_idct(torch.ones(8, 8, dtype=torch.int16)), TypeError, r"y must be float"),
    "dct_1d": (lambda: fastmix.block_dct(torch.randn(64)), ValueError, r"x must have at least 2 dims"),
    "dct_block_0": (lambda: fastmix.block_dct(torch.randn(8, 8), block=0), ValueError, r"block must be >= 1"),
    "dct_block_float": (lambda: fastmix.block_dct(torch.randn(8, 8), block=8.0), TypeError, r"block must be an int"),
    "to_channels_3d": (lambda: fastmix.to_channels(torch.randn(3, 8, 8)), ValueError, r"y must have 4 dims"),
    "to_channels_height": (lambda: fastmix.to_channels(torch.randn(1, 3, 12, 8)), ValueError, r"y's height"),
    "from_channels_count": (lambda: fastmix.from_channels(torch.randn(1, 100, 2, 2)), ValueError, r"z must have a multiple of 64 channels"),
}


@pytest.mark.parametrize("case", list(CASES))
def test_bad_input_raises_naming_the_argument(backend, case):
    fn, exc, match = CASES[case]
    with pytest.raises(exc, match=match):
        fn()


def test_errors_come_before_any_kernel(monkeypatch):
    """Validation runs before dispatch: a bad call never reaches torch.ops.fastmix."""

    def boom(*a, **k):
        raise AssertionError("a kernel ran on a malformed call")

    class Ops:
        mix_fwd = block_dct = staticmethod(boom)

    if "cpu" not in fastmix.available_backends("cpu"):
        pytest.skip(f"the C++ backend is absent: {_backend.BUILD_HINT}")
    monkeypatch.setenv("FASTMIX_BACKEND", "cpu")
    monkeypatch.setattr(torch.ops, "fastmix", Ops(), raising=False)
    with pytest.raises(AssertionError, match="a kernel ran"):  # the probe works: a good call does reach it
        fm()
    for case in ["index_too_big", "weight_colours", "keep_id_too_big", "seed_2_63", "fe_upsample_0", "dct_height"]:
        fn, exc, match = CASES[case]
        with pytest.raises(exc, match=match):
            fn()


# ----------------------------------------------------------------------------------------------------
# Backend selection
# ----------------------------------------------------------------------------------------------------


def test_bogus_backend_env(monkeypatch):
    monkeypatch.setenv("FASTMIX_BACKEND", "bogus")
    for fn in (lambda: fm(), lambda: fe(), lambda: fastmix.block_dct(torch.randn(8, 8))):
        with pytest.raises(ValueError, match=r"FASTMIX_BACKEND must be one of torch, cpu, triton, cuda, got 'bogus'"):
            fn()


def test_env_is_read_at_call_time(monkeypatch):
    """The same process switches backend between calls (profiler events name the C++ op)."""
    from torch.profiler import ProfilerActivity, profile

    def ops_run(env):
        monkeypatch.setenv("FASTMIX_BACKEND", env)
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fm()
        return {e.name for e in prof.events()}

    if "cpu" in fastmix.available_backends("cpu"):
        assert "fastmix::mix_fwd" in ops_run("cpu")
    assert "fastmix::mix_fwd" not in ops_run("torch")
    monkeypatch.delenv("FASTMIX_BACKEND")
    if "cpu" in fastmix.available_backends("cpu"):
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            fm()
        assert "fastmix::mix_fwd" in {e.name for e in prof.events()}, "CPU tensors default to the C++ backend"


def test_cuda_backend_on_cpu_tensors(monkeypatch):
    monkeypatch.setenv("FASTMIX_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"fastmix.freq_mix: FASTMIX_BACKEND=cuda runs CUDA tensors only"):
        fm()
    with pytest.raises(RuntimeError, match=r"fastmix.frontend: FASTMIX_BACKEND=cuda"):
        fe()


def test_triton_backend_on_cpu_tensors_needs_interpreter(monkeypatch):
    monkeypatch.setenv("FASTMIX_BACKEND", "triton")
    monkeypatch.setenv("TRITON_INTERPRET", "0")
    monkeypatch.setattr(_backend, "triton_available", lambda: True)
    with pytest.raises(RuntimeError, match=r"TRITON_INTERPRET=1"):
        fm()
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    with pytest.raises(RuntimeError, match=r"triton is not installed \(pip install triton\)"):
        fm()


def test_missing_cpu_extension_says_how_to_build(monkeypatch):
    """With fastmix._C unavailable, a CPU call raises with the exact build command; the reference still works."""
    monkeypatch.setitem(_backend._ext_cache, "fastmix._C", ImportError("simulated: no module fastmix._C"))
    monkeypatch.delenv("FASTMIX_BACKEND", raising=False)
    assert fastmix.available_backends("cpu")[:1] == ["torch"] and "cpu" not in fastmix.available_backends("cpu")
    for fn in (lambda: fm(), lambda: fe(), lambda: fastmix.block_dct(torch.randn(8, 8))):
        with pytest.raises(RuntimeError, match=r"pip install --no-build-isolation -e \.") as info:
            fn()
        assert "fastmix._C is not built" in str(info.value) and "simulated" in str(info.value)
        assert "FASTMIX_BACKEND=torch" in str(info.value)
    monkeypatch.setenv("FASTMIX_BACKEND", "torch")
    assert fm().shape == (3, 192, 2, 1)


def test_gpu_default_is_triton_then_cuda(monkeypatch):
    """Triton measured faster than the CUDA kernels (forward + backward, benches/results/h100): it is the
    default for every op, CUDA the fallback for the fused mix."""
    monkeypatch.delenv("FASTMIX_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "available_backends", lambda device: ("torch", "triton", "cuda"))
    for op in ("freq_mix", "frontend", "block_dct", "block_idct"):
        assert _backend.choose(torch.device("cuda", 0), op) == "triton", op
    monkeypatch.setattr(_backend, "available_backends", lambda device: ("torch", "cuda"))
    assert _backend.choose(torch.device("cuda", 0), "frontend") == "cuda"


def test_missing_gpu_backends_say_what_to_install(monkeypatch):
    """For CUDA tensors with neither triton nor the CUDA extension: the error names both fixes.
    (Checked on the dispatcher itself: no CUDA tensor exists on a CPU machine, and nothing here touches CUDA.)"""
    monkeypatch.delenv("FASTMIX_BACKEND", raising=False)
    monkeypatch.setattr(_backend, "triton_available", lambda: False)
    monkeypatch.setitem(_backend._ext_cache, "fastmix._C_cuda", ImportError("simulated: no module fastmix._C_cuda"))
    with pytest.raises(RuntimeError, match=r"no GPU backend available") as info:
        _backend.choose(torch.device("cuda", 0), "freq_mix")
    assert "pip install triton" in str(info.value) and "pip install --no-build-isolation -e ." in str(info.value)
    monkeypatch.setenv("FASTMIX_BACKEND", "cuda")
    with pytest.raises(RuntimeError, match=r"fastmix._C_cuda is not built.*pip install --no-build-isolation -e \."):
        _backend.choose(torch.device("cuda", 0), "freq_mix")


def test_no_backends_for_a_device_this_machine_lacks(monkeypatch):
    """available_backends lists what can run on the device in this process: nothing, without CUDA (it listed
    "torch" and "triton" for "cuda" on a machine without a GPU)."""
    monkeypatch.setattr(torch.cuda, "is_available", lambda: False)
    assert fastmix.available_backends("cuda") == []
    assert fastmix.available_backends("cpu")[0] == "torch"


# ----------------------------------------------------------------------------------------------------
# Imports (fresh interpreters: this process has long imported everything)
# ----------------------------------------------------------------------------------------------------


def _python(code: str) -> subprocess.CompletedProcess:
    return subprocess.run([sys.executable, "-c", textwrap.dedent(code)], capture_output=True, text=True, timeout=300)


@pytest.fixture(scope="module")
def import_facts() -> dict:
    """What a fresh `import fastmix` (plus a backend query) pulls in."""
    r = _python(
        """
        import json, sys, torch, fastmix
        fastmix.available_backends("cpu")
        print(json.dumps({"triton": "triton" in sys.modules, "cuda_initialized": torch.cuda.is_initialized()}))
        """
    )
    assert r.returncode == 0, r.stderr
    return json.loads(r.stdout.strip().splitlines()[-1])


def test_import_never_initialises_cuda(import_facts):
    assert import_facts["cuda_initialized"] is False


def test_import_does_not_import_triton(import_facts):
    assert import_facts["triton"] is False, "import fastmix imported triton"


def test_import_without_the_extension():
    """A missing fastmix._C never breaks the import; CPU calls then explain the build command."""
    r = _python(
        """
        import importlib.abc, sys

        class Block(importlib.abc.MetaPathFinder):
            def find_spec(self, name, path, target=None):
                if name in ("fastmix._C", "fastmix._C_cuda"):
                    raise ImportError("blocked for the test")

        sys.meta_path.insert(0, Block())
        import torch, fastmix
        assert "cpu" not in fastmix.available_backends("cpu")
        x = torch.randn(2, 3, 8, 8)
        idx, w = torch.tensor([[0, 1]]), torch.ones(1, 2)
        try:
            fastmix.freq_mix(x, idx, w)
        except RuntimeError as exc:
            assert "pip install --no-build-isolation -e ." in str(exc), exc
        else:
            raise AssertionError("no error without the extension")
        import os
        os.environ["FASTMIX_BACKEND"] = "torch"
        print(tuple(fastmix.freq_mix(x, idx, w).shape))
        """
    )
    assert r.returncode == 0, r.stderr
    assert r.stdout.strip() == "(1, 192, 1, 1)"


def test_index_checks_switch():
    """set_index_checks turns off only the check of accelerator-resident indices (a host sync there): CPU
    indices are still checked, and the switch takes a bool and returns the previous setting."""
    from fastmix.ops._common import wants_index_check

    x = torch.randn(2, 1, 8, 8)
    bad = torch.tensor([[0, 2]])
    # stands in for an accelerator-resident index (torch.device needs no such device to exist)
    accel = types.SimpleNamespace(device=torch.device("xpu"))
    assert wants_index_check(accel)
    prev = fastmix.set_index_checks(False)
    try:
        assert prev is True
        assert not wants_index_check(accel)
        assert wants_index_check(bad)
        with pytest.raises(IndexError, match="index values must be in"):
            fastmix.freq_mix(x, bad, torch.ones(1, 2))
        with pytest.raises(TypeError, match="enabled must be a bool"):
            fastmix.set_index_checks(0)
    finally:
        fastmix.set_index_checks(prev)
    assert wants_index_check(accel)


def test_meta_tensors_give_shapes():
    """Meta tensors (shape propagation, FLOP counting) have no values: the index range check is skipped
    for them instead of failing on .item(), and every op gives the shapes its real call gives."""
    from fastmix.ops._common import wants_index_check

    x = torch.empty(4, 3, 16, 16, device=META, requires_grad=True)
    idx = torch.empty(4, 2, dtype=torch.int64, device=META)
    w = torch.empty(4, 2, device=META)
    assert not wants_index_check(idx)
    assert fastmix.freq_mix(x, idx, w, keep=[1, 2, 3]).shape == (4, 3, 2, 2)
    assert fastmix.freq_mix(x, idx, w, out="pixels").shape == (4, 3, 16, 16)
    assert fastmix.frontend(x[:, :, :14, :14], index=idx, weight=w).shape == (4, 192, 14, 14)
    assert fastmix.block_dct(x).shape == (4, 3, 16, 16)
    fastmix.freq_mix(x, idx, w).sum().backward()
    assert x.grad.shape == x.shape and x.grad.device.type == META
