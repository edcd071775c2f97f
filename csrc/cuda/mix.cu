// CUDA registration of the fused hybrid mask: the kernels and launchers of csrc/cuda/mix_kernels.cuh, run by
// an executor that launches each kernel functor on the current stream (one thread per tid, 128 per block)
// and checks the launch. No host syncs anywhere: CUDA-graph capturable.
//
// Measured on an H100 (benches/results/h100/run1_afb9c80, N = 512, 3x112x112, fp32), the kernels before the
// rewrite into mix_kernels.cuh: correct and capturable; freq_mix (k = 6) forward 0.34 ms, x + weight gradients
// 2.03 ms; frontend (x8, k = 4) forward 13.6 ms, x + weight gradients 119 ms (a weight-gradient kernel that
// walked all 12,544 blocks of a plane per CTA, and an x gradient that re-read the channel gradient once per
// partner), against Triton's 4.8 and 3.7 ms then. The rewrite (sign-word table, compile-time patch extent,
// the three-pass backward of Triton's kernels) has not run on a GPU yet; Triton stays the default GPU
// backend (fastmix/_backend.py) until gpu_bench measures it.
#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAGuard.h>
#include <c10/cuda/CUDAStream.h>
#include <c10/macros/Macros.h>
#include <torch/library.h>

#include <cstdint>
#include <limits>

#include "mix_kernels.cuh"

namespace fastmix {
namespace gpu {
namespace {

constexpr int kThreads = 128;

template <class K>
__global__ void __launch_bounds__(kThreads) run_kernel(const K kernel, int64_t n) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid < n) kernel(tid);
}

struct CudaExec {
  cudaStream_t stream;
  template <class K>
  void operator()(const K& kernel, int64_t n) const {
    if (n <= 0) return;
    const int64_t blocks = (n + kThreads - 1) / kThreads;
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "mix (cuda): ", n, " threads exceed one launch grid");
    run_kernel<K><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(kernel, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

at::Tensor mix_fwd_cuda(const at::Tensor& x, const at::Tensor& index, const at::Tensor& weight, const at::Tensor& pos,
                        int64_t n_kept, int64_t seed, bool use_seed, bool pixels, const at::Tensor& row_mat,
                        const at::Tensor& row_start, const at::Tensor& col_mat, const at::Tensor& col_start,
                        std::optional<at::ScalarType> out_dtype) {
  const c10::cuda::CUDAGuard guard(x.device());
  return mix_fwd_impl(CudaExec{c10::cuda::getCurrentCUDAStream()}, x, index, weight, pos, n_kept, seed, use_seed,
                      pixels, row_mat, row_start, col_mat, col_start, out_dtype);
}

std::tuple<at::Tensor, at::Tensor> mix_bwd_cuda(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& index,
                                                const at::Tensor& weight, const at::Tensor& pos, int64_t seed,
                                                bool use_seed, bool pixels, const at::Tensor& row_mat,
                                                const at::Tensor& row_start, const at::Tensor& col_mat,
                                                const at::Tensor& col_start, bool need_x, bool need_w) {
  const c10::cuda::CUDAGuard guard(x.device());
  return mix_bwd_impl(CudaExec{c10::cuda::getCurrentCUDAStream()}, grad, x, index, weight, pos, seed, use_seed, pixels,
                      row_mat, row_start, col_mat, col_start, need_x, need_w);
}

}  // namespace

TORCH_LIBRARY_IMPL(fastmix, CUDA, m) {
  m.impl("mix_fwd", &mix_fwd_cuda);
  m.impl("mix_bwd", &mix_bwd_cuda);
}

}  // namespace gpu
}  // namespace fastmix
