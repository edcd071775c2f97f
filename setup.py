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
import subprocess
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
# The instruction sets of the wide copies, given on their command line only (GCC and Clang spell them
# alike); dispatch.cpp checks the same list with __builtin_cpu_supports. No -march / -mtune here: the
# tuning stays the one of every other file (_tune_flags). Why the command line and not a target pragma,
# and why the link order then matters: csrc/cpu/capability.h.
#   AVX2:   Haswell (2013) / Zen 1 (2017) and later: 256-bit vectors, FMA, F16C, BMI1/2 (x86-64-v3 less MOVBE, LZCNT).
#   AVX512: Skylake-SP (2017) / Zen 4 (2022) and later: F, BW, VL, DQ (x86-64-v4); v8<double> is one zmm.
#           -mprefer-vector-width=256: GCC's tunings for every AVX-512 server core (skylake-avx512,
#           icelake-server, sapphirerapids) vectorise loops 256 bits wide, the generic tuning 512: the backward
#           kernels' 64-element loops and reductions then ran 512 bits wide with masked tails, freq_mix_image
#           fwd+bwd 54.7 / 55.8 ms against 45.7 / 44.8 ms with it (1 thread, Xeon, N=64 3x112x112 k=6,
#           benches/results/cpu/dispatch_ab.json). The explicit 8 x double vectors (vec8.h) stay one zmm.
_AVX2_FLAGS = ["-mavx2", "-mfma", "-mf16c", "-mbmi", "-mbmi2", "-mpopcnt"]
CAPABILITY_FLAGS = {
    "DEFAULT": [],
    "AVX2": _AVX2_FLAGS,
    "AVX512": ["-mavx512f", "-mavx512bw", "-mavx512vl", "-mavx512dq"] + _AVX2_FLAGS + ["-mprefer-vector-width=256"],
}


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
    instructions it may use: that is CAPABILITY_FLAGS, on the wide copies only), so any value is
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
    only when their text changes, so that ninja does not recompile them on every install. Named
    <kernel>.<CAP>.cpp: BuildExt compiles each with CAPABILITY_FLAGS[CAP]. Baseline (DEFAULT) copies first.
    """
    out_dir = os.path.join("build", "fastmix_cpu_capability")
    os.makedirs(os.path.join(ROOT, out_dir), exist_ok=True)
    sources = []
    kernels = [s for s in sorted(glob.glob(os.path.join(ROOT, "csrc", "cpu", "*.cpp"))) if not s.endswith("dispatch.cpp")]
    for cap in capabilities:
        for src in kernels:
            name = os.path.basename(src)
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

        def build_extension(self, ext):
            """fastmix._C: each wide kernel copy (<kernel>.AVX2.cpp, ...) is compiled with its ISA flags
            (CAPABILITY_FLAGS), every other source with the extension's flags alone; the objects are linked
            baseline first, and the linked library is checked (fastmix/_isa_check.py): the linker keeps the
            first copy it sees of each inline header function that baseline and wide objects both emit, and
            baseline code must never call a wide one (SIGILL on an older CPU)."""
            if ext.name != "fastmix._C":
                return super().build_extension(ext)
            compile_all = self.compiler.compile  # torch's BuildExtension's (ninja or not)
            groups = {}  # capability -> objects, in link order

            def compile_by_capability(sources, *args, extra_postargs=None, **kwargs):
                by_cap = {}
                for src in sources:
                    m = re.search(r"\.([A-Z0-9]+)\.cpp$", src)
                    cap = m.group(1) if m and m.group(1) in CAPABILITY_FLAGS else "DEFAULT"
                    by_cap.setdefault(cap, []).append(src)
                for cap in sorted(by_cap, key=lambda c: bool(CAPABILITY_FLAGS[c])):  # baseline first
                    post = _with_flags(extra_postargs, CAPABILITY_FLAGS[cap])
                    groups[cap] = compile_all(by_cap[cap], *args, extra_postargs=post, **kwargs)
                return [o for objs in groups.values() for o in objs]

            check = _load_isa_check()
            why_not = check.available() or (None if shutil.which("strip") else "strip (binutils) not installed")
            if why_not:
                _log(f"not checking that the baseline code calls no AVX2 / AVX-512 copy of a function: {why_not}")
            # The check reads the library's symbol table (the pybind11 functions are hidden, absent from the
            # dynamic one): link it unstripped, strip it once checked.
            strip = "-s" in ext.extra_link_args and not why_not
            if strip:
                ext.extra_link_args = [a for a in ext.extra_link_args if a != "-s"]
            so = self.get_ext_fullpath(ext.name)
            before = os.path.getmtime(so) if os.path.exists(so) else None
            self.compiler.compile = compile_by_capability
            try:
                super().build_extension(ext)
            finally:
                self.compiler.compile = compile_all
            wide = {cap: objs for cap, objs in groups.items() if CAPABILITY_FLAGS[cap]}
            if why_not or not wide or not os.path.exists(so) or os.path.getmtime(so) == before:
                return  # nothing to check, or not relinked
            problems = check.check(groups["DEFAULT"], wide, so)
            if problems:
                os.remove(so)  # never leave an extension that may die with SIGILL on an older CPU
                sys.exit("[fastmix setup] the baseline code of fastmix._C could call an AVX2 / AVX-512 copy of a "
                         "function (SIGILL on a CPU without it; fastmix/_isa_check.py explains the rules). A "
                         "-march / -mavx* in CFLAGS or CXXFLAGS makes every file wide: remove it.\n  "
                         + "\n  ".join(problems))
            _log(f"checked: the baseline code of {so} calls no AVX2 / AVX-512 copy of a function")
            # Kept for tests/test_isa_link.py, which checks it again (same build id as the stripped library).
            shutil.copy2(so, os.path.join(self.build_temp, "fastmix_C.unstripped.so"))
            if strip:
                subprocess.run(["strip", "--strip-all", so], check=True)

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


def _with_flags(extra_postargs, flags):
    """extra_postargs (the extension's extra_compile_args: a list, or torch's {"cxx": [...], "nvcc": [...]})
    with flags added to the C++ compiler's."""
    if not flags:
        return extra_postargs
    if isinstance(extra_postargs, dict):
        return {**extra_postargs, "cxx": list(extra_postargs.get("cxx", [])) + flags}
    return list(extra_postargs or []) + flags


def _load_isa_check():
    """fastmix/_isa_check.py, loaded by path: importing the fastmix package needs the extension being built."""
    import importlib.util

    spec = importlib.util.spec_from_file_location("fastmix_isa_check", os.path.join(ROOT, "fastmix", "_isa_check.py"))
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


def _has_ninja_module():
    try:
        import ninja  # noqa: F401

        return True
    except ImportError:
        return False


setup(ext_modules=_extensions(), cmdclass={"build_ext": _build_ext()})
