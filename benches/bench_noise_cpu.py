"""CPU cost of the fused noise (freq_mix / frontend ``noise=``) against the same op without it, in one run.

Each case times the op with and without the noise argument in alternating rounds (so that drifts of a shared
machine hit both alike), one call per round after two warm-up calls, and reports the medians and their ratio.
Shapes are those of benches/test_bench_cpu.py (fp32, DC of each colour dropped, 191 / 189 channels):

  freq_mix_image      N=M=64, 3x112x112, k=6, per-image weights, sign flip on
  freq_mix_frequency  the same with per-frequency weights (M, k, 64)
  frontend            N=M=16, 3x112x112 in [-1, 1], upsample 8, k=4, sign flip on
  (mode "fwd": forward; "fwdbwd": forward + backward in x and weight)

Run (FASTMIX_BACKEND=cpu, the C++ kernels; the result goes to benches/results/cpu/noise.json):

    OMP_NUM_THREADS=2 python benches/bench_noise_cpu.py [--rounds 15] [--small] [--clock wall|cpu] [--out PATH]
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import subprocess
import sys
import time

import torch

HERE = os.path.dirname(os.path.abspath(__file__))
sys.path.insert(0, os.path.dirname(HERE))
os.environ.setdefault("FASTMIX_BACKEND", "cpu")

import fastmix  # noqa: E402

sys.path.insert(0, HERE)
from test_bench_cpu import FULL, SMALL, frontend_inputs, mix_inputs  # noqa: E402  (the CPU bench's shapes and inputs)

NOISE = dict(noise="gaussian", noise_seed=12345)


def make(case, mode, cfg):
    g = torch.Generator().manual_seed(0)
    if case.startswith("freq_mix"):
        x, index, weight, keep = mix_inputs(case, cfg, g)
        n, c, h, w = x.shape
        k = index.shape[1]
        scale = torch.rand(64, generator=g) * 10  # per frequency, as training/defences.py calibrates it

        def op(xx, ww, noisy):
            return fastmix.freq_mix(xx, index, ww, keep=keep, seed=7, **(dict(NOISE, noise_scale=scale) if noisy else {}))

        shape = f"N=M={n}, {c}x{h}x{w}, k={k}, weight {tuple(weight.shape)}, {len(keep)} channels, seed"
    else:
        x, index, weight, keep = frontend_inputs(cfg, g)
        n, c, h, w = x.shape
        k, s = index.shape[1], cfg["upsample"]
        scale = torch.rand(64, generator=g) * 10

        def op(xx, ww, noisy):
            return fastmix.frontend(xx, upsample=s, keep=keep, index=index, weight=ww, seed=7,
                                    **(dict(NOISE, noise_scale=scale) if noisy else {}))

        shape = f"N=M={n}, {c}x{h}x{w}, upsample {s}, k={k}, {len(keep)} channels, seed"
    if mode == "fwd":
        return (lambda noisy: op(x, weight, noisy)), shape
    x.requires_grad_(True)
    weight.requires_grad_(True)

    def fwdbwd(noisy):
        x.grad = weight.grad = None
        y = op(x, weight, noisy)
        y.backward(torch.ones_like(y))
        return y

    return fwdbwd, shape


def time_pair(fn, rounds, clock):
    for noisy in (False, True, False, True):
        fn(noisy)
    t = {False: [], True: []}
    for r in range(rounds):
        for noisy in ((False, True) if r % 2 == 0 else (True, False)):
            t0 = clock()
            fn(noisy)
            t[noisy].append((clock() - t0) * 1e3)
    return t


def main():
    ap = argparse.ArgumentParser()
    ap.add_argument("--rounds", type=int, default=15)
    ap.add_argument("--small", action="store_true")
    ap.add_argument("--clock", choices=("wall", "cpu"), default="wall",
                    help="wall: perf_counter; cpu: the process's CPU time (process_time), which a loaded shared "
                         "machine distorts less (with OMP_NUM_THREADS=1 it is the op's single-thread compute time)")
    ap.add_argument("--cases", default="freq_mix_image:fwd,freq_mix_image:fwdbwd,freq_mix_frequency:fwd,frontend:fwd")
    ap.add_argument("--out", default=os.path.join(HERE, "results", "cpu", "noise.json"))
    a = ap.parse_args()
    cfg = SMALL if a.small else FULL
    rows = []
    for item in a.cases.split(","):
        case, mode = item.split(":")
        fn, shape = make(case, mode, cfg)
        t = time_pair(fn, a.rounds, time.perf_counter if a.clock == "wall" else time.process_time)
        base, noisy = statistics.median(t[False]), statistics.median(t[True])
        rows.append({"case": case, "mode": mode, "shape": shape, "dtype": "float32", "rounds": a.rounds,
                     "median_ms": {"plain": round(base, 3), "noise": round(noisy, 3)},
                     "ratio": round(noisy / base, 4),
                     "spread_ms": {"plain": [round(min(t[False]), 3), round(max(t[False]), 3)],
                                   "noise": [round(min(t[True]), 3), round(max(t[True]), 3)]}})
        print(f"{case:20s} {mode:7s} plain {base:9.3f} ms  noise {noisy:9.3f} ms  ratio {noisy / base:.3f}", flush=True)
    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, cwd=HERE).stdout.strip()
    except OSError:
        commit = None
    result = {
        "command": "python benches/bench_noise_cpu.py " + " ".join(sys.argv[1:]),
        "date": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "machine": {"cpu": platform.processor() or platform.machine(), "torch_threads": torch.get_num_threads(),
                    "torch": torch.__version__, "cpu_capability": fastmix.cpu_capability(), "git_commit": commit,
                    "loadavg": os.getloadavg()},
        "timing": "median of alternating rounds (one call each) after 2 warm-up calls per variant",
        "clock": a.clock,
        "noise_table_bits": __import__("fastmix.ops.noise", fromlist=["TABLE_BITS"]).TABLE_BITS,
        "cases": rows,
    }
    if not a.small:
        os.makedirs(os.path.dirname(a.out), exist_ok=True)
        with open(a.out, "w") as f:
            json.dump(result, f, indent=2)
    return result


if __name__ == "__main__":
    main()
