// 8 lanes of acc_t as a GCC/Clang vector: one AVX register for float (two halves of AVX-512 for double).
// Shared by the CPU kernels (dct.cpp, mix.cpp). Written with explicit vectors because the plain-array form
// of the 8x8 transform loops was not vectorised by GCC 12 (measured 512 ns vs 23 ns per 8x8 transform on
// this project's Xeon, -O3 -march=native).
// Compiled in each capability's namespace and ISA (capability.h): a vector-returning helper built for the
// baseline ISA passes a 256-bit vector in memory, one built for AVX2 in a ymm register, so the helpers must
// be built for the ISA of the kernels that call them.
#pragma once

#include <cstring>
#include <type_traits>

#include "capability.h"

namespace fastmix {
namespace FASTMIX_CAP_NS {

template <typename T>
struct Vec8 {
  typedef T type __attribute__((vector_size(8 * sizeof(T))));
};
template <typename acc_t>
using v8 = typename Vec8<acc_t>::type;

template <typename acc_t>
inline v8<acc_t> vload(const acc_t* p) {
  v8<acc_t> v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
template <typename acc_t>
inline void vstore(acc_t* p, v8<acc_t> v) {
  std::memcpy(p, &v, sizeof(v));
}

// 8 consecutive values of any element type (float, double, at::Half, at::BFloat16) as acc_t lanes, and back.
template <typename acc_t, typename T>
inline v8<acc_t> vload_as(const T* p) {
  if constexpr (std::is_same_v<T, acc_t>) {
    return vload(p);
  } else {
    acc_t tmp[8];
    for (int i = 0; i < 8; ++i) tmp[i] = static_cast<acc_t>(p[i]);
    return vload(tmp);
  }
}
template <typename T, typename acc_t>
inline void vstore_as(T* p, v8<acc_t> v) {
  if constexpr (std::is_same_v<T, acc_t>) {
    vstore(p, v);
  } else {
    acc_t tmp[8];
    vstore(tmp, v);
    for (int i = 0; i < 8; ++i) p[i] = static_cast<T>(tmp[i]);
  }
}

}  // namespace FASTMIX_CAP_NS
}  // namespace fastmix
