#!/usr/bin/env bash
# The one script of a GPU session (the device tool lends a GPU for about 15 minutes of device time, build
# included): build the CUDA extension, check and time every backend with benches/gpu_bench.py, results
# (gpu_bench.json, build.log, log.txt) under $OUT. Sized to leave room for one rerun.
#
#   bash benches/gpu_session.sh              # CUDA build for sm_90 + gpu_bench (sweep points until 240 s)
#   NO_CUDA=1 bash benches/gpu_session.sh    # Triton only, from the source tree: no build (about 3 minutes)
#
# Environment: OUT (results folder; default benches/results/gpu), FASTMIX_COMMIT (recorded in the JSON: the
# device machine's copy of the tree has no .git), BUDGET_S (gpu_bench --budget-s, default 240: no new sweep
# point after that many seconds of its run; run 2's default steps took about 130 s, the CUDA child adds
# its own checks and timings), FASTMIX_CUDA_ARCHS, MAX_JOBS.
# A failed build is reported with its log's tail and the run goes on with the Triton backend alone.
set -uo pipefail
cd "$(dirname "${BASH_SOURCE[0]}")/.."
OUT=${OUT:-benches/results/gpu}
mkdir -p "$OUT"
export PYTHONUNBUFFERED=1
export FASTMIX_COMMIT=${FASTMIX_COMMIT:-$(git rev-parse HEAD 2>/dev/null || echo unknown)}
if [ "${NO_CUDA:-0}" = 1 ]; then
  export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
else
  t0=$(date +%s)
  if FASTMIX_CUDA_ARCHS=${FASTMIX_CUDA_ARCHS:-90} MAX_JOBS=${MAX_JOBS:-16} \
    python3 -m pip install --no-build-isolation --no-deps -e . >"$OUT/build.log" 2>&1; then
    echo "gpu_session: build ok in $(($(date +%s) - t0)) s" | tee -a "$OUT/build.log"
  else
    echo "gpu_session: build FAILED after $(($(date +%s) - t0)) s; going on with Triton alone. Tail of $OUT/build.log:"
    tail -n 25 "$OUT/build.log"
    export PYTHONPATH=$PWD${PYTHONPATH:+:$PYTHONPATH}
  fi
fi
python3 benches/gpu_bench.py --out "$OUT" --budget-s "${BUDGET_S:-240}" --no-compile-ref 2>&1 | tee "$OUT/log.txt"
