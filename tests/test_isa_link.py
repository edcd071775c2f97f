"""The baseline code of fastmix._C never calls an AVX2 / AVX-512 copy of a function (fastmix/_isa_check.py).

The wide kernel copies are compiled with -mavx2 / -mavx512f ... on their command line, so the inline header
functions they emit out of line are wide code sharing a COMDAT group with the baseline objects' copies; the
linker keeps the first copy it sees, and setup.py links the baseline objects first. setup.py runs the check
after every build; here it runs again on this tree's build, and on small objects built to break each rule,
so that the check is shown to fail when it should:

  - a wide object linked first: the library keeps the wide copy of a shared inline function (rule 4);
    also shown on this build's own objects, relinked wide first;
  - a baseline file compiled with -mavx2 (rule 1); also shown on this build's objects, with the AVX2 copy
    of mix.cpp counted as a baseline object;
  - a baseline object calling a function that only a wide object defines (rule 2);
  - a wide object defining a strong symbol outside its fastmix::cpu_<CAP> namespace (rule 3).
"""
from __future__ import annotations

import glob
import os
import platform
import shutil
import subprocess
import sys
from pathlib import Path

import pytest

from fastmix import _backend, _isa_check

ROOT = Path(__file__).resolve().parents[1]
X86 = platform.machine().lower() in ("x86_64", "amd64")
CXX = shutil.which("g++") or shutil.which("c++")

pytestmark = [
    pytest.mark.skipif(not X86, reason="the wide capabilities are x86 ones"),
    pytest.mark.skipif(_isa_check.available() is not None, reason=str(_isa_check.available())),
]

COMMON = """
// A vectorisable inline function that every object emits out of line: SSE2 code in a baseline object,
// ymm code in one built with -mavx2.
inline __attribute__((noinline)) int hsum(const int* p, int n) {
  int s = 0;
  for (int i = 0; i < n; ++i) s += 3 * p[i];
  return s;
}
"""
BASE = COMMON + """
namespace fastmix { namespace cpu_AVX2 { int wide_entry(const int* p, int n); } }
int base_entry(const int* p, int n) { return hsum(p, n) + fastmix::cpu_AVX2::wide_entry(p, n); }
"""
WIDE = COMMON + """
namespace fastmix { namespace cpu_AVX2 { int wide_entry(const int* p, int n) { return hsum(p, n); } } }
"""
# Rule 2: the baseline object only declares twice<float> (an extern template), the wide one instantiates it.
BASE_EXTERN = """
template <class T> T twice(T x);
extern template float twice<float>(float);
float base_twice(float x) { return twice(x); }
"""
WIDE_EXTERN = """
template <class T> T twice(T x) { return x + x; }
template float twice<float>(float);
"""
# Rule 3: a strong definition outside the copy's namespace.
WIDE_STRONG = WIDE + "int helper(const int* p, int n) { return hsum(p, n); }\n"


def _compile(tmp: Path, name: str, text: str, *flags: str) -> str:
    src, obj = tmp / f"{name}.cpp", tmp / f"{name}.o"
    src.write_text(text)
    subprocess.run([CXX, "-O3", "-fPIC", "-c", str(src), "-o", str(obj), *flags], check=True, timeout=120)
    return str(obj)


def _link(tmp: Path, name: str, objs: list[str]) -> str:
    so = tmp / f"{name}.so"
    subprocess.run([CXX, "-shared", "-o", str(so), *objs], check=True, timeout=300)  # undefined symbols allowed
    return str(so)


def _rules(problems: list[str]) -> set[str]:
    return {p.split(":")[0] for p in problems}


@pytest.fixture(scope="module")
def toy(tmp_path_factory):
    if CXX is None:
        pytest.skip("no C++ compiler")
    tmp = tmp_path_factory.mktemp("isa")
    return tmp, {
        "base": _compile(tmp, "base", BASE),
        "base_avx2": _compile(tmp, "base_avx2", BASE, "-mavx2"),
        "wide": _compile(tmp, "wide", WIDE, "-mavx2", "-mfma"),
        "base_extern": _compile(tmp, "base_extern", BASE_EXTERN),
        "wide_extern": _compile(tmp, "wide_extern", WIDE_EXTERN, "-mavx2"),
        "wide_strong": _compile(tmp, "wide_strong", WIDE_STRONG, "-mavx2"),
    }


def test_baseline_first_passes(toy):
    tmp, o = toy
    assert _isa_check.check([o["base"]], {"AVX2": [o["wide"]]}, _link(tmp, "good", [o["base"], o["wide"]])) == []


def test_wide_object_linked_first_fails(toy):
    tmp, o = toy
    problems = _isa_check.check([o["base"]], {"AVX2": [o["wide"]]}, _link(tmp, "bad", [o["wide"], o["base"]]))
    assert _rules(problems) == {"rule 4"} and "hsum" in problems[0], problems


def test_baseline_file_compiled_wide_fails(toy):
    tmp, o = toy
    so = _link(tmp, "avx2_base", [o["base_avx2"], o["wide"]])
    problems = _isa_check.check([o["base_avx2"]], {"AVX2": [o["wide"]]}, so)
    assert _rules(problems) == {"rule 1"}, problems


def test_baseline_reference_defined_only_wide_fails(toy):
    _, o = toy
    problems = _isa_check.check([o["base_extern"]], {"AVX2": [o["wide_extern"]]})
    assert _rules(problems) == {"rule 2"} and "twice<float>" in problems[0], problems


def test_strong_symbol_outside_the_copy_namespace_fails(toy):
    _, o = toy
    problems = _isa_check.check([o["base"]], {"AVX2": [o["wide_strong"]]})
    assert _rules(problems) == {"rule 3"} and "helper(int const*, int)" in problems[0], problems


def _build_objects():
    """This tree's fastmix._C objects (python setup.py build_ext --inplace): (baseline, {cap: wide}, .so)."""
    ext = _backend.cpu_extension()
    if ext is None:
        pytest.skip(f"fastmix._C is not built: {_backend.BUILD_HINT}")
    so = os.path.realpath(ext.__file__)
    if not so.startswith(str(ROOT / "fastmix")):
        pytest.skip(f"fastmix._C ({so}) is not built in this tree: its objects are not here")
    temps = sorted(glob.glob(str(ROOT / "build" / f"temp.*-{sys.implementation.cache_tag}")))
    objs = sorted(glob.glob(os.path.join(temps[-1], "**", "*.o"), recursive=True)) if temps else []
    if not objs or max(os.path.getmtime(o) for o in objs) > os.path.getmtime(so):
        pytest.skip("this tree's build objects are missing or newer than fastmix._C")
    # setup.py strips the library after checking it, and keeps the unstripped one (the symbol table names the
    # hidden pybind11 functions) beside the objects.
    unstripped = os.path.join(temps[-1], "fastmix_C.unstripped.so")
    if not os.path.exists(unstripped) or _isa_check.build_id(unstripped) != _isa_check.build_id(so):
        pytest.skip("the unstripped library of this build is not beside its objects")
    wide: dict[str, list[str]] = {}
    for o in objs:
        cap = _isa_check.capability_of(o)
        if cap:
            wide.setdefault(cap, []).append(o)
    baseline = [o for o in objs if _isa_check.capability_of(o) is None]
    if sorted(wide) != ["AVX2", "AVX512"] or len(baseline) < 4:
        pytest.skip(f"not a full x86 build: {objs}")
    return baseline, wide, unstripped


def test_the_built_extension_keeps_the_baseline_copies():
    baseline, wide, so = _build_objects()
    assert _isa_check.check(baseline, wide, so) == []


def test_the_check_fails_on_this_build_relinked_wide_first(tmp_path):
    """The same objects linked wide first (the order setup.py forbids): the library keeps wide copies of
    header functions that the baseline code calls."""
    if CXX is None:
        pytest.skip("no C++ compiler")
    baseline, wide, _ = _build_objects()
    wide_objs = [o for objs in wide.values() for o in objs]
    so = _link(tmp_path, "wide_first", wide_objs + baseline)
    problems = _isa_check.check(baseline, wide, so)
    assert problems and _rules(problems) == {"rule 4"}, problems


def test_the_check_fails_on_this_build_with_a_wide_baseline_object():
    """mix.cpp's AVX2 copy counted as a baseline object: what compiling a baseline file with -mavx2 gives."""
    baseline, wide, so = _build_objects()
    avx2_mix = next(o for o in wide["AVX2"] if os.path.basename(o).startswith("mix."))
    problems = _isa_check.check(baseline + [avx2_mix], {"AVX512": wide["AVX512"]}, so)
    assert "rule 1" in _rules(problems), problems
