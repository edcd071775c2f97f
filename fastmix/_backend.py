"""Which implementation runs an op: extension loading and the backend choice.

Backends:
  torch  - the pure-PyTorch reference of every op (fastmix/ops/*: ``*_ref``); autograd through torch.
  cpu    - C++ kernels in csrc/cpu, extension ``fastmix._C``.
  triton - Triton kernels (GPU; on CPU tensors only under TRITON_INTERPRET=1).
  cuda   - CUDA C++ kernels in csrc/cuda, extension ``fastmix._C_cuda``.

The tensor's device picks the backend; ``FASTMIX_BACKEND`` overrides it and is read at every call.
Nothing here touches a GPU or fails at import: a missing extension is reported when an op needs it.
"""
from __future__ import annotations

import importlib
import importlib.util
import os

import torch

from ._compile import constant_result

BACKENDS = ("torch", "cpu", "triton", "cuda")
BUILD_HINT = "pip install --no-build-isolation -e .  (from the fastmix source tree, after installing torch)"
# An installed wheel or sdist is rebuilt the same way from its source: the extensions compile against the
# torch installed now.
REBUILD_HINT = (
    "pip install --no-build-isolation -e .  (from the fastmix source tree), or for an installed fastmix "
    "pip install --no-build-isolation --no-deps --force-reinstall <fastmix sdist or source tree>"
)

_ext_cache: dict[str, object] = {}


def _public_version(v: str) -> str:
    return str(v).split("+")[0]  # 2.13.0+cpu and 2.13.0+cu128 share the C++ ABI; 2.12 and 2.13 do not


def torch_mismatch() -> str | None:
    """Why the built extensions cannot load under the installed torch (None if they can, or if unknown).

    setup.py records the torch the extensions were built against (fastmix/_build_info.py). Loading them
    under another torch fails with an undefined C++ symbol at best and crashes in a static initialiser at
    worst, so a mismatch is reported before anything is loaded.
    """
    try:
        from . import _build_info
    except ImportError:  # not built, or built by a setup.py that did not record it: the import decides
        return None
    built = getattr(_build_info, "TORCH_VERSION", None)
    if built is None or _public_version(built) == _public_version(torch.__version__):
        return None
    return (
        f"fastmix's C++ extensions were built against torch {built}, but torch {torch.__version__} is installed "
        f"(their C++ ABI differs). Rebuild them against this torch: {REBUILD_HINT}"
    )


def _load(name: str):
    if name not in _ext_cache:
        mismatch = torch_mismatch()
        if mismatch is not None:
            _ext_cache[name] = ImportError(mismatch)
        else:
            try:
                _ext_cache[name] = importlib.import_module(name)
            except ImportError as exc:  # missing, or built against another torch (undefined symbol)
                _ext_cache[name] = exc
            else:
                if name == "fastmix._C":
                    # The schemas now exist: attach the Python fake and autograd registrations.
                    from .ops import register_all

                    register_all()
    mod = _ext_cache[name]
    return None if isinstance(mod, ImportError) else mod


def cpu_extension():
    """The loaded ``fastmix._C`` module (registers the ``torch.ops.fastmix`` schemas), or None."""
    return _load("fastmix._C")


def cuda_extension():
    """The loaded ``fastmix._C_cuda`` module, or None (never initialises CUDA)."""
    if cpu_extension() is None:  # the CUDA kernels implement schemas defined in _C
        return None
    return _load("fastmix._C_cuda")


def extension_error(name: str) -> str:
    mod = _ext_cache.get(name)
    return f" ({mod})" if isinstance(mod, ImportError) else ""


def _cpu_extension_or_raise(what: str):
    ext = cpu_extension()
    if ext is None:
        raise RuntimeError(
            f"fastmix.{what}: the C++ extension fastmix._C is not built{extension_error('fastmix._C')}. "
            f"Build it with: {BUILD_HINT}"
        )
    return ext


def cpu_capability() -> str:
    """The instruction set the C++ CPU kernels run with in this process: "avx512", "avx2" or "default".

    The extension holds one copy of the kernels per capability (x86-64: default = SSE2 baseline, avx2 =
    AVX2 + FMA, avx512 = AVX-512 F/BW/VL/DQ; aarch64: default = NEON) and uses the best this CPU supports.
    ``FASTMIX_CPU_CAPABILITY=avx2`` (read once, at the first CPU op) forces one; ``FASTMIX_CPU_DISABLE=avx512``
    rules one out. Raises RuntimeError when the forced one cannot run on this CPU (the CPU ops raise the
    same error; they never execute an instruction the CPU lacks), or with the build command when the
    extension is not built.

    >>> fastmix.cpu_capability()
    'avx2'
    """
    return _cpu_extension_or_raise("cpu_capability").cpu_capability()


def cpu_capabilities() -> dict[str, bool]:
    """Every capability compiled into the extension, best first -> whether it can run here."""
    return dict(_cpu_extension_or_raise("cpu_capabilities").cpu_capabilities())


def _cpu_capability_error() -> str | None:
    try:
        cpu_capability()
    except RuntimeError as exc:
        return str(exc)
    return None


def triton_available() -> bool:
    # find_spec, not import: asking which backends exist must not load triton (about a second of import
    # time, and `import fastmix` promises not to); the Triton modules import it when they first run.
    return importlib.util.find_spec("triton") is not None


def triton_interpret() -> bool:
    return os.environ.get("TRITON_INTERPRET", "0") == "1"


def available_backends(device: str | torch.device = "cpu") -> list[str]:
    """Backends that can run on ``device`` in this process (for tests, benches and the demo).

    "cpu" is listed when the C++ extension is built for the installed torch and its kernels can run on this
    CPU; ``fastmix.cpu_capability()`` says which instruction set they use (avx512, avx2 or default).
    """
    dev = torch.device(device)
    out = ["torch"]
    if dev.type == "cpu":
        if cpu_extension() is not None and _cpu_capability_error() is None:
            out.append("cpu")
        if triton_available() and triton_interpret():
            out.append("triton")
    elif dev.type == "cuda":
        if not torch.cuda.is_available():
            return []  # no such device here: nothing runs on it (not even the reference)
        if triton_available():
            out.append("triton")
        if cuda_extension() is not None:
            out.append("cuda")
    return out


@constant_result
def choose(device: torch.device, op: str) -> str:
    """The backend that runs ``op`` on ``device``: FASTMIX_BACKEND if set, else the device's default.

    Raises RuntimeError with the fixing command when the needed backend is not available. torch.compile
    runs this once at trace time (a constant of the graph), so loading an extension never breaks a graph.
    """
    forced = os.environ.get("FASTMIX_BACKEND", "").strip().lower()
    if forced:
        if forced not in BACKENDS:
            raise ValueError(f"FASTMIX_BACKEND must be one of {', '.join(BACKENDS)}, got {forced!r}")
        _require(forced, device, op)
        return forced
    if device.type == "cpu":
        _require("cpu", device, op)
        return "cpu"
    if device.type == "cuda":
        for name in _gpu_preference(op):
            if name in available_backends(device):
                return name
        raise RuntimeError(
            f"fastmix.{op}: no GPU backend available for {device} tensors. Install triton "
            f"(pip install triton) or build the CUDA extension with a CUDA torch and nvcc: {BUILD_HINT}; "
            "or set FASTMIX_BACKEND=torch for the (slow) reference."
        )
    # other devices (mps, xpu, ...) only have the reference
    return "torch"


# Default GPU backend per op, first available wins. The CUDA C++ extension implements the fused mix
# (freq_mix, frontend) only; the block DCT runs on Triton. Chosen by forward + backward time, since one
# backend runs both in training, measured in one run on an H100 (benches/results/h100/run1_afb9c80, N = 512,
# fp32, public ops, ms): freq_mix per-image channels Triton 0.71 + 0.81 vs CUDA 0.34 + 2.03 (the CUDA
# forward alone was faster then; Triton's forward has since dropped to 0.24 with tf32x3 dots), frontend
# x8 k = 4 Triton 4.76 + 3.70 vs CUDA 13.64 + 119.05. The CUDA kernels have been rewritten since (csrc/cuda/
# mix_kernels.cuh) and not yet timed: re-derive from gpu_bench's "gpu_preference" when a GPU run has both.
GPU_PREFERENCE: dict[str, tuple[str, ...]] = {
    "block_dct": ("triton",), "block_idct": ("triton",), "freq_mix": ("triton", "cuda"), "frontend": ("triton", "cuda"),
}
CUDA_OPS = ("freq_mix", "frontend")


def _gpu_preference(op: str) -> tuple[str, ...]:
    return GPU_PREFERENCE.get(op, ("triton", "cuda"))


def _require(name: str, device: torch.device, op: str) -> None:
    if name == "torch":
        return
    if name == "cpu":
        if device.type != "cpu":
            raise RuntimeError(f"fastmix.{op}: FASTMIX_BACKEND=cpu runs CPU tensors only, got a {device} tensor")
        if cpu_extension() is None:
            mismatch = torch_mismatch()
            if mismatch is not None:
                raise RuntimeError(f"fastmix.{op}: {mismatch}; or set FASTMIX_BACKEND=torch for the reference.")
            raise RuntimeError(
                f"fastmix.{op}: the C++ extension fastmix._C is not built{extension_error('fastmix._C')}. "
                f"Build it with: {BUILD_HINT}; or set FASTMIX_BACKEND=torch for the reference."
            )
        cap_error = _cpu_capability_error()
        if cap_error is not None:
            raise RuntimeError(f"fastmix.{op}: {cap_error} (or set FASTMIX_BACKEND=torch for the reference)")
    elif name == "cuda":
        if op not in CUDA_OPS:
            raise RuntimeError(f"fastmix.{op}: the cuda backend implements {', '.join(CUDA_OPS)} only; use triton or torch")
        if device.type != "cuda":
            raise RuntimeError(f"fastmix.{op}: FASTMIX_BACKEND=cuda runs CUDA tensors only, got a {device} tensor")
        if cuda_extension() is None:
            raise RuntimeError(
                f"fastmix.{op}: the CUDA extension fastmix._C_cuda is not built{extension_error('fastmix._C_cuda')}. "
                f"Build it on a machine with nvcc and a CUDA torch: {BUILD_HINT}"
            )
    elif name == "triton":
        if not triton_available():
            raise RuntimeError(f"fastmix.{op}: FASTMIX_BACKEND=triton but triton is not installed (pip install triton)")
        if device.type == "cpu" and not triton_interpret():
            raise RuntimeError(
                f"fastmix.{op}: the triton backend runs CPU tensors only under TRITON_INTERPRET=1"
            )
