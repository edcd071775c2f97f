// Per-instruction-set copies of the CPU kernels, picked at run time (as PyTorch's CPU_CAPABILITY).
//
// setup.py compiles every kernel file (dct.cpp, mix.cpp) once per capability, through generated wrappers
// that #define FASTMIX_CPU_CAP (DEFAULT, AVX2, AVX512) and include the file; each copy lives in its
// own namespace fastmix::cpu_<FASTMIX_CPU_CAP>, and dispatch.cpp (compiled once, baseline ISA)
// registers the torch.ops.fastmix CPU kernels as calls into the best copy the running CPU supports.
// Not PyTorch's own macro names (CPU_CAPABILITY, CPU_CAPABILITY_AVX2): torch's headers test those and then
// emit AVX2 / AVX-512 intrinsics that need the command-line flags we avoid (next paragraph).
//
// The ISA of the AVX2 / AVX-512 copies comes from their command line (setup.py CAPABILITY_FLAGS: -mavx2
// -mfma ..., no -march / -mtune, so they keep the tuning of every other file). That compiles every inline
// function the torch and standard headers define (c10::Half conversions, std::vector members,
// at::parallel_for helpers) for that ISA as well, and the linker keeps one copy of each such function for
// the whole extension (a COMDAT group): if it kept the AVX-512 one, the baseline code (loading, dispatch,
// the DEFAULT copies) would call it too and die with SIGILL on a CPU without AVX-512. So:
//   - setup.py links every baseline object (fastmix.cpp, dispatch.cpp, the DEFAULT copies) before every
//     wide one, and GNU ld, gold and lld keep the first copy they see;
//   - fastmix/_isa_check.py checks it with nm / objdump after each build (the build fails otherwise) and in
//     tests/test_isa_link.py: no wide instruction in a baseline object; no symbol a baseline object calls
//     defined by a wide object only (but the copies' entry points, which dispatch.cpp calls once it knows the
//     CPU runs them); no strong symbol of a wide object outside its fastmix::cpu_<CAP>; and in the linked
//     library the kept copy of every function both sides define is the baseline one.
// Before (until 2026-12-06) the ISA came from a `#pragma GCC target` opened after the headers, which kept
// every header function baseline without any of this, but GCC's middle end optimised the kernels worse
// under the pragma (mix.cpp's AVX2 copy: 129 vs 104 basic blocks in freq_mix's forward lambda, 1981 vs
// 1823 instructions; freq_mix_image forward 1.06x slower in a libtorch harness, fp32, 64 x 3x112x112, k = 6,
// 1 thread, Xeon), and torch's Half conversions lost F16C (__F16C__ undefined when the headers were parsed).
// Measured after the switch (benches/results/cpu/cmdline_isa_ab.json: this Xeon with AVX-512, loaded, 1 thread,
// fp32, freq_mix_image N=M=64 3x112x112 k=6, 14 alternating rounds, median, pragma / command-line build):
// avx2 forward 1.06x, forward+backward 1.02x; avx512 forward 1.06x, forward+backward 1.00x (an earlier
// 8-round run: 1.02x, 1.06x, 1.00x, 1.03x): no slower anywhere, noisy on this shared machine.
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

// The wide copies must be compiled with their ISA flags (setup.py CAPABILITY_FLAGS): without them the copy
// would silently be baseline code, about 2x slower (and the AVX2 noise gather in mix.cpp would not compile).
#if defined(FASTMIX_CPU_CAP_AVX2) && \
    !(defined(__AVX2__) && defined(__FMA__) && defined(__F16C__) && defined(__BMI__) && defined(__BMI2__))
#error "the AVX2 copy is compiled with setup.py's CAPABILITY_FLAGS['AVX2'] (-mavx2 -mfma -mf16c -mbmi -mbmi2 -mpopcnt)"
#endif
#if defined(FASTMIX_CPU_CAP_AVX512) && !(defined(__AVX512F__) && defined(__AVX512BW__) && defined(__AVX512VL__) && \
                                         defined(__AVX512DQ__) && defined(__AVX2__) && defined(__FMA__))
#error "the AVX512 copy is compiled with setup.py's CAPABILITY_FLAGS['AVX512'] (-mavx512f -mavx512bw ...)"
#endif
