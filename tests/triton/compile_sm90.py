"""Compile the Triton kernels for Hopper (sm_90) on a machine without a GPU, and report their resources.

    python tests/triton/compile_sm90.py            # every variant: registers, spill stack, shared memory
    python tests/triton/compile_sm90.py --quick    # the variants the GPU benchmark times
    python tests/triton/compile_sm90.py --arch 80  # the same for Ampere (A100): mma.sync instead of wgmma

Triton's interpreter (TRITON_INTERPRET=1) checks what the kernels compute; it does not check that they
compile: the interpreter accepts Python that the compiler rejects, and says nothing about register spills.
This script runs the real compiler pipeline (TTIR -> TTGIR -> LLVM -> PTX -> cubin through the ptxas that
ships with Triton) for an sm_90 (or, with --arch 80, sm_80) target, which needs no driver, with the launch
signatures the launchers use (pointer and multiple-of-16 integer arguments marked divisible by 16, as Triton
specialises them at launch). Exit status 1 if a variant fails to compile, spills (a stack frame in the resource report) or
needs more shared memory than one block may have on that architecture (the launch would fail there).
Must run WITHOUT TRITON_INTERPRET=1 (under the interpreter, @triton.jit gives no compilable function).
"""
from __future__ import annotations

import argparse
import os
import re
import subprocess
import sys
import tempfile
import time

ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
sys.path.insert(0, ROOT)

# Argument types by name (anything not listed is an i32 scalar).
PTR_TYPES = {
    "idx_ptr": "*i64", "order_ptr": "*i64", "offs_ptr": "*i64", "rs_ptr": "*i64", "cs_ptr": "*i64",
    "pos_ptr": "*i32", "ilo_ptr": "*i32", "ihi_ptr": "*i32", "jlo_ptr": "*i32", "jhi_ptr": "*i32",
    "span_ptr": "*i32", "ru_ptr": "*i8", "cu_ptr": "*i8", "plane_ptr": "*i32",
}
# Integer arguments that are multiples of 16 at the shapes (112 x 112 faces, 14 x 14 or 112 x 112 blocks).
DIV16 = {"HW", "W", "H", "HbWb"}
# Largest shared memory one block may use (opt-in), bytes: CUDA programming guide, compute capabilities.
SMEM_LIMIT = {80: 163 * 1024, 90: 227 * 1024}


def _signature(fn, consts, dtypes):
    if "RNE_BF16" in fn.arg_names:
        consts.setdefault("RNE_BF16", False)  # the interpreter-only bf16 rounding is off on a GPU
    sig, attrs = {}, {}
    for i, name in enumerate(fn.arg_names):
        if name in consts:
            sig[name] = "constexpr"
        elif name.endswith("_ptr"):
            sig[name] = dtypes.get(name, PTR_TYPES.get(name, "*fp32"))
            attrs[(i,)] = [["tt.divisibility", 16]]
        else:
            sig[name] = "i32"
            if name in DIV16:
                attrs[(i,)] = [["tt.divisibility", 16]]
    return sig, attrs


def variants(quick: bool):
    from fastmix.ops._triton import CONFIG, tile_config
    from fastmix.ops._triton import color as tcolor
    from fastmix.ops._triton import dct as tdct
    from fastmix.ops._triton import mix as tmix

    v = []
    for prec in ("ieee", "tf32x3"):
        bl, nw = tile_config("dct", prec)
        v.append((f"block_dct {prec} BL={bl} warps={nw}", tdct._block_dct_kernel,
                  dict(INVERSE=False, CHANNELS=False, BL=bl, PREC=prec), {}, nw))
        v.append((f"block_dct channels {prec} BL={bl} warps={nw}", tdct._block_dct_kernel,
                  dict(INVERSE=False, CHANNELS=True, BL=bl, PREC=prec), {}, nw))
    for prec in ("ieee", "tf32x3"):
        for per_image, coef_in in ((True, False), (False, True), (False, False)):
            if quick and (prec != "ieee" and not (not per_image and not coef_in)):
                continue
            for pixels in (False, True):
                if quick and pixels:
                    continue
                bl, nw = tile_config("fwd_dct" if per_image or coef_in else "fwd_dct_fused_pf", prec)
                v.append((f"fwd_dct per_image={per_image} coef_in={coef_in} pixels={pixels} {prec}",
                          tmix._mix_fwd_dct_kernel,
                          dict(PER_IMAGE=per_image, PIXELS=pixels, USE_SEED=True, COEF_IN=coef_in, KS=0,
                               ROW_FASTEST=False, BL=bl, PREC=prec), {}, nw))
    bl, nw = tile_config("fwd_dct", "tf32x3")
    v.append(("fwd_dct per_image=True KS=6 row fastest tf32x3", tmix._mix_fwd_dct_kernel,
              dict(PER_IMAGE=True, PIXELS=False, USE_SEED=True, COEF_IN=False, KS=6, ROW_FASTEST=True,
                   BL=bl, PREC="tf32x3"), {}, nw))
    # 16-bit inputs take the "dot_precision_low" dot (tf32 by default) and its tiles; the interpreter cannot
    # run bf16, so compiling is the only check these variants get without a GPU.
    low = CONFIG["dot_precision_low"]
    for dt in ("*bf16", "*fp16"):
        bl, nw = tile_config("dct", low)
        v.append((f"block_dct channels {low} x={dt}", tdct._block_dct_kernel,
                  dict(INVERSE=False, CHANNELS=True, BL=bl, PREC=low), {"x_ptr": dt, "y_ptr": dt}, nw))
        bl, nw = tile_config("fwd_dct", low)
        v.append((f"fwd_dct per_image=True {low} x={dt}", tmix._mix_fwd_dct_kernel,
                  dict(PER_IMAGE=True, PIXELS=False, USE_SEED=True, COEF_IN=False, KS=0, ROW_FASTEST=False, BL=bl,
                       PREC=low), {"src_ptr": dt, "out_ptr": dt}, nw))
        bl, nw = tile_config("bwd_dct", low)
        v.append((f"bwd_dct per_image=True need_w=True {low} x={dt}", tmix._mix_bwd_dct_kernel,
                  dict(PER_IMAGE=True, USE_SEED=True, NEED_X=True, NEED_W=True, ROW_FASTEST=False, CHUNK=0, BL=bl,
                       PREC=low), {"grad_ptr": dt, "x_ptr": dt}, nw))
    bl, nw = CONFIG["fwd_blocks"], CONFIG["fwd_warps"]
    for per_image in (True, False):
        for odt in ("*fp32", "*bf16"):
            for ks, planes in (((4, True), (0, False)) if per_image else ((0, True),)):
                v.append((f"fwd (resampling) R=3 per_image={per_image} out={odt} KS={ks} PLANES={planes}",
                          tmix._mix_fwd_kernel, dict(RA=3, RB=3, PER_IMAGE=per_image, USE_SEED=True, KS=ks,
                                                     PLANES=planes, PREMIXED=True, BL=bl), {"out_ptr": odt}, nw))
    if not quick:
        v.append(("fwd (resampling) R=5 KS=6", tmix._mix_fwd_kernel,
                  dict(RA=5, RB=5, PER_IMAGE=True, USE_SEED=True, KS=6, PLANES=True, PREMIXED=True, BL=bl), {}, nw))
        v.append(("fwd (resampling) R=3 KS=4 PLANES unpremixed", tmix._mix_fwd_kernel,
                  dict(RA=3, RB=3, PER_IMAGE=True, USE_SEED=True, KS=4, PLANES=True, PREMIXED=False, BL=bl), {}, nw))
    for xdt in ("*fp32", "*bf16", "*fp16"):  # the public frontend takes any float input dtype
        v.append((f"ycbcr colour pass x={xdt}", tcolor._color_affine_kernel, dict(BP=tcolor.BLOCK_PIXELS),
                  {"x_ptr": xdt}, 4))
    bl, nw = tile_config("bwd_dct", "ieee")
    for per_image in (True, False):
        for need_w in (False, True):
            v.append((f"bwd_dct per_image={per_image} need_w={need_w}", tmix._mix_bwd_dct_kernel,
                      dict(PER_IMAGE=per_image, USE_SEED=True, NEED_X=True, NEED_W=need_w,
                           ROW_FASTEST=not need_w, CHUNK=0, BL=bl, PREC="ieee"), {}, nw))
    bl, nw = tile_config("bwd_dct", "tf32x3")
    for need_w in (False, True):
        v.append((f"bwd_dct per_image=True need_w={need_w} CHUNK=4 tf32x3", tmix._mix_bwd_dct_kernel,
                  dict(PER_IMAGE=True, USE_SEED=True, NEED_X=True, NEED_W=need_w, ROW_FASTEST=False, CHUNK=4,
                       BL=bl, PREC="tf32x3"), {}, nw))
    bl, nw = tile_config("bwd_x_atomic", "ieee")
    v.append(("bwd_x_atomic per_image", tmix._mix_bwd_x_atomic_kernel,
              dict(PER_IMAGE=True, USE_SEED=True, ROW_FASTEST=False, BL=bl, PREC="ieee"), {}, nw))
    bl, nw = CONFIG["bwd_adj_blocks"], CONFIG["bwd_adj_warps"]
    for per_image in (True, False):
        v.append((f"bwd_adj R=3 per_image={per_image}", tmix._mix_bwd_adj_kernel,
                  dict(RA=3, RB=3, PER_IMAGE=per_image, USE_SEED=True, WRITE_T=True, NEED_W=not per_image, BL=bl),
                  {}, nw))
    v.append(("bwd_fold R=3", tmix._mix_bwd_fold_kernel,
              dict(RA=3, RB=3, BY=CONFIG["bwd_fold_rows"], BX=CONFIG["bwd_fold_cols"]), {}, CONFIG["bwd_fold_warps"]))
    for per_image in (True, False):
        v.append((f"bwd_x per_image={per_image}", tmix._mix_bwd_x_kernel,
                  dict(PER_IMAGE=per_image, NEED_X=True, NEED_W=per_image, BP=CONFIG["bwd_x_pixels"]), {},
                  CONFIG["bwd_x_warps"]))
    return v


def compile_one(fn, consts, dtypes, num_warps, arch=90):
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource

    sig, attrs = _signature(fn, consts, dtypes)
    src = ASTSource(fn=fn, signature=sig, constexprs=consts, attrs=attrs)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def resources(compiled):
    """(registers, stack bytes) from cuobjdump -res-usage on the cubin (cuobjdump ships with Triton)."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    m = re.search(r"REG:(\d+) STACK:(\d+)", out)
    return (int(m[1]), int(m[2])) if m else (-1, -1)


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--quick", action="store_true", help="only the variants the GPU benchmark times")
    p.add_argument("--arch", type=int, choices=sorted(SMEM_LIMIT), default=90, help="compute capability x 10")
    args = p.parse_args(argv)
    if os.environ.get("TRITON_INTERPRET", "0") == "1":
        print("compile_sm90: unset TRITON_INTERPRET (the interpreter gives no compilable kernels)")
        return 2
    bad = 0
    print(f"{'variant':64s} {'regs':>5s} {'stack':>6s} {'smem':>7s} {'wgmma':>5s} {'sec':>5s}")
    for label, fn, consts, dtypes, nw in variants(args.quick):
        t0 = time.time()
        try:
            c = compile_one(fn, consts, dtypes, nw, arch=args.arch)
        except Exception as exc:  # report every failure, then fail
            print(f"{label:64s} FAILED: {type(exc).__name__}: {str(exc).splitlines()[0] if str(exc) else ''}")
            bad += 1
            continue
        regs, stack = resources(c)
        wg = c.asm["ttgir"].count("warp_group_dot")
        print(f"{label:64s} {regs:5d} {stack:6d} {c.metadata.shared:7d} {wg:5d} {time.time() - t0:5.1f}", flush=True)
        if stack > 0 or c.metadata.shared > SMEM_LIMIT[args.arch]:
            bad += 1
    print(f"compile_sm90 (sm_{args.arch}):", "all variants compiled without spills" if not bad
          else f"{bad} variant(s) failed, spilled or exceed {SMEM_LIMIT[args.arch]} B of shared memory")
    return 1 if bad else 0


if __name__ == "__main__":
    sys.exit(main())
