"""setup.py's compiler flags that are not visible in the built extension: FASTMIX_CPU_TUNE (-mtune).

-mtune changes speed only (benches/results/cpu/dispatch_ab.json), so no kernel test can fail when it is
dropped or garbled: this checks the flag itself. setup.py runs setup() on import, so the function is taken
from its source rather than imported.
"""
from __future__ import annotations

import ast
import os
import platform
import re
import sys
from pathlib import Path

import pytest

SETUP = Path(__file__).resolve().parents[1] / "setup.py"


def _function(name: str):
    tree = ast.parse(SETUP.read_text())
    node = next(n for n in tree.body if isinstance(n, ast.FunctionDef) and n.name == name)
    ns = {"os": os, "platform": platform, "re": re, "sys": sys}
    exec(compile(ast.Module(body=[node], type_ignores=[]), str(SETUP), "exec"), ns)  # noqa: S102 -- our own file
    return ns[name]


@pytest.fixture
def tune_flags(monkeypatch):
    monkeypatch.delenv("FASTMIX_CPU_TUNE", raising=False)
    return _function("_tune_flags")


def test_x86_builds_tune_for_the_build_machine(tune_flags, monkeypatch):
    monkeypatch.setattr(platform, "machine", lambda: "x86_64")
    assert tune_flags() == ["-mtune=native"]
    monkeypatch.setattr(platform, "machine", lambda: "aarch64")
    assert tune_flags() == []  # the compiler's default where -mtune=native means different things


@pytest.mark.parametrize("value, flags", [("generic", ["-mtune=generic"]), ("znver2", ["-mtune=znver2"]),
                                          ("skylake-avx512", ["-mtune=skylake-avx512"]), ("none", [])])
def test_fastmix_cpu_tune_names_the_cpu(tune_flags, monkeypatch, value, flags):
    monkeypatch.setenv("FASTMIX_CPU_TUNE", value)
    assert tune_flags() == flags


@pytest.mark.parametrize("value", ["native -O0", "generic;rm", "-march=native"])
def test_a_value_that_is_not_a_cpu_name_is_refused(tune_flags, monkeypatch, value):
    monkeypatch.setenv("FASTMIX_CPU_TUNE", value)
    with pytest.raises(SystemExit, match="FASTMIX_CPU_TUNE"):
        tune_flags()


def test_every_cpu_file_gets_the_tune_flag():
    # _cpu_flags is what every C++ source of fastmix._C is compiled with (the capability copies included).
    src = SETUP.read_text()
    assert re.search(r'flags = \[[^\]]*\] \+ _tune_flags\(\)', src), "_cpu_flags no longer adds _tune_flags()"
