# Shared setup of scripts/demo.sh and scripts/test.sh (sourced, not run): torch first, then the build tools,
# then the extras the caller names, then fastmix itself (builds the C++ extension against that torch).
# Idempotent: pip skips what is already installed at the pinned version, ninja rebuilds only what changed.
# PYTHON picks the interpreter (default: python3, else python).

PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
PIP=("$PYTHON" -m pip install --disable-pip-version-check --progress-bar off -q)

fastmix_setup() {
    echo "[fastmix] python: $("$PYTHON" -c 'import sys; print(sys.version.split()[0], sys.executable)')"
    # torch first, pinned: a bare `pip install torch` would pull a multi-GB CUDA build (on these machines
    # 2.13.0 resolves to the CPU wheel on disk); fastmix's build step compiles against whatever is here.
    "${PIP[@]}" "torch==2.13.0"
    # setuptools >= 77: pyproject.toml's SPDX license string (PEP 639).
    "${PIP[@]}" "setuptools>=77" wheel "ninja==1.13.2" "pybind11==3.1.0" numpy "$@"
    # --no-build-isolation: build against the torch installed above, not a fresh one in an isolated env.
    "${PIP[@]}" --no-build-isolation -e .
    "$PYTHON" - <<'EOF'
import torch, fastmix
try:
    cap = fastmix.cpu_capability()  # the instruction set the C++ kernels chose (FASTMIX_CPU_CAPABILITY overrides)
except RuntimeError as e:
    cap = f"unusable: {e}"
print(f"[fastmix] torch {torch.__version__}, fastmix {fastmix.__version__}, backends on cpu: {fastmix.available_backends()}, cpu capability: {cap}")
EOF
}
