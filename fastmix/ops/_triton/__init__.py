"""Triton backend of fastmix: fused GPU kernels for the block DCT and the mix op (freq_mix and frontend).

Modules (each reads reference -> kernels -> launchers -> op registration, as the rest of fastmix/ops):
  sign.py - the sign-flip hash of fastmix/ops/sign.py as @triton.jit helpers (uint32 arithmetic in registers)
  dct.py  - block DCT-II / DCT-III (block = 8), op ``fastmix::block_dct_triton``
  mix.py  - forward and backward of the fused mix, ops ``fastmix::mix_fwd_triton`` / ``fastmix::mix_bwd_triton``
  color.py - the frontend's colour pass in one kernel, op ``fastmix::ycbcr_triton`` (CONFIG["color_pass"])

Nothing here is imported by ``import fastmix``: the dispatcher (fastmix/_backend.py) imports these modules
only when the "triton" backend runs an op, so a missing triton never breaks the package. On CPU tensors the
kernels run only under TRITON_INTERPRET=1 (Triton's interpreter: slow, for tests on small shapes).
"""
from __future__ import annotations

import os

import torch

# Launch parameters and numerics switches of the Triton kernels, read at every call (so a benchmark can
# sweep them: benches/gpu_bench.py). Where a comment cites a measurement it is benches/results/h100 (one
# H100, N = 512, 3x112x112, fp32, k = 6 for freq_mix and 4 for the frontend); the other entries are the
# sm_90 compile reports' choices, not yet timed against their alternatives.
CONFIG: dict = {
    # tl.dot operand precision for float32 data in the mix kernels. "ieee": exact fp32 FMAs (the CPU
    # backend's numerics; relative error ~1.6e-7). "tf32x3": three tf32 tensor-core products (measured
    # errors 2.1e-7 to 4.5e-7 forward, up to 2.0e-6 in the weight gradient). "tf32": one tf32 product (error ~3e-4: fails
    # the 1e-5 fp32 target; never the default). tf32x3 measured faster: freq_mix forward 0.236 vs 0.367 ms
    # (per-image weights, channels), 0.287 vs 0.439 (pixels); the x gradient 2.37 vs 2.66 ms over the four
    # freq_mix cases (run2_cef8669).
    "dot_precision_fp32": "tf32x3",
    # ... and in the standalone block DCT (also the per-frequency freq_mix's first pass): "ieee" measured
    # faster there (per-frequency freq_mix, channels: 0.461 ms with ieee, 0.552 with tf32x3).
    "dot_precision_fp32_dct": "ieee",
    # ... and for fp16 / bf16 inputs, whose own rounding (>= 4e-3) dominates tf32's.
    "dot_precision_low": "tf32",
    # fwd_static_k (below) for the plain-DCT forward of freq_mix (per-image weights, tl.dot tile kernel): the
    # run-time partner loop compiles (sm_90, tf32x3, BL = 32) to a round of 4 partners and a round of 2,
    # each an index load followed by the tile loads that need it; unrolled, the 6 index loads go first
    # and the 6 tile loads are then in flight together. Not timed yet (gpu_bench "triton:fm_static_k").
    "fwd_dct_static_k": False,
    # Order of the programs of the plain-DCT mix kernels (freq_mix forward, gather and atomic backward):
    # "tile" (tile fastest: one output's, or one image's, tiles run together) or "row" (row fastest: one
    # (colour, tile) of every output, or image, runs together). Each image is read as a partner by about k
    # outputs (and each output gradient by k images in the backward) at the same tile, so with "row" these
    # reads fall into the same waves of programs and hit L2. LRU model of a 50 MB L2 (benches/l2_model.py,
    # N = 512, k = 6, 3x112x112, fp32, 32-block tiles): the forward's partner reads from DRAM 247 MB
    # ("tile") -> 77 MB ("row"), of 519 MB requested. Not timed yet (gpu_bench "triton:row_order"). The
    # resampling kernels (the frontend) keep tile fastest: their input is small beside their output.
    "dct_order": "tile",
    # x gradient of the mix op: "gather" (deterministic: partners gathered through an inverse index built
    # with torch.sort / searchsorted on the device) or "atomic" (fp32 atomic adds, plain DCT geometry only:
    # reads the incoming gradient once but sums in a run-dependent order). "gather" is the default.
    "bwd_x_mode": "gather",
    # The gather's pairs (plain DCT geometry) one at a time (0) or CHUNK at a time (> 0): the chunk's order
    # entries, then all its weights and gradient tiles, then the sums in the same ascending order (the same
    # bits, up to the sign of zero). A plain loop is a dependent chain of loads per pair (order entry ->
    # weight -> gradient tile, the tile masked by the weight): about 3k memory round trips per program, one
    # after another; CHUNK = 4 makes it 3 per chunk (sm_90, tf32x3, BL = 32: 98 registers instead of 88 for
    # the x gradient, 147 instead of 128 with the weight gradient). tl.range(num_stages=3) was tried
    # instead: Triton pipelined only the order entries (24 bytes of shared memory), not the tiles.
    # Not timed yet (gpu_bench "triton:gather_chunk2" / "triton:gather_chunk4").
    "bwd_gather_chunk": 0,
    # freq_mix with per-frequency weights (plain DCT geometry): "precompute" transforms each image once
    # (one extra pass over x, no tl.dot in the mix) or "fused" transforms every partner tile of every output
    # (k tl.dot per tile, fewer bytes: pays only where the dot is cheap, e.g. with "tf32x3").
    "fwd_per_freq": "precompute",
    # freq_mix with per-image weights and channels output: "dot" (a [BL, 64] tile of pixels per program,
    # the 2-D DCT as one tl.dot with kron(D, D)) or "resampling" (the frontend's kernel with A_I = B_J = D:
    # one 8x8 block per thread, separable FMAs in registers, partners unrolled; 255 registers on sm_90).
    "fwd_dct_route": "dot",
    # Resampling forward (the frontend): unroll the per-image partner loop for k <= 8 (one compiled
    # variant per k; hoisted weights and partner bases, independent pixel loads), and read the 64 sign
    # hash words of each (m, channel) from a table made by one small kernel instead of hashing them in
    # every thread. From the sm_90 SASS: 1,672 straight-line instructions per thread instead of about
    # 3,000 with 60 branches. Measured (frontend x8, k = 4, fp32 out): 2.75 ms vs 4.21 ms for the run-time
    # loop that hashes in the kernel (bf16 out: 2.19 vs 3.58 ms); op alone 2.27 ms, predicted 2.3-2.8.
    "fwd_static_k": True,
    "fwd_sign_table": True,
    # ... and store those words pre-mixed (plane ^ (plane >> 16)), which takes 4 integer operations off
    # each coefficient's hash for the same signs (sign.py: _apply_sign_premixed). sm_90 SASS of the kernel
    # (R = 3, k = 4): 1,552 instructions instead of 1,672 (fp32 out), 1,480 instead of 1,616 (bf16 out).
    # Not timed yet; predicted a few % on the bf16 kernel. gpu_bench's "triton:unpremixed" keeps plain words
    # in the table and pre-mixes them in the kernel (1,616 / 1,544 instructions: since _apply_sign calls
    # _apply_sign_premixed, run 2's 1,672-instruction form is no longer in the tree).
    "fwd_sign_premixed": True,
    # The frontend's colour pass ([-1, 1] -> level-shifted YCbCr, at source resolution, before the fused
    # kernel): "triton" (one pass: color.py, reads x once and writes the YCbCr planes once, 154 MB at
    # N = 512, 3x112x112: about 0.05 ms at copy bandwidth) or "torch" (scale, shift, an einsum that copies
    # its permuted input, the offset: about five passes, >= 770 MB; estimated most of the 0.47 ms the
    # public frontend took over its fused kernel on an H100, run 2, which ran "torch"). "triton" is the
    # default on that byte count alone (a fifth of the traffic, one launch instead of about six): it has
    # not been timed on a GPU yet; gpu_bench's "triton:torch_color" times the torch pass against it.
    "color_pass": "triton",
    # (blocks per program, warps per program) of the kernels built on tl.dot, per dot precision. Chosen
    # from the sm_90 compile reports (tests/triton/compile_sm90.py): the largest tile that compiles without
    # register spills. Triton's fp32 "ieee" dot keeps whole operand rows in registers, so it wants 8 warps
    # for a [64, 64] @ [64, 64] product; with 4 warps it spills. Timing on the GPU decides between them.
    "tiles": {
        "dct": {"ieee": (64, 8), "tf32x3": (32, 8), "tf32": (64, 4)},
        "fwd_dct": {"ieee": (64, 8), "tf32x3": (32, 8), "tf32": (64, 4)},
        "fwd_dct_fused_pf": {"ieee": (32, 8), "tf32x3": (32, 8), "tf32": (64, 4)},
        "bwd_dct": {"ieee": (64, 8), "tf32x3": (32, 8), "tf32": (64, 4)},
        "bwd_x_atomic": {"ieee": (64, 8), "tf32x3": (32, 8), "tf32": (64, 4)},
    },
    # The same for the kernels without tl.dot (resampling geometry and the gathers). Resampling kernels:
    # 32 * warps blocks per program puts exactly one block per thread, so every 8x8 product, reduction
    # and sign stays in that thread's registers and the compiled code has one layout conversion (the
    # store) instead of 13 (sm_90 compile report, 64 blocks x 4 warps: two threads and four warps shared
    # the u axis of each block, and every reduction over u went through shared memory).
    "fwd_blocks": 128,
    "fwd_warps": 4,
    "bwd_adj_blocks": 128,
    "bwd_adj_warps": 4,
    "bwd_fold_rows": 8,
    "bwd_fold_cols": 128,
    "bwd_fold_warps": 4,
    "bwd_x_pixels": 1024,
    "bwd_x_warps": 4,
}


_PRECISIONS = ("ieee", "tf32x3", "tf32")
# The values each string entry of CONFIG may take: a misspelt mode is an error, not silently the other one.
CHOICES: dict = {
    "dot_precision_fp32": _PRECISIONS, "dot_precision_fp32_dct": _PRECISIONS, "dot_precision_low": _PRECISIONS,
    "dct_order": ("tile", "row"), "bwd_x_mode": ("gather", "atomic"), "fwd_per_freq": ("precompute", "fused"),
    "fwd_dct_route": ("dot", "resampling"), "color_pass": ("triton", "torch"),
}


def option(key: str) -> str:
    """CONFIG[key] for a string entry, checked against CHOICES[key]."""
    value = CONFIG[key]
    if value not in CHOICES[key]:
        raise ValueError(f"fastmix.ops._triton.CONFIG[{key!r}] must be one of {CHOICES[key]}, got {value!r}")
    return value


def dot_precision(dtype: torch.dtype, kernel: str = "mix") -> str:
    """The tl.dot input precision for data of ``dtype`` in the mix kernels or (kernel="dct") the block DCT."""
    if dtype in (torch.float16, torch.bfloat16):
        return option("dot_precision_low")
    return option("dot_precision_fp32_dct" if kernel == "dct" else "dot_precision_fp32")


def row_fastest() -> bool:
    """CONFIG["dct_order"] as the kernels' ROW_FASTEST flag."""
    return option("dct_order") == "row"


def tile_config(kernel: str, precision: str) -> tuple[int, int]:
    """(blocks per program, warps) of a tl.dot kernel at a dot precision (see CONFIG["tiles"])."""
    return CONFIG["tiles"][kernel][precision]


_compat_done = False


def interpreter_compat() -> None:
    """Make Triton 3.6's interpreter work with numpy >= 2.4 (TRITON_INTERPRET=1 only; called by launchers).

    Triton <= 3.6 converts a scalar kernel argument used as a loop bound with ``int(ndarray of shape (1,))``,
    which numpy 2.4 rejects ("only 0-dimensional arrays can be converted to Python scalars"); later Triton
    squeezes first. The GPU machine's Triton is 3.6, so CI may run its interpreter with a new numpy: this
    replaces the one conversion, once, only when the interpreter is on and numpy has the new behaviour.
    Compiled (GPU) execution never goes through it.
    """
    global _compat_done
    if _compat_done or os.environ.get("TRITON_INTERPRET", "0") != "1":
        return
    _compat_done = True
    try:
        import numpy as np
        from triton.runtime import interpreter
    except ImportError:
        return
    try:
        int(np.ones(1))
        return  # numpy < 2.4: nothing to fix
    except TypeError:
        pass
    orig = getattr(interpreter, "_patch_lang_tensor", None)
    if orig is None:
        return

    def patched(tensor, scope):
        orig(tensor, scope)
        scope.set_attr(tensor, "__index__", lambda self: int(self.handle.data.reshape(-1)[0]))

    interpreter._patch_lang_tensor = patched
