#!/usr/bin/env bash
# Set up this machine and run fastmix's whole test suite. CI runs exactly this (.ci/run).
#
#   bash scripts/test.sh [extra pytest args]
#
# Installs torch 2.13.0 (CPU), the build tools, the test dependencies and triton (pinned to 3.6.0, which
# runs the Triton kernels on CPU tensors under TRITON_INTERPRET=1 with this torch), builds fastmix's C++
# extension in place, then runs `python -m pytest tests`, then scripts/dist_check.sh (sdist -> wheel in a
# fresh venv -> install into another -> smoke test outside the tree). Exits non-zero when a step fails.
# Benchmarks (benches/) are timed and not part of this; `pytest benches --benchmark-disable` is their smoke.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_setup.sh

fastmix_setup "pytest==9.0.3" "pytest-benchmark==5.2.3" "scipy==1.17.1" "triton==3.6.0" \
    "pyyaml==6.0.3" "tqdm==4.70.1" "matplotlib==3.11.2" "pillow==13.0.0" "scikit-image==0.26.0" "build==1.6.1"

if [ ! -d tests ]; then
    echo "[fastmix] WARNING: no tests/ folder: ran no test" >&2
    exit 0
fi

# pytest's exit 5 means "no tests collected": not a failure of the code, but say so loudly.
run_pytest() {
    set +e
    "$PYTHON" -m pytest "$@"
    local rc=$?
    set -e
    if [ "$rc" -eq 5 ]; then
        echo "[fastmix] WARNING: pytest collected no tests in: $* (exit 5): ran no test" >&2
        rc=0
    fi
    return "$rc"
}

rc=0
# 1. Everything but the Triton kernels, on the CPU backends (torch reference and C++).
run_pytest tests -q --durations=10 --ignore=tests/triton "$@" || rc=$?
# 2. The Triton kernels on CPU tensors through Triton's interpreter (small fp32 shapes). The variable must
#    be set before triton compiles anything, so this is a process of its own.
TRITON_INTERPRET=1 run_pytest tests/triton -q --durations=5 "$@" || rc=$?
# 3. The package as users install it (about 4 minutes on 2 cores: one more CPU build, no CUDA build).
bash scripts/dist_check.sh || rc=$?
exit "$rc"
