// CUDA kernels of the fused hybrid mask (fastmix::mix_fwd / fastmix::mix_bwd), the GPU twin of
// csrc/cpu/mix.cpp: same geometry, same zero-weight skipping, same sign hash (csrc/sign.h).
//
// Every output block (m, c, I, J) is  C = A_I @ P @ B_J^T  with P an R x R' source patch. R = 8 is the
// plain 8x8 DCT (freq_mix; frontend with upsample=1): the kernels then use the DCT matrix from constant
// memory (FIX = 8, every loop unrolled, the 64 coefficients in registers). R < 8 is the frontend with
// bilinear upsampling folded into A_I and B_J (read from the geometry tensors).
//
// Layout of the work: one thread per output block. Threads of a warp take consecutive blocks q = I*Wb + J
// of one (m, c) plane, and an output channel plane is (Hb, Wb) contiguous, so every one of the 64 stores
// of a thread is coalesced across the warp (32 consecutive values). Reads are 8 contiguous values per
// patch row. Memory-bound by design: the arithmetic (1024 FMA per 8x8 transform) is far below the
// H100's FP32 rate at the bytes each block moves.
//
// Backward in x is deterministic: partners are gathered through an inverse index (a stable argsort of
// the partner index, built with torch ops on the stream: no host sync), never scattered with atomics.
// Backward in weight: one CTA per (m, c, t) reduces over the plane's blocks; partial sums per colour
// are reduced by torch (deterministic). No host syncs anywhere: CUDA-graph capturable.
//
// Measured on an H100 (benches/results/h100/run1_afb9c80, N = 512, 3x112x112, fp32): correct, capturable;
// freq_mix (k = 6) forward 0.34 ms, x + weight gradients 2.03 ms; frontend (x8, k = 4) forward 13.6 ms,
// x + weight gradients 119 ms, against Triton's 4.8 and 3.7 ms then. ptxas gives the fp32 forward kernels
// 238-255 registers per thread (2 blocks of 128 threads per SM); not profiled further. Triton is the
// default GPU backend (fastmix/_backend.py).
#include <ATen/ATen.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cstdint>

#include "../sign.h"

namespace fastmix {
namespace {

constexpr int BS = 8;
constexpr int NF = 64;
constexpr int kThreads = 128;

// Orthonormal 8x8 DCT-II matrix D[u][x] (fastmix.dct_matrix), in both precisions.
__constant__ double kDctD[NF] = {
    0.35355339059327379, 0.35355339059327379,  0.35355339059327379,   0.35355339059327379,   0.35355339059327379,
    0.35355339059327379, 0.35355339059327379,  0.35355339059327379,   0.49039264020161522,   0.41573480615127262,
    0.27778511650980114, 0.097545161008064166, -0.097545161008064096, -0.27778511650980098,  -0.41573480615127267,
    -0.49039264020161522, 0.46193976625564337, 0.19134171618254492,   -0.19134171618254486,  -0.46193976625564337,
    -0.46193976625564342, -0.19134171618254517, 0.191341716182545,    0.46193976625564326,   0.41573480615127262,
    -0.097545161008064096, -0.49039264020161522, -0.27778511650980109, 0.27778511650980092,  0.49039264020161522,
    0.097545161008064388, -0.41573480615127256, 0.35355339059327379,  -0.35355339059327373,  -0.35355339059327384,
    0.35355339059327368, 0.35355339059327384,  -0.35355339059327334,  -0.35355339059327356,  0.35355339059327329,
    0.27778511650980114, -0.49039264020161522, 0.097545161008064152,  0.41573480615127273,   -0.41573480615127256,
    -0.097545161008064013, 0.49039264020161533, -0.27778511650980076, 0.19134171618254492,   -0.46193976625564342,
    0.46193976625564326, -0.19134171618254495, -0.19134171618254528,  0.46193976625564337,   -0.4619397662556432,
    0.19134171618254478, 0.097545161008064166, -0.27778511650980109,  0.41573480615127273,   -0.49039264020161533,
    0.49039264020161522, -0.41573480615127251, 0.27778511650980076,   -0.097545161008064291};
__constant__ float kDctF[NF] = {
    0.35355339059327379f, 0.35355339059327379f,  0.35355339059327379f,   0.35355339059327379f,   0.35355339059327379f,
    0.35355339059327379f, 0.35355339059327379f,  0.35355339059327379f,   0.49039264020161522f,   0.41573480615127262f,
    0.27778511650980114f, 0.097545161008064166f, -0.097545161008064096f, -0.27778511650980098f,  -0.41573480615127267f,
    -0.49039264020161522f, 0.46193976625564337f, 0.19134171618254492f,   -0.19134171618254486f,  -0.46193976625564337f,
    -0.46193976625564342f, -0.19134171618254517f, 0.191341716182545f,    0.46193976625564326f,   0.41573480615127262f,
    -0.097545161008064096f, -0.49039264020161522f, -0.27778511650980109f, 0.27778511650980092f,  0.49039264020161522f,
    0.097545161008064388f, -0.41573480615127256f, 0.35355339059327379f,  -0.35355339059327373f,  -0.35355339059327384f,
    0.35355339059327368f, 0.35355339059327384f,  -0.35355339059327334f,  -0.35355339059327356f,  0.35355339059327329f,
    0.27778511650980114f, -0.49039264020161522f, 0.097545161008064152f,  0.41573480615127273f,   -0.41573480615127256f,
    -0.097545161008064013f, 0.49039264020161533f, -0.27778511650980076f, 0.19134171618254492f,   -0.46193976625564342f,
    0.46193976625564326f, -0.19134171618254495f, -0.19134171618254528f,  0.46193976625564337f,   -0.4619397662556432f,
    0.19134171618254478f, 0.097545161008064166f, -0.27778511650980109f,  0.41573480615127273f,   -0.49039264020161533f,
    0.49039264020161522f, -0.41573480615127251f, 0.27778511650980076f,   -0.097545161008064291f};

template <typename acc_t>
__device__ __forceinline__ acc_t dct(int i) {
  if constexpr (std::is_same_v<acc_t, double>)
    return kDctD[i];
  else
    return kDctF[i];
}

// Everything about one call that every thread needs, passed by value.
struct Params {
  int64_t N, M;
  int C, H, W, K, Cw, n_kept, Hb, Wb, R, Rc;
  bool per_image, pixels, use_seed;
  uint32_t key;
};

template <typename acc_t>
struct Geo {
  const acc_t* rmat;  // (Hb, 8, R)
  const int64_t* rstart;
  const acc_t* cmat;  // (Wb, 8, Rc)
  const int64_t* cstart;
};

// C = A_I P B_J^T in place on a 64-register tile (P[a*8+b] for a < ra, b < rb; C[u*8+v] after).
template <int FIX, typename acc_t>
__device__ __forceinline__ void forward_transform(acc_t (&P)[NF], const Params& p, const Geo<acc_t>& g, int I, int J) {
  const int ra = FIX ? FIX : p.R, rb = FIX ? FIX : p.Rc;
  const acc_t* B = g.cmat + static_cast<int64_t>(J) * BS * rb;  // B[v][b]
  const acc_t* A = g.rmat + static_cast<int64_t>(I) * BS * ra;  // A[u][a]
  // Rows: T[a][v] = sum_b P[a][b] B[v][b]
#pragma unroll
  for (int a = 0; a < BS; ++a) {
    if (a >= ra) break;
    acc_t row[BS];
#pragma unroll
    for (int v = 0; v < BS; ++v) {
      acc_t s = 0;
#pragma unroll
      for (int b = 0; b < BS; ++b) {
        if (b >= rb) break;
        const acc_t bv = FIX ? dct<acc_t>(v * BS + b) : __ldg(B + v * rb + b);
        s += P[a * BS + b] * bv;
      }
      row[v] = s;
    }
#pragma unroll
    for (int v = 0; v < BS; ++v) P[a * BS + v] = row[v];
  }
  // Columns: C[u][v] = sum_a A[u][a] T[a][v]
#pragma unroll
  for (int v = 0; v < BS; ++v) {
    acc_t col[BS];
#pragma unroll
    for (int u = 0; u < BS; ++u) {
      acc_t s = 0;
#pragma unroll
      for (int a = 0; a < BS; ++a) {
        if (a >= ra) break;
        const acc_t av = FIX ? dct<acc_t>(u * BS + a) : __ldg(A + u * ra + a);
        s += av * P[a * BS + v];
      }
      col[u] = s;
    }
#pragma unroll
    for (int u = 0; u < BS; ++u) P[u * BS + v] = col[u];
  }
}

// dP = A_I^T G B_J in place (the adjoint; for the DCT geometry, the block inverse). dP[a*8+b], a < ra, b < rb.
template <int FIX, typename acc_t>
__device__ __forceinline__ void adjoint_transform(acc_t (&G)[NF], const Params& p, const Geo<acc_t>& g, int I, int J) {
  const int ra = FIX ? FIX : p.R, rb = FIX ? FIX : p.Rc;
  const acc_t* B = g.cmat + static_cast<int64_t>(J) * BS * rb;
  const acc_t* A = g.rmat + static_cast<int64_t>(I) * BS * ra;
  // Rows: T[u][b] = sum_v G[u][v] B[v][b]
#pragma unroll
  for (int u = 0; u < BS; ++u) {
    acc_t row[BS];
#pragma unroll
    for (int b = 0; b < BS; ++b) {
      acc_t s = 0;
      if (b < rb) {
#pragma unroll
        for (int v = 0; v < BS; ++v) s += G[u * BS + v] * (FIX ? dct<acc_t>(v * BS + b) : __ldg(B + v * rb + b));
      }
      row[b] = s;
    }
#pragma unroll
    for (int b = 0; b < BS; ++b) G[u * BS + b] = row[b];
  }
  // Columns: dP[a][b] = sum_u A[u][a] T[u][b]
#pragma unroll
  for (int b = 0; b < BS; ++b) {
    acc_t col[BS];
#pragma unroll
    for (int a = 0; a < BS; ++a) {
      acc_t s = 0;
      if (a < ra) {
#pragma unroll
        for (int u = 0; u < BS; ++u) s += (FIX ? dct<acc_t>(u * BS + a) : __ldg(A + u * ra + a)) * G[u * BS + b];
      }
      col[a] = s;
    }
#pragma unroll
    for (int a = 0; a < BS; ++a) G[a * BS + b] = col[a];
  }
}

// Bit a set: column a of the block's (8, r) matrix has a non-zero. Every block's patch has the largest
// extent R, so a block whose interpolation span is shorter includes source pixels of weight exactly 0;
// they are not read, so that a NaN there cannot reach the block (0 * NaN = NaN). All set for the DCT.
template <int FIX, typename acc_t>
__device__ __forceinline__ unsigned patch_mask(const acc_t* mat, int r) {
  if (FIX) return 0xFFu;
  unsigned bits = 0;
  for (int a = 0; a < r; ++a) {
    bool any = false;
    for (int u = 0; u < BS; ++u) any |= __ldg(mat + u * r + a) != acc_t(0);
    bits |= static_cast<unsigned>(any) << a;
  }
  return bits;
}

template <int FIX, typename in_t, typename acc_t>
__device__ __forceinline__ void add_patch(acc_t (&P)[NF], const in_t* __restrict__ src, int64_t ld, int ra, int rb,
                                          unsigned rmask, unsigned cmask, acc_t w) {
#pragma unroll
  for (int a = 0; a < BS; ++a) {
    if (a >= ra) break;
    if (!FIX && !((rmask >> a) & 1u)) continue;
#pragma unroll
    for (int b = 0; b < BS; ++b) {
      if (b >= rb) break;
      if (!FIX && !((cmask >> b) & 1u)) continue;
      P[a * BS + b] += w * static_cast<acc_t>(src[a * ld + b]);
    }
  }
}

__device__ __forceinline__ int64_t checked_partner(const int64_t* idx, int64_t e, int64_t N) {
  const int64_t n = idx[e];
  CUDA_KERNEL_ASSERT(n >= 0 && n < N);  // the Python layer validates; this guards direct op calls
  return n;
}

// ------------------------------------------------------------------------------------------------
// Forward: one thread per output block (m, c, I, J).
// ------------------------------------------------------------------------------------------------
template <int FIX, typename in_t, typename out_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) _mix_fwd_kernel(const Params p, const in_t* __restrict__ x,
                                                            const int64_t* __restrict__ idx,
                                                            const acc_t* __restrict__ w, const int* __restrict__ pos,
                                                            const Geo<acc_t> g, out_t* __restrict__ out) {
  const int64_t plane = static_cast<int64_t>(p.Hb) * p.Wb;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= p.M * p.C * plane) return;
  const int64_t q = tid % plane, mc = tid / plane;
  const int c = static_cast<int>(mc % p.C);
  const int64_t m = mc / p.C;
  const int I = static_cast<int>(q / p.Wb), J = static_cast<int>(q % p.Wb);
  const int ra = FIX ? FIX : p.R, rb = FIX ? FIX : p.Rc;
  const int64_t r0 = g.rstart[I], s0 = g.cstart[J];
  const unsigned rmask = patch_mask<FIX>(g.rmat + static_cast<int64_t>(I) * BS * ra, ra);
  const unsigned cmask = patch_mask<FIX>(g.cmat + static_cast<int64_t>(J) * BS * rb, rb);

  acc_t Cf[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) Cf[f] = 0;
  if (p.per_image) {
    // Mix the patches, transform once (the transform is linear).
    for (int t = 0; t < p.K; ++t) {
      const acc_t wt = w[m * p.K + t];
      if (wt == acc_t(0)) continue;  // padded partner: skipped
      const int64_t n = checked_partner(idx, m * p.K + t, p.N);
      add_patch<FIX>(Cf, x + ((n * p.C + c) * p.H + r0) * p.W + s0, p.W, ra, rb, rmask, cmask, wt);
    }
    forward_transform<FIX>(Cf, p, g, I, J);
  } else {
    const int cw = p.Cw == 1 ? 0 : c;
    for (int t = 0; t < p.K; ++t) {
      const acc_t* wr = w + ((m * p.K + t) * p.Cw + cw) * NF;
      const int64_t n = checked_partner(idx, m * p.K + t, p.N);
      acc_t T[NF];
#pragma unroll
      for (int f = 0; f < NF; ++f) T[f] = 0;
      add_patch<FIX>(T, x + ((n * p.C + c) * p.H + r0) * p.W + s0, p.W, ra, rb, rmask, cmask, acc_t(1));
      forward_transform<FIX>(T, p, g, I, J);
#pragma unroll
      for (int f = 0; f < NF; ++f) {
        const acc_t wf = wr[f];
        Cf[f] += wf != acc_t(0) ? wf * T[f] : acc_t(0);
      }
    }
  }

  const int64_t chan0 = static_cast<int64_t>(c) * NF;
  if (p.pixels) {
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      if (pos[chan0 + f] < 0)
        Cf[f] = 0;
      else if (p.use_seed &&
               sign_flip(plane_hash(p.key, static_cast<uint32_t>(m), static_cast<uint32_t>(chan0 + f)), I, J))
        Cf[f] = -Cf[f];
    }
    adjoint_transform<FIX>(Cf, p, g, I, J);  // FIX == 8 here: the block inverse
    out_t* dst = out + ((m * p.C + c) * p.H + r0) * p.W + s0;
#pragma unroll
    for (int a = 0; a < BS; ++a)
#pragma unroll
      for (int b = 0; b < BS; ++b) dst[a * p.W + b] = static_cast<out_t>(Cf[a * BS + b]);
    return;
  }
#pragma unroll
  for (int f = 0; f < NF; ++f) {
    const int slot = pos[chan0 + f];
    if (slot < 0) continue;
    acc_t v = Cf[f];
    if (p.use_seed && sign_flip(plane_hash(p.key, static_cast<uint32_t>(m), static_cast<uint32_t>(chan0 + f)), I, J))
      v = -v;
    out[(m * p.n_kept + slot) * plane + q] = static_cast<out_t>(v);
  }
}

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

// The gradient with respect to the mixed coefficients of block (m, c, I, J), zero where removed.
template <int FIX, typename g_t, typename acc_t>
__device__ __forceinline__ void load_coef_grad(acc_t (&G)[NF], const Params& p, const g_t* __restrict__ grad,
                                               const int* __restrict__ pos, const Geo<acc_t>& g, int64_t m, int c,
                                               int I, int J, int64_t q) {
  const int64_t plane = static_cast<int64_t>(p.Hb) * p.Wb;
  const int64_t chan0 = static_cast<int64_t>(c) * NF;
  if (p.pixels) {
    // d(pixels)/d(coef) is the block inverse, whose adjoint is the DCT.
    const g_t* src = grad + ((m * p.C + c) * p.H + static_cast<int64_t>(I) * BS) * p.W + static_cast<int64_t>(J) * BS;
#pragma unroll
    for (int a = 0; a < BS; ++a)
#pragma unroll
      for (int b = 0; b < BS; ++b) G[a * BS + b] = static_cast<acc_t>(src[a * p.W + b]);
    forward_transform<BS>(G, p, g, I, J);
#pragma unroll
    for (int f = 0; f < NF; ++f)
      if (pos[chan0 + f] < 0) G[f] = 0;
  } else {
#pragma unroll
    for (int f = 0; f < NF; ++f) {
      const int slot = pos[chan0 + f];
      G[f] = slot < 0 ? acc_t(0) : static_cast<acc_t>(grad[(m * p.n_kept + slot) * plane + q]);
    }
  }
  if (p.use_seed) {
#pragma unroll
    for (int f = 0; f < NF; ++f)
      if (sign_flip(plane_hash(p.key, static_cast<uint32_t>(m), static_cast<uint32_t>(chan0 + f)), I, J)) G[f] = -G[f];
  }
}

// One thread per source block (n, c, I, J): gather every (m, t) that read image n through the inverse index,
// accumulate the weighted coefficient gradients, one adjoint transform. FIX == 8 tiles do not overlap, so
// the thread writes its tile of grad_x; otherwise it writes its R x R' patch to `patches` for the gather below.
template <int FIX, typename in_t, typename g_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) _mix_bwd_x_kernel(const Params p, const g_t* __restrict__ grad,
                                                              const int64_t* __restrict__ order,
                                                              const int64_t* __restrict__ offs,
                                                              const acc_t* __restrict__ w, const int* __restrict__ pos,
                                                              const Geo<acc_t> g, in_t* __restrict__ gx,
                                                              acc_t* __restrict__ patches) {
  const int64_t plane = static_cast<int64_t>(p.Hb) * p.Wb;
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= p.N * p.C * plane) return;
  const int64_t q = tid % plane, nc = tid / plane;
  const int c = static_cast<int>(nc % p.C);
  const int64_t n = nc / p.C;
  const int I = static_cast<int>(q / p.Wb), J = static_cast<int>(q % p.Wb);
  const int ra = FIX ? FIX : p.R, rb = FIX ? FIX : p.Rc;

  acc_t Gs[NF];
#pragma unroll
  for (int f = 0; f < NF; ++f) Gs[f] = 0;
  const int cw = p.Cw == 1 ? 0 : c;
  for (int64_t e = offs[n]; e < offs[n + 1]; ++e) {
    const int64_t pair = order[e], m = pair / p.K;
    acc_t G[NF];
    if (p.per_image) {
      const acc_t wt = w[pair];
      if (wt == acc_t(0)) continue;
      load_coef_grad<FIX>(G, p, grad, pos, g, m, c, I, J, q);
#pragma unroll
      for (int f = 0; f < NF; ++f) Gs[f] += wt * G[f];
    } else {
      const acc_t* wr = w + (pair * p.Cw + cw) * NF;
      load_coef_grad<FIX>(G, p, grad, pos, g, m, c, I, J, q);
#pragma unroll
      for (int f = 0; f < NF; ++f) Gs[f] += wr[f] != acc_t(0) ? wr[f] * G[f] : acc_t(0);
    }
  }
  adjoint_transform<FIX>(Gs, p, g, I, J);
  if (FIX) {
    in_t* dst = gx + ((n * p.C + c) * p.H + g.rstart[I]) * p.W + g.cstart[J];
#pragma unroll
    for (int a = 0; a < BS; ++a)
#pragma unroll
      for (int b = 0; b < BS; ++b) dst[a * p.W + b] = static_cast<in_t>(Gs[a * BS + b]);
  } else {
    acc_t* dst = patches + tid * (ra * rb);
#pragma unroll
    for (int a = 0; a < BS; ++a) {
      if (a >= ra) break;
#pragma unroll
      for (int b = 0; b < BS; ++b) {
        if (b >= rb) break;
        dst[a * rb + b] = Gs[a * BS + b];
      }
    }
  }
}

// First block whose patch reaches past `y`: patches start at non-decreasing offsets.
__device__ __forceinline__ int first_cover(const int64_t* start, int nb, int r, int64_t y) {
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

// Overlapping patches (frontend): one thread per source pixel sums the patches that cover it, in a fixed
// order, so the result is deterministic.
template <typename in_t, typename acc_t>
__global__ void __launch_bounds__(kThreads) _mix_bwd_x_gather_kernel(const Params p, const Geo<acc_t> g,
                                                                     const acc_t* __restrict__ patches,
                                                                     in_t* __restrict__ gx) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid >= p.N * p.C * p.H * p.W) return;
  const int64_t xw = tid % p.W, yh = (tid / p.W) % p.H, nc = tid / (static_cast<int64_t>(p.H) * p.W);
  const int64_t plane = static_cast<int64_t>(p.Hb) * p.Wb;
  acc_t s = 0;
  for (int I = first_cover(g.rstart, p.Hb, p.R, yh); I < p.Hb && g.rstart[I] <= yh; ++I)
    for (int J = first_cover(g.cstart, p.Wb, p.Rc, xw); J < p.Wb && g.cstart[J] <= xw; ++J) {
      const int64_t blk = nc * plane + static_cast<int64_t>(I) * p.Wb + J;
      s += patches[blk * (p.R * p.Rc) + (yh - g.rstart[I]) * p.Rc + (xw - g.cstart[J])];
    }
  gx[tid] = static_cast<in_t>(s);
}

// Weight gradient: one CTA of 64 threads (one per frequency) per (m, c, t), looping over the plane's blocks.
// partial[m, c, t, f] = sum over blocks of G_m[f] * coef_t[f] (zero where the weight is zero); torch then
// sums over colours (and frequencies for per-image weights).
template <int FIX, typename in_t, typename g_t, typename acc_t>
__global__ void __launch_bounds__(NF) _mix_bwd_w_kernel(const Params p, const g_t* __restrict__ grad,
                                                        const in_t* __restrict__ x, const int64_t* __restrict__ idx,
                                                        const acc_t* __restrict__ w, const int* __restrict__ pos,
                                                        const Geo<acc_t> g, acc_t* __restrict__ partial) {
  __shared__ acc_t tile[NF], tmp[NF], gtile[NF], gtmp[NF];
  const int f = threadIdx.x, u = f / BS, v = f % BS;
  const int64_t mct = blockIdx.x;
  const int t = static_cast<int>(mct % p.K);
  const int c = static_cast<int>((mct / p.K) % p.C);
  const int64_t m = mct / (static_cast<int64_t>(p.K) * p.C);
  const int ra = FIX ? FIX : p.R, rb = FIX ? FIX : p.Rc;
  const acc_t wf = p.per_image ? w[m * p.K + t] : w[((m * p.K + t) * p.Cw + (p.Cw == 1 ? 0 : c)) * NF + f];
  const int64_t n = checked_partner(idx, m * p.K + t, p.N);
  const int64_t plane = static_cast<int64_t>(p.Hb) * p.Wb;
  const int64_t chan = static_cast<int64_t>(c) * NF + f;
  const int slot = pos[chan];
  const uint32_t ph = p.use_seed ? plane_hash(p.key, static_cast<uint32_t>(m), static_cast<uint32_t>(chan)) : 0u;
  acc_t acc = 0;
  for (int64_t q = 0; q < plane; ++q) {
    const int I = static_cast<int>(q / p.Wb), J = static_cast<int>(q % p.Wb);
    const int64_t r0 = g.rstart[I], s0 = g.cstart[J];
    // Partner patch (zero-padded to 8x8), thread f -> element (u, v).
    const bool live = u < ra && v < rb &&
                      (FIX || ((patch_mask<FIX>(g.rmat + static_cast<int64_t>(I) * BS * ra, ra) >> u) & 1u &&
                               (patch_mask<FIX>(g.cmat + static_cast<int64_t>(J) * BS * rb, rb) >> v) & 1u));
    tile[f] = live ? static_cast<acc_t>(x[((n * p.C + c) * p.H + r0 + u) * p.W + s0 + v]) : acc_t(0);
    if (p.pixels)
      gtile[f] = static_cast<acc_t>(grad[((m * p.C + c) * p.H + r0 + u) * p.W + s0 + v]);
    __syncthreads();
    // Rows: tmp[a][v] = sum_b tile[a][b] B[v][b]   (thread f -> a = u)
    {
      acc_t s = 0, gs = 0;
#pragma unroll
      for (int b = 0; b < BS; ++b) {
        const acc_t bv = FIX ? dct<acc_t>(v * BS + b) : (b < rb ? g.cmat[(static_cast<int64_t>(J) * BS + v) * rb + b] : acc_t(0));
        s += tile[u * BS + b] * bv;
        if (p.pixels) gs += gtile[u * BS + b] * dct<acc_t>(v * BS + b);
      }
      tmp[f] = s;
      gtmp[f] = gs;
    }
    __syncthreads();
    acc_t coef = 0, gc = 0;
#pragma unroll
    for (int a = 0; a < BS; ++a) {
      const acc_t av = FIX ? dct<acc_t>(u * BS + a) : (a < ra ? g.rmat[(static_cast<int64_t>(I) * BS + u) * ra + a] : acc_t(0));
      coef += av * tmp[a * BS + v];
      if (p.pixels) gc += dct<acc_t>(u * BS + a) * gtmp[a * BS + v];
    }
    acc_t G;
    if (slot < 0)
      G = 0;
    else
      G = p.pixels ? gc : static_cast<acc_t>(grad[(m * p.n_kept + slot) * plane + q]);
    if (p.use_seed && sign_flip(ph, I, J)) G = -G;
    acc += G * coef;
    __syncthreads();  // tile/tmp are rewritten by the next block
  }
  partial[mct * NF + f] = wf != acc_t(0) ? acc : acc_t(0);
}

// ------------------------------------------------------------------------------------------------
// Launchers
// ------------------------------------------------------------------------------------------------

Params make_params(const at::Tensor& x, const at::Tensor& index, const at::Tensor& weight, int64_t n_kept, int64_t seed,
                   bool use_seed, bool pixels, const at::Tensor& row_mat, const at::Tensor& col_mat) {
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

inline unsigned grid_for(int64_t n) { return static_cast<unsigned>((n + kThreads - 1) / kThreads); }

// Calls f(in_tag, out_tag) for the compiled dtype pairs: float64 -> float64 (for checks) and
// {f32, f16, bf16} -> {f32, f16, bf16}. Generic lambdas keep the other pairs from being instantiated.
template <typename F>
void dispatch_reduced(at::ScalarType t, const char* name, F&& f) {
  switch (t) {
    case at::kFloat: return f(float{});
    case at::kHalf: return f(at::Half{});
    case at::kBFloat16: return f(at::BFloat16{});
    default: TORCH_CHECK(false, name, ": unsupported dtype ", t);
  }
}

template <typename F>
void dispatch_io(at::ScalarType in, at::ScalarType out, const char* name, F&& f) {
  if (in == at::kDouble || out == at::kDouble) {
    TORCH_CHECK(in == out, name, ": float64 is supported only as float64 in and out");
    return f(double{}, double{});
  }
  dispatch_reduced(in, name, [&](auto in_tag) { dispatch_reduced(out, name, [&](auto out_tag) { f(in_tag, out_tag); }); });
}

at::Tensor mix_fwd_cuda(const at::Tensor& x_in, const at::Tensor& index_in, const at::Tensor& weight_in,
                        const at::Tensor& pos_in, int64_t n_kept, int64_t seed, bool use_seed, bool pixels,
                        const at::Tensor& row_mat, const at::Tensor& row_start, const at::Tensor& col_mat,
                        const at::Tensor& col_start, std::optional<at::ScalarType> out_dtype) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), index = index_in.contiguous(), pos = pos_in.to(at::kInt).contiguous();
  Params p = make_params(x, index, weight_in, n_kept, seed, use_seed, pixels, row_mat, col_mat);
  const at::ScalarType od = out_dtype.value_or(x.scalar_type());
  at::Tensor out = pixels ? at::empty({p.M, p.C, p.H, p.W}, x.options().dtype(od))
                          : at::empty({p.M, n_kept, p.Hb, p.Wb}, x.options().dtype(od));
  if (out.numel() == 0) return out;
  const int64_t threads = p.M * p.C * static_cast<int64_t>(p.Hb) * p.Wb;
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool fixed = p.R == BS && p.Rc == BS;
  dispatch_io(x.scalar_type(), od, "mix_fwd_cuda", [&](auto in_tag, auto out_tag) {
    using in_t = decltype(in_tag);
    using out_t = decltype(out_tag);
    using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
    const auto at_acc = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
    const at::Tensor w = weight_in.to(at_acc).contiguous();
    const at::Tensor rm = row_mat.to(at_acc).contiguous(), cm = col_mat.to(at_acc).contiguous();
    const at::Tensor rs = row_start.to(at::kLong).contiguous(), cs = col_start.to(at::kLong).contiguous();
    const auto g = make_geo<acc_t>(rm, rs, cm, cs);
    auto kernel = fixed ? _mix_fwd_kernel<BS, in_t, out_t, acc_t> : _mix_fwd_kernel<0, in_t, out_t, acc_t>;
    kernel<<<grid_for(threads), kThreads, 0, stream>>>(p, x.const_data_ptr<in_t>(), index.const_data_ptr<int64_t>(),
                                                       w.const_data_ptr<acc_t>(), pos.const_data_ptr<int>(), g,
                                                       out.mutable_data_ptr<out_t>());
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  });
  return out;
}

std::tuple<at::Tensor, at::Tensor> mix_bwd_cuda(const at::Tensor& grad_in, const at::Tensor& x_in,
                                                const at::Tensor& index_in, const at::Tensor& weight_in,
                                                const at::Tensor& pos_in, int64_t seed, bool use_seed, bool pixels,
                                                const at::Tensor& row_mat, const at::Tensor& row_start,
                                                const at::Tensor& col_mat, const at::Tensor& col_start, bool need_x,
                                                bool need_w) {
  const c10::cuda::CUDAGuard guard(x_in.device());
  const at::Tensor x = x_in.contiguous(), index = index_in.contiguous(), grad = grad_in.contiguous();
  const at::Tensor pos = pos_in.to(at::kInt).contiguous();
  Params p = make_params(x, index, weight_in, pixels ? 0 : grad.size(1), seed, use_seed, pixels, row_mat, col_mat);
  at::Tensor gx = need_x ? at::zeros_like(x) : x.new_empty({0});
  at::Tensor gw = need_w ? at::zeros_like(weight_in) : weight_in.new_empty({0});
  if (p.M == 0 || grad.numel() == 0 || !(need_x || need_w)) return {gx, gw};
  auto stream = c10::cuda::getCurrentCUDAStream();
  const bool fixed = p.R == BS && p.Rc == BS;
  const int64_t plane = static_cast<int64_t>(p.Hb) * p.Wb;
  dispatch_io(x.scalar_type(), grad.scalar_type(), "mix_bwd_cuda", [&](auto in_tag, auto g_tag) {
    using in_t = decltype(in_tag);
    using g_t = decltype(g_tag);
    using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
    const auto at_acc = std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
    const at::Tensor w = weight_in.to(at_acc).contiguous();
    const at::Tensor rm = row_mat.to(at_acc).contiguous(), cm = col_mat.to(at_acc).contiguous();
    const at::Tensor rs = row_start.to(at::kLong).contiguous(), cs = col_start.to(at::kLong).contiguous();
    const auto g = make_geo<acc_t>(rm, rs, cm, cs);
    if (need_x) {
      // Inverse index on the stream: order lists (m, t) pairs grouped by image, offs[n]..offs[n+1] image n's.
      const at::Tensor flat = index.reshape({-1});
      const at::Tensor order = std::get<1>(flat.sort(/*stable=*/true, /*dim=*/0, /*descending=*/false));
      const at::Tensor sorted = flat.index_select(0, order);
      const at::Tensor offs = at::searchsorted(sorted, at::arange(p.N + 1, flat.options()));
      const int64_t threads = p.N * p.C * plane;
      if (fixed) {
        _mix_bwd_x_kernel<BS, in_t, g_t, acc_t><<<grid_for(threads), kThreads, 0, stream>>>(
            p, grad.const_data_ptr<g_t>(), order.const_data_ptr<int64_t>(), offs.const_data_ptr<int64_t>(),
            w.const_data_ptr<acc_t>(), pos.const_data_ptr<int>(), g, gx.mutable_data_ptr<in_t>(), nullptr);
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      } else {
        at::Tensor patches = at::empty({threads * p.R * p.Rc}, x.options().dtype(at_acc));
        _mix_bwd_x_kernel<0, in_t, g_t, acc_t><<<grid_for(threads), kThreads, 0, stream>>>(
            p, grad.const_data_ptr<g_t>(), order.const_data_ptr<int64_t>(), offs.const_data_ptr<int64_t>(),
            w.const_data_ptr<acc_t>(), pos.const_data_ptr<int>(), g, gx.mutable_data_ptr<in_t>(),
            patches.mutable_data_ptr<acc_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
        _mix_bwd_x_gather_kernel<in_t, acc_t><<<grid_for(x.numel()), kThreads, 0, stream>>>(
            p, g, patches.const_data_ptr<acc_t>(), gx.mutable_data_ptr<in_t>());
        C10_CUDA_KERNEL_LAUNCH_CHECK();
      }
    }
    if (need_w) {
      at::Tensor partial = at::empty({p.M, p.C, p.K, NF}, x.options().dtype(at_acc));
      const int64_t ctas = p.M * p.C * p.K;
      auto kernel = fixed ? _mix_bwd_w_kernel<BS, in_t, g_t, acc_t> : _mix_bwd_w_kernel<0, in_t, g_t, acc_t>;
      kernel<<<static_cast<unsigned>(ctas), NF, 0, stream>>>(p, grad.const_data_ptr<g_t>(), x.const_data_ptr<in_t>(),
                                                              index.const_data_ptr<int64_t>(), w.const_data_ptr<acc_t>(),
                                                              pos.const_data_ptr<int>(), g,
                                                              partial.mutable_data_ptr<acc_t>());
      C10_CUDA_KERNEL_LAUNCH_CHECK();
      at::Tensor red;
      if (p.per_image)
        red = partial.sum({1, 3});  // (M, K)
      else if (p.Cw == 1)
        red = partial.sum(1).unsqueeze(2);  // (M, K, 1, 64)
      else
        red = partial.permute({0, 2, 1, 3});  // (M, K, C, 64)
      gw.copy_(red);
    }
  });
  return {gx, gw};
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmix, CUDA, m) {
  m.impl("mix_fwd", &mix_fwd_cuda);
  m.impl("mix_bwd", &mix_bwd_cuda);
}

}  // namespace fastmix
