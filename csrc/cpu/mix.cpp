// CPU kernels of the fused hybrid mask (fastmix::mix_fwd / fastmix::mix_bwd).
//
// Every output block (m, c, I, J) is  C = A_I @ P @ B_J^T  with P an R x R' source patch:
//   * freq_mix:  A_I = B_J = D (8x8 DCT), patch = the 8x8 tile itself;
//   * frontend:  A_I = D @ (bilinear rows of block I), patch = the few source pixels those rows touch,
//                so the upsampled image never exists.
// Per-image weights mix the patches first and transform once (the DCT is linear); per-frequency
// weights transform each partner and weight the coefficients. All transforms are 8-wide loops that the
// compiler vectorises (-O3, once per CPU capability: capability.h; dispatch.cpp registers the ops), one task per (m, c, block row) in the forward, per (n, c) in
// the x backward (deterministic: partners are gathered through an inverse index, no atomics) and per m
// in the weight backward.
#include <ATen/Dispatch.h>
#include <ATen/Parallel.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cstring>
#include <vector>
#if defined(FASTMIX_CPU_CAP_AVX2) || defined(FASTMIX_CPU_CAP_AVX512)
#include <immintrin.h>  // the noise's table gather (apply_noise)
#endif

#include "../noise.h"
#include "../sign.h"
#include "kernels.h"
#include "vec8.h"

FASTMIX_DECLARE_CPU_KERNELS(FASTMIX_CAP_NS)

namespace fastmix {
namespace FASTMIX_CAP_NS {
namespace {

constexpr int64_t BS = 8;   // block side
constexpr int64_t NF = 64;  // frequencies per block

template <typename acc_t>
struct Geometry {
  int64_t nb = 0;          // blocks along the axis
  int64_t r = 0;           // patch extent R (<= 8)
  std::vector<acc_t> mat;  // (nb, 8, 8): mat[k][u][a], zero for a >= r
  std::vector<acc_t> tr;   // (nb, 8, 8): tr[k][a][u], the transpose
  std::vector<int64_t> start;
  // valid[k*8 + a]: column a of block k's matrix is not all zero. Every block's patch has the largest
  // extent R, so a block whose interpolation span is shorter includes source pixels whose weight is
  // exactly 0; they are not read, so that a NaN there does not reach the block (0 * NaN = NaN).
  std::vector<uint8_t> valid;

  Geometry(const at::Tensor& m_in, const at::Tensor& s_in, int64_t extent, const char* what) {
    TORCH_CHECK(m_in.dim() == 3 && m_in.size(1) == BS && m_in.size(2) >= 1 && m_in.size(2) <= BS, what,
                " matrix must be (nb, 8, R) with 1 <= R <= 8");
    TORCH_CHECK(s_in.dim() == 1 && s_in.size(0) == m_in.size(0), what, " start must be (nb,)");
    nb = m_in.size(0);
    r = m_in.size(2);
    at::Tensor m = m_in.to(at::kDouble).contiguous();
    at::Tensor s = s_in.to(at::kLong).contiguous();
    const double* mp = m.const_data_ptr<double>();
    const int64_t* sp = s.const_data_ptr<int64_t>();
    mat.assign(nb * NF, acc_t(0));
    tr.assign(nb * NF, acc_t(0));
    start.assign(sp, sp + nb);
    valid.assign(nb * BS, 0);
    for (int64_t k = 0; k < nb; ++k) {
      // A patch that leaves the image would read out of bounds: refuse instead.
      TORCH_CHECK(start[k] >= 0 && start[k] + r <= extent, what, " patch ", k, " leaves the image");
      for (int64_t u = 0; u < BS; ++u)
        for (int64_t a = 0; a < r; ++a) {
          acc_t v = static_cast<acc_t>(mp[(k * BS + u) * r + a]);
          mat[k * NF + u * BS + a] = v;
          tr[k * NF + a * BS + u] = v;
          if (v != acc_t(0)) valid[k * BS + a] = 1;
        }
    }
  }
  const acc_t* m(int64_t k) const { return mat.data() + k * NF; }
  const uint8_t* v(int64_t k) const { return valid.data() + k * BS; }
  const acc_t* t(int64_t k) const { return tr.data() + k * NF; }
};

// C = A P B^T.  A[u][a] (a < ra), P[a][b], BT[b][v] (b < rb); P rows are 8 wide. One 8-lane vector per row.
template <typename acc_t>
inline void forward_transform(const acc_t* A, const acc_t* P, const acc_t* BT, int64_t ra, int64_t rb, acc_t* C) {
  v8<acc_t> T[BS], bt[BS];
  for (int64_t b = 0; b < rb; ++b) bt[b] = vload(BT + b * BS);
  for (int64_t a = 0; a < ra; ++a) {
    v8<acc_t> row = {};
    for (int64_t b = 0; b < rb; ++b) row += P[a * BS + b] * bt[b];
    T[a] = row;
  }
  for (int64_t u = 0; u < BS; ++u) {
    v8<acc_t> row = {};
    for (int64_t a = 0; a < ra; ++a) row += A[u * BS + a] * T[a];
    vstore(C + u * BS, row);
  }
}

// dP = A^T G B, the adjoint of forward_transform.  AT[a][u], Bm[v][b] (zero for b >= rb). dP[a][b], a < ra.
template <typename acc_t>
inline void adjoint_transform(const acc_t* AT, const acc_t* G, const acc_t* Bm, int64_t ra, acc_t* dP) {
  v8<acc_t> T[BS], bm[BS];
  for (int64_t v = 0; v < BS; ++v) bm[v] = vload(Bm + v * BS);
  for (int64_t u = 0; u < BS; ++u) {
    v8<acc_t> row = {};
    for (int64_t v = 0; v < BS; ++v) row += G[u * BS + v] * bm[v];
    T[u] = row;
  }
  for (int64_t a = 0; a < ra; ++a) {
    v8<acc_t> row = {};
    for (int64_t u = 0; u < BS; ++u) row += AT[a * BS + u] * T[u];
    vstore(dP + a * BS, row);
  }
}

// C += where(w != 0, w * Ct, 0) over 64 coefficients: a zero weight skips even a NaN coefficient.
template <typename acc_t>
inline void accumulate_weighted(const acc_t* w, const acc_t* Ct, acc_t* C) {
  for (int64_t r = 0; r < BS; ++r) {
    const v8<acc_t> wv = vload(w + r * BS), cv = vload(Ct + r * BS), zero = {};
    vstore(C + r * BS, vload(C + r * BS) + (wv != zero ? wv * cv : zero));
  }
}

// Patch loads of the resampling geometry: only the rows and columns that carry a weight (see valid).
template <typename in_t, typename acc_t>
inline void load_patch_masked(const in_t* src, int64_t ld, int64_t ra, int64_t rb, const uint8_t* rv,
                              const uint8_t* cv, acc_t w, acc_t* P) {
  for (int64_t a = 0; a < ra; ++a) {
    if (!rv[a]) continue;
    for (int64_t b = 0; b < rb; ++b)
      if (cv[b]) P[a * BS + b] += w * static_cast<acc_t>(src[a * ld + b]);
  }
}

template <typename in_t, typename acc_t>
inline void load_patch(const in_t* src, int64_t ld, int64_t ra, int64_t rb, acc_t* P) {
  for (int64_t a = 0; a < ra; ++a)
    for (int64_t b = 0; b < rb; ++b) P[a * BS + b] = static_cast<acc_t>(src[a * ld + b]);
}

template <typename in_t, typename acc_t>
inline void add_patch(const in_t* src, int64_t ld, int64_t ra, int64_t rb, acc_t w, acc_t* P) {
  if constexpr (std::is_same_v<in_t, acc_t>) {
    if (rb == BS) {
      for (int64_t a = 0; a < ra; ++a) vstore(P + a * BS, vload(P + a * BS) + w * vload(src + a * ld));
      return;
    }
  }
  for (int64_t a = 0; a < ra; ++a)
    for (int64_t b = 0; b < rb; ++b) P[a * BS + b] += w * static_cast<acc_t>(src[a * ld + b]);
}

// Everything a kernel needs to know about one call, checked once.
struct Problem {
  int64_t N, C, H, W, M, K, Cw, n_kept;
  bool per_image, pixels, use_seed;
  uint32_t key;
  // Noise (fastmix/ops/noise.py): table of 2^(32 - noise_shift) float32 atoms, scale per channel id.
  bool use_noise = false;
  uint32_t noise_key = 0;
  int noise_shift = 32;
  const float* noise_scale = nullptr;
  const float* noise_table = nullptr;
};

Problem make_problem(const at::Tensor& x, const at::Tensor& index, const at::Tensor& weight, const at::Tensor& pos,
                     int64_t n_kept, int64_t seed, bool use_seed, bool pixels) {
  TORCH_CHECK(x.dim() == 4, "mix: x must be (N, C, H, W)");
  TORCH_CHECK(index.dim() == 2 && index.scalar_type() == at::kLong, "mix: index must be int64 (M, k)");
  Problem p{};
  p.N = x.size(0);
  p.C = x.size(1);
  p.H = x.size(2);
  p.W = x.size(3);
  p.M = index.size(0);
  p.K = index.size(1);
  TORCH_CHECK(p.K >= 1, "mix: k must be >= 1");
  p.per_image = weight.dim() == 2;
  if (p.per_image) {
    TORCH_CHECK(weight.size(0) == p.M && weight.size(1) == p.K, "mix: weight must be (M, k)");
    p.Cw = 1;
  } else {
    TORCH_CHECK(weight.dim() == 4 && weight.size(0) == p.M && weight.size(1) == p.K && weight.size(3) == NF &&
                    (weight.size(2) == 1 || weight.size(2) == p.C),
                "mix: weight must be (M, k) or (M, k, 1 or C, 64)");
    p.Cw = weight.size(2);
  }
  TORCH_CHECK(pos.dim() == 1 && pos.size(0) == p.C * NF && pos.scalar_type() == at::kInt, "mix: pos must be int32 (C*64,)");
  p.n_kept = n_kept;
  p.pixels = pixels;
  p.use_seed = use_seed;
  TORCH_CHECK(!use_seed || seed >= 0, "mix: seed must be >= 0");
  p.key = seed_key(static_cast<uint64_t>(seed));
  return p;
}

void check_index_range(const at::Tensor& index, int64_t n) {
  const int64_t* ip = index.const_data_ptr<int64_t>();
  for (int64_t i = 0; i < index.numel(); ++i)
    TORCH_CHECK(ip[i] >= 0 && ip[i] < n, "mix: index value ", ip[i], " outside [0, ", n, ")");
}

void check_pos(const at::Tensor& pos, int64_t n_kept) {
  const int32_t* pp = pos.const_data_ptr<int32_t>();
  for (int64_t i = 0; i < pos.numel(); ++i)
    TORCH_CHECK(pp[i] >= -1 && pp[i] < n_kept, "mix: pos value ", pp[i], " outside [-1, ", n_kept, ")");
}

// plane_hash for every (m, channel id), pre-mixed (csrc/sign.h): M*C*64 words, so that kernels pay one
// short hash per coefficient (apply_signs, apply_noise). key: the sign key, or the noise key.
std::vector<uint32_t> plane_table(const Problem& p, uint32_t key, bool use) {
  std::vector<uint32_t> t;
  if (!use) return t;
  t.resize(p.M * p.C * NF);
  at::parallel_for(0, p.M, 16, [&](int64_t b, int64_t e) {
    for (int64_t m = b; m < e; ++m)
      for (int64_t ch = 0; ch < p.C * NF; ++ch)
        t[m * p.C * NF + ch] = premix_plane(plane_hash(key, static_cast<uint32_t>(m), static_cast<uint32_t>(ch)));
  });
  return t;
}
std::vector<uint32_t> plane_table(const Problem& p) { return plane_table(p, p.key, p.use_seed); }

// The noise arguments of mix_fwd (fastmix/ops/noise.py checks them with friendlier messages first): the
// table float32 (2^B,) with 1 <= B <= 16, the scale float32 (C*64,). Their tensors stay alive in the caller.
void set_noise(Problem& p, const std::optional<at::Tensor>& scale, const std::optional<at::Tensor>& table,
               int64_t seed, at::Tensor& scale_c, at::Tensor& table_c) {
  if (!table.has_value()) {
    TORCH_CHECK(!scale.has_value(), "mix: noise_scale needs noise_table");
    return;
  }
  TORCH_CHECK(scale.has_value(), "mix: noise_table needs noise_scale");
  TORCH_CHECK(table->scalar_type() == at::kFloat && table->dim() == 1, "mix: noise_table must be float32 (2^B,)");
  const int64_t size = table->numel();
  int bits = 0;
  while ((int64_t{1} << bits) < size) ++bits;
  TORCH_CHECK(size >= 2 && (int64_t{1} << bits) == size && bits <= kNoiseMaxBits,
              "mix: noise_table must hold 2^B entries, 1 <= B <= ", kNoiseMaxBits, ", got ", size);
  TORCH_CHECK(scale->scalar_type() == at::kFloat && scale->dim() == 1 && scale->numel() == p.C * NF,
              "mix: noise_scale must be float32 (C*64,) = (", p.C * NF, ",)");
  TORCH_CHECK(seed >= 0, "mix: noise_seed must be >= 0");
  scale_c = scale->contiguous();
  table_c = table->contiguous();
  p.use_noise = true;
  p.noise_key = noise_key(static_cast<uint64_t>(seed));
  p.noise_shift = 32 - bits;
  p.noise_scale = scale_c.const_data_ptr<float>();
  p.noise_table = table_c.const_data_ptr<float>();
}

// C[f] negated where the sign hash says, for the 64 coefficients of block (I, J) of one (m, colour) plane
// (premixed: its 64 words of plane_table). 64 independent lanes of branch-free 32-bit integer work, which
// the compiler vectorises. Measured on this project's 2-core CI-class machine (freq_mix forward, N = 512,
// 3x112x112, k = 6, fp32, medians of 9): signs added 29 ms to 44 ms with sign_flip per coefficient in the
// store loop, 8-9 ms this way.
template <typename acc_t>
inline void apply_signs(const uint32_t* premixed, int64_t I, int64_t J, acc_t* C) {
  const uint32_t bw = block_word(static_cast<uint32_t>(I), static_cast<uint32_t>(J));
  for (int64_t f = 0; f < NF; ++f) C[f] = sign_flip_premixed(premixed[f], bw) ? -C[f] : C[f];
}

// C[f] += table[index] * scale[f] for the 64 coefficients of block (I, J) of one (m, colour) plane (premixed:
// its 64 noise words; scale: the colour's 64 channel scales). The product is one float32 rounding, as in
// the specification; the add may fuse with it (an FMA where the capability has one), so a zero coefficient
// receives the specification's bits exactly and any other is within the add's rounding of them.
// Generic form: three loops, so that the hash and the multiply-add vectorise around 64 plain table loads
// (GCC 12 emits no gather instruction for them). The AVX2 / AVX-512 copies hash 8 lanes and read the table with
// one gather instruction per 8 coefficients instead. Measured in isolation (g++ 12 -O3, the 2^12 table, best
// of 5 on this project's loaded 2-core machine): 1.10 ns per coefficient as three loops, 0.37 with the AVX2
// gather; 1.34 / 0.45 in the AVX-512 copy (a 16-lane gather measured 0.54, so the 8-lane one is kept there too).
template <typename acc_t>
inline void apply_noise(const uint32_t* premixed, int64_t I, int64_t J, const float* scale, const float* table,
                        int shift, acc_t* C) {
  const uint32_t bw = block_word(static_cast<uint32_t>(I), static_cast<uint32_t>(J));
#if defined(FASTMIX_CPU_CAP_AVX2) || defined(FASTMIX_CPU_CAP_AVX512)
  if constexpr (std::is_same_v<acc_t, float>) {
    const __m256i vbw = _mm256_set1_epi32(static_cast<int>(bw));
    const __m256i m1 = _mm256_set1_epi32(static_cast<int>(0x7FEB352Du));
    const __m256i m2 = _mm256_set1_epi32(static_cast<int>(0x846CA68Bu));
    const __m128i sh = _mm_cvtsi32_si128(shift);
    for (int64_t f = 0; f < NF; f += 8) {
      // noise_index_premixed (csrc/noise.h), 8 lanes
      __m256i h = _mm256_xor_si256(_mm256_loadu_si256(reinterpret_cast<const __m256i*>(premixed + f)), vbw);
      h = _mm256_mullo_epi32(h, m1);
      h = _mm256_xor_si256(h, _mm256_srli_epi32(h, 15));
      h = _mm256_srl_epi32(_mm256_mullo_epi32(h, m2), sh);
      const __m256 n = _mm256_mul_ps(_mm256_i32gather_ps(table, h, 4), _mm256_loadu_ps(scale + f));
      _mm256_storeu_ps(C + f, _mm256_add_ps(_mm256_loadu_ps(C + f), n));
    }
    return;
  }
#endif
  uint32_t idx[NF];
  float q[NF];
  for (int64_t f = 0; f < NF; ++f) idx[f] = noise_index_premixed(premixed[f], bw, shift);
  for (int64_t f = 0; f < NF; ++f) q[f] = table[idx[f]];
  for (int64_t f = 0; f < NF; ++f) C[f] += static_cast<acc_t>(q[f] * scale[f]);
}

// ------------------------------------------------------------------------------------------------
// Forward
// ------------------------------------------------------------------------------------------------

// FIX = 8: both patch extents are 8 (the plain DCT geometry), known at compile time so that every
// transform loop is fully unrolled and vectorised; FIX = 0: extents read at run time (the frontend).
template <int FIX, typename in_t, typename out_t, typename acc_t>
void mix_forward_kernel(const Problem& p, const in_t* x, const int64_t* idx, const acc_t* w, const int32_t* pos,
                        const Geometry<acc_t>& rg, const Geometry<acc_t>& cg, out_t* out) {
  const int64_t Hb = rg.nb, Wb = cg.nb;
  const int64_t ra = FIX ? FIX : rg.r, rb = FIX ? FIX : cg.r;
  const auto planes = plane_table(p);
  const auto noise_planes = plane_table(p, p.noise_key, p.use_noise);
  // Grain: at least ~64 blocks per chunk, so that tiny calls do not pay for waking threads.
  at::parallel_for(0, p.M * p.C * Hb, std::max<int64_t>(1, 64 / std::max<int64_t>(Wb, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> strip(NF * Wb);
    acc_t P[NF], Cb[NF], Ct[NF];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t I = task % Hb, c = (task / Hb) % p.C, m = task / (Hb * p.C);
      const acc_t* A = rg.m(I);
      const int64_t r0 = rg.start[I];
      for (int64_t J = 0; J < Wb; ++J) {
        const acc_t* BT = cg.t(J);
        const int64_t s0 = cg.start[J];
        if (p.per_image) {
          // Mix first, transform once.
          std::memset(P, 0, sizeof(P));
          for (int64_t t = 0; t < p.K; ++t) {
            const acc_t wt = w[m * p.K + t];
            if (wt == acc_t(0)) continue;  // padded partner: skipped
            const in_t* src = x + ((idx[m * p.K + t] * p.C + c) * p.H + r0) * p.W + s0;
            if (FIX)
              add_patch(src, p.W, ra, rb, wt, P);
            else
              load_patch_masked(src, p.W, ra, rb, rg.v(I), cg.v(J), wt, P);
          }
          forward_transform(A, P, BT, ra, rb, Cb);
        } else {
          std::memset(Cb, 0, sizeof(Cb));
          for (int64_t t = 0; t < p.K; ++t) {
            const acc_t* wr = w + ((m * p.K + t) * p.Cw + (p.Cw == 1 ? 0 : c)) * NF;
            bool any = false;
            for (int64_t f = 0; f < NF; ++f) any |= wr[f] != acc_t(0);
            if (!any) continue;
            const in_t* src = x + ((idx[m * p.K + t] * p.C + c) * p.H + r0) * p.W + s0;
            std::memset(P, 0, sizeof(P));
            if (FIX)
              load_patch(src, p.W, ra, rb, P);
            else
              load_patch_masked(src, p.W, ra, rb, rg.v(I), cg.v(J), acc_t(1), P);
            forward_transform(A, P, BT, ra, rb, Ct);
            accumulate_weighted(wr, Ct, Cb);
          }
        }
        if (p.use_seed) apply_signs(planes.data() + (m * p.C + c) * NF, I, J, Cb);
        // Noise after the sign flip, on the released coefficients (removed ones are dropped below).
        if (p.use_noise)
          apply_noise(noise_planes.data() + (m * p.C + c) * NF, I, J, p.noise_scale + c * NF, p.noise_table,
                      p.noise_shift, Cb);
        if (p.pixels) {
          for (int64_t f = 0; f < NF; ++f)
            if (pos[c * NF + f] < 0) Cb[f] = 0;
          // Block inverse: pixels = A^T C B (the geometry is the plain DCT here).
          acc_t px[NF];
          adjoint_transform(rg.t(I), Cb, cg.m(J), BS, px);
          out_t* dst = out + ((m * p.C + c) * p.H + r0) * p.W + s0;
          for (int64_t a = 0; a < BS; ++a)
            for (int64_t b = 0; b < BS; ++b) dst[a * p.W + b] = static_cast<out_t>(px[a * BS + b]);
        } else {
          for (int64_t f = 0; f < NF; ++f) strip[f * Wb + J] = Cb[f];
        }
      }
      if (p.pixels) continue;
      // Channels: one contiguous run of Wb values per kept channel.
      for (int64_t f = 0; f < NF; ++f) {
        const int32_t slot = pos[c * NF + f];
        if (slot < 0) continue;
        out_t* dst = out + ((m * p.n_kept + slot) * Hb + I) * Wb;
        const acc_t* s = strip.data() + f * Wb;
        for (int64_t J = 0; J < Wb; ++J) dst[J] = static_cast<out_t>(s[J]);
      }
    }
  });
}

template <typename acc_t>
at::ScalarType acc_type_of(at::ScalarType) {
  return std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat;
}

}  // namespace

at::Tensor mix_fwd_cpu(const at::Tensor& x_in, const at::Tensor& index_in, const at::Tensor& weight_in,
                       const at::Tensor& pos_in, int64_t n_kept, int64_t seed, bool use_seed, bool pixels,
                       const at::Tensor& row_mat, const at::Tensor& row_start, const at::Tensor& col_mat,
                       const at::Tensor& col_start, std::optional<at::ScalarType> out_dtype,
                       const std::optional<at::Tensor>& noise_scale, const std::optional<at::Tensor>& noise_table,
                       int64_t noise_seed) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const at::Tensor pos = pos_in.contiguous();
  Problem p = make_problem(x, index, weight_in, pos, n_kept, seed, use_seed, pixels);
  at::Tensor noise_scale_c, noise_table_c;
  set_noise(p, noise_scale, noise_table, noise_seed, noise_scale_c, noise_table_c);
  check_index_range(index, p.N);
  check_pos(pos, n_kept);
  const at::ScalarType od = out_dtype.value_or(x.scalar_type());
  const int64_t Hb = row_mat.size(0), Wb = col_mat.size(0);
  at::Tensor out = pixels ? at::empty({p.M, p.C, p.H, p.W}, x.options().dtype(od))
                          : at::empty({p.M, n_kept, Hb, Wb}, x.options().dtype(od));
  if (pixels) TORCH_CHECK(row_mat.size(2) == BS && col_mat.size(2) == BS && Hb * BS == p.H && Wb * BS == p.W,
                          "mix: pixels output needs the plain 8x8 DCT geometry");
  if (out.numel() == 0) return out;
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mix_fwd_cpu", [&] {
    using in_t = scalar_t;
    using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
    const at::Tensor w = weight_in.to(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat).contiguous();
    Geometry<acc_t> rg(row_mat, row_start, p.H, "row");
    Geometry<acc_t> cg(col_mat, col_start, p.W, "col");
    const bool fixed = rg.r == BS && cg.r == BS;
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, od, "mix_fwd_cpu_out", [&] {
      auto* kernel = fixed ? &mix_forward_kernel<BS, in_t, scalar_t, acc_t> : &mix_forward_kernel<0, in_t, scalar_t, acc_t>;
      kernel(p, x.const_data_ptr<in_t>(), index.const_data_ptr<int64_t>(), w.const_data_ptr<acc_t>(),
             pos.const_data_ptr<int32_t>(), rg, cg, out.mutable_data_ptr<scalar_t>());
    });
  });
  return out;
}

namespace {

// ------------------------------------------------------------------------------------------------
// Backward
// ------------------------------------------------------------------------------------------------

// The gradient with respect to the mixed coefficients of block (m, c, I, J), zero where removed.
template <typename g_t, typename acc_t>
inline void load_coef_grad(const Problem& p, const g_t* grad, const int32_t* pos, const uint32_t* planes,
                           const Geometry<acc_t>& rg, const Geometry<acc_t>& cg, int64_t m, int64_t c, int64_t I,
                           int64_t J, acc_t* G) {
  const int64_t Hb = rg.nb, Wb = cg.nb;
  if (p.pixels) {
    // d(pixels)/d(coef) is the block inverse, whose adjoint is the DCT.
    acc_t P[NF];
    const g_t* src = grad + ((m * p.C + c) * p.H + I * BS) * p.W + J * BS;
    load_patch(src, p.W, BS, BS, P);
    forward_transform(rg.m(I), P, cg.t(J), BS, BS, G);
    for (int64_t f = 0; f < NF; ++f)
      if (pos[c * NF + f] < 0) G[f] = 0;
  } else {
    for (int64_t f = 0; f < NF; ++f) {
      const int32_t slot = pos[c * NF + f];
      G[f] = slot < 0 ? acc_t(0) : static_cast<acc_t>(grad[((m * p.n_kept + slot) * Hb + I) * Wb + J]);
    }
  }
  if (p.use_seed) apply_signs(planes + (m * p.C + c) * NF, I, J, G);
}

template <int FIX, typename in_t, typename g_t, typename acc_t>
void mix_backward_x_kernel(const Problem& p, const g_t* grad, const int64_t* idx, const acc_t* w, const int32_t* pos,
                           const uint32_t* planes, const Geometry<acc_t>& rg, const Geometry<acc_t>& cg, in_t* gx) {
  // Inverse index (CSR): for image n, the (m, t) pairs that read it. Building it is O(M k) and makes the
  // scatter a race-free gather, so the result is deterministic.
  std::vector<int64_t> offs(p.N + 1, 0), pairs;
  for (int64_t e = 0; e < p.M * p.K; ++e)
    if (!(p.per_image && w[e] == acc_t(0))) ++offs[idx[e] + 1];
  for (int64_t n = 0; n < p.N; ++n) offs[n + 1] += offs[n];
  pairs.resize(offs[p.N]);
  {
    std::vector<int64_t> fill(offs.begin(), offs.end() - 1);
    for (int64_t e = 0; e < p.M * p.K; ++e)
      if (!(p.per_image && w[e] == acc_t(0))) pairs[fill[idx[e]]++] = e;
  }
  const int64_t Hb = rg.nb, Wb = cg.nb;
  const int64_t ra = FIX ? FIX : rg.r, rb = FIX ? FIX : cg.r;
  at::parallel_for(0, p.N * p.C, std::max<int64_t>(1, 64 / std::max<int64_t>(Hb * Wb, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> acc(p.H * p.W);
    acc_t G[NF], Gs[NF], dP[NF];
    for (int64_t task = begin; task < end; ++task) {
      const int64_t n = task / p.C, c = task % p.C;
      std::fill(acc.begin(), acc.end(), acc_t(0));
      if (offs[n + 1] > offs[n]) {
        for (int64_t I = 0; I < Hb; ++I)
          for (int64_t J = 0; J < Wb; ++J) {
            std::memset(Gs, 0, sizeof(Gs));
            for (int64_t q = offs[n]; q < offs[n + 1]; ++q) {
              const int64_t e = pairs[q], m = e / p.K;
              load_coef_grad(p, grad, pos, planes, rg, cg, m, c, I, J, G);
              if (p.per_image) {
                const acc_t wt = w[e];
                if (wt == acc_t(0)) continue;  // skipped partner: exact zeros, even from a NaN gradient
                for (int64_t f = 0; f < NF; ++f) Gs[f] += wt * G[f];
              } else {
                const acc_t* wr = w + (e * p.Cw + (p.Cw == 1 ? 0 : c)) * NF;
                accumulate_weighted(wr, G, Gs);
              }
            }
            adjoint_transform(rg.t(I), Gs, cg.m(J), ra, dP);
            // Patch pixels the block's bilinear rows / columns never touch get nothing (not 0 * G, which
            // is NaN where G is), as the forward never reads them.
            acc_t* dst = acc.data() + rg.start[I] * p.W + cg.start[J];
            const uint8_t *rv = rg.v(I), *cv = cg.v(J);
            for (int64_t a = 0; a < ra; ++a)
              for (int64_t b = 0; b < rb; ++b)
                if (FIX || (rv[a] && cv[b])) dst[a * p.W + b] += dP[a * BS + b];
          }
      }
      in_t* out = gx + (n * p.C + c) * p.H * p.W;
      for (int64_t i = 0; i < p.H * p.W; ++i) out[i] = static_cast<in_t>(acc[i]);
    }
  });
}

template <int FIX, typename in_t, typename g_t, typename acc_t>
void mix_backward_w_kernel(const Problem& p, const g_t* grad, const in_t* x, const int64_t* idx, const acc_t* w,
                           const int32_t* pos, const uint32_t* planes, const Geometry<acc_t>& rg,
                           const Geometry<acc_t>& cg, double* gw) {
  const int64_t Hb = rg.nb, Wb = cg.nb;
  const int64_t per_m = p.per_image ? p.K : p.K * p.Cw * NF;
  const int64_t ra = FIX ? FIX : rg.r, rb = FIX ? FIX : cg.r;
  at::parallel_for(0, p.M, std::max<int64_t>(1, 64 / std::max<int64_t>(p.C * Hb * Wb, 1)), [&](int64_t begin, int64_t end) {
    acc_t G[NF], dP[NF], P[NF], Ct[NF];
    for (int64_t m = begin; m < end; ++m) {
      double* out = gw + m * per_m;
      std::fill(out, out + per_m, 0.0);
      for (int64_t c = 0; c < p.C; ++c)
        for (int64_t I = 0; I < Hb; ++I)
          for (int64_t J = 0; J < Wb; ++J) {
            load_coef_grad(p, grad, pos, planes, rg, cg, m, c, I, J, G);
            const int64_t r0 = rg.start[I], s0 = cg.start[J];
            if (p.per_image) {
              // <G, A P B^T> = <A^T G B, P>: one adjoint transform, then a dot per partner.
              adjoint_transform(rg.t(I), G, cg.m(J), ra, dP);
              for (int64_t t = 0; t < p.K; ++t) {
                if (w[m * p.K + t] == acc_t(0)) continue;
                const in_t* src = x + ((idx[m * p.K + t] * p.C + c) * p.H + r0) * p.W + s0;
                acc_t s = 0;
                const uint8_t *rv = rg.v(I), *cv = cg.v(J);
                for (int64_t a = 0; a < ra; ++a)
                  for (int64_t b = 0; b < rb; ++b)
                    if (FIX || (rv[a] && cv[b])) s += dP[a * BS + b] * static_cast<acc_t>(src[a * p.W + b]);
                out[t] += static_cast<double>(s);
              }
            } else {
              for (int64_t t = 0; t < p.K; ++t) {
                const int64_t cw = p.Cw == 1 ? 0 : c;
                const acc_t* wr = w + ((m * p.K + t) * p.Cw + cw) * NF;
                const in_t* src = x + ((idx[m * p.K + t] * p.C + c) * p.H + r0) * p.W + s0;
                std::memset(P, 0, sizeof(P));
                if (FIX)
                  load_patch(src, p.W, ra, rb, P);
                else
                  load_patch_masked(src, p.W, ra, rb, rg.v(I), cg.v(J), acc_t(1), P);
                forward_transform(rg.m(I), P, cg.t(J), ra, rb, Ct);
                double* o = out + (t * p.Cw + cw) * NF;
                for (int64_t f = 0; f < NF; ++f)
                  if (wr[f] != acc_t(0)) o[f] += static_cast<double>(G[f] * Ct[f]);
              }
            }
          }
    }
  });
}

}  // namespace

std::tuple<at::Tensor, at::Tensor> mix_bwd_cpu(const at::Tensor& grad_in, const at::Tensor& x_in,
                                               const at::Tensor& index_in, const at::Tensor& weight_in,
                                               const at::Tensor& pos_in, int64_t seed, bool use_seed, bool pixels,
                                               const at::Tensor& row_mat, const at::Tensor& row_start,
                                               const at::Tensor& col_mat, const at::Tensor& col_start, bool need_x,
                                               bool need_w) {
  const at::Tensor x = x_in.contiguous();
  const at::Tensor index = index_in.contiguous();
  const at::Tensor pos = pos_in.contiguous();
  const at::Tensor grad = grad_in.contiguous();
  int64_t n_kept = 0;
  {
    const int32_t* pp = pos.const_data_ptr<int32_t>();
    for (int64_t i = 0; i < pos.numel(); ++i) n_kept = std::max<int64_t>(n_kept, pp[i] + 1);
  }
  Problem p = make_problem(x, index, weight_in, pos, pixels ? 0 : grad.size(1), seed, use_seed, pixels);
  TORCH_CHECK(pixels || grad.size(1) >= n_kept, "mix_bwd: grad has fewer channels than pos needs");
  check_index_range(index, p.N);
  at::Tensor gx = need_x ? at::empty_like(x) : x.new_empty({0});
  at::Tensor gw_d = need_w ? at::zeros(weight_in.sizes(), weight_in.options().dtype(at::kDouble)) : at::Tensor();
  if ((need_x || need_w) && (p.M == 0 || grad.numel() == 0)) {
    if (need_x) gx.zero_();
  } else if (need_x || need_w) {
    const auto planes = plane_table(p);
    AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "mix_bwd_cpu", [&] {
      using in_t = scalar_t;
      using acc_t = std::conditional_t<std::is_same_v<in_t, double>, double, float>;
      const at::Tensor w = weight_in.to(std::is_same_v<acc_t, double> ? at::kDouble : at::kFloat).contiguous();
      Geometry<acc_t> rg(row_mat, row_start, p.H, "row");
      Geometry<acc_t> cg(col_mat, col_start, p.W, "col");
      AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, grad.scalar_type(), "mix_bwd_cpu_grad", [&] {
        using g_t = scalar_t;
        const bool fixed = rg.r == BS && cg.r == BS;
        auto* kx = fixed ? &mix_backward_x_kernel<BS, in_t, g_t, acc_t> : &mix_backward_x_kernel<0, in_t, g_t, acc_t>;
        auto* kw = fixed ? &mix_backward_w_kernel<BS, in_t, g_t, acc_t> : &mix_backward_w_kernel<0, in_t, g_t, acc_t>;
        if (need_x)
          kx(p, grad.const_data_ptr<g_t>(), index.const_data_ptr<int64_t>(),
                                                  w.const_data_ptr<acc_t>(), pos.const_data_ptr<int32_t>(),
                                                  planes.data(), rg, cg, gx.mutable_data_ptr<in_t>());
        if (need_w)
          kw(p, grad.const_data_ptr<g_t>(), x.const_data_ptr<in_t>(),
                                                  index.const_data_ptr<int64_t>(), w.const_data_ptr<acc_t>(),
                                                  pos.const_data_ptr<int32_t>(), planes.data(), rg, cg,
                                                  gw_d.mutable_data_ptr<double>());
      });
    });
  }
  at::Tensor gw = need_w ? gw_d.to(weight_in.scalar_type()) : weight_in.new_empty({0});
  return {gx, gw};
}

}  // namespace FASTMIX_CAP_NS
}  // namespace fastmix
