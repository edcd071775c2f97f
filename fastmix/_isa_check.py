"""Static check that fastmix._C's baseline code never calls a wide (AVX2 / AVX-512) copy of a function.

The wide kernel copies are compiled with their ISA on the command line (setup.py, csrc/cpu/capability.h),
so every inline function of the torch and standard headers that such an object emits out of line (c10::Half
conversions, std::vector members, at::parallel_for helpers...) is wide code too, in a COMDAT group shared
with the baseline objects' copy of the same function. The linker keeps one copy per group for the whole
extension: the first one it sees (GNU ld, gold, lld), hence setup.py links every baseline object (fastmix.cpp,
dispatch.cpp, the DEFAULT copies) first. This module checks, with binutils' nm and objdump, that:

  1. no baseline object holds a wide instruction (a baseline file compiled with -mavx2 fails here);
  2. no symbol that a baseline object references is defined by a wide object only (that reference would
     bind to the wide copy: nothing would be left to keep), except the copies' entry points, the strong
     symbols of fastmix::cpu_<CAP> that dispatch.cpp calls once it knows the CPU runs them;
  3. a wide object defines no strong symbol outside its own namespace fastmix::cpu_<CAP> (a strong
     definition is not a COMDAT copy: it wins or clashes regardless of link order);
  4. in the linked extension, every function defined by a baseline object and by a wide object, whose
     baseline copy holds no wide instruction, has a kept copy without one (a wide object linked first
     fails here).

Used by setup.py after compiling (1-3, failing the build) and after linking (4), and by
tests/test_isa_link.py, which also shows that each rule can fail. Standard library only: setup.py loads
this file before fastmix can be imported.
"""
from __future__ import annotations

import bisect
import re
import shutil
import subprocess

# Instructions a baseline x86-64 CPU (SSE2) cannot run, in objdump's AT&T syntax: any VEX / EVEX encoded
# instruction (AT&T spells them all with a leading v), the ymm / zmm / mask registers, and the BMI1/2 and
# POPCNT instructions of the AVX2 capability. (tzcnt is left out: GCC's baseline code uses it, as rep bsf.)
_WIDE_REG = re.compile(r"%(?:[yz]mm\d|k[0-7]\b)")
_BMI = frozenset("andn bextr blsi blsmsk blsr bzhi mulx pdep pext rorx sarx shlx shrx popcnt".split())
_INSN = re.compile(r"^\s*([0-9a-f]+):\s+(?:\{\w+\}\s+)?([a-z][\w.]*)\s*(.*)$")
_LABEL = re.compile(r"^[0-9a-f]+ <(.+)>:$")
_SPECIAL = ("vtable for ", "VTT for ", "construction vtable for ", "typeinfo for ", "typeinfo name for ",
            "guard variable for ", "reference temporary #0 for ", "TLS init function for ", "TLS wrapper function for ")

STRONG = set("TDBRGSCi")  # nm: global definitions that are not weak / unique
WEAK = set("WVu")  # COMDAT-style definitions: the linker keeps one copy


def available() -> str | None:
    """None when the tools this check needs are installed, else why not."""
    missing = [t for t in ("nm", "objdump", "c++filt", "readelf") if shutil.which(t) is None]
    return f"{', '.join(missing)} (binutils) not installed" if missing else None


def _run(*cmd: str, stdin: str | None = None) -> str:
    r = subprocess.run(cmd, capture_output=True, text=True, input=stdin, timeout=600)
    if r.returncode != 0:
        raise RuntimeError(f"{' '.join(cmd)}: exit {r.returncode}: {r.stderr.strip()}")
    return r.stdout


def is_wide(mnemonic: str, operands: str) -> bool:
    if mnemonic.startswith("v") and mnemonic not in ("verr", "verw"):
        return True
    return mnemonic in _BMI or _WIDE_REG.search(operands) is not None


def symbols(obj: str) -> tuple[dict[str, str], set[str]]:
    """(global definitions: name -> nm type, undefined references) of an object file (mangled names)."""
    defined, undefined = {}, set()
    for line in _run("nm", "-P", obj).splitlines():
        parts = line.split()
        if len(parts) < 2:
            continue
        name, kind = parts[0], parts[1]
        if kind == "U" or kind in ("w", "v") and len(parts) == 2:  # w / v without a value: a weak reference
            undefined.add(name)
        elif kind in STRONG or kind in WEAK or kind in ("w", "v"):
            defined[name] = kind
    return defined, undefined


def wide_functions(obj: str) -> dict[str, list[str]]:
    """Function name -> its first few wide instructions, for every function of an object file holding one."""
    out: dict[str, list[str]] = {}
    current = None
    for line in _run("objdump", "-d", "--no-show-raw-insn", obj).splitlines():
        m = _LABEL.match(line)
        if m:
            current = m.group(1)
            continue
        m = _INSN.match(line)
        if m and current is not None and is_wide(m.group(2), m.group(3)):
            found = out.setdefault(current, [])
            if len(found) < 3:
                found.append(f"{m.group(2)} {m.group(3)}".strip())
    return out


def demangle(names) -> dict[str, str]:
    names = list(names)
    if not names:
        return {}
    return dict(zip(names, _run("c++filt", stdin="\n".join(names) + "\n").splitlines()))


def _kept_copy_wide(so: str, names: set[str]) -> dict[str, list[str] | None]:
    """For each function name: the wide instructions of the copy the linked library kept ([] when none),
    or None when the library's symbol tables do not name it."""
    table = {}
    for flags in (("-S", "--defined-only"), ("-D", "-S", "--defined-only")):  # the full table, else the dynamic one
        r = subprocess.run(["nm", *flags, so], capture_output=True, text=True, timeout=600)
        for line in r.stdout.splitlines():
            parts = line.split()
            if len(parts) == 4 and parts[3] in names and parts[3] not in table:
                table[parts[3]] = (int(parts[0], 16), int(parts[1], 16))
    result: dict[str, list[str] | None] = {n: None for n in names}
    if not table:
        return result
    ranges = sorted((start, start + size, name) for name, (start, size) in table.items())
    starts = [r[0] for r in ranges]
    lo, hi = ranges[0][0], max(r[1] for r in ranges)
    for name in table:
        result[name] = []
    # One pass over the address span of all of them (one objdump call per function is much slower).
    text = _run("objdump", "-d", "--no-show-raw-insn", f"--start-address={lo:#x}", f"--stop-address={hi:#x}", so)
    for line in text.splitlines():
        m = _INSN.match(line)
        if not m or not is_wide(m.group(2), m.group(3)):
            continue
        addr = int(m.group(1), 16)
        i = bisect.bisect_right(starts, addr) - 1
        if i >= 0 and addr < ranges[i][1] and len(result[ranges[i][2]]) < 3:
            result[ranges[i][2]].append(f"{m.group(2)} {m.group(3)}".strip())
    return result


def build_id(path: str) -> str | None:
    """The GNU build id of a linked library (kept by strip), or None."""
    m = re.search(r"Build ID: ([0-9a-f]+)", _run("readelf", "-n", path))
    return m.group(1) if m else None


def check(baseline: list[str], wide: dict[str, list[str]], so: str | None = None) -> list[str]:
    """Problems found (empty: the baseline code cannot reach a wide copy).

    baseline: the baseline objects, in link order; wide: capability name (AVX2, AVX512) -> its objects;
    so: the linked library, for rule 4 (skipped when None).
    """
    problems = []
    base_defs: dict[str, str] = {}
    base_refs: dict[str, str] = {}  # symbol -> an object referencing it
    base_wide: dict[str, list[str]] = {}
    for obj in baseline:
        defined, undefined = symbols(obj)
        for n, k in defined.items():
            base_defs.setdefault(n, k)
        for n in undefined:
            base_refs.setdefault(n, obj)
        for fn, insns in wide_functions(obj).items():
            base_wide.setdefault(fn, insns)
            problems.append(f"rule 1: baseline object {obj} holds wide instructions in {demangle([fn])[fn]} "
                            f"({'; '.join(insns)}): it must be compiled for the baseline ISA")
    wide_defs: dict[str, tuple[str, str, str]] = {}  # symbol -> (object, nm type, capability)
    wide_code: dict[str, list[str]] = {}  # function -> wide instructions of a wide object's copy
    strong_outside = []
    for cap, objs in wide.items():
        for obj in objs:
            defined, _ = symbols(obj)
            for n, k in defined.items():
                wide_defs.setdefault(n, (obj, k, cap))
            strong = [n for n, k in defined.items() if k in STRONG]
            for n, d in demangle(strong).items():
                plain = next((d[len(p):] for p in _SPECIAL if d.startswith(p)), d)
                if not plain.startswith(f"fastmix::cpu_{cap}::"):
                    strong_outside.append((obj, cap, d))
            for fn, insns in wide_functions(obj).items():
                wide_code.setdefault(fn, insns)
    reached = sorted(n for n in base_refs if n not in base_defs and n in wide_defs)
    for n, d in demangle(reached).items():
        obj, kind, cap = wide_defs[n]
        if kind in STRONG and d.startswith(f"fastmix::cpu_{cap}::"):
            continue  # a capability's entry point: dispatch.cpp calls it once the CPU is known to run it
        problems.append(f"rule 2: {base_refs[n]} references {d}, which no baseline object defines but "
                        f"{wide_defs[n][0]} does: the baseline code would call the wide copy")
    for obj, cap, d in strong_outside:
        problems.append(f"rule 3: wide object {obj} defines the strong symbol {d} outside namespace "
                        f"fastmix::cpu_{cap}")
    if so is not None:
        # Functions both sides define where the choice matters: a wide object's copy is wide, the baseline one is not.
        shared = {n for n in base_defs if n in wide_defs and n in wide_code and n not in base_wide}
        for n, found in _kept_copy_wide(so, shared).items():
            if found:
                problems.append(f"rule 4: {so} kept the wide copy of {demangle([n])[n]} ({'; '.join(found)}), "
                                f"defined by baseline and wide objects: link every baseline object first")
            elif found is None:
                problems.append(f"rule 4: {so} does not name {n} in its symbol tables: cannot check which copy "
                                "it kept")
    return problems


def capability_of(obj: str, capabilities=("AVX2", "AVX512")) -> str | None:
    """The wide capability an object of setup.py's wrappers (<kernel>.<CAP>.o) is built for, else None."""
    m = re.search(r"\.([A-Z0-9]+)\.o(?:bj)?$", obj)
    return m.group(1) if m and m.group(1) in capabilities else None
