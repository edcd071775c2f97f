#!/usr/bin/env bash
# Distribution check (scripts/test.sh runs it after the test suite; CI too): what a user installing fastmix
# from a package gets, which the editable install of the test suite hides.
#
#   1. build the sdist from this checkout (python -m build --sdist);
#   2. build a wheel from that sdist alone, in a fresh virtual environment;
#   3. install the wheel into another fresh virtual environment and run scripts/dist_smoke.py there, from
#      outside the source tree (import, the CPU capability, one frontend call against the reference).
#
# Both environments are `venv --system-site-packages --without-pip`: they reuse this machine's torch (the
# CPU build the test setup installed; nothing downloads a CUDA torch), pip, setuptools and ninja, while
# what they install themselves shadows the editable fastmix of the checkout. The wheel is built with
# FASTMIX_CUDA=0: the CUDA sources are compiled (when nvcc is present) by the test setup's build already;
# compiling them again here would double the longest step of CI for no new check. That the sdist carries
# them is checked from its file list instead.
#
#   bash scripts/dist_check.sh        (PYTHON picks the interpreter, as in scripts/_setup.sh)
set -euo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
ROOT="$PWD"
PYTHON="${PYTHON:-$(command -v python3 || command -v python)}"
WORK="$(mktemp -d "${TMPDIR:-/tmp}/fastmix-dist.XXXXXX")"
trap 'rm -rf "$WORK"' EXIT
step() { echo "[fastmix dist] $*" >&2; }
t0=$SECONDS

step "1/3 sdist"
"$PYTHON" -m build --sdist --no-isolation --outdir "$WORK/sdist" . > "$WORK/sdist.log" 2>&1 || { cat "$WORK/sdist.log"; exit 1; }
SDIST="$(ls "$WORK"/sdist/fastmix-*.tar.gz)"
# Every file the extensions compile, and the license, must be in it (csrc/cuda is not built below).
"$PYTHON" - "$SDIST" <<'EOF'
import sys, tarfile
names = {n.split("/", 1)[1] for n in tarfile.open(sys.argv[1]).getnames() if "/" in n}
need = {"LICENSE", "README.md", "setup.py", "pyproject.toml", "csrc/fastmix.cpp", "csrc/sign.h", "csrc/cpu/vec8.h",
        "csrc/cpu/capability.h", "csrc/cpu/kernels.h", "csrc/cpu/dispatch.cpp", "csrc/cpu/dct.cpp", "csrc/cpu/mix.cpp",
        "csrc/cuda/module.cpp", "csrc/cuda/mix_fwd.cu", "csrc/cuda/mix_bwd.cu", "csrc/cuda/mix_kernels.cuh",
        "csrc/cuda/exec.cuh"}
missing = sorted(need - names)
stale = sorted(n for n in names if n.endswith((".so", "_build_info.py")) or n.startswith("build/"))
if missing or stale:
    sys.exit(f"[fastmix dist] sdist {sys.argv[1]}: missing {missing}, should not ship {stale}")
print(f"[fastmix dist] sdist: {len(names)} files, every source and header present", file=sys.stderr)
EOF

step "2/3 wheel from the sdist, in a fresh venv"
"$PYTHON" -m venv --system-site-packages --without-pip "$WORK/build-venv"
(cd "$WORK" && FASTMIX_CUDA=0 MAX_JOBS="${MAX_JOBS:-2}" "$WORK/build-venv/bin/python" -m pip wheel -q \
    --disable-pip-version-check --no-build-isolation --no-deps -w "$WORK/wheels" "$SDIST") \
    > "$WORK/wheel.log" 2>&1 || { cat "$WORK/wheel.log"; exit 1; }
WHEEL="$(ls "$WORK"/wheels/fastmix-*.whl)"
step "wheel: $(basename "$WHEEL"), $(du -k "$WHEEL" | cut -f1) KiB ($((SECONDS - t0)) s so far)"

step "3/3 install into another fresh venv, smoke test outside the source tree"
"$PYTHON" -m venv --system-site-packages --without-pip "$WORK/run-venv"
"$WORK/run-venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps --ignore-installed "$WHEEL"
cp "$ROOT/scripts/dist_smoke.py" "$WORK/"
(cd "$WORK" && env -u FASTMIX_CPU_CAPABILITY -u FASTMIX_CPU_DISABLE -u FASTMIX_BACKEND \
    "$WORK/run-venv/bin/python" dist_smoke.py "$WORK/run-venv" "$ROOT")
step "passed in $((SECONDS - t0)) s"
