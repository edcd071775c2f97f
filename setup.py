"""Build fastmix's C++ extensions against the installed torch.

    pip install --no-build-isolation -e .

Always builds ``fastmix._C`` (schemas + CPU kernels). Builds ``fastmix._C_cuda`` (CUDA kernels) only
when nvcc and a CUDA build of torch are present, or when FASTMIX_CUDA=1 forces it; otherwise it prints
why it skipped. Every switch read here is listed in the README's environment table.

A wheel for other machines (README, "A wheel for other machines"):

    python -m build --sdist --no-isolation && pip wheel --no-build-isolation --no-deps -w dist dist/fastmix-*.tar.gz
"""
import glob
import os
import platform
import re
import shutil
import sys

from setuptools import setup

ROOT = os.path.dirname(os.path.abspath(__file__))


def _log(msg):
    print(f"[fastmix setup] {msg}", file=sys.stderr)


# CPU capabilities: the kernels in csrc/cpu/{dct,mix}.cpp are compiled once per instruction set and the
# extension picks the best one the running CPU supports when it is first called (csrc/cpu/capability.h,
# csrc/cpu/dispatch.cpp), as PyTorch's CPU_CAPABILITY does. So one build runs on any CPU of its architecture
# (a wheel, a container, a shared environment) at the speed of the CPU it lands on. No -march: the
# baseline of the compiler's target (x86-64 SSE2; aarch64 Advanced SIMD) is what every file but the
# AVX2 / AVX-512 kernel copies is compiled for.
X86_CAPABILITIES = ("DEFAULT", "AVX2", "AVX512")


def _cpu_capabilities():
    machine = platform.machine().lower()
    compiled = X86_CAPABILITIES if machine in ("x86_64", "amd64", "i686", "x86") else ("DEFAULT",)
    wanted = os.environ.get("FASTMIX_CPU_CAPABILITIES", "").strip()
    if not wanted:
        return compiled
    names = {n.strip().upper() for n in wanted.split(",") if n.strip()}
    unknown = names - set(compiled)
    if unknown:
        sys.exit(f"[fastmix setup] FASTMIX_CPU_CAPABILITIES: {', '.join(sorted(unknown))} cannot be built for "
                 f"{machine} (choose among {', '.join(c.lower() for c in compiled)})")
    # DEFAULT is always built: it is what runs where nothing wider does.
    return tuple(c for c in compiled if c in names or c == "DEFAULT")


def _debug():
    return os.environ.get("FASTMIX_DEBUG", "0") == "1"


def _cpu_flags():
    if os.environ.get("FASTMIX_CPU_ARCH"):
        _log("FASTMIX_CPU_ARCH is no longer read: the kernels are built for every CPU capability and chosen at run "
             "time (see FASTMIX_CPU_CAPABILITY in the README)")
    flags = ["-O3", "-std=c++20", "-fopenmp"] + _tune_flags()
    # Release builds carry no debug information (Python's own CFLAGS add -g: the extension with one CPU copy
    # was 23 MB with it, 1.5 MB without; 5 MB now with three); FASTMIX_DEBUG=1 keeps it, for gdb / perf.
    return flags + (["-g"] if _debug() else ["-g0"])


def _tune_flags():
    """-mtune: the CPU whose costs the compiler schedules, unrolls and picks instructions for (not which
    instructions it may use: that is the capability copies' -march-free target pragmas), so any value is
    portable. GCC's default, generic, cost the AVX2 copy 4-17% on the benchmark's ops on a Zen 2 EPYC against
    the former -march=native build (1 thread, fp32, benches/results/cpu/dispatch_ab.json); tuning for the
    build machine gave most of it back, and on an AVX-512 Xeon it changed nothing. So x86 builds tune for the
    machine that compiles (a source install runs where it was built); FASTMIX_CPU_TUNE names another CPU
    (e.g. generic for a wheel shared by many CPUs) or `none` for the compiler's default."""
    tune = os.environ.get("FASTMIX_CPU_TUNE", "").strip()
    if not tune:
        x86 = platform.machine().lower() in ("x86_64", "amd64", "i686", "x86")
        tune = "native" if x86 else "none"  # aarch64 compilers differ in what -mtune=native means
    if tune == "none":
        return []
    if not re.fullmatch(r"[A-Za-z0-9_.+-]+", tune):
        sys.exit(f"[fastmix setup] FASTMIX_CPU_TUNE: {tune!r} is not a CPU name (e.g. native, generic, "
                 f"znver2, skylake-avx512, or none for the compiler's default)")
    return [f"-mtune={tune}"]


def _link_flags():
    return [] if _debug() else ["-s"]  # strip the symbol table too (the dynamic symbols Python needs stay)


def _capability_sources(capabilities):
    """One generated wrapper per (kernel file, capability): defines FASTMIX_CPU_CAP and includes the file.

    The wrappers live in build/ (like the *.cpp.AVX2.cpp files PyTorch's build generates) and are rewritten
    only when their text changes, so that ninja does not recompile them on every install.
    """
    out_dir = os.path.join("build", "fastmix_cpu_capability")
    os.makedirs(os.path.join(ROOT, out_dir), exist_ok=True)
    sources = []
    for src in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))):
        name = os.path.basename(src)
        if name == "dispatch.cpp":
            continue
        for cap in capabilities:
            wrapper = os.path.join(out_dir, f"{name[:-4]}.{cap}.cpp")
            rel = os.path.relpath(src, os.path.join(ROOT, out_dir)).replace(os.sep, "/")
            text = (f"// Generated by setup.py: csrc/cpu/{name} for the {cap} CPU capability (csrc/cpu/capability.h).\n"
                    f"#define FASTMIX_CPU_CAP {cap}\n#define FASTMIX_CPU_CAP_{cap}\n#include \"{rel}\"\n")
            path = os.path.join(ROOT, wrapper)
            if not os.path.exists(path) or open(path).read() != text:
                with open(path, "w") as f:
                    f.write(text)
            sources.append(wrapper)
    return sources


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

    capabilities = _cpu_capabilities()
    _log(f"CPU kernels for: {', '.join(c.lower() for c in capabilities)} (the best this CPU supports is chosen at run time)")
    cpu_sources = ["csrc/fastmix.cpp", "csrc/cpu/dispatch.cpp"] + _capability_sources(capabilities)
    exts = [
        CppExtension(
            "fastmix._C",
            cpu_sources,
            define_macros=[(f"FASTMIX_BUILT_{c}", None) for c in capabilities],
            extra_compile_args={"cxx": _cpu_flags()},
            extra_link_args=["-fopenmp"] + _link_flags(),
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
                extra_link_args=_link_flags(),
                extra_compile_args={
                    "cxx": ["-O3", "-std=c++17"] + (["-g"] if _debug() else ["-g0"]),
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

    base = BuildExtension.with_options(use_ninja=shutil.which("ninja") is not None or _has_ninja_module())

    class BuildExt(base):
        """Builds the extensions, then records what they were built against in fastmix/_build_info.py.

        The extensions link against torch's C++ ABI, which changes between torch releases: fastmix reads
        this file before it loads them, and under another torch raises a clear error naming both versions
        and the rebuild command instead of an undefined-symbol trace or a crash (fastmix/_backend.py).
        """

        def run(self):
            super().run()
            self._write_build_info()

        def _write_build_info(self):
            import torch

            names = [e.name for e in self.extensions]
            cpu = next(e for e in self.extensions if e.name == "fastmix._C")
            caps = [m[0][len("FASTMIX_BUILT_"):].lower() for m in cpu.define_macros if m[0].startswith("FASTMIX_BUILT_")]
            text = (
                "# Generated by setup.py when fastmix's C++ extensions were built (not in git). Read by\n"
                "# fastmix/_backend.py before it loads them: they only work with the torch they were built against.\n"
                f"TORCH_VERSION = {str(torch.__version__)!r}\n"
                f"TORCH_CUDA = {torch.version.cuda!r}\n"
                f"EXTENSIONS = {tuple(names)!r}\n"
                f"CPU_CAPABILITIES = {tuple(caps)!r}\n"
            )
            path = os.path.join(os.path.dirname(self.get_ext_fullpath("fastmix._C")), "_build_info.py")
            with open(path, "w") as f:
                f.write(text)
            _log(f"wrote {path}: built against torch {torch.__version__}")

    return BuildExt


def _has_ninja_module():
    try:
        import ninja  # noqa: F401

        return True
    except ImportError:
        return False


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
