// The seeded noise draw, bit-identical to fastmix/ops/noise.py (the specification) and the GPU kernels.
//
// A coefficient's noise is TABLE[h >> (32 - B)] * scale[channel], with h the sign hash (csrc/sign.h) of the
// noise key instead of the sign key, and TABLE the 2^B float32 quantile atoms of the distribution that the
// Python side builds once and passes to the op. Integer work and one table read: no transcendental function
// runs in a kernel, so every backend draws the same bits.
#pragma once
#include <cstdint>

#include "sign.h"

namespace fastmix {

// The noise stream's key: seed_key with another domain constant (the low word of the 64-bit golden ratio), so
// that a noise seed equal to the sign seed still draws an unrelated stream.
FASTMIX_HD constexpr uint32_t noise_key(uint64_t seed) {
  return mix32(mix32(static_cast<uint32_t>(seed >> 32) ^ 0x7F4A7C15u) ^ static_cast<uint32_t>(seed));
}

// Table bits B: 1..16. The index is the top B bits of mix32(plane ^ (i << 16 | j)).
constexpr int kNoiseMaxBits = 16;

// The index from a pre-mixed plane word (premix_plane(plane_hash(noise_key, m, channel))) and block_word(i, j):
// mix32 split as in sign_flip_premixed, and its last step h ^= h >> 16 skipped because it never changes the
// top 16 bits, which are all an index of B <= 16 bits reads. shift = 32 - B.
FASTMIX_HD constexpr uint32_t noise_index_premixed(uint32_t premixed, uint32_t block, int shift) {
  uint32_t h = (premixed ^ block) * 0x7FEB352Du;
  h ^= h >> 15;
  return (h * 0x846CA68Bu) >> shift;
}

// The specification's form (fastmix/ops/noise.py), for the checks below.
FASTMIX_HD constexpr uint32_t noise_index(uint32_t plane, uint32_t i, uint32_t j, int shift) {
  return mix32(plane ^ ((i << 16) | j)) >> shift;
}

static_assert(noise_index(0x9E3779B9u, 0, 0, 16) == noise_index_premixed(premix_plane(0x9E3779B9u), block_word(0, 0), 16));
static_assert(noise_index(0x12345678u, 0xFFFFu, 7, 20) ==
              noise_index_premixed(premix_plane(0x12345678u), block_word(0xFFFFu, 7), 20));
static_assert(noise_index(0xDEADBEEFu, 3, 0xFFFFu, 16) ==
              noise_index_premixed(premix_plane(0xDEADBEEFu), block_word(3, 0xFFFFu), 16));
static_assert(noise_index(0xFFFFFFFFu, 123u, 4567u, 31) ==
              noise_index_premixed(premix_plane(0xFFFFFFFFu), block_word(123u, 4567u), 31));

}  // namespace fastmix
