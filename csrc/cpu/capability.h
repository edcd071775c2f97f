// Per-instruction-set copies of the CPU kernels, picked at run time (as PyTorch's CPU_CAPABILITY).
//
// setup.py compiles every kernel file (dct.cpp, mix.cpp) once per capability, through generated wrappers
// that #define FASTMIX_CPU_CAP (DEFAULT, AVX2, AVX512) and include the file; each copy lives in its
// own namespace fastmix::cpu_<FASTMIX_CPU_CAP>, and dispatch.cpp (compiled once, baseline ISA)
// registers the torch.ops.fastmix CPU kernels as calls into the best copy the running CPU supports.
// Not PyTorch's own macro names (CPU_CAPABILITY, CPU_CAPABILITY_AVX2): torch's headers test those and then
// emit AVX2 / AVX-512 intrinsics that need the command-line flags we avoid (next paragraph).
//
// The ISA is switched on by a target pragma opened *after* the torch and standard headers, not by
// -mavx2 / -mavx512f on the command line. A command-line flag would also compile every inline function
// those headers define (c10::Half conversions, std::vector members, at::parallel_for helpers) for that
// ISA, and the linker keeps one copy of each such function for the whole extension: if it keeps the
// AVX-512 one, the baseline path calls it too and dies with SIGILL on a CPU without AVX-512. Under the
// pragma only our own kernels (and what the compiler inlines into them: a baseline function may be
// inlined into a wider one, never the reverse) carry the wider instructions; every out-of-line header
// function stays baseline. Keep every #include of a kernel file above FASTMIX_CPU_TARGET_BEGIN.
//
// What the pragma costs (measured 2026-12-06, GCC, mix.cpp's AVX2 copy, -mtune=znver2): GCC's middle end
// optimises the same kernels differently when the ISA comes from the pragma rather than the command line
// (129 vs 104 basic blocks in freq_mix's forward lambda, 1981 vs 1823 instructions; the copy built with
// -mavx2 -mfma ... on the command line is byte-identical to a -march=znver2 build). Timed in a libtorch
// harness linking each object (fp32, 64 images 3x112x112, k = 6, 1 thread, Xeon): freq_mix_image forward
// 1.06x (median of 22 alternating rounds, 1.01-1.13) the command-line build. torch's Half conversions also
// lose F16C here (__F16C__ is undefined when the headers are parsed): fp16 / bf16 kernels only. Closing the
// gap needs the ISA on the command line (the same pragma opened above the headers does not match it: 5% more
// instructions in mix.cpp's AVX2 copy, still no F16C) AND a guarantee that the linker keeps the baseline copy of every
// header function (link order, or localising the wide objects' COMDAT symbols): not done, SIGILL-safety first.
#pragma once

#if !defined(FASTMIX_CPU_CAP)
#error "csrc/cpu kernels are compiled once per capability through setup.py's wrappers (FASTMIX_CPU_CAP)"
#endif

// GCC notes that an 8 x double vector (one zmm) returned by a helper compiled without AVX-512 is passed in
// memory: true, and harmless, since each copy's helpers and their callers share one capability and inline.
#if defined(__GNUC__) && !defined(__clang__)
#pragma GCC diagnostic ignored "-Wpsabi"
#endif

#define FASTMIX_CAP_CONCAT2(a, b) a##b
#define FASTMIX_CAP_CONCAT(a, b) FASTMIX_CAP_CONCAT2(a, b)
// fastmix::cpu_DEFAULT, fastmix::cpu_AVX2, fastmix::cpu_AVX512: distinct symbols for each copy.
#define FASTMIX_CAP_NS FASTMIX_CAP_CONCAT(cpu_, FASTMIX_CPU_CAP)

// The instruction sets of each capability; dispatch.cpp checks the same list with __builtin_cpu_supports.
//   AVX2:   Haswell (2013) / Zen 1 (2017) and later: 256-bit vectors, FMA, F16C, BMI1/2 (x86-64-v3 less MOVBE).
//   AVX512: Skylake-SP (2017) / Zen 4 (2022) and later: F, BW, VL, DQ (x86-64-v4); v8<double> is one zmm.
// arch= and tune= are left at the baseline on purpose: GCC refuses to inline a function into one whose
// arch or tune differs, and the 8-lane helpers (vec8.h, sign.h, c10::Half) must inline into the kernels.
#if defined(FASTMIX_CPU_CAP_AVX2)
#define FASTMIX_CPU_TARGET "avx2,fma,f16c,bmi,bmi2,popcnt"
#elif defined(FASTMIX_CPU_CAP_AVX512) && defined(__GNUC__) && !defined(__clang__)
// prefer-vector-width=256: GCC's tunings for every AVX-512 server core (skylake-avx512, icelake-server,
// sapphirerapids) vectorise loops 256 bits wide, but the generic tuning these copies keep (above) does
// 512: the backward kernels' 64-element loops and reductions then ran 512 bits wide with masked tails.
// Measured, one thread, Xeon (AVX-512), freq_mix_image fwd+bwd N=64 3x112x112 k=6: 54.7 / 55.8 ms with
// 512-bit loops against 45.7 / 44.8 ms with this and 42.7 / 45.0 ms for the old -march=native build
// (benches/results/cpu/dispatch_ab.json). The explicit 8 x double vectors (vec8.h) stay one zmm.
#define FASTMIX_CPU_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt,prefer-vector-width=256"
#elif defined(FASTMIX_CPU_CAP_AVX512)
#define FASTMIX_CPU_TARGET "avx512f,avx512bw,avx512vl,avx512dq,avx2,fma,f16c,bmi,bmi2,popcnt"
#endif

// _Pragma takes one string literal, and # does not expand its argument: the target string is expanded by
// one macro level (FASTMIX_CPU_TARGET_PRAGMA's t) before FASTMIX_CPU_PRAGMA turns the whole pragma into text.
#define FASTMIX_CPU_PRAGMA(...) _Pragma(#__VA_ARGS__)
#if defined(FASTMIX_CPU_TARGET) && defined(__clang__)
#define FASTMIX_CPU_TARGET_PRAGMA(t) FASTMIX_CPU_PRAGMA(clang attribute push(__attribute__((target(t))), apply_to = function))
#define FASTMIX_CPU_TARGET_BEGIN FASTMIX_CPU_TARGET_PRAGMA(FASTMIX_CPU_TARGET)
#define FASTMIX_CPU_TARGET_END _Pragma("clang attribute pop")
#elif defined(FASTMIX_CPU_TARGET)
#define FASTMIX_CPU_TARGET_PRAGMA(t) FASTMIX_CPU_PRAGMA(GCC target(t))
#define FASTMIX_CPU_TARGET_BEGIN _Pragma("GCC push_options") FASTMIX_CPU_TARGET_PRAGMA(FASTMIX_CPU_TARGET)
#define FASTMIX_CPU_TARGET_END _Pragma("GCC pop_options")
#else
// DEFAULT: the compiler's baseline (x86-64: SSE2; aarch64: Advanced SIMD / NEON, always present on ARMv8-A).
#define FASTMIX_CPU_TARGET_BEGIN
#define FASTMIX_CPU_TARGET_END
#endif
