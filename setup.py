"""Build fastmix's C++ extensions against the installed torch.

    pip install --no-build-isolation -e .

Always builds ``fastmix._C`` (schemas + CPU kernels). Builds ``fastmix._C_cuda`` (CUDA kernels) only
when nvcc and a CUDA build of torch are present, or when FASTMIX_CUDA=1 forces it; otherwise it prints
why it skipped. Every switch read here is listed in the README's environment table.
"""
import glob
import os
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[fastmix setup] {msg}", file=sys.stderr)


def _cpu_flags():
    flags = ["-O3", "-std=c++20", "-fopenmp"]
    # The CPU kernels are written as fixed-size 8-wide loops that the compiler vectorises; -march=native
    # lets it use the build machine's widest SIMD. The extension is built where it runs (pip install -e),
    # so this is safe; FASTMIX_CPU_ARCH=generic builds a portable binary instead.
    arch = os.environ.get("FASTMIX_CPU_ARCH", "native")
    if arch != "generic":
        flags.append(f"-march={arch}")
    return flags


def _want_cuda():
    forced = os.environ.get("FASTMIX_CUDA")
    if forced == "0":
        return False, "FASTMIX_CUDA=0"
    if not glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")):
        return False, "no CUDA sources in csrc/cuda"
    import torch

    if forced == "1":
        return True, "FASTMIX_CUDA=1"
    if torch.version.cuda is None:
        return False, f"torch {torch.__version__} is a CPU build (install a CUDA build of torch to get the CUDA kernels)"
    from torch.utils.cpp_extension import CUDA_HOME

    if CUDA_HOME is None or shutil.which("nvcc") is None and not os.path.exists(os.path.join(CUDA_HOME, "bin", "nvcc")):
        return False, "nvcc not found (set CUDA_HOME)"
    return True, f"nvcc at {CUDA_HOME}, torch CUDA {torch.version.cuda}"


def _extensions():
    from torch.utils.cpp_extension import CppExtension, CUDAExtension

    cpu_sources = ["csrc/fastmix.cpp"] + sorted(glob.glob("csrc/cpu/*.cpp"))
    exts = [
        CppExtension(
            "fastmix._C",
            cpu_sources,
            extra_compile_args={"cxx": _cpu_flags()},
            extra_link_args=["-fopenmp"],
            py_limited_api=False,
        )
    ]
    want, why = _want_cuda()
    if want:
        _log(f"building the CUDA extension: {why}")
        archs = os.environ.get("FASTMIX_CUDA_ARCHS", "80;90")
        gencode = []
        for a in archs.split(";"):
            gencode += ["-gencode", f"arch=compute_{a},code=sm_{a}"]
        exts.append(
            CUDAExtension(
                "fastmix._C_cuda",
                sorted(glob.glob("csrc/cuda/*.cu")) + sorted(glob.glob("csrc/cuda/*.cpp")),
                extra_compile_args={
                    "cxx": ["-O3", "-std=c++17"],
                    # --threads 0: compile the architectures in parallel (the GPU session's build time is device time).
                    "nvcc": ["-O3", "-std=c++17", "-lineinfo", "--threads", "0"] + gencode,
                },
            )
        )
    else:
        _log(f"skipping the CUDA extension: {why}")
    return exts


def _build_ext():
    from torch.utils.cpp_extension import BuildExtension

    return BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None or _has_ninja_module())


def _has_ninja_module():
    try:
        import ninja  # noqa: F401

        return True
    except ImportError:
        return False


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
