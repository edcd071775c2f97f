"""A/B of two fastmix source trees (two builds) on benches/test_bench_cpu.py's cases: fastmix only, one thread.

test_bench_cpu compares fastmix with its baselines inside one build; this compares builds (a compiler flag,
a dispatch change), which one process cannot load side by side. Each tree runs in its own process, built in
place (``python setup.py build_ext --inplace``); run the trees alternately (A B A B) and pin the core, so
that load drifts hit both alike:

    for i in 1 2; do for t in /path/old /path/new; do
        OMP_NUM_THREADS=1 taskset -c 1 python benches/bench_trees_cpu.py $t 3 >> ab.jsonl; done; done

Arguments: TREE (the source tree whose fastmix is imported), SECONDS per case (at least 5 calls), and
optionally a comma-separated list of case names. FASTMIX_BENCH_CLOCK=cpu times each call by the process's CPU
time (time.process_time) instead of the wall clock: on a shared machine whose other jobs preempt the pinned
core, the wall clock counts their time slices and the CPU clock does not (cache and frequency effects remain).
Prints one JSON line: the tree, its git commit, the CPU
capability its dispatcher chose, the median (ms) and the fastest (min_ms) milliseconds of one call per case (fp32, the FULL shapes).
"""
import json
import os
import statistics
import subprocess
import sys
import time


def main(argv):
    root = os.path.abspath(argv[1])
    seconds = float(argv[2]) if len(argv) > 2 else 3.0
    only = set(argv[3].split(",")) if len(argv) > 3 else None
    sys.path.insert(0, root)
    sys.path.insert(0, os.path.join(root, "benches"))
    os.environ["FASTMIX_BACKEND"] = "cpu"
    import torch

    torch.set_num_threads(1)
    clock_name = os.environ.get("FASTMIX_BENCH_CLOCK", "wall")
    if clock_name not in ("wall", "cpu"):
        sys.exit(f"bench_trees_cpu: FASTMIX_BENCH_CLOCK must be 'wall' or 'cpu', got {clock_name!r}")
    clock = time.process_time if clock_name == "cpu" else time.perf_counter
    import fastmix

    if not os.path.abspath(fastmix.__file__).startswith(root):
        sys.exit(f"bench_trees_cpu: imported fastmix from {fastmix.__file__}, not from TREE={root}")
    import test_bench_cpu as T

    res, best = {}, {}
    for case, mode in T.CASES:
        if only and case not in only:
            continue
        fns, _ = T.make_case(case, mode, small=False)
        f = fns["fastmix"]
        f()  # warm-up (plans, allocator)
        times, end = [], clock() + seconds
        while clock() < end or len(times) < 5:
            t = clock()
            f()
            times.append(clock() - t)
        res[f"{case}/{mode}"] = round(statistics.median(times) * 1e3, 3)
        best[f"{case}/{mode}"] = round(min(times) * 1e3, 3)  # interference only adds time: the min is its floor
    commit = subprocess.run(["git", "-C", root, "rev-parse", "--short", "HEAD"], capture_output=True, text=True).stdout.strip()
    cap = fastmix.cpu_capability() if hasattr(fastmix, "cpu_capability") else "native build"
    print(json.dumps({"tree": root, "commit": commit, "capability": cap, "clock": clock_name, "ms": res, "min_ms": best}))


if __name__ == "__main__":
    main(sys.argv)
