// The sign-flip hash, bit-identical to fastmix/ops/sign.py (the specification) and the GPU kernels.
#pragma once
#include <cstdint>

// Shared by the C++ CPU kernels and the CUDA kernels (compiled for host and device there).
#if defined(__CUDACC__)
#define FASTMIX_HD __host__ __device__ __forceinline__
#else
#define FASTMIX_HD inline
#endif

namespace fastmix {

// Wellons' "lowbias32" finaliser: a bijection on 32-bit words with strong avalanche.
FASTMIX_HD constexpr uint32_t mix32(uint32_t h) {
  h ^= h >> 16;
  h *= 0x7FEB352Du;
  h ^= h >> 15;
  h *= 0x846CA68Bu;
  h ^= h >> 16;
  return h;
}

FASTMIX_HD constexpr uint32_t seed_key(uint64_t seed) {
  return mix32(mix32(static_cast<uint32_t>(seed >> 32) ^ 0x9E3779B9u) ^ static_cast<uint32_t>(seed));
}

// One word per (output row m, channel id); computed once per plane.
FASTMIX_HD constexpr uint32_t plane_hash(uint32_t key, uint32_t m, uint32_t channel) {
  return mix32(mix32(key ^ m) ^ channel);
}

// True where the coefficient at block (i, j) of that plane is negated.
FASTMIX_HD constexpr bool sign_flip(uint32_t plane, uint32_t i, uint32_t j) {
  return (mix32(plane ^ ((i << 16) | j)) >> 31) != 0;
}

// The same bit in four fewer operations per coefficient, for kernels that hold one plane word per channel and
// test many blocks against it: sign_flip(plane, i, j) == sign_flip_premixed(premix_plane(plane),
// block_word(i, j)) for i, j < 2^16. mix32's first step h ^= h >> 16 distributes over the xor
// ((plane ^ (i << 16 | j)) >> 16 = (plane >> 16) ^ i), so it splits into a per-plane and a per-block word,
// and its last step never changes bit 31.
FASTMIX_HD constexpr uint32_t premix_plane(uint32_t plane) { return plane ^ (plane >> 16); }

FASTMIX_HD constexpr uint32_t block_word(uint32_t i, uint32_t j) { return (i << 16) | (j ^ i); }

FASTMIX_HD constexpr bool sign_flip_premixed(uint32_t premixed, uint32_t block) {
  uint32_t h = (premixed ^ block) * 0x7FEB352Du;
  h ^= h >> 15;
  return ((h * 0x846CA68Bu) >> 31) != 0;
}

// The identity, checked by the compiler at the corners of the (i, j) range every build (the backends use
// only the pre-mixed form; tests compare them with the specification, fastmix/ops/sign.py).
static_assert(sign_flip(0x9E3779B9u, 0, 0) == sign_flip_premixed(premix_plane(0x9E3779B9u), block_word(0, 0)));
static_assert(sign_flip(0x12345678u, 0xFFFFu, 0) == sign_flip_premixed(premix_plane(0x12345678u), block_word(0xFFFFu, 0)));
static_assert(sign_flip(0xDEADBEEFu, 0, 0xFFFFu) == sign_flip_premixed(premix_plane(0xDEADBEEFu), block_word(0, 0xFFFFu)));
static_assert(sign_flip(0xFFFFFFFFu, 0xFFFFu, 0xFFFFu) == sign_flip_premixed(premix_plane(0xFFFFFFFFu), block_word(0xFFFFu, 0xFFFFu)));
static_assert(sign_flip(0x0000FFFFu, 123u, 4567u) == sign_flip_premixed(premix_plane(0x0000FFFFu), block_word(123u, 4567u)));

}  // namespace fastmix
