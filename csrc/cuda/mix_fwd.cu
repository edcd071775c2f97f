// CUDA registration of fastmix::mix_fwd: the launcher and kernels of mix_kernels.cuh on the CUDA executor.
// The backward lives in mix_bwd.cu: two translation units, so that a parallel build (MAX_JOBS) compiles them
// at once (the build runs on the lent GPU machine, in its device time).
//
// Measured on an H100 (benches/results/h100/run1_afb9c80, N = 512, 3x112x112, fp32), the kernels before the
// rewrite into mix_kernels.cuh: correct and capturable; freq_mix (k = 6) forward 0.34 ms, x + weight gradients
// 2.03 ms; frontend (x8, k = 4) forward 13.6 ms, x + weight gradients 119 ms (a weight-gradient kernel that
// walked all 12,544 blocks of a plane per CTA, and an x gradient that re-read the channel gradient once per
// partner), against Triton's 4.8 and 3.7 ms then. The rewrite (sign-word table, compile-time patch extent,
// the three-pass backward of Triton's kernels) has not run on a GPU yet; Triton stays the default GPU
// backend (fastmix/_backend.py) until gpu_bench measures it.
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "exec.cuh"
#include "mix_kernels.cuh"

namespace fastmix {
namespace gpu {
namespace {

at::Tensor mix_fwd_cuda(const at::Tensor& x, const at::Tensor& index, const at::Tensor& weight, const at::Tensor& pos,
                        int64_t n_kept, int64_t seed, bool use_seed, bool pixels, const at::Tensor& row_mat,
                        const at::Tensor& row_start, const at::Tensor& col_mat, const at::Tensor& col_start,
                        std::optional<at::ScalarType> out_dtype, const std::optional<at::Tensor>& noise_scale,
                        const std::optional<at::Tensor>& noise_table, int64_t noise_seed) {
  const c10::cuda::CUDAGuard guard(x.device());
  return mix_fwd_impl(CudaExec{}, x, index, weight, pos, n_kept, seed, use_seed, pixels, row_mat, row_start, col_mat,
                      col_start, out_dtype, noise_scale, noise_table, noise_seed);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmix, CUDA, m) { m.impl("mix_fwd", &mix_fwd_cuda); }

}  // namespace gpu
}  // namespace fastmix
