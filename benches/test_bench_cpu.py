"""CPU benchmarks: every fastmix op against (a) its eager reference and (b) the published eager pipeline.

Implementations compared in one run (the ratios are only meaningful within one run on one machine):
  fastmix    - the public op with FASTMIX_BACKEND=cpu (C++ kernels, csrc/cpu)
  eager_ref  - fastmix's pure-PyTorch reference (``fastmix.*_ref``; what FASTMIX_BACKEND=torch runs)
  published  - the published pipeline as users run it today (benches/baselines.py)

Cases (fp32; "fwdbwd" = forward + backward in x and weight):
  block_dct           N=64, 3x112x112
  freq_mix_image      N=M=64, 3x112x112, k=6, per-image weights (M, k), DC dropped (keep ids 1..191), out="channels"
  freq_mix_frequency  the same with per-frequency weights (M, k, 64)
  frontend            N=M=16, 3x112x112 in [-1, 1], upsample 8, k=4, 189 channels (DC of each colour dropped)

Speed: pytest-benchmark (median of >= 3 rounds, one call per round, after a warm-up call).
Peak memory: each (case, impl) runs in a fresh subprocess (this file run as a script with --probe), with glibc
told to mmap every allocation >= 64 KiB (MALLOC_MMAP_THRESHOLD_) so that freed tensors leave RSS; after one
warm-up call the kernel's RSS high-water mark is reset (/proc/self/clear_refs, "5") and the peak is
VmHWM - VmRSS(before the call): the extra resident memory one call needs, its output included.

Run (about 7 minutes on the 2-core machine; timed, so not part of the test command):

    python -m pytest benches/test_bench_cpu.py --benchmark-json benches/results/cpu/pytest-benchmark.json

which also writes benches/results/cpu/summary.json (ratios, peak memory, targets, machine, commit;
benches/conftest.py). ``pytest benches --benchmark-disable`` is a quick correctness smoke on small shapes.
"""
from __future__ import annotations

import gc
import json
import os
import subprocess
import sys
import time

HERE = os.path.dirname(os.path.abspath(__file__))
if HERE not in sys.path:  # script mode (--probe) imports baselines from here
    sys.path.insert(0, HERE)

import pytest  # noqa: E402
import torch  # noqa: E402

import fastmix  # noqa: E402
from fastmix.ops.sign import sign_ref  # noqa: E402  (the documented key, to feed the published sign mask)

import baselines as B  # noqa: E402

IMPLS = ("fastmix", "eager_ref", "published")
CASES = (
    ("block_dct", "fwd"),
    ("freq_mix_image", "fwd"),
    ("freq_mix_image", "fwdbwd"),
    ("freq_mix_frequency", "fwd"),
    ("freq_mix_frequency", "fwdbwd"),
    ("frontend", "fwd"),
    ("frontend", "fwdbwd"),
)
# Benchmark shapes (the issue's) and the smoke shapes used under --benchmark-disable.
FULL = {"mix": (64, 3, 112, 112), "mix_k": 6, "fe": (16, 3, 112, 112), "fe_k": 4, "upsample": 8}
SMALL = {"mix": (6, 3, 16, 24), "mix_k": 6, "fe": (3, 3, 8, 6), "fe_k": 4, "upsample": 8}
TIME_BUDGET_S = 3.0  # per (case, impl): rounds = budget / one call, clamped to [3, 30]
MEMORY_METHOD = (
    "fresh subprocess per (case, impl); MALLOC_MMAP_THRESHOLD_=65536; one warm-up call; RSS high-water mark "
    "reset via /proc/self/clear_refs; peak = VmHWM - VmRSS before the call (output included)"
)


def keep_no_dc(c: int) -> list[int]:
    """Channel ids without the DC of each colour: 1..63, 65..127, 129..191 for C = 3."""
    return [i for i in range(c * 64) if i % 64 != 0]


def mix_inputs(case: str, cfg: dict, g: torch.Generator):
    """freq_mix's inputs at cfg["mix"]: x, partners, weights (per image for freq_mix_image, per frequency
    otherwise) and the DC-free keep list, drawn from ``g`` in this order (bench_noise_cpu shares them)."""
    n, c, h, w = cfg["mix"]
    k = cfg["mix_k"]
    x = torch.randn(n, c, h, w, generator=g)
    index = fastmix.sample_partners(n, k, generator=g)
    if case == "freq_mix_image":
        weight = fastmix.sample_weights(n, k, generator=g)
    else:
        weight = torch.rand(n, k, 64, generator=g)
        weight = weight / weight.sum(1, keepdim=True)
    return x, index, weight, keep_no_dc(c)


def frontend_inputs(cfg: dict, g: torch.Generator):
    """frontend's inputs at cfg["fe"]: images in [-1, 1], partners, weights, the DC-free keep list."""
    n, c, h, w = cfg["fe"]
    k = cfg["fe_k"]
    x = torch.rand(n, c, h, w, generator=g) * 2 - 1
    index = fastmix.sample_partners(n, k, generator=g)
    weight = fastmix.sample_weights(n, k, generator=g)
    return x, index, weight, keep_no_dc(c)


def make_case(case: str, mode: str, small: bool):
    """Inputs and one zero-argument callable per impl. Returns (fns, meta) with meta['leaves'] the tensors
    whose .grad the callables fill (reset between calls) and meta describing the case."""
    cfg = SMALL if small else FULL
    g = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    meta = {"case": case, "mode": mode, "dtype": "float32", "leaves": []}
    if case == "block_dct":
        x = torch.randn(*cfg["mix"], generator=g)
        meta["shape"] = f"N={x.shape[0]}, {x.shape[1]}x{x.shape[2]}x{x.shape[3]}"
        fns = {
            "fastmix": lambda: fastmix.block_dct(x),
            "eager_ref": lambda: fastmix.block_dct_ref(x),
            "published": lambda: B.block_dct(x),
        }
        return fns, meta
    if case.startswith("freq_mix"):
        x, index, weight, keep = mix_inputs(case, cfg, g)
        n, c, h, w = x.shape
        k = index.shape[1]
        meta["shape"] = f"N=M={n}, {c}x{h}x{w}, k={k}, weight {tuple(weight.shape)}, {len(keep)} channels"
        ops = {
            "fastmix": lambda xx, ww: fastmix.freq_mix(xx, index, ww, keep=keep),
            "eager_ref": lambda xx, ww: fastmix.freq_mix_ref(xx, index, ww, keep=keep),
            "published": lambda xx, ww: B.freq_mix_baseline(xx, index, ww, keep=keep),
        }
        out_shape = (n, len(keep), h // 8, w // 8)
    elif case == "frontend":
        x, index, weight, keep = frontend_inputs(cfg, g)
        n, c, h, w = x.shape
        k, s = index.shape[1], cfg["upsample"]
        meta["shape"] = f"N=M={n}, {c}x{h}x{w}, upsample {s}, k={k}, {len(keep)} channels"
        ops = {
            "fastmix": lambda xx, ww: fastmix.frontend(xx, upsample=s, keep=keep, index=index, weight=ww),
            "eager_ref": lambda xx, ww: fastmix.frontend_ref(xx, upsample=s, keep=keep, index=index, weight=ww),
            "published": lambda xx, ww: B.frontend_baseline(xx, upsample=s, keep=keep, index=index, weight=ww),
        }
        out_shape = (n, len(keep), h * s // 8, w * s // 8)
    else:
        raise ValueError(case)
    if mode == "fwd":
        return {name: (lambda op=op: op(x, weight)) for name, op in ops.items()}, meta
    x.requires_grad_(True)
    weight.requires_grad_(True)
    grad_out = torch.randn(out_shape, generator=g)
    meta["leaves"] = [x, weight]

    def fwdbwd(op):
        x.grad = None
        weight.grad = None
        y = op(x, weight)
        y.backward(grad_out)
        return y.detach()

    return {name: (lambda op=op: fwdbwd(op)) for name, op in ops.items()}, meta


# ----------------------------------------------------------------------------------------------------
# Peak memory probe (script mode: one (case, impl) per fresh process)
# ----------------------------------------------------------------------------------------------------


def _status_kib(field: str) -> int:
    with open("/proc/self/status") as f:
        for line in f:
            if line.startswith(field + ":"):
                return int(line.split()[1])
    raise RuntimeError(f"{field} not in /proc/self/status")


def probe(case: str, mode: str, impl: str, small: bool) -> dict:
    os.environ["FASTMIX_BACKEND"] = "cpu"
    fns, meta = make_case(case, mode, small)
    fn = fns[impl]
    fn()  # warm-up: thread pools, cached geometry, lazy registrations
    for t in meta["leaves"]:
        t.grad = None
    gc.collect()
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current RSS
    before = _status_kib("VmRSS")
    out = fn()
    peak = _status_kib("VmHWM")
    return {
        "peak_bytes": (peak - before) * 1024,
        "output_bytes": out.numel() * out.element_size(),
        "output_shape": list(out.shape),
    }


def run_probe(case: str, mode: str, impl: str, small: bool) -> dict:
    # the probe runs this file as a script: put the repo root first on its path, so that it measures the
    # fastmix of this checkout even where the installed one is elsewhere (or not installed)
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    path = os.pathsep.join(p for p in (root, os.environ.get("PYTHONPATH")) if p)
    env = dict(os.environ, MALLOC_MMAP_THRESHOLD_="65536", FASTMIX_BACKEND="cpu", PYTHONPATH=path)
    cmd = [sys.executable, os.path.abspath(__file__), "--probe", case, mode, impl] + (["--small"] if small else [])
    res = subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        raise RuntimeError(f"memory probe {case}/{mode}/{impl} failed:\n{res.stdout}\n{res.stderr}")
    return json.loads(res.stdout.strip().splitlines()[-1])


# ----------------------------------------------------------------------------------------------------
# Tests
# ----------------------------------------------------------------------------------------------------


def _small(config) -> bool:
    return bool(config.getoption("benchmark_disable", False))


@pytest.fixture
def cpu_backend(monkeypatch):
    """The timed cases need the C++ extension; FASTMIX_BACKEND=cpu makes the choice explicit."""
    if "cpu" not in fastmix.available_backends("cpu"):
        pytest.skip("fastmix._C is not built: pip install --no-build-isolation -e .")
    monkeypatch.setenv("FASTMIX_BACKEND", "cpu")


def _ids(p):
    return f"{p[0]}-{p[1]}"


@pytest.mark.usefixtures("cpu_backend")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_speed(benchmark, request, case, impl):
    name, mode = case
    small = _small(request.config)
    fns, meta = make_case(name, mode, small)
    fn = fns[impl]
    benchmark.group = f"{name}-{mode}"
    benchmark.extra_info.update(
        {"case": name, "mode": mode, "impl": impl, "shape": meta["shape"], "dtype": meta["dtype"],
         "threads": torch.get_num_threads()}
    )
    if small:
        # Smoke: the three implementations agree on the small inputs.
        out = benchmark(fn)
        ref = fns["eager_ref"]()
        torch.testing.assert_close(out, ref, atol=2e-3, rtol=1e-4)
        return
    t0 = time.perf_counter()
    fn()  # warm-up, and the cost of one call to size the rounds
    one = time.perf_counter() - t0
    rounds = max(3, min(30, int(TIME_BUDGET_S / max(one, 1e-6))))
    benchmark.pedantic(fn, rounds=rounds, iterations=1, warmup_rounds=0)


@pytest.mark.usefixtures("cpu_backend")
@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("case", CASES, ids=_ids)
def test_peak_memory(request, record_memory, case, impl):
    name, mode = case
    if _small(request.config) and not (name == "frontend" and mode == "fwd"):
        pytest.skip("smoke run: one memory probe only (frontend-fwd)")
    if not os.access("/proc/self/clear_refs", os.W_OK):
        pytest.skip("needs Linux /proc/self/clear_refs to reset the RSS high-water mark")
    res = run_probe(name, mode, impl, _small(request.config))
    res["method"] = MEMORY_METHOD
    record_memory(name, mode, impl, res)
    # Small smoke outputs can fit in memory the process already holds (a delta of 0).
    assert res["peak_bytes"] >= 0 and res["output_bytes"] > 0


# Correctness of the baseline itself: the published pipeline computes fastmix's numbers (float64, tight).
BASELINE_CASES = [
    # (C, H, W, k, weight kind, keep, seed)
    (3, 16, 24, 6, "image", "no_dc", None),
    (3, 24, 16, 3, "frequency", "no_dc", 11),
    (1, 8, 16, 1, "image", None, 5),
    (4, 16, 8, 4, "colour_frequency", [0, 7, 64, 200, 255], 3),
]


@pytest.mark.parametrize("c,h,w,k,wkind,keep,seed", BASELINE_CASES, ids=lambda v: str(v))
def test_freq_mix_baseline_matches_reference(c, h, w, k, wkind, keep, seed):
    g = torch.Generator().manual_seed(1)
    n = 5
    x = torch.randn(n, c, h, w, generator=g, dtype=torch.float64)
    index = fastmix.sample_partners(n, k, generator=g)
    shape = {"image": (n, k), "frequency": (n, k, 64), "colour_frequency": (n, k, c, 64)}[wkind]
    weight = torch.rand(*shape, generator=g, dtype=torch.float64)
    ids = keep_no_dc(c) if keep == "no_dc" else keep
    sign = None if seed is None else sign_ref(seed, n, c * 64, h // 8, w // 8, dtype=torch.float64)
    got = B.freq_mix_baseline(x, index, weight, keep=ids, sign=sign)
    want = fastmix.freq_mix_ref(x, index, weight, keep=ids, seed=seed)
    torch.testing.assert_close(got, want, atol=1e-10, rtol=1e-10)


@pytest.mark.parametrize("upsample", [1, 8])
@pytest.mark.parametrize("mixing,seed", [(False, None), (True, None), (True, 9)], ids=["plain", "mixed", "mixed-signed"])
def test_frontend_baseline_matches_reference(upsample, mixing, seed):
    g = torch.Generator().manual_seed(2)
    n, k = 4, 3
    h, w = (16, 24) if upsample == 1 else (5, 3)
    x = torch.rand(n, 3, h, w, generator=g, dtype=torch.float64) * 2 - 1
    index = fastmix.sample_partners(n, k, generator=g) if mixing else None
    weight = fastmix.sample_weights(n, k, generator=g).double() if mixing else None
    ids = keep_no_dc(3)
    hb, wb = h * upsample // 8, w * upsample // 8
    sign = None if seed is None else sign_ref(seed, n, 192, hb, wb, dtype=torch.float64)
    got = B.frontend_baseline(x, upsample=upsample, keep=ids, index=index, weight=weight, sign=sign)
    want = fastmix.frontend_ref(x, upsample=upsample, keep=ids, index=index, weight=weight, seed=seed)
    torch.testing.assert_close(got, want, atol=1e-9, rtol=1e-10)


def test_block_dct_baseline_matches_reference():
    x = torch.randn(2, 3, 16, 40, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
    torch.testing.assert_close(B.block_dct(x), fastmix.block_dct_ref(x), atol=1e-10, rtol=1e-10)
    coef = B.block_dct_blocks(B.blockify(x))
    torch.testing.assert_close(B.deblockify(coef, x.shape[-2:]), B.block_dct(x))
    torch.testing.assert_close(B.blocks_to_channels(coef, 2, 5), fastmix.to_channels(fastmix.block_dct_ref(x)))


if __name__ == "__main__":
    if len(sys.argv) >= 5 and sys.argv[1] == "--probe":
        print(json.dumps(probe(sys.argv[2], sys.argv[3], sys.argv[4], "--small" in sys.argv[5:])))
    else:
        sys.exit("usage: python benches/test_bench_cpu.py --probe CASE MODE IMPL [--small]   (or run it with pytest)")
