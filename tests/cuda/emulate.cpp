// The CUDA kernels of csrc/cuda/mix_kernels.cuh on the CPU: an executor that runs kernel(tid) for every tid
// (what one CUDA thread would do), registered as fastmix_cuda_emu::mix_fwd / mix_bwd for CPU tensors with the
// schemas of fastmix::mix_fwd / mix_bwd. Built by tests/cuda/test_cuda_emulated.py; not part of the package.
#include <ATen/Parallel.h>
#include <torch/library.h>

#include "cuda/mix_kernels.cuh"

namespace {

struct HostExec {
  template <class K>
  void operator()(const K& kernel, int64_t n) const {
    at::parallel_for(0, n, 256, [&](int64_t begin, int64_t end) {
      for (int64_t tid = begin; tid < end; ++tid) kernel(tid);
    });
  }
};

at::Tensor mix_fwd_emu(const at::Tensor& x, const at::Tensor& index, const at::Tensor& weight, const at::Tensor& pos,
                       int64_t n_kept, int64_t seed, bool use_seed, bool pixels, const at::Tensor& row_mat,
                       const at::Tensor& row_start, const at::Tensor& col_mat, const at::Tensor& col_start,
                       std::optional<at::ScalarType> out_dtype, const std::optional<at::Tensor>& noise_scale,
                       const std::optional<at::Tensor>& noise_table, int64_t noise_seed) {
  return fastmix::gpu::mix_fwd_impl(HostExec{}, x, index, weight, pos, n_kept, seed, use_seed, pixels, row_mat,
                                    row_start, col_mat, col_start, out_dtype, noise_scale, noise_table, noise_seed);
}

std::tuple<at::Tensor, at::Tensor> mix_bwd_emu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& index,
                                               const at::Tensor& weight, const at::Tensor& pos, int64_t seed,
                                               bool use_seed, bool pixels, const at::Tensor& row_mat,
                                               const at::Tensor& row_start, const at::Tensor& col_mat,
                                               const at::Tensor& col_start, bool need_x, bool need_w) {
  return fastmix::gpu::mix_bwd_impl(HostExec{}, grad, x, index, weight, pos, seed, use_seed, pixels, row_mat,
                                    row_start, col_mat, col_start, need_x, need_w);
}

}  // namespace

TORCH_LIBRARY(fastmix_cuda_emu, m) {
  m.def(
      "mix_fwd(Tensor x, Tensor index, Tensor weight, Tensor pos, int n_kept, int seed, bool use_seed, "
      "bool pixels, Tensor row_mat, Tensor row_start, Tensor col_mat, Tensor col_start, "
      "ScalarType? out_dtype, Tensor? noise_scale=None, Tensor? noise_table=None, int noise_seed=0) -> Tensor");
  m.def(
      "mix_bwd(Tensor grad, Tensor x, Tensor index, Tensor weight, Tensor pos, int seed, bool use_seed, "
      "bool pixels, Tensor row_mat, Tensor row_start, Tensor col_mat, Tensor col_start, "
      "bool need_x, bool need_w) -> (Tensor, Tensor)");
}

TORCH_LIBRARY_IMPL(fastmix_cuda_emu, CPU, m) {
  m.impl("mix_fwd", &mix_fwd_emu);
  m.impl("mix_bwd", &mix_bwd_emu);
}
