// Sampling by the exponential race (DESIGN §2): the token is
// argmax_i p_i / E_i, E_i ~ Exp(1) drawn per vocabulary index; evaluated in
// log space as argmax_i x_i - log(E_i) with x = logits / temperature, so it
// needs neither the row maximum nor the normaliser: one pass, any layout.
// Greedy is argmax_i logits_i. Ties go to the lowest index in both.
#pragma once
#include <math.h>

#include <cstdint>

#include "filters.h"
#include "macros.h"
#include "rng.h"
#include "status.h"

namespace dspark {

struct RaceBest {
  float score;
  int32_t index;  // -1: no candidate yet
};

DSPARK_HD RaceBest race_empty() { return RaceBest{-INFINITY, -1}; }

// Total order: higher score first, then lower index; empty loses.
DSPARK_HD bool race_better(float score, int32_t index, const RaceBest& best) {
  if (index < 0) return false;
  if (best.index < 0) return true;
  return score > best.score || (score == best.score && index < best.index);
}

DSPARK_HD RaceBest race_merge(const RaceBest& a, const RaceBest& b) {
  return race_better(b.score, b.index, a) ? b : a;
}

DSPARK_HD float race_score(float x, uint32_t bits) { return x - logf(exponential_from_bits(bits)); }

// One row's sampling parameters, already resolved from the per-request inputs.
struct RaceRow {
  bool greedy;        // temperature <= 0 (or NaN)
  float temperature;
  uint32_t keep_key;  // top-k/top-p threshold key; 0 keeps everything
};

// Offer vocabulary entry i (logit l, random bits) to the race. Sets
// kNonfiniteLogits for NaN or +inf logits (and for l / T overflowing to +inf).
DSPARK_HD void race_offer(RaceBest& best, int32_t& flags, const RaceRow& row, float l,
                          int32_t index, uint32_t bits) {
  if (l != l || l == INFINITY) {
    flags |= kNonfiniteLogits;
    return;
  }
  if (row.greedy) {
    if (l > -INFINITY && race_better(l, index, best)) best = RaceBest{l, index};
    return;
  }
  const float x = l / row.temperature;
  if (x == INFINITY) {
    flags |= kNonfiniteLogits;
    return;
  }
  if (x == -INFINITY || float_key(x) < row.keep_key) return;
  const float s = race_score(x, bits);
  if (race_better(s, index, best)) best = RaceBest{s, index};
}

// The final token and status of a row from its merged race and flags.
DSPARK_HD void race_finish(const RaceBest& best, int32_t flags, int32_t& token, int32_t& status) {
  if ((flags & kAbortMask) == 0 && best.index < 0) flags |= kAllMasked;
  status = flags;
  token = (flags & kAbortMask) ? -1 : best.index;
}

}  // namespace dspark
