// The fused hybrid mask on NVIDIA GPUs (fastmix::mix_fwd / fastmix::mix_bwd), the GPU twin of csrc/cpu/mix.cpp:
// same geometry, same zero-weight skipping, same sign hash (csrc/sign.h), same seeded noise (csrc/noise.h).
//
// Written once for two executors. csrc/cuda/mix_fwd.cu and mix_bwd.cu launch the kernels below on the current
// CUDA stream (exec.cuh); tests/cuda/emulate.cpp runs the same thread bodies on the CPU, one loop iteration
// per CUDA thread, so that CI (which has no GPU) checks the kernels' indexing, masking and arithmetic
// against the CPU backend. To keep that possible every kernel is a functor whose `operator()(tid)` is one
// thread: no shared memory, no barriers, no atomics; each thread writes outputs no other thread writes, and
// reductions write per-thread partial sums that ATen adds up (deterministic). What the emulation cannot
// check: speed, launch limits, and anything the hardware adds (benches/gpu_bench.py does that on a GPU).
//
// Every output block (m, c, I, J) is  C = A_I @ P @ B_J^T  with P an R x R' source patch. R = 8 is the plain
// 8x8 DCT (freq_mix; frontend with upsample = 1): the kernels then read the DCT matrix from constants. R < 8
// is the frontend, bilinear upsampling folded into A_I and B_J (read from the geometry tensors). The template
// argument R of the kernels is 8, 3 (the frontend at upsample >= 8, its default) or 0 (any R, read at run
// time): a compile-time R lets the compiler drop the loop bounds and keep the 2 x 8 x R geometry values in
// registers.
//
// Forward: one thread per output block. Threads of a warp take consecutive blocks q = I*Wb + J of one (m, c)
// plane, and an output channel plane is (Hb, Wb) contiguous, so each of a thread's 64 stores is coalesced
// across the warp. The per-(m, channel) hash words of the signs come from a table (one small kernel per
// call) instead of two mix32 rounds per coefficient in every thread, pre-mixed so that the per-coefficient
// test is 4 operations shorter (csrc/sign.h, sign_flip_premixed). Per-image weights on the resampling
// geometry: the k <= 8 partners' weights and patch origins are loaded into registers first, so that the
// pixel loads are independent of each other (the unrolled partner loop of the Triton kernel).
//
// Backward (per-image weights): the gradient with respect to the mixed source of output m is
// Z_m = sum over blocks of A_I^T G B_J placed at the block's patch. Pass 1 computes it once per output
// block (reading the channel gradient once: the dominant traffic), pass 2 (resampling geometry only, whose
// patches overlap) adds the patches covering each pixel, pass 3 gathers grad_x[n] = sum of w_e Z_m over the
// pairs e = (m, t) that read image n (through an inverse index: deterministic, no atomics), and
// grad_w[e] = <Z_m, x_n> as per-thread partial sums. Per-frequency weights: Z per pair (the weights are
// applied in pass 1) and grad_w from the coefficients of each partner block.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>
#include <optional>
#include <tuple>
#include <type_traits>

#include "../noise.h"
#include "../sign.h"

namespace fastmix {
namespace gpu {

constexpr int BS = 8;
constexpr int NF = 64;
constexpr int kMaxHoistedK = 8;  // per-image partner counts the resampling forward keeps in registers

// Orthonormal 8x8 DCT-II matrix D[u][x] (fastmix.dct_matrix).
#define FASTMIX_DCT8(V)                                                                                           \
  V(0.35355339059327379), V(0.35355339059327379), V(0.35355339059327379), V(0.35355339059327379),                 \
      V(0.35355339059327379), V(0.35355339059327379), V(0.35355339059327379), V(0.35355339059327379),             \
      V(0.49039264020161522), V(0.41573480615127262), V(0.27778511650980114), V(0.097545161008064166),            \
      V(-0.097545161008064096), V(-0.27778511650980098), V(-0.41573480615127267), V(-0.49039264020161522),        \
      V(0.46193976625564337), V(0.19134171618254492), V(-0.19134171618254486), V(-0.46193976625564337),           \
      V(-0.46193976625564342), V(-0.19134171618254517), V(0.191341716182545), V(0.46193976625564326),             \
      V(0.41573480615127262), V(-0.097545161008064096), V(-0.49039264020161522), V(-0.27778511650980109),         \
      V(0.27778511650980092), V(0.49039264020161522), V(0.097545161008064388), V(-0.41573480615127256),           \
      V(0.35355339059327379), V(-0.35355339059327373), V(-0.35355339059327384), V(0.35355339059327368),           \
      V(0.35355339059327384), V(-0.35355339059327334), V(-0.35355339059327356), V(0.35355339059327329),           \
      V(0.27778511650980114), V(-0.49039264020161522), V(0.097545161008064152), V(0.41573480615127273),           \
      V(-0.41573480615127256), V(-0.097545161008064013), V(0.49039264020161533), V(-0.27778511650980076),         \
      V(0.19134171618254492), V(-0.46193976625564342), V(0.46193976625564326), V(-0.19134171618254495),           \
      V(-0.19134171618254528), V(0.46193976625564337), V(-0.4619397662556432), V(0.19134171618254478),            \
      V(0.097545161008064166), V(-0.27778511650980109), V(0.41573480615127273), V(-0.49039264020161533),          \
      V(0.49039264020161522), V(-0.41573480615127251), V(0.27778511650980076), V(-0.097545161008064291)
#define FASTMIX_AS_DOUBLE(v) v
#define FASTMIX_AS_FLOAT(v) v##f

#if defined(__CUDACC__)
// static: every translation unit that includes this header (mix_fwd.cu, mix_bwd.cu) gets its own copy.
static __constant__ double kDctDevD[NF] = {FASTMIX_DCT8(FASTMIX_AS_DOUBLE)};
static __constant__ float kDctDevF[NF] = {FASTMIX_DCT8(FASTMIX_AS_FLOAT)};
#endif
inline constexpr double kDctHostD[NF] = {FASTMIX_DCT8(FASTMIX_AS_DOUBLE)};
inline constexpr float kDctHostF[NF] = {FASTMIX_DCT8(FASTMIX_AS_FLOAT)};

template <typename acc_t>
FASTMIX_HD acc_t dct(int i) {
  constexpr bool dbl = std::is_same_v<acc_t, double>;
#if defined(__CUDA_ARCH__)
  if constexpr (dbl) return kDctDevD[i]; else return kDctDevF[i];
#else
  if constexpr (dbl) return kDctHostD[i]; else return kDctHostF[i];
#endif
}

// A load through the read-only data path on the GPU (geometry tables: read by every thread of a block row).
template <typename T>
FASTMIX_HD T ro(const T* ptr) {
#if defined(__CUDA_ARCH__)
  return __ldg(ptr);
#else
  return *ptr;
#endif
}

// Everything about one call that every thread needs, passed by value.
struct Params {
  int64_t N, M;
  int C, H, W, K, Cw, n_kept, Hb, Wb, R, Rc;
  bool per_image, pixels, use_seed;
  uint32_t key;
  bool use_noise;     // seeded noise after the sign flip (fastmix/ops/noise.py)
  uint32_t noise_key;
  int noise_shift;    // 32 - B for the 2^B-entry table
  FASTMIX_HD int64_t plane() const { return static_cast<int64_t>(Hb) * Wb; }
  FASTMIX_HD int64_t hw() const { return static_cast<int64_t>(H) * W; }
};

template <typename acc_t>
struct Geo {
  const acc_t* rmat;  // (Hb, 8, R): A_I[u][a]
  const int64_t* rstart;
  const acc_t* cmat;  // (Wb, 8, Rc): B_J[v][b]
  const int64_t* cstart;
};

// The rows of A_I and B_J of one block and its patch extent; R = 8: the DCT constants (pointers unused).
template <int R, typename acc_t>
struct BlockGeo {
  const acc_t* A;
  const acc_t* B;
  int ra, rb;
  FASTMIX_HD BlockGeo(const Params& p, const Geo<acc_t>& g, int I, int J)
      : A(g.rmat + static_cast<int64_t>(I) * BS * (R ? R : p.R)),
        B(g.cmat + static_cast<int64_t>(J) * BS * (R ? R : p.Rc)),
        ra(R ? R : p.R),
        rb(R ? R : p.Rc) {}
  FASTMIX_HD acc_t a(int u, int k) const { return R == BS ? dct<acc_t>(u * BS + k) : ro(A + u * ra + k); }
  FASTMIX_HD acc_t b(int v, int k) const { return R == BS ? dct<acc_t>(v * BS + k) : ro(B + v * rb + k); }
};

// One separable pass over an 8x8 tile in place, the building block of both transforms below:
//   rows:    X[r][o] = sum_{i < n_in} X[r][i] k(o, i)   for rows r < n_lines
//   columns: X[o][c] = sum_{i < n_in} k(o, i) X[i][c]   for columns c < n_lines
// for outputs o < n_out (0 for o >= n_out). All bounds are compile-time for R = 8 or 3, so every loop unrolls
// into straight-line FMAs on registers.
template <bool kRows, typename acc_t, typename Coef>
FASTMIX_HD void separable_pass(acc_t (&X)[NF], int n_lines, int n_in, int n_out, const Coef& k) {
#pragma unroll
  for (int l = 0; l < BS; ++l) {
    if (l >= n_lines) break;
    acc_t y[BS];
#pragma unroll
    for (int o = 0; o < BS; ++o) {
      acc_t s = 0;
      if (o < n_out) {
#pragma unroll
        for (int i = 0; i < BS; ++i) {
          if (i >= n_in) break;
          s += (kRows ? X[l * BS + i] : X[i * BS + l]) * k(o, i);
        }
      }
      y[o] = s;
    }
#pragma unroll
    for (int o = 0; o < BS; ++o) (kRows ? X[l * BS + o] : X[o * BS + l]) = y[o];
  }
}

// C = A_I P B_J^T in place on a 64-value tile (P[a*8+b] for a < ra, b < rb; C[u*8+v] after).
template <int R, typename acc_t>
FASTMIX_HD void forward_transform(acc_t (&P)[NF], const BlockGeo<R, acc_t>& bg) {
  separable_pass<true>(P, bg.ra, bg.rb, BS, [&](int v, int b) { return bg.b(v, b); });   // T[a][v] = sum_b P[a][b] B[v][b]
  separable_pass<false>(P, BS, bg.ra, BS, [&](int u, int a) { return bg.a(u, a); });    // C[u][v] = sum_a A[u][a] T[a][v]
}

// dP = A_I^T G B_J in place (the adjoint; for the DCT, the block inverse). dP[a*8+b], a < ra, b < rb.
template <int R, typename acc_t>
FASTMIX_HD void adjoint_transform(acc_t (&G)[NF], const BlockGeo<R, acc_t>& bg) {
  separable_pass<true>(G, BS, BS, bg.rb, [&](int b, int v) { return bg.b(v, b); });    // T[u][b] = sum_v G[u][v] B[v][b]
  separable_pass<false>(G, BS, BS, bg.ra, [&](int a, int u) { return bg.a(u, a); });   // dP[a][b] = sum_u A[u][a] T[u][b]
}

// Bit a set: column a of the block's (8, r) matrix has a non-zero. Every block's patch has the largest
// extent R, so a block whose interpolation span is shorter includes source pixels of weight exactly 0;
// they are not read, so that a NaN there cannot reach the block (0 * NaN = NaN). All set for the DCT.
template <int R, typename acc_t>
FASTMIX_HD unsigned patch_mask(const acc_t* mat, int r) {
  if (R == BS) return 0xFFu;
  unsigned bits = 0;
  for (int a = 0; a < r; ++a) {
    bool any = false;
    for (int u = 0; u < BS; ++u) any |= ro(mat + u * r + a) != acc_t(0);
    bits |= static_cast<unsigned>(any) << a;
  }
  return bits;
}

template <int R, typename in_t, typename acc_t>
FASTMIX_HD void add_patch(acc_t (&P)[NF], const in_t* __restrict__ src, int64_t ld, int ra, int rb, unsigned rmask,
                          unsigned cmask, acc_t w) {
#pragma unroll
  for (int a = 0; a < BS; ++a) {
    if (a >= ra) break;
    if (R != BS && !((rmask >> a) & 1u)) continue;
#pragma unroll
    for (int b = 0; b < BS; ++b) {
      if (b >= rb) break;
      if (R != BS && !((cmask >> b) & 1u)) continue;
      P[a * BS + b] += w * static_cast<acc_t>(src[a * ld + b]);
    }
  }
}

FASTMIX_HD int64_t checked_partner(const int64_t* idx, int64_t e, int64_t N) {
  const int64_t n = idx[e];
#if defined(__CUDA_ARCH__)
  CUDA_KERNEL_ASSERT(n >= 0 && n < N);  // the Python layer validates; this guards direct op calls
#else
  TORCH_CHECK(n >= 0 && n < N, "mix: index value ", n, " is outside [0, ", N, ")");
#endif
  return n;
}

// Where thread tid of a one-thread-per-output-block kernel works: tid = (m*C + c)*plane + q, q = I*Wb + J;
// with the block's geometry and the masks of the patch pixels it reads.
template <int R, typename acc_t>
struct OutBlock {
  int64_t q, mc, m;
  int c, I, J;
  BlockGeo<R, acc_t> bg;
  unsigned rmask, cmask;
  FASTMIX_HD OutBlock(const Params& p, const Geo<acc_t>& g, int64_t tid)
      : q(tid % p.plane()),
        mc(tid / p.plane()),
        m(mc / p.C),
        c(static_cast<int>(mc % p.C)),
        I(static_cast<int>(q / p.Wb)),
        J(static_cast<int>(q % p.Wb)),
        bg(p, g, I, J),
        rmask(patch_mask<R>(bg.A, bg.ra)),
        cmask(patch_mask<R>(bg.B, bg.rb)) {}
};

// ------------------------------------------------------------------------------------------------
// Sign table: planes[m * C*64 + channel] = premix_plane(plane_hash(key, m, channel)), the word every block
// of that output plane combines with its block_word(I, J) (csrc/sign.h: the same signs as sign_flip).
// ------------------------------------------------------------------------------------------------
struct PlaneKernel {
  uint32_t key;
  int64_t channels;
  uint32_t* out;
  FASTMIX_HD void operator()(int64_t tid) const {
    out[tid] = premix_plane(plane_hash(key, static_cast<uint32_t>(tid / channels), static_cast<uint32_t>(tid % channels)));
  }
};

// ------------------------------------------------------------------------------------------------
// Forward: one thread per output block (m, c, I, J); tid = (m*C + c)*plane + q.
// ------------------------------------------------------------------------------------------------
template <int R, typename in_t, typename out_t, typename acc_t>
struct FwdKernel {
  Params p;
  const in_t* __restrict__ x;
  const int64_t* __restrict__ idx;
  const acc_t* __restrict__ w;
  const int* __restrict__ pos;
  const uint32_t* __restrict__ planes;  // (M, C*64) when use_seed
  Geo<acc_t> g;
  out_t* __restrict__ out;
  const uint32_t* __restrict__ noise_planes;  // (M, C*64) pre-mixed noise words when use_noise
  const float* __restrict__ noise_scale;      // (C*64,)
  const float* __restrict__ noise_table;      // (2^B,)

  // Coefficient f's noise, table[hash] * scale (one float32 product: csrc/noise.h, fastmix/ops/noise.py).
  FASTMIX_HD float noise(const uint32_t* nh, int64_t chan0, int f, uint32_t bw) const {
    return noise_table[noise_index_premixed(nh[f], bw, p.noise_shift)] * noise_scale[chan0 + f];
  }

  FASTMIX_HD void operator()(int64_t tid) const {
    const OutBlock<R, acc_t> ob(p, g, tid);
    const auto& [q, mc, m, c, I, J, bg, rmask, cmask] = ob;
    const int64_t plane = p.plane(), r0 = g.rstart[I], s0 = g.cstart[J];

    acc_t Cf[NF];
#pragma unroll
    for (int f = 0; f < NF; ++f) Cf[f] = 0;
    if (p.per_image) {
      // Mix the patches, transform once (the transform is linear).
      if (R != BS && p.K <= kMaxHoistedK) {
        // Resampling geometry (the frontend; k is 2..6 for the hybrid mask): weights and partner patch
        // origins first, into registers (the slots are a compile-time array), so that the R x R x k pixel
        // loads below do not wait on index loads in between and are all in flight together. Same sums in
        // the same order as the loop below.
        acc_t wt[kMaxHoistedK];
        const in_t* base[kMaxHoistedK];
#pragma unroll
        for (int t = 0; t < kMaxHoistedK; ++t) {
          wt[t] = 0;
          base[t] = x;
          if (t < p.K) {
            const acc_t wv = w[m * p.K + t];
            if (wv != acc_t(0)) {  // padded partner: skipped, its pixels never read
              wt[t] = wv;
              base[t] = x + ((checked_partner(idx, m * p.K + t, p.N) * p.C + c) * p.H + r0) * p.W + s0;
            }
          }
        }
#pragma unroll
        for (int a = 0; a < BS; ++a) {
          if (a >= bg.ra) break;
          if (!((rmask >> a) & 1u)) continue;
#pragma unroll
          for (int b = 0; b < BS; ++b) {
            if (b >= bg.rb) break;
            if (!((cmask >> b) & 1u)) continue;
            acc_t s = 0;
#pragma unroll
            for (int t = 0; t < kMaxHoistedK; ++t)
              if (wt[t] != acc_t(0)) s += wt[t] * static_cast<acc_t>(base[t][a * p.W + b]);
            Cf[a * BS + b] = s;
          }
        }
      } else {
        for (int t = 0; t < p.K; ++t) {
          const acc_t wt = w[m * p.K + t];
          if (wt == acc_t(0)) continue;  // padded partner: skipped
          const int64_t n = checked_partner(idx, m * p.K + t, p.N);
          add_patch<R>(Cf, x + ((n * p.C + c) * p.H + r0) * p.W + s0, p.W, bg.ra, bg.rb, rmask, cmask, wt);
        }
      }
      forward_transform<R>(Cf, bg);
    } else {
      const int cw = p.Cw == 1 ? 0 : c;
      for (int t = 0; t < p.K; ++t) {
        const acc_t* wr = w + ((m * p.K + t) * p.Cw + cw) * NF;
        const int64_t n = checked_partner(idx, m * p.K + t, p.N);
        acc_t T[NF];
#pragma unroll
        for (int f = 0; f < NF; ++f) T[f] = 0;
        add_patch<R>(T, x + ((n * p.C + c) * p.H + r0) * p.W + s0, p.W, bg.ra, bg.rb, rmask, cmask, acc_t(1));
        forward_transform<R>(T, bg);
#pragma unroll
        for (int f = 0; f < NF; ++f) {
          const acc_t wf = wr[f];
          Cf[f] += wf != acc_t(0) ? wf * T[f] : acc_t(0);
        }
      }
    }

    const int64_t chan0 = static_cast<int64_t>(c) * NF;
    const uint32_t* ph = planes + mc * NF;  // this plane's 64 hash words (read only when use_seed)
    const uint32_t* nh = noise_planes + mc * NF;  // its 64 noise words (read only when use_noise)
    const uint32_t bw = block_word(I, J);
    if constexpr (R == BS) {
      if (p.pixels) {
#pragma unroll
        for (int f = 0; f < NF; ++f) {
          if (pos[chan0 + f] < 0) {
            Cf[f] = 0;
            continue;
          }
          if (p.use_seed && sign_flip_premixed(ph[f], bw)) Cf[f] = -Cf[f];
          if (p.use_noise) Cf[f] += static_cast<acc_t>(noise(nh, chan0, f, bw));
        }
        adjoint_transform<R>(Cf, bg);  // the block inverse
        out_t* dst = out + ((m * p.C + c) * p.H + r0) * p.W + s0;
#pragma unroll
        for (int a = 0; a < BS; ++a)
#pragma unroll
          for (int b = 0; b < BS; ++b) dst[a * p.W + b] = static_cast<out_t>(Cf[a * BS + b]);
        return;
      }
    }
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      const int slot = pos[chan0 + f];
      if (slot < 0) continue;
      acc_t v = Cf[f];
      if (p.use_seed && sign_flip_premixed(ph[f], bw)) v = -v;
      if (p.use_noise) v += static_cast<acc_t>(noise(nh, chan0, f, bw));  // after the sign flip
      out[(m * p.n_kept + slot) * plane + q] = static_cast<out_t>(v);
    }
  }
};

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

// The gradient with respect to the mixed coefficients of block (m, c, I, J): zero where removed, signed.
template <int R, typename g_t, typename acc_t>
FASTMIX_HD void load_coef_grad(acc_t (&G)[NF], const Params& p, const g_t* __restrict__ grad,
                               const int* __restrict__ pos, const uint32_t* __restrict__ planes, int64_t m, int c,
                               int I, int J, int64_t q) {
  const int64_t chan0 = static_cast<int64_t>(c) * NF;
  bool pixels = false;
  if constexpr (R == BS) pixels = p.pixels;
  if (pixels) {
    // d(pixels)/d(coefficients) is the block inverse, whose adjoint is the DCT.
    const g_t* src = grad + ((m * p.C + c) * p.H + static_cast<int64_t>(I) * BS) * p.W + static_cast<int64_t>(J) * BS;
#pragma unroll
    for (int a = 0; a < BS; ++a)
#pragma unroll
      for (int b = 0; b < BS; ++b) G[a * BS + b] = static_cast<acc_t>(src[a * p.W + b]);
    const BlockGeo<BS, acc_t> dct_geo(p, Geo<acc_t>{nullptr, nullptr, nullptr, nullptr}, 0, 0);
    forward_transform<BS>(G, dct_geo);
#pragma unroll
    for (int f = 0; f < NF; ++f)
      if (pos[chan0 + f] < 0) G[f] = 0;
  } else {
    const int64_t plane = p.plane();
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      const int slot = pos[chan0 + f];
      G[f] = slot < 0 ? acc_t(0) : static_cast<acc_t>(grad[(m * p.n_kept + slot) * plane + q]);
    }
  }
  if (p.use_seed) {
    const uint32_t* ph = planes + (m * p.C + c) * NF;
    const uint32_t bw = block_word(I, J);
#pragma unroll
    for (int f = 0; f < NF; ++f)
      if (sign_flip_premixed(ph[f], bw)) G[f] = -G[f];
  }
}

// Pass 1: one thread per output block (m, c, I, J). Per-image weights: dst plane m gets A_I^T G B_J; per
// frequency: dst plane e = m*K + t gets A_I^T (w_e . G) B_J. R = 8 (DCT): blocks tile the image, so the
// thread writes its 8x8 pixels of Z = dst (P, C, H, W). Otherwise dst holds patches (P, C, ra*rb, plane),
// contiguous along the block index, and pass 2 adds the overlapping ones.
template <int R, typename g_t, typename acc_t>
struct AdjKernel {
  Params p;
  const g_t* __restrict__ grad;
  const int* __restrict__ pos;
  const uint32_t* __restrict__ planes;
  const acc_t* __restrict__ w;
  Geo<acc_t> g;
  acc_t* __restrict__ dst;

  FASTMIX_HD void store(const acc_t (&P)[NF], int64_t pl, int c, int I, int J, int64_t q, const BlockGeo<R, acc_t>& bg,
                        unsigned rmask, unsigned cmask) const {
    if constexpr (R == BS) {
      acc_t* z = dst + ((pl * p.C + c) * p.H + g.rstart[I]) * p.W + g.cstart[J];
#pragma unroll
      for (int a = 0; a < BS; ++a)
#pragma unroll
        for (int b = 0; b < BS; ++b) z[a * p.W + b] = P[a * BS + b];
    } else {
      const int64_t plane = p.plane();
      acc_t* t = dst + (pl * p.C + c) * (static_cast<int64_t>(bg.ra) * bg.rb) * plane + q;
#pragma unroll
      for (int a = 0; a < BS; ++a) {
        if (a >= bg.ra) break;
#pragma unroll
        for (int b = 0; b < BS; ++b) {
          if (b >= bg.rb) break;
          // A pixel the block never reads gets an exact 0 (not 0 * G, which is NaN where G is).
          const bool used = (rmask >> a) & (cmask >> b) & 1u;
          t[(a * bg.rb + b) * plane] = used ? P[a * BS + b] : acc_t(0);
        }
      }
    }
  }

  FASTMIX_HD void operator()(int64_t tid) const {
    const OutBlock<R, acc_t> ob(p, g, tid);
    const auto& [q, mc, m, c, I, J, bg, rmask, cmask] = ob;
    acc_t G[NF];
    load_coef_grad<R>(G, p, grad, pos, planes, m, c, I, J, q);
    if (p.per_image) {
      adjoint_transform<R>(G, bg);
      store(G, m, c, I, J, q, bg, rmask, cmask);
      return;
    }
    const int cw = p.Cw == 1 ? 0 : c;
    for (int t = 0; t < p.K; ++t) {
      const int64_t e = m * p.K + t;
      const acc_t* wr = w + (e * p.Cw + cw) * NF;
      acc_t Gt[NF];
#pragma unroll
      for (int f = 0; f < NF; ++f) Gt[f] = wr[f] != acc_t(0) ? wr[f] * G[f] : acc_t(0);
      adjoint_transform<R>(Gt, bg);
      store(Gt, e, c, I, J, q, bg, rmask, cmask);
    }
  }
};

// First block whose patch reaches past `y`: patches start at non-decreasing offsets.
FASTMIX_HD int first_cover(const int64_t* start, int nb, int r, int64_t y) {
  int lo = 0, hi = nb;
  while (lo < hi) {
    const int mid = (lo + hi) / 2;
    if (start[mid] + r <= y)
      lo = mid + 1;
    else
      hi = mid;
  }
  return lo;
}

// Pass 2 (resampling geometry): one thread per pixel (plane, c, y, x) adds the patches covering it, in a
// fixed order.
template <typename acc_t>
struct FoldKernel {
  Params p;
  Geo<acc_t> g;
  const acc_t* __restrict__ patches;  // (P, C, R*Rc, plane)
  acc_t* __restrict__ z;              // (P, C, H, W)

  FASTMIX_HD void operator()(int64_t tid) const {
    const int64_t xw = tid % p.W, yh = (tid / p.W) % p.H, pc = tid / p.hw();
    const int64_t plane = p.plane(), rr = static_cast<int64_t>(p.R) * p.Rc;
    const acc_t* src = patches + pc * rr * plane;
    acc_t s = 0;
    for (int I = first_cover(g.rstart, p.Hb, p.R, yh); I < p.Hb && g.rstart[I] <= yh; ++I)
      for (int J = first_cover(g.cstart, p.Wb, p.Rc, xw); J < p.Wb && g.cstart[J] <= xw; ++J)
        s += src[((yh - g.rstart[I]) * p.Rc + (xw - g.cstart[J])) * plane + static_cast<int64_t>(I) * p.Wb + J];
    z[tid] = s;
  }
};

// Pass 3: one thread per source pixel (n, c, y, x): grad_x = sum over the pairs e of image n of w_e Z_m
// (per image) or Z_e (per frequency: weights applied in pass 1). Pairs in ascending e: deterministic.
template <typename in_t, typename acc_t>
struct XKernel {
  Params p;
  const acc_t* __restrict__ z;
  const int64_t* __restrict__ order;
  const int64_t* __restrict__ offs;
  const acc_t* __restrict__ w;
  in_t* __restrict__ gx;

  FASTMIX_HD void operator()(int64_t tid) const {
    const int64_t hw = p.hw();
    const int64_t pix = tid % hw, nc = tid / hw;
    const int c = static_cast<int>(nc % p.C);
    const int64_t n = nc / p.C;
    acc_t s = 0;
    for (int64_t i = offs[n]; i < offs[n + 1]; ++i) {
      const int64_t e = order[i];
      if (p.per_image) {
        const acc_t wt = w[e];
        if (wt != acc_t(0)) s += wt * z[((e / p.K) * p.C + c) * hw + pix];
      } else {
        s += z[(e * p.C + c) * hw + pix];
      }
    }
    gx[tid] = static_cast<in_t>(s);
  }
};

// Thread tid of the weight-gradient kernels: lane s of `lanes`, pair e = m*K + t, colour c; tid = (e*C + c)*lanes + s.
struct PairLane {
  int64_t s, e, m;
  int c;
  FASTMIX_HD PairLane(const Params& p, int64_t lanes, int64_t tid)
      : s(tid % lanes), e(tid / lanes / p.C), m(e / p.K), c(static_cast<int>((tid / lanes) % p.C)) {}
};

// Per-image weight gradient: grad_w[e] = <Z_m, x_n>. One thread per (e, c, lane s) sums pixels s, s + S,
// ... (consecutive lanes read consecutive pixels); zero for a skipped (zero-weight) partner.
template <typename in_t, typename acc_t>
struct WImageKernel {
  Params p;
  int64_t lanes;
  const acc_t* __restrict__ z;
  const in_t* __restrict__ x;
  const int64_t* __restrict__ idx;
  const acc_t* __restrict__ w;
  acc_t* __restrict__ partial;  // (M*K, C, lanes)

  FASTMIX_HD void operator()(int64_t tid) const {
    const auto [s, e, m, c] = PairLane(p, lanes, tid);
    const int64_t hw = p.hw();
    acc_t acc = 0;
    if (w[e] != acc_t(0)) {
      const int64_t n = checked_partner(idx, e, p.N);
      const acc_t* zr = z + (m * p.C + c) * hw;
      const in_t* xr = x + (n * p.C + c) * hw;
      for (int64_t i = s; i < hw; i += lanes) acc += zr[i] * static_cast<acc_t>(xr[i]);
    }
    partial[tid] = acc;
  }
};

// Per-frequency weight gradient: grad_w[e, f] = sum over blocks of G_m[f] * coef(x_n)[f]. One thread per
// (e, c, lane s) takes blocks s, s + S, ...; zero where the weight is zero.
template <int R, typename in_t, typename g_t, typename acc_t>
struct WFreqKernel {
  Params p;
  int64_t lanes;
  const g_t* __restrict__ grad;
  const in_t* __restrict__ x;
  const int64_t* __restrict__ idx;
  const acc_t* __restrict__ w;
  const int* __restrict__ pos;
  const uint32_t* __restrict__ planes;
  Geo<acc_t> g;
  acc_t* __restrict__ partial;  // (M*K, C, lanes, 64)

  FASTMIX_HD void operator()(int64_t tid) const {
    const auto [s, e, m, c] = PairLane(p, lanes, tid);
    const int64_t plane = p.plane();
    const acc_t* wr = w + (e * p.Cw + (p.Cw == 1 ? 0 : c)) * NF;
    const int64_t n = checked_partner(idx, e, p.N);
    acc_t acc[NF];
#pragma unroll
    for (int f = 0; f < NF; ++f) acc[f] = 0;
    for (int64_t q = s; q < plane; q += lanes) {
      const int I = static_cast<int>(q / p.Wb), J = static_cast<int>(q % p.Wb);
      const BlockGeo<R, acc_t> bg(p, g, I, J);
      const unsigned rmask = patch_mask<R>(bg.A, bg.ra), cmask = patch_mask<R>(bg.B, bg.rb);
      acc_t T[NF];
#pragma unroll
      for (int f = 0; f < NF; ++f) T[f] = 0;
      add_patch<R>(T, x + ((n * p.C + c) * p.H + g.rstart[I]) * p.W + g.cstart[J], p.W, bg.ra, bg.rb, rmask, cmask,
                   acc_t(1));
      forward_transform<R>(T, bg);
      acc_t G[NF];
      load_coef_grad<R>(G, p, grad, pos, planes, m, c, I, J, q);
#pragma unroll
      for (int f = 0; f < NF; ++f) acc[f] += G[f] * T[f];
    }
    acc_t* dst = partial + tid * NF;
#pragma unroll
    for (int f = 0; f < NF; ++f) dst[f] = wr[f] != acc_t(0) ? acc[f] : acc_t(0);
  }
};

// ------------------------------------------------------------------------------------------------
// Launchers, generic in the executor: exec(kernel, n) runs kernel(tid) for tid in [0, n) (exec.cuh: a CUDA
// launch on the current stream; tests/cuda/emulate.cpp: a CPU loop). Intermediate tensors are ATen tensors on
// x's device, so both executors share every line below.
// ------------------------------------------------------------------------------------------------

inline Params make_params(const at::Tensor& x, const at::Tensor& index, const at::Tensor& weight, int64_t n_kept,
                          int64_t seed, bool use_seed, bool pixels, const at::Tensor& row_mat,
                          const at::Tensor& col_mat) {
  TORCH_CHECK(x.dim() == 4, "mix (cuda): x must be (N, C, H, W)");
  TORCH_CHECK(index.dim() == 2 && index.scalar_type() == at::kLong && index.size(1) >= 1,
              "mix (cuda): index must be int64 (M, k >= 1)");
  TORCH_CHECK(row_mat.dim() == 3 && row_mat.size(1) == BS && row_mat.size(2) >= 1 && row_mat.size(2) <= BS,
              "mix (cuda): row_mat must be (Hb, 8, R <= 8)");
  TORCH_CHECK(col_mat.dim() == 3 && col_mat.size(1) == BS && col_mat.size(2) >= 1 && col_mat.size(2) <= BS,
              "mix (cuda): col_mat must be (Wb, 8, R <= 8)");
  Params p{};
  p.N = x.size(0);
  p.C = static_cast<int>(x.size(1));
  p.H = static_cast<int>(x.size(2));
  p.W = static_cast<int>(x.size(3));
  p.M = index.size(0);
  p.K = static_cast<int>(index.size(1));
  p.per_image = weight.dim() == 2;
  p.Cw = p.per_image ? 1 : static_cast<int>(weight.size(2));
  TORCH_CHECK(p.per_image ? (weight.size(0) == p.M && weight.size(1) == p.K)
                          : (weight.dim() == 4 && weight.size(0) == p.M && weight.size(1) == p.K &&
                             (p.Cw == 1 || p.Cw == p.C) && weight.size(3) == NF),
              "mix (cuda): weight must be (M, k) or (M, k, 1 or C, 64)");
  p.n_kept = static_cast<int>(n_kept);
  p.Hb = static_cast<int>(row_mat.size(0));
  p.Wb = static_cast<int>(col_mat.size(0));
  p.R = static_cast<int>(row_mat.size(2));
  p.Rc = static_cast<int>(col_mat.size(2));
  p.pixels = pixels;
  p.use_seed = use_seed;
  TORCH_CHECK(!use_seed || seed >= 0, "mix (cuda): seed must be >= 0");
  p.key = seed_key(static_cast<uint64_t>(seed));
  p.use_noise = false;
  p.noise_key = 0;
  p.noise_shift = 32;
  // R = 8 means the plain DCT geometry (the only one with R = 8): the kernels use the constant DCT matrix.
  if (pixels)
    TORCH_CHECK(p.R == BS && p.Rc == BS && p.Hb * BS == p.H && p.Wb * BS == p.W,
                "mix (cuda): pixels output needs the plain 8x8 DCT geometry");
  return p;
}

template <typename acc_t>
Geo<acc_t> make_geo(const at::Tensor& rm, const at::Tensor& rs, const at::Tensor& cm, const at::Tensor& cs) {
  return Geo<acc_t>{rm.const_data_ptr<acc_t>(), rs.const_data_ptr<int64_t>(), cm.const_data_ptr<acc_t>(),
                    cs.const_data_ptr<int64_t>()};
}

// Calls f(std::integral_constant<int, R>) with the kernels' compile-time patch extent for this geometry:
// 8 (DCT), 3 (frontend at upsample >= 8; only where kFast3, so that rare paths are not compiled three
// times), else 0 (read at run time).
template <bool kFast3, typename F>
void dispatch_r(const Params& p, F&& f) {
  if (p.R == BS && p.Rc == BS) return f(std::integral_constant<int, BS>{});
  if constexpr (kFast3)
    if (p.R == 3 && p.Rc == 3) return f(std::integral_constant<int, 3>{});
  return f(std::integral_constant<int, 0>{});
}

// Calls f(tag) for float32, float16 and bfloat16.
template <typename F>
void dispatch_reduced(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: TORCH_CHECK(false, name, ": unsupported dtype ", t);
  }
}

// Calls f(in_tag, out_tag) for the compiled dtype pairs: float64 -> float64 (for checks) and
// {f32, f16, bf16} -> {f32, f16, bf16}. Generic lambdas keep the other pairs from being instantiated.
template <typename F>
void dispatch_io(at::ScalarType in, at::ScalarType out, const char* name, F&& f) {
  if (in == at::kDouble || out == at::kDouble) {
    TORCH_CHECK(in == out, name, ": float64 is supported only as float64 in and out");
    return f(double{}, double{});
  }
  dispatch_reduced(in, name, [&](auto in_tag) { dispatch_reduced(out, name, [&](auto out_tag) { f(in_tag, out_tag); }); });
}

// (M, C*64) pre-mixed hash words of the signs (PlaneKernel), as uint32 in an int32 tensor; of the noise with
// key = p.noise_key.
template <class Exec>
at::Tensor sign_planes(const Exec& exec, const Params& p, const at::Tensor& like, uint32_t key) {
  at::Tensor t = at::empty({p.M, static_cast<int64_t>(p.C) * NF}, like.options().dtype(at::kInt));
  exec(PlaneKernel{key, static_cast<int64_t>(p.C) * NF, reinterpret_cast<uint32_t*>(t.mutable_data_ptr<int32_t>())},
       t.numel());
  return t;
}
template <class Exec>
at::Tensor sign_planes(const Exec& exec, const Params& p, const at::Tensor& like) {
  return sign_planes(exec, p, like, p.key);
}

// The noise arguments of mix_fwd (fastmix/ops/noise.py checks them for users first): sets p's noise fields
// and returns the contiguous scale and table on x's device.
inline std::tuple<at::Tensor, at::Tensor> set_noise(Params& p, const std::optional<at::Tensor>& scale,
                                                    const std::optional<at::Tensor>& table, int64_t seed,
                                                    const at::Tensor& x) {
  if (!table.has_value()) {
    TORCH_CHECK(!scale.has_value(), "mix (cuda): noise_scale needs noise_table");
    return {};
  }
  TORCH_CHECK(scale.has_value(), "mix (cuda): noise_table needs noise_scale");
  TORCH_CHECK(table->scalar_type() == at::kFloat && table->dim() == 1, "mix (cuda): noise_table must be float32 (2^B,)");
  const int64_t size = table->numel();
  int bits = 0;
  while ((int64_t{1} << bits) < size) ++bits;
  TORCH_CHECK(size >= 2 && (int64_t{1} << bits) == size && bits <= kNoiseMaxBits,
              "mix (cuda): noise_table must hold 2^B entries, 1 <= B <= ", kNoiseMaxBits, ", got ", size);
  TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->dim() == 1 && scale->numel() == static_cast<int64_t>(p.C) * NF,
              "mix (cuda): noise_scale must be float32 (C*64,)");
  TORCH_CHECK(seed >= 0, "mix (cuda): noise_seed must be >= 0");
  TORCH_CHECK(table->device() == x.device() && scale->device() == x.device(),
              "mix (cuda): noise_scale and noise_table must be on x's device");
  p.use_noise = true;
  p.noise_key = noise_key(static_cast<uint64_t>(seed));
  p.noise_shift = 32 - bits;
  return {scale->contiguous(), table->contiguous()};
}

template <class Exec>
at::Tensor mix_fwd_impl(const Exec& exec, const at::Tensor& x_in, const at::Tensor& index_in,
                        const at::Tensor& weight_in, const at::Tensor& pos_in, int64_t n_kept, int64_t seed,
                        bool use_seed, bool pixels, const at::Tensor& row_mat, const at::Tensor& row_start,
                        const at::Tensor& col_mat, const at::Tensor& col_start, std::optional<at::ScalarType> out_dtype,
                        const std::optional<at::Tensor>& noise_scale = std::nullopt,
                        const std::optional<at::Tensor>& noise_table = std::nullopt, int64_t noise_seed = 0) {
  const at::Tensor x = x_in.contiguous(), index = index_in.contiguous(), pos = pos_in.to(at::kInt).contiguous();
  Params p = make_params(x, index, weight_in, n_kept, seed, use_seed, pixels, row_mat, col_mat);
  const auto [nscale, ntable] = set_noise(p, noise_scale, noise_table, noise_seed, x);
  const at::ScalarType od = out_dtype.value_or(x.scalar_type());
  at::Tensor out = pixels ? at::empty({p.M, p.C, p.H, p.W}, x.options().dtype(od))
                          : at::empty({p.M, n_kept, p.Hb, p.Wb}, x.options().dtype(od));
  if (out.numel() == 0) return out;
  const at::Tensor planes = use_seed ? sign_planes(exec, p, x) : pos;  // pos: an unread placeholder
  const auto* ph = reinterpret_cast<const uint32_t*>(planes.const_data_ptr<int32_t>());
  const at::Tensor nplanes = p.use_noise ? sign_planes(exec, p, x, p.noise_key) : pos;  // pos: unread placeholder
  const auto* nph = reinterpret_cast<const uint32_t*>(nplanes.const_data_ptr<int32_t>());
  const float* nsp = p.use_noise ? nscale.const_data_ptr<float>() : nullptr;
  const float* ntp = p.use_noise ? ntable.const_data_ptr<float>() : nullptr;
  const int64_t threads = p.M * p.C * p.plane();
  dispatch_io(x.scalar_type(), od, "mix_fwd (cuda)", [&](auto in_tag, auto out_tag) {
    using in_t = decltype(in_tag);
    using out_t = decltype(out_tag);
    using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
    const auto at_acc = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
    const at::Tensor w = weight_in.to(at_acc).contiguous();
    const at::Tensor rm = row_mat.to(at_acc).contiguous(), cm = col_mat.to(at_acc).contiguous();
    const at::Tensor rs = row_start.to(at::kLong).contiguous(), cs = col_start.to(at::kLong).contiguous();
    const auto g = make_geo<acc_t>(rm, rs, cm, cs);
    dispatch_r</*kFast3=*/true>(p, [&](auto r_tag) {
      constexpr int R = decltype(r_tag)::value;
      exec(FwdKernel<R, in_t, out_t, acc_t>{p, x.const_data_ptr<in_t>(), index.const_data_ptr<int64_t>(),
                                            w.const_data_ptr<acc_t>(), pos.const_data_ptr<int>(), ph, g,
                                            out.mutable_data_ptr<out_t>(), nph, nsp, ntp},
           threads);
    });
  });
  return out;
}

template <class Exec>
std::tuple<at::Tensor, at::Tensor> mix_bwd_impl(const Exec& exec, const at::Tensor& grad_in, const at::Tensor& x_in,
                                                const at::Tensor& index_in, const at::Tensor& weight_in,
                                                const at::Tensor& pos_in, int64_t seed, bool use_seed, bool pixels,
                                                const at::Tensor& row_mat, const at::Tensor& row_start,
                                                const at::Tensor& col_mat, const at::Tensor& col_start, bool need_x,
                                                bool need_w) {
  const at::Tensor x = x_in.contiguous(), index = index_in.contiguous(), grad = grad_in.contiguous();
  const at::Tensor pos = pos_in.to(at::kInt).contiguous();
  const Params p = make_params(x, index, weight_in, pixels ? 0 : grad.size(1), seed, use_seed, pixels, row_mat, col_mat);
  at::Tensor gx = need_x ? at::empty_like(x) : x.new_empty({0});
  at::Tensor gw = need_w ? at::empty_like(weight_in, at::MemoryFormat::Contiguous) : weight_in.new_empty({0});
  if (!(need_x || need_w)) return {gx, gw};
  if (p.M == 0 || p.N == 0 || grad.numel() == 0 || x.numel() == 0) {
    if (need_x) gx.zero_();
    if (need_w) gw.zero_();
    return {gx, gw};
  }
  const at::Tensor planes = use_seed ? sign_planes(exec, p, x) : pos;  // pos: an unread placeholder
  const auto* ph = reinterpret_cast<const uint32_t*>(planes.const_data_ptr<int32_t>());
  const int64_t plane = p.plane(), hw = p.hw();
  dispatch_io(x.scalar_type(), grad.scalar_type(), "mix_bwd (cuda)", [&](auto in_tag, auto g_tag) {
    using in_t = decltype(in_tag);
    using g_t = decltype(g_tag);
    using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
    const auto at_acc = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
    const auto acc_opts = x.options().dtype(at_acc);
    const at::Tensor w = weight_in.to(at_acc).contiguous();
    const at::Tensor rm = row_mat.to(at_acc).contiguous(), cm = col_mat.to(at_acc).contiguous();
    const at::Tensor rs = row_start.to(at::kLong).contiguous(), cs = col_start.to(at::kLong).contiguous();
    const auto g = make_geo<acc_t>(rm, rs, cm, cs);
    const int64_t pairs = p.M * p.K;

    // Passes 1-2: Z (P, C, H, W), P = M (per image) or M*k (per frequency).
    at::Tensor z;
    if (need_x || (need_w && p.per_image)) {
      const int64_t nplanes = p.per_image ? p.M : pairs;
      z = at::empty({nplanes, p.C, p.H, p.W}, acc_opts);
      dispatch_r</*kFast3=*/true>(p, [&](auto r_tag) {
        constexpr int R = decltype(r_tag)::value;
        const bool tiles = R == BS;
        at::Tensor patches = tiles ? z : at::empty({nplanes, p.C, static_cast<int64_t>(p.R) * p.Rc, plane}, acc_opts);
        exec(AdjKernel<R, g_t, acc_t>{p, grad.const_data_ptr<g_t>(), pos.const_data_ptr<int>(), ph,
                                      w.const_data_ptr<acc_t>(), g, patches.mutable_data_ptr<acc_t>()},
             p.M * p.C * plane);
        if (!tiles)
          exec(FoldKernel<acc_t>{p, g, patches.const_data_ptr<acc_t>(), z.mutable_data_ptr<acc_t>()}, z.numel());
      });
    }
    if (need_x) {
      // Inverse index on the device: order lists the pairs e = m*k + t grouped by image (stable: ascending e),
      // image n's are order[offs[n] : offs[n+1]]. No host sync.
      const at::Tensor flat = index.reshape({-1});
      const auto sorted = flat.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false);
      const at::Tensor order = std::get<1>(sorted).contiguous();
      const at::Tensor offs = at::searchsorted(std::get<0>(sorted), at::arange(p.N + 1, flat.options())).contiguous();
      exec(XKernel<in_t, acc_t>{p, z.const_data_ptr<acc_t>(), order.const_data_ptr<int64_t>(),
                                offs.const_data_ptr<int64_t>(), w.const_data_ptr<acc_t>(), gx.mutable_data_ptr<in_t>()},
           gx.numel());
    }
    if (need_w) {
      at::Tensor red;
      if (p.per_image) {
        const int64_t lanes = std::min<int64_t>(256, hw);
        at::Tensor partial = at::empty({pairs, p.C, lanes}, acc_opts);
        exec(WImageKernel<in_t, acc_t>{p, lanes, z.const_data_ptr<acc_t>(), x.const_data_ptr<in_t>(),
                                       index.const_data_ptr<int64_t>(), w.const_data_ptr<acc_t>(),
                                       partial.mutable_data_ptr<acc_t>()},
             partial.numel());
        red = partial.sum({1, 2}, /*keepdim=*/false, at::kDouble).view({p.M, p.K});
      } else {
        const int64_t lanes = std::min<int64_t>(32, plane);
        at::Tensor partial = at::empty({pairs, p.C, lanes, NF}, acc_opts);
        dispatch_r</*kFast3=*/false>(p, [&](auto r_tag) {
          constexpr int R = decltype(r_tag)::value;
          exec(WFreqKernel<R, in_t, g_t, acc_t>{p, lanes, grad.const_data_ptr<g_t>(), x.const_data_ptr<in_t>(),
                                                index.const_data_ptr<int64_t>(), w.const_data_ptr<acc_t>(),
                                                pos.const_data_ptr<int>(), ph, g, partial.mutable_data_ptr<acc_t>()},
               pairs * p.C * lanes);
        });
        red = partial.sum(2, /*keepdim=*/false, at::kDouble).view({p.M, p.K, p.C, NF});  // (M, K, C, 64)
        if (p.Cw == 1) red = red.sum(2, /*keepdim=*/true);
      }
      gw.copy_(red);
    }
  });
  return {gx, gw};
}

}  // namespace gpu
}  // namespace fastmix
