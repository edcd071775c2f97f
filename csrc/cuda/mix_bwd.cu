// CUDA registration of fastmix::mix_bwd: the launcher and kernels of mix_kernels.cuh on the CUDA executor
// (see mix_fwd.cu for the forward and for what was measured).
#include <c10/cuda/CUDAGuard.h>
#include <torch/library.h>

#include "exec.cuh"
#include "mix_kernels.cuh"

namespace fastmix {
namespace gpu {
namespace {

std::tuple<at::Tensor, at::Tensor> mix_bwd_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& index,
                                                const at::Tensor& weight, const at::Tensor& pos, int64_t seed,
                                                bool use_seed, bool pixels, const at::Tensor& row_mat,
                                                const at::Tensor& row_start, const at::Tensor& col_mat,
                                                const at::Tensor& col_start, bool need_x, bool need_w) {
  const c10::cuda::CUDAGuard guard(x.device());
  return mix_bwd_impl(CudaExec{}, grad, x, index, weight, pos, seed, use_seed, pixels, row_mat, row_start, col_mat,
                      col_start, need_x, need_w);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmix, CUDA, m) { m.impl("mix_bwd", &mix_bwd_cuda); }

}  // namespace gpu
}  // namespace fastmix
