"""Argument checks and small helpers shared by the op families.

Every public op validates here, before any kernel runs, and raises TypeError / ValueError / IndexError
naming the argument: the kernels may then assume well-formed inputs.
"""
from __future__ import annotations

import functools

import torch

FLOAT_DTYPES = (torch.float32, torch.float16, torch.bfloat16, torch.float64)


def is_compiling() -> bool:
    """True while Dynamo traces (data-dependent checks and cached constants take other routes then)."""
    return torch.compiler.is_compiling()


def exact_under_autocast(fn):
    """Run a public op (first argument: its input tensor) with autocast off on that tensor's device.

    Every op promises its computation dtype (float32 accumulation, float64 for float64 inputs) and returns
    x's dtype (or out_dtype). Under torch.autocast the matmuls inside the torch paths (the block-DCT
    einsums of the reference backend, the references themselves, the Triton interpreter's fallbacks) would
    silently run in bfloat16 / float16 while the result still says float32 (the front-end's colour einsum:
    errors of 3.5-6 on values up to ~680 under autocast("cpu", torch.bfloat16)). The fused C++ / CUDA ops
    are custom ops, which autocast leaves alone. Cost when autocast is off: one flag read."""

    @functools.wraps(fn)
    def run(x, *args, **kwargs):
        dev = x.device.type if isinstance(x, torch.Tensor) else None
        if dev is not None and torch.amp.is_autocast_available(dev) and torch.is_autocast_enabled(dev):
            with torch.autocast(dev, enabled=False):
                return fn(x, *args, **kwargs)
        return fn(x, *args, **kwargs)

    return run


def tensor_cache(maxsize: int | None):
    """functools.lru_cache for functions that build constant tensors (transform matrices, geometry, keep
    slots), built outside inference mode: a tensor made under ``torch.inference_mode()`` (an evaluation pass
    that happens to run first) cannot be saved for backward, and the cache would hand it to every later
    training call. Callers must not modify the tensors returned."""

    def deco(fn):
        @functools.lru_cache(maxsize=maxsize)
        @functools.wraps(fn)
        def cached(*args):
            with torch.inference_mode(False):
                return fn(*args)

        return cached

    return deco


def check_float_tensor(t, name: str, *, dims: int | None = None, min_dims: int | None = None) -> None:
    if not isinstance(t, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in FLOAT_DTYPES:
        raise TypeError(f"{name} must be float32, float16, bfloat16 or float64, got {t.dtype}")
    if dims is not None and t.dim() != dims:
        raise ValueError(f"{name} must have {dims} dims, got shape {tuple(t.shape)}")
    if min_dims is not None and t.dim() < min_dims:
        raise ValueError(f"{name} must have at least {min_dims} dims, got shape {tuple(t.shape)}")


def check_block(block, name: str = "block") -> int:
    if isinstance(block, bool) or not isinstance(block, int):
        raise TypeError(f"{name} must be an int, got {type(block).__name__}")
    if block < 1:
        raise ValueError(f"{name} must be >= 1, got {block}")
    return block


def check_multiple(size: int, block: int, what: str) -> None:
    if size % block != 0:
        raise ValueError(f"{what} must be a multiple of {block}, got {size}")


def check_same_device(ref: torch.Tensor, ref_name: str, **others) -> None:
    for name, t in others.items():
        if isinstance(t, torch.Tensor) and t.device != ref.device:
            raise ValueError(f"{name} is on {t.device} but {ref_name} is on {ref.device}; move them to one device")


# Range check of partner indices that live on an accelerator: reading min / max back is a host sync (the
# CPU waits for every queued kernel; the GPU then idles while Python launches the op). On by default for
# a clear IndexError; see set_index_checks. CPU indices are always checked (no sync to pay).
_INDEX_CHECKS = {"device": True}


def set_index_checks(enabled: bool) -> bool:
    """Turn the range check of accelerator-resident ``index`` tensors on (default) or off; returns the
    previous setting.

    The check reads the index's min and max back to the host: one sync per call, which stalls the GPU
    while Python launches the op (one H100, freq_mix N = 512, 3x112x112, k = 6, fp32, benches/results/h100
    run 2: 0.649 ms with the check, 0.367 ms without). Turn it off
    in a training loop whose indices come from fastmix.sample_partners / HybridMask.plan (valid by
    construction). It is skipped anyway while a CUDA graph is captured and under torch.compile, where a
    sync is not allowed. Unchecked, an out-of-range partner trips the CUDA kernels' device-side assert
    (which ends the process's CUDA context, as torch.gather does) and contributes zeros in the Triton
    kernels. CPU indices are always checked.
    """
    if not isinstance(enabled, bool):
        raise TypeError(f"enabled must be a bool, got {type(enabled).__name__}")
    prev = _INDEX_CHECKS["device"]
    _INDEX_CHECKS["device"] = enabled
    return prev


def wants_index_check(index: torch.Tensor) -> bool:
    """Whether check_index may read ``index`` back (see set_index_checks)."""
    if index.device.type == "cpu":
        return True
    if index.device.type == "meta":  # shapes only (shape propagation, FLOP counting): no values to read
        return False
    if not _INDEX_CHECKS["device"]:
        return False
    return not (index.device.type == "cuda" and torch.cuda.is_current_stream_capturing())


def compute_dtype(dtype: torch.dtype) -> torch.dtype:
    """Accumulation dtype: float64 stays float64, everything else accumulates in float32."""
    return torch.float64 if dtype == torch.float64 else torch.float32


def zeros_result(shape, dtype: torch.dtype, like: torch.Tensor, *inputs: torch.Tensor | None) -> torch.Tensor:
    """Zeros of ``shape`` for an op with nothing to compute (an empty batch or keep set), still connected to
    autograd when an input requires grad: backward then gives those inputs zero gradients instead of failing
    with "does not require grad". The connection is a sum over an empty slice of each input: exactly 0, and
    a NaN or Inf in the input cannot reach the zeros."""
    out = like.new_zeros(shape, dtype=dtype)
    tracked = [t for t in inputs if t is not None and t.requires_grad]
    if torch.is_grad_enabled() and tracked:
        out = out + sum(t.reshape(-1)[:0].sum() for t in tracked).to(dtype)
    return out


def check_autodiff_mode(op: str, *tensors) -> None:
    """The fused kernels have reverse-mode autograd (torch.autograd, double backward included) and nothing
    else: under forward-mode AD (torch.autograd.forward_ad, torch.func.jvp) their outputs would carry no
    tangent, silently, and torch.func.grad fails inside torch with a message that does not name fastmix.
    Both are refused here with what works instead. (vmap runs through PyTorch's per-sample fallback.)"""
    if is_compiling():
        return
    if torch._C._functorch.peek_interpreter_stack() is not None:
        from torch._C._functorch import TransformType
        from torch._functorch.pyfunctorch import retrieve_all_functorch_interpreters

        used = {i.key() for i in retrieve_all_functorch_interpreters()} & {TransformType.Grad, TransformType.Jvp}
        if used:
            raise NotImplementedError(
                f"fastmix.{op}: torch.func.grad / jvp (and jacrev, jacfwd, hessian) are not supported by the "
                "fused kernels; use torch.autograd.grad (double backward works), or FASTMIX_BACKEND=torch (the "
                "pure-PyTorch reference) for torch.func transforms")
    import torch.autograd.forward_ad as fwad

    if getattr(fwad, "_current_level", -1) >= 0 and any(
        isinstance(t, torch.Tensor) and fwad.unpack_dual(t).tangent is not None for t in tensors
    ):
        raise NotImplementedError(
            f"fastmix.{op}: forward-mode AD (dual tensors) is not supported by the fused kernels; use "
            "torch.autograd (reverse mode), or FASTMIX_BACKEND=torch (the pure-PyTorch reference) for jvp")
