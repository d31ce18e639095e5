// The random-number contract of DESIGN §2: which Philox counter a draw uses
// and how 32 random bits become a uniform and an exponential variate.
// Pinned: users rely on these streams being reproducible across backends.
#pragma once
#include <math.h>

#include <cstdint>

#include "macros.h"
#include "philox.h"

namespace dspark {

// What a draw is for; keeps the streams of one (seed, position) disjoint.
enum Purpose : uint32_t {
  kPurposeCoin = 1,   // acceptance coin of a drafted token (slot = its node)
  kPurposeEmit = 2,   // the token a verifier emits (slot = the row's node)
  kPurposeDraft = 3,  // a drafter's token (slot = the drafted node)
};

constexpr uint32_t kMaxSlot = 0xFFFFu;  // slots share a word with the purpose

// The 4 outputs for vocabulary indices [4g, 4g+4); lane = vocab & 3.
// key = seed bits, counter = (g, slot | purpose << 16, position lo, position hi).
DSPARK_HD PhiloxBlock philox_draw(int64_t seed, int64_t position, uint32_t purpose,
                                  uint32_t slot, uint32_t vocab_group) {
  const uint64_t s = static_cast<uint64_t>(seed);
  const uint64_t p = static_cast<uint64_t>(position);
  return philox4x32_10(vocab_group, slot | (purpose << 16), static_cast<uint32_t>(p),
                       static_cast<uint32_t>(p >> 32), static_cast<uint32_t>(s),
                       static_cast<uint32_t>(s >> 32));
}

// u in (0, 1): 23 random bits, centred; never 0 and never rounds to 1.0f.
DSPARK_HD float uniform_from_bits(uint32_t bits) {
  return (static_cast<float>(bits >> 9) + 0.5f) * 1.1920928955078125e-07f;  // 2^-23
}

// E = -log(u) > 0: an Exp(1) variate.
DSPARK_HD float exponential_from_bits(uint32_t bits) {
  return -logf(uniform_from_bits(bits));
}

}  // namespace dspark
