"""The CUDA sources compile (CI has nvcc but no GPU and a CPU build of torch).

The CPU wheel of torch ships the c10/ATen CUDA headers but not the generated
c10/cuda/impl/cuda_cmake_macros.h, so the test supplies that one-line header in a temporary folder.
Their logic runs on the CPU in test_cuda_emulated.py; running them on a device needs a GPU:
benches/gpu_bench.py does that on a lent machine.
"""
import glob
import os
import shutil
import subprocess
import sysconfig

import pytest

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
SOURCES = sorted(glob.glob(os.path.join(ROOT, "csrc", "cuda", "*.cu")))


def _nvcc():
    path = shutil.which("nvcc")
    if path is None and os.path.exists("/usr/local/cuda/bin/nvcc"):
        path = "/usr/local/cuda/bin/nvcc"
    return path


@pytest.mark.slow
@pytest.mark.parametrize("arch", [90, 80])
@pytest.mark.parametrize("source", [os.path.basename(s) for s in SOURCES])
def test_cuda_source_compiles(source, arch, tmp_path):
    nvcc = _nvcc()
    if nvcc is None:
        pytest.skip("nvcc not found: the CUDA sources cannot be compiled on this machine")
    from torch.utils.cpp_extension import include_paths

    shim = tmp_path / "shim" / "c10" / "cuda" / "impl"
    shim.mkdir(parents=True)
    (shim / "cuda_cmake_macros.h").write_text("#pragma once\n#define C10_CUDA_BUILD_SHARED_LIBS\n")
    cmd = [nvcc, "-c", os.path.join(ROOT, "csrc", "cuda", source), "-o", str(tmp_path / "out.o"), "-std=c++17",
           "-O1", "-gencode", f"arch=compute_{arch},code=sm_{arch}", f"-I{tmp_path / 'shim'}",
           f"-I{sysconfig.get_paths()['include']}", "-DTORCH_EXTENSION_NAME=_C_cuda", "-D_GLIBCXX_USE_CXX11_ABI=1"]
    cmd += [f"-I{p}" for p in include_paths()]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    assert proc.returncode == 0, f"nvcc failed:\n{proc.stderr[-4000:]}"
    assert (tmp_path / "out.o").stat().st_size > 0
