"""Bench plumbing: collect peak-memory probes and write benches/results/cpu/summary.json after a timed run.

The summary holds, per case: the median time of every implementation, the speed-up of fastmix over the
eager reference and over the published pipeline, peak memory, the issue's targets (met or not), and the
machine, torch version and git commit it was measured on. pytest-benchmark's own JSON (every round) is
written by --benchmark-json; its machine_info gets the same machine fields.
"""
from __future__ import annotations

import datetime
import json
import os
import platform
import subprocess

import pytest

HERE = os.path.dirname(os.path.abspath(__file__))
SUMMARY = os.path.join(HERE, "results", "cpu", "summary.json")
MEMORY = pytest.StashKey[dict]()

# The targets on the 2-core CPU machine: (case, mode, versus, min speed-up).
SPEED_TARGETS = [
    ("freq_mix_image", "fwd", "eager_ref", 5.0),
    ("freq_mix_frequency", "fwd", "eager_ref", 3.0),
    ("frontend", "fwd", "published", 10.0),
]
MEMORY_TARGETS = [("frontend", "fwd", 1.2)]  # fastmix peak <= factor x output size


def pytest_addoption(parser):
    parser.addoption("--fastmix-summary", default=SUMMARY, help=f"where a timed run writes its summary (default {SUMMARY})")


@pytest.fixture
def record_memory(request):
    store = request.config.stash.setdefault(MEMORY, {})

    def record(case, mode, impl, result):
        store[(case, mode, impl)] = result

    return record


def _cmd(args):
    try:
        return subprocess.run(args, capture_output=True, text=True, cwd=HERE, timeout=30).stdout.strip()
    except (OSError, subprocess.SubprocessError):
        return ""


def machine_fields() -> dict:
    import torch

    import fastmix

    model = ""
    for line in _cmd(["lscpu"]).splitlines():
        if line.startswith("Model name:"):
            model = line.split(":", 1)[1].strip()
    return {
        "cpu_model": model or platform.processor(),
        "cpu_count": os.cpu_count(),
        "torch_threads": torch.get_num_threads(),
        "platform": platform.platform(),
        "python": platform.python_version(),
        "torch": torch.__version__,
        "fastmix": fastmix.__version__,
        "fastmix_backends": fastmix.available_backends("cpu"),
        "git_commit": _cmd(["git", "rev-parse", "HEAD"]),
        "git_dirty": bool(_cmd(["git", "status", "--porcelain", "--untracked-files=no"])),
        # The timed kernels are the built extension, which may predate the commit's csrc/ (pip install -e .
        # rebuilds it): say when it was built and whether csrc/ changed since.
        "extension_built": _mtime(_extension_path()),
        "csrc_newer_than_extension": _csrc_newer(_extension_path()),
        # Other processes on the machine distort every timing (the ratios less so): record the load.
        "loadavg_1_5_15": [round(v, 2) for v in os.getloadavg()],
    }


def _extension_path():
    try:
        import fastmix._C as ext  # noqa: PLC0415
    except ImportError:
        return None
    return getattr(ext, "__file__", None)


def _mtime(path):
    if not path:
        return None
    return datetime.datetime.fromtimestamp(os.path.getmtime(path), datetime.timezone.utc).isoformat(timespec="seconds")


def _csrc_newer(path):
    if not path:
        return None
    built = os.path.getmtime(path)
    root = os.path.join(os.path.dirname(HERE), "csrc")
    for folder, _, files in os.walk(root):
        for name in files:
            if name.endswith((".cpp", ".h", ".cu", ".cuh")) and os.path.getmtime(os.path.join(folder, name)) > built:
                return True
    return False


def pytest_benchmark_update_machine_info(config, machine_info):
    machine_info["fastmix"] = machine_fields()


def pytest_sessionfinish(session, exitstatus):
    config = session.config
    bs = getattr(config, "_benchmarksession", None)
    if bs is None or config.getoption("benchmark_disable", False):
        return
    times = {}
    meta = {}
    for bench in bs.benchmarks:
        info = bench.extra_info
        if not bench or "case" not in info:
            continue
        key = (info["case"], info["mode"])
        times.setdefault(key, {})[info["impl"]] = bench.stats.median * 1e3
        meta[key] = {"shape": info["shape"], "dtype": info["dtype"], "threads": info["threads"]}
    if not times:
        return
    memory = config.stash.get(MEMORY, {})
    cases = []
    for key, t in times.items():
        entry = {"case": key[0], "mode": key[1], **meta[key], "median_ms": {k: round(v, 3) for k, v in t.items()}}
        if "fastmix" in t:
            entry["speedup"] = {f"vs_{k}": round(v / t["fastmix"], 2) for k, v in t.items() if k != "fastmix"}
        mem = {impl: r for (c, m, impl), r in memory.items() if (c, m) == key}
        if mem:
            out_bytes = next(iter(mem.values()))["output_bytes"]
            entry["output_mib"] = round(out_bytes / 2**20, 1)
            entry["peak_mib"] = {impl: round(r["peak_bytes"] / 2**20, 1) for impl, r in mem.items()}
            entry["peak_over_output"] = {impl: round(r["peak_bytes"] / out_bytes, 2) for impl, r in mem.items()}
        cases.append(entry)
    by_key = {(c["case"], c["mode"]): c for c in cases}
    targets = []
    for case, mode, versus, need in SPEED_TARGETS:
        got = by_key.get((case, mode), {}).get("speedup", {}).get(f"vs_{versus}")
        targets.append({"what": f"{case} {mode}: fastmix >= {need}x faster than {versus}", "measured": got,
                        "met": got is not None and got >= need})
    for case, mode, factor in MEMORY_TARGETS:
        got = by_key.get((case, mode), {}).get("peak_over_output", {}).get("fastmix")
        targets.append({"what": f"{case} {mode}: fastmix peak memory <= {factor}x output size", "measured": got,
                        "met": got is not None and got <= factor})
    summary = {
        "device": "cpu",
        "date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "command": "python -m pytest benches/test_bench_cpu.py --benchmark-json benches/results/cpu/pytest-benchmark.json",
        "timing": "pytest-benchmark median over >= 3 rounds of one call each, after a warm-up call",
        "memory_method": next(iter(memory.values()))["method"] if memory else None,
        "machine": machine_fields(),
        "cases": cases,
        "targets": targets,
    }
    path = config.getoption("fastmix_summary")
    os.makedirs(os.path.dirname(os.path.abspath(path)), exist_ok=True)
    with open(path, "w") as f:
        json.dump(summary, f, indent=2)
        f.write("\n")
