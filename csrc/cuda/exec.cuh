// The CUDA executor of the kernels in mix_kernels.cuh: exec(kernel, n) launches one thread per tid in [0, n)
// (128 per block) on the current stream and checks the launch.
#pragma once

#include <ATen/ATen.h>
#include <c10/cuda/CUDAException.h>
#include <c10/cuda/CUDAStream.h>

#include <cstdint>
#include <limits>

namespace fastmix {
namespace gpu {

constexpr int kThreads = 128;

template <class K>
__global__ void __launch_bounds__(kThreads) run_kernel(const K kernel, int64_t n) {
  const int64_t tid = static_cast<int64_t>(blockIdx.x) * blockDim.x + threadIdx.x;
  if (tid < n) kernel(tid);
}

struct CudaExec {
  cudaStream_t stream = c10::cuda::getCurrentCUDAStream();
  template <class K>
  void operator()(const K& kernel, int64_t n) const {
    if (n <= 0) return;
    const int64_t blocks = (n + kThreads - 1) / kThreads;
    TORCH_CHECK(blocks <= std::numeric_limits<int32_t>::max(), "mix (cuda): ", n, " threads exceed one launch grid");
    run_kernel<K><<<static_cast<unsigned>(blocks), kThreads, 0, stream>>>(kernel, n);
    C10_CUDA_KERNEL_LAUNCH_CHECK();
  }
};

}  // namespace gpu
}  // namespace fastmix
