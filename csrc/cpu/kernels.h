// The entry points every capability's copy of the CPU kernels defines (csrc/cpu/capability.h), and the
// run-time choice between them (dispatch.cpp), which fastmix.cpp exposes to Python.
#pragma once

#include <ATen/core/Tensor.h>

#include <optional>
#include <string>
#include <tuple>
#include <utility>
#include <vector>

// The op implementations of one capability, in namespace fastmix::NS (schemas: csrc/fastmix.cpp).
#define FASTMIX_DECLARE_CPU_KERNELS(NS)                                                                              \
  namespace fastmix {                                                                                                \
  namespace NS {                                                                                                     \
  at::Tensor block_dct_cpu(const at::Tensor& x, int64_t block, bool inverse);                                        \
  at::Tensor mix_fwd_cpu(const at::Tensor& x, const at::Tensor& index, const at::Tensor& weight, const at::Tensor& pos, \
                         int64_t n_kept, int64_t seed, bool use_seed, bool pixels, const at::Tensor& row_mat,         \
                         const at::Tensor& row_start, const at::Tensor& col_mat, const at::Tensor& col_start,         \
                         std::optional<at::ScalarType> out_dtype, const std::optional<at::Tensor>& noise_scale,       \
                         const std::optional<at::Tensor>& noise_table, int64_t noise_seed);                          \
  std::tuple<at::Tensor, at::Tensor> mix_bwd_cpu(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& index, \
                                                 const at::Tensor& weight, const at::Tensor& pos, int64_t seed,       \
                                                 bool use_seed, bool pixels, const at::Tensor& row_mat,              \
                                                 const at::Tensor& row_start, const at::Tensor& col_mat,             \
                                                 const at::Tensor& col_start, bool need_x, bool need_w);             \
  }                                                                                                                  \
  }

namespace fastmix {

// The capability the CPU ops run with in this process ("avx512", "avx2" or "default"): the best one compiled
// in that this CPU supports, or the one FASTMIX_CPU_CAPABILITY names. Chosen once, at the first call.
// Returns nullptr and sets *error when FASTMIX_CPU_CAPABILITY names one that cannot run here.
const char* cpu_capability(std::string* error);

// Every capability compiled into this build, best first, with whether it can run on this CPU (and is not
// ruled out by FASTMIX_CPU_DISABLE).
std::vector<std::pair<std::string, bool>> cpu_capabilities();

}  // namespace fastmix
