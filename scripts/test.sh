#!/usr/bin/env bash
# Set up this machine and run fastmix's whole test suite. CI runs exactly this (.ci/run).
#
#   bash scripts/test.sh [extra pytest args]
#
# Installs torch 2.13.0 (CPU), the build tools, the test dependencies and triton (pinned to 3.6.0, which
# runs the Triton kernels on CPU tensors under TRITON_INTERPRET=1 with this torch), builds fastmix's C++
# extension in place, then runs `python -m pytest tests`. Exits non-zero when a test fails.
# Benchmarks (benches/) are timed and not part of this; `pytest benches --benchmark-disable` is their smoke.
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
source scripts/_setup.sh

fastmix_setup "pytest==9.0.3" "pytest-benchmark==5.2.3" "scipy==1.17.1" "triton==3.6.0"

if [ ! -d tests ]; then
    echo "[fastmix] WARNING: no tests/ folder: ran no test" >&2
    exit 0
fi
set +e
"$PYTHON" -m pytest tests -q --durations=10 "$@"
rc=$?
set -e
if [ "$rc" -eq 5 ]; then
    # pytest's "no tests collected": not a failure of the code, but say so loudly.
    echo "[fastmix] WARNING: pytest collected no tests (exit 5): ran no test" >&2
    exit 0
fi
exit "$rc"
