// top-k / top-p keep rules (DESIGN §2), in a form every backend evaluates
// identically:
//   * top-k keeps x iff fewer than k tokens have a strictly larger x, i.e.
//     iff x >= the k-th largest value (duplicates counted);
//   * top-p keeps x iff S(x) < top_p * Z or S(x) == 0, where S(x) is the mass
//     of the (top-k kept) tokens with a strictly larger x and Z their total.
// Masses are summed as fixed-point integers (w * 2^40, rounded), so the sums
// are exact and independent of the summation order. w itself comes from
// expf, whose last bit differs between glibc, CUDA and torch: thresholds can
// differ across backends where a mass lies within DESIGN §2's 1e-5 margin.
// Both rules keep exactly the tokens whose order key is >= a threshold key,
// which is what the kernels compute (key 0 keeps everything).
#pragma once
#include <math.h>

#include <cstdint>
#include <cstring>

#include "macros.h"

namespace dspark {

constexpr double kMassScale = 1099511627776.0;  // 2^40
// Fixed-point sums stay below 2^64 for any V up to this.
constexpr int64_t kMaxVocab = int64_t{1} << 23;

DSPARK_HD uint32_t float_bits(float x) {
#if defined(__CUDA_ARCH__)
  return __float_as_uint(x);
#else
  uint32_t u;
  std::memcpy(&u, &x, sizeof(u));
  return u;
#endif
}

// Order-preserving map float -> uint32 (-0 and +0 map to the same key).
DSPARK_HD uint32_t float_key(float x) {
  const uint32_t u = float_bits(x == 0.0f ? 0.0f : x);
  return (u & 0x80000000u) ? ~u : (u | 0x80000000u);
}

DSPARK_HD bool topk_active(int32_t top_k, int64_t vocab) { return top_k > 0 && top_k < vocab; }

// top_p >= 1 (or NaN) skips the filter: in fp32 the running mass reaches 1
// before the tail would be reached.
DSPARK_HD bool topp_active(float top_p) { return top_p < 1.0f; }

// w = exp(x - max) in (0, 1] as a 2^-40 fixed-point integer.
DSPARK_HD uint64_t mass_fixed(float x, float row_max) {
  const float w = expf(x - row_max);
  if (!(w > 0.0f)) return 0;  // -inf (masked) and NaN (an aborted row)
  return static_cast<uint64_t>(static_cast<double>(w) * kMassScale + 0.5);
}

// S = mass strictly above a token, Z = total kept mass.
DSPARK_HD bool topp_keeps(uint64_t mass_above, uint64_t total, float top_p) {
  return mass_above == 0 ||
         static_cast<double>(mass_above) < static_cast<double>(top_p) * static_cast<double>(total);
}

}  // namespace dspark
