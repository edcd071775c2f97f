// CPU block DCT-II / DCT-III over the last two dims, any block size.
// Separable: each tile X becomes D X D^T (forward) or D^T X D (inverse), computed in float (double for
// double inputs) with one thread per group of tile rows. Block 8 (the one every op of fastmix uses) has
// its own kernel: each tile row is one 8-lane vector (vec8.h), 2 x 64 vector FMAs per tile; other block
// sizes take the generic scalar loops.
// Compiled once per CPU capability (capability.h); dispatch.cpp registers the op.
#include <ATen/Parallel.h>
#include <ATen/Dispatch.h>
#include <torch/library.h>
#include <torch/torch.h>

#include <algorithm>
#include <cmath>
#include <type_traits>
#include <vector>

#include "kernels.h"
#include "vec8.h"

FASTMIX_DECLARE_CPU_KERNELS(FASTMIX_CAP_NS)

namespace fastmix {
namespace FASTMIX_CAP_NS {
namespace {

template <typename acc_t>
std::vector<acc_t> dct_matrix(int64_t b, bool transpose) {
  // D[u][x] = a(u) cos((2x+1) u pi / 2b); stored so that M[r][c] is the (r, c) entry of D or D^T.
  std::vector<acc_t> d(b * b);
  for (int64_t u = 0; u < b; ++u)
    for (int64_t x = 0; x < b; ++x) {
      double a = u == 0 ? std::sqrt(1.0 / b) : std::sqrt(2.0 / b);
      double v = a * std::cos((2 * x + 1) * u * M_PI / (2.0 * b));
      if (transpose)
        d[x * b + u] = static_cast<acc_t>(v);
      else
        d[u * b + x] = static_cast<acc_t>(v);
    }
  return d;
}

template <typename scalar_t, typename acc_t>
void block_dct_kernel(const scalar_t* x, scalar_t* y, int64_t planes, int64_t H, int64_t W, int64_t b, bool inverse) {
  const auto M = dct_matrix<acc_t>(b, inverse);  // rows of the left factor: M X M^T
  const int64_t hb = H / b, wb = W / b;
  at::parallel_for(0, planes * hb, std::max<int64_t>(1, 64 / std::max<int64_t>(wb, 1)), [&](int64_t begin, int64_t end) {
    std::vector<acc_t> tile(b * b), tmp(b * b);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / hb, bi = task % hb;
      const scalar_t* src = x + (p * H + bi * b) * W;
      scalar_t* dst = y + (p * H + bi * b) * W;
      for (int64_t bj = 0; bj < wb; ++bj) {
        for (int64_t r = 0; r < b; ++r)
          for (int64_t c = 0; c < b; ++c) tile[r * b + c] = static_cast<acc_t>(src[r * W + bj * b + c]);
        // tmp = tile @ M^T : tmp[r][v] = sum_c tile[r][c] M[v][c]
        for (int64_t r = 0; r < b; ++r)
          for (int64_t v = 0; v < b; ++v) {
            acc_t s = 0;
            for (int64_t c = 0; c < b; ++c) s += tile[r * b + c] * M[v * b + c];
            tmp[r * b + v] = s;
          }
        // out = M @ tmp
        for (int64_t u = 0; u < b; ++u)
          for (int64_t v = 0; v < b; ++v) {
            acc_t s = 0;
            for (int64_t r = 0; r < b; ++r) s += M[u * b + r] * tmp[r * b + v];
            dst[u * W + bj * b + v] = static_cast<scalar_t>(s);
          }
      }
    }
  });
}

// Y = L X L^T per 8x8 tile, L = D (forward) or D^T (inverse). Rows as vectors:
//   T[r] = sum_c X[r][c] * LT[c]        (LT[c][v] = L[v][c]: row r of X L^T)
//   Y[u] = sum_r L[u][r] * T[r]
template <typename scalar_t, typename acc_t>
void block_dct8_kernel(const scalar_t* x, scalar_t* y, int64_t planes, int64_t H, int64_t W, bool inverse) {
  constexpr int64_t b = 8;
  const auto L = dct_matrix<acc_t>(b, inverse), LTm = dct_matrix<acc_t>(b, !inverse);
  const int64_t hb = H / b, wb = W / b;
  at::parallel_for(0, planes * hb, std::max<int64_t>(1, 64 / std::max<int64_t>(wb, 1)), [&](int64_t begin, int64_t end) {
    v8<acc_t> lt[b];
    for (int64_t c = 0; c < b; ++c) lt[c] = vload(LTm.data() + c * b);
    for (int64_t task = begin; task < end; ++task) {
      const int64_t p = task / hb, bi = task % hb;
      const scalar_t* src = x + (p * H + bi * b) * W;
      scalar_t* dst = y + (p * H + bi * b) * W;
      for (int64_t bj = 0; bj < wb; ++bj) {
        v8<acc_t> T[b];
        for (int64_t r = 0; r < b; ++r) {
          acc_t xr[b];
          vstore(xr, vload_as<acc_t>(src + r * W + bj * b));
          v8<acc_t> row = {};
          for (int64_t c = 0; c < b; ++c) row += xr[c] * lt[c];
          T[r] = row;
        }
        for (int64_t u = 0; u < b; ++u) {
          v8<acc_t> row = {};
          for (int64_t r = 0; r < b; ++r) row += L[u * b + r] * T[r];
          vstore_as<scalar_t, acc_t>(dst + u * W + bj * b, row);
        }
      }
    }
  });
}

}  // namespace

at::Tensor block_dct_cpu(const at::Tensor& x_in, int64_t block, bool inverse) {
  TORCH_CHECK(x_in.dim() >= 2, "block_dct: x must have at least 2 dims");
  TORCH_CHECK(block >= 1, "block_dct: block must be >= 1");
  const int64_t H = x_in.size(-2), W = x_in.size(-1);
  TORCH_CHECK(H % block == 0 && W % block == 0, "block_dct: H and W must be multiples of block");
  at::Tensor x = x_in.contiguous();
  at::Tensor y = at::empty_like(x);
  if (x.numel() == 0) return y;
  const int64_t planes = x.numel() / (H * W);
  AT_DISPATCH_FLOATING_TYPES_AND2(at::kHalf, at::kBFloat16, x.scalar_type(), "block_dct_cpu", [&] {
    using acc_t = std::conditional_t<std::is_same_v<scalar_t, double>, double, float>;
    if (block == 8)
      block_dct8_kernel<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), planes, H, W, inverse);
    else
      block_dct_kernel<scalar_t, acc_t>(x.const_data_ptr<scalar_t>(), y.mutable_data_ptr<scalar_t>(), planes, H, W, block,
                                        inverse);
  });
  return y;
}

}  // namespace FASTMIX_CAP_NS
}  // namespace fastmix
