// Run-time choice of the CPU kernels' instruction set, and the torch.ops.fastmix CPU registrations.
//
// The kernels in dct.cpp and mix.cpp are compiled once per capability (capability.h); this file is compiled
// once, for the baseline ISA, so that loading the extension and choosing never execute an instruction the
// CPU might lack. The choice is made at the first call: the best capability this CPU supports (cpuid, via
// __builtin_cpu_supports, which also checks that the OS saves the wider registers), or the one named by
// FASTMIX_CPU_CAPABILITY. A named capability that this CPU cannot run is refused with an error at call time,
// never run: an AVX-512 instruction on a CPU without it kills the process with SIGILL.
#include <torch/library.h>

#include <cctype>
#include <cstdlib>
#include <mutex>
#include <sstream>

#include "kernels.h"

// setup.py defines FASTMIX_BUILT_<NAME> for every copy it compiles.
FASTMIX_DECLARE_CPU_KERNELS(cpu_DEFAULT)
#if defined(FASTMIX_BUILT_AVX2)
FASTMIX_DECLARE_CPU_KERNELS(cpu_AVX2)
#endif
#if defined(FASTMIX_BUILT_AVX512)
FASTMIX_DECLARE_CPU_KERNELS(cpu_AVX512)
#endif

namespace fastmix {
namespace {

using BlockDct = decltype(&cpu_DEFAULT::block_dct_cpu);
using MixFwd = decltype(&cpu_DEFAULT::mix_fwd_cpu);
using MixBwd = decltype(&cpu_DEFAULT::mix_bwd_cpu);

struct Capability {
  const char* name;
  const char* needs;  // the CPU features it is compiled for (capability.h), for error messages
  bool (*hardware)();
  BlockDct block_dct;
  MixFwd mix_fwd;
  MixBwd mix_bwd;
};

bool always() { return true; }

#if defined(__x86_64__) || defined(__i386__)
// The same features as setup.py's CAPABILITY_FLAGS.
bool has_avx2() {
  __builtin_cpu_init();
  return __builtin_cpu_supports("avx2") && __builtin_cpu_supports("fma") && __builtin_cpu_supports("f16c") &&
         __builtin_cpu_supports("bmi") && __builtin_cpu_supports("bmi2") && __builtin_cpu_supports("popcnt");
}
bool has_avx512() {
  __builtin_cpu_init();
  return has_avx2() && __builtin_cpu_supports("avx512f") && __builtin_cpu_supports("avx512bw") &&
         __builtin_cpu_supports("avx512vl") && __builtin_cpu_supports("avx512dq");
}
#endif

// Best first: the automatic choice is the first one the CPU runs.
const Capability kCapabilities[] = {
#if defined(FASTMIX_BUILT_AVX512)
    {"avx512", "AVX-512 F/BW/VL/DQ, AVX2, FMA", &has_avx512, &cpu_AVX512::block_dct_cpu, &cpu_AVX512::mix_fwd_cpu,
     &cpu_AVX512::mix_bwd_cpu},
#endif
#if defined(FASTMIX_BUILT_AVX2)
    {"avx2", "AVX2, FMA, F16C, BMI1/2", &has_avx2, &cpu_AVX2::block_dct_cpu, &cpu_AVX2::mix_fwd_cpu,
     &cpu_AVX2::mix_bwd_cpu},
#endif
    {"default", "the baseline ISA of the build target", &always, &cpu_DEFAULT::block_dct_cpu, &cpu_DEFAULT::mix_fwd_cpu,
     &cpu_DEFAULT::mix_bwd_cpu},
};

std::string getenv_str(const char* name) {
  const char* v = std::getenv(name);
  return v ? std::string(v) : std::string();
}

std::string lower_trim(std::string s) {
  const auto b = s.find_first_not_of(" \t"), e = s.find_last_not_of(" \t");
  s = b == std::string::npos ? std::string() : s.substr(b, e - b + 1);
  for (auto& ch : s) ch = static_cast<char>(std::tolower(static_cast<unsigned char>(ch)));
  return s;
}

// FASTMIX_CPU_DISABLE=avx512[,avx2]: treat these as unsupported by this CPU (to avoid AVX-512 frequency
// drops on some Intel parts, or to test the fallback on a machine that has them).
bool disabled(const char* name) {
  std::stringstream list(lower_trim(getenv_str("FASTMIX_CPU_DISABLE")));
  std::string item;
  while (std::getline(list, item, ','))
    if (lower_trim(item) == name) return true;
  return false;
}

bool usable(const Capability& c) { return c.hardware() && !disabled(c.name); }

std::string names(bool only_usable) {
  std::string out;
  for (const auto& c : kCapabilities)
    if (!only_usable || usable(c)) out += (out.empty() ? "" : ", ") + std::string(c.name);
  return out;
}

struct Selection {
  const Capability* chosen = nullptr;
  std::string error;
};

Selection select() {
  Selection s;
  const std::string forced = lower_trim(getenv_str("FASTMIX_CPU_CAPABILITY"));
  if (forced.empty()) {
    for (const auto& c : kCapabilities)
      if (usable(c)) {
        s.chosen = &c;
        break;
      }
    return s;  // "default" is always usable
  }
  for (const auto& c : kCapabilities) {
    if (forced != c.name) continue;
    if (usable(c)) {
      s.chosen = &c;
    } else {
      std::ostringstream msg;
      msg << "FASTMIX_CPU_CAPABILITY=" << forced << " asks for the " << c.name << " kernels (" << c.needs << "), which "
          << (c.hardware() ? "FASTMIX_CPU_DISABLE rules out" : "this CPU does not support") << "; running them would "
          << "crash the process (illegal instruction). This CPU runs: " << names(true)
          << ". Unset FASTMIX_CPU_CAPABILITY to pick the best of those automatically.";
      s.error = msg.str();
    }
    return s;
  }
  std::ostringstream msg;
  msg << "FASTMIX_CPU_CAPABILITY=" << forced << " is not a CPU capability of this fastmix build (compiled: " << names(false)
      << "; this CPU runs: " << names(true) << "). Unset it to pick the best automatically.";
  s.error = msg.str();
  return s;
}

const Selection& selection() {
  static const Selection s = select();  // thread-safe one-time initialisation (C++11 magic statics)
  return s;
}

const Capability& kernels() {
  const Selection& s = selection();
  TORCH_CHECK(s.chosen != nullptr, "fastmix CPU kernels: ", s.error);
  return *s.chosen;
}

at::Tensor block_dct_dispatch(const at::Tensor& x, int64_t block, bool inverse) {
  return kernels().block_dct(x, block, inverse);
}

at::Tensor mix_fwd_dispatch(const at::Tensor& x, const at::Tensor& index, const at::Tensor& weight, const at::Tensor& pos,
                            int64_t n_kept, int64_t seed, bool use_seed, bool pixels, const at::Tensor& row_mat,
                            const at::Tensor& row_start, const at::Tensor& col_mat, const at::Tensor& col_start,
                            std::optional<at::ScalarType> out_dtype, const std::optional<at::Tensor>& noise_scale,
                            const std::optional<at::Tensor>& noise_table, int64_t noise_seed) {
  return kernels().mix_fwd(x, index, weight, pos, n_kept, seed, use_seed, pixels, row_mat, row_start, col_mat, col_start,
                           out_dtype, noise_scale, noise_table, noise_seed);
}

std::tuple<at::Tensor, at::Tensor> mix_bwd_dispatch(const at::Tensor& grad, const at::Tensor& x, const at::Tensor& index,
                                                    const at::Tensor& weight, const at::Tensor& pos, int64_t seed,
                                                    bool use_seed, bool pixels, const at::Tensor& row_mat,
                                                    const at::Tensor& row_start, const at::Tensor& col_mat,
                                                    const at::Tensor& col_start, bool need_x, bool need_w) {
  return kernels().mix_bwd(grad, x, index, weight, pos, seed, use_seed, pixels, row_mat, row_start, col_mat, col_start,
                           need_x, need_w);
}

}  // namespace

const char* cpu_capability(std::string* error) {
  const Selection& s = selection();
  if (s.chosen == nullptr && error != nullptr) *error = s.error;
  return s.chosen ? s.chosen->name : nullptr;
}

std::vector<std::pair<std::string, bool>> cpu_capabilities() {
  std::vector<std::pair<std::string, bool>> out;
  for (const auto& c : kCapabilities) out.emplace_back(c.name, usable(c));
  return out;
}

TORCH_LIBRARY_IMPL(fastmix, CPU, m) {
  m.impl("block_dct", &block_dct_dispatch);
  m.impl("mix_fwd", &mix_fwd_dispatch);
  m.impl("mix_bwd", &mix_bwd_dispatch);
}

}  // namespace fastmix
